//! Shared state of one assigned partition: its offset tracker, its channel depth and
//! flow control, its stall flag and its metric handles.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use crate::backpressure::{FlowAction, FlowControl, HoldReason, WaterMarks};
use crate::metrics::PartitionMetrics;
use crate::offsets::{OffsetTracker, TrackerError};

/// Pauses and resumes fetching of a partition (the consumer, or nothing in benchmarks).
pub trait PartitionControl: Send + Sync + 'static {
    /// Stop fetching `topic`/`partition`.
    fn pause(&self, topic: &str, partition: i32);
    /// Fetch `topic`/`partition` again.
    fn resume(&self, topic: &str, partition: i32);
}

/// A [`PartitionControl`] that does nothing (in-memory engine, tests).
#[derive(Debug, Default)]
pub struct NoControl;

impl PartitionControl for NoControl {
    fn pause(&self, _: &str, _: i32) {}
    fn resume(&self, _: &str, _: i32) {}
}

/// One assigned partition.
pub struct PartitionState {
    /// Source topic.
    pub topic: Arc<str>,
    /// Source partition.
    pub partition: i32,
    /// Metric handles.
    pub metrics: PartitionMetrics,
    tracker: Mutex<OffsetTracker>,
    changed: Notify,
    depth: AtomicUsize,
    flow: Mutex<FlowControl>,
    marks: WaterMarks,
    control: Arc<dyn PartitionControl>,
    stalled: AtomicBool,
    processing_latency: prometheus::Histogram,
}

impl std::fmt::Debug for PartitionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionState")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}

impl PartitionState {
    /// State for a newly assigned partition.
    pub fn new(
        topic: Arc<str>,
        partition: i32,
        queue_capacity: usize,
        control: Arc<dyn PartitionControl>,
        metrics: PartitionMetrics,
        processing_latency: prometheus::Histogram,
    ) -> Arc<Self> {
        metrics.stalled.set(0);
        metrics.paused.set(0);
        metrics.depth.set(0);
        Arc::new(PartitionState {
            topic,
            partition,
            metrics,
            tracker: Mutex::new(OffsetTracker::new()),
            changed: Notify::new(),
            depth: AtomicUsize::new(0),
            flow: Mutex::new(FlowControl::default()),
            marks: WaterMarks::for_capacity(queue_capacity),
            control,
            stalled: AtomicBool::new(false),
            processing_latency,
        })
    }

    /// Register a dispatched range with the tracker.
    pub fn register(&self, first: i64, last: i64) -> Result<(), TrackerError> {
        self.tracker
            .lock()
            .expect("tracker lock")
            .register(first, last)
    }

    pub(crate) fn batch_done(&self, first: i64, records: usize, dispatched_at: Instant) {
        let res = self.tracker.lock().expect("tracker lock").complete(first);
        if let Err(e) = res {
            tracing::error!(topic = %self.topic, partition = self.partition, error = %e, "offset tracker refused a completion; the partition stops advancing");
            self.set_stalled();
        }
        self.metrics.delivered.inc_by(records as u64);
        self.processing_latency
            .observe(dispatched_at.elapsed().as_secs_f64());
        self.changed.notify_waiters();
    }

    pub(crate) fn batch_failed(&self, first: i64) {
        if !self.stalled.load(Ordering::Relaxed) {
            tracing::error!(topic = %self.topic, partition = self.partition, offset = first,
                "a batch could not be completed; the partition stops advancing at or before this offset (no record is skipped)");
        }
        self.set_stalled();
        self.changed.notify_waiters();
    }

    fn set_stalled(&self) {
        if !self.stalled.swap(true, Ordering::Relaxed) {
            self.metrics.stalled.set(1);
            self.hold(HoldReason::Stalled, true);
        }
    }

    /// Mark the partition stalled from outside the ack path (e.g. a record reached the
    /// consumer's main queue and cannot be tracked).
    pub fn stall(&self, why: &str) {
        tracing::error!(topic = %self.topic, partition = self.partition, %why, "partition stalled; it stops advancing");
        self.set_stalled();
        self.changed.notify_waiters();
    }

    /// True once a record of this partition failed for good: the watermark cannot pass it.
    pub fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// The offset to commit, if anything completed.
    pub fn watermark(&self) -> Option<i64> {
        self.tracker.lock().expect("tracker lock").watermark()
    }

    /// Nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.tracker.lock().expect("tracker lock").is_idle()
    }

    /// Records dispatched into the channel.
    pub fn enqueued(&self, n: usize) {
        let d = self.depth.fetch_add(n, Ordering::AcqRel) + n;
        self.metrics.depth.set(d as i64);
        self.update_queue_full(d);
    }

    /// Records taken out of the channel by a worker.
    pub fn dequeued(&self, n: usize) {
        let d = self.depth.fetch_sub(n, Ordering::AcqRel) - n;
        self.metrics.depth.set(d as i64);
        self.update_queue_full(d);
    }

    fn update_queue_full(&self, depth: usize) {
        let mut flow = self.flow.lock().expect("flow lock");
        let holding = flow.holds(HoldReason::QueueFull);
        let want = self.marks.queue_full(depth, holding);
        if want != holding {
            let action = flow.set(HoldReason::QueueFull, want);
            self.apply(action, &flow);
        }
    }

    /// Hold or release the partition for `reason`.
    pub fn hold(&self, reason: HoldReason, on: bool) {
        let mut flow = self.flow.lock().expect("flow lock");
        let action = flow.set(reason, on);
        self.apply(action, &flow);
    }

    // Called with the flow lock held, so pause and resume reach the consumer in the order
    // the decisions were made.
    fn apply(&self, action: Option<FlowAction>, flow: &FlowControl) {
        match action {
            Some(FlowAction::Pause) => self.control.pause(&self.topic, self.partition),
            Some(FlowAction::Resume) => self.control.resume(&self.topic, self.partition),
            None => {}
        }
        self.metrics.paused.set(flow.is_paused() as i64);
    }

    /// Wait until nothing is in flight (or the partition stalled, or `deadline` passed).
    /// Returns true when idle.
    pub async fn wait_idle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_idle() {
                return true;
            }
            if self.is_stalled() {
                return false;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.is_idle();
            }
        }
    }
}
