//! The Kafka clients' settings as the worker builds them: the consumer's (prefetch bounded
//! by `memory.fetchBuffer`, commits and offset resets under sluice's control) and the
//! bound of each producer's own queue.

use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::ClientConfig;
use sluice_api::config::WorkerConfig;

use crate::kafka::client::{base_config, ClientError};

/// The bound of each Kafka producer's own copies of what it sends (its queue,
/// `queue.buffering.max.kbytes`): a quarter of `memory.inFlightBytes`, between 1 MiB and
/// 256 MiB. A full queue makes the sink wait, which backs up to the consumer.
pub fn output_copy_kb(config: &WorkerConfig) -> u64 {
    (config.memory.in_flight_bytes.0 / 4).clamp(1 << 20, 256 << 20) / 1024
}

/// How often librdkafka reports statistics (lag; a liveness rule).
pub const STATISTICS_INTERVAL: Duration = Duration::from_secs(5);

/// How many partitions the input topic has (a worker may own all of them), asked with a
/// short-lived client before the consumer is made; `None` when the broker does not say.
pub async fn input_partitions(config: &WorkerConfig) -> Option<usize> {
    let s = &config.source;
    let cfg = base_config(
        &s.bootstrap_servers,
        &s.security,
        &format!("sluice-{}-metadata", config.pipeline),
    )
    .ok()?;
    let topic = s.topic.clone();
    tokio::task::spawn_blocking(move || {
        let c: rdkafka::consumer::BaseConsumer = cfg.create().ok()?;
        for _ in 0..3 {
            if let Ok(md) = c.fetch_metadata(Some(&topic), Duration::from_secs(10)) {
                if let Some(t) = md.topics().first().filter(|t| t.error().is_none()) {
                    if !t.partitions().is_empty() {
                        return Some(t.partitions().len());
                    }
                }
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// Partitions assumed when the broker does not tell how many the input topic has.
pub const ASSUMED_PARTITIONS: usize = 64;

/// librdkafka's prefetch, bounded in total by `memory.fetchBuffer` however many
/// partitions this worker owns: with split partition queues librdkafka applies
/// `queued.max.messages.kbytes` and `queued.min.messages` to *each* partition, so each
/// gets `fetchBuffer / partitions of the topic`; one fetch response is at most
/// `fetchBuffer` too (`fetch.max.bytes`).
pub fn prefetch_limits(fetch_buffer: u64, partitions: usize) -> (u64, u64, u64, u64) {
    let parts = partitions.max(1) as u64;
    let per_partition_kb = (fetch_buffer / 1024 / parts).max(16);
    let min_messages = (100_000 / parts).clamp(100, 10_000);
    let fetch_max = fetch_buffer.clamp(1 << 20, 50 << 20);
    let per_partition_fetch = (per_partition_kb * 1024).clamp(64 << 10, 1 << 20);
    (
        per_partition_kb,
        min_messages,
        fetch_max,
        per_partition_fetch,
    )
}

/// The group consumer's configuration for `config`, its prefetch sized for `partitions`.
pub fn consumer_config(
    config: &WorkerConfig,
    partitions: usize,
) -> Result<ClientConfig, ClientError> {
    let s = &config.source;
    let mut c = base_config(
        &s.bootstrap_servers,
        &s.security,
        &format!("sluice-{}", config.pipeline),
    )?;
    let (fetch_kb, min_messages, fetch_max, partition_fetch) =
        prefetch_limits(config.memory.fetch_buffer.0, partitions);
    c.set("queued.min.messages", min_messages.to_string())
        .set("fetch.max.bytes", fetch_max.to_string())
        .set("max.partition.fetch.bytes", partition_fetch.to_string());
    c.set("group.id", &s.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // Always `earliest`: librdkafka applies it to a group without a commit *and* to a
        // committed offset that is out of range (retention or a deletion passed it while
        // the group was stopped or paused), and in the second case jumping to the end
        // would skip every retained record. `startFrom: latest` is applied per partition
        // at assignment, only where the group has no commit (`start_at_end_if_uncommitted`).
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            s.session_timeout.0.as_millis().to_string(),
        )
        .set("partition.assignment.strategy", "cooperative-sticky")
        // An offset commit cannot be cancelled, and while one is outstanding librdkafka
        // does not rejoin after a lost assignment: bound every request (a commit waiting
        // for an absent coordinator included) by the session timeout, not 60 s.
        .set(
            "socket.timeout.ms",
            s.session_timeout.0.as_millis().max(10_000).to_string(),
        )
        .set(
            "statistics.interval.ms",
            STATISTICS_INTERVAL.as_millis().to_string(),
        )
        .set("queued.max.messages.kbytes", fetch_kb.to_string())
        // With capped queues, librdkafka backs off fetching for a second by default.
        .set("fetch.queue.backoff.ms", "10");
    if let Some(id) = &s.group_instance_id {
        c.set("group.instance.id", id);
    }
    for (k, v) in &s.consumer_properties {
        c.set(k, v);
    }
    Ok(c)
}
