//! The scaling policy, pure: no clock of its own, no I/O.
//!
//! desired = clamp(min(ceil(lag / lagPerReplica), partitions with lag), min, min(max, partitions))
//!
//! - Scale up at once, but only for lag more replicas can reduce: lag on stalled partitions
//!   is left out (a stuck record does not move faster with more workers), a replica per
//!   partition with lag is the most that helps (one hot partition is one consumer's work),
//!   and while replicas are not all ready (a rollout, a crash loop) nothing is added.
//! - Scale down only to the highest recommendation seen during the stabilization window,
//!   so a dip in lag does not remove replicas (and trigger a rebalance) that the next poll
//!   would add back.
//! - Unknown lag (a failed query) holds the current replicas. It is never read as zero.
//! - Never more replicas than partitions: a replica without a partition does nothing.
//!
//! - Scale to zero (`min` 0 and `idle_after` set): after no lag and no new records for
//!   `idle_after`, replicas go to 0 at once (whatever they were: nothing is waiting); at 0
//!   the pipeline is idle until the lag reaches `activation`, then it wakes at once to
//!   what the lag asks for (at least 1), never waiting for the scale-down window. Without
//!   a trustworthy "records written" reading (`written: None`) a pipeline never idles,
//!   and one at 0 wakes. Otherwise a `min` of 0 scales like a `min` of 1.
//!
//! The controller asks for a decision at most once per poll interval per pipeline
//! (reconciles caused by status updates reuse the last one), so neither the Deployment's
//! own status changes nor a burst of events can ratchet replicas.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Policy parameters, from `spec.scaling`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Fewest replicas.
    pub min: u32,
    /// Most replicas.
    pub max: u32,
    /// Lag one replica absorbs.
    pub lag_per_replica: u64,
    /// How long a lower recommendation must hold before scaling down.
    pub scale_down_window: Duration,
    /// With `min` 0: how long without lag and without new records before scaling to zero.
    /// `None` (or a `min` above 0): never.
    pub idle_after: Option<Duration>,
    /// Lag (records) that wakes a pipeline scaled to zero.
    pub activation: u64,
}

impl From<&sluice_api::crd::ScalingSpec> for Policy {
    fn from(s: &sluice_api::crd::ScalingSpec) -> Self {
        Policy {
            min: s.min_replicas.max(0) as u32,
            max: s.max_replicas.max(0) as u32,
            lag_per_replica: s.lag_per_replica.max(1) as u64,
            scale_down_window: s.scale_down_stabilization.0,
            idle_after: s.scale_to_zero_after(),
            activation: s.activation(),
        }
    }
}

/// What the lag query returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lag {
    /// Lag more replicas could reduce.
    Known {
        /// Records waiting on partitions that are not stalled.
        records: u64,
        /// How many of those partitions have lag.
        busy: u32,
        /// Records waiting on every partition, stalled ones included.
        total: u64,
        /// Records ever written to the topic (the sum of the high watermarks): when it
        /// stands still, no new records arrived. `None` when idling must not be trusted
        /// (a group that starts at the end of the log and has not committed everywhere:
        /// its workers, woken, would start after the records that woke them).
        written: Option<i64>,
    },
    /// The query failed.
    Unknown,
}

impl Lag {
    /// `records` spread over `busy` partitions.
    pub fn on(records: u64, busy: u32) -> Self {
        Lag::Known {
            records,
            busy,
            total: records,
            written: None,
        }
    }

    /// `records` spread over `busy` partitions, `total` in all (stalled partitions too),
    /// `written` records ever written to the topic.
    pub fn with_writes(records: u64, busy: u32, total: u64, written: Option<i64>) -> Self {
        Lag::Known {
            records,
            busy,
            total,
            written,
        }
    }
}

