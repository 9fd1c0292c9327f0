//! The group consumer: one librdkafka consumer per worker process.
//!
//! Its context turns rebalance callbacks into events for the pipeline's coordinator:
//! - **assign**: each new partition's queue is split off *inside* the callback, before the
//!   assignment takes effect, so no record of it ever lands on the main queue;
//! - **revoke**: a barrier. The callback blocks until the coordinator has stopped, aborted
//!   and awaited the partitions' dispatchers (so their queue handles are gone: a handle
//!   dropped later would clear the wake-up of the next incarnation's queue, which is the
//!   same librdkafka queue) and retired their state; then, for an orderly revoke, until
//!   in-flight work drained (bounded by `commit.drainTimeout`) and was committed. A
//!   *lost* assignment (the session expired; another member may own the partitions
//!   already) is not drained or committed: the callback returns as soon as the
//!   dispatchers are gone, so librdkafka can rejoin at once.
//!
//! The main queue is served by a dedicated thread (it runs the callbacks, which block).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};
use sluice_rdkafka_ffi::PartitionFeed;
use tokio::sync::mpsc;

use crate::engine::partition::{PartitionControl, TopicPartition};
use crate::engine::registry::Registry;
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;

/// The consumer type used by the worker.
pub type SluiceConsumer = StreamConsumer<SluiceContext>;

/// A rebalance, as seen by the coordinator.
pub enum RebalanceEvent {
    /// New partitions, each with its own queue already split off.
    Assigned(Vec<(TopicPartition, PartitionFeed)>),
    /// librdkafka applied an assignment (after [`RebalanceEvent::Assigned`]): the
    /// coordinator states each partition's pause flag again. A pause or resume issued
    /// before the assignment took effect can be dropped by librdkafka as outdated (starting
    /// the fetch bumps the partition's op version), and librdkafka keeps a pause flag
    /// across assignments: without this a partition paused by its previous incarnation
    /// could stay paused for good.
    AssignApplied(Vec<TopicPartition>),
    /// Partitions to give up. Reply [`RevokeProgress::Released`] once their dispatchers
    /// are gone, then [`RevokeProgress::Done`] once drained and committed.
    Revoked {
        /// The partitions.
        partitions: Vec<TopicPartition>,
        /// True when the assignment was lost (session expired): skip drain and commit.
        lost: bool,
        /// Reply channel; the rebalance callback waits on it.
        done: std::sync::mpsc::SyncSender<RevokeProgress>,
    },
}

/// How far the coordinator got with a revoke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokeProgress {
    /// The dispatchers are stopped and awaited, their queue handles dropped, the states
    /// retired: librdkafka may hand the partitions to anyone, this process included.
    Released,
    /// Drained and committed (or given up at the deadline).
    Done,
}

/// The consumer's context: rebalance hooks, statistics (lag) and errors.
pub struct SluiceContext {
    consumer: OnceLock<Weak<SluiceConsumer>>,
    events: mpsc::UnboundedSender<RebalanceEvent>,
    revoke_timeout: Duration,
    metrics: Metrics,
    /// The partitions this process owns (the coordinator's registry), for lag from
    /// statistics.
    owned: Registry,
    fatal: std::sync::atomic::AtomicBool,
    health: Arc<Health>,
    /// `isolation.level=read_committed` (librdkafka's default): what can be fetched ends
    /// at the last stable offset, not the high watermark.
    read_committed: bool,
}

impl SluiceContext {
    /// A context that sends rebalance events to `events` and reads the owned partitions
    /// from `owned`. A revoke waits at most `revoke_timeout` for the coordinator.
    pub fn new(
        events: mpsc::UnboundedSender<RebalanceEvent>,
        revoke_timeout: Duration,
        metrics: Metrics,
        health: Arc<Health>,
        owned: Registry,
        read_committed: bool,
    ) -> Self {
        SluiceContext {
            consumer: OnceLock::new(),
            events,
            revoke_timeout,
            metrics,
            owned,
            fatal: Default::default(),
            health,
            read_committed,
        }
    }

    /// Give the context a handle on its consumer (needed to split partition queues).
    /// Weak, so the context does not keep its own consumer alive.
    pub fn attach(consumer: &Arc<SluiceConsumer>) {
        let _ = consumer.context().consumer.set(Arc::downgrade(consumer));
    }

