//! Sinks: where outputs are delivered. Each sink gets its own batcher
//! ([`crate::engine::batcher::run_batcher`]) and acknowledges whole batches.

pub mod http;
pub mod kafka;
pub mod kafka_txn;
pub mod null;
pub mod postgres;
pub mod produce;
pub mod stdout;
pub mod tls;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;

use crate::deadletter::{DeadLetters, Letter};
use crate::engine::ack::AckToken;
use crate::ops::latency::{LatencyHistogram, LocalLatency};
use crate::ops::metrics::Metrics;
use crate::record::{Origin, Output};

/// A flushed batch on its way to a sink.
#[derive(Debug)]
pub struct SinkBatch {
    /// Outputs, each with the source record it came from.
    pub items: Vec<(Output, Origin)>,
    /// Payload bytes of the outputs.
    pub bytes: usize,
    /// Owed back when every output is acknowledged.
    pub tokens: Vec<AckToken>,
    /// When the batch was flushed.
    pub created: Instant,
}

impl SinkBatch {
    /// Every output is acknowledged: record latency and release the tokens.
    pub fn acknowledge(self, metrics: &SinkMetrics) {
        let now_ms = now_ms();
        // A local histogram: one flush of atomics per batch, not per output.
        let mut local = metrics.end_to_end.local();
        for (_, origin) in &self.items {
            observe_latency(&mut local, now_ms, origin);
        }
        local.flush();
        metrics.outputs.inc_by(self.items.len() as u64);
        for t in self.tokens {
            t.ack();
        }
    }

    /// Some output cannot be delivered and cannot be dead-lettered: its records must not
    /// be committed.
    pub fn fail(self) {
        for t in self.tokens {
            t.fail();
        }
    }

    /// The attempt failed as a whole and is retried (an exactly-once window that is
    /// aborted and rewound): nothing of the batch is completed, nothing stalls.
    pub fn abort(self) {
        for t in self.tokens {
            t.abort();
        }
    }

    /// Settle the batch: the outputs at the indexes of `rejected` failed for good and go
    /// to the dead-letter path; every other output is stored. The tokens are released
    /// when the letters are stored (or failed, which stalls their partitions).
    pub fn settle(
        self,
        rejected: Vec<(usize, SinkFailure)>,
        sink: &str,
        metrics: &SinkMetrics,
        dead_letters: &Arc<DeadLetters>,
    ) {
        if rejected.is_empty() {
            return self.acknowledge(metrics);
        }
        let now_ms = now_ms();
        let mut failed = vec![false; self.items.len()];
        for (i, _) in &rejected {
            if let Some(f) = failed.get_mut(*i) {
                *f = true;
            }
        }
        let mut stored = 0;
        let mut local = metrics.end_to_end.local();
        for (i, (_, origin)) in self.items.iter().enumerate() {
            if !failed[i] {
                observe_latency(&mut local, now_ms, origin);
                stored += 1;
            }
        }
        local.flush();
        metrics.outputs.inc_by(stored);
        let SinkBatch { items, tokens, .. } = self;
        // Count each rejection against its source partition (`stage="sink"`).
        for (i, _) in &rejected {
            if let Some((_, origin)) = items.get(*i) {
                if let Some(t) = tokens.iter().find(|t| {
                    let tp = t.partition().tp();
                    tp.partition == origin.partition && tp.topic == origin.topic
                }) {
                    t.partition().metrics.failed_sink.inc();
                }
            }
        }
        let letters = rejected
            .into_iter()
            .filter_map(|(i, f)| {
                let (o, origin) = items.get(i)?;
                Some(Letter {
                    origin: origin.clone(),
                    key: o.key.clone(),
                    value: o.value.clone(),
                    headers: o.headers.clone(),
                    stage: sink.to_string(),
                    class: f.class,
                    message: f.message,
                    attempts: f.attempts,
                })
            })
            .collect();
        dead_letters.park(letters, tokens);
    }
}

/// Why a sink gave up on an output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkFailure {
    /// A short, bounded class (`constraint`, `record_too_large`, `retries_exhausted`, ...).
    pub class: &'static str,
    /// The sink's error message.
    pub message: String,
    /// Attempts made.
    pub attempts: u32,
}

fn observe_latency(end_to_end: &mut LocalLatency<'_>, now_ms: i64, origin: &Origin) {
    if let Some(ts) = origin.timestamp_ms {
        end_to_end.observe_ms(now_ms.saturating_sub(ts).max(0) as u64);
    }
}

/// Wall-clock milliseconds since the epoch (record timestamps use this clock).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Metric handles of one sink.
#[derive(Clone, Debug)]
pub struct SinkMetrics {
    /// Record timestamp to acknowledgement.
    pub end_to_end: LatencyHistogram,
    /// Outputs acknowledged.
    pub outputs: prometheus::IntCounter,
    /// Outputs sent again after a transient error.
    pub retries: prometheus::IntCounter,
}

impl SinkMetrics {
    /// Resolve the handles for sink `name`.
    pub fn new(metrics: &Metrics, name: &str) -> Self {
        let l = [metrics.pipeline(), name];
        SinkMetrics {
            end_to_end: metrics.end_to_end_latency.with_label_values(&l),
            outputs: metrics.sink_outputs.with_label_values(&l),
            retries: metrics.sink_retries.with_label_values(&l),
        }
    }
}

/// A destination for outputs.
pub trait Sink: Send + Sync + 'static {
    /// A short, bounded name for metrics (`kafka`, `null`, ...).
    fn name(&self) -> &str;

    /// Take a batch. The future resolves once the sink has accepted it (which may be
    /// before it is acknowledged); the sink calls [`SinkBatch::acknowledge`] once every
    /// output is safely stored, or [`SinkBatch::fail`] when it never will be.
    fn deliver(&self, batch: SinkBatch) -> BoxFuture<'_, ()>;

    /// Wait until every accepted batch is acknowledged or failed, up to `timeout`.
    /// Returns false when something is still outstanding.
    fn flush(&self, timeout: std::time::Duration) -> BoxFuture<'_, bool>;
}

/// A shared sink.
pub type DynSink = Arc<dyn Sink>;
