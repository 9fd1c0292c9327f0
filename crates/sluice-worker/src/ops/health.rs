//! Liveness and readiness: the rules `/healthz` and `/readyz` report (served by
//! [`crate::ops::server`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// What the health endpoints report.
///
/// `/readyz` is about serving: subscribed, not draining, no fatal error. `/healthz` is
/// about being alive *and making progress*; it fails (so the kubelet restarts the pod)
/// when any rule of [`Health::verdict`] fails. Before the pipeline starts (sinks
/// connecting), only a fatal error fails it.
#[derive(Debug, Default)]
pub struct Health {
    /// Subscribed and not draining.
    pub ready: AtomicBool,
    /// A fatal error happened; the process is about to exit.
    pub failed: AtomicBool,
    limits: OnceLock<LivenessLimits>,
    /// Last iteration of the coordinator loop ([`crate::clock::clock_ms`]).
    loop_ms: AtomicU64,
    /// Last statistics callback, or the end of the last rebalance callback.
    stats_ms: AtomicU64,
    /// Since when a rebalance callback runs (0: none).
    callback_since_ms: AtomicU64,
    /// Last time statistics showed the group joined (or the pipeline started).
    joined_ms: AtomicU64,
    /// Owned partitions with records to fetch, not held, and no fetch progress for
    /// longer than the limit (set by the coordinator).
    stuck_partitions: AtomicU64,
    /// How long the commit in flight has waited for its answer, in ms (0: none in flight;
    /// set by the coordinator).
    commit_unanswered_ms: AtomicU64,
    /// The pipeline stopped to run again (`PipelineError::Resize`): the progress rules
    /// wait for the next [`Health::start`], as before the first.
    between_runs: AtomicBool,
}

/// The thresholds of the liveness rules.
#[derive(Clone, Copy, Debug)]
pub struct LivenessLimits {
    /// The coordinator loop must iterate at least this often.
    pub coordinator: Duration,
    /// A statistics callback must arrive at least this often (3 x its interval).
    pub statistics: Duration,
    /// A rebalance callback may take this long (the revoke drain) before the statistics
    /// rule counts it.
    pub callback: Duration,
    /// The group may be unjoined this long (the session timeout).
    pub unjoined: Duration,
    /// A partition with records to fetch, not held on purpose, may go without receiving
    /// any for this long (`server.fetchStallTimeout`).
    pub fetch_stall: Duration,
    /// A commit may wait this long for its answer (`server.fetchStallTimeout` too).
    /// librdkafka cannot cancel a commit, and until one answers it neither applies a
    /// new assignment nor rejoins: a commit that never answers (seen once after a broker
    /// restart on a loaded machine, with the broker back) leaves the worker without
    /// partitions and unable to commit, which only a new consumer ends.
    pub commit_unanswered: Duration,
}

/// Marks a rebalance callback as running while alive.
pub struct CallbackGuard<'a>(&'a Health);

impl Drop for CallbackGuard<'_> {
    fn drop(&mut self) {
        self.0
            .stats_ms
            .store(crate::clock::clock_ms(), Ordering::Release);
        self.0.callback_since_ms.store(0, Ordering::Release);
    }
}

impl Health {
    /// The pipeline runs from now on with `limits`: the progress rules apply.
    pub fn start(&self, limits: LivenessLimits) {
        let now = crate::clock::clock_ms();
        for a in [&self.loop_ms, &self.stats_ms, &self.joined_ms] {
            a.store(now, Ordering::Release);
        }
        let _ = self.limits.set(limits);
        self.stuck_partitions.store(0, Ordering::Release);
        self.commit_unanswered_ms.store(0, Ordering::Release);
        self.between_runs.store(false, Ordering::Release);
    }

    /// The pipeline stops to run again in this process: nothing progresses until its
    /// next [`Health::start`], and that is not a liveness failure.
    pub fn between_runs(&self) {
        self.between_runs.store(true, Ordering::Release);
    }

    /// The liveness limits, once the pipeline runs.
    pub fn limits(&self) -> Option<LivenessLimits> {
        self.limits.get().copied()
    }

    /// The coordinator loop iterated.
    pub fn beat(&self) {
        self.loop_ms
            .store(crate::clock::clock_ms(), Ordering::Release);
    }

    /// A statistics callback arrived.
    pub fn stats_seen(&self) {
        self.stats_ms
            .store(crate::clock::clock_ms(), Ordering::Release);
    }

    /// Statistics showed the group joined.
    pub fn joined(&self) {
        self.joined_ms
            .store(crate::clock::clock_ms(), Ordering::Release);
    }

