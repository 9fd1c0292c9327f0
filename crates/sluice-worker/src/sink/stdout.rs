//! The `stdout` sink: one line per output (`key<TAB>value`, lossy UTF-8), for debugging.

use std::io::Write;

use futures::future::BoxFuture;

use super::{Sink, SinkBatch, SinkMetrics};

/// Print outputs on standard output.
#[derive(Debug)]
pub struct StdoutSink {
    metrics: SinkMetrics,
}

impl StdoutSink {
    /// A stdout sink reporting to `metrics`.
    pub fn new(metrics: SinkMetrics) -> Self {
        StdoutSink { metrics }
    }
}

impl Sink for StdoutSink {
    fn name(&self) -> &str {
        "stdout"
    }
    fn deliver(&self, batch: SinkBatch) -> BoxFuture<'_, ()> {
        let mut out = std::io::stdout().lock();
        let mut ok = true;
        for (o, _) in &batch.items {
            let key = o
                .key
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let val = o
                .value
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            ok &= writeln!(out, "{key}\t{val}").is_ok();
        }
        ok &= out.flush().is_ok();
        drop(out);
        if ok {
            batch.acknowledge(&self.metrics);
        } else {
            tracing::error!("stdout is closed; outputs cannot be delivered");
            batch.fail();
        }
        Box::pin(async {})
    }
    fn flush(&self, _: std::time::Duration) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}
