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
//! generation cannot commit offsets, so its transaction fails.
//!
//! A failure aborts the transaction. When only the commit failed, with nothing in
//! flight (the gate closed and drained; typically a rebalance moved the group's
//! generation under the commit), the worker rewinds in place: every owned partition gets
//! a new incarnation that reads again from its committed offset
//! ([`ExactlyOnce::rewind`]). Any other failure (a partition that stalled, a window that did not drain
//! before `commit.drainTimeout`, a lost assignment, a fatal producer error) stops the
//! worker with an error: the process exits non-zero, and the restarted worker resumes
//! from the offsets the last committed transaction stored. Either way nothing aborted is
//! ever visible to a `read_committed` reader, and nothing committed is written twice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;

use crate::kafka::log::LoggingContext;

/// The transactional producer (its librdkafka lines through [`crate::kafka::log`]).
pub type FutureProducer = rdkafka::producer::FutureProducer<LoggingContext>;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sluice_api::config::{SinkConfig, StartFrom, WorkerConfig};

use crate::delivery::Ledger;
use crate::engine::gate::WindowGate;
use crate::engine::partition::{PartitionState, TopicPartition};
use crate::kafka::assignment::Assignment;
use crate::kafka::consumer::SluiceConsumer;

/// Why a transaction could not commit. Each ends the worker (see the module docs).
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
    /// A partition stalled (a batch failed), so its later outputs cannot be committed.
    #[error("partition {topic}/{partition} stalled: a batch of the window failed")]
    Stalled {
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
            TxnError::Stalled { .. } => "stalled",
            TxnError::NotDrained { .. } => "not_drained",
            TxnError::NoGroupMetadata => "no_group_metadata",
            TxnError::Lost => "lost",
            TxnError::Rewind(_) => "rewind",
        }
    }

    /// True when the window failed only at the transactional calls, after everything it
    /// dispatched was acknowledged (nothing of it is still in flight), and the producer
    /// can go on: then the worker aborts and rewinds in place instead of stopping. The
    /// common case is a rebalance racing the commit (the group's generation moved, so
    /// `send_offsets_to_transaction` is refused; KIP-447 fencing at work).
    pub fn rewindable(&self) -> bool {
        match self {
            TxnError::Kafka {
                source: KafkaError::Transaction(e),
                ..
            } => !e.is_fatal(),
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

/// Set the transactional producer's properties on `client` (bootstrap servers and
/// security already there). The Kafka sinks' `producerProperties` are applied last, in
/// sink order (validation refuses two sinks that set one property differently).
pub fn producer_config(client: &mut ClientConfig, config: &WorkerConfig, id: &str, queue_kb: u64) {
    let timeout = config
        .delivery
        .transaction_timeout(config.commit.drain_timeout.0);
    client
        .set("transactional.id", id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("transaction.timeout.ms", timeout.as_millis().to_string())
        // A delivery still failing when the transaction would time out fails the window.
        .set("message.timeout.ms", timeout.as_millis().to_string())
        .set("linger.ms", "2")
        .set("batch.num.messages", "10000")
        .set("batch.size", "1048576")
        .set("queue.buffering.max.messages", "500000")
        .set("queue.buffering.max.kbytes", queue_kb.to_string())
        // Letters carry a record plus its story (as the at-least-once dead-letter path).
        .set("message.max.bytes", "1048000");
    for sink in &config.sinks {
        if let SinkConfig::Kafka(k) = sink {
            for (key, v) in &k.producer_properties {
                client.set(key, v);
            }
        }
    }
}

/// The worker's transactional producer and the state of its open transaction.
pub struct Transactions {
    producer: FutureProducer,
    gate: Arc<WindowGate>,
    timeout: Duration,
    /// Offsets committed by the last transaction, per partition incarnation.
    last: Ledger,
    latency: prometheus::Histogram,
    failures: prometheus::IntCounter,
}

impl std::fmt::Debug for Transactions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transactions").finish_non_exhaustive()
    }
}

/// Run a blocking transactional call off the runtime.
async fn blocking<T: Send + 'static>(
    step: &'static str,
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, TxnError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|source| TxnError::Kafka { step, source }),
        Err(e) => Err(TxnError::Kafka {
            step,
            source: KafkaError::Canceled,
        })
        .inspect_err(|_| tracing::error!(error = %e, step, "transactional call panicked")),
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
    /// Create the producer from `client` (see [`producer_config`]), fence any earlier
    /// producer with the same id (`init_transactions`) and begin the first transaction.
    pub async fn start(
        client: ClientConfig,
        timeout: Duration,
        metrics: &crate::ops::metrics::Metrics,
    ) -> Result<Self, TxnError> {
        let producer: FutureProducer =
            client
                .create_with_context(LoggingContext)
                .map_err(|source| TxnError::Kafka {
                    step: "create the transactional producer",
                    source,
                })?;
        let p = producer.clone();
        blocking("init_transactions", move || p.init_transactions(timeout)).await?;
        producer
            .begin_transaction()
            .map_err(|source| TxnError::Kafka {
                step: "begin_transaction",
                source,
            })?;
        Ok(Transactions {
            producer,
            gate: Arc::new(WindowGate::default()),
            timeout,
            last: Ledger::default(),
            latency: metrics.commit_latency.clone(),
            failures: metrics.commit_failures.clone(),
        })
    }

    /// The producer, for the sinks and the dead-letter path.
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// The gate every dispatcher passes (see [`crate::engine::dispatch::PartitionDispatch::with_gate`]).
    pub fn gate(&self) -> Arc<WindowGate> {
        self.gate.clone()
    }

    /// End the window (the caller holds the closed [`WindowGate`]): wait (until
    /// `deadline`) for everything dispatched in `parts` to be acknowledged, then commit
    /// the transaction with the watermarks of the partitions that moved, and begin the
    /// next one. Returns how many partitions' offsets it committed. On an error the
    /// transaction is left for the caller to abort.
    pub async fn commit_closed(
        &mut self,
        parts: &[Arc<PartitionState>],
        consumer: &Arc<SluiceConsumer>,
        deadline: tokio::time::Instant,
    ) -> Result<usize, TxnError> {
        for s in parts {
            if !s.wait_idle(deadline).await {
                let (topic, partition) = (s.tp().topic.to_string(), s.tp().partition);
                return Err(if s.is_stalled() {
                    TxnError::Stalled { topic, partition }
                } else {
                    TxnError::NotDrained { topic, partition }
                });
            }
        }
        let todo = self.last.moved(parts, false);
        // Nothing moved: nothing was produced either (every output belongs to a record
        // whose completion moves a watermark), so the open transaction is empty.
        if todo.is_empty() {
            return Ok(0);
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
        let cgm = consumer.group_metadata().ok_or(TxnError::NoGroupMetadata)?;
        let (p, timeout) = (self.producer.clone(), self.timeout);
        blocking(
            "send_offsets_to_transaction / commit_transaction",
            move || {
                retrying(timeout, || {
                    p.send_offsets_to_transaction(&tpl, &cgm, timeout)
                })?;
                retrying(timeout, || p.commit_transaction(timeout))?;
                p.begin_transaction()
            },
        )
        .await?;
        self.latency.observe(started.elapsed().as_secs_f64());
        for (s, o) in &todo {
            self.last.record(s, *o);
            s.metrics.committed.set(*o);
        }
        Ok(todo.len())
    }

    /// Abort the open transaction and begin the next one (after a rewindable error).
    pub async fn abort_and_begin(&self) -> Result<(), TxnError> {
        self.failures.inc();
        let (p, timeout) = (self.producer.clone(), self.timeout);
        blocking("abort_transaction / begin_transaction", move || {
            p.abort_transaction(timeout)?;
            p.begin_transaction()
        })
        .await
    }

    /// Abort the open transaction (best effort: a fenced or fatal producer cannot).
    pub async fn abort(&self) {
        self.failures.inc();
        let (p, timeout) = (self.producer.clone(), self.timeout);
        if let Err(e) = blocking("abort_transaction", move || p.abort_transaction(timeout)).await {
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
    window: Duration,
    drain_timeout: Duration,
    start_from: StartFrom,
}

impl ExactlyOnce {
    /// Deliver through `txn`, committing offsets in the group of `consumer`.
    pub fn new(txn: Transactions, consumer: Arc<SluiceConsumer>, config: &WorkerConfig) -> Self {
        ExactlyOnce {
            txn,
            consumer,
            window: config.delivery.transaction_window.0,
            drain_timeout: config.commit.drain_timeout.0,
            start_from: config.source.start_from,
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

    /// The window ended: commit it.
    pub async fn tick(&mut self, owned: &mut Assignment) -> Result<(), TxnError> {
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        self.commit_window(owned, &[], deadline).await.map(|_| ())
    }

    /// `released` were revoked: their outputs share the open transaction with every other
    /// partition's, so the whole window commits now (or, for a lost assignment, is aborted
    /// and the worker stops).
    pub async fn on_revoke(
        &mut self,
        owned: &mut Assignment,
        released: &[Arc<PartitionState>],
        lost: bool,
        deadline: tokio::time::Instant,
    ) -> Result<(), TxnError> {
        if lost {
            self.txn.abort().await;
            return Err(TxnError::Lost);
        }
        self.commit_window(owned, released, deadline)
            .await
            .map(|_| ())
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
        self.commit_window(owned, states, deadline)
            .await
            .map(|_| ())
    }

    /// Forget a partition this process no longer owns.
    pub fn forget(&mut self, tp: &TopicPartition) {
        self.txn.forget(tp);
    }

    /// End the transaction window over every owned partition plus `released` ones (a
    /// revoke's), bounded by `deadline`.
    async fn commit_window(
        &mut self,
        owned: &mut Assignment,
        released: &[Arc<PartitionState>],
        deadline: tokio::time::Instant,
    ) -> Result<usize, TxnError> {
        let mut states = owned.states();
        states.extend(released.iter().cloned());
        // Closed until the window committed, or was aborted and every owned partition
        // rewound: no record of the next window is dispatched before that.
        let gate = self.txn.gate();
        let _closed = gate.close().await;
        let err = match self
            .txn
            .commit_closed(&states, &self.consumer, deadline)
            .await
        {
            Ok(n) => return Ok(n),
            Err(e) => e,
        };
        if !err.rewindable() {
            self.txn.abort().await;
            return Err(err);
        }
        tracing::warn!(error = %err, "exactly-once: the transaction was aborted; every owned partition is processed again from its committed offset");
        self.txn.abort_and_begin().await?;
        self.rewind(owned).await?;
        Ok(0)
    }

    /// After an abort with nothing in flight (the gate closed): replace every owned
    /// partition's incarnation by a new one that reads again from the committed offset.
    /// The old dispatchers (some wait at the gate with records they read) are stopped or
    /// aborted, so what they held is never registered; the seek makes librdkafka discard
    /// what it had fetched beyond.
    async fn rewind(&mut self, owned: &mut Assignment) -> Result<(), TxnError> {
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
        let earliest = self.start_from == StartFrom::Earliest;
        let parts = tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for tp in &keys {
                tpl.add_partition(&tp.topic, tp.partition);
            }
            let committed = consumer
                .committed_offsets(tpl, Duration::from_secs(10))
                .map_err(|e| format!("reading the committed offsets: {e}"))?;
            let mut parts = Vec::new();
            for e in committed.elements() {
                let tp = TopicPartition::new(e.topic(), e.partition());
                let (t, p) = (e.topic(), e.partition());
                let to = match e.offset() {
                    Offset::Offset(o) if o >= 0 => Offset::Offset(o),
                    _ if earliest => Offset::Beginning,
                    _ => return Err(format!("{t}/{p} has no committed offset (startFrom: latest); a restart starts it anew")),
                };
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
                let q = consumer
                    .split_partition_queue(t, p)
                    .ok_or_else(|| format!("could not split the queue of {t}/{p}"))?;
                tracing::info!(topic = %t, partition = p, offset = ?to, "exactly-once: rewound to the committed offset");
                parts.push((tp, q));
            }
            Ok(parts)
        })
        .await
        .map_err(|e| TxnError::Rewind(e.to_string()))?
        .map_err(TxnError::Rewind)?;
        owned.assign(parts);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a failed transactional call (nothing in flight any more) is rewound in place;
    /// work still in flight, a stall, a lost assignment or any other client error stops
    /// the worker, whose outputs of the aborted window could otherwise reach the next one.
    #[test]
    fn only_a_failed_transactional_call_is_rewound_in_place() {
        let (topic, partition) = ("in".to_string(), 0);
        for e in [
            TxnError::NotDrained {
                topic: topic.clone(),
                partition,
            },
            TxnError::Stalled { topic, partition },
            TxnError::Lost,
            TxnError::NoGroupMetadata,
            TxnError::Rewind("seek failed".into()),
            TxnError::Kafka {
                step: "init_transactions",
                source: KafkaError::Canceled,
            },
        ] {
            assert!(!e.rewindable(), "{e} ({})", e.label());
        }
    }

    #[test]
    fn transactional_ids_differ_between_processes_of_one_host() {
        std::env::remove_var("SLUICE_TRANSACTIONAL_ID");
        let id = transactional_id("p");
        assert!(id.starts_with("sluice-p-"), "{id}");
        assert!(id.ends_with(&format!("-{}", std::process::id())), "{id}");
    }
}
