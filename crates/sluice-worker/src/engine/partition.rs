//! Shared state of one assigned partition: its offset tracker, its channel depth and
//! flow control, its stall flag and its metric handles.
//!
//! Each assignment of a partition is one *incarnation* with its own state and epoch. When
//! the partition is revoked, its state is retired: from then on nothing it does (a late
//! pause or resume from a worker or the budget, a completion) reaches the consumer, so
//! a later incarnation of the same partition is never paused by an older one.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use crate::engine::backpressure::{FlowAction, FlowControl, HoldReason, WaterMarks};
use crate::engine::offsets::{OffsetTracker, TrackerError};
use crate::ops::metrics::PartitionMetrics;

/// A partition of a topic.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: i32,
}

impl TopicPartition {
    /// `topic`/`partition`.
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// One assignment of a partition to this process: its own state, tracker and epoch. A
/// commit, a late pause or a redelivery belongs to the incarnation it was made for, so
/// the epoch travels with the partition instead of being looked up.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Incarnation {
    /// The partition.
    pub tp: TopicPartition,
    /// A number no earlier incarnation of any partition in this process had.
    pub epoch: u64,
}

impl Incarnation {
    /// Incarnation `epoch` of `tp`.
    pub fn new(tp: TopicPartition, epoch: u64) -> Self {
        Incarnation { tp, epoch }
    }
}

impl std::fmt::Display for Incarnation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.tp, self.epoch)
    }
}

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
    /// Which partition, and which of its incarnations.
    pub incarnation: Incarnation,
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
    /// Set (under the flow lock) when the incarnation ends: no pause/resume after it.
    retired: AtomicBool,
    /// When the dispatcher last received a record, or the partition was last released
    /// from a hold (ms on the process clock, see [`crate::clock::clock_ms`]).
    last_progress_ms: AtomicU64,
    /// Records waiting for this incarnation (from statistics: fetched and unread, or on
    /// the broker beyond the fetch position); -1 while unknown.
    fetch_behind: AtomicI64,
    /// The dispatcher waits to hand a batch to a full worker lane: the sinks hold the
    /// partition back (a slow sink, a database outage), on purpose, not a wedge.
    downstream: AtomicBool,
    /// The consumer's fetch position from statistics (past any transaction marker or
    /// aborted record it skipped); -1 while unknown.
    fetch_position: AtomicI64,
    /// What the dispatcher saw when its queue was empty: the end of what it had
    /// registered (the last registered offset + 1, if any) and librdkafka's application
    /// position then (past the markers and aborted records it served without handing
    /// them over); see [`PartitionState::commit_offset`].
    handed_over: Mutex<Option<(Option<i64>, i64)>>,
    /// Batches dispatched and neither completed nor failed yet.
    open_batches: AtomicUsize,
    /// Batches of this incarnation that failed (stalled, or aborted for a retry).
    failed_batches: AtomicUsize,
    /// The lowest first offset of a batch that failed for good (a record without a
    /// dead-letter path): where the partition stops. `i64::MAX`: none.
    failed_for_good_at: AtomicI64,
    /// Records at or past this offset are never dispatched (exactly-once: where an earlier
    /// incarnation stopped for good). `i64::MAX`: none.
    stop_at: AtomicI64,
    /// Records below this offset are never dispatched (`startFrom: latest`: the group
    /// started at the end of the log; `i64::MIN` when unset).
    start_at: AtomicI64,
    /// Its work is abandoned (an aborted exactly-once window): the lanes settle what is
    /// queued for it without processing it.
    cancelled: AtomicBool,
    /// Woken when the incarnation is cancelled (a dispatcher waiting for room in a full
    /// lane gives its batch up).
    on_cancel: Notify,
}

impl std::fmt::Debug for PartitionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionState")
            .field("incarnation", &self.incarnation)
            .finish_non_exhaustive()
    }
}

