//! The `postgres` sink: batched writes to a table.
//!
//! One statement per batch, `INSERT INTO t (a, b) SELECT u.a::type, u.b::type FROM
//! UNNEST($1::text[], $2::text[]) AS u(a, b) ON CONFLICT ...`: a single round trip and a
//! single plan however many rows the batch has. Every output value must be a JSON object;
//! each column takes the top-level field of its name (or the field its mapping names),
//! rendered as text and cast by PostgreSQL to the column's type (strings as they are,
//! numbers and booleans as literals, objects and arrays as JSON text, a missing field or
//! null as NULL).
//!
//! `onConflict: ignore` (default) writes `ON CONFLICT DO NOTHING`, so a record delivered
//! again after a crash does not duplicate its row; `update` writes `ON CONFLICT (key) DO
//! UPDATE SET` the other columns, keeping the last of several rows with one key in a
//! batch.
//!
//! Errors: a lost connection, a timeout, a serialization failure or an unavailable server
//! is transient and retried with the pipeline's retry policy (the batch holds its
//! connection slot meanwhile, so backpressure reaches the consumer). A data or constraint
//! error is permanent: the batch is bisected until the rejected rows are found; they go to
//! the dead-letter path and every other row is written.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::future::BoxFuture;
use serde_json::Value;
use sluice_api::config::{OnConflict, PostgresSinkConfig};
use tokio::sync::Semaphore;
use tokio_postgres::config::SslMode;
use tokio_postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::tls::{chain, TlsError};
use super::{Sink, SinkBatch, SinkFailure, SinkMetrics};
use crate::deadletter::DeadLetters;
use crate::retry::{ErrorClass, RetryPolicy};

/// Longest one statement may take before the attempt counts as a (transient) timeout.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum PostgresSetupError {
    /// The connection string variable is missing.
    #[error("postgres sink: the environment variable {0} (connectionEnv) is not set; it must hold the connection string")]
    MissingEnv(String),
    /// The connection string does not parse.
    #[error("postgres sink: the connection string in {env} is not valid: {message}")]
    BadConnectionString {
        /// The variable.
        env: String,
        /// What is wrong.
        message: String,
    },
    /// The server could not be reached or refused the login.
    #[error("postgres sink: cannot connect: {0}")]
    Connect(String),
    /// The table or a column does not exist.
    #[error("postgres sink: {0}")]
    Schema(String),
    /// `caFile` could not be read, or holds no certificate.
    #[error("postgres sink: caFile {path}: {message}")]
    CaFile {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The TLS connector for `sslmode=require` (see [`super::tls`]).
fn tls_connector(ca_file: Option<&str>) -> Result<MakeRustlsConnect, PostgresSetupError> {
    match super::tls::client_config(ca_file) {
        Ok(config) => Ok(MakeRustlsConnect::new(config)),
        Err(TlsError::CaFile { path, message }) => {
            Err(PostgresSetupError::CaFile { path, message })
        }
        Err(e) => Err(PostgresSetupError::Connect(format!("sslmode=require: {e}"))),
    }
}

/// A resolved column: name, JSON field, SQL type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// JSON field the value comes from.
    pub field: String,
    /// SQL type the text is cast to.
    pub sql_type: String,
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn quote_table(table: &str) -> String {
    table.split('.').map(quote).collect::<Vec<_>>().join(".")
}

/// The statement for `columns`, given the conflict handling.
pub fn insert_statement(
    table: &str,
    columns: &[Column],
    on_conflict: OnConflict,
    conflict_key: &[String],
) -> String {
    let names: Vec<String> = columns.iter().map(|c| quote(&c.name)).collect();
    let casts: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("u.c{i}::{}", c.sql_type))
        .collect();
    let params: Vec<String> = (1..=columns.len())
        .map(|i| format!("${i}::text[]"))
        .collect();
    let aliases: Vec<String> = (0..columns.len()).map(|i| format!("c{i}")).collect();
    let target = if conflict_key.is_empty() {
        String::new()
    } else {
        format!(
            " ({})",
            conflict_key
                .iter()
                .map(|k| quote(k))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let updates: Vec<String> = columns
        .iter()
        .filter(|c| !conflict_key.contains(&c.name))
        .map(|c| format!("{0} = EXCLUDED.{0}", quote(&c.name)))
        .collect();
    let conflict = match on_conflict {
        OnConflict::Update if !updates.is_empty() => {
            format!("ON CONFLICT{target} DO UPDATE SET {}", updates.join(", "))
        }
        _ => format!("ON CONFLICT{target} DO NOTHING"),
    };
    format!(
        "INSERT INTO {} ({}) SELECT {} FROM UNNEST({}) AS u({}) {}",
        quote_table(table),
        names.join(", "),
        casts.join(", "),
        params.join(", "),
        aliases.join(", "),
        conflict
    )
}

/// A JSON field as the text PostgreSQL casts to the column type.
fn field_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        other => Some(other.to_string()),
    }
}

