//! The batcher: one per sink. Collects outputs from every worker and flushes them to the
//! sink on `maxMessages`, `maxBytes` or `linger`, whichever comes first.
//!
//! [`Batcher`] is the pure core (no clock of its own: the caller passes `now`);
//! [`run_batcher`] is the task that feeds it from a channel and drives the linger timer.

use std::time::{Duration, Instant as StdInstant};

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::engine::ack::AckToken;
use crate::record::{Origin, Output};
use crate::sink::{DynSink, SinkBatch};

/// Why a batch was flushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushReason {
    /// `maxMessages` reached.
    Count,
    /// `maxBytes` reached.
    Bytes,
    /// The oldest output waited `linger`.
    Linger,
    /// The input closed (shutdown).
    Close,
}

/// Flush limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Outputs per batch.
    pub max_messages: usize,
    /// Payload bytes per batch.
    pub max_bytes: usize,
    /// Longest wait of the first output.
    pub linger: Duration,
}

/// Pure batching state over items of type `T`.
#[derive(Debug)]
pub struct Batcher<T> {
    limits: Limits,
    items: Vec<T>,
    bytes: usize,
    opened: Option<Instant>,
    /// A slowly decaying maximum of the batch sizes: the capacity each batch starts with,
    /// so that a batch rarely grows (and moves) its items.
    size_hint: usize,
}

impl<T> Batcher<T> {
    /// An empty batcher.
    pub fn new(limits: Limits) -> Self {
        Batcher {
            limits,
            items: Vec::new(),
            bytes: 0,
            opened: None,
            size_hint: 0,
        }
    }

    /// Add an item of `bytes` at `now`; returns the reason when the batch is now full.
    pub fn push(&mut self, item: T, bytes: usize, now: Instant) -> Option<FlushReason> {
        if self.items.is_empty() {
            self.opened = Some(now);
        }
        self.items.push(item);
        self.bytes += bytes;
        if self.items.len() >= self.limits.max_messages {
            Some(FlushReason::Count)
        } else if self.bytes >= self.limits.max_bytes {
            Some(FlushReason::Bytes)
        } else {
            None
        }
    }

    /// When the current batch must be flushed for linger, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened.map(|t| t + self.limits.linger)
    }

    /// Whether the linger deadline has passed at `now`.
    pub fn is_due(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// No items waiting.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Take the batch and its byte count, leaving the batcher empty.
    pub fn take(&mut self) -> (Vec<T>, usize) {
        self.opened = None;
        // Growing a vector of outputs element by element copies it several times over:
        // it was most of what the batcher cost per record.
        self.size_hint = self
            .items
            .len()
            .max(self.size_hint - self.size_hint / 8)
            .min(self.limits.max_messages);
        let cap = self.size_hint.max(64);
        (
            std::mem::replace(&mut self.items, Vec::with_capacity(cap)),
            std::mem::take(&mut self.bytes),
        )
    }
}

/// What workers send to a sink's batcher: the outputs of some records, and the token
/// that completes when the sink has acknowledged them.
#[derive(Debug)]
pub struct Piece {
    /// Outputs, each with the source record it came from.
    pub outputs: Vec<(Output, Origin)>,
    /// Owed back once every output here is acknowledged.
    pub token: AckToken,
}

