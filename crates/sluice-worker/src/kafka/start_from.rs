//! `startFrom: latest`: where a partition without a committed offset starts.

use std::time::Duration;

use rdkafka::consumer::Consumer;

use crate::engine::partition::TopicPartition;
use crate::kafka::consumer::SluiceConsumer;

/// `startFrom: latest` for one partition: when the group has no committed offset for it,
/// move its position to the end of the log before anything is read. (A committed offset,
/// even one out of range, is resumed from; see `auto.offset.reset` above.) If the
/// committed offset cannot be read, the partition starts at the earliest record, so
/// nothing is skipped.
pub async fn start_at_end_if_uncommitted(
    consumer: std::sync::Weak<SluiceConsumer>,
    tp: TopicPartition,
) {
    use rdkafka::{Offset, TopicPartitionList};
    let (topic, partition) = (tp.topic.clone(), tp.partition);
    let t = topic.clone();
    let res = tokio::task::spawn_blocking(move || -> Result<bool, String> {
        let mut last = String::new();
        for attempt in 0..10 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            let Some(c) = consumer.upgrade() else {
                return Ok(false);
            };
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&t, partition);
            let committed = match c.committed_offsets(tpl, Duration::from_secs(10)) {
                Ok(c) => c,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let has_commit = committed
                .elements()
                .first()
                .is_some_and(|e| matches!(e.offset(), Offset::Offset(o) if o >= 0));
            if has_commit {
                return Ok(false);
            }
            match c.seek(&t, partition, Offset::End, Duration::from_secs(10)) {
                Ok(()) => return Ok(true),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match res {
        Ok(true) => {
            tracing::info!(%topic, partition, "startFrom: latest: the group has no commit for this partition; starting at the end of the log")
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(%topic, partition, error = %e, "startFrom: latest: could not read the committed offset or seek to the end; starting at the earliest record instead (nothing is skipped)")
        }
    }
}
