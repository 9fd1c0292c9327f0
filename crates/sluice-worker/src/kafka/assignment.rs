//! The partitions this worker is assigned, and their lifecycle: each assignment starts a
//! new incarnation (its state, its worker lanes and the Kafka dispatcher reading its
//! split-off queue); a release stops the dispatchers and retires the states, so nothing
//! of an old incarnation reaches the consumer once a new one may exist.

use std::collections::HashMap;
use std::sync::Arc;

use sluice_api::config::{StartFrom, Subscription, WorkerConfig};
use tokio::sync::{mpsc, watch};

use crate::deadletter::DeadLetters;
use crate::engine::backpressure::{ByteBudget, HoldReason};
use crate::engine::batcher::Piece;
use crate::engine::dispatch::PartitionDispatch;
use crate::engine::gate::WindowGate;
use crate::engine::lanes::lane_geometry;
use crate::engine::partition::{Incarnation, PartitionControl, PartitionState, TopicPartition};
use crate::engine::pool::spawn_workers;
use crate::engine::registry::{Entry, Registry};
use crate::kafka::consumer::SluiceConsumer;
use crate::kafka::dispatcher::run_kafka_dispatcher;
use crate::kafka::start_from::start_latest;
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::processor::Processor;

/// A partition's split-off queue, as the rebalance callback hands it over.
pub type PartitionQueue = sluice_rdkafka_ffi::PartitionFeed;

/// The owned partitions and what a new incarnation needs.
pub struct Assignment {
    config: WorkerConfig,
    processor: Arc<dyn Processor>,
    metrics: Metrics,
    consumer: Arc<SluiceConsumer>,
    control: Arc<dyn PartitionControl>,
    budget: ByteBudget,
    sinks: Arc<[mpsc::Sender<Piece>]>,
    dead_letters: Arc<DeadLetters>,
    /// The delivery guarantee's window barrier, if it has one.
    gate: Option<Arc<WindowGate>>,
    health: Arc<Health>,
    registry: Registry,
    /// The epoch of the next partition incarnation.
    next_epoch: u64,
}

