//! The delivery guarantee, as one seam the coordinator calls without asking which it is:
//!
//! - **at-least-once** ([`at_least_once`]): the committer commits each partition's
//!   watermark on `commit.interval`, one commit in flight; while commits fail the
//!   partitions are held ([`commit_hold`]); revokes and shutdown drain and commit.
//! - **exactly-once** ([`exactly_once`]): one Kafka transaction per
//!   `delivery.transactionWindow`, ended by a barrier (the dispatchers' [`WindowGate`])
//!   that commits the window's outputs and its offsets together; a commit refused while
//!   nothing is in flight is aborted and the partitions rewound in place.
//!
//! [`WindowGate`]: crate::engine::gate::WindowGate

pub mod at_least_once;
pub mod commit_hold;
pub mod committer;
pub mod exactly_once;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::delivery::at_least_once::AtLeastOnce;
use crate::delivery::committer::CommitResult;
use crate::delivery::exactly_once::{ExactlyOnce, TxnError};
use crate::engine::gate::WindowGate;
use crate::engine::partition::{PartitionState, TopicPartition};
use crate::kafka::assignment::Assignment;

/// The pipeline's delivery guarantee. An enum, not a trait object: there are exactly two,
/// and the compiler checks that every path handles both.
pub enum Delivery {
    /// `delivery.guarantee: at-least-once`.
    AtLeastOnce(AtLeastOnce),
    /// `delivery.guarantee: exactly-once`.
    ExactlyOnce(ExactlyOnce),
}

/// What the delivery guarantee answers to a commit in flight (at-least-once); never
/// produced for exactly-once, whose commits complete inside [`Delivery::tick`].
pub struct Answer(CommitResult);

impl Delivery {
    /// How often [`Delivery::tick`] runs: the commit interval, or the transaction window.
    pub fn period(&self) -> Duration {
        match self {
            Delivery::AtLeastOnce(d) => d.period(),
            Delivery::ExactlyOnce(d) => d.period(),
        }
    }

    /// The barrier every dispatcher passes, when the guarantee has windows.
    pub fn gate(&self) -> Option<Arc<WindowGate>> {
        match self {
            Delivery::AtLeastOnce(_) => None,
            Delivery::ExactlyOnce(d) => Some(d.gate()),
        }
    }

    /// Resolves when a commit started by [`Delivery::tick`] answers; pending forever when
    /// none is in flight (cancel-safe).
    pub async fn answered(&mut self) -> Answer {
        match self {
            Delivery::AtLeastOnce(d) => Answer(d.answered().await),
            Delivery::ExactlyOnce(_) => std::future::pending().await,
        }
    }

    /// Take in an [`Answer`].
    pub fn on_answer(&mut self, a: Answer, owned: &Assignment) {
        if let Delivery::AtLeastOnce(d) = self {
            d.on_answer(a.0, owned);
        }
    }

    /// How long the at-least-once commit in flight has waited for its answer (`None`:
    /// none in flight, or exactly-once, whose calls have their own time limits).
    pub fn commit_unanswered(&self) -> Option<std::time::Duration> {
        match self {
            Delivery::AtLeastOnce(d) => d.commit_unanswered(),
            Delivery::ExactlyOnce(_) => None,
        }
    }

    /// The assignment is about to change (before partitions are added or released).
    pub fn on_rebalance(&mut self, owned: &Assignment) {
        if let Delivery::AtLeastOnce(d) = self {
            d.on_rebalance(owned);
        }
    }

    /// A revoke begins: the rebalance callback waits, the partitions are still this
    /// member's (before they are released).
    pub fn on_revoke_start(&mut self) {
        if let Delivery::ExactlyOnce(d) = self {
            d.on_revoke_start();
        }
    }

    /// The period ended: commit (at-least-once: start a commit; exactly-once: end the
    /// transaction window, rewinding the owned partitions if the commit was refused). An
    /// error stops the worker.
    pub async fn tick(&mut self, owned: &mut Assignment) -> Result<(), TxnError> {
        match self {
            Delivery::AtLeastOnce(d) => {
                d.tick(owned);
                Ok(())
            }
            Delivery::ExactlyOnce(d) => d.tick(owned).await,
        }
    }

