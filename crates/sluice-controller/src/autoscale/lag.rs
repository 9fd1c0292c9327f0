//! Consumer lag per partition, read from Kafka: the group's committed offsets against the
//! partitions' watermarks.
//!
//! Phantom lag is avoided: a partition without a commit is measured from where the group
//! will start (`source.startFrom`: the log start, or the end of the log for `latest`), and
//! one whose commit fell below the log start (retention deleted those records) from the log
//! start, never from 0.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sluice_api::config::StartFrom;

/// Why lag could not be read. The autoscaler treats any of these as "unknown".
#[derive(Clone, Debug, thiserror::Error)]
pub enum LagError {
    /// Talking to Kafka failed.
    #[error("kafka: {error}{}", cause.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Kafka {
        /// What the request returned.
        error: KafkaError,
        /// What librdkafka reported out of band meanwhile (a refused SASL login, a TLS
        /// handshake failure, an unresolvable name): the request itself only says
        /// "transport failure".
        cause: Option<String>,
    },
    /// The topic does not exist (or has no partitions), or no topic matches the pattern.
    #[error("{}", not_found(.0))]
    TopicNotFound(String),
}

/// The message of [`LagError::TopicNotFound`]: a topic's name, or `/pattern/`.
fn not_found(what: &str) -> String {
    if what.starts_with('/') {
        format!("no topic matches {what} yet")
    } else {
        format!("topic {what} not found")
    }
}

impl From<KafkaError> for LagError {
    fn from(error: KafkaError) -> Self {
        LagError::Kafka { error, cause: None }
    }
}

/// Keeps the last error librdkafka reported through its error callback, so a failed
/// request can say why the broker could not be reached.
#[derive(Debug, Default)]
pub struct LastError(Mutex<Option<String>>);

impl ClientContext for LastError {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel::*;
        tracing::debug!(fac, message, "librdkafka");
        if matches!(level, Emerg | Alert | Critical | Error) {
            *self.0.lock().expect("last error lock") = Some(message.to_string());
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "kafka client error");
        *self.0.lock().expect("last error lock") = Some(reason.to_string());
    }
}

impl ConsumerContext for LastError {}

impl LastError {
    /// The last error reported (taken: the next call sees only a newer one).
    pub fn take(&self) -> Option<String> {
        self.0.lock().expect("last error lock").take()
    }
}

type Inspector = BaseConsumer<LastError>;

fn inspector(config: &ClientConfig) -> Result<Inspector, LagError> {
    Ok(config.create_with_context(LastError::default())?)
}

/// `e` with the client's last out-of-band error attached (the per-pipeline inspector's and
/// the shared connection's, kafka/cluster.rs).
pub(crate) fn explained(c: &Inspector, e: KafkaError) -> LagError {
    // librdkafka's log and error events reach the context only when the client is
    // polled (rdkafka routes them through the client's queue). Every poll serves at most one
    // event, and one it consumed (a log line) reads as `None` like an empty queue, so poll a
    // bounded number of times rather than stopping at the first `None`: a refused TLS
    // client certificate is first a warning (no client certificate sent), then the error
    // that says why.
    for _ in 0..64 {
        let _ = c.poll(Duration::ZERO);
    }
    LagError::Kafka {
        error: e,
        cause: c.context().0.lock().expect("last error lock").take(),
    }
}

impl LagError {
    /// A bounded label for metrics and Events.
    pub fn label(&self) -> &'static str {
        match self {
            LagError::Kafka { .. } => "kafka",
            LagError::TopicNotFound(_) => "topic_not_found",
        }
    }
}

/// Lag of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    /// Topic.
    pub topic: std::sync::Arc<str>,
    /// Partition number.
    pub partition: i32,
    /// Log start offset.
    pub low: i64,
    /// High watermark.
    pub high: i64,
    /// Committed offset, if the group has one.
    pub committed: Option<i64>,
    /// Records not yet consumed.
    pub lag: u64,
}

/// Lag of one partition from its watermarks, its commit and where a group without a commit
/// starts. Pure.
pub fn partition_lag(low: i64, high: i64, committed: Option<i64>, start: StartFrom) -> u64 {
    let from = match (committed, start) {
        (Some(c), _) if c >= low => c,
        (None, StartFrom::Latest) => high,
        _ => low,
    };
    (high - from).max(0) as u64
}

/// Where a partition without a commit starts, as the workers decide it
/// (`kafka/start_from.rs` in the worker): `latest` applies only while the group has no
/// commit at all on the topics it reads; once it has one, a partition without a commit
/// (added later, of a topic that started matching later) is read from its first record,
/// so its whole log is lag. Pure.
pub fn uncommitted_start(start: StartFrom, group_has_commits: bool) -> StartFrom {
    match start {
        StartFrom::Latest if group_has_commits => StartFrom::Earliest,
        s => s,
    }
}

