//! At-least-once delivery: the committer on an interval, at most one commit in flight,
//! and the commit-failure hold ([`CommitHold`]) applied to the owned partitions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_api::config::WorkerConfig;

use crate::delivery::commit_hold::{CommitHold, Hold};
use crate::delivery::committer::{CommitResult, Committer};
use crate::engine::backpressure::HoldReason;
use crate::engine::partition::{PartitionState, TopicPartition};
use crate::kafka::assignment::Assignment;
use crate::ops::throttle::LogThrottle;

/// At-least-once delivery.
pub struct AtLeastOnce {
    committer: Committer,
    hold: CommitHold,
    interval: Duration,
    log: LogThrottle,
}

impl AtLeastOnce {
    /// Commit through `committer` every `commit.interval`.
    pub fn new(committer: Committer, config: &WorkerConfig) -> Self {
        let interval = config.commit.interval.0;
        AtLeastOnce {
            committer,
            hold: CommitHold::new((interval * 2).max(Duration::from_secs(2))),
            interval,
            log: LogThrottle::new(Duration::from_secs(5)),
        }
    }

    /// How often a commit starts.
    pub fn period(&self) -> Duration {
        self.interval
    }

    /// How long the commit in flight has waited for its answer, if one is in flight.
    pub fn commit_unanswered(&self) -> Option<Duration> {
        self.committer.pending_for()
    }

    /// The answer to the commit in flight (pending forever when there is none).
    pub async fn answered(&mut self) -> CommitResult {
        self.committer.answered().await
    }

    /// The commit in flight answered.
    pub fn on_answer(&mut self, r: CommitResult, owned: &Assignment) {
        let was_held = self.hold.held();
        let since = self.hold.failing_since();
        let now = Instant::now();
        let ok = r.result.is_ok();
        let h = self.hold.on_answer(r.generation, ok, now);
        if let (Err(e), true) = (&r.result, r.generation == self.hold.generation()) {
            self.failed(e, now);
        }
        if h == Hold::Off && was_held {
            tracing::info!(failing_for = ?since.map(|s| now - s), "commits succeed again; fetching resumes");
        }
        self.apply(h, owned, was_held);
    }

    /// The assignment changed: the hold of the old one ends.
    pub fn on_rebalance(&mut self, owned: &Assignment) {
        let was_held = self.hold.held();
        if was_held {
            tracing::info!("assignment changed: the commit-failure hold ends with it");
        }
        let h = self.hold.on_rebalance();
        self.apply(h, owned, was_held);
    }

    /// The commit interval ticked: start a commit, unless one is still unanswered (at
    /// most one in flight; one unanswered past the hold's limit counts as failing).
    pub fn tick(&mut self, owned: &Assignment) {
        if let Some(pending) = self.committer.pending_for() {
            let was_held = self.hold.held();
            let now = Instant::now();
            let h = self.hold.on_pending(pending, now);
            if pending >= self.hold.hold_after() {
                // Failing since it was sent: no new commit is started meanwhile.
                self.failed(&format!("no answer for {pending:?}"), now);
            }
            self.apply(h, owned, was_held);
            return;
        }
        let states = owned.states();
        self.committer
            .start(&states, self.hold.generation(), self.hold.force());
    }

    /// Wait (until `deadline`) for the in-flight work of `states`, then commit it.
    pub async fn drain(&mut self, states: &[Arc<PartitionState>], deadline: tokio::time::Instant) {
        for s in states {
            if !s.wait_idle(deadline).await && !s.is_stalled() {
                tracing::warn!(topic = %s.tp().topic, partition = s.tp().partition, "in-flight work did not finish before the drain deadline; it will be redelivered");
            }
        }
        if let Err(e) = self
            .committer
            .commit_by(states, self.hold.generation(), deadline)
            .await
        {
            tracing::error!(error = %e, "commit after drain failed; uncommitted work will be redelivered");
        }
    }

    /// Commit whatever of `states` was acknowledged since (shutdown, after the sinks
    /// flushed).
    pub async fn commit_last(
        &mut self,
        states: &[Arc<PartitionState>],
        deadline: tokio::time::Instant,
    ) {
        if let Err(e) = self
            .committer
            .commit_by(states, self.hold.generation(), deadline)
            .await
        {
            tracing::error!(error = %e, "final commit failed; uncommitted work will be redelivered");
        }
    }

    /// Forget a partition this process no longer owns.
    pub fn forget(&mut self, tp: &TopicPartition) {
        self.committer.forget(tp);
    }

    fn failed(&self, e: &str, now: Instant) {
        let failing_for = self.hold.failing_since().map(|s| now - s);
        if let Some(n) = self.log.tick() {
            tracing::warn!(error = %e, ?failing_for, checks = n, "periodic commit failed; retrying (one commit in flight at a time)");
        }
    }

    fn apply(&self, h: Hold, owned: &Assignment, was_held: bool) {
        match h {
            Hold::Keep => {}
            Hold::On => {
                if !was_held {
                    // Work done now could not be committed: it would only be delivered
                    // again after the group settles. Hold fetching until a commit goes
                    // through (or the assignment changes), so what is redelivered stays
                    // bounded.
                    tracing::warn!(
                        hold_after = ?self.hold.hold_after(),
                        "commits keep failing; fetching is held until one succeeds or the assignment changes"
                    );
                }
                for s in owned.states() {
                    s.hold(HoldReason::CommitFailing, true);
                }
            }
            Hold::Off => {
                for s in owned.states() {
                    s.hold(HoldReason::CommitFailing, false);
                }
            }
        }
    }
}
