//! `sinks`: where outputs go (Kafka, PostgreSQL, HTTP, standard output, nowhere), and each sink's
//! own checks. What spans sinks (a topic written twice, a sink that feeds the pipeline's
//! input) is checked in [`super::WorkerConfig::validate`].

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::properties::{self, RESERVED_PRODUCER_PROPERTIES};
use super::rules::{
    http_url, identifier, non_empty, topic_name, HTTP_IN_FLIGHT, IDENTIFIER_MAX_LEN,
    IDENTIFIER_PATTERN, POOL_SIZE, TABLE_LEN, TABLE_PATTERN, TOPIC_NAME_LEN, TOPIC_NAME_PATTERN,
};
use super::ConfigError;
use crate::units::HumanDuration;

/// One destination of the pipeline's outputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum SinkConfig {
    /// A Kafka topic, written through an idempotent producer with acks=all.
    Kafka(KafkaSinkConfig),
    /// A PostgreSQL table, written in batches (one multi-row `INSERT ... SELECT FROM
    /// UNNEST` per batch). Each output value must be a JSON object.
    Postgres(PostgresSinkConfig),
    /// An HTTP endpoint (a webhook, a microservice): each batch, or each output, is one
    /// request, delivered when the answer is a 2xx.
    Http(HttpSinkConfig),
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
            SinkConfig::Http(_) => "http",
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
    #[schemars(
        length(min = TOPIC_NAME_LEN.min, max = TOPIC_NAME_LEN.max),
        regex(pattern = TOPIC_NAME_PATTERN)
    )]
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
    /// How output values are encoded. Without it they are written as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<SinkFormat>,
}

/// The encoding of a Kafka sink's output values.
///
/// ```yaml
/// format:
///   schemaRegistry:
///     url: http://registry.example.com:8081
///     subjectStrategy: topic          # topic (<topic>-value) | record | topicRecord
///     schema:
///       avro: '{"type": "record", "name": "Reading", "fields": [...]}'
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SinkFormat {
    /// Values in the Confluent wire format: each output value (JSON) is encoded with
    /// `schema`, registered in this registry at start-up.
    pub schema_registry: SinkRegistryConfig,
}

/// A schema registry and the schema a Kafka sink writes with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SinkRegistryConfig {
    /// The registry's base URL (as `source.format.schemaRegistry.url`).
    #[schemars(
        length(min = 8, max = 2048),
        regex(pattern = r"^https?://[^/@\s]+(/\S*)?$")
    )]
    pub url: String,
    /// Name of the environment variable holding `user:password` for basic authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_env: Option<String>,
    /// PEM file of the CA certificates to trust for an `https://` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// The subject the schema is registered under.
    #[serde(default)]
    pub subject_strategy: SubjectStrategy,
    /// The schema.
    pub schema: WriterSchema,
    /// Register the schema at start-up when the subject does not have it (default);
    /// false: it must be registered already (start-up fails otherwise).
    #[serde(default = "default_true")]
    pub auto_register: bool,
}

fn default_true() -> bool {
    true
}

/// Confluent's subject name strategies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SubjectStrategy {
    /// `<topic>-value` (TopicNameStrategy).
    #[default]
    Topic,
    /// The record's full name (RecordNameStrategy).
    Record,
    /// `<topic>-<record full name>` (TopicRecordNameStrategy).
    TopicRecord,
}

/// The schema a sink writes with: Avro, or Protobuf with the message to write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum WriterSchema {
    /// An Avro schema (JSON text).
    Avro(String),
    /// A `.proto` file's text and the full name of the message each value is.
    Protobuf {
        /// The `.proto` text.
        proto: String,
        /// The message's full name (`package.Message`); default: the file's first message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
}

impl SinkRegistryConfig {
    /// The registry this sink talks to (its URL, credentials and CA).
    pub fn registry(&self) -> super::SchemaRegistryConfig {
        super::SchemaRegistryConfig {
            url: self.url.clone(),
            credentials_env: self.credentials_env.clone(),
            ca_file: self.ca_file.clone(),
        }
    }

    /// The checks at `at` (`sinks[0].kafka.format.schemaRegistry`).
    fn check(&self, at: &str) -> Result<(), ConfigError> {
        self.registry().check(at)?;
        match &self.schema {
            WriterSchema::Avro(text) => {
                if serde_json::from_str::<serde_json::Value>(text).is_err() {
                    return Err(ConfigError::invalid(
                        format!("{at}.schema.avro"),
                        "an Avro schema is JSON (e.g. {\"type\": \"record\", \"name\": \"Reading\", \"fields\": [...]})",
                    ));
                }
            }
            WriterSchema::Protobuf { proto, message } => {
                non_empty(&format!("{at}.schema.protobuf.proto"), proto)?;
                if let Some(m) = message {
                    non_empty(&format!("{at}.schema.protobuf.message"), m)?;
                }
            }
        }
        Ok(())
    }
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
    #[schemars(length(min = TABLE_LEN.min, max = TABLE_LEN.max), regex(pattern = TABLE_PATTERN))]
    pub table: String,
    /// Name of the environment variable holding the connection string
    /// (`postgres://user:password@host:5432/db` or `host=... user=...`). The string itself
    /// never appears in the configuration.
    #[serde(default = "default_postgres_env")]
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
    #[serde(default = "default_pool_size")]
    #[schemars(range(min = POOL_SIZE.min, max = POOL_SIZE.max))]
    pub pool_size: u32,
}

