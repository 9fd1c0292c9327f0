//! Exactly-once delivery (`delivery.guarantee: exactly-once`): Kafka transactions per
//! batch window.
//!
//! One transactional producer per worker process carries every Kafka sink's outputs and
//! every dead letter (all on the source cluster, which validation checks). A transaction
//! covers one window of `delivery.transactionWindow`; at its end the coordinator runs a
//! barrier, like Kafka Streams' commit:
//!
//! ```text
//! close the gate           dispatchers stop handing records to the lanes (WindowGate)
//! wait until idle          every dispatched record's outputs (and letters) acknowledged:
//!                          the watermark of each partition == everything dispatched
//! send_offsets_to_transaction(watermarks, the consumer's group metadata)
//! commit_transaction, begin_transaction, open the gate
//! ```
//!
//! so a transaction holds exactly the outputs of the records whose offsets it commits.
//! The group metadata carries the consumer's generation (KIP-447): a zombie of an older
//! generation cannot commit offsets, so its transaction fails. A revoke's window commits
//! with the metadata taken while the partitions were still this member's, so a commit
//! that outlives the rebalance callback is refused rather than accepted under the next
//! generation.
//!
//! A window that cannot commit is aborted and rewound in place, whatever failed: an
//! output lost with a broker or a moved leader, a commit refused because a rebalance moved
//! the group's generation, a window that did not drain in time, a lost assignment. The
//! abort purges what is still queued; once everything the window dispatched has settled
//! (nothing of it can reach the next transaction), the next transaction begins and every
//! owned partition gets a new incarnation that reads again from its committed offset
//! ([`ExactlyOnce::rewind`]). An output the broker refused for good is dead-lettered when
//! the rewound window reaches it again (`sink/kafka_txn.rs`); a record that cannot pass
//! at all (no dead-letter topic) stops its partition there, as at-least-once does. A
//! window that did not drain in time makes the next windows admit fewer records
//! ([`WindowGate::set_budget`]), so a slow processor still commits. A transaction that
//! cannot even be aborted (the broker aborted it itself and fenced the producer, e.g. when
//! it outlived its timeout during a coordinator failover) is left to a new transactional
//! producer with the same id ([`Transactions::renew`]: `init_transactions` fences the old
//! one and finishes what it left open). Only a rewind that cannot read or seek the
//! committed offsets, an aborted window whose work never settles, or producer renewals in
//! a loop stop the worker.
//! Either way nothing aborted is ever visible to a `read_committed` reader, and nothing
//! committed is written twice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sluice_api::config::WorkerConfig;

use std::collections::HashMap;

use crate::kafka::log::LoggingContext;
pub use crate::kafka::producer::FutureProducer;

use crate::delivery::Ledger;
use crate::engine::gate::WindowGate;
use crate::engine::partition::{PartitionState, TopicPartition};
use crate::kafka::assignment::Assignment;
use crate::kafka::consumer::SluiceConsumer;
use crate::kafka::producer::SharedProducer;
use crate::sink::kafka_txn::Refusals;

/// Why a transaction window could not commit.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// A transactional call failed.
    #[error("{step}: {source}")]
    Kafka {
        /// `init_transactions`, `send_offsets_to_transaction`, ...
        step: &'static str,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// A batch of the window failed (an output or a letter not delivered).
    #[error("partition {topic}/{partition}: a batch of the window failed")]
    Failed {
        /// Source topic.
        topic: String,
        /// Source partition.
        partition: i32,
    },
    /// The window's in-flight work did not complete before the deadline.
    #[error("partition {topic}/{partition} did not drain before the deadline")]
    NotDrained {
        /// Source topic.
        topic: String,
        /// Source partition.
        partition: i32,
    },
    /// Dispatch did not stop for the window's end before the deadline (the gate could not
    /// be closed).
    #[error("dispatch did not stop for the window's end before the deadline")]
    NotClosed,
    /// After an abort, what the window dispatched did not settle in time: it could still
    /// reach the next transaction.
    #[error("the aborted window's work did not settle before the transaction timeout")]
    NotSettled,
    /// A transactional call did not return within its time limit (see [`blocking`]).
    #[error("{step}: no answer within {limit:?}")]
    Hung {
        /// The call.
        step: &'static str,
        /// How long it was waited for.
        limit: Duration,
    },
    /// The consumer has no group metadata (not a group member).
    #[error("the consumer has no group metadata")]
    NoGroupMetadata,
    /// An assignment was lost: its uncommitted outputs must not commit.
    #[error("the assignment was lost (session expired)")]
    Lost,
    /// The owned partitions could not be rewound to their committed offsets.
    #[error("rewind: {0}")]
    Rewind(String),
}