impl PartitionState {
    /// State for `incarnation` of a partition.
    pub fn new(
        incarnation: Incarnation,
        queue_capacity: usize,
        control: Arc<dyn PartitionControl>,
        metrics: PartitionMetrics,
        processing_latency: prometheus::Histogram,
    ) -> Arc<Self> {
        metrics.stalled.set(0);
        metrics.paused.set(0);
        metrics.depth.set(0);
        Arc::new(PartitionState {
            incarnation,
            metrics,
            tracker: Mutex::new(OffsetTracker::new()),
            changed: Notify::new(),
            depth: AtomicUsize::new(0),
            flow: Mutex::new(FlowControl::default()),
            marks: WaterMarks::for_capacity(queue_capacity),
            control,
            stalled: AtomicBool::new(false),
            processing_latency,
            retired: AtomicBool::new(false),
            last_progress_ms: AtomicU64::new(crate::clock::clock_ms()),
            fetch_behind: AtomicI64::new(-1),
            downstream: AtomicBool::new(false),
            fetch_position: AtomicI64::new(-1),
            handed_over: Mutex::new(None),
            open_batches: AtomicUsize::new(0),
            failed_batches: AtomicUsize::new(0),
            failed_for_good_at: AtomicI64::new(i64::MAX),
            stop_at: AtomicI64::new(i64::MAX),
            start_at: AtomicI64::new(i64::MIN),
            cancelled: AtomicBool::new(false),
            on_cancel: Notify::new(),
        })
    }

    /// The partition.
    pub fn tp(&self) -> &TopicPartition {
        &self.incarnation.tp
    }

    /// This incarnation's epoch.
    pub fn epoch(&self) -> u64 {
        self.incarnation.epoch
    }

    /// End this incarnation: from now on its flow control no longer pauses or resumes
    /// the partition in the consumer (a newer incarnation owns that).
    pub fn retire(&self) {
        let _flow = self.flow.lock().expect("flow lock");
        self.retired.store(true, Ordering::Release);
    }

    /// True once the incarnation ended.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// The last offset registered with the tracker, if any: records at or below it were
    /// received already, so a redelivery of them (a rewind) is dropped, not registered.
    pub fn last_registered(&self) -> Option<i64> {
        self.tracker.lock().expect("tracker lock").last_registered()
    }

    /// The dispatcher received records.
    pub fn fetched(&self) {
        self.last_progress_ms
            .store(crate::clock::clock_ms(), Ordering::Relaxed);
    }

    /// Statistics say `n` records wait for this incarnation.
    pub fn set_fetch_behind(&self, n: i64) {
        self.fetch_behind.store(n, Ordering::Relaxed);
    }

    /// How long (ms) this partition has had records to fetch while not held and received
    /// none; 0 when it is held on purpose (paused, or blocked by its sinks), has nothing
    /// to fetch, or is unknown.
    pub fn fetch_stalled_ms(&self, now_ms: u64) -> u64 {
        if self.fetch_behind.load(Ordering::Relaxed) <= 0
            || self.downstream.load(Ordering::Relaxed)
            || self.is_paused()
        {
            return 0;
        }
        now_ms.saturating_sub(self.last_progress_ms.load(Ordering::Relaxed))
    }

    /// The dispatcher starts (`true`) or stops waiting for room in a full worker lane.
    pub fn blocked_downstream(&self, on: bool) {
        self.downstream.store(on, Ordering::Relaxed);
        if !on {
            // Held until now: the no-progress clock starts again.
            self.fetched();
        }
    }

    /// Statistics report the consumer's fetch position (-1: unknown).
    pub fn set_fetch_position(&self, next: i64) {
        self.fetch_position.store(next, Ordering::Relaxed);
    }

    /// The consumer's fetch position from the last statistics, if known.
    pub fn fetch_position(&self) -> Option<i64> {
        let p = self.fetch_position.load(Ordering::Relaxed);
        (p >= 0).then_some(p)
    }

    /// The dispatcher found its queue empty with everything it received registered, and
    /// librdkafka's application position at `app`: every record below `app` was handed
    /// over and registered, or was never handed over (a marker, an aborted record).
    pub fn handed_over(&self, app: i64) {
        let registered_end = self.last_registered().map(|l| l + 1);
        *self.handed_over.lock().expect("handed-over lock") = Some((registered_end, app));
    }

    /// The application position of the last [`PartitionState::handed_over`].
    pub fn handed_over_position(&self) -> Option<i64> {
        self.handed_over
            .lock()
            .expect("handed-over lock")
            .map(|(_, app)| app)
    }

    /// The offset to commit, if anything completed: the watermark, or past it the
    /// application position the dispatcher last saw with its queue empty, once everything
    /// registered by then is done. The records between the two were never handed over
    /// (transaction markers, records of aborted transactions), so committing past them
    /// leaves no lag behind a drained transactional input.
    pub fn commit_offset(&self) -> Option<i64> {
        let wm = self.watermark()?;
        let handed = *self.handed_over.lock().expect("handed-over lock");
        Some(past_control_records(wm, handed))
    }

    /// Everything dispatched is completed or failed (nothing will settle any more).
    pub fn is_settled(&self) -> bool {
        self.open_batches.load(Ordering::Acquire) == 0
    }