/// One table column and where its value comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ColumnMapping {
    /// Column name.
    #[schemars(length(max = IDENTIFIER_MAX_LEN), regex(pattern = IDENTIFIER_PATTERN))]
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

/// `connectionEnv` when it is not set.
pub fn default_postgres_env() -> String {
    "SLUICE_POSTGRES_URL".into()
}

/// `poolSize` when it is not set.
pub fn default_pool_size() -> u32 {
    4
}

impl SinkConfig {
    /// The checks of the sink at `at` (`sinks[0]`) on its own.
    pub(super) fn check(&self, at: &str) -> Result<(), ConfigError> {
        match self {
            SinkConfig::Kafka(k) => k.check(&format!("{at}.kafka")),
            SinkConfig::Postgres(pg) => pg.check(&format!("{at}.postgres")),
            SinkConfig::Http(h) => h.check(&format!("{at}.http")),
            SinkConfig::Stdout {} | SinkConfig::Null {} => Ok(()),
        }
    }
}

impl KafkaSinkConfig {
    /// The checks of a Kafka sink at `at` (`sinks[0].kafka`).
    fn check(&self, at: &str) -> Result<(), ConfigError> {
        let KafkaSinkConfig {
            topic,
            bootstrap_servers: _,
            key: _,
            trace_header,
            producer_properties,
            format,
        } = self;
        topic_name(&format!("{at}.topic"), topic)?;
        if let Some(f) = format {
            f.schema_registry
                .check(&format!("{at}.format.schemaRegistry"))?;
        }
        properties::check(
            &format!("{at}.producerProperties"),
            producer_properties,
            RESERVED_PRODUCER_PROPERTIES,
        )?;
        if trace_header.as_deref().is_some_and(|h| h.trim().is_empty()) {
            return Err(ConfigError::invalid(
                format!("{at}.traceHeader"),
                "must not be empty when set",
            ));
        }
        Ok(())
    }
}

impl PostgresSinkConfig {
    /// The checks of a postgres sink at `at` (`sinks[0].postgres`).
    fn check(&self, at: &str) -> Result<(), ConfigError> {
        let pg = self;
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
        POOL_SIZE.check(&format!("{at}.poolSize"), pg.pool_size)?;
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
                        format!(
                            "`{t}` is not a SQL type name (e.g. bigint, numeric(10,2), text[])"
                        ),
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
}

/// An HTTP endpoint.
///
/// ```yaml
/// http:
///   url: https://ingest.example.com/v1/events
///   headers:
///     - {name: Authorization, valueEnv: INGEST_TOKEN}   # INGEST_TOKEN from spec.secretEnv
///     - {name: X-Source, value: sluice}
///   batch: {as: array}          # array | lines | onePerRequest
///   timeout: 10s
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// The endpoint: `https://...`, or `http://...` inside a trusted network. No
    /// credentials in it: they go in a header whose value comes from a Secret.
    #[schemars(
        length(min = 8, max = 2048),
        regex(pattern = r"^https?://[^/@\s]+(/\S*)?$")
    )]
    pub url: String,
    /// The request method.
    #[serde(default)]
    pub method: HttpMethod,
    /// Headers of every request. `Content-Type` defaults to what `batch.as` writes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub headers: Vec<HttpHeader>,
    /// How outputs become request bodies.
    #[serde(default)]
    pub batch: HttpBatch,
    /// Longest wait for a whole answer; a request that takes longer is retried.
    #[serde(default = "default_http_timeout")]
    pub timeout: HumanDuration,
    /// PEM file of the CA certificates to trust for an `https://` URL (without it, the
    /// system's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// The header naming the source records of a request (`topic/partition/offset`, see
    /// the README), so a receiver can drop a redelivery. Empty: none is sent.
    #[serde(default = "default_idempotency_header")]
    pub idempotency_header: String,
    /// Requests in flight at once when `workers.ordering` is `unordered`. With `key` or
    /// `partition` ordering, one request is in flight at a time for each source partition
    /// (`onePerRequest`) or for the sink (`array`, `lines`: a batch mixes partitions).
    #[serde(default = "default_http_in_flight")]
    #[schemars(range(min = HTTP_IN_FLIGHT.min, max = HTTP_IN_FLIGHT.max))]
    pub max_in_flight: u32,
}

/// The HTTP request method.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// `POST` (default).
    #[default]
    Post,
    /// `PUT`.
    Put,
    /// `PATCH`.
    Patch,
}

