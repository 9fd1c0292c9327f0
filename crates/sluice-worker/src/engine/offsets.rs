//! The offset tracker: which source offsets are done, and how far it is safe to commit.
//!
//! The dispatcher registers each batch it hands to the pool as an offset range, in
//! offset order. A range completes when every record in it was processed and every output
//! was acknowledged by every sink; completion may come in any order. The watermark is the
//! offset after the longest prefix of completed ranges: committing it can never skip a
//! record that is still in flight. Offsets between two registered ranges do not exist in
//! the log (compaction, transaction markers), so passing over them is correct.

use std::collections::VecDeque;

/// A registered range that has not been released by the watermark yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    first: i64,
    last: i64,
    done: bool,
}

/// Misuse of the tracker; each is a bug in the caller, reported rather than ignored.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrackerError {
    /// Ranges must be registered in increasing offset order without overlap.
    #[error("range {first}..={last} registered out of order (last registered offset {prev})")]
    OutOfOrder {
        /// First offset of the new range.
        first: i64,
        /// Last offset of the new range.
        last: i64,
        /// Last offset registered before.
        prev: i64,
    },
    /// `complete` named a range that was never registered (or was released already).
    #[error("no registered range starts at offset {0}")]
    Unknown(i64),
}

/// Per-partition completion state. Pure: no I/O, no clocks.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    pending: VecDeque<Range>,
    last_registered: Option<i64>,
    watermark: Option<i64>,
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `first..=last` as dispatched and not yet done.
    pub fn register(&mut self, first: i64, last: i64) -> Result<(), TrackerError> {
        let prev = self.last_registered.unwrap_or(i64::MIN);
        if last < first || (self.last_registered.is_some() && first <= prev) {
            return Err(TrackerError::OutOfOrder { first, last, prev });
        }
        self.pending.push_back(Range {
            first,
            last,
            done: false,
        });
        self.last_registered = Some(last);
        Ok(())
    }

    /// Mark the range that starts at `first` done. Returns the new watermark when it moved.
    pub fn complete(&mut self, first: i64) -> Result<Option<i64>, TrackerError> {
        let idx = self
            .pending
            .binary_search_by_key(&first, |r| r.first)
            .map_err(|_| TrackerError::Unknown(first))?;
        if self.pending[idx].done {
            return Err(TrackerError::Unknown(first));
        }
        self.pending[idx].done = true;
        let mut moved = None;
        while let Some(r) = self.pending.front() {
            if !r.done {
                break;
            }
            let next = r.last + 1;
            self.watermark = Some(next);
            moved = Some(next);
            self.pending.pop_front();
        }
        Ok(moved)
    }

    /// The last offset registered, if any.
    pub fn last_registered(&self) -> Option<i64> {
        self.last_registered
    }

    /// The next offset to consume after everything done so far, i.e. what to commit.
    /// `None` until the first range completes.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// True when nothing is in flight.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn watermark_waits_for_the_oldest_range() {
        let mut t = OffsetTracker::new();
        t.register(0, 9).unwrap();
        t.register(10, 19).unwrap();
        t.register(20, 29).unwrap();
        assert_eq!(t.complete(10).unwrap(), None);
        assert_eq!(t.complete(20).unwrap(), None);
        assert_eq!(t.watermark(), None);
        assert_eq!(t.complete(0).unwrap(), Some(30));
        assert!(t.is_idle());
    }

    #[test]
    fn gaps_between_ranges_are_offsets_that_do_not_exist() {
        let mut t = OffsetTracker::new();
        t.register(5, 7).unwrap();
        t.register(12, 12).unwrap();
        t.complete(5).unwrap();
        assert_eq!(t.watermark(), Some(8));
        t.complete(12).unwrap();
        assert_eq!(t.watermark(), Some(13));
    }

    #[test]
    fn misuse_is_reported() {
        let mut t = OffsetTracker::new();
        t.register(10, 19).unwrap();
        assert!(matches!(
            t.register(15, 30),
            Err(TrackerError::OutOfOrder { .. })
        ));
        assert!(matches!(
            t.register(25, 20),
            Err(TrackerError::OutOfOrder { .. })
        ));
        assert_eq!(t.complete(11), Err(TrackerError::Unknown(11)));
        t.complete(10).unwrap();
        assert_eq!(t.complete(10), Err(TrackerError::Unknown(10)));
    }

    proptest! {
        /// Any completion order: the watermark never passes an unfinished offset, never
        /// goes back, and ends after the last range once everything is done.
        #[test]
        fn random_completion_order_never_passes_an_unfinished_offset(
            lens in prop::collection::vec(1i64..20, 1..60),
            gaps in prop::collection::vec(0i64..3, 60),
            order in Just(()).prop_perturb(|_, mut rng| {
                let mut v: Vec<usize> = (0..60).collect();
                for i in (1..v.len()).rev() { v.swap(i, (rng.next_u32() as usize) % (i + 1)); }
                v
            }),
        ) {
            let mut t = OffsetTracker::new();
            let mut ranges = Vec::new();
            let mut next = 0i64;
            for (i, len) in lens.iter().enumerate() {
                next += gaps[i];
                ranges.push((next, next + len - 1));
                t.register(next, next + len - 1).unwrap();
                next += len;
            }
            let mut done = vec![false; ranges.len()];
            let mut last_wm = i64::MIN;
            for &i in order.iter().filter(|&&i| i < ranges.len()) {
                t.complete(ranges[i].0).unwrap();
                done[i] = true;
                if let Some(wm) = t.watermark() {
                    prop_assert!(wm >= last_wm);
                    last_wm = wm;
                    for (j, &(first, last)) in ranges.iter().enumerate() {
                        if !done[j] {
                            prop_assert!(wm <= first, "watermark {} passed unfinished {}..={}", wm, first, last);
                        }
                    }
                }
            }
            prop_assert_eq!(t.watermark(), Some(ranges.last().unwrap().1 + 1));
            prop_assert!(t.is_idle());
        }
    }
}