    /// True after a fatal consumer error.
    pub fn is_fatal(&self) -> bool {
        self.fatal.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl ClientContext for SluiceContext {
    fn stats(&self, stats: Statistics) {
        self.health.stats_seen();
        if let Some(cg) = &stats.cgrp {
            if group_joined(&cg.state) {
                self.health.joined();
            }
        }
        for (topic, t) in &stats.topics {
            for (p, s) in &t.partitions {
                if let Some(st) = self.owned.state(&TopicPartition::new(topic.as_str(), *p)) {
                    tracing::debug!(%topic, partition = p, fetch_state = %s.fetch_state, fetchq_cnt = s.fetchq_cnt,
                        app_offset = s.app_offset, next_offset = s.next_offset, hi_offset = s.hi_offset,
                        committed = s.committed_offset, epoch = st.epoch(), paused = st.is_paused(), "partition statistics");
                    let m = &st.metrics;
                    if s.hi_offset >= 0 {
                        m.high_watermark.set(s.hi_offset);
                        let f = fetch_view(s, self.read_committed);
                        m.lag.set(f.lag);
                        st.set_fetch_behind(f.waiting);
                        st.set_fetch_position(s.next_offset);
                    }
                }
            }
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        // An offset reset caused by an error (the committed offset is out of range:
        // retention or deletion passed it) is worth a line and a metric of our own.
        if fac == "OFFSET" && is_out_of_range_reset(message) {
            self.metrics.offset_resets.inc();
            tracing::warn!(detail = %message, "the consumer's position was out of range on the broker and was reset (auto.offset.reset); records the broker deleted in between were never processed");
            return;
        }
        crate::kafka::log::KAFKA_LOG.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::error::RDKafkaErrorCode::Fatal)
        ) {
            tracing::error!(%reason, "fatal consumer error");
            self.fatal.store(true, std::sync::atomic::Ordering::Release);
        } else if crate::kafka::log::KAFKA_LOG.error_is_transient(&error, reason) {
            tracing::info!(error = %error, %reason, "consumer error (a passing state)");
        } else {
            tracing::warn!(error = %error, %reason, "consumer error");
        }
    }
}

/// Statistics show the consumer joined: its group coordinator is known and it is a member
/// (`up`), rebalancing or not. A member that only loses partitions during a long series
/// of rebalances is still joined; an expired session or an absent coordinator is not.
pub fn group_joined(cgrp_state: &str) -> bool {
    cgrp_state == "up"
}

/// What one partition's statistics say about its progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchView {
    /// Records readable beyond the committed offset (from the log start when nothing is
    /// committed).
    pub lag: i64,
    /// Records this incarnation could fetch and has not received: fetched and unread
    /// (its queue), else readable on the broker beyond the fetch position; 0 while the
    /// partition has no leader or its fetcher is not active (a restart cannot help).
    pub waiting: i64,
}

/// The progress view of partition statistics `s`. Readable ends at the last stable offset
/// for `read_committed` (an open upstream transaction holds it back: nothing to fetch
/// until it ends), at the high watermark otherwise. Pure.
pub fn fetch_view(s: &rdkafka::statistics::Partition, read_committed: bool) -> FetchView {
    let end = if read_committed && s.ls_offset >= 0 {
        s.ls_offset
    } else {
        s.hi_offset
    };
    // Nothing committed yet: measure from the log start, not from 0.
    let base = if s.committed_offset >= 0 {
        s.committed_offset
    } else {
        s.lo_offset.max(0)
    };
    let lag = (end - base).max(0);
    // Not end - app_offset: a transaction marker at the end of the log is never handed
    // over, so that would never reach 0.
    let waiting = if s.leader < 0 || s.fetch_state != "active" {
        0
    } else if s.fetchq_cnt > 0 {
        s.fetchq_cnt
    } else if s.next_offset >= 0 {
        (end - s.next_offset).max(0)
    } else {
        lag
    };
    FetchView { lag, waiting }
}

/// Whether librdkafka's OFFSET line reports a position reset because the offset was out of
/// range on the broker. A group's first start also logs an "offset reset" (to
/// `auto.offset.reset`: "no previously committed offset available"), which is not one.
fn is_out_of_range_reset(message: &str) -> bool {
    message.contains("offset reset") && !message.contains("no previously committed offset")
}

fn partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

