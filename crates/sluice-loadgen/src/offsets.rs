//! Committed offsets of a group and end offsets of a topic, read from Kafka.

use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Per partition: (committed offset or None, high watermark).
pub fn committed_and_end(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> anyhow::Result<Vec<(Option<i64>, i64)>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let parts = crate::partition_count(&c, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition(topic, p);
    }
    let committed = c
        .committed_offsets(tpl, Duration::from_secs(10))
        .context("committed offsets")?;
    let mut out = Vec::new();
    for p in 0..parts {
        let (_, hi) = c.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        let off = committed
            .find_partition(topic, p)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        out.push((off, hi));
    }
    Ok(out)
}
