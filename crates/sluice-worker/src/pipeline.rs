//! Wiring: builds the delivery guarantee's clients, the dead-letter path, the sinks and
//! their batchers, and the consumer; runs the [`Coordinator`] until shutdown; then drains,
//! flushes, commits and leaves the group.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use sluice_api::config::{clients, SinkConfig, WorkerConfig};

use crate::coordinator::Coordinator;
use crate::deadletter::DeadLetters;
use crate::delivery::at_least_once::AtLeastOnce;
use crate::delivery::committer::Committer;
use crate::delivery::exactly_once::{self, ExactlyOnce, Transactions};
use crate::delivery::Delivery;
use crate::engine::registry::Registry;
use crate::engine::SinkSet;
use crate::format::encode::Encoder;
use crate::kafka::assignment::Assignment;
use crate::kafka::client::base_config;
use crate::kafka::config::{
    consumer_config, input_partitions, with, ASSUMED_PARTITIONS, STATISTICS_INTERVAL,
};
use crate::kafka::consumer::{
    spawn_main_queue_thread, ConsumerControl, SluiceConsumer, SluiceContext,
};
use crate::kafka::limits;
use crate::ops::health::{Health, LivenessLimits};
use crate::ops::metrics::Metrics;
use crate::processor::Processor;
use crate::retry::RetryPolicy;
use crate::sink::http::HttpSink;
use crate::sink::kafka::KafkaSink;
use crate::sink::kafka_txn::{Refusals, TxnKafkaSink};
use crate::sink::null::NullSink;
use crate::sink::postgres::PostgresSink;
use crate::sink::produce::OutputTarget;
use crate::sink::stdout::StdoutSink;
use crate::sink::{DynSink, SinkMetrics};

pub use crate::error::PipelineError;

/// Handles the worker's outside world needs: metrics and health.
#[derive(Clone)]
pub struct Runtime {
    /// Metrics of this pipeline.
    pub metrics: Metrics,
    /// Health of this pipeline.
    pub health: Arc<Health>,
    /// Partitions the consumer's prefetch is sized for at least: what the worker owned
    /// when it stopped to run again (`PipelineError::Resize`), so a broker whose metadata
    /// still shows the old count cannot make it stop again for the same growth.
    pub sized_at_least: Arc<std::sync::atomic::AtomicUsize>,
}

impl Runtime {
    /// Fresh metrics and health for `config`.
    pub fn new(config: &WorkerConfig) -> Self {
        Runtime {
            metrics: Metrics::new(&config.pipeline),
            health: Arc::new(Health::default()),
            sized_at_least: Default::default(),
        }
    }
}

/// The sinks, started.
struct Sinks {
    set: SinkSet,
    all: Vec<DynSink>,
    kafka: Vec<Arc<KafkaSink>>,
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
    Ok(DeadLetters::kafka(
        with(cfg, clients::dead_letter_producer(config)),
        &dl.topic,
        metrics,
    )?)
}

