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

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, HumanDuration};

pub mod clients;
mod delivery;
mod properties;
pub use delivery::{DeliveryConfig, Guarantee};
pub use properties::{RESERVED_CONSUMER_PROPERTIES, RESERVED_PRODUCER_PROPERTIES};

/// Environment variables with this prefix override fields of the file:
/// `SLUICE__SOURCE__BOOTSTRAP_SERVERS=host:9092` sets `source.bootstrapServers`,
/// `SLUICE__SINKS__0__KAFKA__TOPIC=out` sets `sinks[0].kafka.topic`.
pub const ENV_OVERRIDE_PREFIX: &str = "SLUICE__";

/// Why a configuration was refused. The message names the field and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The YAML could not be read or does not match the schema.
    #[error("invalid configuration at `{path}`: {message}")]
    Parse {
        /// Dotted path of the offending field (`.` for the document itself).
        path: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// The document parsed, but a value is out of range or inconsistent.
    #[error("invalid configuration at `{field}`: {message}")]
    Invalid {
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// An environment override could not be applied.
    #[error("invalid environment override `{var}`: {message}")]
    Override {
        /// The environment variable.
        var: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

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

/// The Kafka topic read by the pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// The input topic.
    pub topic: String,
    /// Consumer group id; one group per pipeline.
    pub group_id: String,
    /// Where to start when the group has no committed offset.
    #[serde(default)]
    pub start_from: StartFrom,
    /// Group session timeout. The revoke drain deadline must be shorter.
    #[serde(default = "defaults::session_timeout")]
    pub session_timeout: HumanDuration,
    /// Static membership id (e.g. the pod name), so a restart does not rebalance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_instance_id: Option<String>,
    /// TLS and SASL.
    #[serde(default)]
    pub security: SecurityConfig,
    /// Extra librdkafka consumer properties, applied last.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consumer_properties: BTreeMap<String, String>,
}

/// Where a group without a committed offset starts reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StartFrom {
    /// The log start offset: nothing that is still retained is skipped.
    #[default]
    Earliest,
    /// The end of the log: only records produced after the first join.
    Latest,
}

/// Connection security for Kafka. Passwords come from the environment, never from here.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityConfig {
    /// Transport protocol.
    #[serde(default)]
    pub protocol: SecurityProtocol,
    /// SASL mechanism, required for the sasl protocols.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Name of the environment variable that holds the SASL password.
    #[serde(default = "defaults::password_env")]
    pub password_env: String,
    /// PEM file with the CA certificates to trust (TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// Kafka `security.protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SecurityProtocol {
    /// No TLS, no SASL.
    #[default]
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// The librdkafka spelling.
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
    fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// Kafka `sasl.mechanism`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SaslMechanism {
    /// PLAIN.
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM-SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM-SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The librdkafka spelling.
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// The processor run on every record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[serde(rename_all_fields = "camelCase")]
pub enum ProcessorConfig {
    /// Emit every record unchanged (key, value and headers).
    Passthrough {},
    /// Passthrough that first spends `perRecord` (a sleep) on each record: a load-testing
    /// aid that simulates expensive processing. It blocks its worker thread.
    Delay {
        /// Time spent per record.
        per_record: HumanDuration,
    },
    /// A jq program (run by jaq, a Rust implementation of jq). The record value is parsed
    /// as JSON and is the program's input; every value the program emits is one output.
    /// Variables: `$key` (string or null), `$topic`, `$partition`, `$offset`,
    /// `$timestamp` (ms or null) and `$headers` (an object of strings). A value that is not
    /// JSON, or a program error, sends the record to the dead-letter path.
    Jq {
        /// The jq program, e.g. `select(.temp > 30) | {device, celsius: .temp}`.
        program: String,
        /// `false` (default): each output is the new value; key and headers stay the
        /// input's. `true`: each output must be an object `{"value": ..., "key": "...",
        /// "headers": {"name": "value"}}` (key and headers optional, the key then stays
        /// the input's), so the program chooses the output key and headers.
        #[serde(default)]
        envelope: bool,
    },
    /// A processor compiled into a custom worker binary, looked up by name.
    Custom {
        /// Name the custom binary registered its processor under.
        name: String,
    },
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig::Passthrough {}
    }
}

/// One destination of the pipeline's outputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum SinkConfig {
    /// A Kafka topic, written through an idempotent producer with acks=all.
    Kafka(KafkaSinkConfig),
    /// A PostgreSQL table, written in batches (one multi-row `INSERT ... SELECT FROM
    /// UNNEST` per batch). Each output value must be a JSON object.
    Postgres(PostgresSinkConfig),
    /// Print each output on standard output (debugging).
    Stdout {},
    /// Acknowledge and discard (benchmarks).
    Null {},
}

