//! The `null` sink: acknowledges every batch at once and keeps nothing (benchmarks).

use futures::future::BoxFuture;

use super::{Sink, SinkBatch, SinkMetrics};

/// Acknowledge and discard.
#[derive(Debug)]
pub struct NullSink {
    metrics: SinkMetrics,
}

impl NullSink {
    /// A null sink reporting to `metrics`.
    pub fn new(metrics: SinkMetrics) -> Self {
        NullSink { metrics }
    }
}

impl Sink for NullSink {
    fn name(&self) -> &str {
        "null"
    }
    fn deliver(&self, batch: SinkBatch) -> BoxFuture<'_, ()> {
        batch.acknowledge(&self.metrics);
        Box::pin(async {})
    }
    fn flush(&self, _: std::time::Duration) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}