impl ConsumerContext for SluiceContext {
    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = partitions(tpl);
                if parts.is_empty() {
                    return;
                }
                self.metrics
                    .rebalances
                    .with_label_values(&[self.metrics.pipeline(), "assign"])
                    .inc();
                let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
                    tracing::error!(
                        "assignment arrived while the consumer is closing; ignoring it"
                    );
                    return;
                };
                let mut queues = Vec::with_capacity(parts.len());
                for tp in parts {
                    match PartitionFeed::split(&consumer, &tp.topic, tp.partition) {
                        Some(q) => queues.push((tp, q)),
                        // A partition assigned without its own queue would never be read by
                        // a dispatcher (its records would go to the main queue, or stay in a
                        // queue split off before): not a state to run on. Stop the worker
                        // (like a fatal error); its restart begins with a fresh client.
                        None => {
                            tracing::error!(topic = %tp.topic, partition = tp.partition, "could not split the partition's queue (librdkafka gave none, or a feed of it is still alive): stopping the worker");
                            self.fatal.store(true, std::sync::atomic::Ordering::Release);
                        }
                    }
                }
                tracing::info!(partitions = ?queues.iter().map(|q| q.0.to_string()).collect::<Vec<_>>(), "partitions assigned");
                let _busy = self.health.in_callback();
                let _ = self.events.send(RebalanceEvent::Assigned(queues));
            }
            Rebalance::Revoke(tpl) => {
                let parts = partitions(tpl);
                if parts.is_empty() {
                    return;
                }
                let lost = base.assignment_lost();
                self.metrics
                    .rebalances
                    .with_label_values(&[
                        self.metrics.pipeline(),
                        if lost { "lost" } else { "revoke" },
                    ])
                    .inc();
                if lost {
                    tracing::warn!(partitions = ?parts.iter().map(|q| q.to_string()).collect::<Vec<_>>(), "assignment lost (the group session expired); releasing the partitions without a commit, their uncommitted work will be redelivered");
                } else {
                    tracing::info!(partitions = ?parts.iter().map(|q| q.to_string()).collect::<Vec<_>>(), "partitions revoked; draining");
                }
                let (done, wait) = std::sync::mpsc::sync_channel(2);
                let _busy = self.health.in_callback();
                if self
                    .events
                    .send(RebalanceEvent::Revoked {
                        partitions: parts,
                        lost,
                        done,
                    })
                    .is_err()
                {
                    return;
                }
                // The drain is bounded by its deadline; past `revoke_timeout` stop waiting
                // for it, but never return before the dispatchers are gone (a barrier:
                // the same partition may be assigned again right after this returns).
                let deadline = std::time::Instant::now() + self.revoke_timeout;
                let mut released = false;
                loop {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    let got = if released {
                        wait.recv_timeout(left)
                    } else {
                        wait.recv_timeout(left.max(Duration::from_secs(1)))
                    };
                    match got {
                        Ok(RevokeProgress::Released) => released = true,
                        Ok(RevokeProgress::Done) => break,
                        // The coordinator is gone (shutting down): nothing runs any more.
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) if released => {
                            tracing::warn!("revoke drain did not finish in time; letting the partitions go (uncommitted work will be redelivered)");
                            break;
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            tracing::warn!("revoke: the partitions' dispatchers are not released yet; waiting (the barrier holds)");
                        }
                    }
                }
            }
            Rebalance::Error(e) => tracing::error!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts = partitions(tpl);
            if !parts.is_empty() {
                let _ = self.events.send(RebalanceEvent::AssignApplied(parts));
            }
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed");
        }
    }
}

/// Pauses and resumes partitions on the consumer, from a thread of its own.
///
/// librdkafka's `rd_kafka_pause_partitions` and `rd_kafka_resume_partitions` wait, without
/// a time limit (`RD_SYNC`, `RD_POLL_INFINITE`), until the thread that serves the
/// partition (its leader's broker thread) took the request, and a broker thread can be
/// held for seconds (it resolves a broker's address itself). Callers (dispatchers, a
/// partition's flow control under its lock, the assignment) must not wait on that: they
/// state what they want of the partition here, and one thread applies it. Only the latest
/// wish per partition is kept (a pause then a resume not yet applied is just a resume), so
/// what waits behind a held broker thread is bounded by the partitions, not the requests.
#[derive(Clone)]
pub struct ConsumerControl {
    handle: Arc<ControlHandle>,
}