async fn build_sinks(
    config: &WorkerConfig,
    metrics: &Metrics,
    dead_letters: &Arc<DeadLetters>,
    txn: Option<&Transactions>,
    refusals: &Arc<Refusals>,
    limits: &[limits::TopicRules],
) -> Result<Sinks, PipelineError> {
    let retry = RetryPolicy::from(&config.retry);
    let mut all = Vec::new();
    let mut kafka = Vec::new();
    for (i, sc) in config.sinks.iter().enumerate() {
        let name = sc.kind();
        let sm = SinkMetrics::new(metrics, name);
        let target = match sc {
            SinkConfig::Kafka(k) => {
                let encoder = match &k.format {
                    Some(f) => Some(Arc::new(
                        Encoder::new(&f.schema_registry, &k.topic, &|v| std::env::var(v).ok())
                            .await?,
                    )),
                    None => None,
                };
                Some(OutputTarget::new(k, limits[i]).encoded(encoder))
            }
            _ => None,
        };
        let sink: DynSink = match sc {
            SinkConfig::Kafka(_) if txn.is_some() => TxnKafkaSink::new(
                txn.expect("exactly-once").producer().clone(),
                target.expect("a kafka sink's target"),
                sm,
                dead_letters.clone(),
                refusals.clone(),
            ),
            SinkConfig::Kafka(k) => {
                let cfg = base_config(
                    k.bootstrap_servers
                        .as_deref()
                        .unwrap_or(&config.source.bootstrap_servers),
                    &config.source.security,
                    &format!("sluice-{}-sink{i}", config.pipeline),
                )?;
                let s = KafkaSink::new(
                    with(cfg, clients::sink_producer(config, k)),
                    target.expect("a kafka sink's target"),
                    sm,
                    dead_letters.clone(),
                )?;
                kafka.push(s.clone());
                s
            }
            SinkConfig::Postgres(pg) => {
                PostgresSink::connect(pg, retry.clone(), sm, dead_letters.clone()).await?
            }
            SinkConfig::Http(h) => HttpSink::new(
                h,
                config.workers.ordering,
                retry.clone(),
                sm,
                dead_letters.clone(),
            )?,
            SinkConfig::Null {} => Arc::new(NullSink::new(sm)),
            SinkConfig::Stdout {} => Arc::new(StdoutSink::new(sm)),
        };
        all.push(sink);
    }
    Ok(Sinks {
        set: SinkSet::spawn(all.clone(), &config.batching, metrics),
        all,
        kafka,
    })
}

/// What each sink's output topic refuses (nothing known: not a Kafka sink, or it could
/// not be read), by sink index; see [`crate::kafka::limits`].
async fn sink_limits(config: &WorkerConfig) -> Result<Vec<limits::TopicRules>, PipelineError> {
    let mut out = Vec::with_capacity(config.sinks.len());
    for (i, sc) in config.sinks.iter().enumerate() {
        let SinkConfig::Kafka(k) = sc else {
            out.push(limits::TopicRules::default());
            continue;
        };
        let cfg = base_config(
            k.bootstrap_servers
                .as_deref()
                .unwrap_or(&config.source.bootstrap_servers),
            &config.source.security,
            &format!("sluice-{}-sink{i}-admin", config.pipeline),
        )?;
        out.push(limits::topic_rules(&cfg, &k.topic).await);
    }
    Ok(out)
}