impl TxnError {
    /// A short, bounded label.
    pub fn label(&self) -> &'static str {
        match self {
            TxnError::Kafka { .. } => "kafka",
            TxnError::Failed { .. } => "failed",
            TxnError::NotDrained { .. } => "not_drained",
            TxnError::NotClosed => "not_closed",
            TxnError::Hung { .. } => "hung",
            TxnError::NotSettled => "not_settled",
            TxnError::NoGroupMetadata => "no_group_metadata",
            TxnError::Lost => "lost",
            TxnError::Rewind(_) => "rewind",
        }
    }

    /// True when the worker aborts the window and rewinds in place (a producer that cannot
    /// abort any more is renewed first): everything but a rewind that could not read or
    /// seek the committed offsets, an aborted window whose work would not settle, or a
    /// loop of producer renewals.
    pub fn rewindable(&self) -> bool {
        !matches!(self, TxnError::Rewind(_) | TxnError::NotSettled)
    }

    /// True when `init_transactions` failed in a way waiting can cure: it kept failing
    /// with a retriable, non-fatal error (`CONCURRENT_TRANSACTIONS` while the coordinator
    /// cannot complete the old producer's transaction, the coordinator unavailable). Not
    /// a call that did not answer at all ([`TxnError::Hung`]): its producer, with the
    /// same id, may still complete and fence the next one.
    pub fn is_outage(&self) -> bool {
        match self {
            TxnError::Kafka {
                step: "init_transactions",
                source: KafkaError::Transaction(e),
            } => e.is_retriable() && !e.is_fatal(),
            _ => false,
        }
    }
}

/// The `transactional.id` of this worker: `SLUICE_TRANSACTIONAL_ID` if set, else
/// `sluice-<pipeline>-<host name>-<pid>` (the host name is the pod name in Kubernetes).
/// Unique per live process, which is all it needs to be: the consumer group's metadata
/// fences zombies (KIP-447). In the image the worker is PID 1, so a container restarted
/// in its pod keeps the id, and `init_transactions` aborts what its predecessor left open
/// at once; a new pod gets a new id, so a transaction its predecessor left open holds
/// `read_committed` readers back until the broker aborts it (`transaction.timeout.ms`, see
/// [`sluice_api::config::DeliveryConfig::transaction_timeout`]).
pub fn transactional_id(pipeline: &str) -> String {
    if let Ok(id) = std::env::var("SLUICE_TRANSACTIONAL_ID") {
        if !id.trim().is_empty() {
            return id;
        }
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "worker".into());
    format!("sluice-{pipeline}-{host}-{}", std::process::id())
}

/// The worker's transactional producer and the state of its open transaction.
pub struct Transactions {
    producer: SharedProducer,
    /// What the producer is made from (for [`Transactions::renew`]).
    client: ClientConfig,
    /// When the producer was renewed lately (a loop of renewals stops the worker).
    renewals: Vec<Instant>,
    gate: Arc<WindowGate>,
    timeout: Duration,
    /// When the open transaction began.
    began: Instant,
    /// Offsets committed by the last transaction, per partition incarnation.
    last: Ledger,
    latency: prometheus::Histogram,
    failures: prometheus::IntCounter,
    /// Kept beating while a renewal waits out an outage (see [`Transactions::renew`]).
    heartbeat: Option<Arc<crate::ops::health::Health>>,
}

/// How long a renewal keeps starting new attempts for the transaction coordinator to
/// complete the old producer's transaction (a cluster below its quorum cannot) before the
/// worker gives up and exits: a restart cannot do better while the cluster is down. The
/// last attempt can run past it by up to its own limit (2 x the transaction timeout + 5 s).
const OUTAGE_WAIT: Duration = Duration::from_secs(300);

impl std::fmt::Debug for Transactions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transactions").finish_non_exhaustive()
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How much longer than its own timeout a transactional call is waited for.
const CALL_MARGIN: Duration = Duration::from_secs(5);

