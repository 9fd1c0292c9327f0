//! `delivery`: the pipeline's delivery guarantee, and the checks exactly-once needs.
//!
//! ```yaml
//! delivery: {guarantee: exactly-once, transactionWindow: 100ms}
//! ```
//!
//! `at-least-once` (the default) commits offsets after the outputs are acknowledged and
//! redelivers up to one commit interval after a crash. `exactly-once` writes every output
//! (and every dead letter) and the consumed offsets in one Kafka transaction per
//! `transactionWindow`: a reader with `isolation.level=read_committed` sees each record's
//! outputs once. That needs every output and the dead-letter topic on the source cluster,
//! which [`check`] enforces.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ConfigError, SinkConfig, WorkerConfig};
use crate::units::HumanDuration;

/// Which delivery guarantee the pipeline gives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Guarantee {
    /// Outputs are acknowledged before their offsets are committed; a crash redelivers
    /// what was not committed yet (duplicates, never loss).
    #[default]
    AtLeastOnce,
    /// Outputs, dead letters and offsets are committed in one Kafka transaction per
    /// window; `read_committed` readers see every record's outputs exactly once. Only for
    /// pipelines whose sinks are all Kafka topics on the source cluster.
    ExactlyOnce,
}

/// The delivery guarantee and, for exactly-once, the transaction window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeliveryConfig {
    /// `at-least-once` (default) or `exactly-once`.
    #[serde(default)]
    pub guarantee: Guarantee,
    /// exactly-once: how long one transaction takes records before it commits. Each window
    /// ends with a barrier (dispatch stops, everything in flight completes, the outputs are
    /// flushed, the offsets committed with the transaction), so a longer window means more
    /// throughput and more latency: outputs become visible to `read_committed` readers
    /// only when their window commits. Between 10ms and 60s.
    #[serde(default = "default_window")]
    pub transaction_window: HumanDuration,
}

fn default_window() -> HumanDuration {
    HumanDuration::from_millis(100)
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            guarantee: Guarantee::default(),
            transaction_window: default_window(),
        }
    }
}

impl DeliveryConfig {
    /// True for `exactly-once`.
    pub fn exactly_once(&self) -> bool {
        self.guarantee == Guarantee::ExactlyOnce
    }

    /// True when nothing differs from the default (it is then left out when rendered).
    pub fn is_default(&self) -> bool {
        *self == DeliveryConfig::default()
    }

    /// librdkafka's `transaction.timeout.ms` for this window: the broker aborts a
    /// transaction open for longer (a worker that died mid-window holds its partitions'
    /// `read_committed` readers back for at most this long). A transaction lasts its
    /// window plus the barrier's drain (up to `drain`, `commit.drainTimeout`) plus the
    /// commit, so all of that fits, with room: under backpressure a slow drain must not
    /// make the broker abort a transaction the worker is about to commit.
    pub fn transaction_timeout(&self, drain: std::time::Duration) -> std::time::Duration {
        self.transaction_window.0 * 2 + drain + std::time::Duration::from_secs(10)
    }
}