impl Assignment {
    /// No partitions yet. `registry` is shared with the consumer's context.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: WorkerConfig,
        processor: Arc<dyn Processor>,
        metrics: Metrics,
        consumer: Arc<SluiceConsumer>,
        control: Arc<dyn PartitionControl>,
        sinks: Arc<[mpsc::Sender<Piece>]>,
        dead_letters: Arc<DeadLetters>,
        gate: Option<Arc<WindowGate>>,
        health: Arc<Health>,
        registry: Registry,
    ) -> Self {
        Assignment {
            budget: ByteBudget::new(config.memory.in_flight_bytes.0),
            config,
            processor,
            metrics,
            consumer,
            control,
            sinks,
            dead_letters,
            gate,
            health,
            registry,
            next_epoch: 0,
        }
    }

    /// The consumer.
    pub fn consumer(&self) -> &Arc<SluiceConsumer> {
        &self.consumer
    }

    /// The current incarnation of every owned partition.
    pub fn states(&self) -> Vec<Arc<PartitionState>> {
        self.registry.states()
    }

    /// Every owned partition.
    pub fn keys(&self) -> Vec<TopicPartition> {
        self.registry.keys()
    }

    /// The current incarnation of `tp`, if owned.
    pub fn state(&self, tp: &TopicPartition) -> Option<Arc<PartitionState>> {
        self.registry.state(tp)
    }

    /// Bytes of the in-flight budget taken.
    pub fn in_flight_bytes(&self) -> u64 {
        self.budget.in_use()
    }

    /// Drop this assignment's handles on the sinks' batchers (shutdown: once every holder
    /// dropped them, the batchers flush and end).
    pub fn close_sinks(&mut self) {
        self.sinks = Arc::from(Vec::new());
    }

    /// Start a new incarnation of each of `parts`.
    pub fn assign(&mut self, parts: Vec<(TopicPartition, PartitionQueue)>) {
        self.assign_stopping(parts, &HashMap::new());
    }

    /// [`Assignment::assign`], each partition in `stops` never dispatched at or past its
    /// offset there (see [`PartitionState::stop_at`]).
    pub fn assign_stopping(
        &mut self,
        parts: Vec<(TopicPartition, PartitionQueue)>,
        stops: &HashMap<TopicPartition, i64>,
    ) {
        // startFrom: latest is decided once for the whole assignment, before any of its
        // partitions is read (the first dispatcher to get there does it).
        let latest = (self.config.source.start_from == StartFrom::Latest).then(|| {
            let parts: Vec<_> = parts.iter().map(|(tp, _)| tp.clone()).collect();
            // Validated at start-up; the assignment's own topics otherwise.
            let subscription = self.config.source.subscription().unwrap_or_else(|_| {
                let mut topics: Vec<String> = parts.iter().map(|tp| tp.topic.to_string()).collect();
                topics.dedup();
                Subscription::Topics(topics)
            });
            (
                Arc::downgrade(&self.consumer),
                Arc::new((subscription, parts)),
                Arc::new(tokio::sync::OnceCell::new()),
            )
        });
        for (tp, queue) in parts {
            if self.registry.contains(&tp) {
                tracing::warn!(topic = %tp.topic, partition = tp.partition, "assigned a partition this worker already owns");
                continue;
            }
            let pm = self.metrics.partition(&tp.topic, tp.partition);
            let w = &self.config.workers;
            self.next_epoch += 1;
            let state = PartitionState::new(
                Incarnation::new(tp.clone(), self.next_epoch),
                w.queue_capacity as usize,
                self.control.clone(),
                pm,
                self.metrics.processing_latency.clone(),
            );
            if let Some(&at) = stops.get(&tp) {
                state.stop_at(at);
            }
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
            self.control.resume(&tp.topic, tp.partition);
            let dispatch =
                PartitionDispatch::new(state.clone(), txs, w.ordering, self.budget.clone())
                    .with_gate(self.gate.clone());
            let (stop, stop_rx) = watch::channel(false);
            let latest = latest.clone();
            let (weak, at) = (Arc::downgrade(&self.consumer), tp.clone());
            let position = move || application_position(&weak, &at);
            let dispatcher = tokio::spawn(tracing::Instrument::in_current_span(async move {
                if let Some((consumer, parts, decided)) = latest {
                    let ends = decided
                        .get_or_init(|| start_latest(consumer, parts.0.clone(), parts.1.to_vec()))
                        .await;
                    // librdkafka may still start the partition below the end it was
                    // sought to (the assignment's own fetch start can land after the
                    // seek): what lies below is never dispatched.
                    if let Some((_, end)) =
                        ends.iter().find(|(tp, _)| *tp == *dispatch.state().tp())
                    {
                        dispatch.state().start_at(*end);
                    }
                }
                run_kafka_dispatcher(queue, dispatch, stop_rx, position).await
            }));
            self.registry.insert(Entry {
                state,
                stop,
                dispatcher,
            });
        }
        self.health.joined();
        self.metrics
            .assigned_partitions
            .set(self.registry.len() as i64);
    }

    /// librdkafka applied an assignment: state each partition's pause flag again.
    pub fn restate_pause(&self, parts: &[TopicPartition]) {
        for tp in parts {
            if let Some(s) = self.registry.state(tp) {
                s.restate_pause();
            }
        }
    }

    /// Stop the dispatchers of `keys`, bounded by `deadline`; then abort and await
    /// whatever is left, so every queue handle is dropped. The states are retired first
    /// (no pause/resume from them reaches the consumer any more; with `pause`, they are
    /// held for draining instead and retired once their dispatcher is gone) and returned.
    pub async fn release(
        &mut self,
        keys: &[TopicPartition],
        deadline: tokio::time::Instant,
        pause: bool,
    ) -> Vec<Arc<PartitionState>> {
        let mut states = Vec::new();
        for k in keys {
            if let Some(s) = self.registry.state(k) {
                if pause {
                    s.hold(HoldReason::Draining, true);
                } else {
                    s.retire();
                }
                self.registry.stop(k);
            }
        }
        for k in keys {
            let Some(mut o) = self.registry.take(k) else {
                continue;
            };
            if tokio::time::timeout_at(deadline, &mut o.dispatcher)
                .await
                .is_err()
            {
                tracing::warn!(topic = %k.topic, partition = k.partition, "dispatcher did not stop before the deadline; aborted");
                o.dispatcher.abort();
                let _ = (&mut o.dispatcher).await;
            }
            o.state.retire();
            states.push(o.state);
        }
        self.metrics
            .assigned_partitions
            .set(self.registry.len() as i64);
        states
    }
}

/// librdkafka's application position of `tp` (past the last record handed over, and past
/// the markers and aborted records it served since), if known.
fn application_position(
    consumer: &std::sync::Weak<SluiceConsumer>,
    tp: &TopicPartition,
) -> Option<i64> {
    use rdkafka::consumer::Consumer;
    let c = consumer.upgrade()?;
    let positions = c.position().ok()?;
    match positions.find_partition(&tp.topic, tp.partition)?.offset() {
        rdkafka::Offset::Offset(o) if o >= 0 => Some(o),
        _ => None,
    }
}