impl SinkConfig {
    /// A short, bounded name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Kafka(_) => "kafka",
            SinkConfig::Postgres(_) => "postgres",
            SinkConfig::Stdout {} => "stdout",
            SinkConfig::Null {} => "null",
        }
    }
}

/// A Kafka output topic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// The output topic.
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub topic: String,
    /// Defaults to the source's bootstrap servers and security settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_servers: Option<String>,
    /// The output key: the processor's (`output`, default) or the input record's
    /// (`input`).
    #[serde(default)]
    pub key: KeySource,
    /// When set, every output carries a header of this name whose value is the source
    /// record's `topic/partition/offset`, so it can be traced back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_header: Option<String>,
    /// Extra librdkafka producer properties, applied last.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub producer_properties: BTreeMap<String, String>,
}

/// Which key a Kafka sink writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum KeySource {
    /// The key the processor emitted (passthrough and jq keep the input key unless told).
    #[default]
    Output,
    /// The source record's key, whatever the processor emitted.
    Input,
}

/// A PostgreSQL table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresSinkConfig {
    /// The table, optionally schema-qualified (`public.readings`).
    #[schemars(
        length(min = 1, max = 127),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
    )]
    pub table: String,
    /// Name of the environment variable holding the connection string
    /// (`postgres://user:password@host:5432/db` or `host=... user=...`). The string itself
    /// never appears in the configuration.
    #[serde(default = "defaults::postgres_env")]
    pub connection_env: String,
    /// PEM file of the CA that signed the server's certificate, for connection strings
    /// with `sslmode=require` (TLS, the certificate verified against this CA and the
    /// host name). Without it the system's roots are trusted. Other `sslmode`s connect
    /// without TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Columns to write and the JSON field each comes from. Empty (default): every column
    /// of the table, each from the top-level field of the same name; a missing field
    /// writes NULL (or the column default, with `onConflict`'s update semantics aside).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<ColumnMapping>,
    /// What a row whose key already exists does: `ignore` (default: the row is kept as
    /// it is, so a redelivered record does not duplicate) or `update` (the new values win;
    /// needs `conflictKey`).
    #[serde(default)]
    pub on_conflict: OnConflict,
    /// The unique key `onConflict` refers to (column names). Required for `update`;
    /// optional for `ignore` (then any unique constraint counts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflict_key: Vec<String>,
    /// Connections in the pool (each batch takes one).
    #[serde(default = "defaults::pool_size")]
    #[schemars(range(min = 1, max = 64))]
    pub pool_size: u32,
}

/// One table column and where its value comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ColumnMapping {
    /// Column name.
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub name: String,
    /// Top-level JSON field of the output value; defaults to the column name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// SQL type the value is cast to (`bigint`, `timestamptz`, `jsonb`, ...); defaults to
    /// the column's type in the database.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    pub sql_type: Option<String>,
}

/// Conflict handling of the PostgreSQL sink.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnConflict {
    /// `ON CONFLICT DO NOTHING`: the stored row wins.
    #[default]
    Ignore,
    /// `ON CONFLICT (key) DO UPDATE`: the new row wins.
    Update,
}

/// Retries of transient sink errors: exponential backoff with full jitter, until either
/// limit is reached. Then the record is dead-lettered (or its partition stalls).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConfig {
    /// The first backoff.
    #[serde(default = "defaults::initial_backoff")]
    pub initial_backoff: HumanDuration,
    /// The longest backoff.
    #[serde(default = "defaults::max_backoff")]
    pub max_backoff: HumanDuration,
    /// Give up after this long since the first failure.
    #[serde(default = "defaults::max_elapsed")]
    pub max_elapsed: HumanDuration,
    /// Give up after this many attempts (0: no limit but `maxElapsed`).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff: defaults::initial_backoff(),
            max_backoff: defaults::max_backoff(),
            max_elapsed: defaults::max_elapsed(),
            max_attempts: 0,
        }
    }
}

/// The dead-letter topic: records that failed for good, with why, where and how often.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// The topic.
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub topic: String,
    /// Defaults to the source's bootstrap servers and security settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_servers: Option<String>,
}

/// How records of one partition are spread over its workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Ordering {
    /// One lane per partition: strict offset order (only one worker runs).
    Partition,
    /// `hash(key) % perPartition`: order is kept per key.
    #[default]
    Key,
    /// Any free worker; no order is promised.
    Unordered,
}

