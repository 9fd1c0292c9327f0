//! The librdkafka properties of the worker's Kafka clients, as the worker sets them besides
//! the bootstrap servers and the security settings: the group consumer, each at-least-once
//! Kafka sink's producer, the dead-letter producer and the exactly-once transactional
//! producer, the pipeline's own properties applied last.
//!
//! The worker builds its clients from these lists, and the controller builds the same
//! configurations while validating and creates the clients: librdkafka checks combinations
//! (`message.timeout.ms` against `transaction.timeout.ms`, `max.poll.interval.ms` against
//! `session.timeout.ms`, ...) only when a client is created, so a pipeline whose workers
//! would fail at start-up is refused before any pod starts.

use super::{KafkaSinkConfig, SinkConfig, WorkerConfig};

/// One property.
pub type Property = (String, String);

/// How often the consumer reports statistics (lag; a liveness rule expects one at least
/// every three of these).
pub const STATISTICS_INTERVAL_MS: u64 = 5_000;

fn p(k: &str, v: impl ToString) -> Property {
    (k.to_string(), v.to_string())
}

/// librdkafka's prefetch, bounded in total by `memory.fetchBuffer` however many partitions
/// a worker owns: with split partition queues librdkafka applies
/// `queued.max.messages.kbytes` and `queued.min.messages` to *each* partition, so each gets
/// `fetchBuffer / partitions of the topic`; one fetch response is at most `fetchBuffer`
/// too (`fetch.max.bytes`). Returns (`queued.max.messages.kbytes`, `queued.min.messages`,
/// `fetch.max.bytes`, `max.partition.fetch.bytes`).
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

/// The bound of each Kafka producer's own copies of what it sends (its queue,
/// `queue.buffering.max.kbytes`): a quarter of `memory.inFlightBytes`, between 1 MiB and
/// 256 MiB. A full queue makes the sink wait, which backs up to the consumer.
pub fn output_copy_kb(c: &WorkerConfig) -> u64 {
    (c.memory.in_flight_bytes.0 / 4).clamp(1 << 20, 256 << 20) / 1024
}

/// The group consumer's properties, its prefetch sized for a topic of `partitions`.
pub fn consumer(c: &WorkerConfig, partitions: usize) -> Vec<Property> {
    let s = &c.source;
    let (fetch_kb, min_messages, fetch_max, partition_fetch) =
        prefetch_limits(c.memory.fetch_buffer.0, partitions);
    let session_ms = s.session_timeout.0.as_millis();
    let mut out = vec![
        p("queued.min.messages", min_messages),
        p("fetch.max.bytes", fetch_max),
        p("max.partition.fetch.bytes", partition_fetch),
        p("group.id", &s.group_id),
        p("enable.auto.commit", "false"),
        p("enable.auto.offset.store", "false"),
        p("enable.partition.eof", "false"),
        // Always `earliest`: librdkafka applies it to a partition without a commit *and*
        // to a committed offset that is out of range (retention or a deletion passed it
        // while the group was stopped or paused), and in the second case jumping to the
        // end would skip every retained record. `startFrom: latest` is applied when the
        // group first starts (the worker's `kafka/start_from.rs`).
        p("auto.offset.reset", "earliest"),
        p("session.timeout.ms", session_ms),
        p("partition.assignment.strategy", "cooperative-sticky"),
        // An offset commit cannot be cancelled, and while one is outstanding librdkafka
        // does not rejoin after a lost assignment: bound every request (a commit waiting
        // for an absent coordinator included) by the session timeout, not 60 s.
        p("socket.timeout.ms", session_ms.max(10_000)),
        p("statistics.interval.ms", STATISTICS_INTERVAL_MS),
        p("queued.max.messages.kbytes", fetch_kb),
        // With capped queues, librdkafka backs off fetching for a second by default.
        p("fetch.queue.backoff.ms", 10),
        // Partitions added to the topic are assigned at the next metadata refresh:
        // within 30 s rather than librdkafka's 5 minutes.
        p("topic.metadata.refresh.interval.ms", 30_000),
    ];
    if let Some(id) = &s.group_instance_id {
        out.push(p("group.instance.id", id));
    }
    out.extend(s.consumer_properties.iter().map(|(k, v)| p(k, v)));
    if c.delivery.exactly_once() {
        // Records of aborted upstream transactions are never processed.
        out.push(p("isolation.level", "read_committed"));
    }
    out
}

/// The producer of the at-least-once Kafka sink `sink`.
pub fn sink_producer(c: &WorkerConfig, sink: &KafkaSinkConfig) -> Vec<Property> {
    let mut out = vec![
        p("queue.buffering.max.kbytes", output_copy_kb(c)),
        p("enable.idempotence", "true"),
        p("acks", "all"),
        p("linger.ms", 2),
        p("batch.num.messages", 10_000),
        p("batch.size", 1_048_576),
        p("queue.buffering.max.messages", 500_000),
        // librdkafka's idempotent retries for as long as the retry policy allows; a report
        // that fails after that is final (no application re-send).
        p(
            "message.timeout.ms",
            c.retry
                .max_elapsed
                .0
                .as_millis()
                .clamp(1000, i32::MAX as u128),
        ),
    ];
    out.extend(sink.producer_properties.iter().map(|(k, v)| p(k, v)));
    out
}

