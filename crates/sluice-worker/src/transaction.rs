//! Exactly-once delivery (`delivery.guarantee: exactly-once`): Kafka transactions per
//! batch window.
//!
//! One transactional producer per worker process carries every Kafka sink's outputs and
//! every dead letter (all on the source cluster, which validation checks). A transaction
//! covers one window of `delivery.transactionWindow`; at its end the coordinator runs a
//! barrier, like Kafka Streams' commit:
//!
//! ```text
//! close the gate           dispatchers stop handing records to the lanes (TxnGate)
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
//! a new incarnation that reads again from its committed offset (`pipeline.rs`,
//! `rewind`). Any other failure (a partition that stalled, a window that did not drain
//! before `commit.drainTimeout`, a lost assignment, a fatal producer error) stops the
//! worker with an error: the process exits non-zero, and the restarted worker resumes
//! from the offsets the last committed transaction stored. Either way nothing aborted is
//! ever visible to a `read_committed` reader, and nothing committed is written twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureRecord, Producer};

use crate::kafka_log::LoggingContext;

/// The transactional producer (its librdkafka lines through [`crate::kafka_log`]).
pub type FutureProducer = rdkafka::producer::FutureProducer<LoggingContext>;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sluice_api::config::{KafkaSinkConfig, KeySource, SinkConfig, WorkerConfig};
use tokio::sync::{Notify, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::consumer::SluiceConsumer;
use crate::deadletter::DeadLetters;
use crate::partition::PartitionState;
use crate::sink::kafka::classify;
use crate::sink::{Sink, SinkBatch, SinkFailure, SinkMetrics};
use crate::throttle::LogThrottle;

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

/// The barrier between transaction windows: dispatchers hold it shared while they
/// register and hand over a batch; the coordinator holds it exclusively while a window
/// drains and commits. (tokio's lock is fair: once the coordinator waits, no new
/// dispatch starts.)
#[derive(Debug, Default)]
pub struct TxnGate(RwLock<()>);

impl TxnGate {
    /// Dispatch one batch (shared).
    pub async fn enter(&self) -> RwLockReadGuard<'_, ()> {
        self.0.read().await
    }

    /// Stop dispatch (exclusive), once every dispatch in progress has handed its batch over.
    pub async fn close(&self) -> RwLockWriteGuard<'_, ()> {
        self.0.write().await
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
    gate: Arc<TxnGate>,
    timeout: Duration,
    /// Offsets committed by the last transaction, per partition incarnation.
    last: HashMap<(String, i32), (u64, i64)>,
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
        metrics: &crate::metrics::Metrics,
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
            gate: Arc::new(TxnGate::default()),
            timeout,
            last: HashMap::new(),
            latency: metrics.commit_latency.clone(),
            failures: metrics.commit_failures.clone(),
        })
    }

    /// The producer, for the sinks and the dead-letter path.
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// The gate every dispatcher passes (see [`crate::dispatcher::Lane::with_gate`]).
    pub fn gate(&self) -> Arc<TxnGate> {
        self.gate.clone()
    }

    /// End the window (the caller holds the closed [`TxnGate`]): wait (until
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
                let (topic, partition) = (s.topic.to_string(), s.partition);
                return Err(if s.is_stalled() {
                    TxnError::Stalled { topic, partition }
                } else {
                    TxnError::NotDrained { topic, partition }
                });
            }
        }
        let mut todo = Vec::new();
        for s in parts {
            let Some(wm) = s.watermark() else { continue };
            match self.last.get(&(s.topic.to_string(), s.partition)) {
                Some(&(epoch, prev)) if epoch == s.epoch() && prev >= wm => {}
                _ => todo.push((s.clone(), wm)),
            }
        }
        // Nothing moved: nothing was produced either (every output belongs to a record
        // whose completion moves a watermark), so the open transaction is empty.
        if todo.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let mut tpl = TopicPartitionList::with_capacity(todo.len());
        for (s, o) in &todo {
            tpl.add_partition_offset(&s.topic, s.partition, Offset::Offset(*o))
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
            self.last
                .insert((s.topic.to_string(), s.partition), (s.epoch(), *o));
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
    pub fn forget(&mut self, topic: &str, partition: i32) {
        self.last.remove(&(topic.to_string(), partition));
    }
}

/// A Kafka sink writing through the worker's transactional producer: a batch is settled
/// when every delivery report is in (acknowledged inside the open transaction, visible
/// to `read_committed` readers when the window commits).
pub struct TxnKafkaSink {
    producer: FutureProducer,
    topic: String,
    key: KeySource,
    trace_header: Option<String>,
    source_topic: String,
    metrics: SinkMetrics,
    dead_letters: Arc<DeadLetters>,
    outstanding: Arc<AtomicUsize>,
    idle: Arc<Notify>,
    reject_log: Arc<LogThrottle>,
}

impl std::fmt::Debug for TxnKafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnKafkaSink")
            .field("topic", &self.topic)
            .finish()
    }
}