/// The fixed worker pool of each partition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkersConfig {
    /// Workers per assigned partition (1..=256).
    #[serde(default = "defaults::per_partition")]
    #[schemars(range(min = 1, max = 256))]
    pub per_partition: u32,
    /// Records a partition may hold in its channel before it is paused in the consumer.
    /// It resumes when the channel is down to half of this.
    #[serde(default = "defaults::queue_capacity")]
    #[schemars(range(min = 2, max = 1_000_000))]
    pub queue_capacity: u32,
    /// How records are spread over the workers.
    #[serde(default)]
    pub ordering: Ordering,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig {
            per_partition: defaults::per_partition(),
            queue_capacity: defaults::queue_capacity(),
            ordering: Ordering::default(),
        }
    }
}

/// When a sink's batch is flushed: whichever limit is reached first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchingConfig {
    /// Outputs per batch.
    #[serde(default = "defaults::max_messages")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_messages: u32,
    /// Payload bytes per batch.
    #[serde(default = "defaults::max_bytes")]
    pub max_bytes: ByteSize,
    /// How long the first output of a batch may wait for company.
    #[serde(default = "defaults::linger")]
    pub linger: HumanDuration,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_messages: defaults::max_messages(),
            max_bytes: defaults::max_bytes(),
            linger: defaults::linger(),
        }
    }
}

/// Offset commits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CommitConfig {
    /// How often the contiguous watermarks are committed.
    #[serde(default = "defaults::commit_interval")]
    pub interval: HumanDuration,
    /// How long a revoke or a shutdown waits for in-flight work before committing.
    /// Must be shorter than `source.sessionTimeout`.
    #[serde(default = "defaults::drain_timeout")]
    pub drain_timeout: HumanDuration,
}

impl Default for CommitConfig {
    fn default() -> Self {
        CommitConfig {
            interval: defaults::commit_interval(),
            drain_timeout: defaults::drain_timeout(),
        }
    }
}

/// Memory bounds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemoryConfig {
    /// Payload bytes that may be in flight (dispatched, not yet acknowledged) across all
    /// partitions. When it is spent, dispatch waits and partitions pause.
    #[serde(default = "defaults::in_flight_bytes")]
    pub in_flight_bytes: ByteSize,
    /// librdkafka's prefetch buffer, in total: split over the input topic's partitions
    /// (`queued.max.messages.kbytes` per partition); also the largest fetch response.
    #[serde(default = "defaults::fetch_buffer")]
    pub fetch_buffer: ByteSize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            in_flight_bytes: defaults::in_flight_bytes(),
            fetch_buffer: defaults::fetch_buffer(),
        }
    }
}

/// The HTTP server for /metrics, /healthz and /readyz.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address.
    #[serde(default = "defaults::listen")]
    pub listen: String,
    /// `/healthz` fails when an owned partition that has records to fetch and is not held
    /// on purpose (backpressure, a stall, a drain, a commit-failure hold) has received
    /// nothing for this long.
    #[serde(default = "defaults::fetch_stall_timeout")]
    pub fetch_stall_timeout: HumanDuration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: defaults::listen(),
            fetch_stall_timeout: defaults::fetch_stall_timeout(),
        }
    }
}

mod defaults {
    use crate::units::{ByteSize, HumanDuration};

    pub fn session_timeout() -> HumanDuration {
        HumanDuration::from_millis(30_000)
    }
    pub fn fetch_stall_timeout() -> HumanDuration {
        HumanDuration::from_millis(180_000)
    }
    pub fn password_env() -> String {
        "SLUICE_SASL_PASSWORD".into()
    }
    pub fn per_partition() -> u32 {
        5
    }
    pub fn queue_capacity() -> u32 {
        4096
    }
    pub fn max_messages() -> u32 {
        5000
    }
    pub fn max_bytes() -> ByteSize {
        ByteSize(1 << 20)
    }
    pub fn linger() -> HumanDuration {
        HumanDuration::from_millis(5)
    }
    pub fn commit_interval() -> HumanDuration {
        HumanDuration::from_millis(1000)
    }
    pub fn drain_timeout() -> HumanDuration {
        HumanDuration::from_millis(10_000)
    }
    pub fn in_flight_bytes() -> ByteSize {
        ByteSize(256 << 20)
    }
    pub fn fetch_buffer() -> ByteSize {
        ByteSize(8 << 20)
    }
    pub fn postgres_env() -> String {
        "SLUICE_POSTGRES_URL".into()
    }
    pub fn pool_size() -> u32 {
        4
    }
    pub fn initial_backoff() -> HumanDuration {
        HumanDuration::from_millis(100)
    }
    pub fn max_backoff() -> HumanDuration {
        HumanDuration::from_millis(10_000)
    }
    pub fn max_elapsed() -> HumanDuration {
        HumanDuration::from_millis(300_000)
    }
    pub fn listen() -> String {
        "0.0.0.0:9095".into()
    }
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

