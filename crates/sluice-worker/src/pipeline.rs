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
use crate::committer::Committer;
use crate::consumer::{
    spawn_main_queue_thread, ConsumerControl, RebalanceEvent, SluiceConsumer, SluiceContext,
};
use crate::deadletter::DeadLetters;
use crate::dispatcher::{run_kafka_dispatcher, Lane};
use crate::metrics::Metrics;
use crate::partition::{PartitionControl, PartitionState};
use crate::pool::{lane_geometry, spawn_workers};
use crate::processor::Processor;
use crate::retry::RetryPolicy;
use crate::server::Health;
use crate::sink::kafka::KafkaSink;
use crate::sink::null::NullSink;
use crate::sink::postgres::{PostgresSetupError, PostgresSink};
use crate::sink::stdout::StdoutSink;
use crate::sink::{DynSink, SinkMetrics};

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
) -> Result<Arc<DeadLetters>, PipelineError> {
    let Some(dl) = &config.dead_letter else {
        return Ok(DeadLetters::stall(metrics));
    };
    let cfg = base_config(
        dl.bootstrap_servers
            .as_deref()
            .unwrap_or(&config.source.bootstrap_servers),
        &config.source.security,
        &format!("sluice-{}-dead-letter", config.pipeline),
    )?;
    Ok(DeadLetters::kafka(cfg, &dl.topic, metrics)?)
}

