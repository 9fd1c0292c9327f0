//! Processors turn one input record into zero, one or many outputs.
//!
//! Implement [`Processor`] for custom logic and hand it to [`crate::run`]; the built-in
//! ones are selected by the `processor` field of the configuration.

mod jq;
mod passthrough;

pub use jq::{CompileError, Jq};
pub use passthrough::{Delay, Passthrough};

use crate::record::{Output, Record};

/// Why a processor could not handle a record. The record is not skipped: it goes to the
/// dead-letter path, or, without one, its partition stops advancing.
#[derive(Debug, thiserror::Error)]
#[error("{class}: {message}")]
pub struct ProcessError {
    /// A short, bounded class for metrics and headers (e.g. `not_json`).
    pub class: &'static str,
    /// A human-readable message.
    pub message: String,
    /// The stage that failed, when it is not the processor itself (`decode`: the
    /// source's format); it names the stage in the dead letter.
    pub stage: Option<&'static str>,
}

impl ProcessError {
    /// A new error of `class`.
    pub fn new(class: &'static str, message: impl Into<String>) -> Self {
        ProcessError {
            class,
            message: message.into(),
            stage: None,
        }
    }

    /// The same error, of stage `stage`.
    pub fn at(mut self, stage: &'static str) -> Self {
        self.stage = Some(stage);
        self
    }
}

/// The processing step of a pipeline.
///
/// It runs on the worker pool: many calls may run at once on different records (never
/// on the same record), so implementations are `Send + Sync` and keep per-record state on
/// the stack. It is synchronous on purpose: the pool calls it in a tight loop over a batch
/// of records; blocking I/O belongs in a sink.
pub trait Processor: Send + Sync + 'static {
    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;

    /// Push the outputs for `record` onto `out`. Pushing nothing filters the record out;
    /// it still counts as done.
    fn process(&self, record: &Record, out: &mut Vec<Output>) -> Result<(), ProcessError>;

    /// Make ready for a batch before [`Processor::process`] runs over its records: fetch
    /// what they need from a service (the schemas of a schema registry). `None` (the
    /// default): nothing to fetch. `Err`: the service cannot be reached; the lane holds
    /// the batch, waits [`Unready::wait`] and asks again: the records are never failed
    /// for it.
    fn prepare<'a>(
        &'a self,
        _records: &'a [Record],
    ) -> Option<futures::future::BoxFuture<'a, Result<(), Unready>>> {
        None
    }
}

/// Why [`Processor::prepare`] could not make ready: a service is unreachable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unready {
    /// What failed.
    pub message: String,
    /// How long to wait before asking again.
    pub wait: std::time::Duration,
}