/// Run one sink's batcher until `rx` closes, then flush what is left.
pub async fn run_batcher(
    mut rx: mpsc::Receiver<Piece>,
    sink: DynSink,
    limits: Limits,
    metrics: crate::ops::metrics::Metrics,
) {
    let mut batcher: Batcher<(Output, Origin)> = Batcher::new(limits);
    let mut tokens: Vec<AckToken> = Vec::new();
    let size_hist = metrics
        .batch_size
        .with_label_values(&[metrics.pipeline(), sink.name()]);
    let flush = |batcher: &mut Batcher<(Output, Origin)>, tokens: &mut Vec<AckToken>| {
        let (items, bytes) = batcher.take();
        size_hist.observe(items.len() as f64);
        SinkBatch {
            items,
            bytes,
            tokens: std::mem::take(tokens),
            created: StdInstant::now(),
        }
    };
    loop {
        let deadline = batcher.deadline();
        let piece = tokio::select! {
            biased;
            p = rx.recv() => p,
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                let b = flush(&mut batcher, &mut tokens);
                sink.deliver(b).await;
                continue;
            }
        };
        let Some(piece) = piece else { break };
        let Piece { outputs, token } = piece;
        if outputs.is_empty() {
            token.ack();
            continue;
        }
        let n = outputs.len();
        tokens.push(token.clone());
        // One clock reading per piece, not per output.
        let now = Instant::now();
        for (i, (out, ts)) in outputs.into_iter().enumerate() {
            let bytes = out.payload_len();
            if batcher.push((out, ts), bytes, now).is_some() {
                let b = flush(&mut batcher, &mut tokens);
                sink.deliver(b).await;
                if i + 1 < n {
                    tokens.push(token.clone());
                }
            }
        }
        token.ack();
        if batcher.is_due(Instant::now()) {
            let b = flush(&mut batcher, &mut tokens);
            sink.deliver(b).await;
        }
    }
    if !batcher.is_empty() {
        let b = flush(&mut batcher, &mut tokens);
        sink.deliver(b).await;
    }
    debug_assert!(tokens.is_empty());
    for t in tokens {
        t.ack();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_messages: 3,
            max_bytes: 100,
            linger: Duration::from_millis(5),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_on_count() {
        let mut b = Batcher::new(limits());
        let now = Instant::now();
        assert_eq!(b.push(1, 1, now), None);
        assert_eq!(b.push(2, 1, now), None);
        assert_eq!(b.push(3, 1, now), Some(FlushReason::Count));
        assert_eq!(b.take().0, vec![1, 2, 3]);
        assert!(b.is_empty() && b.deadline().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_on_bytes_before_count() {
        let mut b = Batcher::new(limits());
        let now = Instant::now();
        assert_eq!(b.push(1, 60, now), None);
        assert_eq!(b.push(2, 40, now), Some(FlushReason::Bytes));
        assert_eq!(b.take(), (vec![1, 2], 100));
    }

    #[tokio::test(start_paused = true)]
    async fn linger_counts_from_the_first_item() {
        let mut b = Batcher::new(limits());
        let t0 = Instant::now();
        b.push(1, 1, t0);
        tokio::time::advance(Duration::from_millis(4)).await;
        b.push(2, 1, Instant::now());
        assert!(!b.is_due(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(b.is_due(Instant::now()));
        assert_eq!(b.deadline(), Some(t0 + Duration::from_millis(5)));
        b.take();
        b.push(3, 1, Instant::now());
        assert_eq!(
            b.deadline(),
            Some(Instant::now() + Duration::from_millis(5))
        );
    }

    struct Counting {
        batches: std::sync::Mutex<Vec<usize>>,
        metrics: crate::sink::SinkMetrics,
    }

    impl crate::sink::Sink for Counting {
        fn name(&self) -> &str {
            "counting"
        }
        fn deliver(&self, batch: SinkBatch) -> futures::future::BoxFuture<'_, ()> {
            self.batches.lock().unwrap().push(batch.items.len());
            batch.acknowledge(&self.metrics);
            Box::pin(async {})
        }
        fn flush(&self, _: Duration) -> futures::future::BoxFuture<'_, bool> {
            Box::pin(async { true })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_batcher_task_flushes_on_linger_and_splits_at_max_messages() {
        use crate::engine::ack::BatchAck;
        use crate::engine::partition::{NoControl, PartitionState};
        use std::sync::Arc;
        let m = crate::ops::metrics::Metrics::new("t");
        let st = PartitionState::for_test("t", &m, Arc::new(NoControl));
        let sink = Arc::new(Counting {
            batches: Default::default(),
            metrics: crate::sink::SinkMetrics::new(&m, "counting"),
        });
        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(run_batcher(rx, sink.clone(), limits(), m.clone()));

        st.register(0, 0).unwrap();
        let token = BatchAck::open(st.clone(), 0, 1, None);
        tx.send(Piece {
            outputs: vec![(Output::default(), Origin::default())],
            token,
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(4)).await;
        assert!(
            sink.batches.lock().unwrap().is_empty(),
            "nothing before linger"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(*sink.batches.lock().unwrap(), vec![1]);
        assert_eq!(
            st.watermark(),
            Some(1),
            "acknowledged batch completes its offsets"
        );

        // Seven outputs of one record range: split 3 + 3 + 1, acknowledged only when all are.
        st.register(1, 1).unwrap();
        let token = BatchAck::open(st.clone(), 1, 1, None);
        tx.send(Piece {
            outputs: vec![(Output::default(), Origin::default()); 7],
            token,
        })
        .await
        .unwrap();
        drop(tx);
        task.await.unwrap();
        assert_eq!(*sink.batches.lock().unwrap(), vec![1, 3, 3, 1]);
        assert_eq!(st.watermark(), Some(2));
    }
}