    /// `released` were revoked (`lost`: the session expired, someone else may own them
    /// already) and their dispatchers are gone: settle their work by `deadline`. An error
    /// stops the worker.
    pub async fn on_revoke(
        &mut self,
        owned: &mut Assignment,
        released: &[Arc<PartitionState>],
        lost: bool,
        deadline: tokio::time::Instant,
    ) -> Result<(), TxnError> {
        match self {
            Delivery::AtLeastOnce(d) => {
                if !lost {
                    d.drain(released, deadline).await;
                }
                Ok(())
            }
            Delivery::ExactlyOnce(d) => d.on_revoke(owned, released, lost, deadline).await,
        }
    }

    /// Shutdown, every partition released as `states`: settle their work by `deadline`
    /// (after a failure, only what is safe).
    pub async fn on_shutdown(
        &mut self,
        owned: &mut Assignment,
        states: &[Arc<PartitionState>],
        deadline: tokio::time::Instant,
        failed: bool,
    ) -> Result<(), TxnError> {
        match self {
            Delivery::AtLeastOnce(d) => {
                d.drain(states, deadline).await;
                Ok(())
            }
            Delivery::ExactlyOnce(d) => d.on_shutdown(owned, states, deadline, failed).await,
        }
    }

    /// Shutdown, after the sinks flushed: commit what they acknowledged meanwhile
    /// (at-least-once; with exactly-once nothing was in flight after the last window, and
    /// offsets are only ever committed inside a transaction).
    pub async fn after_flush(
        &mut self,
        states: &[Arc<PartitionState>],
        deadline: tokio::time::Instant,
    ) {
        if let Delivery::AtLeastOnce(d) = self {
            d.commit_last(states, deadline).await;
        }
    }

    /// Forget a partition this process no longer owns.
    pub fn forget(&mut self, tp: &TopicPartition) {
        match self {
            Delivery::AtLeastOnce(d) => d.forget(tp),
            Delivery::ExactlyOnce(d) => d.forget(tp),
        }
    }
}

/// What was last committed per partition, with the incarnation it belongs to: a watermark
/// is committed again only when it moved, or when it belongs to a newer incarnation (a
/// late answer for an older one does not count as a commit of the current one).
#[derive(Debug, Default)]
pub struct Ledger(HashMap<TopicPartition, (u64, i64)>);

impl Ledger {
    /// The partitions of `parts` with a watermark to commit, and that watermark. With
    /// `force`, watermarks that did not move too.
    pub fn moved(
        &self,
        parts: &[Arc<PartitionState>],
        force: bool,
    ) -> Vec<(Arc<PartitionState>, i64)> {
        parts
            .iter()
            .filter_map(|s| {
                let wm = s.commit_offset()?;
                self.moves(s.tp(), s.epoch(), wm, force)
                    .then(|| (s.clone(), wm))
            })
            .collect()
    }

    /// Whether watermark `wm` of incarnation `epoch` of `tp` is to be committed. Pure.
    pub fn moves(&self, tp: &TopicPartition, epoch: u64, wm: i64, force: bool) -> bool {
        !matches!(self.0.get(tp), Some(&(e, prev)) if !force && e == epoch && prev >= wm)
    }

    /// `offset` of `s` is committed.
    pub fn record(&mut self, s: &PartitionState, offset: i64) {
        self.0.insert(s.tp().clone(), (s.epoch(), offset));
    }

    /// Forget a partition this process no longer owns.
    pub fn forget(&mut self, tp: &TopicPartition) {
        self.0.remove(tp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_watermarks_that_moved_or_belong_to_a_new_incarnation_are_committed() {
        let tp = |p| TopicPartition::new("t", p);
        let mut l = Ledger::default();
        l.0.insert(tp(0), (1, 100));
        l.0.insert(tp(1), (1, 50));
        let table = [
            (tp(0), 1, 100, false, false, "did not move"),
            (tp(0), 1, 90, false, false, "behind the last commit"),
            (tp(1), 1, 70, false, true, "moved"),
            (tp(0), 2, 100, false, true, "a new incarnation"),
            (tp(3), 1, 1, false, true, "never committed"),
            (
                tp(0),
                1,
                100,
                true,
                true,
                "forced (a probe while commits fail)",
            ),
        ];
        for (tp, epoch, wm, force, want, why) in table {
            assert_eq!(l.moves(&tp, epoch, wm, force), want, "{why}");
        }
        l.forget(&tp(0));
        assert!(l.moves(&tp(0), 1, 100, false), "forgotten");
    }
}
