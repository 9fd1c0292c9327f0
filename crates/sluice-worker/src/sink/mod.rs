//! Sinks: where outputs are delivered. Each sink gets its own batcher
//! ([`crate::batcher::run_batcher`]) and acknowledges whole batches.

pub mod kafka;
pub mod null;
pub mod stdout;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;

use crate::ack::AckToken;
use crate::metrics::Metrics;
use crate::record::Output;

/// A flushed batch on its way to a sink.
#[derive(Debug)]
pub struct SinkBatch {
    /// Outputs with the source record timestamp (ms since the epoch).
    pub items: Vec<(Output, Option<i64>)>,
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
        for (_, ts) in &self.items {
            if let Some(ts) = ts {
                metrics
                    .end_to_end
                    .observe(((now_ms - ts).max(0) as f64) / 1000.0);
            }
        }
        metrics.outputs.inc_by(self.items.len() as u64);
        for t in self.tokens {
            t.ack();
        }
    }

    /// Some output cannot be delivered: its records must not be committed.
    pub fn fail(self) {
        for t in self.tokens {
            t.fail();
        }
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
    pub end_to_end: prometheus::Histogram,
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