    /// A rebalance callback runs until the guard is dropped.
    pub fn in_callback(&self) -> CallbackGuard<'_> {
        self.callback_since_ms
            .store(crate::clock::clock_ms(), Ordering::Release);
        CallbackGuard(self)
    }

    /// How many partitions are stuck in fetch (see [`LivenessLimits::fetch_stall`]).
    pub fn set_stuck_partitions(&self, n: u64) {
        self.stuck_partitions.store(n, Ordering::Release);
    }

    /// How long the commit in flight has waited for its answer (`None`: none in flight).
    pub fn set_commit_unanswered(&self, pending: Option<Duration>) {
        let ms = pending.map_or(0, |p| (p.as_millis() as u64).max(1));
        self.commit_unanswered_ms.store(ms, Ordering::Release);
    }

    /// `Ok` while alive and making progress; otherwise the rule that failed.
    pub fn verdict(&self) -> Result<(), String> {
        self.verdict_at(crate::clock::clock_ms())
    }

    fn verdict_at(&self, now: u64) -> Result<(), String> {
        if self.failed.load(Ordering::Acquire) {
            return Err("a fatal error stopped the pipeline".into());
        }
        let Some(l) = self.limits.get() else {
            return Ok(());
        };
        if self.between_runs.load(Ordering::Acquire) {
            return Ok(());
        }
        let age =
            |a: &AtomicU64| Duration::from_millis(now.saturating_sub(a.load(Ordering::Acquire)));
        if age(&self.loop_ms) > l.coordinator {
            return Err(format!(
                "the coordinator loop has not run for {:?} (limit {:?})",
                age(&self.loop_ms),
                l.coordinator
            ));
        }
        let cb = self.callback_since_ms.load(Ordering::Acquire);
        if cb != 0 {
            let in_cb = Duration::from_millis(now.saturating_sub(cb));
            if in_cb > l.callback + l.statistics {
                return Err(format!(
                    "a rebalance callback has been running for {in_cb:?} (limit {:?})",
                    l.callback + l.statistics
                ));
            }
        } else if age(&self.stats_ms) > l.statistics {
            return Err(format!(
                "no consumer statistics for {:?} (limit {:?}): librdkafka's main queue is not served",
                age(&self.stats_ms),
                l.statistics
            ));
        }
        if age(&self.joined_ms) > l.unjoined {
            return Err(format!(
                "not joined to the consumer group for {:?} (limit: the session timeout, {:?})",
                age(&self.joined_ms),
                l.unjoined
            ));
        }
        let unanswered = Duration::from_millis(self.commit_unanswered_ms.load(Ordering::Acquire));
        if unanswered > l.commit_unanswered {
            return Err(format!(
                "a commit has been unanswered for {unanswered:?} (limit {:?}): librdkafka neither rejoins nor applies an assignment until it answers",
                l.commit_unanswered
            ));
        }
        let stuck = self.stuck_partitions.load(Ordering::Acquire);
        if stuck > 0 {
            return Err(format!(
                "{stuck} partition(s) with records to fetch, not held, received nothing for {:?}",
                l.fetch_stall
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LivenessLimits {
        LivenessLimits {
            coordinator: Duration::from_secs(50),
            statistics: Duration::from_secs(15),
            callback: Duration::from_secs(12),
            unjoined: Duration::from_secs(10),
            fetch_stall: Duration::from_secs(180),
            commit_unanswered: Duration::from_secs(180),
        }
    }

    #[test]
    fn only_a_fatal_error_counts_before_the_pipeline_runs() {
        let h = Health::default();
        assert!(h.verdict().is_ok());
        h.failed.store(true, Ordering::Release);
        assert!(h.verdict().unwrap_err().contains("fatal"));
    }

    #[test]
    fn each_rule_fails_on_its_own() {
        // Judged at `t`, a minute from now; every clock is stamped `t` (fresh) and one
        // at a time is stamped older than its limit.
        let t = crate::clock::clock_ms() + 60_000;
        let at =
            |a: &AtomicU64, secs_before: u64| a.store(t - secs_before * 1000, Ordering::Release);
        let fresh = || {
            let h = Health::default();
            h.start(limits());
            for a in [&h.loop_ms, &h.stats_ms, &h.joined_ms] {
                at(a, 0);
            }
            h
        };
        assert!(fresh().verdict_at(t).is_ok());

        let h = fresh();
        at(&h.loop_ms, 51);
        assert!(h.verdict_at(t).unwrap_err().contains("coordinator loop"));

        let h = fresh();
        at(&h.stats_ms, 16);
        assert!(h.verdict_at(t).unwrap_err().contains("statistics"));

        // A rebalance callback that runs suspends the statistics rule, up to its own limit.
        let h = fresh();
        at(&h.stats_ms, 20);
        at(&h.callback_since_ms, 5);
        assert!(h.verdict_at(t).is_ok());
        at(&h.callback_since_ms, 28);
        assert!(h.verdict_at(t).unwrap_err().contains("rebalance callback"));

        // A commit that waits for its answer: within the limit, fine; past it, a restart
        // (librdkafka holds the assignment until it answers).
        let h = fresh();
        h.set_commit_unanswered(Some(Duration::from_secs(170)));
        assert!(h.verdict_at(t).is_ok());
        h.set_commit_unanswered(Some(Duration::from_secs(181)));
        assert!(h
            .verdict_at(t)
            .unwrap_err()
            .contains("commit has been unanswered"));
        h.set_commit_unanswered(None);
        assert!(h.verdict_at(t).is_ok());

        let h = fresh();
        at(&h.joined_ms, 11);
        assert!(h.verdict_at(t).unwrap_err().contains("not joined"));

        let h = fresh();
        h.set_stuck_partitions(2);
        assert!(h.verdict_at(t).unwrap_err().contains("2 partition(s)"));
        h.set_stuck_partitions(0);
        assert!(h.verdict_at(t).is_ok());
    }

    #[test]
    fn the_end_of_a_rebalance_callback_counts_as_activity() {
        let h = Health::default();
        h.start(limits());
        let guard = h.in_callback();
        assert_ne!(h.callback_since_ms.load(Ordering::Acquire), 0);
        drop(guard);
        assert_eq!(h.callback_since_ms.load(Ordering::Acquire), 0);
        assert!(h.verdict().is_ok());
    }
}