/// Classify a database error, with a short class for metrics and dead-letter headers.
pub fn classify(e: &tokio_postgres::Error) -> (ErrorClass, &'static str) {
    let Some(db) = e.as_db_error() else {
        // I/O, a closed connection, a protocol error: the server may come back.
        return (ErrorClass::Transient, "connection");
    };
    let code = db.code().code();
    match &code[..2] {
        "08" => (ErrorClass::Transient, "connection"),
        "40" => (ErrorClass::Transient, "conflict_retry"),
        "53" | "57" | "58" => (ErrorClass::Transient, "unavailable"),
        "23" => (ErrorClass::Permanent, "constraint"),
        "22" => (ErrorClass::Permanent, "invalid_data"),
        "42" => (ErrorClass::Permanent, "schema"),
        _ => (ErrorClass::Permanent, "database"),
    }
}

/// One row to write: its index in the batch and its column texts.
type Row = (usize, Vec<Option<String>>);

/// One failed attempt.
struct Attempt {
    class: ErrorClass,
    name: &'static str,
    message: String,
}

/// Write outputs to a PostgreSQL table.
pub struct PostgresSink(Arc<Inner>);

struct Inner {
    pool: Pool,
    statement: String,
    columns: Vec<Column>,
    conflict_key: Vec<usize>,
    dedupe: bool,
    slots: Arc<Semaphore>,
    slot_count: u32,
    retry: RetryPolicy,
    metrics: SinkMetrics,
    dead_letters: Arc<DeadLetters>,
}

impl std::fmt::Debug for PostgresSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSink")
            .field("statement", &self.0.statement)
            .finish()
    }
}