async fn build_sinks(
    config: &WorkerConfig,
    metrics: &Metrics,
    dead_letters: &Arc<DeadLetters>,
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
            SinkConfig::Kafka(k) => {
                let cfg = base_config(
                    k.bootstrap_servers
                        .as_deref()
                        .unwrap_or(&config.source.bootstrap_servers),
                    &config.source.security,
                    &format!("sluice-{}-sink{i}", config.pipeline),
                )?;
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

fn consumer_config(config: &WorkerConfig) -> Result<ClientConfig, PipelineError> {
    let s = &config.source;
    let mut c = base_config(
        &s.bootstrap_servers,
        &s.security,
        &format!("sluice-{}", config.pipeline),
    )?;
    let fetch_kb = (config.memory.fetch_buffer.0 / 1024).max(1);
    c.set("group.id", &s.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set(
            "auto.offset.reset",
            match s.start_from {
                StartFrom::Earliest => "earliest",
                StartFrom::Latest => "latest",
            },
        )
        .set(
            "session.timeout.ms",
            s.session_timeout.0.as_millis().to_string(),
        )
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("statistics.interval.ms", "5000")
        .set("queued.max.messages.kbytes", fetch_kb.to_string())
        .set("queued.min.messages", "10000")
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
    /// Since when periodic commits have failed, and whether fetching is held for it.
    commit_failing: Option<(Instant, bool)>,
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
        for (topic, p, queue) in parts {
            let key = (topic.clone(), p);
            if self.owned.contains_key(&key) {
                tracing::warn!(%topic, partition = p, "assigned a partition this worker already owns");
                continue;
            }
            let pm = self.metrics.partition(&topic, p);
            self.consumer
                .context()
                .owned
                .lock()
                .expect("owned lock")
                .insert(key.clone(), pm.clone());
            let w = &self.config.workers;
            let state = PartitionState::new(
                topic.as_str().into(),
                p,
                w.queue_capacity as usize,
                self.control.clone(),
                pm,
                self.metrics.processing_latency.clone(),
            );
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
            let lane = Lane::new(state.clone(), txs, w.ordering, self.budget.clone());
            let (stop, stop_rx) = watch::channel(false);
            let dispatcher = tokio::spawn(tracing::Instrument::in_current_span(
                run_kafka_dispatcher(queue, lane, stop_rx),
            ));
            self.owned.insert(
                key,
                Owned {
                    state,
                    stop,
                    dispatcher,
                },
            );
        }
        self.metrics
            .assigned_partitions
            .set(self.owned.len() as i64);
    }

    /// Stop dispatching `keys`, wait (bounded) for their in-flight work, commit. With
    /// `pause`, fetching stops too (shutdown); a revoked partition is not paused, since
    /// librdkafka would carry the pause into its next assignment.
    async fn drain(&mut self, keys: &[(String, i32)], pause: bool) {
        let deadline = tokio::time::Instant::now() + self.config.commit.drain_timeout.0;
        let mut states = Vec::new();
        for k in keys {
            if let Some(o) = self.owned.get_mut(k) {
                if pause {
                    o.state.hold(HoldReason::Draining, true);
                }
                let _ = o.stop.send(true);
                if tokio::time::timeout_at(deadline, &mut o.dispatcher)
                    .await
                    .is_err()
                {
                    tracing::warn!(topic = %k.0, partition = k.1, "dispatcher did not stop before the drain deadline");
                }
                states.push(o.state.clone());
            }
        }
        for s in &states {
            if !s.wait_idle(deadline).await && !s.is_stalled() {
                tracing::warn!(topic = %s.topic, partition = s.partition, "in-flight work did not finish before the drain deadline; it will be redelivered");
            }
        }
        if let Err(e) = self.committer.commit(&states).await {
            tracing::error!(error = %e, "commit after drain failed; uncommitted work will be redelivered");
        }
    }

    async fn revoke(&mut self, keys: Vec<(String, i32)>) {
        self.drain(&keys, false).await;
        for k in &keys {
            if let Some(o) = self.owned.remove(k) {
                o.dispatcher.abort();
            }
            self.consumer
                .context()
                .owned
                .lock()
                .expect("owned lock")
                .remove(k);
            self.committer.forget(&k.0, k.1);
            self.metrics.forget_partition(&k.0, k.1);
        }
        self.metrics
            .assigned_partitions
            .set(self.owned.len() as i64);
    }

    async fn commit_all(&mut self) {
        let states: Vec<_> = self.owned.values().map(|o| o.state.clone()).collect();
        let interval = self.config.commit.interval.0;
        let hold_after = (interval * 2).max(Duration::from_secs(2));
        // A synchronous commit blocks while the group coordinator is away: stop waiting
        // after `hold_after` and count it as a failure (the offsets are simply committed
        // again at the next tick).
        let res = match tokio::time::timeout(hold_after, self.committer.commit(&states)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {hold_after:?}")),
        };
        match res {
            Ok(_) => {
                if let Some((since, held)) = self.commit_failing.take() {
                    if held {
                        tracing::info!(failing_for = ?since.elapsed(), "commits succeed again; fetching resumes");
                    }
                    for s in &states {
                        s.hold(HoldReason::CommitFailing, false);
                    }
                }
            }
            Err(e) => {
                let (since, held) = self.commit_failing.get_or_insert((Instant::now(), false));
                tracing::warn!(error = %e, failing_for = ?since.elapsed(), "periodic commit failed; retrying at the next interval");
                if !*held && since.elapsed() >= hold_after {
                    // Work done now could not be committed: it would only be delivered
                    // again after the group settles. Hold fetching until a commit goes
                    // through, so what is redelivered stays bounded.
                    tracing::warn!(
                        ?hold_after,
                        "commits keep failing; fetching is held until one succeeds"
                    );
                    *held = true;
                }
                if *held {
                    for s in &states {
                        s.hold(HoldReason::CommitFailing, true);
                    }
                }
            }
        }
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
    let dead_letters = build_dead_letters(&config, &metrics)?;
    let sinks = build_sinks(&config, &metrics, &dead_letters).await?;

    let (events_tx, mut events) = mpsc::unbounded_channel();
    // The revoke callback waits a little longer than the drain itself, so the drain's own
    // deadline is what normally ends it.
    let ctx = SluiceContext::new(
        events_tx,
        config.commit.drain_timeout.0 + Duration::from_secs(2),
        metrics.clone(),
    );
    let consumer: Arc<SluiceConsumer> =
        Arc::new(consumer_config(&config)?.create_with_context(ctx)?);
    SluiceContext::attach(&consumer);
    consumer.subscribe(&[&config.source.topic])?;
    let stop_poller = Arc::new(AtomicBool::new(false));
    let (stray_tx, mut stray) = mpsc::unbounded_channel();
    let poller = spawn_main_queue_thread(consumer.clone(), stop_poller.clone(), stray_tx);
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
        consumer: consumer.clone(),
        config,
    };
    let mut commit_tick = tokio::time::interval(co.config.commit.interval.0);
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
                RebalanceEvent::Revoked { partitions, done } => {
                    co.revoke(partitions).await;
                    let _ = done.send(());
                }
            },
            Some((t, p, _offset)) = stray.recv() => {
                if let Some(o) = co.owned.get(&(t, p)) {
                    o.state.stall("a record arrived on the consumer's main queue");
                }
            }
            _ = commit_tick.tick() => co.commit_all().await,
            _ = check_tick.tick() => {
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
    co.drain(&keys, true).await;
    let states: Vec<_> = co.owned.values().map(|o| o.state.clone()).collect();
    for (_, o) in std::mem::take(&mut co.owned) {
        o.dispatcher.abort();
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
    // Anything acknowledged during the flush is committed too.
    if let Err(e) = co.committer.commit(&states).await {
        tracing::error!(error = %e, "final commit failed; uncommitted work will be redelivered");
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
