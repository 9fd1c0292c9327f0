//! The dispatching half of one partition: it registers each batch of records with the
//! offset tracker and pushes it into the partition's worker lanes (a hand-off per batch,
//! not per record), within the in-flight byte budget.
//!
//! [`PartitionDispatch`] is source-agnostic (the in-memory engine drives it directly);
//! [`crate::kafka::dispatcher::run_kafka_dispatcher`] feeds it from a librdkafka partition
//! queue.

use std::sync::Arc;

use sluice_api::config::Ordering;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::engine::ack::BatchAck;
use crate::engine::backpressure::{ByteBudget, HoldReason};
use crate::engine::gate::WindowGate;
use crate::engine::lanes::{lane_for_key, WorkItem};
use crate::engine::partition::PartitionState;
use crate::record::Record;

/// The dispatching half of one partition: its worker lanes and the byte budget.
#[derive(Debug)]
pub struct PartitionDispatch {
    state: Arc<PartitionState>,
    workers: Vec<mpsc::Sender<WorkItem>>,
    ordering: Ordering,
    budget: ByteBudget,
    next_unordered: usize,
    redelivered: u64,
    /// The leader epoch of the last record registered, when known (N12: a record at an
    /// offset already registered but of a later epoch is a new record; the log was
    /// truncated).
    last_epoch: Option<i32>,
    rewind_log: crate::ops::throttle::LogThrottle,
    /// The barrier between delivery windows, when the delivery guarantee has them
    /// (exactly-once: see `delivery/exactly_once.rs`).
    gate: Option<Arc<WindowGate>>,
}

impl PartitionDispatch {
    /// Dispatch to `workers` (one sender per worker lane).
    pub fn new(
        state: Arc<PartitionState>,
        workers: Vec<mpsc::Sender<WorkItem>>,
        ordering: Ordering,
        budget: ByteBudget,
    ) -> Self {
        assert!(!workers.is_empty(), "a partition needs at least one worker");
        PartitionDispatch {
            state,
            workers,
            ordering,
            budget,
            next_unordered: 0,
            redelivered: 0,
            last_epoch: None,
            rewind_log: Default::default(),
            gate: None,
        }
    }

    /// Register each batch inside `gate`, so a delivery window (an exactly-once
    /// transaction) ends with nothing half-registered; the hand-over to the lanes is
    /// outside it (what is registered, the window's end waits for anyway), and a batch
    /// still waiting for room in a lane when the window is aborted is given up.
    pub fn with_gate(mut self, gate: Option<Arc<WindowGate>>) -> Self {
        self.gate = gate;
        self
    }

    /// Records dropped because they were received already (see [`PartitionDispatch::dispatch`]).
    pub fn redelivered(&self) -> u64 {
        self.redelivered
    }

    /// The partition this lane feeds.
    pub fn state(&self) -> &Arc<PartitionState> {
        &self.state
    }

    /// Take `bytes` from the in-flight budget, waiting (with the partition held for
    /// `Budget`) while it is spent; a held partition resumes once a chunk of the budget is
    /// free ([`ByteBudget::acquire_at_least`]).
    pub async fn charge(&self, bytes: usize) -> OwnedSemaphorePermit {
        match self.budget.try_acquire(bytes) {
            Some(p) => p,
            None => {
                self.state.hold(HoldReason::Budget, true);
                let p = self
                    .budget
                    .acquire_at_least(bytes, self.budget.resume_chunk())
                    .await;
                self.state.hold(HoldReason::Budget, false);
                p
            }
        }
    }

    /// Take `bytes` from the budget if they are free now.
    pub fn try_charge(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        self.budget.try_acquire(bytes)
    }

    /// Hand a batch of records (in offset order) to the workers. Waits while the byte
    /// budget is spent (with the partition paused) or a worker's channel is full.
    pub async fn dispatch(&mut self, records: Vec<Record>) {
        let bytes: usize = records.iter().map(Record::budget_cost).sum();
        let permit = self.charge(bytes).await;
        self.dispatch_charged(records, permit, None).await;
    }