impl TxnKafkaSink {
    /// A sink for `config` over the transactional `producer`.
    pub fn new(
        producer: FutureProducer,
        config: &KafkaSinkConfig,
        source_topic: &str,
        metrics: SinkMetrics,
        dead_letters: Arc<DeadLetters>,
    ) -> Arc<Self> {
        Arc::new(TxnKafkaSink {
            producer,
            topic: config.topic.clone(),
            key: config.key,
            trace_header: config.trace_header.clone(),
            source_topic: source_topic.to_string(),
            metrics,
            dead_letters,
            outstanding: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(Notify::new()),
            reject_log: Arc::new(LogThrottle::default()),
        })
    }
}

impl Sink for TxnKafkaSink {
    fn name(&self) -> &str {
        "kafka"
    }

    fn deliver(&self, batch: SinkBatch) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if batch.items.is_empty() {
                batch.acknowledge(&self.metrics);
                return;
            }
            let mut pending = Vec::with_capacity(batch.items.len());
            let mut rejected = Vec::new();
            for (index, (o, origin)) in batch.items.iter().enumerate() {
                let key = match self.key {
                    KeySource::Output => o.key.as_deref(),
                    KeySource::Input => origin.key.as_deref(),
                };
                let trace = self.trace_header.as_ref().map(|name| {
                    (
                        name.as_str(),
                        format!(
                            "{}/{}/{}",
                            self.source_topic, origin.partition, origin.offset
                        ),
                    )
                });
                let headers = (!o.headers.is_empty() || trace.is_some()).then(|| {
                    o.headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_deref()))
                        .chain(trace.iter().map(|(k, v)| (*k, Some(v.as_bytes()))))
                        .fold(OwnedHeaders::new(), |h, (key, value)| {
                            h.insert(Header { key, value })
                        })
                });
                let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic);
                if let Some(k) = key {
                    rec = rec.key(k);
                }
                if let Some(v) = o.value.as_deref() {
                    rec = rec.payload(v);
                }
                if let Some(h) = headers {
                    rec = rec.headers(h);
                }
                let mut backoff = Duration::from_micros(200);
                loop {
                    match self.producer.send_result(rec) {
                        Ok(f) => {
                            pending.push((index, f));
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            rec = back;
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_millis(50));
                        }
                        // Refused before it joined the transaction (e.g. too large):
                        // dead-lettered like any permanent rejection.
                        Err((e, _)) => {
                            let (_, class) = classify(&e);
                            if let Some(n) = self.reject_log.tick() {
                                tracing::error!(sink = "kafka", topic = %self.topic, error = %e, outputs = n, "the producer refused a record");
                            }
                            rejected.push((
                                index,
                                SinkFailure {
                                    class,
                                    message: e.to_string(),
                                    attempts: 1,
                                },
                            ));
                            break;
                        }
                    }
                }
            }
            self.outstanding.fetch_add(1, Ordering::AcqRel);
            let (metrics, dead_letters, outstanding, idle, log, topic) = (
                self.metrics.clone(),
                self.dead_letters.clone(),
                self.outstanding.clone(),
                self.idle.clone(),
                self.reject_log.clone(),
                self.topic.clone(),
            );
            tokio::spawn(tracing::Instrument::in_current_span(async move {
                for (index, f) in pending {
                    let err = match f.await {
                        Ok(Ok(_)) => continue,
                        Ok(Err((e, _))) => e,
                        Err(_) => KafkaError::Canceled,
                    };
                    // A delivery that failed inside a transaction makes it abortable:
                    // the window's commit fails and everything in it is aborted. The
                    // output is still settled (dead-lettered) so nothing waits forever.
                    if let Some(n) = log.tick() {
                        tracing::error!(sink = "kafka", %topic, error = %err, outputs = n, "an output was not delivered; the transaction will abort");
                    }
                    let (_, class) = classify(&err);
                    rejected.push((
                        index,
                        SinkFailure {
                            class,
                            message: err.to_string(),
                            attempts: 1,
                        },
                    ));
                }
                batch.settle(rejected, "kafka", &metrics, &dead_letters);
                if outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
                    idle.notify_waiters();
                }
            }));
        })
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let idle = self.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if self.outstanding.load(Ordering::Acquire) == 0 {
                    return true;
                }
                if tokio::time::timeout_at(deadline, idle).await.is_err() {
                    return self.outstanding.load(Ordering::Acquire) == 0;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gate: once the coordinator waits to close it, a new dispatch waits until the
    /// window committed; a dispatch in progress finishes first.
    #[tokio::test]
    async fn the_gate_lets_dispatch_in_progress_finish_and_holds_new_dispatch() {
        let gate = Arc::new(TxnGate::default());
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let inside = gate.enter().await;
        let (g2, o2) = (gate.clone(), order.clone());
        let closer = tokio::spawn(async move {
            let _closed = g2.close().await;
            o2.lock().unwrap().push("commit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        tokio::task::yield_now().await;
        assert!(
            !closer.is_finished(),
            "a dispatch in progress holds the barrier"
        );
        let (g3, o3) = (gate.clone(), order.clone());
        let late = tokio::spawn(async move {
            let _in = g3.enter().await;
            o3.lock().unwrap().push("late dispatch");
        });
        tokio::task::yield_now().await;
        assert!(order.lock().unwrap().is_empty());
        drop(inside);
        closer.await.unwrap();
        late.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["commit", "late dispatch"]);
    }

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