    /// Semantic checks the schema cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_fields()?;
        delivery::check(self)
    }

    fn validate_fields(&self) -> Result<(), ConfigError> {
        non_empty("pipeline", &self.pipeline)?;
        non_empty("source.bootstrapServers", &self.source.bootstrap_servers)?;
        topic_name("source.topic", &self.source.topic)?;
        non_empty("source.groupId", &self.source.group_id)?;
        if self.sinks.is_empty() {
            return Err(ConfigError::invalid(
                "sinks",
                "at least one sink is required (kafka, postgres, stdout or null)",
            ));
        }
        properties::check(
            "source.consumerProperties",
            &self.source.consumer_properties,
            RESERVED_CONSUMER_PROPERTIES,
        )?;
        // A Kafka output is a topic on a cluster (the source's unless the sink names one).
        let cluster = |b: &Option<String>| {
            b.clone()
                .unwrap_or_else(|| self.source.bootstrap_servers.clone())
        };
        for (i, sink) in self.sinks.iter().enumerate() {
            if let SinkConfig::Postgres(pg) = sink {
                validate_postgres(&format!("sinks[{i}].postgres"), pg)?;
            }
            if let SinkConfig::Kafka(k) = sink {
                properties::check(
                    &format!("sinks[{i}].kafka.producerProperties"),
                    &k.producer_properties,
                    RESERVED_PRODUCER_PROPERTIES,
                )?;
                let twice = self.sinks[..i].iter().position(|o| {
                    matches!(o, SinkConfig::Kafka(o) if o.topic == k.topic && cluster(&o.bootstrap_servers) == cluster(&k.bootstrap_servers))
                });
                if let Some(j) = twice {
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
                if k.trace_header
                    .as_deref()
                    .is_some_and(|h| h.trim().is_empty())
                {
                    return Err(ConfigError::invalid(
                        format!("sinks[{i}].kafka.traceHeader"),
                        "must not be empty when set",
                    ));
                }
                topic_name(&format!("sinks[{i}].kafka.topic"), &k.topic)?;
                if k.topic == self.source.topic
                    && k.bootstrap_servers
                        .as_ref()
                        .is_none_or(|b| b == &self.source.bootstrap_servers)
                {
                    return Err(ConfigError::invalid(
                        format!("sinks[{i}].kafka.topic"),
                        "the output topic is the input topic: the pipeline would feed itself",
                    ));
                }
            }
        }
        if let ProcessorConfig::Jq { program, .. } = &self.processor {
            non_empty("processor.jq.program", program)?;
            if let Err(e) = crate::jq::compile(program) {
                return Err(ConfigError::invalid("processor.jq.program", e.to_string()));
            }
        }
        if let Some(dl) = &self.dead_letter {
            topic_name("deadLetter.topic", &dl.topic)?;
            if dl.topic == self.source.topic
                && dl
                    .bootstrap_servers
                    .as_ref()
                    .is_none_or(|b| b == &self.source.bootstrap_servers)
            {
                return Err(ConfigError::invalid(
                    "deadLetter.topic",
                    "the dead-letter topic is the input topic: failed records would be read again",
                ));
            }
        }
        let r = &self.retry;
        if r.initial_backoff.0.as_millis() < 1 {
            return Err(ConfigError::invalid(
                "retry.initialBackoff",
                format!("must be at least 1ms, got {}", r.initial_backoff),
            ));
        }
        if r.max_backoff.0 < r.initial_backoff.0 {
            return Err(ConfigError::invalid(
                "retry.maxBackoff",
                format!(
                    "must be at least retry.initialBackoff ({}), got {}",
                    r.initial_backoff, r.max_backoff
                ),
            ));
        }
        if r.max_elapsed.0 < r.initial_backoff.0 {
            return Err(ConfigError::invalid(
                "retry.maxElapsed",
                format!(
                    "must be at least retry.initialBackoff ({}), got {}",
                    r.initial_backoff, r.max_elapsed
                ),
            ));
        }
        let w = &self.workers;
        if !(1..=256).contains(&w.per_partition) {
            return Err(ConfigError::invalid(
                "workers.perPartition",
                format!("must be between 1 and 256, got {}", w.per_partition),
            ));
        }
        if !(2..=1_000_000).contains(&w.queue_capacity) {
            return Err(ConfigError::invalid(
                "workers.queueCapacity",
                format!(
                    "must be between 2 and 1000000 records, got {}",
                    w.queue_capacity
                ),
            ));
        }
        let b = &self.batching;
        if !(1..=1_000_000).contains(&b.max_messages) {
            return Err(ConfigError::invalid(
                "batching.maxMessages",
                format!("must be between 1 and 1000000, got {}", b.max_messages),
            ));
        }
        if b.max_bytes.0 < 1024 {
            return Err(ConfigError::invalid(
                "batching.maxBytes",
                format!("must be at least 1KiB, got {}", b.max_bytes),
            ));
        }
        if b.linger.0.as_secs() > 60 {
            return Err(ConfigError::invalid(
                "batching.linger",
                format!("must be at most 60s, got {}", b.linger),
            ));
        }
        let session = self.source.session_timeout.0;
        if session.as_millis() < 6_000 || session.as_millis() > 300_000 {
            return Err(ConfigError::invalid(
                "source.sessionTimeout",
                format!(
                    "must be between 6s and 5m, got {}",
                    self.source.session_timeout
                ),
            ));
        }
        if self.commit.interval.0.as_millis() < 10 {
            return Err(ConfigError::invalid(
                "commit.interval",
                format!("must be at least 10ms, got {}", self.commit.interval),
            ));
        }
        if self.commit.drain_timeout.0 >= session {
            return Err(ConfigError::invalid(
                "commit.drainTimeout",
                format!(
                    "must be shorter than source.sessionTimeout ({}), got {}: a drain that outlives the session gets the member fenced",
                    self.source.session_timeout, self.commit.drain_timeout
                ),
            ));
        }
        if self.server.fetch_stall_timeout.0.as_secs() < 10 {
            return Err(ConfigError::invalid(
                "server.fetchStallTimeout",
                format!(
                    "must be at least 10s, got {}",
                    self.server.fetch_stall_timeout
                ),
            ));
        }
        if self.memory.in_flight_bytes.0 < (1 << 20) {
            return Err(ConfigError::invalid(
                "memory.inFlightBytes",
                format!("must be at least 1MiB, got {}", self.memory.in_flight_bytes),
            ));
        }
        if self.memory.in_flight_bytes.0 < b.max_bytes.0 {
            return Err(ConfigError::invalid(
                "memory.inFlightBytes",
                format!(
                    "must be at least batching.maxBytes ({}), got {}",
                    b.max_bytes, self.memory.in_flight_bytes
                ),
            ));
        }
        let sec = &self.source.security;
        if sec.protocol.uses_sasl() {
            if sec.sasl_mechanism.is_none() {
                return Err(ConfigError::invalid(
                    "source.security.saslMechanism",
                    "required with a SASL protocol: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
                ));
            }
            if sec.username.as_deref().is_none_or(str::is_empty) {
                return Err(ConfigError::invalid(
                    "source.security.username",
                    "required with a SASL protocol",
                ));
            }
        } else if sec.sasl_mechanism.is_some() {
            return Err(ConfigError::invalid(
                "source.security.saslMechanism",
                "set only with protocol SASL_PLAINTEXT or SASL_SSL",
            ));
        }
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "server.listen",
                format!("`{}` is not an ip:port address", self.server.listen),
            ));
        }
        Ok(())
    }
}