    /// How many batches of this incarnation failed.
    pub fn failed_batches(&self) -> usize {
        self.failed_batches.load(Ordering::Acquire)
    }

    /// Where a batch failed for good (the first offset of the lowest such batch).
    pub fn failed_for_good_at(&self) -> Option<i64> {
        let at = self.failed_for_good_at.load(Ordering::Acquire);
        (at != i64::MAX).then_some(at)
    }

    /// Never dispatch records at or past `offset` (see [`PartitionState::stop_offset`]).
    pub fn stop_at(&self, offset: i64) {
        self.stop_at.fetch_min(offset, Ordering::AcqRel);
    }

    /// Abandon this incarnation's queued work: it is settled as aborted, not processed
    /// (an exactly-once window was aborted; a new incarnation does it again).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.on_cancel.notify_waiters();
    }

    /// Resolves once the incarnation is [`PartitionState::cancel`]led.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.on_cancel.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }

    /// True once [`PartitionState::cancel`]led.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Never dispatch records below `offset` (see [`PartitionState::start_offset`]).
    pub fn start_at(&self, offset: i64) {
        self.start_at.fetch_max(offset, Ordering::AcqRel);
    }

    /// Records below this offset are not dispatched.
    pub fn start_offset(&self) -> Option<i64> {
        let at = self.start_at.load(Ordering::Acquire);
        (at != i64::MIN).then_some(at)
    }

    /// Records at or past this offset are not dispatched.
    pub fn stop_offset(&self) -> Option<i64> {
        let at = self.stop_at.load(Ordering::Acquire);
        (at != i64::MAX).then_some(at)
    }

    /// Tell the consumer again whether this partition is paused (after librdkafka applied
    /// its assignment; see `RebalanceEvent::AssignApplied`). Nothing once retired.
    pub fn restate_pause(&self) {
        let flow = self.flow.lock().expect("flow lock");
        if self.retired.load(Ordering::Acquire) {
            return;
        }
        if flow.is_paused() {
            self.control.pause(&self.tp().topic, self.tp().partition);
        } else {
            self.control.resume(&self.tp().topic, self.tp().partition);
        }
    }

    /// True while any hold pauses the partition.
    pub fn is_paused(&self) -> bool {
        self.flow.lock().expect("flow lock").is_paused()
    }

    /// Register a dispatched range with the tracker.
    pub fn register(&self, first: i64, last: i64) -> Result<(), TrackerError> {
        self.tracker
            .lock()
            .expect("tracker lock")
            .register(first, last)
    }

    pub(crate) fn batch_opened(&self) {
        self.open_batches.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn batch_done(&self, first: i64, records: usize, dispatched_at: Instant) {
        let res = self.tracker.lock().expect("tracker lock").complete(first);
        if let Err(e) = res {
            tracing::error!(topic = %self.tp().topic, partition = self.tp().partition, error = %e, "offset tracker refused a completion; the partition stops advancing");
            self.set_stalled();
        }
        self.metrics.delivered.inc_by(records as u64);
        self.processing_latency
            .observe(dispatched_at.elapsed().as_secs_f64());
        self.open_batches.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// A batch failed. For good (`retried` false): the partition stalls at or before
    /// `first`. Aborted for a retry (`retried`: exactly-once rewinds the whole window):
    /// only counted.
    pub(crate) fn batch_failed(&self, first: i64, retried: bool) {
        self.failed_batches.fetch_add(1, Ordering::AcqRel);
        if !retried {
            self.failed_for_good_at.fetch_min(first, Ordering::AcqRel);
            // A retired incarnation's dispatch cut short by the revoke: redelivered to
            // the next owner, nothing to report.
            if !self.stalled.load(Ordering::Relaxed) && !self.is_retired() {
                tracing::error!(topic = %self.tp().topic, partition = self.tp().partition, offset = first,
                    "a batch could not be completed; the partition stops advancing at or before this offset (no record is skipped)");
            }
            self.set_stalled();
        }
        self.open_batches.fetch_sub(1, Ordering::AcqRel);
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
        tracing::error!(topic = %self.tp().topic, partition = self.tp().partition, %why, "partition stalled; it stops advancing");
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
        if self.retired.load(Ordering::Acquire) {
            return;
        }
        if flow.is_paused() || action == Some(FlowAction::Resume) {
            // A hold is not a stall: the no-progress clock starts when it ends.
            self.last_progress_ms
                .store(crate::clock::clock_ms(), Ordering::Relaxed);
        }
        match action {
            Some(FlowAction::Pause) => self.control.pause(&self.tp().topic, self.tp().partition),
            Some(FlowAction::Resume) => self.control.resume(&self.tp().topic, self.tp().partition),
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

/// The offset to commit for watermark `wm`, given what the dispatcher last saw with its
/// queue empty (`(end of what it had registered, application position)`): past `wm` to
/// the application position once everything registered by then is done, so nothing
/// between `wm` and that position was ever handed over. Pure.
pub fn past_control_records(wm: i64, handed_over: Option<(Option<i64>, i64)>) -> i64 {
    match handed_over {
        Some((Some(registered_end), app)) if wm >= registered_end && app > wm => app,
        _ => wm,
    }
}

#[cfg(test)]
impl PartitionState {
    /// Partition 0 of `topic` (epoch 0, 64 slots), counted in `metrics`, paused through
    /// `control`: the state the unit tests build.
    pub(crate) fn for_test(
        topic: &str,
        metrics: &crate::ops::metrics::Metrics,
        control: Arc<dyn PartitionControl>,
    ) -> Arc<Self> {
        PartitionState::new(
            Incarnation::new(TopicPartition::new(topic, 0), 0),
            64,
            control,
            metrics.partition(topic, 0),
            metrics.processing_latency.clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> Arc<PartitionState> {
        let m = crate::ops::metrics::Metrics::new("t");
        PartitionState::for_test("t", &m, Arc::new(NoControl))
    }

    /// N10: a drained transactional input ends in a commit marker the consumer never
    /// hands over; the commit goes past it only when everything handed over is done.
    #[test]
    fn the_commit_goes_past_records_never_handed_over_only_once_all_is_done() {
        let table = [
            (100, None, 100, "the queue was never seen empty"),
            (
                100,
                Some((Some(100), 101)),
                101,
                "drained: past the trailing marker",
            ),
            (
                100,
                Some((Some(100), 111)),
                111,
                "past an aborted transaction and its marker",
            ),
            (
                90,
                Some((Some(100), 101)),
                90,
                "records registered are in flight",
            ),
            (
                105,
                Some((Some(100), 101)),
                105,
                "done beyond the snapshot already",
            ),
            (
                100,
                Some((None, 101)),
                100,
                "nothing registered by then: unknown",
            ),
            (100, Some((Some(100), 100)), 100, "nothing skipped"),
        ];
        for (wm, positions, want, why) in table {
            assert_eq!(past_control_records(wm, positions), want, "{why}");
        }
    }

    /// N6: a dispatcher waiting for room in a full lane (a sink holds the partition back)
    /// is not a fetch wedge.
    #[test]
    fn a_partition_held_back_by_its_sinks_is_not_stuck_in_fetch() {
        let st = state();
        let later = crate::clock::clock_ms() + 600_000;
        st.set_fetch_behind(100);
        assert!(st.fetch_stalled_ms(later) > 0);
        st.blocked_downstream(true);
        assert_eq!(st.fetch_stalled_ms(later), 0, "blocked by the sinks");
        st.blocked_downstream(false);
        assert!(
            st.fetch_stalled_ms(crate::clock::clock_ms()) < 1_000,
            "the clock restarts"
        );
    }

    /// The fetch-progress liveness rule counts only a partition that has records to fetch
    /// and is not held on purpose; a hold restarts its clock.
    #[test]
    fn fetch_stall_counts_only_unheld_partitions_with_records_to_fetch() {
        let st = state();
        let later = crate::clock::clock_ms() + 600_000;
        assert_eq!(st.fetch_stalled_ms(later), 0, "unknown: not stalled");
        st.set_fetch_behind(0);
        assert_eq!(st.fetch_stalled_ms(later), 0, "nothing to fetch");
        st.set_fetch_behind(100);
        assert!(
            st.fetch_stalled_ms(later) >= 599_000,
            "records to fetch, none received"
        );
        st.hold(HoldReason::Budget, true);
        assert_eq!(
            st.fetch_stalled_ms(later),
            0,
            "held on purpose (backpressure)"
        );
        st.hold(HoldReason::Budget, false);
        assert!(
            st.fetch_stalled_ms(later) <= 600_000
                && st.fetch_stalled_ms(crate::clock::clock_ms()) < 1_000,
            "a hold restarts the clock"
        );
        st.stall("poison without a dead-letter topic");
        assert_eq!(
            st.fetch_stalled_ms(later),
            0,
            "a stall by design is an alert, not a restart"
        );
    }
}
