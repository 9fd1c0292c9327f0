//! The engine: what happens to a record between its source and its sinks, with no Kafka
//! in it. Per partition a dispatcher ([`dispatch`]) hands batches to worker lanes
//! ([`lanes`], [`pool`]) that run the processor, each sink's batcher ([`batcher`]) cuts
//! the outputs into sink batches, and completion tokens ([`ack`]) mark ranges done in the
//! partition's offset tracker ([`offsets`], [`partition`]); [`backpressure`] pauses the
//! partition while its lanes are full or the byte budget is spent.
//!
//! [`Engine`] wires these pieces to caller-supplied sinks with no broker (the engine
//! benchmark and the data-path tests drive it); the Kafka pipeline wires the same pieces
//! to a consumer (`pipeline.rs`), and both start the sinks' batchers with [`SinkSet`].

pub mod ack;
pub mod backpressure;
pub mod batcher;
pub mod dispatch;
pub mod gate;
pub mod lanes;
pub mod offsets;
pub mod partition;
pub mod pool;
pub mod registry;

pub use lanes::DISPATCH_BATCH;

use std::sync::Arc;
use std::time::Duration;

use sluice_api::config::{BatchingConfig, WorkersConfig};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::deadletter::DeadLetters;
use crate::engine::backpressure::ByteBudget;
use crate::engine::batcher::{run_batcher, Limits, Piece};
use crate::engine::dispatch::PartitionDispatch;
use crate::engine::lanes::lane_geometry;
use crate::engine::partition::{Incarnation, NoControl, PartitionState, TopicPartition};
use crate::engine::pool::spawn_workers;
use crate::ops::metrics::Metrics;
use crate::processor::Processor;
use crate::sink::DynSink;

/// Every sink's batcher, started: the senders the worker lanes fan outputs out to (one
/// per sink, in sink order) and the batcher tasks (each ends once its sender is gone and
/// it flushed what it held).
pub struct SinkSet {
    /// One per sink.
    pub senders: Arc<[mpsc::Sender<Piece>]>,
    /// One per sink.
    pub batchers: Vec<JoinHandle<()>>,
}

impl SinkSet {
    /// Start a batcher with `batching`'s limits for each of `sinks`.
    pub fn spawn(
        sinks: impl IntoIterator<Item = DynSink>,
        batching: &BatchingConfig,
        metrics: &Metrics,
    ) -> Self {
        let limits = Limits {
            max_messages: batching.max_messages as usize,
            max_bytes: batching.max_bytes.0 as usize,
            linger: batching.linger.0,
        };
        let mut senders = Vec::new();
        let mut batchers = Vec::new();
        for sink in sinks {
            let (tx, rx) = mpsc::channel(256);
            senders.push(tx);
            batchers.push(tokio::spawn(tracing::Instrument::in_current_span(
                run_batcher(rx, sink, limits, metrics.clone()),
            )));
        }
        SinkSet {
            senders: senders.into(),
            batchers,
        }
    }
}

/// Partitions fed directly by the caller.
pub struct Engine {
    lanes: Vec<PartitionDispatch>,
    senders: Option<Arc<[mpsc::Sender<Piece>]>>,
    batchers: Vec<JoinHandle<()>>,
    /// The metrics the engine reports to.
    pub metrics: Metrics,
    /// Where failed records go.
    pub dead_letters: Arc<DeadLetters>,
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    /// `partitions` partitions of topic `topic`, each with its pool, delivering to `sinks`.
    /// Failed records go to `dead_letters` (e.g. [`DeadLetters::memory`], or
    /// [`DeadLetters::stall`] to stall their partition).
    pub fn new(
        topic: &str,
        partitions: i32,
        workers: &WorkersConfig,
        batching: &BatchingConfig,
        in_flight_bytes: u64,
        processor: Arc<dyn Processor>,
        sinks: Vec<DynSink>,
        dead_letters: Arc<DeadLetters>,
    ) -> Self {
        let metrics = Metrics::new("engine");
        let SinkSet { senders, batchers } = SinkSet::spawn(sinks, batching, &metrics);
        let budget = ByteBudget::new(in_flight_bytes);
        let (lanes_per_partition, slots) = lane_geometry(workers);
        let lanes = (0..partitions)
            .map(|p| {
                let state = PartitionState::new(
                    Incarnation::new(TopicPartition::new(topic, p), 0),
                    workers.queue_capacity as usize,
                    Arc::new(NoControl),
                    metrics.partition(topic, p),
                    metrics.processing_latency.clone(),
                );
                let (txs, _) = spawn_workers(
                    &state,
                    lanes_per_partition,
                    slots,
                    processor.clone(),
                    senders.clone(),
                    dead_letters.clone(),
                );
                PartitionDispatch::new(state, txs, workers.ordering, budget.clone())
            })
            .collect();
        Engine {
            lanes,
            senders: Some(senders),
            batchers,
            metrics,
            dead_letters,
        }
    }

