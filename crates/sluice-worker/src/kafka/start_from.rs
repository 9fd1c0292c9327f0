//! Where a partition starts: its committed offset; without one, `startFrom` decides, but
//! only when the group first starts.
//!
//! `startFrom: latest` means "only records produced after the pipeline first joined". So
//! it applies when the group has no committed offset for any partition of the topics it
//! reads: then each partition this worker is assigned starts at the end of its log, and
//! that end is committed at once. From then on the group has a commit for every partition
//! it had, and a partition without one (one added to a topic later, every partition of a
//! topic that starts matching `topicPattern` later; one whose first owner crashed before
//! committing is covered by that first commit) starts at its first record: nothing
//! produced after the first join is skipped. `startFrom: earliest` is librdkafka's
//! `auto.offset.reset=earliest` (see `kafka/config.rs`), which also applies to a committed
//! offset out of range.

use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use sluice_api::config::Subscription;

use crate::engine::partition::TopicPartition;
use crate::kafka::config::subscribed_partitions;
use crate::kafka::consumer::SluiceConsumer;

/// The group's committed offset for each of `parts`, `None` where it has none. A
/// per-partition error is retried and then returned as an error, never read as "no
/// commit" (which would replay or skip the partition).
pub fn committed_offsets(
    consumer: &SluiceConsumer,
    parts: &[TopicPartition],
) -> Result<Vec<(TopicPartition, Option<i64>)>, String> {
    let mut last = String::new();
    for attempt in 0..10 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        let mut tpl = TopicPartitionList::new();
        for tp in parts {
            tpl.add_partition(&tp.topic, tp.partition);
        }
        let committed = match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
            Ok(c) => c,
            Err(e) => {
                last = format!("reading the committed offsets: {e}");
                continue;
            }
        };
        let elements = committed.elements();
        let answer = elements
            .iter()
            .map(|e| (e.topic(), e.partition(), e.offset(), e.error()));
        match read_committed(answer) {
            Ok(offsets) => return Ok(offsets),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The offsets of an answer to a committed-offsets query, element by element (topic,
/// partition, offset, the element's error): an element carrying an error is an error.
/// Pure.
pub fn read_committed<'a>(
    elements: impl IntoIterator<Item = (&'a str, i32, Offset, rdkafka::error::KafkaResult<()>)>,
) -> Result<Vec<(TopicPartition, Option<i64>)>, String> {
    elements
        .into_iter()
        .map(|(topic, partition, offset, error)| {
            error.map_err(|err| {
                format!("the committed offset of {topic}/{partition} is unknown: {err}")
            })?;
            let offset = match offset {
                Offset::Offset(o) if o >= 0 => Some(o),
                _ => None,
            };
            Ok((TopicPartition::new(topic, partition), offset))
        })
        .collect()
}

/// What `startFrom: latest` does with a partition, given the group's commits for every
/// partition of the topic. Pure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The partition has a commit: resume there.
    Committed,
    /// The group has commits, not for this partition: read it from its first record.
    First,
    /// The group has no commit at all (it starts now): start at the end, and commit it.
    End,
}

/// See [`Start`].
pub fn latest_start(own: Option<i64>, group_has_commits: bool) -> Start {
    match (own, group_has_commits) {
        (Some(_), _) => Start::Committed,
        (None, true) => Start::First,
        (None, false) => Start::End,
    }
}

/// `startFrom: latest` for the partitions of one assignment, before anything of them is
/// read (see the module docs): decided once for them all, and the ends committed in one
/// commit. Returns the partitions that start at their end, with that end: their
/// dispatchers never dispatch a record below it, even if librdkafka's own start of the
/// assignment lands after the seek and fetches from the beginning. If the commits cannot
/// be read, or the ends cannot be committed, the partitions start at their first record,
/// so nothing is skipped (and nothing is returned).
pub async fn start_latest(
    consumer: std::sync::Weak<SluiceConsumer>,
    subscription: Subscription,
    parts: Vec<TopicPartition>,
) -> Vec<(TopicPartition, i64)> {
    if parts.is_empty() {
        return Vec::new();
    }
    let res = tokio::task::spawn_blocking(
        move || -> Result<Vec<(TopicPartition, Start, Option<i64>)>, String> {
            let Some(c) = consumer.upgrade() else {
                return Ok(Vec::new());
            };
            // Every partition of every topic read now: a commit anywhere means the group
            // has started, so a topic that began to match later is read from its start.
            // (A metadata error is asked again before it sends every partition of the
            // assignment to its first record.)
            let mut all = Err(String::new());
            for attempt in 0..5 {
                if attempt > 0 {
                    std::thread::sleep(Duration::from_millis(500));
                }
                all = subscribed_partitions(&*c, &subscription, Duration::from_secs(10));
                if all.is_ok() {
                    break;
                }
            }
            let mut all = all?;
            // The assignment's own partitions, whatever the metadata said of them.
            for tp in &parts {
                if !all.contains(tp) {
                    all.push(tp.clone());
                }
            }
            let committed = committed_offsets(&c, &all)?;
            let any = committed.iter().any(|(_, o)| o.is_some());
            let mut out = Vec::new();
            let mut ends = TopicPartitionList::new();
            for tp in parts {
                let own = committed
                    .iter()
                    .find(|(p, _)| *p == tp)
                    .and_then(|(_, o)| *o);
                let start = latest_start(own, any);
                let mut end = None;
                if start == Start::End {
                    // The end as this consumer reads it (the last stable offset for
                    // read_committed).
                    let (_, e) = c
                        .fetch_watermarks(&tp.topic, tp.partition, Duration::from_secs(10))
                        .map_err(|e| format!("reading the end of {tp}: {e}"))?;
                    // Right at the assignment, librdkafka may not take a seek yet.
                    let mut sought = Err(String::new());
                    for attempt in 0..20 {
                        if attempt > 0 {
                            std::thread::sleep(Duration::from_millis(250));
                        }
                        sought = c
                            .seek(
                                &tp.topic,
                                tp.partition,
                                Offset::Offset(e),
                                Duration::from_secs(10),
                            )
                            .map_err(|err| format!("seeking {tp} to its end ({e}): {err}"));
                        if sought.is_ok() {
                            break;
                        }
                    }
                    sought?;
                    ends.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(e))
                        .map_err(|e| e.to_string())?;
                    end = Some(e);
                }
                out.push((tp, start, end));
            }
            if ends.count() > 0 {
                c.commit(&ends, CommitMode::Sync)
                    .map_err(|e| format!("committing the ends: {e}"))?;
            }
            Ok(out)
        },
    )
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match res {
        Ok(decided) => {
            let mut ends = Vec::new();
            for (tp, start, end) in decided {
                if let (Start::End, Some(e)) = (start, end) {
                    ends.push((tp.clone(), e));
                }
                let (topic, partition) = (&tp.topic, tp.partition);
                match start {
                    Start::End => {
                        tracing::info!(%topic, partition, ?end, "startFrom: latest: the group starts now; starting at the end of the log (committed)")
                    }
                    Start::First => {
                        tracing::info!(%topic, partition, "startFrom: latest: the group has started before but has no commit for this partition; reading it from its first record")
                    }
                    Start::Committed => {}
                }
            }
            ends
        }
        Err(e) => {
            tracing::warn!(error = %e, "startFrom: latest: could not read the group's commits or commit the ends; these partitions start at their earliest record instead (nothing is skipped)");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// N5: `latest` applies when the group first starts, never to a partition that simply
    /// has no commit yet (added later, no record yet, its owner crashed before the
    /// group's first commit was made).
    #[test]
    fn latest_applies_only_when_the_group_first_starts() {
        assert_eq!(latest_start(Some(7), true), Start::Committed);
        assert_eq!(latest_start(None, true), Start::First);
        assert_eq!(latest_start(None, false), Start::End);
    }

    /// N13: an element of the answer carrying an error is an error, not "no commit".
    #[test]
    fn a_per_partition_error_is_never_read_as_no_commit() {
        let ok = || Ok(());
        let got = read_committed([
            ("in", 0, Offset::Offset(5), ok()),
            ("in", 1, Offset::Invalid, ok()),
        ]);
        assert_eq!(
            got.unwrap(),
            vec![
                (TopicPartition::new("in", 0), Some(5)),
                (TopicPartition::new("in", 1), None)
            ]
        );
        let denied = Err(rdkafka::error::KafkaError::OffsetFetch(
            rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed,
        ));
        let got = read_committed([
            ("in", 0, Offset::Offset(5), ok()),
            ("in", 1, Offset::Invalid, denied),
        ]);
        assert!(got.unwrap_err().contains("in/1"));
    }
}