    /// [`PartitionDispatch::dispatch`] for records already charged to the budget with
    /// `permit`, all fetched at leader epoch `epoch` (KIP-320; `None`: unknown). The Kafka
    /// dispatcher cuts a batch where the epoch changes, so one value is the whole batch's.
    pub async fn dispatch_charged(
        &mut self,
        mut records: Vec<Record>,
        permit: OwnedSemaphorePermit,
        epoch: Option<i32>,
    ) {
        // Registered inside the window's gate, handed over outside it. The window's end
        // waits for the gate (`WindowGate::close`) and then for everything registered to
        // complete; a dispatcher that stayed inside while it waited for room in a full lane
        // held the window's end until that lane moved, and a lane may wait on what only
        // the window's end does (e.g. the abort that frees the producer): a deadlock.
        let (records, token, n) = {
            let gate = self.gate.clone();
            let _window = match &gate {
                Some(g) => Some(g.enter(records.len()).await),
                None => None,
            };
            // The window was aborted (the incarnation is cancelled): nothing more is
            // registered; the rewound incarnation reads these records again.
            if self.state.is_cancelled() {
                return;
            }
            // A rewind (librdkafka fetching again from an earlier offset, e.g. after an offset
            // reset) redelivers records this incarnation already registered: they are in
            // flight or done, so they are dropped here instead of stalling the tracker.
            if let Some(seen) = self.state.last_registered() {
                if records.first().is_some_and(|r| r.offset <= seen) {
                    let (before, first) = (records.len(), records[0].offset);
                    // In offset order: what is dropped is a prefix (with gaps: transaction
                    // markers, a compacted input).
                    let last = records
                        .iter()
                        .take_while(|r| r.offset <= seen)
                        .last()
                        .map_or(first, |r| r.offset);
                    records.retain(|r| r.offset > seen);
                    let n = (before - records.len()) as u64;
                    // N12: leader epochs only grow along a partition's log, so a record at an
                    // offset already registered with a later epoch than the last registered
                    // one is not the record received there: the log was truncated below
                    // (an unclean leader election) and new records were written at reused
                    // offsets. They cannot be registered again (the tracker's offsets are
                    // in flight or committed); they are counted and named, not hidden.
                    let truncated = match (epoch, self.last_epoch) {
                        (Some(e), Some(known)) => e > known,
                        _ => false,
                    };
                    if truncated {
                        self.state.metrics.dropped_truncated.inc_by(n);
                        tracing::error!(topic = %self.state.tp().topic, partition = self.state.tp().partition,
                            first, last, last_registered = seen,
                            leader_epoch = epoch, registered_epoch = self.last_epoch,
                            "the partition's log was truncated below what this worker had received (an unclean leader election?): the new records at reused offsets first..=last are NOT processed; to process them, reset the group's offset of this partition to `first` (kafka-consumer-groups --reset-offsets --to-offset) with the pipeline stopped, which delivers what follows again");
                    } else {
                        self.redelivered += n;
                        self.state.metrics.dropped_redelivered.inc_by(n);
                        if let Some(events) = self.rewind_log.tick() {
                            tracing::warn!(topic = %self.state.tp().topic, partition = self.state.tp().partition,
                                last_registered = seen, dropped = n, events,
                                "records redelivered below what this partition already received; dropped (they are in flight or done)");
                        }
                    }
                }
            }
            // Never below where the partition was started (`startFrom: latest`), however
            // librdkafka came to fetch from lower down.
            if let Some(start) = self.state.start_offset() {
                if records.first().is_some_and(|r| r.offset < start) {
                    let before = records.len();
                    records.retain(|r| r.offset >= start);
                    let dropped = &self.state.metrics.dropped_before_start;
                    dropped.inc_by((before - records.len()) as u64);
                    if let Some(n) = self.rewind_log.tick() {
                        tracing::info!(topic = %self.state.tp().topic, partition = self.state.tp().partition,
                            start, skipped = before - records.len(), events = n,
                            "records below where startFrom: latest started this partition; not dispatched");
                    }
                }
            }
            // Never past where an earlier incarnation stopped for good (exactly-once without
            // a dead-letter path: the partition stops at the record, as at-least-once does).
            if let Some(stop) = self.state.stop_offset() {
                if records.last().is_some_and(|r| r.offset >= stop) {
                    records.retain(|r| r.offset < stop);
                    if !self.state.is_stalled() {
                        self.state.stall(&format!(
                            "a record at or after offset {stop} failed for good before and has no dead-letter path"
                        ));
                    }
                }
            }
            let (Some(first), Some(last)) = (records.first(), records.last()) else {
                return;
            };
            let (first, last, n) = (first.offset, last.offset, records.len());
            if let Err(e) = self.state.register(first, last) {
                // Never dispatch what the tracker cannot account for.
                self.state.stall(&e.to_string());
                return;
            }
            if epoch.is_some() {
                self.last_epoch = epoch;
            }
            let token = BatchAck::open(self.state.clone(), first, n, Some(permit));
            self.state.metrics.consumed.inc_by(n as u64);
            self.state.enqueued(n);
            (records, token, n)
        };
        match self.ordering {
            Ordering::Partition => {
                self.send(0, WorkItem { records, token }).await;
            }
            Ordering::Unordered => {
                // The lane with the most free slots; ties go round-robin.
                let w = self.workers.len();
                let start = self.next_unordered;
                self.next_unordered = (start + 1) % w;
                let idx = (0..w)
                    .map(|i| (start + i) % w)
                    .max_by_key(|&i| {
                        (
                            self.workers[i].capacity(),
                            std::cmp::Reverse((i + w - start) % w),
                        )
                    })
                    .unwrap_or(0);
                self.send(idx, WorkItem { records, token }).await;
            }
            Ordering::Key => {
                let w = self.workers.len();
                if w == 1 {
                    self.send(0, WorkItem { records, token }).await;
                    return;
                }
                // Room for a fair share and then some: growing these vectors record by
                // record was a measurable share of the dispatch cost.
                let share = n / w + n / (2 * w) + 8;
                let mut split: Vec<Vec<Record>> =
                    (0..w).map(|_| Vec::with_capacity(share)).collect();
                for r in records {
                    split[lane_for_key(r.key.as_deref(), w)].push(r);
                }
                for (i, part) in split.into_iter().enumerate() {
                    if !part.is_empty() {
                        let item = WorkItem {
                            records: part,
                            token: token.clone(),
                        };
                        self.send(i, item).await;
                    }
                }
                token.ack();
            }
        }
        // A send that failed (the worker is gone) dropped its token unacked: the batch
        // can never complete, so its offsets are never committed.
    }

