//! Wiring: builds the sinks and their batchers, the consumer, and runs the coordinator
//! that owns the assigned partitions (dispatcher + worker pool each), commits on an
//! interval, handles rebalances and drains on shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::ClientConfig;
use sluice_api::config::{SinkConfig, StartFrom, WorkerConfig};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::backpressure::{ByteBudget, HoldReason};
use crate::batcher::{run_batcher, Limits, Piece};
use crate::client::base_config;
use crate::committer::CommitResult;
use crate::committer::Committer;
use crate::consumer::{
    spawn_main_queue_thread, ConsumerControl, RebalanceEvent, RevokeProgress, SluiceConsumer,
    SluiceContext,
};
use crate::deadletter::DeadLetters;
use crate::dispatcher::{run_kafka_dispatcher, Lane};
use crate::metrics::Metrics;
use crate::partition::{PartitionControl, PartitionState};
use crate::pool::{lane_geometry, spawn_workers};
use crate::processor::Processor;
use crate::retry::RetryPolicy;
use crate::server::{Health, Limits as HealthLimits};
use crate::sink::kafka::KafkaSink;
use crate::sink::null::NullSink;
use crate::sink::postgres::{PostgresSetupError, PostgresSink};
use crate::sink::stdout::StdoutSink;
use crate::sink::{DynSink, SinkMetrics};
use crate::transaction::{Transactions, TxnError, TxnKafkaSink};