/// A plain SQL identifier: what the sink quotes and writes into its statements.
fn identifier(field: &str, v: &str) -> Result<(), ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("`{v}` is not a plain SQL identifier (letters, digits and _, at most 63)"),
        ))
    }
}

fn validate_postgres(at: &str, pg: &PostgresSinkConfig) -> Result<(), ConfigError> {
    let parts: Vec<&str> = pg.table.split('.').collect();
    if parts.len() > 2 {
        return Err(ConfigError::invalid(
            format!("{at}.table"),
            format!("`{}` is neither `table` nor `schema.table`", pg.table),
        ));
    }
    for part in parts {
        identifier(&format!("{at}.table"), part)?;
    }
    non_empty(&format!("{at}.connectionEnv"), &pg.connection_env)?;
    if !(1..=64).contains(&pg.pool_size) {
        return Err(ConfigError::invalid(
            format!("{at}.poolSize"),
            format!("must be between 1 and 64, got {}", pg.pool_size),
        ));
    }
    for (j, c) in pg.columns.iter().enumerate() {
        identifier(&format!("{at}.columns[{j}].name"), &c.name)?;
        if let Some(t) = &c.sql_type {
            let ok = !t.trim().is_empty()
                && t.len() <= 64
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || " _(),[]".contains(c));
            if !ok {
                return Err(ConfigError::invalid(
                    format!("{at}.columns[{j}].type"),
                    format!("`{t}` is not a SQL type name (e.g. bigint, numeric(10,2), text[])"),
                ));
            }
        }
        if pg.columns[..j].iter().any(|o| o.name == c.name) {
            return Err(ConfigError::invalid(
                format!("{at}.columns[{j}].name"),
                format!("column `{}` is mapped twice", c.name),
            ));
        }
    }
    for (j, k) in pg.conflict_key.iter().enumerate() {
        identifier(&format!("{at}.conflictKey[{j}]"), k)?;
        if !pg.columns.is_empty() && !pg.columns.iter().any(|c| &c.name == k) {
            return Err(ConfigError::invalid(
                format!("{at}.conflictKey[{j}]"),
                format!("`{k}` is not one of the mapped columns"),
            ));
        }
    }
    if pg.on_conflict == OnConflict::Update && pg.conflict_key.is_empty() {
        return Err(ConfigError::invalid(
            format!("{at}.conflictKey"),
            "required with onConflict: update (the unique columns that identify a row)",
        ));
    }
    Ok(())
}

