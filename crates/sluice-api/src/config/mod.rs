//! The worker's runtime configuration: one YAML document plus environment overrides.
//!
//! ```yaml
//! pipeline: iot-enrich
//! source:
//!   bootstrapServers: kafka:9092
//!   topic: iot-events
//!   groupId: iot-enrich
//! processor: {passthrough: {}}
//! sinks:
//!   - kafka: {topic: iot-enriched}
//! workers: {perPartition: 5, queueCapacity: 1024, ordering: key}
//! batching: {maxMessages: 5000, maxBytes: 1MiB, linger: 5ms}
//! ```
//!
//! Every field but `pipeline`, `source` and `sinks` has a default. Secrets never live
//! here: a SASL password is named by the environment variable that holds it.
//!
//! One file per concern, each type next to its own checks: [`source`] and [`security`],
//! [`processor`], [`sink`], [`retry`] (and dead letters), [`limits`] (workers, batching,
//! commits, memory, server), [`delivery`]; [`clients`] lists the
//! librdkafka properties of each Kafka client the worker makes. [`rules`] names every bound once, for both the
//! schema attributes and the checks. [`WorkerConfig::validate`] is the one entry point.

pub mod clients;
mod delivery;
mod error;
mod limits;
mod overrides;
mod processor;
mod properties;
mod retry;
pub mod rules;
pub mod security;
mod sink;
pub(crate) mod source;
#[cfg(test)]
mod tests;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use delivery::{DeliveryConfig, Guarantee};
pub use error::ConfigError;
pub use limits::{
    BatchingConfig, CommitConfig, MemoryConfig, Ordering, ServerConfig, WorkersConfig,
};
pub use overrides::ENV_OVERRIDE_PREFIX;
pub use processor::ProcessorConfig;
pub use properties::{RESERVED_CONSUMER_PROPERTIES, RESERVED_PRODUCER_PROPERTIES};
pub use retry::{DeadLetterConfig, RetryConfig};
pub use security::{OAuthConfig, SaslMechanism, SecurityConfig, SecurityProtocol};
pub use sink::{
    ColumnMapping, HttpBatch, HttpBatchAs, HttpHeader, HttpMethod, HttpSinkConfig, KafkaSinkConfig,
    KeySource, OnConflict, PostgresSinkConfig, SinkConfig, SinkFormat, SinkRegistryConfig,
    SubjectStrategy, WriterSchema,
};
pub use source::{
    subscription, SchemaRegistryConfig, SourceConfig, SourceFormat, StartFrom, Subscription,
    TopicPattern,
};

use overrides::apply_override;
use rules::non_empty;

/// Everything one worker process needs to run a pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerConfig {
    /// The pipeline's name: the `pipeline` label on every metric.
    pub pipeline: String,
    /// Where records come from.
    pub source: SourceConfig,
    /// What happens to each record.
    #[serde(default)]
    pub processor: ProcessorConfig,
    /// Where outputs go. A record is done when every sink acknowledged every output.
    pub sinks: Vec<SinkConfig>,
    /// How sinks retry transient errors before a record is dead-lettered.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Where records that failed for good go. Without it, such a record stops its
    /// partition (nothing past it is committed) until an operator steps in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterConfig>,
    /// Worker pool per partition and its queue.
    #[serde(default)]
    pub workers: WorkersConfig,
    /// When a sink's batch is flushed.
    #[serde(default)]
    pub batching: BatchingConfig,
    /// When offsets are committed and how long a drain may take.
    #[serde(default)]
    pub commit: CommitConfig,
    /// Memory bounds.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// The metrics and health server.
    #[serde(default)]
    pub server: ServerConfig,
    /// The delivery guarantee: at-least-once (default) or exactly-once (Kafka
    /// transactions; see `config/delivery.rs`).
    #[serde(default, skip_serializing_if = "DeliveryConfig::is_default")]
    pub delivery: DeliveryConfig,
}