/// The at-least-once dead-letter producer.
pub fn dead_letter_producer(c: &WorkerConfig) -> Vec<Property> {
    vec![
        p("queue.buffering.max.kbytes", output_copy_kb(c)),
        p("enable.idempotence", "true"),
        p("acks", "all"),
        p("linger.ms", 5),
        // A letter carries a record plus its story: allow up to the broker's default
        // limit; what is larger is written without its payload.
        p("message.max.bytes", 1_048_000),
        p("message.timeout.ms", 300_000),
    ]
}

/// The exactly-once transactional producer with `transactional.id` `id`: it carries every
/// Kafka sink's outputs and every dead letter; the sinks' `producerProperties` are applied
/// last, in sink order (validation refuses two sinks that set one property differently).
pub fn transactional_producer(c: &WorkerConfig, id: &str) -> Vec<Property> {
    let timeout = c
        .delivery
        .transaction_timeout(c.commit.drain_timeout.0)
        .as_millis();
    let mut out = vec![
        p("transactional.id", id),
        p("enable.idempotence", "true"),
        p("acks", "all"),
        p("transaction.timeout.ms", timeout),
        // A delivery still failing when the transaction would time out fails the window.
        p("message.timeout.ms", timeout),
        p("linger.ms", 2),
        p("batch.num.messages", 10_000),
        p("batch.size", 1_048_576),
        p("queue.buffering.max.messages", 500_000),
        p("queue.buffering.max.kbytes", output_copy_kb(c)),
        // Letters carry a record plus its story (as the at-least-once dead-letter path).
        p("message.max.bytes", 1_048_000),
    ];
    for sink in &c.sinks {
        if let SinkConfig::Kafka(k) = sink {
            out.extend(k.producer_properties.iter().map(|(k, v)| p(k, v)));
        }
    }
    out
}

/// Every client the worker makes for `c`, by the field whose properties it carries last:
/// (that field, the client's kind, its properties). `partitions`: the input topic's.
pub fn all(c: &WorkerConfig, partitions: usize) -> Vec<(String, Kind, Vec<Property>)> {
    let mut out = vec![(
        "source.consumerProperties".to_string(),
        Kind::Consumer,
        consumer(c, partitions),
    )];
    if c.delivery.exactly_once() {
        out.push((
            "delivery".to_string(),
            Kind::Producer,
            transactional_producer(c, "sluice-validation"),
        ));
        return out;
    }
    for (i, sink) in c.sinks.iter().enumerate() {
        if let SinkConfig::Kafka(k) = sink {
            out.push((
                format!("sinks[{i}].kafka.producerProperties"),
                Kind::Producer,
                sink_producer(c, k),
            ));
        }
    }
    if c.dead_letter.is_some() {
        out.push((
            "deadLetter".to_string(),
            Kind::Producer,
            dead_letter_producer(c),
        ));
    }
    out
}

/// A consumer or a producer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The group consumer.
    Consumer,
    /// A producer.
    Producer,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_is_split_over_the_partitions() {
        let (kb, min, fetch_max, part) = prefetch_limits(8 << 20, 64);
        assert_eq!(kb, 128);
        assert_eq!(min, 1562);
        assert_eq!(fetch_max, 8 << 20);
        assert_eq!(part, 128 << 10);
        let (kb, _, _, part) = prefetch_limits(8 << 20, 10_000);
        assert_eq!((kb, part), (16, 64 << 10), "floors");
    }

    #[test]
    fn the_pipeline_s_own_properties_come_last() {
        let mut c = WorkerConfig::from_yaml(
            "pipeline: p\nsource: {bootstrapServers: b, topic: t, groupId: g, consumerProperties: {fetch.wait.max.ms: \"50\"}}\nsinks: [{kafka: {topic: o, producerProperties: {linger.ms: \"20\"}}}]\n",
        )
        .unwrap();
        let consumer = consumer(&c, 4);
        assert_eq!(consumer.last(), Some(&p("fetch.wait.max.ms", "50")));
        let SinkConfig::Kafka(k) = &c.sinks[0] else {
            unreachable!()
        };
        assert_eq!(sink_producer(&c, k).last(), Some(&p("linger.ms", "20")));
        c.delivery.guarantee = super::super::Guarantee::ExactlyOnce;
        let t = transactional_producer(&c, "id");
        assert_eq!(t.last(), Some(&p("linger.ms", "20")));
        assert_eq!(
            consumer_isolation(&c),
            Some("read_committed".to_string()),
            "exactly-once reads committed records only"
        );
    }

    fn consumer_isolation(c: &WorkerConfig) -> Option<String> {
        consumer(c, 1)
            .into_iter()
            .rev()
            .find(|(k, _)| k == "isolation.level")
            .map(|(_, v)| v)
    }
}
