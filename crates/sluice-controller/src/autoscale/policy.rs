//! The scaling policy, pure: no clock of its own, no I/O.
//!
//! desired = clamp(ceil(lag / lagPerReplica), min, min(max, partitions))
//!
//! - Scale up at once.
//! - Scale down only to the highest recommendation seen during the stabilization window,
//!   so a dip in lag does not remove replicas (and trigger a rebalance) that the next poll
//!   would add back.
//! - Unknown lag (a failed query) holds the current replicas. It is never read as zero.
//! - Never more replicas than partitions: a replica without a partition does nothing.

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
}

/// What the lag query returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lag {
    /// Total lag in records.
    Known(u64),
    /// The query failed.
    Unknown,
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
}

impl Reason {
    /// A bounded label for metrics and Events.
    pub fn label(self) -> &'static str {
        match self {
            Reason::ScaleUp => "scale_up",
            Reason::ScaleDown => "scale_down",
            Reason::Steady => "steady",
            Reason::Stabilizing => "stabilizing",
            Reason::LagUnknown => "lag_unknown",
        }
    }
}

/// A cap that kept replicas below what the lag asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `maxReplicas`.
    MaxReplicas,
    /// The topic's partition count.
    Partitions,
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
    /// A cap that bound the lag's request, if any.
    pub limited: Option<Limit>,
}

/// clamp(ceil(lag / lagPerReplica), min, min(max, partitions)), and which cap bound it.
pub fn desired_replicas(lag: u64, partitions: u32, p: &Policy) -> (u32, Option<Limit>) {
    let per = p.lag_per_replica.max(1);
    let want = lag.div_ceil(per).min(u32::MAX as u64) as u32;
    let cap = p.max.min(partitions).max(1);
    let floor = p.min.min(cap);
    let replicas = want.clamp(floor, cap);
    let limited = if want > cap {
        Some(if partitions < p.max {
            Limit::Partitions
        } else {
            Limit::MaxReplicas
        })
    } else {
        None
    };
    (replicas, limited)
}

/// The autoscaler's memory: recommendations inside the stabilization window.
#[derive(Debug, Default)]
pub struct Autoscaler {
    history: VecDeque<(Instant, u32)>,
}

impl Autoscaler {
    /// A fresh autoscaler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decide replicas at `now`, given the current replicas, the lag reading and the
    /// partition count.
    pub fn decide(
        &mut self,
        now: Instant,
        current: u32,
        lag: Lag,
        partitions: u32,
        p: &Policy,
    ) -> Decision {
        let cap = p.max.min(partitions).max(1);
        let Lag::Known(lag) = lag else {
            // Hold, but never above what the partitions allow.
            return Decision {
                replicas: current.min(cap),
                desired: None,
                reason: Reason::LagUnknown,
                limited: None,
            };
        };
        if self.history.is_empty() {
            // After a (controller) restart the window starts full of "current": no scale
            // down until a lower recommendation has held for a whole window.
            self.history.push_back((now, current.min(cap)));
        }
        let (desired, limited) = desired_replicas(lag, partitions, p);
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
        let (replicas, reason) = if desired > current {
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
                desired_replicas(lag, parts, &p),
                (want, limited),
                "lag {lag} partitions {parts}"
            );
        }
    }

    #[test]
    fn min_above_the_partition_count_still_gives_every_replica_a_partition() {
        let p = Policy { min: 5, ..policy() };
        assert_eq!(desired_replicas(0, 3, &p).0, 3);
    }

    #[test]
    fn scale_up_is_immediate() {
        let mut a = Autoscaler::new();
        let t0 = Instant::now();
        let d = a.decide(t0, 1, Lag::Known(5_500), 8, &policy());
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
                Lag::Known(3_200),
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
        assert_eq!(a.decide(t0, 1, Lag::Known(6_000), 8, &p).replicas, 6);
        // Lag drains; for 5 minutes the decision holds at 6.
        for s in (30..=300).step_by(30) {
            let d = a.decide(t0 + Duration::from_secs(s), 6, Lag::Known(0), 8, &p);
            assert_eq!((d.replicas, d.reason), (6, Reason::Stabilizing), "at {s}s");
        }
        let d = a.decide(t0 + Duration::from_secs(331), 6, Lag::Known(0), 8, &p);
        assert_eq!((d.replicas, d.reason), (1, Reason::ScaleDown));
    }

    #[test]
    fn a_brief_dip_does_not_scale_down() {
        let p = policy();
        let mut a = Autoscaler::new();
        let t0 = Instant::now();
        a.decide(t0, 4, Lag::Known(4_000), 8, &p);
        a.decide(t0 + Duration::from_secs(30), 4, Lag::Known(0), 8, &p);
        let d = a.decide(t0 + Duration::from_secs(60), 4, Lag::Known(3_900), 8, &p);
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
        let d = a.decide(Instant::now(), 6, Lag::Known(0), 8, &policy());
        assert_eq!((d.replicas, d.reason), (6, Reason::Stabilizing));
    }

    #[test]
    fn fewer_partitions_than_replicas_scales_down_to_the_partition_count() {
        let mut a = Autoscaler::new();
        let d = a.decide(Instant::now(), 8, Lag::Known(100_000), 4, &policy());
        assert_eq!(d.replicas, 4);
        let d = a.decide(Instant::now(), 8, Lag::Unknown, 4, &policy());
        assert_eq!(d.replicas, 4);
    }
}