/// Why the pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A Kafka client could not be created or subscribed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Client configuration (e.g. a missing secret).
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    /// The PostgreSQL sink could not start.
    #[error(transparent)]
    Postgres(#[from] PostgresSetupError),
    /// A fatal producer or consumer error; restart resumes from the last commit.
    #[error("fatal {0} error; restarting resumes from the last committed offsets")]
    Fatal(&'static str),
    /// exactly-once: a transaction failed and was aborted (see `transaction.rs`).
    #[error("transaction aborted ({0}); restarting resumes from the offsets of the last committed transaction")]
    Transaction(#[from] TxnError),
}

/// Handles the worker's outside world needs: metrics and health.
#[derive(Clone)]
pub struct Runtime {
    /// Metrics of this pipeline.
    pub metrics: Metrics,
    /// Health of this pipeline.
    pub health: Arc<Health>,
}

impl Runtime {
    /// Fresh metrics and health for `config`.
    pub fn new(config: &WorkerConfig) -> Self {
        Runtime {
            metrics: Metrics::new(&config.pipeline),
            health: Arc::new(Health::default()),
        }
    }
}

struct Sinks {
    senders: Arc<[mpsc::Sender<Piece>]>,
    all: Vec<DynSink>,
    kafka: Vec<Arc<KafkaSink>>,
    batchers: Vec<JoinHandle<()>>,
}

/// The dead-letter path the configuration asks for.
fn build_dead_letters(
    config: &WorkerConfig,
    metrics: &Metrics,
    txn: Option<&Transactions>,
) -> Result<Arc<DeadLetters>, PipelineError> {
    let Some(dl) = &config.dead_letter else {
        return Ok(DeadLetters::stall(metrics));
    };
    if let Some(txn) = txn {
        return Ok(DeadLetters::kafka_transactional(
            txn.producer().clone(),
            &dl.topic,
            metrics,
        ));
    }
    let cfg = base_config(
        dl.bootstrap_servers
            .as_deref()
            .unwrap_or(&config.source.bootstrap_servers),
        &config.source.security,
        &format!("sluice-{}-dead-letter", config.pipeline),
    )?;
    let mut cfg = cfg;
    cfg.set(
        "queue.buffering.max.kbytes",
        output_copy_kb(config).to_string(),
    );
    Ok(DeadLetters::kafka(cfg, &dl.topic, metrics)?)
}

/// The bound of each Kafka producer's own copies of what it sends (its queue,
/// `queue.buffering.max.kbytes`): a quarter of `memory.inFlightBytes`, between 1 MiB and
/// 256 MiB. A full queue makes the sink wait, which backs up to the consumer.
fn output_copy_kb(config: &WorkerConfig) -> u64 {
    (config.memory.in_flight_bytes.0 / 4).clamp(1 << 20, 256 << 20) / 1024
}

async fn build_sinks(
    config: &WorkerConfig,
    metrics: &Metrics,
    dead_letters: &Arc<DeadLetters>,
    txn: Option<&Transactions>,
) -> Result<Sinks, PipelineError> {
    let retry = RetryPolicy::from(&config.retry);
    let limits = Limits {
        max_messages: config.batching.max_messages as usize,
        max_bytes: config.batching.max_bytes.0 as usize,
        linger: config.batching.linger.0,
    };
    let mut senders = Vec::new();
    let mut all = Vec::new();
    let mut kafka = Vec::new();
    let mut batchers = Vec::new();
    for (i, sc) in config.sinks.iter().enumerate() {
        let name = sc.kind();
        let sm = SinkMetrics::new(metrics, name);
        let sink: DynSink = match sc {
            SinkConfig::Kafka(k) if txn.is_some() => TxnKafkaSink::new(
                txn.expect("exactly-once").producer().clone(),
                k,
                &config.source.topic,
                sm,
                dead_letters.clone(),
            ),
            SinkConfig::Kafka(k) => {
                let cfg = base_config(
                    k.bootstrap_servers
                        .as_deref()
                        .unwrap_or(&config.source.bootstrap_servers),
                    &config.source.security,
                    &format!("sluice-{}-sink{i}", config.pipeline),
                )?;
                let mut cfg = cfg;
                cfg.set(
                    "queue.buffering.max.kbytes",
                    output_copy_kb(config).to_string(),
                );
                let s = KafkaSink::new(
                    cfg,
                    k,
                    &config.source.topic,
                    retry.clone(),
                    sm,
                    dead_letters.clone(),
                )?;
                kafka.push(s.clone());
                s
            }
            SinkConfig::Postgres(pg) => {
                PostgresSink::connect(pg, retry.clone(), sm, dead_letters.clone()).await?
            }
            SinkConfig::Null {} => Arc::new(NullSink::new(sm)),
            SinkConfig::Stdout {} => Arc::new(StdoutSink::new(sm)),
        };
        let (tx, rx) = mpsc::channel(256);
        senders.push(tx);
        batchers.push(tokio::spawn(tracing::Instrument::in_current_span(
            run_batcher(rx, sink.clone(), limits, metrics.clone()),
        )));
        all.push(sink);
    }
    Ok(Sinks {
        senders: senders.into(),
        all,
        kafka,
        batchers,
    })
}

/// How often librdkafka reports statistics (lag; a liveness rule).
const STATISTICS_INTERVAL: Duration = Duration::from_secs(5);

/// How many partitions the input topic has (a worker may own all of them), asked with a
/// short-lived client before the consumer is made; `None` when the broker does not say.
async fn input_partitions(config: &WorkerConfig) -> Option<usize> {
    let s = &config.source;
    let cfg = base_config(
        &s.bootstrap_servers,
        &s.security,
        &format!("sluice-{}-metadata", config.pipeline),
    )
    .ok()?;
    let topic = s.topic.clone();
    tokio::task::spawn_blocking(move || {
        let c: rdkafka::consumer::BaseConsumer = cfg.create().ok()?;
        for _ in 0..3 {
            if let Ok(md) = c.fetch_metadata(Some(&topic), Duration::from_secs(10)) {
                if let Some(t) = md.topics().first().filter(|t| t.error().is_none()) {
                    if !t.partitions().is_empty() {
                        return Some(t.partitions().len());
                    }
                }
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// Partitions assumed when the broker does not tell how many the input topic has.
const ASSUMED_PARTITIONS: usize = 64;

/// librdkafka's prefetch, bounded in total by `memory.fetchBuffer` however many
/// partitions this worker owns: with split partition queues librdkafka applies
/// `queued.max.messages.kbytes` and `queued.min.messages` to *each* partition, so each
/// gets `fetchBuffer / partitions of the topic`; one fetch response is at most
/// `fetchBuffer` too (`fetch.max.bytes`).
fn prefetch_limits(fetch_buffer: u64, partitions: usize) -> (u64, u64, u64, u64) {
    let parts = partitions.max(1) as u64;
    let per_partition_kb = (fetch_buffer / 1024 / parts).max(16);
    let min_messages = (100_000 / parts).clamp(100, 10_000);
    let fetch_max = fetch_buffer.clamp(1 << 20, 50 << 20);
    let per_partition_fetch = (per_partition_kb * 1024).clamp(64 << 10, 1 << 20);
    (
        per_partition_kb,
        min_messages,
        fetch_max,
        per_partition_fetch,
    )
}

fn consumer_config(
    config: &WorkerConfig,
    partitions: usize,
) -> Result<ClientConfig, PipelineError> {
    let s = &config.source;
    let mut c = base_config(
        &s.bootstrap_servers,
        &s.security,
        &format!("sluice-{}", config.pipeline),
    )?;
    let (fetch_kb, min_messages, fetch_max, partition_fetch) =
        prefetch_limits(config.memory.fetch_buffer.0, partitions);
    c.set("queued.min.messages", min_messages.to_string())
        .set("fetch.max.bytes", fetch_max.to_string())
        .set("max.partition.fetch.bytes", partition_fetch.to_string());
    c.set("group.id", &s.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // Always `earliest`: librdkafka applies it to a group without a commit *and* to a
        // committed offset that is out of range (retention or a deletion passed it while
        // the group was stopped or paused), and in the second case jumping to the end
        // would skip every retained record. `startFrom: latest` is applied per partition
        // at assignment, only where the group has no commit (`start_at_end_if_uncommitted`).
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            s.session_timeout.0.as_millis().to_string(),
        )
        .set("partition.assignment.strategy", "cooperative-sticky")
        // An offset commit cannot be cancelled, and while one is outstanding librdkafka
        // does not rejoin after a lost assignment: bound every request (a commit waiting
        // for an absent coordinator included) by the session timeout, not 60 s.
        .set(
            "socket.timeout.ms",
            s.session_timeout.0.as_millis().max(10_000).to_string(),
        )
        .set(
            "statistics.interval.ms",
            STATISTICS_INTERVAL.as_millis().to_string(),
        )
        .set("queued.max.messages.kbytes", fetch_kb.to_string())
        // With capped queues, librdkafka backs off fetching for a second by default.
        .set("fetch.queue.backoff.ms", "10");
    if let Some(id) = &s.group_instance_id {
        c.set("group.instance.id", id);
    }
    for (k, v) in &s.consumer_properties {
        c.set(k, v);
    }
    Ok(c)
}

/// `startFrom: latest` for one partition: when the group has no committed offset for it,
/// move its position to the end of the log before anything is read. (A committed offset,
/// even one out of range, is resumed from; see `auto.offset.reset` above.) If the
/// committed offset cannot be read, the partition starts at the earliest record, so
/// nothing is skipped.
async fn start_at_end_if_uncommitted(
    consumer: std::sync::Weak<SluiceConsumer>,
    topic: String,
    partition: i32,
) {
    use rdkafka::{Offset, TopicPartitionList};
    let t = topic.clone();
    let res = tokio::task::spawn_blocking(move || -> Result<bool, String> {
        let mut last = String::new();
        for attempt in 0..10 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            let Some(c) = consumer.upgrade() else {
                return Ok(false);
            };
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&t, partition);
            let committed = match c.committed_offsets(tpl, Duration::from_secs(10)) {
                Ok(c) => c,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let has_commit = committed
                .elements()
                .first()
                .is_some_and(|e| matches!(e.offset(), Offset::Offset(o) if o >= 0));
            if has_commit {
                return Ok(false);
            }
            match c.seek(&t, partition, Offset::End, Duration::from_secs(10)) {
                Ok(()) => return Ok(true),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match res {
        Ok(true) => {
            tracing::info!(%topic, partition, "startFrom: latest: the group has no commit for this partition; starting at the end of the log")
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(%topic, partition, error = %e, "startFrom: latest: could not read the committed offset or seek to the end; starting at the earliest record instead (nothing is skipped)")
        }
    }
}

struct Owned {
    state: Arc<PartitionState>,
    stop: watch::Sender<bool>,
    dispatcher: JoinHandle<()>,
}

struct Coordinator {
    config: WorkerConfig,
    processor: Arc<dyn Processor>,
    metrics: Metrics,
    consumer: Arc<SluiceConsumer>,
    control: Arc<dyn PartitionControl>,
    budget: ByteBudget,
    sinks: Arc<[mpsc::Sender<Piece>]>,
    dead_letters: Arc<DeadLetters>,
    owned: HashMap<(String, i32), Owned>,
    committer: Committer,
    /// Since when periodic commits of the current assignment have failed, and whether
    /// fetching is held for it. Reset by every rebalance: a hold belongs to the
    /// assignment it was taken in.
    commit_failing: Option<(Instant, bool)>,
    /// Commits were failing when the previous assignment ended (see `new_generation`).
    commits_suspect: bool,
    /// Bumped by every assignment change; a commit answer from an older generation does
    /// not count for the commit-failure hold.
    generation: u64,
    /// The epoch of the next partition incarnation.
    next_epoch: u64,
    health: Arc<Health>,
    stuck_log: crate::throttle::LogThrottle,
    commit_log: crate::throttle::LogThrottle,
    /// exactly-once: the transactional producer; offsets are committed only through it.
    txn: Option<Transactions>,
    /// exactly-once: a transaction failed during a rebalance; the worker stops.
    txn_failed: Option<TxnError>,
}

impl Coordinator {
    fn assign(
        &mut self,
        parts: Vec<(
            String,
            i32,
            rdkafka::consumer::stream_consumer::StreamPartitionQueue<SluiceContext>,
        )>,
    ) {
        self.new_generation();
        for (topic, p, queue) in parts {
            let key = (topic.clone(), p);
            if self.owned.contains_key(&key) {
                tracing::warn!(%topic, partition = p, "assigned a partition this worker already owns");
                continue;
            }
            let pm = self.metrics.partition(&topic, p);
            let w = &self.config.workers;
            self.next_epoch += 1;
            let state = PartitionState::with_epoch(
                topic.as_str().into(),
                p,
                w.queue_capacity as usize,
                self.control.clone(),
                pm,
                self.metrics.processing_latency.clone(),
                self.next_epoch,
            );
            self.consumer
                .context()
                .owned
                .lock()
                .expect("owned lock")
                .insert(key.clone(), state.clone());
            let (lanes, slots) = lane_geometry(w);
            let (txs, _workers) = spawn_workers(
                &state,
                lanes,
                slots,
                self.processor.clone(),
                self.sinks.clone(),
                self.dead_letters.clone(),
            );
            // librdkafka keeps a partition's pause flag across assignments: a partition that
            // was paused when it was revoked would come back paused and never be fetched.
            self.control.resume(&topic, p);
            let topic = topic.clone();
            let lane = Lane::new(state.clone(), txs, w.ordering, self.budget.clone())
                .with_gate(self.txn.as_ref().map(Transactions::gate));
            let (stop, stop_rx) = watch::channel(false);
            let latest = (self.config.source.start_from == StartFrom::Latest)
                .then(|| Arc::downgrade(&self.consumer));
            let dispatcher = tokio::spawn(tracing::Instrument::in_current_span(async move {
                if let Some(consumer) = latest {
                    start_at_end_if_uncommitted(consumer, topic, p).await;
                }
                run_kafka_dispatcher(queue, lane, stop_rx).await
            }));
            self.owned.insert(
                key,
                Owned {
                    state,
                    stop,
                    dispatcher,
                },
            );
        }
        self.health.joined();
        self.metrics
            .assigned_partitions
            .set(self.owned.len() as i64);
    }

    /// A rebalance starts a new assignment: a commit-failure hold of the old one ends.
    /// If commits were failing when it ended, the new assignment is held at its first
    /// failed commit rather than after `hold_after` (the coordinator is probably still
    /// away; a fast catch-up would otherwise be redelivered), but only a failure of its
    /// own starts that hold, and its first success or the next rebalance ends it.
    fn new_generation(&mut self) {
        self.generation += 1;
        let failing = self.commit_failing.take();
        self.commits_suspect |= failing.is_some();
        if failing.is_some_and(|(_, held)| held) {
            tracing::info!("assignment changed: the commit-failure hold ends with it");
        }
        for o in self.owned.values() {
            o.state.hold(HoldReason::CommitFailing, false);
        }
    }

    /// Stop the dispatchers of `keys`, bounded by `deadline`; then abort and await
    /// whatever is left, so every queue handle is dropped. The states are retired first
    /// (no pause/resume from them reaches the consumer any more) and returned.
    async fn release(
        &mut self,
        keys: &[(String, i32)],
        deadline: tokio::time::Instant,
        pause: bool,
    ) -> Vec<Arc<PartitionState>> {
        let mut states = Vec::new();
        for k in keys {
            if let Some(o) = self.owned.get(k) {
                if pause {
                    o.state.hold(HoldReason::Draining, true);
                } else {
                    o.state.retire();
                }
                let _ = o.stop.send(true);
            }
        }
        for k in keys {
            let Some(mut o) = self.owned.remove(k) else {
                continue;
            };
            if tokio::time::timeout_at(deadline, &mut o.dispatcher)
                .await
                .is_err()
            {
                tracing::warn!(topic = %k.0, partition = k.1, "dispatcher did not stop before the deadline; aborted");
                o.dispatcher.abort();
                let _ = (&mut o.dispatcher).await;
            }
            o.state.retire();
            self.consumer
                .context()
                .owned
                .lock()
                .expect("owned lock")
                .remove(k);
            states.push(o.state);
        }
        self.metrics
            .assigned_partitions
            .set(self.owned.len() as i64);
        states
    }

    /// Wait (until `deadline`) for the in-flight work of `states`, then commit it.
    async fn drain(&mut self, states: &[Arc<PartitionState>], deadline: tokio::time::Instant) {
        for s in states {
            if !s.wait_idle(deadline).await && !s.is_stalled() {
                tracing::warn!(topic = %s.topic, partition = s.partition, "in-flight work did not finish before the drain deadline; it will be redelivered");
            }
        }
        if let Err(e) = self
            .committer
            .commit_by(states, self.generation, deadline)
            .await
        {
            tracing::error!(error = %e, "commit after drain failed; uncommitted work will be redelivered");
        }
    }

    /// Give up `keys`: a barrier for the rebalance callback (see `consumer.rs`), then
    /// (unless the assignment was lost) drain and commit.
    async fn revoke(
        &mut self,
        keys: Vec<(String, i32)>,
        lost: bool,
        done: &std::sync::mpsc::SyncSender<RevokeProgress>,
    ) {
        self.new_generation();
        let deadline = tokio::time::Instant::now()
            + if lost {
                Duration::from_millis(100)
            } else {
                self.config.commit.drain_timeout.0
            };
        let states = self.release(&keys, deadline, false).await;
        let _ = done.send(RevokeProgress::Released);
        if self.txn.is_some() {
            // exactly-once: the revoked partitions' outputs share the open transaction
            // with every other partition's, so the whole window commits now (or, for a
            // lost assignment, is aborted and the worker restarts).
            let res = if lost {
                Err(TxnError::Lost)
            } else {
                self.commit_window(&states, deadline).await
            };
            if let Err(e) = res {
                if lost {
                    if let Some(txn) = &self.txn {
                        txn.abort().await;
                    }
                }
                self.txn_failed.get_or_insert(e);
            }
        } else if !lost {
            self.drain(&states, deadline).await;
        }
        for k in &keys {
            if let Some(txn) = &mut self.txn {
                txn.forget(&k.0, k.1);
            }
            self.committer.forget(&k.0, k.1);
            self.metrics.forget_partition(&k.0, k.1);
        }
    }

    /// exactly-once: end the transaction window over every owned partition plus
    /// `released` ones (a revoke's), bounded by `deadline`.
    async fn commit_window(
        &mut self,
        released: &[Arc<PartitionState>],
        deadline: tokio::time::Instant,
    ) -> Result<usize, TxnError> {
        let mut states: Vec<_> = self.owned.values().map(|o| o.state.clone()).collect();
        states.extend(released.iter().cloned());
        let Some(txn) = self.txn.as_mut() else {
            return Ok(0);
        };
        // Closed until the window committed, or was aborted and every owned partition
        // rewound: no record of the next window is dispatched before that.
        let gate = txn.gate();
        let _closed = gate.close().await;
        let err = match txn.commit_closed(&states, &self.consumer, deadline).await {
            Ok(n) => return Ok(n),
            Err(e) => e,
        };
        if !err.rewindable() {
            txn.abort().await;
            return Err(err);
        }
        tracing::warn!(error = %err, "exactly-once: the transaction was aborted; every owned partition is processed again from its committed offset");
        txn.abort_and_begin().await?;
        self.rewind().await?;
        Ok(0)
    }

    /// exactly-once, after an abort with nothing in flight (the gate closed): replace
    /// every owned partition's incarnation by a new one that reads again from the
    /// committed offset. The old dispatchers (some wait at the gate with records they
    /// read) are stopped or aborted, so what they held is never registered; the seek
    /// makes librdkafka discard what it had fetched beyond.
    async fn rewind(&mut self) -> Result<(), TxnError> {
        use rdkafka::{Offset, TopicPartitionList};
        let keys: Vec<_> = self.owned.keys().cloned().collect();
        if keys.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        drop(self.release(&keys, deadline, false).await);
        if let Some(txn) = &mut self.txn {
            for (t, p) in &keys {
                txn.forget(t, *p);
            }
        }
        let consumer = self.consumer.clone();
        let earliest = self.config.source.start_from == StartFrom::Earliest;
        let parts = tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for (t, p) in &keys {
                tpl.add_partition(t, *p);
            }
            let committed = consumer
                .committed_offsets(tpl, Duration::from_secs(10))
                .map_err(|e| format!("reading the committed offsets: {e}"))?;
            let mut parts = Vec::new();
            for e in committed.elements() {
                let (t, p) = (e.topic().to_string(), e.partition());
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
                    match consumer.seek(&t, p, to, Duration::from_secs(10)) {
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
                    .split_partition_queue(&t, p)
                    .ok_or_else(|| format!("could not split the queue of {t}/{p}"))?;
                tracing::info!(topic = %t, partition = p, offset = ?to, "exactly-once: rewound to the committed offset");
                parts.push((t, p, q));
            }
            Ok(parts)
        })
        .await
        .map_err(|e| TxnError::Rewind(e.to_string()))?
        .map_err(TxnError::Rewind)?;
        self.assign(parts);
        Ok(())
    }

    fn hold_after(&self) -> Duration {
        (self.config.commit.interval.0 * 2).max(Duration::from_secs(2))
    }

    /// The commit interval ticked: start a commit, unless one is still unanswered (at
    /// most one in flight; one unanswered past `hold_after` counts as failing).
    fn commit_tick(&mut self) {
        let hold_after = self.hold_after();
        if let Some(pending) = self.committer.pending_for() {
            if pending >= hold_after {
                // Failing since it was sent: no new commit is started meanwhile.
                let since = Instant::now() - pending;
                self.commit_failed(format!("no answer for {pending:?}"), since);
            }
            return;
        }
        let states: Vec<_> = self.owned.values().map(|o| o.state.clone()).collect();
        // While commits fail, commit again even what did not move: the answer tells
        // whether the coordinator is back (held partitions move nothing).
        let force = self.commit_failing.is_some();
        self.committer.start(&states, self.generation, force);
    }

    fn commit_answered(&mut self, r: CommitResult) {
        if r.generation != self.generation {
            return;
        }
        match r.result {
            Ok(_) => {
                self.commits_suspect = false;
                if let Some((since, held)) = self.commit_failing.take() {
                    if held {
                        tracing::info!(failing_for = ?since.elapsed(), "commits succeed again; fetching resumes");
                    }
                    for o in self.owned.values() {
                        o.state.hold(HoldReason::CommitFailing, false);
                    }
                }
            }
            Err(e) => self.commit_failed(e, Instant::now()),
        }
    }

    /// A periodic commit failed (or has had no answer), as of `at`.
    fn commit_failed(&mut self, e: String, at: Instant) {
        let hold_after = self.hold_after();
        let (since, held) = self.commit_failing.get_or_insert((at, false));
        if let Some(n) = self.commit_log.tick() {
            tracing::warn!(error = %e, failing_for = ?since.elapsed(), checks = n, "periodic commit failed; retrying (one commit in flight at a time)");
        }
        if !*held && (since.elapsed() >= hold_after || self.commits_suspect) {
            // Work done now could not be committed: it would only be delivered again
            // after the group settles. Hold fetching until a commit goes through (or the
            // assignment changes), so what is redelivered stays bounded.
            tracing::warn!(
                ?hold_after,
                "commits keep failing; fetching is held until one succeeds or the assignment changes"
            );
            *held = true;
        }
        if *held {
            for o in self.owned.values() {
                o.state.hold(HoldReason::CommitFailing, true);
            }
        }
    }

    /// Liveness: count the partitions stuck in fetch past the limit.
    fn check_progress(&mut self) {
        self.health.beat();
        let limit = self.config.server.fetch_stall_timeout.0.as_millis() as u64;
        let now = crate::clock_ms();
        let stuck: Vec<_> = self
            .owned
            .values()
            .filter(|o| o.state.fetch_stalled_ms(now) > limit)
            .map(|o| o.state.partition)
            .collect();
        if !stuck.is_empty() {
            if let Some(n) = self.stuck_log.tick() {
                tracing::error!(partitions = ?stuck, limit = ?self.config.server.fetch_stall_timeout.0, checks = n,
                    "partitions with records to fetch and no hold received nothing for too long; /healthz fails");
            }
        }
        self.health.set_stuck_partitions(stuck.len() as u64);
        self.metrics
            .fetch_stalled_partitions
            .set(stuck.len() as i64);
    }

    fn in_flight_bytes(&self) -> u64 {
        self.budget.in_use()
    }
}

/// Run the pipeline until `shutdown` resolves, then drain, flush and commit. Every log
/// line of the pipeline (its tasks and its consumer thread) carries the `pipeline`,
/// `topic` and `group` fields of this span.
pub async fn run_pipeline(
    config: WorkerConfig,
    processor: Arc<dyn Processor>,
    rt: Runtime,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PipelineError> {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "pipeline",
        pipeline = %config.pipeline,
        topic = %config.source.topic,
        group = %config.source.group_id
    );
    run(config, processor, rt, shutdown).instrument(span).await
}

async fn run(
    config: WorkerConfig,
    processor: Arc<dyn Processor>,
    rt: Runtime,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PipelineError> {
    let metrics = rt.metrics.clone();
    let txn = if config.delivery.exactly_once() {
        let mut client = base_config(
            &config.source.bootstrap_servers,
            &config.source.security,
            &format!("sluice-{}-txn", config.pipeline),
        )?;
        let id = crate::transaction::transactional_id(&config.pipeline);
        crate::transaction::producer_config(&mut client, &config, &id, output_copy_kb(&config));
        let t = Transactions::start(
            client,
            config
                .delivery
                .transaction_timeout(config.commit.drain_timeout.0),
            &metrics,
        )
        .await?;
        tracing::info!(transactional_id = %id, window = %config.delivery.transaction_window, "exactly-once: transactional producer ready");
        Some(t)
    } else {
        None
    };
    let dead_letters = build_dead_letters(&config, &metrics, txn.as_ref())?;
    let sinks = build_sinks(&config, &metrics, &dead_letters, txn.as_ref()).await?;

    let partitions = match input_partitions(&config).await {
        Some(n) => n,
        None => {
            tracing::warn!(
                assumed = ASSUMED_PARTITIONS,
                "could not read the input topic's partition count; sizing librdkafka's prefetch for {ASSUMED_PARTITIONS} partitions"
            );
            ASSUMED_PARTITIONS
        }
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    // The revoke callback waits a little longer than the drain itself, so the drain's own
    // deadline is what normally ends it.
    let revoke_timeout = config.commit.drain_timeout.0 + Duration::from_secs(2);
    let ctx = SluiceContext::new(
        events_tx,
        revoke_timeout,
        metrics.clone(),
        rt.health.clone(),
    );
    let mut consumer_cfg = consumer_config(&config, partitions)?;
    if txn.is_some() {
        // Records of aborted upstream transactions are never processed.
        consumer_cfg.set("isolation.level", "read_committed");
    }
    let consumer: Arc<SluiceConsumer> = Arc::new(consumer_cfg.create_with_context(ctx)?);
    SluiceContext::attach(&consumer);
    consumer.subscribe(&[&config.source.topic])?;
    let stop_poller = Arc::new(AtomicBool::new(false));
    let (stray_tx, mut stray) = mpsc::unbounded_channel();
    let poller = spawn_main_queue_thread(consumer.clone(), stop_poller.clone(), stray_tx);
    rt.health.start(HealthLimits {
        coordinator: config.commit.drain_timeout.0 * 2 + Duration::from_secs(30),
        statistics: STATISTICS_INTERVAL * 3,
        callback: revoke_timeout,
        unjoined: config.source.session_timeout.0,
        fetch_stall: config.server.fetch_stall_timeout.0,
    });
    rt.health.ready.store(true, AtomicOrdering::Release);
    tracing::info!(pipeline = %config.pipeline, topic = %config.source.topic, group = %config.source.group_id, "pipeline started");

    let mut co = Coordinator {
        processor,
        metrics: metrics.clone(),
        control: Arc::new(ConsumerControl(Arc::downgrade(&consumer))),
        budget: ByteBudget::new(config.memory.in_flight_bytes.0),
        sinks: sinks.senders.clone(),
        dead_letters: dead_letters.clone(),
        owned: HashMap::new(),
        committer: Committer::new(
            consumer.clone(),
            metrics.commit_latency.clone(),
            metrics.commit_failures.clone(),
        ),
        commit_failing: None,
        commits_suspect: false,
        generation: 0,
        next_epoch: 0,
        health: rt.health.clone(),
        stuck_log: crate::throttle::LogThrottle::new(Duration::from_secs(30)),
        commit_log: crate::throttle::LogThrottle::new(Duration::from_secs(5)),
        consumer: consumer.clone(),
        txn,
        txn_failed: None,
        config,
    };
    // exactly-once: the tick ends a transaction window instead of committing offsets.
    let mut commit_tick = tokio::time::interval(if co.txn.is_some() {
        co.config.delivery.transaction_window.0
    } else {
        co.config.commit.interval.0
    });
    commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check_tick = tokio::time::interval(Duration::from_millis(500));
    tokio::pin!(shutdown);
    let mut result = Ok(());
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => {
                tracing::info!("shutdown requested: stop fetching, drain, flush, commit");
                break;
            }
            Some(ev) = events.recv() => match ev {
                RebalanceEvent::Assigned(parts) => co.assign(parts),
                RebalanceEvent::AssignApplied(parts) => {
                    for k in &parts {
                        if let Some(o) = co.owned.get(k) {
                            o.state.restate_pause();
                        }
                    }
                }
                RebalanceEvent::Revoked { partitions, lost, done } => {
                    co.revoke(partitions, lost, &done).await;
                    let _ = done.send(RevokeProgress::Done);
                    if let Some(e) = co.txn_failed.take() {
                        tracing::error!(error = %e, "exactly-once: the transaction was aborted during a rebalance; stopping (a restart resumes from the last committed transaction)");
                        result = Err(PipelineError::Transaction(e));
                        break;
                    }
                }
            },
            r = co.committer.answered() => co.commit_answered(r),
            Some((t, p, _offset)) = stray.recv() => {
                if let Some(o) = co.owned.get(&(t, p)) {
                    o.state.stall("a record arrived on the consumer's main queue");
                }
            }
            _ = commit_tick.tick() => {
                if co.txn.is_none() {
                    co.commit_tick();
                    continue;
                }
                let deadline = tokio::time::Instant::now() + co.config.commit.drain_timeout.0;
                if let Err(e) = co.commit_window(&[], deadline).await {
                    tracing::error!(error = %e, "exactly-once: the transaction was aborted; stopping (a restart resumes from the last committed transaction)");
                    result = Err(PipelineError::Transaction(e));
                    break;
                }
            }
            _ = check_tick.tick() => {
                co.check_progress();
                metrics.in_flight_bytes.set(co.in_flight_bytes() as i64);
                if sinks.kafka.iter().any(|k| k.fatal()) {
                    result = Err(PipelineError::Fatal("producer"));
                    break;
                }
                if consumer.context().is_fatal() {
                    result = Err(PipelineError::Fatal("consumer"));
                    break;
                }
            }
        }
    }
    rt.health.ready.store(false, AtomicOrdering::Release);
    if result.is_err() {
        rt.health.failed.store(true, AtomicOrdering::Release);
    }

    // Stop fetching, drain every partition, commit what is done.
    let keys: Vec<_> = co.owned.keys().cloned().collect();
    let deadline = tokio::time::Instant::now() + co.config.commit.drain_timeout.0;
    let states = co.release(&keys, deadline, true).await;
    if co.txn.is_none() {
        co.drain(&states, deadline).await;
    } else if result.is_ok() {
        // exactly-once: the last window commits what is done; nothing else commits.
        if let Err(e) = co.commit_window(&states, deadline).await {
            tracing::error!(error = %e, "exactly-once: the last transaction was aborted; its records will be processed again");
            result = Err(PipelineError::Transaction(e));
        }
    } else if let Some(txn) = &co.txn {
        txn.abort().await;
    }
    // Closing the batchers' inputs flushes what they hold.
    let Sinks {
        senders,
        all,
        kafka,
        batchers,
    } = sinks;
    drop(senders);
    co.sinks = Arc::from(Vec::new());
    // Bounded: a sink that cannot take data (its broker is down) must not hold the exit
    // past the grace period; what it did not acknowledge is simply not committed.
    let flush_deadline = tokio::time::Instant::now() + co.config.commit.drain_timeout.0;
    for b in batchers {
        if tokio::time::timeout_at(flush_deadline, b).await.is_err() {
            tracing::warn!("a batcher did not finish before the drain deadline; its outputs will be redelivered");
        }
    }
    for s in &all {
        let left = flush_deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_secs(1));
        if !s.flush(left).await {
            tracing::warn!(
                sink = s.name(),
                "sink still had unacknowledged outputs at exit; they will be redelivered"
            );
        }
    }
    let left = flush_deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .max(Duration::from_secs(1));
    if !dead_letters.flush(left).await {
        tracing::warn!(
            "dead letters still unacknowledged at exit; their records will be redelivered"
        );
    }
    drop(kafka);
    // Anything acknowledged during the flush is committed too (at-least-once; with
    // exactly-once nothing was in flight after the last window, and offsets are only
    // ever committed inside a transaction).
    let deadline = tokio::time::Instant::now() + co.config.commit.drain_timeout.0;
    if co.txn.is_none() {
        if let Err(e) = co
            .committer
            .commit_by(&states, co.generation, deadline)
            .await
        {
            tracing::error!(error = %e, "final commit failed; uncommitted work will be redelivered");
        }
    }
    drop(states);
    // No coordinator answers rebalance events from here on: the revoke that leaving the
    // group triggers must not wait for one (everything is drained and committed already).
    drop(events);
    stop_poller.store(true, AtomicOrdering::Release);
    let _ = tokio::task::spawn_blocking(move || poller.join()).await;
    drop(co);
    // Leave the group now rather than after the session timeout.
    let consumer = Arc::try_unwrap(consumer);
    if let Ok(c) = consumer {
        tokio::task::spawn_blocking(move || {
            c.unsubscribe();
            drop(c);
        })
        .await
        .ok();
    }
    tracing::info!("pipeline stopped");
    result
}
