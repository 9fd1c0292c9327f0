//! The commit-failure hold of at-least-once delivery, as a pure state machine.
//!
//! Work done while offset commits fail (typically: the group coordinator's broker is away)
//! cannot be committed; it would only be delivered again once the group settles. So when
//! periodic commits keep failing for `hold_after`, every owned partition is held (its
//! fetching paused) until a commit succeeds or the assignment changes, which bounds what
//! is redelivered to what was in flight plus about `hold_after` of work.
//!
//! - A hold belongs to the assignment it was taken in: every rebalance ends it.
//! - If commits were failing when an assignment ended, the next one is *suspect*: its first
//!   failure of its own holds at once (the coordinator is probably still away; a fast
//!   catch-up would otherwise be redelivered). Its first success, or the next rebalance
//!   after a success, clears that.
//! - An answer to a commit started under an older assignment does not count.
//!
//! The caller applies the [`Hold`] it gets to every owned partition and owns the clock:
//! each event carries its instant, so the table tests below need no time to pass.

use std::time::{Duration, Instant};

/// What to do with the commit-failure hold of every owned partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Nothing changes.
    Keep,
    /// Hold every owned partition (again: partitions assigned since are held too).
    On,
    /// Release every owned partition.
    Off,
}

/// The hold's state for one consumer.
#[derive(Clone, Debug)]
pub struct CommitHold {
    hold_after: Duration,
    /// Since when periodic commits of the current assignment have failed, and whether the
    /// partitions are held for it.
    failing: Option<(Instant, bool)>,
    /// Commits were failing when the previous assignment ended.
    suspect: bool,
    /// Bumped by every assignment change.
    generation: u64,
}

impl CommitHold {
    /// Hold after commits have failed for `hold_after`.
    pub fn new(hold_after: Duration) -> Self {
        CommitHold {
            hold_after,
            failing: None,
            suspect: false,
            generation: 0,
        }
    }

    /// How long commits fail before the partitions are held.
    pub fn hold_after(&self) -> Duration {
        self.hold_after
    }

    /// The current assignment's generation: hand it to a commit, and back with its answer.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// True while the partitions are held.
    pub fn held(&self) -> bool {
        self.failing.is_some_and(|(_, held)| held)
    }

    /// Since when commits have been failing, if they are.
    pub fn failing_since(&self) -> Option<Instant> {
        self.failing.map(|(since, _)| since)
    }

    /// While commits fail, commit even watermarks that did not move: the answer tells
    /// whether the coordinator is back (held partitions move nothing).
    pub fn force(&self) -> bool {
        self.failing.is_some()
    }

    /// The assignment changed: a new generation, and the hold of the old one ends.
    pub fn on_rebalance(&mut self) -> Hold {
        self.generation += 1;
        let failing = self.failing.take();
        self.suspect |= failing.is_some();
        Hold::Off
    }

    /// A commit started in `generation` answered at `now`.
    pub fn on_answer(&mut self, generation: u64, ok: bool, now: Instant) -> Hold {
        if generation != self.generation {
            return Hold::Keep;
        }
        if !ok {
            return self.on_failure(now, now);
        }
        self.suspect = false;
        match self.failing.take() {
            Some(_) => Hold::Off,
            None => Hold::Keep,
        }
    }

    /// A commit is still unanswered after `age`, at `now`: past `hold_after` it counts
    /// as failing since it was sent.
    pub fn on_pending(&mut self, age: Duration, now: Instant) -> Hold {
        if age < self.hold_after {
            return Hold::Keep;
        }
        self.on_failure(now - age, now)
    }

