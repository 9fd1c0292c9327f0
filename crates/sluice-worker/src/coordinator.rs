//! The coordinator: one task that owns the assigned partitions ([`Assignment`]) and the
//! delivery guarantee ([`Delivery`]). It answers rebalance events (the consumer's
//! rebalance callback waits on it), runs the delivery's tick, checks progress for
//! liveness, and on shutdown releases every partition and lets the delivery settle them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sluice_api::config::WorkerConfig;
use tokio::sync::mpsc;

use crate::delivery::exactly_once::TxnError;
use crate::delivery::Delivery;
use crate::engine::partition::{PartitionState, TopicPartition};
use crate::error::PipelineError;
use crate::kafka::assignment::Assignment;
use crate::kafka::consumer::{RebalanceEvent, RevokeProgress};
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::ops::throttle::LogThrottle;

/// How often liveness is checked.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// The coordinator of one pipeline.
pub struct Coordinator {
    owned: Assignment,
    delivery: Delivery,
    health: Arc<Health>,
    metrics: Metrics,
    drain_timeout: Duration,
    fetch_stall_timeout: Duration,
    stuck_log: LogThrottle,
}

impl Coordinator {
    /// Coordinate `owned` (no partitions yet) with `delivery`.
    pub fn new(
        owned: Assignment,
        delivery: Delivery,
        health: Arc<Health>,
        metrics: Metrics,
        config: &WorkerConfig,
    ) -> Self {
        Coordinator {
            owned,
            delivery,
            health,
            metrics,
            drain_timeout: config.commit.drain_timeout.0,
            fetch_stall_timeout: config.server.fetch_stall_timeout.0,
            stuck_log: LogThrottle::new(Duration::from_secs(30)),
        }
    }

    /// Run until `shutdown` resolves (`Ok`) or the pipeline must stop (`Err`): a failed
    /// delivery, or what `fatal` reports (a fatal client error, or a reason to run the
    /// pipeline again).
    pub async fn run(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<RebalanceEvent>,
        stray: &mut mpsc::UnboundedReceiver<(TopicPartition, i64)>,
        shutdown: impl Future<Output = ()>,
        fatal: impl Fn() -> Option<PipelineError>,
    ) -> Result<(), PipelineError> {
        let mut tick = tokio::time::interval(self.delivery.period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check = tokio::time::interval(CHECK_INTERVAL);
        tokio::pin!(shutdown);
        loop {
            // Every iteration is the loop running (liveness), whichever branch it takes.
            self.health.beat();
            tokio::select! {
                biased;
                _ = &mut shutdown => {
                    tracing::info!("shutdown requested: stop fetching, drain, flush, commit");
                    return Ok(());
                }
                Some(ev) = events.recv() => match ev {
                    RebalanceEvent::Assigned(parts) => {
                        self.delivery.on_rebalance(&self.owned);
                        self.owned.assign(parts);
                    }
                    RebalanceEvent::AssignApplied(parts) => self.owned.restate_pause(&parts),
                    RebalanceEvent::Revoked { partitions, lost, done } => {
                        let res = self.revoke(partitions, lost, &done).await;
                        let _ = done.send(RevokeProgress::Done);
                        if let Err(e) = res {
                            tracing::error!(error = %e, "exactly-once: a window could not be committed or rewound during a rebalance; stopping (a restart resumes from the last committed transaction)");
                            return Err(PipelineError::Transaction(e));
                        }
                    }
                },
                a = self.delivery.answered() => self.delivery.on_answer(a, &self.owned),
                Some((tp, _offset)) = stray.recv() => {
                    if let Some(s) = self.owned.state(&tp) {
                        s.stall("a record arrived on the consumer's main queue");
                    }
                }
                // Before the delivery's tick: a tick that takes its whole period (an
                // exactly-once window whose barrier and commit outlast it) must not starve
                // liveness and the fatal-error checks.
                _ = check.tick() => {
                    self.check_progress();
                    self.metrics.in_flight_bytes.set(self.owned.in_flight_bytes() as i64);
                    if let Some(e) = fatal() {
                        return Err(e);
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = self.delivery.tick(&mut self.owned).await {
                        tracing::error!(error = %e, "exactly-once: a window could not be committed or rewound; stopping (a restart resumes from the last committed transaction)");
                        return Err(PipelineError::Transaction(e));
                    }
                }
            }
        }
    }

    /// Give up `keys`: a barrier for the rebalance callback (see `kafka/consumer.rs`),
    /// then the delivery settles their work (unless the assignment was lost).
    async fn revoke(
        &mut self,
        keys: Vec<TopicPartition>,
        lost: bool,
        done: &std::sync::mpsc::SyncSender<RevokeProgress>,
    ) -> Result<(), TxnError> {
        self.delivery.on_rebalance(&self.owned);
        self.delivery.on_revoke_start();
        let deadline = tokio::time::Instant::now()
            + if lost {
                Duration::from_millis(100)
            } else {
                self.drain_timeout
            };
        let states = self.owned.release(&keys, deadline, false).await;
        let _ = done.send(RevokeProgress::Released);
        let res = self
            .delivery
            .on_revoke(&mut self.owned, &states, lost, deadline)
            .await;
        for tp in &keys {
            self.delivery.forget(tp);
            self.metrics.forget_partition(&tp.topic, tp.partition);
        }
        res
    }

    /// Shutdown: stop fetching, release every partition (their in-flight work goes on)
    /// and let the delivery settle it. Returns the released states (for
    /// [`Coordinator::after_flush`]) and whether that failed.
    pub async fn stop(
        &mut self,
        failed: bool,
    ) -> (Vec<Arc<PartitionState>>, Result<(), PipelineError>) {
        let keys = self.owned.keys();
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        let states = self.owned.release(&keys, deadline, true).await;
        let res = self
            .delivery
            .on_shutdown(&mut self.owned, &states, deadline, failed)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "exactly-once: the last transaction was aborted; its records will be processed again");
                PipelineError::Transaction(e)
            });
        (states, res)
    }

    /// Drop the coordinator's handles on the sinks' batchers (they flush and end once
    /// every handle is gone).
    pub fn close_sinks(&mut self) {
        self.owned.close_sinks();
    }

    /// Shutdown, after the sinks flushed: the delivery commits what they acknowledged.
    pub async fn after_flush(&mut self, states: &[Arc<PartitionState>]) {
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        self.delivery.after_flush(states, deadline).await;
    }

    /// Liveness: count the partitions stuck in fetch past the limit.
    fn check_progress(&mut self) {
        self.health.beat();
        let limit = self.fetch_stall_timeout.as_millis() as u64;
        let now = crate::clock::clock_ms();
        let stuck: Vec<_> = self
            .owned
            .states()
            .iter()
            .filter(|s| s.fetch_stalled_ms(now) > limit)
            .map(|s| s.tp().to_string())
            .collect();
        if !stuck.is_empty() {
            if let Some(n) = self.stuck_log.tick() {
                tracing::error!(partitions = ?stuck, limit = ?self.fetch_stall_timeout, checks = n,
                    "partitions with records to fetch and no hold received nothing for too long; /healthz fails");
            }
        }
        self.health.set_stuck_partitions(stuck.len() as u64);
        self.health
            .set_commit_unanswered(self.delivery.commit_unanswered());
        self.metrics
            .fetch_stalled_partitions
            .set(stuck.len() as i64);
    }
}
