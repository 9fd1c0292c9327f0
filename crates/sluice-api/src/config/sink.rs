//! `sinks`: where outputs go (Kafka, PostgreSQL, standard output, nowhere), and each sink's
//! own checks. What spans sinks (a topic written twice, a sink that feeds the pipeline's
//! input) is checked in [`super::WorkerConfig::validate`].

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::properties::{self, RESERVED_PRODUCER_PROPERTIES};
use super::rules::{
    identifier, non_empty, topic_name, IDENTIFIER_MAX_LEN, IDENTIFIER_PATTERN, POOL_SIZE,
    TABLE_LEN, TABLE_PATTERN, TOPIC_NAME_LEN, TOPIC_NAME_PATTERN,
};
use super::ConfigError;

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
        } = self;
        topic_name(&format!("{at}.topic"), topic)?;
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