/// The checks `delivery` adds to [`WorkerConfig::validate`].
pub(super) fn check(c: &WorkerConfig) -> Result<(), ConfigError> {
    let d = &c.delivery;
    let w = d.transaction_window.0;
    if w < std::time::Duration::from_millis(10) || w > std::time::Duration::from_secs(60) {
        return Err(ConfigError::invalid(
            "delivery.transactionWindow",
            format!("must be between 10ms and 60s, got {}", d.transaction_window),
        ));
    }
    if !d.exactly_once() {
        return Ok(());
    }
    let source = &c.source.bootstrap_servers;
    for (i, sink) in c.sinks.iter().enumerate() {
        match sink {
            SinkConfig::Kafka(k) => {
                if let Some(b) = k.bootstrap_servers.as_ref().filter(|b| *b != source) {
                    return Err(ConfigError::invalid(
                        format!("sinks[{i}].kafka.bootstrapServers"),
                        format!(
                            "delivery.guarantee exactly-once needs every output on the source cluster ({source}), but this sink writes to {b}: a Kafka transaction cannot span two clusters, so its outputs could not commit atomically with the consumed offsets"
                        ),
                    ));
                }
            }
            other => {
                return Err(ConfigError::invalid(
                    format!("sinks[{i}].{}", other.kind()),
                    format!(
                        "delivery.guarantee exactly-once supports only kafka sinks on the source cluster: a {} sink cannot take part in the Kafka transaction that commits the consumed offsets, so a crash would write its outputs again (use at-least-once, whose redeliveries a postgres sink can absorb with an idempotent table)",
                        other.kind()
                    ),
                ));
            }
        }
    }
    // One transactional producer carries every Kafka sink: their properties must agree.
    let mut seen: std::collections::BTreeMap<&str, (usize, &str)> = Default::default();
    for (i, sink) in c.sinks.iter().enumerate() {
        let SinkConfig::Kafka(k) = sink else { continue };
        for (key, v) in &k.producer_properties {
            match seen.get(key.as_str()) {
                Some(&(j, other)) if other != v => {
                    return Err(ConfigError::invalid(
                        format!("sinks[{i}].kafka.producerProperties.{key}"),
                        format!(
                            "delivery.guarantee exactly-once writes every Kafka sink through one transactional producer, and sinks[{j}] sets {key} to {other:?}, not {v:?}"
                        ),
                    ));
                }
                _ => {
                    seen.insert(key, (i, v));
                }
            }
        }
    }
    match &c.dead_letter {
        None => {
            return Err(ConfigError::invalid(
                "deadLetter",
                "delivery.guarantee exactly-once needs a dead-letter topic: without one a record that fails for good stalls its partition, and a transaction cannot commit around a stalled partition (its later outputs are in the same transaction as everyone's offsets)",
            ));
        }
        Some(dl) => {
            if let Some(b) = dl.bootstrap_servers.as_ref().filter(|b| *b != source) {
                return Err(ConfigError::invalid(
                    "deadLetter.bootstrapServers",
                    format!(
                        "delivery.guarantee exactly-once writes dead letters in the same Kafka transaction as the outputs and offsets, so the dead-letter topic must be on the source cluster ({source}), not {b}"
                    ),
                ));
            }
        }
    }
    if let Some(v) = c.source.consumer_properties.get("isolation.level") {
        if v != "read_committed" {
            return Err(ConfigError::invalid(
                "source.consumerProperties.isolation.level",
                format!(
                    "delivery.guarantee exactly-once reads with read_committed (records of aborted transactions upstream must not be processed), got {v}"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<WorkerConfig, ConfigError> {
        WorkerConfig::from_yaml(&format!(
            "pipeline: p\nsource: {{bootstrapServers: \"k:9092\", topic: in, groupId: g}}\n{extra}"
        ))
    }

    #[test]
    fn at_least_once_is_the_default_and_is_not_rendered() {
        let c = config("sinks: [{kafka: {topic: out}}]").unwrap();
        assert_eq!(c.delivery.guarantee, Guarantee::AtLeastOnce);
        assert!(!c.to_yaml().contains("delivery"));
    }

    #[test]
    fn exactly_once_with_kafka_sinks_on_the_source_cluster_is_accepted() {
        let c = config(
            "sinks: [{kafka: {topic: out}}, {kafka: {topic: out2, bootstrapServers: \"k:9092\"}}]\ndeadLetter: {topic: dlq}\ndelivery: {guarantee: exactly-once, transactionWindow: 250ms}",
        )
        .unwrap();
        assert!(c.delivery.exactly_once());
        assert_eq!(c.delivery.transaction_window.0.as_millis(), 250);
        let again = WorkerConfig::from_yaml(&c.to_yaml()).unwrap();
        assert_eq!(again, c);
    }

    fn refusal(extra: &str) -> (String, String) {
        match config(extra) {
            Err(ConfigError::Invalid { field, message }) => (field, message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn exactly_once_refuses_a_postgres_sink_with_the_reason() {
        let (field, message) = refusal(
            "sinks: [{kafka: {topic: out}}, {postgres: {table: t}}]\ndeadLetter: {topic: dlq}\ndelivery: {guarantee: exactly-once}",
        );
        assert_eq!(field, "sinks[1].postgres");
        assert!(
            message.contains("cannot take part in the Kafka transaction"),
            "{message}"
        );
    }

    #[test]
    fn exactly_once_refuses_a_sink_on_another_cluster_with_the_reason() {
        let (field, message) = refusal(
            "sinks: [{kafka: {topic: out, bootstrapServers: \"other:9092\"}}]\ndeadLetter: {topic: dlq}\ndelivery: {guarantee: exactly-once}",
        );
        assert_eq!(field, "sinks[0].kafka.bootstrapServers");
        assert!(message.contains("cannot span two clusters"), "{message}");
    }

    #[test]
    fn exactly_once_refuses_a_dead_letter_topic_elsewhere_or_none() {
        let (field, _) = refusal(
            "sinks: [{kafka: {topic: out}}]\ndeadLetter: {topic: dlq, bootstrapServers: \"other:9092\"}\ndelivery: {guarantee: exactly-once}",
        );
        assert_eq!(field, "deadLetter.bootstrapServers");
        let (field, message) =
            refusal("sinks: [{kafka: {topic: out}}]\ndelivery: {guarantee: exactly-once}");
        assert_eq!(field, "deadLetter");
        assert!(message.contains("stalled partition"), "{message}");
    }

    #[test]
    fn exactly_once_refuses_stdout_and_read_uncommitted() {
        let (field, _) = refusal(
            "sinks: [{stdout: {}}]\ndeadLetter: {topic: dlq}\ndelivery: {guarantee: exactly-once}",
        );
        assert_eq!(field, "sinks[0].stdout");
        let yaml = "pipeline: p\nsource: {bootstrapServers: \"k:9092\", topic: in, groupId: g, consumerProperties: {isolation.level: read_uncommitted}}\nsinks: [{kafka: {topic: out}}]\ndeadLetter: {topic: dlq}\ndelivery: {guarantee: exactly-once}";
        match WorkerConfig::from_yaml(yaml) {
            Err(ConfigError::Invalid { field, .. }) => {
                assert_eq!(field, "source.consumerProperties.isolation.level")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn exactly_once_refuses_sinks_that_disagree_on_a_producer_property() {
        let (field, message) = refusal(
            "sinks: [{kafka: {topic: a, producerProperties: {compression.type: lz4}}}, {kafka: {topic: b, producerProperties: {compression.type: zstd}}}]\ndeadLetter: {topic: dlq}\ndelivery: {guarantee: exactly-once}",
        );
        assert_eq!(field, "sinks[1].kafka.producerProperties.compression.type");
        assert!(message.contains("one transactional producer"), "{message}");
    }

    #[test]
    fn the_transaction_window_is_bounded() {
        let (field, _) = refusal(
            "sinks: [{kafka: {topic: out}}]\ndeadLetter: {topic: dlq}\ndelivery: {guarantee: exactly-once, transactionWindow: 5ms}",
        );
        assert_eq!(field, "delivery.transactionWindow");
    }
}