/// What the pause thread has to do, under one lock.
#[derive(Default)]
struct Wishes {
    /// The latest wish per partition (true: paused), not yet applied.
    pending: HashMap<(String, i32), bool>,
    /// No more wishes are applied; the thread ends.
    closed: bool,
    /// The thread is applying wishes (holding the consumer).
    busy: bool,
}

#[derive(Default)]
struct Shared {
    wishes: std::sync::Mutex<Wishes>,
    changed: std::sync::Condvar,
}

impl Shared {
    fn close(&self) {
        self.wishes.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.changed.notify_all();
    }
}

/// Closes the pause thread when the last [`ConsumerControl`] goes.
struct ControlHandle(Arc<Shared>);

impl Drop for ControlHandle {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The pipeline's hold on the pause thread: [`ControlStop::stop`] before the consumer is
/// closed, so no pause or resume holds it then.
pub struct ControlStop {
    shared: Arc<Shared>,
    thread: std::thread::JoinHandle<()>,
}

impl ControlStop {
    /// Apply no more wishes, and wait (up to `timeout`) until a call in progress returns;
    /// the thread then ends. Blocking: call it off the runtime's threads.
    pub fn stop(self, timeout: Duration) {
        self.shared.close();
        let deadline = std::time::Instant::now() + timeout;
        let mut w = self.shared.wishes.lock().unwrap_or_else(|e| e.into_inner());
        while w.busy {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::warn!("a pause or resume is still inside librdkafka at the stop");
                return;
            }
            w = self
                .shared
                .changed
                .wait_timeout(w, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(w);
        let _ = self.thread.join();
    }
}

impl ConsumerControl {
    /// Control `consumer`'s partitions while it is alive, and the hold to stop that.
    pub fn new(consumer: Weak<SluiceConsumer>) -> std::io::Result<(Self, ControlStop)> {
        let shared = Arc::new(Shared::default());
        let span = tracing::Span::current();
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("sluice-pause".into())
                .spawn(move || {
                    let _span = span.enter();
                    loop {
                        let wishes = {
                            let mut w = shared.wishes.lock().unwrap_or_else(|e| e.into_inner());
                            while w.pending.is_empty() && !w.closed {
                                w = shared.changed.wait(w).unwrap_or_else(|e| e.into_inner());
                            }
                            if w.closed {
                                break;
                            }
                            w.busy = true;
                            std::mem::take(&mut w.pending)
                        };
                        for ((topic, partition), pause) in wishes {
                            set_paused(&consumer, &topic, partition, pause);
                        }
                        shared.wishes.lock().unwrap_or_else(|e| e.into_inner()).busy = false;
                        shared.changed.notify_all();
                    }
                })?
        };
        Ok((
            ConsumerControl {
                handle: Arc::new(ControlHandle(shared.clone())),
            },
            ControlStop { shared, thread },
        ))
    }

