//! The source's record format: values in the Confluent wire format (a zero byte, the
//! schema id as 4 big-endian bytes, the payload; Protobuf adds the message indexes) are
//! decoded into JSON by their schema before the processor sees them, so the jq processor
//! and the postgres sink work on Avro and Protobuf records unchanged.
//!
//! [`Decoding`] wraps the pipeline's processor. Before a batch, it makes sure the schema of
//! every id in the batch is known ([`Processor::prepare`]): fetched from the registry once
//! and kept (ids are immutable). The registry being unreachable holds the batch (the lane
//! waits and asks again); it never fails a record. A record whose id the registry does not
//! have (`schema_unknown`), whose schema sluice cannot use (`schema_invalid`), whose value
//! is not in the wire format (`not_wire_format`) or does not decode with its schema
//! (`schema_decode`) goes to the dead-letter path, stage `decode`, with the value as read.

pub mod encode;
pub mod registry;
mod schema;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;

pub use schema::{Compiled, WireValue};

use self::registry::{FetchError, Registry};
use crate::processor::{ProcessError, Processor, Unready};
use crate::record::{Output, Record};

/// How long "the registry has no schema of this id" is believed before asking again.
const UNKNOWN_FOR: Duration = Duration::from_secs(30);
/// Schema ids kept at most before those that are not ready are forgotten.
const CACHE_MAX: usize = 10_000;
/// The most an Avro value may make apache-avro allocate at once (a string's, bytes' or a
/// block's length): a record's bytes are untrusted, and a forged block count would
/// otherwise ask for gigabytes. Larger than any record a broker accepts by default.
pub const AVRO_MAX_ALLOCATION: usize = 16 << 20;
/// The wait before asking an unreachable registry again.
const UNREACHABLE_WAIT: Duration = Duration::from_secs(1);

/// What is known of a schema id.
#[derive(Clone)]
enum Entry {
    /// Compiled and ready.
    Ready(Arc<Compiled>),
    /// The registry does not have it (until then, when it is asked again).
    Unknown { message: String, until: Instant },
    /// The registry has it, but sluice cannot use it.
    Invalid(String),
}

/// A processor that decodes wire-format values into JSON, then runs the pipeline's.
pub struct Decoding {
    registry: Registry,
    cache: RwLock<HashMap<u32, Entry>>,
    inner: Arc<dyn Processor>,
}

impl std::fmt::Debug for Decoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoding")
            .field("registry", &self.registry)
            .field("processor", &self.inner.name())
            .finish()
    }
}

impl Decoding {
    /// Decode with `registry`'s schemas before `inner`.
    pub fn new(registry: Registry, inner: Arc<dyn Processor>) -> Self {
        Decoding {
            registry,
            cache: RwLock::new(HashMap::new()),
            inner,
        }
    }