    /// A commit failed `at`, as seen `now`.
    fn on_failure(&mut self, at: Instant, now: Instant) -> Hold {
        let (since, held) = self.failing.get_or_insert((at, false));
        if !*held && (now.saturating_duration_since(*since) >= self.hold_after || self.suspect) {
            *held = true;
        }
        if *held {
            Hold::On
        } else {
            Hold::Keep
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One event of a table row, at a millisecond offset.
    #[derive(Clone, Copy, Debug)]
    enum Ev {
        /// A commit of the current generation answered.
        Ok,
        Fail,
        /// A commit of the previous generation answered (failed).
        StaleFail,
        /// A commit unanswered for this many ms.
        Pending(u64),
        Rebalance,
    }

    fn run(hold_after_ms: u64, events: &[(u64, Ev)]) -> Vec<(Hold, bool)> {
        let t0 = Instant::now();
        let mut h = CommitHold::new(Duration::from_millis(hold_after_ms));
        events
            .iter()
            .map(|&(at, ev)| {
                let now = t0 + Duration::from_secs(10) + Duration::from_millis(at);
                let g = h.generation();
                let out = match ev {
                    Ev::Ok => h.on_answer(g, true, now),
                    Ev::Fail => h.on_answer(g, false, now),
                    Ev::StaleFail => h.on_answer(g.wrapping_sub(1), false, now),
                    Ev::Pending(age) => h.on_pending(Duration::from_millis(age), now),
                    Ev::Rebalance => h.on_rebalance(),
                };
                (out, h.held())
            })
            .collect()
    }

    use Ev::*;
    use Hold::{Keep, Off, On};

    /// A row: its name, the events (ms offset, event), and what each returns (the hold
    /// and whether the partitions are held after it).
    type Row<'a> = (&'a str, &'a [(u64, Ev)], &'a [(Hold, bool)]);

    #[test]
    fn the_commit_failure_hold_follows_its_table() {
        let cases: &[Row<'_>] = &[
            (
                "successes never hold",
                &[(0, Ok), (500, Ok)],
                &[(Keep, false), (Keep, false)],
            ),
            (
                "a failure holds only once failing for hold_after",
                &[(0, Fail), (1_000, Fail), (2_000, Fail)],
                &[(Keep, false), (Keep, false), (On, true)],
            ),
            (
                "a success ends the hold",
                &[(0, Fail), (2_000, Fail), (2_500, Ok), (3_000, Ok)],
                &[(Keep, false), (On, true), (Off, false), (Keep, false)],
            ),
            (
                "a success before hold_after clears the failing clock",
                &[(0, Fail), (1_500, Ok), (2_500, Fail), (4_000, Fail)],
                &[(Keep, false), (Off, false), (Keep, false), (Keep, false)],
            ),
            (
                "an unanswered commit counts as failing since it was sent",
                &[(0, Pending(1_000)), (500, Pending(2_500))],
                &[(Keep, false), (On, true)],
            ),
            (
                "a rebalance ends the hold",
                &[(0, Fail), (2_000, Fail), (2_100, Rebalance)],
                &[(Keep, false), (On, true), (Off, false)],
            ),
            (
                "after a rebalance during failures, the first own failure holds at once",
                &[(0, Fail), (100, Rebalance), (200, Fail)],
                &[(Keep, false), (Off, false), (On, true)],
            ),
            (
                "a success clears the suspicion",
                &[(0, Fail), (100, Rebalance), (200, Ok), (300, Fail)],
                &[(Keep, false), (Off, false), (Keep, false), (Keep, false)],
            ),
            (
                "a rebalance without failures leaves no suspicion",
                &[(0, Rebalance), (100, Fail)],
                &[(Off, false), (Keep, false)],
            ),
            (
                "an answer from an older generation does not count",
                &[(0, Rebalance), (100, StaleFail), (5_000, StaleFail)],
                &[(Off, false), (Keep, false), (Keep, false)],
            ),
            (
                "while held, every failure holds again (new partitions too)",
                &[
                    (0, Fail),
                    (2_000, Fail),
                    (3_000, Fail),
                    (4_000, Pending(3_000)),
                ],
                &[(Keep, false), (On, true), (On, true), (On, true)],
            ),
        ];
        for (name, events, want) in cases {
            assert_eq!(run(2_000, events), *want, "{name}");
        }
    }

    #[test]
    fn failing_commits_are_forced_and_a_success_stops_forcing() {
        let t = Instant::now();
        let mut h = CommitHold::new(Duration::from_secs(2));
        assert!(!h.force());
        h.on_answer(0, false, t);
        assert!(h.force());
        assert_eq!(h.failing_since(), Some(t));
        h.on_answer(0, true, t + Duration::from_secs(1));
        assert!(!h.force());
        assert_eq!(h.failing_since(), None);
    }
}
