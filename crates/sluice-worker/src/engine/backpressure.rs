//! Backpressure: when to pause a partition in the consumer, and the global byte budget.
//!
//! A partition is paused for as long as any reason holds: its channel is above the
//! high-water mark (until it falls to the low-water mark), or the in-flight byte budget is
//! spent. Pausing stops librdkafka fetching that partition; nothing is ever dropped.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a partition is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldReason {
    /// The partition's channel crossed the high-water mark.
    QueueFull = 1,
    /// The global in-flight byte budget is spent.
    Budget = 2,
    /// The pipeline is shutting down or the partition is being revoked.
    Draining = 4,
    /// A record of the partition failed for good; nothing more is fetched.
    Stalled = 8,
    /// Offset commits have been failing (e.g. the group coordinator is away): work done
    /// now could not be committed and would only be redelivered.
    CommitFailing = 16,
}

/// What the consumer must do after a flow-control change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowAction {
    /// Pause fetching the partition.
    Pause,
    /// Resume fetching the partition.
    Resume,
}

/// The set of reasons a partition is held. Pure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowControl {
    reasons: u8,
}

impl FlowControl {
    /// Set or clear `reason`; returns the action when the paused state flips.
    pub fn set(&mut self, reason: HoldReason, on: bool) -> Option<FlowAction> {
        let before = self.reasons != 0;
        if on {
            self.reasons |= reason as u8;
        } else {
            self.reasons &= !(reason as u8);
        }
        match (before, self.reasons != 0) {
            (false, true) => Some(FlowAction::Pause),
            (true, false) => Some(FlowAction::Resume),
            _ => None,
        }
    }

    /// True while any reason holds.
    pub fn is_paused(&self) -> bool {
        self.reasons != 0
    }

    /// True while `reason` holds.
    pub fn holds(&self, reason: HoldReason) -> bool {
        self.reasons & reason as u8 != 0
    }
}

/// High- and low-water marks of a partition's channel, in records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaterMarks {
    /// Pause at or above this depth.
    pub high: usize,
    /// Resume at or below this depth.
    pub low: usize,
}

impl WaterMarks {
    /// High at the capacity, low at half of it.
    pub fn for_capacity(capacity: usize) -> Self {
        WaterMarks {
            high: capacity.max(2),
            low: capacity.max(2) / 2,
        }
    }

    /// Whether the queue-full reason should hold at `depth`, given whether it holds now
    /// (hysteresis between the marks).
    pub fn queue_full(&self, depth: usize, holding: bool) -> bool {
        if holding {
            depth > self.low
        } else {
            depth >= self.high
        }
    }
}

/// The global in-flight byte budget, shared by all partitions of a worker.
#[derive(Clone, Debug)]
pub struct ByteBudget {
    sem: Arc<Semaphore>,
    total: u32,
}

impl ByteBudget {
    /// A budget of `bytes` (capped at 4 GiB - 1).
    pub fn new(bytes: u64) -> Self {
        let total = bytes.min(u32::MAX as u64) as u32;
        ByteBudget {
            sem: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Clamp a request to what the budget can ever grant, so one huge batch cannot wait
    /// forever; it still waits for the whole budget to be free.
    fn clamp(&self, bytes: usize) -> u32 {
        (bytes.max(1) as u64).min(self.total as u64) as u32
    }

    /// Take `bytes` now if they are free.
    pub fn try_acquire(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        self.sem
            .clone()
            .try_acquire_many_owned(self.clamp(bytes))
            .ok()
    }

    /// Wait for `bytes`.
    pub async fn acquire(&self, bytes: usize) -> OwnedSemaphorePermit {
        self.sem
            .clone()
            .acquire_many_owned(self.clamp(bytes))
            .await
            .expect("the budget semaphore is never closed")
    }

    /// The free budget a partition held for `Budget` waits for before it resumes: an
    /// eighth of the whole. A resumed partition fetches its next record batch from the
    /// broker again (the pause purged what librdkafka had prefetched for it), and a batch
    /// can be a megabyte; resumed for each record's worth of budget, a stalled pipeline
    /// fetched a megabyte for each record it took.
    pub fn resume_chunk(&self) -> usize {
        (self.total as usize / 8).max(1)
    }

    /// Wait until `max(bytes, at_least)` is free, then keep `bytes` and give the rest back
    /// at once (to the next waiter): a waiter resumes only when a chunk of the budget has
    /// come free, not for each record's worth.
    pub async fn acquire_at_least(&self, bytes: usize, at_least: usize) -> OwnedSemaphorePermit {
        let want = self.clamp(bytes);
        let mut p = self.acquire(bytes.max(at_least)).await;
        let extra = p.num_permits() - want as usize;
        if extra > 0 {
            drop(p.split(extra));
        }
        p
    }

    /// Bytes currently taken.
    pub fn in_use(&self) -> u64 {
        self.total as u64 - self.sem.available_permits() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_holds_until_every_reason_is_cleared() {
        let mut f = FlowControl::default();
        assert_eq!(f.set(HoldReason::QueueFull, true), Some(FlowAction::Pause));
        assert_eq!(f.set(HoldReason::Budget, true), None);
        assert_eq!(f.set(HoldReason::QueueFull, false), None);
        assert!(f.is_paused());
        assert_eq!(f.set(HoldReason::Budget, false), Some(FlowAction::Resume));
        assert_eq!(f.set(HoldReason::Budget, false), None);
    }

    #[test]
    fn water_marks_have_hysteresis() {
        let w = WaterMarks::for_capacity(100);
        let table = [
            (99, false, false),
            (100, false, true),
            (80, true, true),
            (51, true, true),
            (50, true, false),
            (60, false, false),
        ];
        for (depth, holding, want) in table {
            assert_eq!(
                w.queue_full(depth, holding),
                want,
                "depth {depth} holding {holding}"
            );
        }
    }

    #[tokio::test]
    async fn a_held_partition_resumes_only_once_a_chunk_of_the_budget_is_free() {
        let b = ByteBudget::new(800);
        assert_eq!(b.resume_chunk(), 100);
        let mut taken = b.acquire(750).await;
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.acquire_at_least(10, 100).await });
        tokio::task::yield_now().await;
        // 10 bytes would fit now (50 free), but a chunk does not.
        drop(taken.split(40));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "resumed for less than a chunk");
        drop(taken.split(20));
        let p = waiter.await.unwrap();
        assert_eq!(p.num_permits(), 10, "keeps what it asked for");
        assert_eq!(b.in_use(), 690 + 10, "and gives the rest back");
    }

    #[tokio::test]
    async fn budget_grants_oversized_requests_the_whole_budget() {
        let b = ByteBudget::new(1000);
        let p = b.acquire(5000).await;
        assert_eq!(b.in_use(), 1000);
        assert!(b.try_acquire(1).is_none());
        drop(p);
        assert_eq!(b.in_use(), 0);
    }
}