impl PostgresSink {
    /// Connect (the connection string comes from the environment variable the config
    /// names), resolve the columns against the table, prepare the statement.
    pub async fn connect(
        config: &PostgresSinkConfig,
        retry: RetryPolicy,
        metrics: SinkMetrics,
        dead_letters: Arc<DeadLetters>,
    ) -> Result<Arc<Self>, PostgresSetupError> {
        let url = std::env::var(&config.connection_env)
            .map_err(|_| PostgresSetupError::MissingEnv(config.connection_env.clone()))?;
        let mut pg: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
            PostgresSetupError::BadConnectionString {
                env: config.connection_env.clone(),
                message: e.to_string(),
            }
        })?;
        pg.connect_timeout(Duration::from_secs(5));
        pg.application_name("sluice");
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let tls = pg.get_ssl_mode() == SslMode::Require;
        let manager = if tls {
            let connector = tls_connector(config.ca_file.as_deref())?;
            Manager::from_config(pg, connector, manager_config)
        } else {
            Manager::from_config(pg, NoTls, manager_config)
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool_size as usize)
            .build()
            .map_err(|e| PostgresSetupError::Connect(e.to_string()))?;
        let client = pool
            .get()
            .await
            .map_err(|e| PostgresSetupError::Connect(chain(&e)))?;
        tracing::info!(sink = "postgres", tls, "connected to PostgreSQL");
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
                 FROM pg_attribute a \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                &[&quote_table(&config.table)],
            )
            .await
            .map_err(|e| PostgresSetupError::Schema(e.to_string()))?;
        if rows.is_empty() {
            return Err(PostgresSetupError::Schema(format!(
                "table `{}` does not exist (or has no columns) in the database the connection string names",
                config.table
            )));
        }
        let table: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let columns: Vec<Column> = if config.columns.is_empty() {
            table
                .iter()
                .map(|(name, ty)| Column {
                    name: name.clone(),
                    field: name.clone(),
                    sql_type: ty.clone(),
                })
                .collect()
        } else {
            config
                .columns
                .iter()
                .map(|m| {
                    let ty = table.iter().find(|(n, _)| n == &m.name).map(|(_, t)| t);
                    let Some(ty) = ty else {
                        return Err(PostgresSetupError::Schema(format!(
                            "column `{}` is not a column of `{}` (it has: {})",
                            m.name,
                            config.table,
                            table
                                .iter()
                                .map(|(n, _)| n.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    };
                    Ok(Column {
                        name: m.name.clone(),
                        field: m.field.clone().unwrap_or_else(|| m.name.clone()),
                        sql_type: m.sql_type.clone().unwrap_or_else(|| ty.clone()),
                    })
                })
                .collect::<Result<_, _>>()?
        };
        let mut conflict_key = Vec::new();
        for k in &config.conflict_key {
            let Some(i) = columns.iter().position(|c| &c.name == k) else {
                return Err(PostgresSetupError::Schema(format!(
                    "conflictKey column `{k}` is not a column of `{}`",
                    config.table
                )));
            };
            conflict_key.push(i);
        }
        let statement = insert_statement(
            &config.table,
            &columns,
            config.on_conflict,
            &config.conflict_key,
        );
        client
            .prepare_cached(&statement)
            .await
            .map_err(|e| PostgresSetupError::Schema(format!("{e} (statement: {statement})")))?;
        drop(client);
        // `update` must apply batches in order (a later value wins); `ignore` may run
        // batches side by side, one per pooled connection.
        let slot_count = match config.on_conflict {
            OnConflict::Update => 1,
            OnConflict::Ignore => config.pool_size,
        };
        tracing::info!(sink = "postgres", table = %config.table, columns = columns.len(), "postgres sink ready");
        Ok(Arc::new(PostgresSink(Arc::new(Inner {
            pool,
            statement,
            columns,
            dedupe: config.on_conflict == OnConflict::Update && !conflict_key.is_empty(),
            conflict_key,
            slots: Arc::new(Semaphore::new(slot_count as usize)),
            slot_count,
            retry,
            metrics,
            dead_letters,
        }))))
    }

    /// The statement the sink runs per batch.
    pub fn statement(&self) -> &str {
        &self.0.statement
    }
}

impl Inner {
    /// One attempt at writing `rows` (column-major text arrays).
    async fn execute(&self, params: &[Vec<Option<String>>]) -> Result<(), Attempt> {
        let work = async {
            let client = self.pool.get().await.map_err(|e| Attempt {
                class: ErrorClass::Transient,
                name: "connection",
                message: e.to_string(),
            })?;
            let stmt = client
                .prepare_cached(&self.statement)
                .await
                .map_err(pg_attempt)?;
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                .iter()
                .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            client.execute(&stmt, &refs).await.map_err(pg_attempt)?;
            Ok(())
        };
        match tokio::time::timeout(STATEMENT_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(Attempt {
                class: ErrorClass::Transient,
                name: "timeout",
                message: format!("no answer within {STATEMENT_TIMEOUT:?}"),
            }),
        }
    }

    fn params(&self, rows: &[Row], group: &[usize]) -> Vec<Vec<Option<String>>> {
        let mut cols: Vec<Vec<Option<String>>> =
            vec![Vec::with_capacity(group.len()); self.columns.len()];
        for &g in group {
            for (c, v) in rows[g].1.iter().enumerate() {
                cols[c].push(v.clone());
            }
        }
        cols
    }

    /// Write `rows`, retrying transient errors and bisecting around permanent ones.
    /// Returns the rejected rows' batch indexes with why.
    async fn write(&self, rows: Vec<Row>) -> Vec<(usize, SinkFailure)> {
        let mut rejected = Vec::new();
        let mut pending: Vec<Vec<usize>> = vec![(0..rows.len()).collect()];
        let mut started: Option<Instant> = None;
        while let Some(group) = pending.pop() {
            if group.is_empty() {
                continue;
            }
            let params = self.params(&rows, &group);
            let mut attempts = 1;
            loop {
                match self.execute(&params).await {
                    Ok(()) => break,
                    Err(a) if a.class == ErrorClass::Transient => {
                        let since = *started.get_or_insert_with(Instant::now);
                        match self.retry.next_delay(attempts, since.elapsed()) {
                            Some(d) => {
                                tracing::warn!(sink = "postgres", error = %a.message, attempts, delay = ?d, rows = group.len(),
                                    "transient database error; retrying");
                                self.metrics.retries.inc_by(group.len() as u64);
                                tokio::time::sleep(d).await;
                                attempts += 1;
                            }
                            None => {
                                tracing::error!(sink = "postgres", error = %a.message, attempts, rows = group.len(),
                                    "retries exhausted");
                                rejected.extend(group.iter().map(|&g| {
                                    (
                                        rows[g].0,
                                        SinkFailure {
                                            class: "retries_exhausted",
                                            message: a.message.clone(),
                                            attempts,
                                        },
                                    )
                                }));
                                break;
                            }
                        }
                    }
                    Err(a) => {
                        if group.len() == 1 {
                            rejected.push((
                                rows[group[0]].0,
                                SinkFailure {
                                    class: a.name,
                                    message: a.message,
                                    attempts,
                                },
                            ));
                        } else {
                            // Some row is bad: split, and the good halves go through.
                            let (l, r) = group.split_at(group.len() / 2);
                            pending.push(r.to_vec());
                            pending.push(l.to_vec());
                        }
                        break;
                    }
                }
            }
        }
        rejected
    }

    /// Rows of a batch: (batch index, column texts); outputs that are not JSON objects
    /// are rejected at once.
    fn rows(&self, batch: &SinkBatch) -> (Vec<Row>, Vec<(usize, SinkFailure)>) {
        to_rows(
            &self.columns,
            self.dedupe.then_some(self.conflict_key.as_slice()),
            batch.items.iter().map(|(o, _)| o.value.as_deref()),
        )
    }
}

/// Decode output values into rows: (index, one text per column, from the JSON object's
/// fields); a value that is missing or not a JSON object is rejected (`not_an_object`).
/// With `dedupe_by` (the conflict key's column indexes, for `onConflict: update`), only
/// the last row of each key is kept: one statement cannot update a row twice. Rows whose
/// key is missing or null are all kept.
fn to_rows<'a>(
    columns: &[Column],
    dedupe_by: Option<&[usize]>,
    values: impl Iterator<Item = Option<&'a [u8]>>,
) -> (Vec<Row>, Vec<(usize, SinkFailure)>) {
    let mut rows: Vec<Row> = Vec::new();
    let mut rejected = Vec::new();
    for (i, value) in values.enumerate() {
        let parsed = value.map(serde_json::from_slice::<serde_json::Map<String, Value>>);
        let message = match parsed {
            Some(Ok(obj)) => {
                rows.push((
                    i,
                    columns
                        .iter()
                        .map(|c| field_text(obj.get(&c.field)))
                        .collect(),
                ));
                continue;
            }
            None => "the output has no value".to_string(),
            Some(Err(e)) => format!("the output value is not a JSON object: {e}"),
        };
        rejected.push((
            i,
            SinkFailure {
                class: "not_an_object",
                message,
                attempts: 1,
            },
        ));
    }
    if let Some(key_columns) = dedupe_by {
        let mut seen = std::collections::HashSet::new();
        let mut keep = vec![false; rows.len()];
        for (j, (_, cols)) in rows.iter().enumerate().rev() {
            let key: Vec<&Option<String>> = key_columns.iter().map(|&k| &cols[k]).collect();
            // A missing or null key is no key: such rows never conflict with each other,
            // so each is kept and PostgreSQL decides (a NOT NULL key column refuses it
            // as a `constraint` error and it is dead-lettered; a nullable unique column
            // takes it as a row). Never dropped here.
            keep[j] = key.iter().any(|k| k.is_none()) || seen.insert(key);
        }
        let mut j = 0;
        rows.retain(|_| {
            j += 1;
            keep[j - 1]
        });
    }
    (rows, rejected)
}

fn pg_attempt(e: tokio_postgres::Error) -> Attempt {
    let (class, name) = classify(&e);
    let message = match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{}: {} ({d})", db.code().code(), db.message()),
            None => format!("{}: {}", db.code().code(), db.message()),
        },
        None => e.to_string(),
    };
    Attempt {
        class,
        name,
        message,
    }
}