    fn request(&self, topic: &str, partition: i32, pause: bool) {
        let shared = &self.handle.0;
        let mut w = shared.wishes.lock().unwrap_or_else(|e| e.into_inner());
        if w.closed {
            return;
        }
        w.pending.insert((topic.to_string(), partition), pause);
        drop(w);
        shared.changed.notify_all();
    }
}

/// Pause (`true`) or resume one partition, if the consumer is still alive.
fn set_paused(consumer: &Weak<SluiceConsumer>, topic: &str, partition: i32, pause: bool) {
    let Some(c) = consumer.upgrade() else { return };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let started = std::time::Instant::now();
    let res = if pause { c.pause(&tpl) } else { c.resume(&tpl) };
    if let Err(e) = res {
        tracing::warn!(%topic, partition, pause, error = %e, "pause/resume failed");
    }
    let took = started.elapsed();
    if took > Duration::from_secs(1) {
        tracing::warn!(%topic, partition, pause, took_ms = took.as_millis() as u64, "librdkafka took long to pause or resume a partition (its broker thread was busy)");
    }
}

impl PartitionControl for ConsumerControl {
    fn pause(&self, topic: &str, partition: i32) {
        self.request(topic, partition, true);
    }
    fn resume(&self, topic: &str, partition: i32) {
        self.request(topic, partition, false);
    }
}

/// Serve the consumer's main queue (rebalances, errors, statistics) on a dedicated thread
/// until `stop` is set. A record seen here was not split to its partition queue: it is
/// reported and its partition is stalled by the coordinator (`stray`).
pub fn spawn_main_queue_thread(
    consumer: Arc<SluiceConsumer>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    stray: mpsc::UnboundedSender<(TopicPartition, i64)>,
) -> std::thread::JoinHandle<()> {
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("sluice-consumer".into())
        .spawn(move || {
            let _span = span.enter();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("consumer thread runtime");
            rt.block_on(async move {
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    tokio::select! {
                        m = consumer.recv() => match m {
                            Ok(m) => {
                                tracing::error!(topic = m.topic(), partition = m.partition(), offset = m.offset(), "record on the main queue (its partition queue was not split); stalling the partition");
                                let _ = stray.send((TopicPartition::new(m.topic(), m.partition()), m.offset()));
                            }
                            Err(e) => tracing::warn!(error = %e, "consumer error"),
                        },
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            });
        })
        .expect("spawn consumer thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pause thread keeps the latest wish per partition, ends at the stop (the join
    /// returns), and takes no wish after it.
    #[test]
    fn the_pause_thread_keeps_the_latest_wish_and_ends_at_the_stop() {
        let (c, stop) = ConsumerControl::new(Weak::new()).expect("thread");
        let shared = c.handle.0.clone();
        // Twenty wishes for two partitions, each pair ending in a resume.
        for i in 0..10 {
            c.pause("t", i % 2);
            c.resume("t", i % 2);
        }
        stop.stop(Duration::from_secs(30));
        let w = shared.wishes.lock().unwrap();
        assert!(w.closed && !w.busy);
        assert!(
            w.pending.len() <= 2 && w.pending.values().all(|p| !p),
            "at most the latest wish of each partition, a resume: {:?}",
            w.pending
        );
        drop(w);
        c.pause("t", 5);
        assert!(
            !shared
                .wishes
                .lock()
                .unwrap()
                .pending
                .contains_key(&("t".to_string(), 5)),
            "no wish after the stop"
        );
    }

    fn stats(
        f: impl FnOnce(&mut rdkafka::statistics::Partition),
    ) -> rdkafka::statistics::Partition {
        let mut s = rdkafka::statistics::Partition {
            leader: 1,
            fetch_state: "active".into(),
            committed_offset: 100,
            lo_offset: 0,
            hi_offset: 200,
            ls_offset: 200,
            next_offset: 150,
            app_offset: 150,
            ..Default::default()
        };
        f(&mut s);
        s
    }

    /// N7: an upstream transaction left open pins the last stable offset; a
    /// `read_committed` worker then has nothing to fetch, however far the high watermark is.
    #[test]
    fn records_behind_an_open_upstream_transaction_are_not_waiting_for_read_committed() {
        let open = stats(|s| {
            s.ls_offset = 150;
            s.hi_offset = 400;
        });
        assert_eq!(
            fetch_view(&open, true),
            FetchView {
                lag: 50,
                waiting: 0
            }
        );
        assert_eq!(
            fetch_view(&open, false).waiting,
            250,
            "read_uncommitted reads on"
        );
    }

    /// N7: a partition without a leader, or whose fetcher is not active, waits for the
    /// cluster, not for a restart.
    #[test]
    fn a_partition_without_a_leader_is_not_waiting() {
        assert_eq!(fetch_view(&stats(|_| {}), true).waiting, 50);
        assert_eq!(fetch_view(&stats(|s| s.leader = -1), true).waiting, 0);
        assert_eq!(
            fetch_view(&stats(|s| s.fetch_state = "offset-query".into()), true).waiting,
            0
        );
        assert_eq!(fetch_view(&stats(|s| s.fetchq_cnt = 7), true).waiting, 7);
    }

    /// N15: a member in a rebalance is joined; only one without a coordinator is not.
    #[test]
    fn a_member_in_a_long_rebalance_counts_as_joined() {
        assert!(group_joined("up"));
        for state in ["init", "query-coord", "wait-coord", "wait-broker", "term"] {
            assert!(!group_joined(state), "{state}");
        }
    }

    #[test]
    fn a_group_without_a_commit_is_not_an_out_of_range_reset() {
        assert!(!super::is_out_of_range_reset("[thrd:main]: in [3]: offset reset (at offset INVALID (leader epoch -1), broker -1) to offset BEGINNING (leader epoch -1): no previously committed offset available: Local: No offset stored"));
        assert!(super::is_out_of_range_reset("[thrd:main]: in [3]: offset reset (at offset 120 (leader epoch 0), broker 1) to offset BEGINNING (leader epoch -1): fetch failed due to requested offset not available on the broker: Broker: Offset out of range"));
    }
}