/// Partition ids of `topic`; a topic that does not exist (or has none) is an error.
fn topic_partitions(c: &Inspector, topic: &str, timeout: Duration) -> Result<Vec<i32>, LagError> {
    let md = c
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| explained(c, e))?;
    let t = md
        .topics()
        .first()
        .ok_or_else(|| LagError::TopicNotFound(topic.into()))?;
    if t.error().is_some() || t.partitions().is_empty() {
        return Err(LagError::TopicNotFound(topic.into()));
    }
    Ok(t.partitions().iter().map(|p| p.id()).collect())
}

/// The topic's partition count.
pub fn partition_count(
    config: &ClientConfig,
    topic: &str,
    timeout: Duration,
) -> Result<i32, LagError> {
    let c = inspector(config)?;
    Ok(topic_partitions(&c, topic, timeout)?.len() as i32)
}

/// The committed offset of one element of a committed-offsets answer: `None` when the
/// group has none; an element carrying an error is an error (the lag is unknown), never
/// "no commit". Pure.
fn committed_offset(
    offset: Offset,
    error: rdkafka::error::KafkaResult<()>,
) -> Result<Option<i64>, LagError> {
    error?;
    Ok(match offset {
        Offset::Offset(o) => Some(o),
        _ => None,
    })
}

/// Lag per partition of `group` on `topic`. Blocking; call from a blocking thread.
pub fn group_lag(
    config: &ClientConfig,
    group: &str,
    topic: &str,
    start: StartFrom,
    timeout: Duration,
) -> Result<Vec<PartitionLag>, LagError> {
    let mut cfg = config.clone();
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false");
    let c = inspector(&cfg)?;
    let ids = topic_partitions(&c, topic, timeout)?;
    let mut tpl = TopicPartitionList::new();
    for &p in &ids {
        tpl.add_partition(topic, p);
    }
    let committed = c
        .committed_offsets(tpl, timeout)
        .map_err(|e| explained(&c, e))?;
    let started = ids.iter().any(|&p| {
        committed
            .find_partition(topic, p)
            .is_some_and(|e| matches!(e.offset(), Offset::Offset(_)))
    });
    let start = uncommitted_start(start, started);
    let mut out = Vec::with_capacity(ids.len());
    for p in ids {
        let (low, high) = c
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| explained(&c, e))?;
        let committed = match committed.find_partition(topic, p) {
            Some(e) => committed_offset(e.offset(), e.error())?,
            None => None,
        };
        out.push(PartitionLag {
            topic: topic.into(),
            partition: p,
            low,
            high,
            committed,
            lag: partition_lag(low, high, committed, start),
        });
    }
    out.sort_by_key(|l| l.partition);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lag of a partition without a commit follows where the workers will start it: at
    /// the end only while the group has no commit at all.
    #[test]
    fn latest_counts_an_uncommitted_partition_in_full_once_the_group_has_started() {
        let (low, high) = (100, 1_000);
        let lag = |started| {
            partition_lag(
                low,
                high,
                None,
                uncommitted_start(StartFrom::Latest, started),
            )
        };
        assert_eq!(lag(false), 0);
        assert_eq!(lag(true), 900);
        assert_eq!(
            uncommitted_start(StartFrom::Earliest, false),
            StartFrom::Earliest
        );
    }

    /// N13: a per-partition error of the committed-offsets answer makes the lag unknown
    /// (the controller holds) instead of reading as "no commit".
    #[test]
    fn a_per_partition_error_is_no_lag_reading() {
        assert_eq!(
            committed_offset(Offset::Offset(7), Ok(())).unwrap(),
            Some(7)
        );
        assert_eq!(committed_offset(Offset::Invalid, Ok(())).unwrap(), None);
        let denied = Err(KafkaError::OffsetFetch(
            rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed,
        ));
        assert!(committed_offset(Offset::Invalid, denied).is_err());
    }

    #[test]
    fn lag_table() {
        use StartFrom::{Earliest, Latest};
        let table = [
            // low, high, committed, start, lag
            (0, 100, Some(40), Earliest, 60),
            (0, 100, Some(100), Earliest, 0),
            (0, 100, None, Earliest, 100),
            (50, 100, None, Earliest, 50), // nothing committed: from the log start, not from 0
            (50, 100, Some(10), Earliest, 50), // commit below the log start: retention deleted them
            (0, 0, None, Earliest, 0),
            (10, 10, Some(10), Earliest, 0),
            // a group that starts at the end and never committed has nothing to catch up
            (0, 100, None, Latest, 0),
            (50, 100, None, Latest, 0),
            // once it commits, the commit counts whatever the start
            (0, 100, Some(40), Latest, 60),
        ];
        for (low, high, committed, start, want) in table {
            assert_eq!(
                partition_lag(low, high, committed, start),
                want,
                "{low} {high} {committed:?} {start:?}"
            );
        }
    }
}