impl HttpMethod {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Patch => "PATCH",
        }
    }
}

/// One request header: a fixed value, or one read from an environment variable (filled
/// from a Secret through `spec.secretEnv`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.value) != has(self.valueEnv)",
     "message": "a header has exactly one of value and valueEnv"}
]))]
pub struct HttpHeader {
    /// The header name.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    )]
    pub name: String,
    /// The value, as it is (it is stored in the ConfigMap: no secrets here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub value: Option<String>,
    /// Name of the environment variable holding the value (a token, an API key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_env: Option<String>,
}

/// How the outputs of a batch become requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpBatch {
    /// `array` (default): one request per batch, its body a JSON array of the output
    /// values (each must be JSON); `lines`: one request per batch, one output value per
    /// line (`application/x-ndjson`; a value must not hold a line break);
    /// `onePerRequest`: each output is a request of its own, its body the value as it is.
    #[serde(rename = "as", default)]
    pub as_: HttpBatchAs,
}

/// The body shapes of [`HttpBatch`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum HttpBatchAs {
    /// A JSON array of the batch's output values.
    #[default]
    Array,
    /// One output value per line.
    Lines,
    /// One request per output.
    OnePerRequest,
}

/// `timeout` of an HTTP sink when it is not set.
pub fn default_http_timeout() -> HumanDuration {
    HumanDuration::from_millis(10_000)
}

/// `idempotencyHeader` when it is not set.
pub fn default_idempotency_header() -> String {
    "Idempotency-Key".into()
}

/// `maxInFlight` when it is not set.
pub fn default_http_in_flight() -> u32 {
    4
}

/// Whether `name` is an HTTP header name (RFC 9110's token).
pub fn header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+.^_`|~-".contains(&b))
}

/// Headers sluice sets itself (or the connection does): refused in `headers`.
pub const RESERVED_HTTP_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
];

impl HttpSinkConfig {
    /// The checks of an http sink at `at` (`sinks[0].http`).
    fn check(&self, at: &str) -> Result<(), ConfigError> {
        let HttpSinkConfig {
            url,
            method: _,
            headers,
            batch: _,
            timeout,
            ca_file,
            idempotency_header,
            max_in_flight,
        } = self;
        http_url(&format!("{at}.url"), url)?;
        if ca_file.is_some() && url.starts_with("http://") {
            return Err(ConfigError::invalid(
                format!("{at}.caFile"),
                "is for an https:// URL; this one is http://",
            ));
        }
        if let Some(f) = ca_file {
            non_empty(&format!("{at}.caFile"), f)?;
        }
        if timeout.get().is_zero() {
            return Err(ConfigError::invalid(
                format!("{at}.timeout"),
                "must be more than 0",
            ));
        }
        HTTP_IN_FLIGHT.check(&format!("{at}.maxInFlight"), *max_in_flight)?;
        if !idempotency_header.is_empty() && !header_name(idempotency_header) {
            return Err(ConfigError::invalid(
                format!("{at}.idempotencyHeader"),
                format!("`{idempotency_header}` is not an HTTP header name"),
            ));
        }
        if headers.len() > 32 {
            return Err(ConfigError::invalid(
                format!("{at}.headers"),
                format!("at most 32 headers, got {}", headers.len()),
            ));
        }
        for (j, h) in headers.iter().enumerate() {
            let field = format!("{at}.headers[{j}]");
            if !header_name(&h.name) {
                return Err(ConfigError::invalid(
                    format!("{field}.name"),
                    format!("`{}` is not an HTTP header name", h.name),
                ));
            }
            let lower = h.name.to_ascii_lowercase();
            if RESERVED_HTTP_HEADERS.contains(&lower.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{field}.name"),
                    format!("`{}` is set by the HTTP client itself", h.name),
                ));
            }
            if lower == idempotency_header.to_ascii_lowercase() {
                return Err(ConfigError::invalid(
                    format!("{field}.name"),
                    format!(
                        "`{}` is the idempotencyHeader, which sluice sets for each request",
                        h.name
                    ),
                ));
            }
            if headers[..j]
                .iter()
                .any(|o| o.name.eq_ignore_ascii_case(&h.name))
            {
                return Err(ConfigError::invalid(
                    format!("{field}.name"),
                    format!("`{}` is given twice", h.name),
                ));
            }
            match (&h.value, &h.value_env) {
                (Some(v), None) => {
                    if v.len() > 4096 || v.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
                        return Err(ConfigError::invalid(
                            format!("{field}.value"),
                            "must be at most 4096 characters without line breaks or control characters",
                        ));
                    }
                }
                (None, Some(env)) => non_empty(&format!("{field}.valueEnv"), env)?,
                _ => {
                    return Err(ConfigError::invalid(
                        field,
                        "a header has exactly one of value and valueEnv",
                    ))
                }
            }
        }
        Ok(())
    }
}