impl Sink for PostgresSink {
    fn name(&self) -> &str {
        "postgres"
    }

    fn deliver(&self, batch: SinkBatch) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Wait for a connection slot here, so a slow or absent database holds the
            // batcher and, through it, the workers and the consumer.
            let Ok(permit) = self.0.slots.clone().acquire_owned().await else {
                return batch.fail();
            };
            let inner = self.0.clone();
            tokio::spawn(tracing::Instrument::in_current_span(async move {
                let (rows, mut rejected) = inner.rows(&batch);
                rejected.extend(inner.write(rows).await);
                batch.settle(rejected, "postgres", &inner.metrics, &inner.dead_letters);
                drop(permit);
            }));
        })
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            tokio::time::timeout(timeout, self.0.slots.acquire_many(self.0.slot_count))
                .await
                .is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn column(name: &str) -> Column {
        Column {
            name: name.into(),
            field: name.into(),
            sql_type: "text".into(),
        }
    }

    /// Output values: arbitrary bytes, JSON of every shape, and objects with the columns'
    /// fields holding any JSON value.
    fn values() -> impl Strategy<Value = Option<Vec<u8>>> {
        let json = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "\\PC{0,20}".prop_map(Value::from),
        ];
        let any_json = json.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::hash_map("id|name|\\PC{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        prop::option::of(prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            any_json.prop_map(|v| serde_json::to_vec(&v).unwrap()),
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(2000)))]
        /// Fuzz the row decoding of the postgres sink: every output becomes exactly one
        /// row or one `not_an_object` rejection (with `update`, a row may be superseded
        /// by a later one of the same key, never lost otherwise), and no input panics.
        #[test]
        fn fuzz_postgres_rows_account_for_every_output(
            outputs in prop::collection::vec(values(), 0..24),
            dedupe in any::<bool>(),
        ) {
            let columns = [column("id"), column("name")];
            let key = [0usize];
            let (rows, rejected) = to_rows(
                &columns,
                dedupe.then_some(&key[..]),
                outputs.iter().map(|v| v.as_deref()),
            );
            let objects: Vec<usize> = outputs
                .iter()
                .enumerate()
                .filter(|(_, v)| {
                    v.as_deref()
                        .is_some_and(|b| serde_json::from_slice::<serde_json::Map<String, Value>>(b).is_ok())
                })
                .map(|(i, _)| i)
                .collect();
            prop_assert!(rejected.iter().all(|(_, f)| f.class == "not_an_object"));
            prop_assert_eq!(rejected.len() + objects.len(), outputs.len());
            prop_assert!(rows.iter().all(|(_, cols)| cols.len() == columns.len()));
            if dedupe {
                let keyed: Vec<&String> = rows.iter().filter_map(|(_, c)| c[0].as_ref()).collect();
                let keys: std::collections::HashSet<&String> = keyed.iter().copied().collect();
                prop_assert_eq!(keys.len(), keyed.len(), "one row per key");
                prop_assert!(rows.len() <= objects.len());
                // Every object without a key is a row of its own: none is dropped.
                let keyless = objects
                    .iter()
                    .filter(|&&i| {
                        let v: serde_json::Map<String, Value> =
                            serde_json::from_slice(outputs[i].as_deref().unwrap()).unwrap();
                        field_text(v.get("id")).is_none()
                    })
                    .count();
                prop_assert_eq!(rows.len() - keyed.len(), keyless);
            } else {
                let got: Vec<usize> = rows.iter().map(|(i, _)| *i).collect();
                prop_assert_eq!(got, objects);
            }
        }
    }
}