/// Why replicas are what they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Replicas went up.
    ScaleUp,
    /// Replicas went down after the window.
    ScaleDown,
    /// Desired equals current.
    Steady,
    /// Desired is lower, but not for long enough.
    Stabilizing,
    /// Lag is unknown; holding.
    LagUnknown,
    /// Desired is higher, but not every current replica is ready yet; holding.
    WaitingForReady,
    /// No lag and no new records for `idle_after`: scaled to zero.
    ScaleToZero,
    /// At zero, and the lag is below the activation threshold.
    Idle,
    /// At zero, and the lag reached the activation threshold: scaled up.
    Wake,
}

impl Reason {
    /// Every reason (to remove a pipeline's series, one per reason).
    pub const ALL: [Reason; 9] = [
        Reason::ScaleUp,
        Reason::ScaleDown,
        Reason::Steady,
        Reason::Stabilizing,
        Reason::LagUnknown,
        Reason::WaitingForReady,
        Reason::ScaleToZero,
        Reason::Idle,
        Reason::Wake,
    ];

    /// A bounded label for metrics and Events.
    pub fn label(self) -> &'static str {
        match self {
            Reason::ScaleUp => "scale_up",
            Reason::ScaleDown => "scale_down",
            Reason::Steady => "steady",
            Reason::Stabilizing => "stabilizing",
            Reason::LagUnknown => "lag_unknown",
            Reason::WaitingForReady => "waiting_for_ready",
            Reason::ScaleToZero => "scale_to_zero",
            Reason::Idle => "idle",
            Reason::Wake => "wake",
        }
    }
}

/// A cap that kept replicas below what the lag (or `minReplicas`) asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `maxReplicas`.
    MaxReplicas,
    /// The topic's partition count.
    Partitions,
    /// The lag sits on fewer partitions than it would take replicas.
    PartitionsWithLag,
    /// `minReplicas` is above the partition count.
    MinAbovePartitions,
}

/// One decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Replicas to run.
    pub replicas: u32,
    /// What the current lag alone asks for (None when lag is unknown).
    pub desired: Option<u32>,
    /// Why.
    pub reason: Reason,
    /// A cap that bound the request, if any.
    pub limited: Option<Limit>,
}

/// clamp(min(ceil(records / lagPerReplica), busy), min, min(max, partitions)), and which cap
/// bound it.
pub fn desired_replicas(
    records: u64,
    busy: u32,
    partitions: u32,
    p: &Policy,
) -> (u32, Option<Limit>) {
    let per = p.lag_per_replica.max(1);
    let want = records.div_ceil(per).min(u32::MAX as u64) as u32;
    let useful = want.min(busy.max(1));
    let cap = p.max.min(partitions).max(1);
    let floor = p.min.min(cap);
    let replicas = useful.clamp(floor, cap);
    let limited = if replicas < want.min(cap) {
        Some(Limit::PartitionsWithLag)
    } else if want > cap {
        Some(if partitions < p.max {
            Limit::Partitions
        } else {
            Limit::MaxReplicas
        })
    } else if p.min > partitions {
        Some(Limit::MinAbovePartitions)
    } else {
        None
    };
    (replicas, limited)
}

/// The autoscaler's memory: recommendations inside the stabilization window.
#[derive(Debug, Default)]
pub struct Autoscaler {
    history: VecDeque<(Instant, u32)>,
    /// When lag or new records were last seen, and the `written` reading then.
    active: Option<(Instant, Option<i64>)>,
}