/// A transactional producer from `client`, its id's earlier producer fenced and what that
/// one left open completed (`init_transactions`, retried while the transaction
/// coordinator is away, up to `timeout`).
async fn init(client: &ClientConfig, timeout: Duration) -> Result<FutureProducer, TxnError> {
    let producer: FutureProducer =
        client
            .create_with_context(LoggingContext)
            .map_err(|source| TxnError::Kafka {
                step: "create the transactional producer",
                source,
            })?;
    let p = producer.clone();
    // Retried for up to `timeout`, each attempt up to `timeout`.
    blocking("init_transactions", timeout * 2 + CALL_MARGIN, move || {
        retrying(timeout, || p.init_transactions(timeout))
    })
    .await?;
    Ok(producer)
}

/// Run a blocking transactional call off the runtime, for at most `limit`.
///
/// librdkafka's transactional calls take a timeout, but not all of them keep it:
/// `send_offsets_to_transaction` waits for its operation's answer without a time limit
/// (`RD_POLL_INFINITE` in librdkafka 2.12) and relies on the requests it sends to time
/// out; after a partition leader (and transaction coordinator) was killed, one was seen
/// to wait for more than 80 s, holding the coordinator's loop until the liveness probe
/// restarted the worker. Past `limit` the call is left behind on its own thread (a
/// thread of the runtime's blocking pool would hold the runtime's shutdown) and the
/// caller gets [`TxnError::Hung`]: the window is given up and, as the producer is still
/// inside that call and cannot abort, a new producer with the same id takes over.
async fn blocking<T: Send + 'static>(
    step: &'static str,
    limit: Duration,
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, TxnError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("sluice-txn".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| {
            tracing::error!(error = %e, step, "could not start a thread for a transactional call");
            TxnError::Kafka {
                step,
                source: KafkaError::Canceled,
            }
        })?;
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(r)) => r.map_err(|source| TxnError::Kafka { step, source }),
        Ok(Err(_)) => {
            tracing::error!(step, "transactional call panicked");
            Err(TxnError::Kafka {
                step,
                source: KafkaError::Canceled,
            })
        }
        Err(_) => {
            tracing::error!(step, ?limit, "a transactional call did not return within its time limit; it is left behind and the window is given up");
            Err(TxnError::Hung { step, limit })
        }
    }
}