/// The exactly-once transactional producer, when the configuration asks for it. Its
/// `batch.size` is capped at the smallest output topic limit in `limits`, so no batch it
/// builds is over a topic's `max.message.bytes`.
async fn transactions(
    config: &WorkerConfig,
    metrics: &Metrics,
    limits: &[limits::TopicRules],
) -> Result<Option<Transactions>, PipelineError> {
    if !config.delivery.exactly_once() {
        return Ok(None);
    }
    let client = base_config(
        &config.source.bootstrap_servers,
        &config.source.security,
        &format!("sluice-{}-txn", config.pipeline),
    )?;
    let id = exactly_once::transactional_id(&config.pipeline);
    let mut client = with(client, clients::transactional_producer(config, &id));
    if let Some(l) = limits.iter().filter_map(|r| r.max_message_bytes).min() {
        limits::cap_batch_size(&mut client, l);
    }
    let t = Transactions::start(
        client,
        config
            .delivery
            .transaction_timeout(config.commit.drain_timeout.0),
        metrics,
    )
    .await?;
    tracing::info!(transactional_id = %id, window = %config.delivery.transaction_window, "exactly-once: transactional producer ready");
    Ok(Some(t))
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
    let subscription = config.source.subscription()?;
    let span = tracing::info_span!(
        "pipeline",
        pipeline = %config.pipeline,
        topics = %subscription,
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
    let limits = sink_limits(&config).await?;
    let txn = transactions(&config, &metrics, &limits)
        .await?
        .map(|t| t.with_heartbeat(rt.health.clone()));
    let dead_letters = build_dead_letters(&config, &metrics, txn.as_ref())?;
    let refusals = Arc::new(Refusals::default());
    let sinks = build_sinks(
        &config,
        &metrics,
        &dead_letters,
        txn.as_ref(),
        &refusals,
        &limits,
    )
    .await?;

    // Values in a schema registry's wire format are decoded before the processor.
    let processor: Arc<dyn Processor> = match &config.source.format {
        Some(f) => {
            let registry = crate::format::registry::Registry::new(&f.schema_registry, &|k| {
                std::env::var(k).ok()
            })?;
            tracing::info!(
                registry = registry.url(),
                "decoding values by their schema-registry schema"
            );
            Arc::new(crate::format::Decoding::new(registry, processor))
        }
        None => processor,
    };
    let at_least = rt.sized_at_least.load(AtomicOrdering::Acquire);
    let sized_from_metadata = input_partitions(&config).await.map(|n| n.max(at_least));
    let partitions = match sized_from_metadata {
        Some(n) => n,
        None => {
            tracing::warn!(
                assumed = ASSUMED_PARTITIONS,
                "could not read the input topic's partition count; sizing librdkafka's prefetch for {ASSUMED_PARTITIONS} partitions"
            );
            ASSUMED_PARTITIONS
        }
    };
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    // The revoke callback waits a little longer than the drain itself, so the drain's own
    // deadline is what normally ends it.
    let revoke_timeout = config.commit.drain_timeout.0 + Duration::from_secs(2);
    let consumer_cfg = consumer_config(&config, partitions)?;
    let read_committed = consumer_cfg.get("isolation.level") != Some("read_uncommitted");
    let registry = Registry::default();
    let ctx = SluiceContext::new(
        events_tx,
        revoke_timeout,
        metrics.clone(),
        rt.health.clone(),
        registry.clone(),
        read_committed,
    );
    let consumer: Arc<SluiceConsumer> = Arc::new(consumer_cfg.create_with_context(ctx)?);
    SluiceContext::attach(&consumer);
    let subscription = config.source.subscription()?;
    let topics = subscription.librdkafka();
    consumer.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
    // Made before the poller, so a failure here leaves no thread behind.
    let (control, control_stop) = ConsumerControl::new(Arc::downgrade(&consumer))
        .map_err(|e| PipelineError::Thread(format!("the pause thread: {e}")))?;
    let stop_poller = Arc::new(AtomicBool::new(false));
    let (stray_tx, mut stray) = tokio::sync::mpsc::unbounded_channel();
    let poller = spawn_main_queue_thread(consumer.clone(), stop_poller.clone(), stray_tx);
    rt.health.start(LivenessLimits {
        coordinator: config.commit.drain_timeout.0 * 2 + Duration::from_secs(30),
        statistics: STATISTICS_INTERVAL * 3,
        callback: revoke_timeout,
        unjoined: config.source.session_timeout.0,
        fetch_stall: config.server.fetch_stall_timeout.0,
        commit_unanswered: config.server.fetch_stall_timeout.0,
    });
    rt.health.ready.store(true, AtomicOrdering::Release);
    tracing::info!(pipeline = %config.pipeline, topics = %subscription, group = %config.source.group_id, "pipeline started");

    let delivery = match txn {
        Some(txn) => {
            Delivery::ExactlyOnce(ExactlyOnce::new(txn, consumer.clone(), refusals, &config))
        }
        None => Delivery::AtLeastOnce(AtLeastOnce::new(
            Committer::new(
                consumer.clone(),
                metrics.commit_latency.clone(),
                metrics.commit_failures.clone(),
            ),
            &config,
        )),
    };
    let owned_registry = registry.clone();
    let owned = Assignment::new(
        config.clone(),
        processor,
        metrics.clone(),
        consumer.clone(),
        Arc::new(control),
        sinks.set.senders.clone(),
        dead_letters.clone(),
        delivery.gate(),
        rt.health.clone(),
        registry,
    );
    let mut co = Coordinator::new(owned, delivery, rt.health.clone(), metrics.clone(), &config);
    let fatal = || {
        if sinks.kafka.iter().any(|k| k.fatal()) {
            Some(PipelineError::Fatal("producer"))
        } else if dead_letters.fatal() {
            Some(PipelineError::Fatal("dead-letter producer"))
        } else if consumer.context().is_fatal() || consumer.client().fatal_error().is_some() {
            // librdkafka's own word too: an error event may carry a fatal error's cause
            // rather than `_FATAL` (as the producer's do, sink/kafka.rs).
            Some(PipelineError::Fatal("consumer"))
        } else {
            // librdkafka's prefetch limits are per partition (split queues), sized when
            // the consumer was made: more partitions than that would hold more than
            // `memory.fetchBuffer`. Only when the count was read, not assumed.
            let owned = owned_registry.len();
            sized_from_metadata
                .filter(|&sized| owned > sized)
                .map(|sized| PipelineError::Resize { owned, sized })
        }
    };
    let mut result = co.run(&mut events, &mut stray, shutdown, fatal).await;
    rt.health.ready.store(false, AtomicOrdering::Release);
    let failed = result.as_ref().is_err_and(|e| !e.is_resize());
    if failed {
        rt.health.failed.store(true, AtomicOrdering::Release);
    }
    if let Err(e) = &result {
        if e.is_resize() {
            tracing::warn!(error = %e, "the input topic grew");
            rt.health.between_runs();
            if let PipelineError::Resize { owned, .. } = e {
                rt.sized_at_least.fetch_max(*owned, AtomicOrdering::AcqRel);
            }
        }
    }

    // Stop fetching, drain every partition, commit what is done.
    let (states, stopped) = co.stop(failed).await;
    let released: Vec<_> = states.iter().map(|s| s.tp().clone()).collect();
    match (&result, stopped) {
        (Ok(()), stopped) => result = stopped,
        // A failure while stopping to run again is a failure.
        (Err(e), Err(stopped)) if e.is_resize() => result = Err(stopped),
        _ => {}
    }
    // Closing the batchers' inputs flushes what they hold.
    let Sinks { set, all, kafka } = sinks;
    let SinkSet { senders, batchers } = set;
    drop(senders);
    co.close_sinks();
    // Bounded: a sink that cannot take data (its broker is down) must not hold the exit
    // past the grace period; what it did not acknowledge is simply not committed.
    let flush_deadline = tokio::time::Instant::now() + config.commit.drain_timeout.0;
    for mut b in batchers {
        if tokio::time::timeout_at(flush_deadline, &mut b)
            .await
            .is_err()
        {
            tracing::warn!("a batcher did not finish before the drain deadline; its outputs will be redelivered");
            // Not left running: the pipeline may run again in this process.
            b.abort();
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
    co.after_flush(&states).await;
    drop(states);
    // No coordinator answers rebalance events from here on: the revoke that leaving the
    // group triggers must not wait for one (everything is drained and committed already).
    drop(events);
    stop_poller.store(true, AtomicOrdering::Release);
    let _ = tokio::task::spawn_blocking(move || poller.join()).await;
    drop(co);
    // No pause or resume holds the consumer from here on.
    let _ = tokio::task::spawn_blocking(move || control_stop.stop(Duration::from_secs(5))).await;
    // Leave the group now rather than after the session timeout.
    match Arc::try_unwrap(consumer) {
        Ok(c) => {
            tokio::task::spawn_blocking(move || {
                c.unsubscribe();
                drop(c);
            })
            .await
            .ok();
        }
        // Something still holds it (a blocking call of the start-up, e.g.): it leaves the
        // group all the same, so it cannot keep partitions from a next run.
        Err(c) => {
            tracing::warn!("the consumer is still referenced at the stop; leaving the group without closing it");
            tokio::task::spawn_blocking(move || c.unsubscribe())
                .await
                .ok();
        }
    }
    // Run again (Resize): the next run reports only the partitions it is given.
    if result.as_ref().is_err_and(PipelineError::is_resize) {
        for tp in &released {
            metrics.forget_partition(&tp.topic, tp.partition);
        }
        metrics.in_flight_bytes.set(0);
        metrics.fetch_stalled_partitions.set(0);
    }
    tracing::info!("pipeline stopped");
    result
}
