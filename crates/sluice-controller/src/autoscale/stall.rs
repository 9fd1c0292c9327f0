//! Stalled-partition detection from the outside: a partition that has lag but whose
//! committed offset has not moved for a while is stalled (a worker holds a record it
//! cannot deliver and has no dead-letter topic, or the partition's sink is down).
//!
//! The controller only sees what Kafka shows: per partition, the committed offset and the
//! high watermark. A partition with no lag is never stalled, however long its commit
//! stays put (there is nothing to do); one whose commit moves is not stalled however
//! large its lag (it is slow, which the autoscaler handles).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lag::PartitionLag;

/// Per-pipeline memory of when each partition's committed offset last moved.
#[derive(Debug, Default)]
pub struct StallDetector {
    seen: HashMap<(Arc<str>, i32), (Option<i64>, Instant)>,
}

impl StallDetector {
    /// Record `parts` as seen at `now`; returns the partitions (`topic/partition`) that
    /// have lag and whose committed offset has not changed for at least `after`, in order.
    pub fn observe(
        &mut self,
        now: Instant,
        parts: &[PartitionLag],
        after: Duration,
    ) -> Vec<String> {
        let mut stalled = Vec::new();
        let mut present = std::collections::HashSet::with_capacity(parts.len());
        for p in parts {
            present.insert((p.topic.clone(), p.partition));
            let entry = self
                .seen
                .entry((p.topic.clone(), p.partition))
                .or_insert((p.committed, now));
            if entry.0 != p.committed || p.lag == 0 {
                *entry = (p.committed, now);
            } else if now.duration_since(entry.1) >= after {
                stalled.push((p.topic.clone(), p.partition));
            }
        }
        self.seen.retain(|k, _| present.contains(k));
        stalled.sort_unstable();
        stalled
            .into_iter()
            .map(|(t, p)| format!("{t}/{p}"))
            .collect()
    }
}

/// How long a partition's commit may stand still, with lag, before it counts as
/// stalled: two lag polls, and at least a minute (workers commit every second by default;
/// a minute without a commit while records wait is not slowness).
pub fn stall_window(poll_interval: Duration) -> Duration {
    (poll_interval * 2).max(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(partition: i32, committed: i64, high: i64) -> PartitionLag {
        PartitionLag {
            topic: "in".into(),
            partition,
            low: 0,
            high,
            committed: Some(committed),
            lag: (high - committed).max(0) as u64,
        }
    }

    #[test]
    fn a_partition_with_lag_and_a_still_commit_stalls_after_the_window() {
        let mut d = StallDetector::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        let poll = |d: &mut StallDetector, s: u64, p0: i64, p1: i64| {
            d.observe(
                t0 + Duration::from_secs(s),
                &[
                    part(0, p0, 10_000 + s as i64),
                    part(1, p1, 10_000 + s as i64),
                ],
                w,
            )
        };
        assert!(poll(&mut d, 0, 500, 500).is_empty());
        // partition 0 stands still at 500; partition 1 keeps committing
        assert!(poll(&mut d, 30, 500, 3_000).is_empty());
        assert!(poll(&mut d, 59, 500, 6_000).is_empty());
        assert_eq!(poll(&mut d, 60, 500, 9_000), ["in/0"]);
        assert_eq!(poll(&mut d, 90, 500, 10_090), ["in/0"]);
        // it moves again: no longer stalled, and the window starts over
        assert!(poll(&mut d, 100, 501, 10_100).is_empty());
        assert!(poll(&mut d, 159, 501, 10_159).is_empty());
        assert_eq!(poll(&mut d, 160, 501, 10_160), ["in/0"]);
    }

    #[test]
    fn no_lag_is_never_stalled_and_slow_progress_is_not_a_stall() {
        let mut d = StallDetector::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        for s in (0..600).step_by(30) {
            let idle = part(0, 1_000, 1_000);
            let slow = part(1, s as i64, 1_000_000);
            assert!(d
                .observe(t0 + Duration::from_secs(s), &[idle, slow], w)
                .is_empty());
        }
    }

    #[test]
    fn a_partition_that_was_never_committed_and_has_lag_stalls_too() {
        let mut d = StallDetector::default();
        let t0 = Instant::now();
        let p = PartitionLag {
            topic: "in".into(),
            partition: 2,
            low: 0,
            high: 50,
            committed: None,
            lag: 50,
        };
        assert!(d
            .observe(t0, std::slice::from_ref(&p), Duration::from_secs(60))
            .is_empty());
        assert_eq!(
            d.observe(t0 + Duration::from_secs(61), &[p], Duration::from_secs(60)),
            ["in/2"]
        );
    }

    #[test]
    fn the_window_is_two_polls_and_at_least_a_minute() {
        assert_eq!(
            stall_window(Duration::from_secs(5)),
            Duration::from_secs(60)
        );
        assert_eq!(
            stall_window(Duration::from_secs(45)),
            Duration::from_secs(90)
        );
    }
}