/// Call `f` again while it fails with an error librdkafka calls retriable (e.g. a
/// coordinator that moved or timed out), for up to `timeout`; an error that requires an
/// abort, or is fatal, is returned at once.
fn retrying(
    timeout: Duration,
    mut f: impl FnMut() -> Result<(), KafkaError>,
) -> Result<(), KafkaError> {
    let end = Instant::now() + timeout;
    loop {
        match f() {
            Err(KafkaError::Transaction(e))
                if e.is_retriable()
                    && !e.txn_requires_abort()
                    && !e.is_fatal()
                    && Instant::now() < end =>
            {
                tracing::warn!(error = %e, "transactional call failed (retriable); retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

impl Transactions {
    /// Create the producer from `client` (bootstrap servers, security and
    /// `sluice_api::config::clients::transactional_producer`), fence any earlier
    /// producer with the same id (`init_transactions`) and begin the first transaction.
    pub async fn start(
        client: ClientConfig,
        timeout: Duration,
        metrics: &crate::ops::metrics::Metrics,
    ) -> Result<Self, TxnError> {
        let producer = init(&client, timeout).await?;
        producer
            .begin_transaction()
            .map_err(|source| TxnError::Kafka {
                step: "begin_transaction",
                source,
            })?;
        Ok(Transactions {
            producer: SharedProducer::new(producer),
            client,
            renewals: Vec::new(),
            gate: Arc::new(WindowGate::default()),
            timeout,
            began: Instant::now(),
            last: Ledger::default(),
            latency: metrics.commit_latency.clone(),
            failures: metrics.commit_failures.clone(),
            heartbeat: None,
        })
    }

    /// The producer, for the sinks and the dead-letter path.
    pub fn producer(&self) -> &SharedProducer {
        &self.producer
    }

    /// Replace the producer by a new one with the same `transactional.id` (no transaction
    /// open; the caller begins the next): `init_transactions` fences the old producer and
    /// completes what it left open. More than three renewals in five minutes is a loop:
    /// an error.
    pub async fn renew(&mut self, wait_outage: bool) -> Result<(), TxnError> {
        let now = Instant::now();
        self.renewals
            .retain(|t| now.duration_since(*t) < Duration::from_secs(300));
        if self.renewals.len() >= 3 {
            return Err(TxnError::Rewind(
                "the transactional producer was renewed three times in five minutes".into(),
            ));
        }
        let res = self.renew_waiting(now, wait_outage).await;
        // Stamped when it ends: renewals that each wait an outage out are still counted
        // as a loop when they come back to back.
        self.renewals.push(Instant::now());
        res
    }

    async fn renew_waiting(&mut self, now: Instant, wait_outage: bool) -> Result<(), TxnError> {
        // The liveness heartbeat goes on while the renewal waits: the coordinator's loop
        // is inside this call, and a restart would meet the same outage.
        let _beating = self.heartbeat.clone().map(|h| {
            AbortOnDrop(tokio::spawn(async move {
                loop {
                    h.beat();
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }))
        });
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match init(&self.client, self.timeout).await {
                Ok(producer) => {
                    if attempt > 1 {
                        tracing::info!(
                            attempts = attempt,
                            waited_s = now.elapsed().as_secs(),
                            "exactly-once: the transactional producer is renewed; the outage is over"
                        );
                    }
                    self.producer.set(producer);
                    return Ok(());
                }
                Err(e) if wait_outage && e.is_outage() && now.elapsed() < OUTAGE_WAIT => {
                    tracing::warn!(error = %e, attempt, waited_s = now.elapsed().as_secs(),
                        "exactly-once: the transaction coordinator cannot complete the old producer's transaction yet (is the cluster below its quorum?); waiting for it (a restart would meet the same outage)");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Keep `health`'s liveness heartbeat beating while a renewal waits out an outage.
    pub fn with_heartbeat(mut self, health: Arc<crate::ops::health::Health>) -> Self {
        self.heartbeat = Some(health);
        self
    }

    /// The gate every dispatcher passes (see [`crate::engine::dispatch::PartitionDispatch::with_gate`]).
    pub fn gate(&self) -> Arc<WindowGate> {
        self.gate.clone()
    }

    /// Commit the window (everything in `parts` idle, the gate closed): the watermarks of
    /// the partitions that moved go into the transaction with the group metadata `fence`
    /// (the consumer's current one when `None`), the transaction commits and the next
    /// begins. Returns what it committed. On an error the transaction is left for the
    /// caller to abort.
    pub async fn commit_idle(
        &mut self,
        parts: &[Arc<PartitionState>],
        consumer: &Arc<SluiceConsumer>,
        fence: Option<rdkafka::consumer::ConsumerGroupMetadata>,
    ) -> Result<Vec<(Arc<PartitionState>, i64)>, TxnError> {
        let todo = self.last.moved(parts, false);
        // Nothing moved: nothing was produced either (every output belongs to a record
        // whose completion moves a watermark), so the open transaction is empty.
        if todo.is_empty() {
            return Ok(todo);
        }
        let started = Instant::now();
        let mut tpl = TopicPartitionList::with_capacity(todo.len());
        for (s, o) in &todo {
            tpl.add_partition_offset(&s.tp().topic, s.tp().partition, Offset::Offset(*o))
                .map_err(|source| TxnError::Kafka {
                    step: "build the offsets",
                    source,
                })?;
        }
        let cgm = match fence {
            Some(m) => m,
            None => consumer.group_metadata().ok_or(TxnError::NoGroupMetadata)?,
        };
        let (p, timeout) = (self.producer.get(), self.timeout);
        // The broker aborts a transaction older than its timeout anyway: waiting for the
        // commit past that is waiting for nothing.
        let limit = (self.began + timeout + CALL_MARGIN)
            .saturating_duration_since(Instant::now())
            .max(CALL_MARGIN);
        blocking(
            "send_offsets_to_transaction / commit_transaction",
            limit,
            move || {
                retrying(timeout, || {
                    p.send_offsets_to_transaction(&tpl, &cgm, timeout)
                })?;
                retrying(timeout, || p.commit_transaction(timeout))?;
                p.begin_transaction()
            },
        )
        .await?;
        self.began = Instant::now();
        self.latency.observe(started.elapsed().as_secs_f64());
        for (s, o) in &todo {
            self.last.record(s, *o);
            s.metrics.committed.set(*o);
        }
        Ok(todo)
    }

    /// Abort the open transaction, without beginning the next (see [`Transactions::begin`]).
    pub async fn abort_only(&self) -> Result<(), TxnError> {
        self.failures.inc();
        let (p, timeout) = (self.producer.get(), self.timeout);
        blocking("abort_transaction", timeout + CALL_MARGIN, move || {
            p.abort_transaction(timeout)
        })
        .await
    }

    /// Begin the next transaction.
    pub fn begin(&mut self) -> Result<(), TxnError> {
        self.producer
            .get()
            .begin_transaction()
            .map_err(|source| TxnError::Kafka {
                step: "begin_transaction",
                source,
            })?;
        self.began = Instant::now();
        Ok(())
    }

    /// Abort the open transaction (best effort: a fenced or fatal producer cannot).
    pub async fn abort(&self) {
        if let Err(e) = self.abort_only().await {
            tracing::warn!(error = %e, "could not abort the transaction; the broker aborts it after transaction.timeout.ms");
        }
    }

    /// Forget a partition this process no longer owns.
    pub fn forget(&mut self, tp: &TopicPartition) {
        self.last.forget(tp);
    }
}

/// Exactly-once delivery: the transactions, the window barrier and the rewind.
pub struct ExactlyOnce {
    txn: Transactions,
    consumer: Arc<SluiceConsumer>,
    refusals: Arc<Refusals>,
    window: Duration,
    drain_timeout: Duration,
    /// The group metadata taken when a revoke began, while the partitions were still this
    /// member's: the revoke's window commits with it (KIP-447 fencing holds even if the
    /// commit outlives the rebalance callback).
    fence: Option<rdkafka::consumer::ConsumerGroupMetadata>,
    /// Where owned partitions stop for good (a record without a dead-letter path failed):
    /// kept across rewinds, forgotten with the partition.
    stops: HashMap<TopicPartition, i64>,
}

/// How long a rewind waits for an aborted window's work to settle, and how close to the
/// transaction timeout a slow window may run before it is given up.
const SETTLE_MARGIN: Duration = Duration::from_secs(5);

impl ExactlyOnce {
    /// Deliver through `txn`, committing offsets in the group of `consumer`; `refusals` is
    /// shared with the transactional sinks.
    pub fn new(
        txn: Transactions,
        consumer: Arc<SluiceConsumer>,
        refusals: Arc<Refusals>,
        config: &WorkerConfig,
    ) -> Self {
        ExactlyOnce {
            txn,
            consumer,
            refusals,
            window: config.delivery.transaction_window.0,
            drain_timeout: config.commit.drain_timeout.0,
            fence: None,
            stops: HashMap::new(),
        }
    }

    /// How often a window ends.
    pub fn period(&self) -> Duration {
        self.window
    }

    /// The window barrier.
    pub fn gate(&self) -> Arc<WindowGate> {
        self.txn.gate()
    }

    /// A revoke begins (the rebalance callback waits): take the group metadata while
    /// the partitions are still this member's.
    pub fn on_revoke_start(&mut self) {
        self.fence = self.consumer.group_metadata();
    }

    /// The window ended: commit it. A slow window is waited for while it makes progress,
    /// up to the transaction's timeout.
    pub async fn tick(&mut self, owned: &mut Assignment) -> Result<(), TxnError> {
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        self.end_window(owned, &[], deadline, Mode::Tick)
            .await
            .map(|_| ())
    }

    /// `released` were revoked: their outputs share the open transaction with every other
    /// partition's, so the whole window commits now, with the metadata of the generation
    /// that owned them. A lost assignment's window is aborted (another member may own the
    /// partitions already) and the remaining partitions rewound.
    pub async fn on_revoke(
        &mut self,
        owned: &mut Assignment,
        released: &[Arc<PartitionState>],
        lost: bool,
        deadline: tokio::time::Instant,
    ) -> Result<(), TxnError> {
        let mode = if lost { Mode::Lost } else { Mode::Revoke };
        let res = self.end_window(owned, released, deadline, mode).await;
        self.fence = None;
        res.map(|_| ())
    }

    /// Shutting down with `states` released: the last window commits what is done
    /// (nothing else commits); after a failure it is aborted.
    pub async fn on_shutdown(
        &mut self,
        owned: &mut Assignment,
        states: &[Arc<PartitionState>],
        deadline: tokio::time::Instant,
        failed: bool,
    ) -> Result<(), TxnError> {
        if failed {
            self.txn.abort().await;
            return Ok(());
        }
        self.end_window(owned, states, deadline, Mode::Revoke)
            .await
            .map(|_| ())
    }

    /// Forget a partition this process no longer owns.
    pub fn forget(&mut self, tp: &TopicPartition) {
        self.txn.forget(tp);
        self.stops.remove(tp);
    }

    /// End the transaction window over every owned partition plus `released` ones (a
    /// revoke's), bounded by `deadline` (and, for a tick, by the transaction timeout while
    /// the window makes progress). Commits, or aborts and rewinds in place.
    async fn end_window(
        &mut self,
        owned: &mut Assignment,
        released: &[Arc<PartitionState>],
        deadline: tokio::time::Instant,
        mode: Mode,
    ) -> Result<usize, TxnError> {
        let mut states = owned.states();
        states.extend(released.iter().cloned());
        // Closed until the window committed, or was aborted and every owned partition
        // rewound: no record of the next window is dispatched before that.
        let gate = self.txn.gate();
        // Bounded like the rest of the window's end: the gate closes once every dispatch
        // in progress has registered its batch (a dispatcher waiting for room in a full
        // lane is outside it), but a wait of the coordinator on the data path must never
        // be open-ended. If it does not close in time, the window is given up: every
        // partition is cancelled, so whatever is inside gives its batch up, and the gate
        // is closed again; what still holds it then stops the worker.
        let (_closed, unclosed) = match tokio::time::timeout_at(deadline, gate.close()).await {
            Ok(closed) => (closed, None),
            Err(_) => {
                for s in &states {
                    s.cancel();
                }
                match tokio::time::timeout(SETTLE_MARGIN, gate.close()).await {
                    Ok(closed) => (closed, Some(TxnError::NotClosed)),
                    Err(_) => {
                        self.txn.abort().await;
                        return Err(TxnError::NotSettled);
                    }
                }
            }
        };
        let closed_at = Instant::now();
        let admitted = gate.admitted();
        let err = match (unclosed, mode) {
            (Some(e), _) => e,
            (None, Mode::Lost) => TxnError::Lost,
            (None, _) => match self.drain(&states, deadline, mode == Mode::Tick).await {
                Err(e) => e,
                Ok(()) => {
                    let fence = if mode == Mode::Revoke {
                        self.fence.take()
                    } else {
                        None
                    };
                    match self.txn.commit_idle(&states, &self.consumer, fence).await {
                        Ok(done) => {
                            for (s, o) in &done {
                                self.refusals.committed(&s.tp().topic, s.tp().partition, *o);
                            }
                            // A budget set after a slow window grows back while windows
                            // drain well within the drain timeout.
                            if let Some(b) = gate.budget() {
                                if closed_at.elapsed() < self.drain_timeout / 4 {
                                    gate.set_budget(b.checked_mul(2).filter(|b| *b < 1 << 24));
                                }
                            }
                            gate.next_window();
                            return Ok(done.len());
                        }
                        Err(e) => e,
                    }
                }
            },
        };
        if !err.rewindable() {
            self.txn.abort().await;
            return Err(err);
        }
        if let TxnError::Kafka {
            source: KafkaError::Transaction(e),
            ..
        } = &err
        {
            if e.is_fatal() {
                // No abort is possible any more: a new producer takes over below.
                tracing::warn!(error = %err, "exactly-once: the transactional producer failed fatally");
            }
        }
        tracing::warn!(error = %err, "exactly-once: the window was aborted; every owned partition is processed again from its committed offset");
        // Nothing of the window can commit now. What is still queued is purged; wait until
        // everything it dispatched settled (delivered, failed or purged), so nothing of it
        // can reach the next transaction, then begin that one.
        if let Err(e) = self.txn.abort_only().await {
            tracing::warn!(error = %e, "exactly-once: the transaction could not be aborted; a new transactional producer with the same id takes over (it fences the old one and completes what that left open)");
            // Only a running pipeline waits an outage out: at a stop or a revoke the
            // next owner's producer fences this one anyway, and the stop has a deadline.
            self.txn.renew(mode == Mode::Tick).await?;
        }
        for s in &states {
            s.cancel();
        }
        let settle_by = tokio::time::Instant::now() + self.txn.timeout.max(SETTLE_MARGIN);
        for s in &states {
            while !s.is_settled() {
                if tokio::time::Instant::now() >= settle_by {
                    return Err(TxnError::NotSettled);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        self.txn.begin()?;
        if matches!(err, TxnError::NotDrained { .. } | TxnError::NotClosed) {
            // Admit less per window until windows drain in time again.
            let budget = (admitted / 4).max(crate::engine::DISPATCH_BATCH);
            tracing::warn!(
                budget,
                "exactly-once: a window did not drain in time; windows now admit at most this many records"
            );
            gate.set_budget(Some(budget));
        }
        for s in &states {
            if let Some(at) = s.failed_for_good_at() {
                let stop = self.stops.entry(s.tp().clone()).or_insert(at);
                *stop = (*stop).min(at);
            }
        }
        gate.next_window();
        self.rewind(owned).await?;
        Ok(0)
    }

    /// Wait until everything `states` dispatched is acknowledged, or a batch failed, or
    /// `deadline`. `patient`: past the deadline, keep waiting while batches complete,
    /// until the open transaction nears its timeout.
    async fn drain(
        &self,
        states: &[Arc<PartitionState>],
        deadline: tokio::time::Instant,
        patient: bool,
    ) -> Result<(), TxnError> {
        // Half the transaction's timeout: the abort after a window given up must still
        // reach the transaction coordinator before the broker aborts it on its own (a
        // coordinator failover takes seconds).
        let give_up = tokio::time::Instant::from_std(self.txn.began + self.txn.timeout / 2);
        let done = |states: &[Arc<PartitionState>]| -> u64 {
            states.iter().map(|s| s.metrics.delivered.get()).sum()
        };
        let (mut deadline, mut progress) = (deadline, done(states));
        loop {
            if let Some(s) = states.iter().find(|s| s.failed_batches() > 0) {
                return Err(TxnError::Failed {
                    topic: s.tp().topic.to_string(),
                    partition: s.tp().partition,
                });
            }
            let Some(busy) = states.iter().find(|s| !s.is_idle()) else {
                return Ok(());
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                let p = done(states);
                if !(patient && p > progress && now < give_up) {
                    return Err(TxnError::NotDrained {
                        topic: busy.tp().topic.to_string(),
                        partition: busy.tp().partition,
                    });
                }
                progress = p;
                deadline = (now + Duration::from_secs(1)).min(give_up);
            }
            // Woken by the busy partition's progress, or within a millisecond for a
            // failure elsewhere.
            let _ = tokio::time::timeout(Duration::from_millis(1), busy.wait_idle(deadline)).await;
        }
    }

    /// After an abort with nothing in flight (the gate closed): replace every owned
    /// partition's incarnation by a new one that reads again from the committed offset
    /// (from the log start where the group has none: a partition that never had one,
    /// as one added to the topic). The old dispatchers (some wait at the gate with records
    /// they read) are stopped or aborted, so what they held is never registered; the seek
    /// makes librdkafka discard what it had fetched beyond.
    pub async fn rewind(&mut self, owned: &mut Assignment) -> Result<(), TxnError> {
        let keys = owned.keys();
        if keys.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        drop(owned.release(&keys, deadline, false).await);
        for tp in &keys {
            self.txn.forget(tp);
        }
        let consumer = self.consumer.clone();
        let parts = tokio::task::spawn_blocking(move || {
            let committed = crate::kafka::start_from::committed_offsets(&consumer, &keys)?;
            let mut parts = Vec::new();
            for (tp, offset) in committed {
                let (t, p) = (&*tp.topic, tp.partition);
                let to = offset.map_or(Offset::Beginning, Offset::Offset);
                let mut last = String::new();
                let mut sought = false;
                for attempt in 0..10 {
                    if attempt > 0 {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    match consumer.seek(t, p, to, Duration::from_secs(10)) {
                        Ok(()) => {
                            sought = true;
                            break;
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
                if !sought {
                    return Err(format!("seeking {t}/{p} to {to:?}: {last}"));
                }
                let q = sluice_rdkafka_ffi::PartitionFeed::split(&consumer, t, p)
                    .ok_or_else(|| format!("could not split the queue of {t}/{p}"))?;
                tracing::info!(topic = %t, partition = p, offset = ?to, "exactly-once: rewound to the committed offset");
                parts.push((tp, q));
            }
            Ok(parts)
        })
        .await
        .map_err(|e| TxnError::Rewind(e.to_string()))?
        .map_err(TxnError::Rewind)?;
        owned.assign_stopping(parts, &self.stops);
        Ok(())
    }
}

/// Why a window ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Its period passed.
    Tick,
    /// Partitions are revoked (or the worker stops).
    Revoke,
    /// The assignment was lost.
    Lost,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// R4 (two of three brokers down): only a retriable `init_transactions` failure is an
    /// outage to wait out; an unanswered call is not (its producer may still fence the
    /// next), nor is anything else.
    #[test]
    fn only_an_unanswered_or_retriable_init_is_an_outage_to_wait_out() {
        let hung = |step| TxnError::Hung {
            step,
            limit: Duration::from_secs(45),
        };
        assert!(!hung("init_transactions").is_outage());
        assert!(!hung("commit_transaction").is_outage());
        assert!(!TxnError::Kafka {
            step: "init_transactions",
            source: KafkaError::Canceled,
        }
        .is_outage());
        assert!(!TxnError::Kafka {
            step: "create the transactional producer",
            source: KafkaError::ClientCreation("bad".into()),
        }
        .is_outage());
        assert!(!TxnError::NotSettled.is_outage());
    }

    /// A window that cannot commit is rewound in place, whatever failed in it (a producer
    /// that can no longer abort is renewed first); only a rewind that cannot seek or an
    /// aborted window whose work would not settle stops the worker.
    #[test]
    fn a_failed_window_is_rewound_in_place_and_only_a_failed_rewind_stops_the_worker() {
        let (topic, partition) = ("in".to_string(), 0);
        for e in [
            TxnError::NotDrained {
                topic: topic.clone(),
                partition,
            },
            TxnError::Failed {
                topic: topic.clone(),
                partition,
            },
            TxnError::Lost,
            TxnError::NotClosed,
            TxnError::Hung {
                step: "send_offsets_to_transaction",
                limit: Duration::from_secs(25),
            },
            TxnError::NoGroupMetadata,
            TxnError::Kafka {
                step: "commit_transaction",
                source: KafkaError::Canceled,
            },
        ] {
            assert!(e.rewindable(), "{e} ({})", e.label());
        }
        for e in [TxnError::Rewind("seek failed".into()), TxnError::NotSettled] {
            assert!(!e.rewindable(), "{e} ({})", e.label());
        }
    }

    /// Issue 19: `send_offsets_to_transaction` waited for its answer with no time limit
    /// after a partition leader was killed, and the coordinator's loop with it, until the
    /// liveness probe restarted the worker. A call that does not return is given up at
    /// its limit (the window is then rewound, the producer renewed).
    #[tokio::test]
    async fn a_transactional_call_that_never_returns_is_given_up_at_its_limit() {
        let (release, hung) = std::sync::mpsc::channel::<()>();
        let call = blocking(
            "send_offsets_to_transaction",
            Duration::from_millis(100),
            move || {
                let _ = hung.recv();
                Ok(())
            },
        );
        let res = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the coordinator's wait on a transactional call is bounded");
        match res {
            Err(e @ TxnError::Hung { .. }) => assert!(e.rewindable(), "{e}"),
            other => panic!("expected Hung, got {other:?}"),
        }
        drop(release);
        let ok = blocking("commit_transaction", Duration::from_secs(10), || Ok(7)).await;
        assert_eq!(ok.unwrap(), 7, "a call that returns in time is answered");
    }

    #[test]
    fn transactional_ids_differ_between_processes_of_one_host() {
        std::env::remove_var("SLUICE_TRANSACTIONAL_ID");
        let id = transactional_id("p");
        assert!(id.starts_with("sluice-p-"), "{id}");
        assert!(id.ends_with(&format!("-{}", std::process::id())), "{id}");
    }
}