impl WorkerConfig {
    /// Parse and validate a YAML document, without environment overrides.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let value: serde_json::Value =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
                path: ".".into(),
                message: e.to_string(),
            })?;
        Self::from_value(value)
    }

    /// Parse a YAML document, apply `SLUICE__…` overrides from `env`, then validate.
    pub fn from_yaml_with_env<I>(text: &str, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut value: serde_json::Value =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
                path: ".".into(),
                message: e.to_string(),
            })?;
        let mut overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_OVERRIDE_PREFIX))
            .collect();
        overrides.sort();
        for (var, raw) in overrides {
            apply_override(&mut value, &var, &raw)?;
        }
        Self::from_value(value)
    }

    fn from_value(value: serde_json::Value) -> Result<Self, ConfigError> {
        let config: WorkerConfig =
            serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Parse {
                path: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Render as YAML (what the operator writes into the ConfigMap).
    pub fn to_yaml(&self) -> String {
        // Through JSON values, so enums render as plain maps (`kafka: {topic: out}`) rather
        // than YAML tags, which is what people write and what `from_yaml` reads.
        let value = serde_json::to_value(self).expect("a WorkerConfig always serializes");
        serde_yaml::to_string(&value).expect("a JSON value always renders as YAML")
    }

    /// Every check, section by section, then what spans sections: the one entry point the
    /// worker (on its file) and the controller (on a rendered spec) both call.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let WorkerConfig {
            pipeline,
            source,
            processor,
            sinks,
            retry,
            dead_letter,
            workers,
            batching,
            commit,
            memory,
            server,
            delivery: _,
        } = self;
        non_empty("pipeline", pipeline)?;
        source.check()?;
        if sinks.is_empty() {
            return Err(ConfigError::invalid(
                "sinks",
                "at least one sink is required (kafka, postgres, http, stdout or null)",
            ));
        }
        for (i, sink) in sinks.iter().enumerate() {
            sink.check(&format!("sinks[{i}]"))?;
        }
        processor.check()?;
        if let Some(dl) = dead_letter {
            dl.check()?;
        }
        retry.check()?;
        workers.check()?;
        batching.check()?;
        commit.check(source.session_timeout)?;
        memory.check(batching.max_bytes)?;
        server.check()?;
        self.topics_check()?;
        delivery::check(self)
    }

    /// What spans sections: no output topic written twice, none that is the input or the
    /// dead-letter topic. A Kafka output is a topic on a cluster: the source's unless the
    /// sink names another.
    fn topics_check(&self) -> Result<(), ConfigError> {
        let source = &self.source;
        let cluster = |b: &Option<String>| {
            b.clone()
                .unwrap_or_else(|| source.bootstrap_servers.clone())
        };
        let input = source.subscription()?;
        let is_input = |topic: &str, b: &Option<String>| {
            input.reads(topic) && cluster(b) == source.bootstrap_servers
        };
        let outputs: Vec<(usize, &KafkaSinkConfig)> = self
            .sinks
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                SinkConfig::Kafka(k) => Some((i, k)),
                _ => None,
            })
            .collect();
        for (n, &(i, k)) in outputs.iter().enumerate() {
            let twice = outputs[..n].iter().find(|(_, o)| {
                o.topic == k.topic && cluster(&o.bootstrap_servers) == cluster(&k.bootstrap_servers)
            });
            if let Some((j, _)) = twice {
                return Err(ConfigError::invalid(
                    format!("sinks[{i}].kafka.topic"),
                    format!(
                        "`{}` is already the output of sinks[{j}]: every output would be written twice",
                        k.topic
                    ),
                ));
            }
            if let Some(dl) = &self.dead_letter {
                if dl.topic == k.topic
                    && cluster(&dl.bootstrap_servers) == cluster(&k.bootstrap_servers)
                {
                    return Err(ConfigError::invalid(
                        "deadLetter.topic",
                        format!(
                            "`{}` is also the output topic of sinks[{i}]: failed records would be mixed with good outputs",
                            dl.topic
                        ),
                    ));
                }
            }
            if is_input(&k.topic, &k.bootstrap_servers) {
                return Err(ConfigError::invalid(
                    format!("sinks[{i}].kafka.topic"),
                    "the output topic is an input topic (or matches topicPattern): the pipeline would feed itself",
                ));
            }
        }
        if let Some(dl) = &self.dead_letter {
            if is_input(&dl.topic, &dl.bootstrap_servers) {
                return Err(ConfigError::invalid(
                    "deadLetter.topic",
                    "the dead-letter topic is an input topic (or matches topicPattern): failed records would be read again",
                ));
            }
        }
        Ok(())
    }
}