    /// Hand `item` to worker lane `lane`, waiting while its channel is full; meanwhile the
    /// partition counts as held back by its sinks, not stuck in fetch (liveness).
    async fn send(&self, lane: usize, item: WorkItem) {
        let tx = &self.workers[lane];
        let item = match tx.try_send(item) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Closed(_)) => return,
            Err(mpsc::error::TrySendError::Full(item)) => item,
        };
        self.state.blocked_downstream(true);
        tokio::select! {
            biased;
            // The window was aborted while this waited: the batch is given up (the rewound
            // incarnation reads it again), so the abort's settling never waits on this lane.
            _ = self.state.cancelled() => {
                self.state.dequeued(item.records.len());
                item.token.abort();
            }
            slot = tx.reserve() => match slot {
                Ok(slot) => slot.send(item),
                // The worker is gone: the token is dropped unacked (see above).
                Err(_) => drop(item),
            },
        }
        self.state.blocked_downstream(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::partition::{NoControl, PartitionControl};
    use std::sync::Mutex;

    fn record(offset: i64) -> Record {
        Record {
            topic: "t".into(),
            partition: 0,
            offset,
            timestamp_ms: None,
            key: None,
            value: Some(bytes::Bytes::from_static(b"v")),
            headers: Vec::new(),
        }
    }

    /// Records every pause and resume it is asked for.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<bool>>);

    impl PartitionControl for Recorder {
        fn pause(&self, _: &str, _: i32) {
            self.0.lock().unwrap().push(true);
        }
        fn resume(&self, _: &str, _: i32) {
            self.0.lock().unwrap().push(false);
        }
    }

    fn state(control: Arc<dyn PartitionControl>) -> Arc<PartitionState> {
        let m = crate::ops::metrics::Metrics::new("t");
        PartitionState::for_test("t", &m, control)
    }

    /// A dispatcher of `st` feeding one ordered lane `tx`, with a 1 MiB budget.
    fn lane(st: &Arc<PartitionState>, tx: mpsc::Sender<WorkItem>) -> PartitionDispatch {
        PartitionDispatch::new(
            st.clone(),
            vec![tx],
            Ordering::Partition,
            ByteBudget::new(1 << 20),
        )
    }

    /// W4: a rewind redelivers offsets the tracker has registered already (in flight or
    /// done); they are dropped, the rest goes on, and the partition does not stall.
    #[tokio::test]
    async fn a_rewind_below_what_was_received_is_dropped_not_stalled() {
        let st = state(Arc::new(NoControl));
        let (tx, mut rx) = mpsc::channel(16);
        let mut lane = lane(&st, tx);
        lane.dispatch((0..10).map(record).collect()).await;
        let first = rx.recv().await.unwrap();
        first.token.ack();
        assert_eq!(st.watermark(), Some(10));
        // librdkafka fetches again from offset 5 (e.g. after an offset reset)
        lane.dispatch((5..15).map(record).collect()).await;
        let second = rx.recv().await.unwrap();
        let offsets: Vec<i64> = second.records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (10..15).collect::<Vec<_>>());
        second.token.ack();
        assert!(!st.is_stalled());
        assert_eq!(st.watermark(), Some(15));
        assert_eq!(lane.redelivered(), 5);
        assert_eq!(st.metrics.consumed.get(), 15, "each record counted once");
        assert_eq!(st.metrics.dropped_redelivered.get(), 5);
        // a batch entirely below: nothing dispatched at all
        lane.dispatch((0..3).map(record).collect()).await;
        assert!(rx.try_recv().is_err());
        assert!(!st.is_stalled());
    }

    /// N12: after an unclean leader election the log is truncated below what the partition
    /// received and new records are written at the reused offsets, with a later leader
    /// epoch. They are told from a redelivery by their epoch and counted as `truncated`
    /// (with an error naming the offsets), never silently as redelivered; a redelivery
    /// (same or no epoch) stays what it was.
    #[tokio::test]
    async fn records_at_reused_offsets_of_a_later_epoch_are_counted_as_truncated() {
        let st = state(Arc::new(NoControl));
        let (tx, mut rx) = mpsc::channel(16);
        let mut lane = lane(&st, tx);
        let send = |lane: &mut PartitionDispatch, from: i64, to: i64, e: Option<i32>| {
            let records: Vec<Record> = (from..to).map(record).collect();
            let bytes = records.iter().map(Record::budget_cost).sum();
            let permit = lane.try_charge(bytes).expect("budget");
            (records, permit, e)
        };
        let (r, p, e) = send(&mut lane, 0, 10, Some(3));
        lane.dispatch_charged(r, p, e).await;
        rx.recv().await.unwrap().token.ack();
        // A redelivery of the same records (same epoch): dropped as redelivered.
        let (r, p, e) = send(&mut lane, 5, 10, Some(3));
        lane.dispatch_charged(r, p, e).await;
        assert_eq!(st.metrics.dropped_redelivered.get(), 5);
        assert_eq!(st.metrics.dropped_truncated.get(), 0);
        // Truncated to 6; new records at 6..=9 (epoch 5), then 10..12 new ones.
        let (r, p, e) = send(&mut lane, 6, 12, Some(5));
        lane.dispatch_charged(r, p, e).await;
        assert_eq!(
            st.metrics.dropped_truncated.get(),
            4,
            "6..=9 named, not hidden"
        );
        assert_eq!(st.metrics.dropped_redelivered.get(), 5);
        let next = rx.recv().await.unwrap();
        assert_eq!(
            next.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![10, 11],
            "what is past the received offsets goes on"
        );
        // Unknown epochs (a broker without them): a redelivery, as before.
        let (r, p, e) = send(&mut lane, 0, 3, None);
        lane.dispatch_charged(r, p, e).await;
        assert_eq!(st.metrics.dropped_redelivered.get(), 8);
        assert!(!st.is_stalled());
    }

    /// `startFrom: latest` started the partition at offset 1000, but librdkafka fetched
    /// from the beginning anyway (its start of the assignment landed after the seek):
    /// nothing below 1000 is dispatched, registered or committed.
    #[tokio::test]
    async fn records_below_a_latest_start_are_never_dispatched() {
        let st = state(Arc::new(NoControl));
        st.start_at(1_000);
        let (tx, mut rx) = mpsc::channel(16);
        let mut lane = lane(&st, tx);
        lane.dispatch((0..10).map(record).collect()).await;
        assert!(rx.try_recv().is_err(), "a batch wholly below the start");
        assert_eq!(st.last_registered(), None);
        lane.dispatch((995..1_005).map(record).collect()).await;
        let batch = rx.recv().await.unwrap();
        let offsets: Vec<i64> = batch.records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (1_000..1_005).collect::<Vec<_>>());
        batch.token.ack();
        assert_eq!(st.watermark(), Some(1_005));
        assert!(!st.is_stalled());
        // Issue 19: what was skipped is counted as dropped, not as consumed.
        assert_eq!(st.metrics.consumed.get(), 5);
        assert_eq!(st.metrics.dropped_before_start.get(), 15);
    }

    /// Waits (with a deadline) until `st` registered up to `offset`.
    async fn registered(st: &PartitionState, offset: i64) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while st.last_registered() != Some(offset) {
            assert!(tokio::time::Instant::now() < deadline, "not registered");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Issue 19: a dispatcher waiting for room in a full lane does not hold the window's
    /// end. It used to wait inside the gate, so `WindowGate::close` waited for the lane,
    /// and a lane whose work waits on the window's end (its abort, its commit) never
    /// moved: the coordinator and the data path waited on each other.
    #[tokio::test]
    async fn the_window_closes_while_a_dispatcher_waits_for_room_in_a_full_lane() {
        let st = state(Arc::new(NoControl));
        let gate = Arc::new(WindowGate::default());
        let (tx, mut rx) = mpsc::channel(1);
        let mut lane = lane(&st, tx).with_gate(Some(gate.clone()));
        lane.dispatch((0..10).map(record).collect()).await;
        let dispatcher = tokio::spawn(async move {
            lane.dispatch((10..20).map(record).collect()).await;
        });
        registered(&st, 19).await;
        // The lane's worker takes nothing until the window ended.
        let closed = tokio::time::timeout(std::time::Duration::from_secs(5), gate.close())
            .await
            .expect("the window's end is not held by a dispatcher waiting for a full lane");
        for _ in 0..2 {
            rx.recv().await.unwrap().token.ack();
        }
        gate.next_window();
        drop(closed);
        dispatcher.await.unwrap();
        assert_eq!(st.watermark(), Some(20));
        assert!(st.is_idle());
    }

    /// Issue 19: when the window is aborted (the incarnation cancelled), a batch still
    /// waiting for room in a full lane is given up as aborted (not failed for good, so the
    /// rewound partition does not stop there), and nothing more is registered; the abort's
    /// settling does not wait on the lane.
    #[tokio::test]
    async fn a_batch_waiting_for_a_full_lane_is_given_up_when_the_window_is_aborted() {
        let st = state(Arc::new(NoControl));
        let gate = Arc::new(WindowGate::default());
        let (tx, mut rx) = mpsc::channel(1);
        let mut lane = lane(&st, tx).with_gate(Some(gate));
        lane.dispatch((0..10).map(record).collect()).await;
        let dispatcher = tokio::spawn(async move {
            lane.dispatch((10..20).map(record).collect()).await;
            lane
        });
        registered(&st, 19).await;
        st.cancel();
        let mut lane = tokio::time::timeout(std::time::Duration::from_secs(5), dispatcher)
            .await
            .expect("a cancelled dispatch does not wait for the lane")
            .unwrap();
        // The lane's worker settles what it holds of the cancelled incarnation.
        rx.recv().await.unwrap().token.abort();
        assert!(
            rx.try_recv().is_err(),
            "the given-up batch never reached the lane"
        );
        assert!(st.is_settled());
        assert_eq!(st.failed_for_good_at(), None);
        lane.dispatch((20..30).map(record).collect()).await;
        assert_eq!(
            st.last_registered(),
            Some(19),
            "nothing registered once cancelled"
        );
    }

    /// W1: once an incarnation is retired, nothing it does pauses or resumes the
    /// partition (the next incarnation owns the consumer's pause flag).
    #[test]
    fn a_retired_incarnation_never_pauses_the_partition() {
        let rec = Arc::new(Recorder::default());
        let st = state(rec.clone());
        st.hold(HoldReason::QueueFull, true);
        st.hold(HoldReason::QueueFull, false);
        assert_eq!(*rec.0.lock().unwrap(), vec![true, false]);
        st.retire();
        st.hold(HoldReason::Budget, true);
        st.stall("late failure of the old incarnation");
        st.hold(HoldReason::Budget, false);
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![true, false],
            "no pause after retire"
        );
    }
}