impl Autoscaler {
    /// A fresh autoscaler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decide replicas at `now`, given the current and ready replicas, the lag reading and
    /// the partition count.
    pub fn decide(
        &mut self,
        now: Instant,
        current: u32,
        ready: u32,
        lag: Lag,
        partitions: u32,
        p: &Policy,
    ) -> Decision {
        let cap = p.max.min(partitions).max(1);
        let Lag::Known {
            records,
            busy,
            total,
            written,
        } = lag
        else {
            // Hold, but never above what the partitions allow.
            return Decision {
                replicas: current.min(cap),
                desired: None,
                reason: Reason::LagUnknown,
                limited: (p.min > partitions).then_some(Limit::MinAbovePartitions),
            };
        };
        // Below the idle rules, a `min` of 0 is a `min` of 1.
        let to_zero = p.min == 0 && p.idle_after.is_some();
        let floored;
        let p = if p.min == 0 {
            floored = Policy {
                min: 1,
                ..p.clone()
            };
            &floored
        } else {
            p
        };
        if to_zero {
            if let Some(d) = self.idle(now, current, records, busy, total, written, partitions, p) {
                return d;
            }
        }
        if self.history.is_empty() {
            // After a (controller) restart the window starts full of "current": no scale
            // down until a lower recommendation has held for a whole window.
            self.history.push_back((now, current.min(cap)));
        }
        let (desired, limited) = desired_replicas(records, busy, partitions, p);
        self.history.push_back((now, desired));
        while let Some(&(t, _)) = self.history.front() {
            if now.saturating_duration_since(t) > p.scale_down_window && self.history.len() > 1 {
                self.history.pop_front();
            } else {
                break;
            }
        }
        let stabilized = self
            .history
            .iter()
            .map(|&(_, r)| r)
            .max()
            .unwrap_or(desired);
        let (replicas, reason) = if desired > current && ready < current {
            // Replicas that are not up yet are not consuming: adding more would only add
            // rebalances. Decide again once they are ready.
            (current.min(cap), Reason::WaitingForReady)
        } else if desired > current {
            (desired, Reason::ScaleUp)
        } else if desired == current {
            (current, Reason::Steady)
        } else if stabilized < current {
            (stabilized, Reason::ScaleDown)
        } else {
            (
                current.min(cap),
                if current > cap {
                    Reason::ScaleDown
                } else {
                    Reason::Stabilizing
                },
            )
        };
        Decision {
            replicas,
            desired: Some(desired),
            reason,
            limited,
        }
    }