    /// Dispatch a batch of records (in offset order) of `partition`.
    pub async fn feed(&mut self, partition: usize, records: Vec<crate::record::Record>) {
        self.lanes[partition].dispatch(records).await;
    }

    /// The state of `partition` (tracker watermark, stall flag, ...).
    pub fn partition(&self, partition: usize) -> &Arc<PartitionState> {
        self.lanes[partition].state()
    }

    /// Wait until every partition is idle (or stalled), up to `timeout`.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut all = true;
        for l in &self.lanes {
            all &= l.state().wait_idle(deadline).await;
        }
        all
    }

    /// Close the lanes and batchers, flushing what they hold.
    pub async fn close(mut self) {
        self.lanes.clear();
        self.senders.take();
        for b in self.batchers.drain(..) {
            let _ = b.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processor::{ProcessError, Processor};
    use crate::record::{Output, Record};
    use crate::sink::{Sink, SinkBatch, SinkMetrics};
    use bytes::Bytes;
    use futures::future::BoxFuture;
    use sluice_api::config::Ordering;
    use std::sync::Mutex;

    /// Records every output (key, value) in arrival order.
    struct Recording {
        seen: Mutex<Vec<(Bytes, Bytes)>>,
        metrics: SinkMetrics,
        fail_when: Option<&'static [u8]>,
        /// Reject (rather than fail) the matching outputs, through this dead-letter path.
        reject_to: Option<Arc<DeadLetters>>,
    }

    impl Sink for Recording {
        fn name(&self) -> &str {
            "recording"
        }
        fn deliver(&self, batch: SinkBatch) -> BoxFuture<'_, ()> {
            let bad = self.fail_when.is_some_and(|needle| {
                batch
                    .items
                    .iter()
                    .any(|(o, _)| o.value.as_deref() == Some(needle))
            });
            if bad && self.reject_to.is_some() {
                let rejected = batch
                    .items
                    .iter()
                    .enumerate()
                    .filter(|(_, (o, _))| o.value.as_deref() == self.fail_when)
                    .map(|(i, _)| {
                        (
                            i,
                            crate::sink::SinkFailure {
                                class: "constraint",
                                message: "rejected".into(),
                                attempts: 1,
                            },
                        )
                    })
                    .collect();
                let mut seen = self.seen.lock().unwrap();
                for (o, _) in &batch.items {
                    if o.value.as_deref() != self.fail_when {
                        seen.push((
                            o.key.clone().unwrap_or_default(),
                            o.value.clone().unwrap_or_default(),
                        ));
                    }
                }
                drop(seen);
                let dl = self.reject_to.clone().unwrap();
                batch.settle(rejected, "recording", &self.metrics, &dl);
            } else if bad {
                batch.fail();
            } else {
                let mut seen = self.seen.lock().unwrap();
                for (o, _) in &batch.items {
                    seen.push((
                        o.key.clone().unwrap_or_default(),
                        o.value.clone().unwrap_or_default(),
                    ));
                }
                drop(seen);
                batch.acknowledge(&self.metrics);
            }
            Box::pin(async {})
        }
        fn flush(&self, _: Duration) -> BoxFuture<'_, bool> {
            Box::pin(async { true })
        }
    }

    struct FailOn(i32, i64);
    impl Processor for FailOn {
        fn name(&self) -> &'static str {
            "fail-on"
        }
        fn process(&self, r: &Record, out: &mut Vec<Output>) -> Result<(), ProcessError> {
            if (r.partition, r.offset) == (self.0, self.1) {
                return Err(ProcessError::new("test", "poison"));
            }
            crate::processor::Passthrough.process(r, out)
        }
    }

    fn record(p: i32, offset: i64, key: &str) -> Record {
        Record {
            topic: "t".into(),
            partition: p,
            offset,
            timestamp_ms: None,
            key: Some(Bytes::from(key.to_string())),
            value: Some(Bytes::from(format!("p{p}:{key}:{offset}"))),
            headers: vec![],
        }
    }

    fn workers(ordering: Ordering) -> WorkersConfig {
        WorkersConfig {
            per_partition: 4,
            queue_capacity: 64,
            ordering,
        }
    }

    fn batching() -> BatchingConfig {
        BatchingConfig {
            max_messages: 7,
            max_bytes: sluice_api::units::ByteSize(1 << 20),
            linger: sluice_api::units::HumanDuration::from_millis(1),
        }
    }

    fn recording(
        metrics: &Metrics,
        fail_when: Option<&'static [u8]>,
        reject_to: Option<Arc<DeadLetters>>,
    ) -> Arc<Recording> {
        Arc::new(Recording {
            seen: Mutex::new(Vec::new()),
            metrics: SinkMetrics::new(metrics, "recording"),
            fail_when,
            reject_to,
        })
    }

    async fn run(
        ordering: Ordering,
        processor: Arc<dyn Processor>,
        fail_when: Option<&'static [u8]>,
    ) -> (Engine, Vec<Arc<Recording>>) {
        run_with(ordering, processor, fail_when, false).await
    }

    async fn run_with(
        ordering: Ordering,
        processor: Arc<dyn Processor>,
        fail_when: Option<&'static [u8]>,
        dead_letter: bool,
    ) -> (Engine, Vec<Arc<Recording>>) {
        let m = Metrics::new("test");
        let dead_letters = if dead_letter {
            DeadLetters::memory(&m)
        } else {
            DeadLetters::stall(&m)
        };
        let reject_to = dead_letter.then(|| dead_letters.clone());
        let sinks = vec![
            recording(&m, fail_when, reject_to),
            recording(&m, None, None),
        ];
        let mut e = Engine::new(
            "t",
            2,
            &workers(ordering),
            &batching(),
            1 << 20,
            processor,
            sinks.iter().map(|s| s.clone() as DynSink).collect(),
            dead_letters,
        );
        for p in 0..2 {
            for chunk in 0..20 {
                let recs = (0..50)
                    .map(|i| record(p, chunk * 50 + i, &format!("k{}", i % 13)))
                    .collect();
                e.feed(p as usize, recs).await;
            }
        }
        (e, sinks)
    }

    #[tokio::test]
    async fn every_ordering_delivers_everything_to_every_sink_and_the_watermark_reaches_the_end() {
        for ordering in [Ordering::Partition, Ordering::Key, Ordering::Unordered] {
            let (e, sinks) = run(ordering, Arc::new(crate::processor::Passthrough), None).await;
            assert!(e.wait_idle(Duration::from_secs(10)).await, "{ordering:?}");
            for p in 0..2 {
                assert_eq!(e.partition(p).watermark(), Some(1000), "{ordering:?}");
            }
            for s in &sinks {
                assert_eq!(
                    s.seen.lock().unwrap().len(),
                    2000,
                    "{ordering:?}: fan-out reaches every sink"
                );
            }
            e.close().await;
        }
    }

    #[tokio::test]
    async fn key_ordering_keeps_each_keys_offsets_in_order() {
        let (e, sinks) = run(Ordering::Key, Arc::new(crate::processor::Passthrough), None).await;
        assert!(e.wait_idle(Duration::from_secs(10)).await);
        let seen = sinks[0].seen.lock().unwrap().clone();
        let mut last: std::collections::HashMap<String, i64> = Default::default();
        for (_, v) in seen {
            let v = String::from_utf8(v.to_vec()).unwrap();
            let (partition_and_key, off) = v.rsplit_once(':').unwrap();
            let off: i64 = off.parse().unwrap();
            if let Some(prev) = last.insert(partition_and_key.to_string(), off) {
                assert!(
                    prev < off,
                    "{partition_and_key}: offset {off} arrived after {prev}"
                );
            }
        }
        assert_eq!(last.len(), 2 * 13);
        e.close().await;
    }

    #[tokio::test]
    async fn a_processor_failure_stalls_only_its_partition_below_the_poison_record() {
        let (e, _) = run(Ordering::Key, Arc::new(FailOn(0, 420)), None).await;
        e.wait_idle(Duration::from_secs(5)).await;
        let poisoned = e.partition(0);
        assert!(poisoned.is_stalled());
        assert!(
            poisoned.watermark().unwrap_or(0) <= 420,
            "watermark {:?} passed the poison record",
            poisoned.watermark()
        );
        let healthy = e.partition(1);
        assert!(!healthy.is_stalled());
        assert_eq!(healthy.watermark(), Some(1000));
        e.close().await;
    }

    #[tokio::test]
    async fn a_sink_failure_never_lets_the_watermark_pass_the_failed_records() {
        let (e, _) = run(
            Ordering::Unordered,
            Arc::new(crate::processor::Passthrough),
            Some(b"p0:k1:601"),
        )
        .await;
        e.wait_idle(Duration::from_secs(5)).await;
        // A failed sink batch fails every record in it (other partitions' too, which then
        // stall as well: never skipped). Partition 0 must stop at or below offset 601.
        let s0 = e.partition(0);
        assert!(s0.is_stalled());
        assert!(
            s0.watermark().unwrap_or(0) <= 601,
            "watermark {:?}",
            s0.watermark()
        );
        e.close().await;
    }

    struct PanicOn(i32, i64);
    impl Processor for PanicOn {
        fn name(&self) -> &'static str {
            "panic-on"
        }
        fn process(&self, r: &Record, out: &mut Vec<Output>) -> Result<(), ProcessError> {
            out.push(Output {
                key: None,
                value: Some(Bytes::from_static(b"half-made")),
                headers: Vec::new(),
            });
            if (r.partition, r.offset) == (self.0, self.1) {
                panic!("poison at {}", r.offset);
            }
            out.clear();
            crate::processor::Passthrough.process(r, out)
        }
    }

    /// N14: a processor that panics fails its record (class `panic`, dead-lettered), and
    /// its lane goes on: the partition reaches the end.
    #[tokio::test]
    async fn a_processor_panic_dead_letters_its_record_and_the_lane_lives_on() {
        let (e, sinks) = run_with(Ordering::Partition, Arc::new(PanicOn(0, 420)), None, true).await;
        assert!(e.wait_idle(Duration::from_secs(10)).await);
        for p in 0..2 {
            assert!(!e.partition(p).is_stalled(), "partition {p} stalled");
            assert_eq!(e.partition(p).watermark(), Some(1000));
        }
        let letters = e.dead_letters.parked();
        assert_eq!(letters.len(), 1);
        let l = &letters[0];
        assert_eq!((l.origin.partition, l.origin.offset), (0, 420));
        assert_eq!((l.stage.as_str(), l.class), ("panic-on", "panic"));
        assert!(l.message.contains("poison at 420"), "{}", l.message);
        for s in &sinks {
            let seen = s.seen.lock().unwrap();
            assert_eq!(seen.len(), 1999);
            assert!(seen.iter().all(|(_, v)| &v[..] != b"half-made"));
        }
        e.close().await;
    }

    #[tokio::test]
    async fn with_a_dead_letter_path_a_processor_failure_is_parked_and_the_partition_moves_on() {
        let (e, sinks) = run_with(Ordering::Key, Arc::new(FailOn(0, 420)), None, true).await;
        assert!(e.wait_idle(Duration::from_secs(10)).await);
        for p in 0..2 {
            assert!(!e.partition(p).is_stalled());
            assert_eq!(e.partition(p).watermark(), Some(1000));
        }
        let letters = e.dead_letters.parked();
        assert_eq!(letters.len(), 1);
        let l = &letters[0];
        assert_eq!((l.origin.partition, l.origin.offset), (0, 420));
        assert_eq!((l.stage.as_str(), l.class), ("fail-on", "test"));
        assert_eq!(
            l.value.as_deref(),
            Some(&b"p0:k7:420"[..]),
            "the input record is parked"
        );
        for s in &sinks {
            assert_eq!(s.seen.lock().unwrap().len(), 1999);
        }
        e.close().await;
    }

    #[tokio::test]
    async fn a_sink_rejection_parks_only_the_rejected_output_and_the_watermark_reaches_the_end() {
        let (e, sinks) = run_with(
            Ordering::Unordered,
            Arc::new(crate::processor::Passthrough),
            Some(b"p0:k1:601"),
            true,
        )
        .await;
        assert!(e.wait_idle(Duration::from_secs(10)).await);
        for p in 0..2 {
            assert!(!e.partition(p).is_stalled());
            assert_eq!(e.partition(p).watermark(), Some(1000));
        }
        let letters = e.dead_letters.parked();
        assert_eq!(letters.len(), 1);
        assert_eq!(
            (letters[0].origin.partition, letters[0].origin.offset),
            (0, 601)
        );
        assert_eq!(
            (letters[0].stage.as_str(), letters[0].class),
            ("recording", "constraint")
        );
        assert_eq!(
            e.partition(0).metrics.failed_sink.get(),
            1,
            "counted against its partition"
        );
        assert_eq!(e.partition(1).metrics.failed_sink.get(), 0);
        assert_eq!(sinks[0].seen.lock().unwrap().len(), 1999);
        assert_eq!(
            sinks[1].seen.lock().unwrap().len(),
            2000,
            "the other sink got it"
        );
        e.close().await;
    }
}