fn non_empty(field: &str, v: &str) -> Result<(), ConfigError> {
    if v.trim().is_empty() {
        Err(ConfigError::invalid(field, "must not be empty"))
    } else {
        Ok(())
    }
}

/// Kafka's rule: 1-249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
fn topic_name(field: &str, v: &str) -> Result<(), ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 249
        && v != "."
        && v != ".."
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("`{v}` is not a Kafka topic name (1-249 characters of a-z A-Z 0-9 . _ -)"),
        ))
    }
}

/// `SCREAMING_SNAKE` segment to the camelCase key used in the document.
fn camel(segment: &str) -> String {
    let mut out = String::new();
    for (i, part) in segment.split('_').filter(|p| !p.is_empty()).enumerate() {
        let lower = part.to_ascii_lowercase();
        if i == 0 {
            out.push_str(&lower);
        } else {
            let mut c = lower.chars();
            if let Some(f) = c.next() {
                out.push(f.to_ascii_uppercase());
                out.extend(c);
            }
        }
    }
    out
}

fn apply_override(root: &mut serde_json::Value, var: &str, raw: &str) -> Result<(), ConfigError> {
    use serde_json::Value;
    let err = |message: String| ConfigError::Override {
        var: var.to_string(),
        message,
    };
    let path: Vec<&str> = var[ENV_OVERRIDE_PREFIX.len()..].split("__").collect();
    if path.iter().any(|s| s.is_empty()) {
        return Err(err(
            "empty path segment; separate fields with a double underscore".into(),
        ));
    }
    let new: Value =
        serde_yaml::from_str(raw).map_err(|e| err(format!("value is not YAML: {e}")))?;
    let mut cur = root;
    for (i, seg) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        if let Ok(idx) = seg.parse::<usize>() {
            let seq = cur
                .as_array_mut()
                .ok_or_else(|| err(format!("`{seg}` indexes a field that is not a list")))?;
            let len = seq.len();
            let slot = seq
                .get_mut(idx)
                .ok_or_else(|| err(format!("index {idx} is out of range (the list has {len})")))?;
            if last {
                *slot = new;
                return Ok(());
            }
            cur = slot;
        } else {
            if cur.is_null() {
                *cur = Value::Object(Default::default());
            }
            let map = cur
                .as_object_mut()
                .ok_or_else(|| err(format!("`{seg}` is inside a field that is not a map")))?;
            let key = camel(seg);
            if last {
                map.insert(key, new);
                return Ok(());
            }
            cur = map.entry(key).or_insert(Value::Null);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
pipeline: demo
source: {bootstrapServers: "127.0.0.1:9092", topic: in, groupId: g}
sinks: [{kafka: {topic: out}}]
"#;

    fn err(yaml: &str) -> String {
        WorkerConfig::from_yaml(yaml).unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = WorkerConfig::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.workers.per_partition, 5);
        assert_eq!(c.workers.ordering, Ordering::Key);
        assert_eq!(c.batching.max_bytes.0, 1 << 20);
        assert_eq!(c.batching.linger.0.as_millis(), 5);
        assert_eq!(c.processor, ProcessorConfig::Passthrough {});
        assert_eq!(c.source.start_from, StartFrom::Earliest);
    }

    #[test]
    fn rendered_yaml_round_trips() {
        let c = WorkerConfig::from_yaml(MINIMAL).unwrap();
        assert_eq!(WorkerConfig::from_yaml(&c.to_yaml()).unwrap(), c);
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let e = err(&MINIMAL.replace("groupId: g", "groupId: g, grupId: x"));
        assert!(e.contains("source") && e.contains("grupId"), "{e}");
        assert!(e.contains("expected one of"), "{e}");
    }

    #[test]
    fn unknown_sink_kind_lists_the_allowed_kinds() {
        let e = err(&MINIMAL.replace("kafka: {topic: out}", "s3: {bucket: b}"));
        assert!(
            e.contains("sinks[0]") && e.contains("s3") && e.contains("kafka"),
            "{e}"
        );
    }

    #[test]
    fn out_of_range_values_say_what_is_allowed() {
        let cases = [
            (
                "workers: {perPartition: 0}",
                "workers.perPartition",
                "between 1 and 256",
            ),
            (
                "workers: {queueCapacity: 1}",
                "workers.queueCapacity",
                "between 2",
            ),
            (
                "batching: {maxMessages: 0}",
                "batching.maxMessages",
                "between 1",
            ),
            (
                "batching: {maxBytes: 10}",
                "batching.maxBytes",
                "at least 1KiB",
            ),
            (
                "batching: {linger: 5 parsecs}",
                "batching.linger",
                "not a duration",
            ),
            (
                "batching: {maxBytes: 1QB}",
                "batching.maxBytes",
                "unknown byte unit",
            ),
            (
                "workers: {ordering: random}",
                "workers.ordering",
                "partition",
            ),
            (
                "commit: {drainTimeout: 40s}",
                "commit.drainTimeout",
                "shorter than",
            ),
            ("server: {listen: nowhere}", "server.listen", "ip:port"),
        ];
        for (extra, field, want) in cases {
            let e = err(&format!("{MINIMAL}{extra}\n"));
            assert!(e.contains(field) && e.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn sink_that_feeds_its_own_input_is_refused() {
        let e = err(&MINIMAL.replace("topic: out", "topic: in"));
        assert!(e.contains("feed itself"), "{e}");
    }

    #[test]
    fn the_worker_refuses_what_would_void_at_least_once() {
        let cases = [
            (
                MINIMAL.replace(
                    "groupId: g",
                    "groupId: g, consumerProperties: {enable.auto.commit: 'true'}",
                ),
                r#"source.consumerProperties["enable.auto.commit"]"#,
            ),
            (
                MINIMAL.replace("topic: out", "topic: out, producerProperties: {acks: '0'}"),
                r#"sinks[0].kafka.producerProperties["acks"]"#,
            ),
            (
                format!("{MINIMAL}deadLetter: {{topic: out}}\n"),
                "also the output topic of sinks[0]",
            ),
            (
                MINIMAL.replace(
                    "[{kafka: {topic: out}}]",
                    "[{kafka: {topic: out}}, {kafka: {topic: out}}]",
                ),
                "already the output of sinks[0]",
            ),
        ];
        for (yaml, want) in cases {
            let e = err(&yaml);
            assert!(e.contains(want), "{e}");
        }
        // The same topic name on another cluster is another topic.
        assert!(WorkerConfig::from_yaml(&MINIMAL.replace(
            "[{kafka: {topic: out}}]",
            "[{kafka: {topic: out}}, {kafka: {topic: out, bootstrapServers: 'other:9092'}}]"
        ))
        .is_ok());
    }

    #[test]
    fn bad_topic_names_are_refused() {
        let e = err(&MINIMAL.replace("topic: in", "topic: \"in put\""));
        assert!(
            e.contains("source.topic") && e.contains("not a Kafka topic name"),
            "{e}"
        );
    }

    #[test]
    fn sasl_needs_a_mechanism_and_user_but_never_a_password_in_the_file() {
        let e = err(&MINIMAL.replace(
            "groupId: g",
            "groupId: g, security: {protocol: SASL_PLAINTEXT}",
        ));
        assert!(e.contains("saslMechanism"), "{e}");
        let e = err(&MINIMAL.replace(
            "groupId: g",
            "groupId: g, security: {protocol: SASL_PLAINTEXT, saslMechanism: PLAIN, username: u, password: p}",
        ));
        assert!(e.contains("unknown field `password`"), "{e}");
    }

    #[test]
    fn env_overrides_reach_nested_fields_and_list_items() {
        let env = vec![
            (
                "SLUICE__SOURCE__BOOTSTRAP_SERVERS".to_string(),
                "10.0.0.1:9092".to_string(),
            ),
            (
                "SLUICE__SINKS__0__KAFKA__TOPIC".to_string(),
                "other".to_string(),
            ),
            (
                "SLUICE__WORKERS__PER_PARTITION".to_string(),
                "3".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let c = WorkerConfig::from_yaml_with_env(MINIMAL, env).unwrap();
        assert_eq!(c.source.bootstrap_servers, "10.0.0.1:9092");
        assert_eq!(c.workers.per_partition, 3);
        match &c.sinks[0] {
            SinkConfig::Kafka(k) => assert_eq!(k.topic, "other"),
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn env_overrides_are_validated_like_the_file() {
        let env = vec![(
            "SLUICE__WORKERS__PER_PARTITION".to_string(),
            "0".to_string(),
        )];
        let e = WorkerConfig::from_yaml_with_env(MINIMAL, env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("workers.perPartition"), "{e}");
        let env = vec![(
            "SLUICE__SINKS__3__KAFKA__TOPIC".to_string(),
            "x".to_string(),
        )];
        let e = WorkerConfig::from_yaml_with_env(MINIMAL, env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SLUICE__SINKS__3") && e.contains("out of range"),
            "{e}"
        );
    }

    /// Cases per fuzzing property: `default`, or `PROPTEST_CASES` for a longer run.
    fn fuzz_cases(default: u32) -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// YAML-ish values built from the configuration's own keys and from scalars that
    /// look like what its fields take (numbers, durations, sizes, booleans) or do not.
    fn yamlish() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let keys = prop::sample::select(vec![
            "pipeline",
            "source",
            "bootstrapServers",
            "topic",
            "groupId",
            "sinks",
            "kafka",
            "postgres",
            "stdout",
            "null",
            "table",
            "columns",
            "name",
            "field",
            "type",
            "onConflict",
            "conflictKey",
            "processor",
            "jq",
            "program",
            "envelope",
            "delay",
            "perRecord",
            "workers",
            "perPartition",
            "queueCapacity",
            "ordering",
            "batching",
            "maxMessages",
            "maxBytes",
            "linger",
            "commit",
            "interval",
            "drainTimeout",
            "memory",
            "inFlightBytes",
            "fetchBuffer",
            "retry",
            "initialBackoff",
            "maxBackoff",
            "maxElapsed",
            "maxAttempts",
            "deadLetter",
            "security",
            "protocol",
            "saslMechanism",
            "passwordEnv",
            "caFile",
            "server",
            "listen",
            "x",
        ]);
        let scalar = prop_oneof![
            "-?[0-9]{1,20}",
            "-?[0-9]{1,5}(\\.[0-9]{1,3})?(us|ms|s|m|h|d|B|KiB|MiB|GiB|KB|MB|GB)?",
            "true|false|null|~|key|partition|unordered|ignore|update|SASL_SSL|PLAIN",
            "'[^']{0,12}'",
            "\\PC{0,10}",
        ];
        scalar.prop_recursive(3, 24, 4, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(", "))),
                prop::collection::vec((keys.clone(), inner), 0..4).prop_map(|kv| {
                    let body: Vec<String> =
                        kv.into_iter().map(|(k, v)| format!("{k}: {v}")).collect();
                    format!("{{{}}}", body.join(", "))
                }),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(fuzz_cases(1000)))]
        #[test]
        fn fuzz_config_parser_never_panics_on_arbitrary_text(s in "\\PC{0,200}") {
            let _ = WorkerConfig::from_yaml(&s);
        }

        /// Structured fuzzing: a valid configuration with one top-level section replaced
        /// or added by a random tree of real keys and plausible or wrong scalars. Either
        /// it parses and validates, or the error names where it went wrong.
        #[test]
        fn fuzz_config_sections_parse_or_name_the_field(
            section in proptest::sample::select(vec![
                "source", "sinks", "processor", "workers", "batching", "commit", "memory",
                "retry", "deadLetter", "server", "unknownSection",
            ]),
            value in yamlish(),
        ) {
            let base: Vec<&str> = MINIMAL
                .lines()
                .filter(|l| !l.starts_with(&format!("{section}:")))
                .collect();
            let text = format!("{}\n{section}: {value}\n", base.join("\n"));
            if let Err(e) = WorkerConfig::from_yaml(&text) {
                // `.` for YAML syntax (with line and column), else the field's path
                let e = e.to_string();
                proptest::prop_assert!(e.starts_with("invalid configuration at `"), "{e}\n{text}");
            }
        }
    }

    #[test]
    fn a_jq_program_that_does_not_compile_is_refused_with_its_position() {
        let e = err(&format!(
            "{MINIMAL}processor: {{jq: {{program: '.a | foo'}}}}\n"
        ));
        assert!(
            e.contains("processor.jq.program")
                && e.contains("undefined filter `foo`")
                && e.contains("line 1, column 6"),
            "{e}"
        );
        assert!(WorkerConfig::from_yaml(&format!(
            "{MINIMAL}processor: {{jq: {{program: '.a | ascii_downcase'}}}}\n"
        ))
        .is_ok());
    }
}