    /// The scale-to-zero rules (see the module docs), when `p` (already floored at 1)
    /// came from a `min` of 0 with `idle_after` set: `Some` decides.
    #[allow(clippy::too_many_arguments)]
    fn idle(
        &mut self,
        now: Instant,
        current: u32,
        records: u64,
        busy: u32,
        total: u64,
        written: Option<i64>,
        partitions: u32,
        p: &Policy,
    ) -> Option<Decision> {
        let after = p.idle_after?;
        let moved = match self.active {
            Some((_, w)) => w != written,
            // First reading (a new pipeline, a controller restart): the quiet time starts now.
            None => true,
        };
        if moved || total > 0 || written.is_none() {
            self.active = Some((now, written));
        }
        if current == 0 {
            if written.is_some() && total < p.activation.max(1) {
                self.history.clear();
                return Some(Decision {
                    replicas: 0,
                    desired: Some(0),
                    reason: Reason::Idle,
                    limited: None,
                });
            }
            // Wake at once to what the lag asks for; the window starts from here.
            let (replicas, limited) = desired_replicas(records, busy, partitions, p);
            self.history.clear();
            self.history.push_back((now, replicas));
            return Some(Decision {
                replicas,
                desired: Some(replicas),
                reason: Reason::Wake,
                limited,
            });
        }
        let (since, _) = self.active?;
        if now.saturating_duration_since(since) >= after {
            self.history.clear();
            return Some(Decision {
                replicas: 0,
                desired: Some(0),
                reason: Reason::ScaleToZero,
                limited: None,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            min: 1,
            max: 10,
            lag_per_replica: 1000,
            scale_down_window: Duration::from_secs(300),
            idle_after: None,
            activation: 1,
        }
    }

    #[test]
    fn desired_replicas_table() {
        let p = policy();
        let table = [
            // lag, partitions, replicas, limited
            (0, 8, 1, None),
            (1, 8, 1, None),
            (1000, 8, 1, None),
            (1001, 8, 2, None),
            (7_500, 8, 8, None),
            (8_001, 8, 8, Some(Limit::Partitions)),
            (50_000, 20, 10, Some(Limit::MaxReplicas)),
            (50_000, 10, 10, Some(Limit::MaxReplicas)),
            (u64::MAX, 3, 3, Some(Limit::Partitions)),
        ];
        for (lag, parts, want, limited) in table {
            assert_eq!(
                desired_replicas(lag, parts, parts, &p),
                (want, limited),
                "lag {lag} partitions {parts}"
            );
        }
    }

    #[test]
    fn min_above_the_partition_count_still_gives_every_replica_a_partition() {
        let p = Policy { min: 5, ..policy() };
        assert_eq!(
            desired_replicas(0, 0, 3, &p),
            (3, Some(Limit::MinAbovePartitions))
        );
    }

    #[test]
    fn scale_up_is_immediate() {
        let mut a = Autoscaler::new();
        let t0 = Instant::now();
        let d = a.decide(t0, 1, 1, Lag::on(5_500, 8), 8, &policy());
        assert_eq!((d.replicas, d.reason), (6, Reason::ScaleUp));
    }

    #[test]
    fn constant_lag_never_flaps() {
        let mut a = Autoscaler::new();
        let t0 = Instant::now();
        let mut current = 1;
        let mut changes = 0;
        for i in 0..200 {
            let d = a.decide(
                t0 + Duration::from_secs(30 * i),
                current,
                current,
                Lag::on(3_200, 8),
                8,
                &policy(),
            );
            if d.replicas != current {
                changes += 1;
                current = d.replicas;
            }
        }
        assert_eq!((current, changes), (4, 1));
    }

    #[test]
    fn scale_down_waits_for_the_whole_window() {
        let p = policy();
        let mut a = Autoscaler::new();
        let t0 = Instant::now();
        assert_eq!(a.decide(t0, 1, 1, Lag::on(6_000, 8), 8, &p).replicas, 6);
        // Lag drains; for 5 minutes the decision holds at 6.
        for s in (30..=300).step_by(30) {
            let d = a.decide(t0 + Duration::from_secs(s), 6, 6, Lag::on(0, 8), 8, &p);
            assert_eq!((d.replicas, d.reason), (6, Reason::Stabilizing), "at {s}s");
        }
        let d = a.decide(t0 + Duration::from_secs(331), 6, 6, Lag::on(0, 8), 8, &p);
        assert_eq!((d.replicas, d.reason), (1, Reason::ScaleDown));
    }

    #[test]
    fn a_brief_dip_does_not_scale_down() {
        let p = policy();
        let mut a = Autoscaler::new();
        let t0 = Instant::now();
        a.decide(t0, 4, 4, Lag::on(4_000, 8), 8, &p);
        a.decide(t0 + Duration::from_secs(30), 4, 4, Lag::on(0, 8), 8, &p);
        let d = a.decide(t0 + Duration::from_secs(60), 4, 4, Lag::on(3_900, 8), 8, &p);
        assert_eq!(d.replicas, 4);
    }

    #[test]
    fn unknown_lag_holds_current_replicas() {
        let mut a = Autoscaler::new();
        let t0 = Instant::now();
        for i in 0..20 {
            let d = a.decide(
                t0 + Duration::from_secs(600 * i),
                5,
                5,
                Lag::Unknown,
                8,
                &policy(),
            );
            assert_eq!(
                (d.replicas, d.reason, d.desired),
                (5, Reason::LagUnknown, None)
            );
        }
    }

    #[test]
    fn a_controller_restart_does_not_scale_down_at_once() {
        let mut a = Autoscaler::new();
        let d = a.decide(Instant::now(), 6, 6, Lag::on(0, 8), 8, &policy());
        assert_eq!((d.replicas, d.reason), (6, Reason::Stabilizing));
    }

    #[test]
    fn fewer_partitions_than_replicas_scales_down_to_the_partition_count() {
        let mut a = Autoscaler::new();
        let d = a.decide(Instant::now(), 8, 8, Lag::on(100_000, 8), 4, &policy());
        assert_eq!(d.replicas, 4);
        let d = a.decide(Instant::now(), 8, 8, Lag::Unknown, 4, &policy());
        assert_eq!(d.replicas, 4);
    }

    /// Each row: current, ready, lag records, partitions with lag, partitions -> replicas,
    /// reason, limit. One decision from a fresh autoscaler.
    #[test]
    fn only_lag_more_replicas_can_reduce_scales_up() {
        use Reason::*;
        let p = policy();
        let table = [
            // spread over every partition: one replica per 1000
            (1, 1, 6_000, 8, 8, 6, ScaleUp, None),
            // one hot partition: a second consumer could not share it
            (
                1,
                1,
                60_000,
                1,
                8,
                1,
                Steady,
                Some(Limit::PartitionsWithLag),
            ),
            // three partitions with lag: three replicas at most
            (
                1,
                1,
                60_000,
                3,
                8,
                3,
                ScaleUp,
                Some(Limit::PartitionsWithLag),
            ),
            // only stalled partitions had lag (the controller passes none of it)
            (2, 2, 0, 0, 8, 2, Stabilizing, None),
            // replicas not ready yet: hold, decide again when they are
            (2, 1, 6_000, 8, 8, 2, WaitingForReady, None),
            (2, 0, 6_000, 8, 8, 2, WaitingForReady, None),
            // all ready: go
            (2, 2, 6_000, 8, 8, 6, ScaleUp, None),
            // not ready does not stop a scale-down from being considered (it stabilizes)
            (4, 0, 0, 0, 8, 4, Stabilizing, None),
        ];
        for (current, ready, records, busy, parts, want, reason, limited) in table {
            let d = Autoscaler::new().decide(
                Instant::now(),
                current,
                ready,
                Lag::on(records, busy),
                parts,
                &p,
            );
            assert_eq!(
                (d.replicas, d.reason, d.limited),
                (want, reason, limited),
                "current {current} ready {ready} lag {records} on {busy} of {parts}"
            );
        }
    }

    #[test]
    fn min_replicas_above_the_partition_count_is_reported_as_a_limit() {
        let p = Policy {
            min: 500,
            max: 1000,
            ..policy()
        };
        let d = Autoscaler::new().decide(Instant::now(), 0, 0, Lag::on(0, 0), 4, &p);
        assert_eq!(
            (d.replicas, d.limited),
            (4, Some(Limit::MinAbovePartitions))
        );
        let d = Autoscaler::new().decide(Instant::now(), 4, 4, Lag::Unknown, 4, &p);
        assert_eq!(
            (d.replicas, d.limited),
            (4, Some(Limit::MinAbovePartitions))
        );
    }

    fn to_zero(idle_after: u64, activation: u64) -> Policy {
        Policy {
            min: 0,
            scale_down_window: Duration::from_secs(60),
            idle_after: Some(Duration::from_secs(idle_after)),
            activation,
            ..policy()
        }
    }

    /// A reading with `total` lag spread over 8 partitions and `written` records ever written.
    fn reading(total: u64, written: i64) -> Lag {
        Lag::with_writes(total, total.min(8) as u32, total, Some(written))
    }

    #[test]
    fn no_lag_and_no_new_records_for_idle_after_scales_to_zero() {
        let p = to_zero(120, 1);
        let mut a = Autoscaler::new();
        let t0 = Instant::now();
        for s in (0..120).step_by(10) {
            let d = a.decide(t0 + Duration::from_secs(s), 1, 1, reading(0, 500), 8, &p);
            assert_eq!((d.replicas, d.reason), (1, Reason::Steady), "at {s}s");
        }
        let d = a.decide(t0 + Duration::from_secs(120), 1, 1, reading(0, 500), 8, &p);
        assert_eq!(
            (d.replicas, d.reason, d.desired),
            (0, Reason::ScaleToZero, Some(0))
        );
    }

    #[test]
    fn new_records_restart_the_quiet_time_even_when_consumed_at_once() {
        let p = to_zero(120, 1);
        let mut a = Autoscaler::new();
        let t0 = Instant::now();
        a.decide(t0, 1, 1, reading(0, 500), 8, &p);
        // Records arrive and are consumed between two polls: lag reads 0, writes moved.
        a.decide(t0 + Duration::from_secs(100), 1, 1, reading(0, 510), 8, &p);
        let d = a.decide(t0 + Duration::from_secs(200), 1, 1, reading(0, 510), 8, &p);
        assert_eq!(d.replicas, 1, "quiet for 100s only");
        let d = a.decide(t0 + Duration::from_secs(220), 1, 1, reading(0, 510), 8, &p);
        assert_eq!((d.replicas, d.reason), (0, Reason::ScaleToZero));
    }

    #[test]
    fn lag_keeps_a_pipeline_awake_even_when_nothing_new_arrives() {
        // A stalled partition: lag that does not move is not idleness.
        let p = to_zero(60, 1);
        let mut a = Autoscaler::new();
        let t0 = Instant::now();
        for s in (0..600).step_by(30) {
            let lag = Lag::with_writes(0, 0, 40, Some(500));
            let d = a.decide(t0 + Duration::from_secs(s), 1, 1, lag, 8, &p);
            assert_eq!(d.replicas, 1, "at {s}s");
        }
    }

    #[test]
    fn idle_goes_to_zero_from_any_count_without_waiting_for_the_window() {
        let p = Policy {
            scale_down_window: Duration::from_secs(600),
            ..to_zero(60, 1)
        };
        let mut a = Autoscaler::new();
        let t0 = Instant::now();
        assert_eq!(a.decide(t0, 1, 1, reading(6_000, 6_000), 8, &p).replicas, 6);
        let d = a.decide(t0 + Duration::from_secs(30), 6, 6, reading(0, 6_000), 8, &p);
        assert_eq!((d.replicas, d.reason), (6, Reason::Stabilizing));
        let d = a.decide(t0 + Duration::from_secs(90), 6, 6, reading(0, 6_000), 8, &p);
        assert_eq!((d.replicas, d.reason), (0, Reason::ScaleToZero));
    }

    #[test]
    fn at_zero_lag_below_the_activation_threshold_stays_idle_and_reaching_it_wakes() {
        let p = to_zero(60, 100);
        let mut a = Autoscaler::new();
        let t0 = Instant::now();
        let table = [
            // current, lag, written -> replicas, reason
            (0, 0, 500, 0, Reason::Idle),
            (0, 99, 599, 0, Reason::Idle),
            (0, 100, 600, 1, Reason::Wake),
        ];
        for (i, (current, lag, written, want, reason)) in table.into_iter().enumerate() {
            let at = t0 + Duration::from_secs(10 * i as u64);
            let d = a.decide(at, current, current, reading(lag, written), 8, &p);
            assert_eq!((d.replicas, d.reason), (want, reason), "lag {lag}");
        }
    }

    #[test]
    fn the_first_new_record_wakes_by_default_and_a_backlog_wakes_to_what_it_needs() {
        let p = to_zero(60, 1);
        let t0 = Instant::now();
        let d = Autoscaler::new().decide(t0, 0, 0, reading(1, 501), 8, &p);
        assert_eq!((d.replicas, d.reason), (1, Reason::Wake));
        let d = Autoscaler::new().decide(t0, 0, 0, reading(5_500, 6_000), 8, &p);
        assert_eq!((d.replicas, d.reason), (6, Reason::Wake));
        // Lag on one partition: one replica is what helps.
        let lag = Lag::with_writes(5_500, 1, 5_500, Some(6_000));
        let d = Autoscaler::new().decide(t0, 0, 0, lag, 8, &p);
        assert_eq!(
            (d.replicas, d.reason, d.limited),
            (1, Reason::Wake, Some(Limit::PartitionsWithLag))
        );
    }

    #[test]
    fn a_wake_right_after_scaling_to_zero_is_not_held_by_the_window() {
        let p = Policy {
            scale_down_window: Duration::from_secs(600),
            ..to_zero(60, 1)
        };
        let mut a = Autoscaler::new();
        let t0 = Instant::now();
        a.decide(t0, 3, 3, reading(0, 500), 8, &p);
        let d = a.decide(t0 + Duration::from_secs(60), 3, 3, reading(0, 500), 8, &p);
        assert_eq!(d.replicas, 0);
        let d = a.decide(t0 + Duration::from_secs(61), 0, 0, reading(3, 503), 8, &p);
        assert_eq!((d.replicas, d.reason), (1, Reason::Wake));
        // Then on lag as usual: the window holds the next scale-down, not the wake.
        let d = a.decide(
            t0 + Duration::from_secs(62),
            1,
            1,
            reading(4_000, 4_500),
            8,
            &p,
        );
        assert_eq!((d.replicas, d.reason), (4, Reason::ScaleUp));
        let d = a.decide(t0 + Duration::from_secs(70), 4, 4, reading(0, 4_500), 8, &p);
        assert_eq!((d.replicas, d.reason), (4, Reason::Stabilizing));
    }

    #[test]
    fn without_a_trustworthy_write_count_a_pipeline_never_idles_and_one_at_zero_wakes() {
        let p = to_zero(60, 1);
        let mut a = Autoscaler::new();
        let t0 = Instant::now();
        for s in (0..600).step_by(30) {
            let lag = Lag::with_writes(0, 0, 0, None);
            let d = a.decide(t0 + Duration::from_secs(s), 1, 1, lag, 8, &p);
            assert_eq!(d.replicas, 1, "at {s}s");
        }
        let d = Autoscaler::new().decide(t0, 0, 0, Lag::with_writes(0, 0, 0, None), 8, &p);
        assert_eq!((d.replicas, d.reason), (1, Reason::Wake));
    }

    #[test]
    fn unknown_lag_at_zero_stays_at_zero() {
        let d = Autoscaler::new().decide(Instant::now(), 0, 0, Lag::Unknown, 8, &to_zero(60, 1));
        assert_eq!((d.replicas, d.reason), (0, Reason::LagUnknown));
    }

    #[test]
    fn min_zero_without_idleness_scales_down_no_lower_than_one() {
        let p = to_zero(3_600, 1);
        let mut a = Autoscaler::new();
        let t0 = Instant::now();
        a.decide(t0, 4, 4, reading(0, 500), 8, &p);
        let d = a.decide(t0 + Duration::from_secs(61), 4, 4, reading(0, 500), 8, &p);
        assert_eq!((d.replicas, d.reason), (1, Reason::ScaleDown));
    }

    #[test]
    fn a_controller_restart_at_zero_stays_idle_and_a_restart_above_zero_waits_a_full_idle_after() {
        let p = to_zero(60, 1);
        let t0 = Instant::now();
        let d = Autoscaler::new().decide(t0, 0, 0, reading(0, 500), 8, &p);
        assert_eq!((d.replicas, d.reason), (0, Reason::Idle));
        let mut a = Autoscaler::new();
        let d = a.decide(t0, 1, 1, reading(0, 500), 8, &p);
        assert_eq!(d.replicas, 1);
        let d = a.decide(t0 + Duration::from_secs(60), 1, 1, reading(0, 500), 8, &p);
        assert_eq!(d.replicas, 0);
    }
}