    /// The ids of `records` that must be asked of the registry.
    fn missing(&self, records: &[Record]) -> Vec<u32> {
        let now = Instant::now();
        let cache = self.cache.read().unwrap();
        let mut ids: Vec<u32> = records
            .iter()
            .filter_map(|r| WireValue::parse(r.value.as_ref()?).ok().map(|w| w.id))
            .filter(|id| match cache.get(id) {
                None => true,
                Some(Entry::Unknown { until, .. }) => *until <= now,
                Some(_) => false,
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Fetch and compile `id`: the entry to keep, or the registry is unreachable.
    async fn fetch(&self, id: u32) -> Result<Entry, String> {
        let main = match self.registry.schema(id).await {
            Ok(s) => s,
            Err(FetchError::NotFound(m)) => {
                return Ok(Entry::Unknown {
                    message: format!("schema id {id} is not in the registry: {m}"),
                    until: Instant::now() + UNKNOWN_FOR,
                })
            }
            Err(FetchError::Unusable(m)) => return Ok(Entry::Invalid(m)),
            Err(FetchError::Unavailable(m)) => return Err(m),
        };
        // The references, depth first, each once.
        let mut refs = Vec::new();
        let mut queue = main.references.clone();
        let mut seen = std::collections::HashSet::new();
        while let Some(r) = queue.pop() {
            if !seen.insert((r.subject.clone(), r.version)) {
                continue;
            }
            if seen.len() > 64 {
                return Ok(Entry::Invalid(format!(
                    "schema id {id} references more than 64 schemas"
                )));
            }
            match self.registry.subject_version(&r.subject, r.version).await {
                Ok(s) => {
                    queue.extend(s.references.iter().cloned());
                    refs.push((r.name.clone(), s));
                }
                Err(FetchError::NotFound(m) | FetchError::Unusable(m)) => {
                    return Ok(Entry::Invalid(format!(
                        "schema id {id} references {} (subject {} version {}), which the registry does not have or sluice cannot use: {m}",
                        r.name, r.subject, r.version
                    )))
                }
                Err(FetchError::Unavailable(m)) => return Err(m),
            }
        }
        // Registry answers are untrusted input to the compilers: a panic in one is this
        // schema's failure, not the lane's.
        let compiled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Compiled::new(&main, &refs)))
                .unwrap_or_else(|_| Err("compiling it panicked".into()));
        Ok(match compiled {
            Ok(c) => {
                tracing::info!(
                    id,
                    kind = c.kind(),
                    registry = self.registry.url(),
                    "schema fetched"
                );
                Entry::Ready(Arc::new(c))
            }
            Err(e) => Entry::Invalid(format!("schema id {id}: {e}")),
        })
    }

    /// The record with its value decoded into JSON.
    fn decode(&self, r: &Record) -> Result<Option<Record>, ProcessError> {
        let Some(value) = r.value.as_ref() else {
            return Ok(None);
        };
        let wire = WireValue::parse(value)
            .map_err(|m| ProcessError::new("not_wire_format", m).at("decode"))?;
        let entry = self.cache.read().unwrap().get(&wire.id).cloned();
        let compiled = match entry {
            Some(Entry::Ready(c)) => c,
            Some(Entry::Unknown { message, .. }) => {
                return Err(ProcessError::new("schema_unknown", message).at("decode"))
            }
            Some(Entry::Invalid(message)) => {
                return Err(ProcessError::new("schema_invalid", message).at("decode"))
            }
            None => {
                return Err(ProcessError::new(
                    "schema_unknown",
                    format!("schema id {} was not fetched", wire.id),
                )
                .at("decode"))
            }
        };
        let json = compiled.decode(&wire).map_err(|m| {
            ProcessError::new(
                "schema_decode",
                format!("the value does not decode with schema id {}: {m}", wire.id),
            )
            .at("decode")
        })?;
        let mut out = r.clone();
        out.value = Some(Bytes::from(json));
        Ok(Some(out))
    }
}

impl Processor for Decoding {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn process(&self, record: &Record, out: &mut Vec<Output>) -> Result<(), ProcessError> {
        match self.decode(record)? {
            Some(decoded) => self.inner.process(&decoded, out),
            None => self.inner.process(record, out),
        }
    }

    fn prepare<'a>(&'a self, records: &'a [Record]) -> Option<BoxFuture<'a, Result<(), Unready>>> {
        let missing = self.missing(records);
        let inner = self.inner.prepare(records);
        if missing.is_empty() && inner.is_none() {
            return None;
        }
        Some(Box::pin(async move {
            for id in missing {
                match self.fetch(id).await {
                    Ok(entry) => {
                        if let Entry::Unknown { message, .. } | Entry::Invalid(message) = &entry {
                            tracing::warn!(id, error = %message, "schema not usable; its records go to the dead-letter path");
                        }
                        let mut cache = self.cache.write().unwrap();
                        // Ids come from record bytes: garbage must not grow the cache
                        // without end. Forgetting what is unknown costs only a lookup.
                        if cache.len() >= CACHE_MAX {
                            cache.retain(|_, e| matches!(e, Entry::Ready(_)));
                        }
                        cache.insert(id, entry);
                    }
                    Err(message) => {
                        return Err(Unready {
                            message: format!("schema registry unreachable: {message}"),
                            wait: UNREACHABLE_WAIT,
                        })
                    }
                }
            }
            match inner {
                Some(f) => f.await,
                None => Ok(()),
            }
        }))
    }
}
