//! Completion tokens: how "every output of this batch was acknowledged" reaches the
//! offset tracker.
//!
//! The dispatcher wraps each batch of records it hands to the pool in a [`BatchAck`].
//! Everything that still owes work for that batch (a worker processing part of it, a sink
//! holding some of its outputs) holds an [`AckToken`]. A holder calls [`AckToken::ack`]
//! when its part is done. When the last token is gone the batch completes, **unless** any
//! token was dropped without an ack or failed explicitly: then the batch never completes,
//! its partition stops advancing and is reported stalled. Losing a token by accident (a
//! panic, a cancelled task, shutdown) therefore stalls instead of committing unfinished
//! work.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::OwnedSemaphorePermit;

use crate::engine::partition::PartitionState;

const OK: u8 = 0;
const RETRIED: u8 = 1;
const FAILED: u8 = 2;

/// One dispatched batch of records of one partition.
#[derive(Debug)]
pub struct BatchAck {
    partition: Arc<PartitionState>,
    first: i64,
    records: usize,
    /// [`OK`], [`RETRIED`] or [`FAILED`]: the worst any share reported.
    failure: AtomicU8,
    dispatched_at: Instant,
    _bytes: Option<OwnedSemaphorePermit>,
}

impl BatchAck {
    /// A batch of `records` records starting at offset `first`, already registered with
    /// the partition's tracker; `bytes` is released when the batch is gone. Returns the
    /// first token of the batch.
    pub fn open(
        partition: Arc<PartitionState>,
        first: i64,
        records: usize,
        bytes: Option<OwnedSemaphorePermit>,
    ) -> AckToken {
        partition.batch_opened();
        AckToken(Some(Arc::new(BatchAck {
            partition,
            first,
            records,
            failure: AtomicU8::new(OK),
            dispatched_at: Instant::now(),
            _bytes: bytes,
        })))
    }
}

impl BatchAck {
    /// A share failed for good: that wins over a retry.
    fn fail_for_good(&self) {
        self.failure.fetch_max(FAILED, Ordering::AcqRel);
    }
}

impl Drop for BatchAck {
    fn drop(&mut self) {
        match self.failure.load(Ordering::Acquire) {
            OK => self
                .partition
                .batch_done(self.first, self.records, self.dispatched_at),
            f => self.partition.batch_failed(self.first, f == RETRIED),
        }
    }
}

/// A share of the work owed for one [`BatchAck`]. Must be consumed with [`ack`](Self::ack)
/// or [`fail`](Self::fail); dropping it counts as a failure.
#[derive(Debug)]
#[must_use = "a token that is dropped without ack() stalls its partition"]
pub struct AckToken(Option<Arc<BatchAck>>);

impl AckToken {
    /// This share of the work is done and delivered.
    pub fn ack(mut self) {
        self.0.take();
    }

    /// This share of the work cannot be completed: the batch must not be committed.
    pub fn fail(mut self) {
        if let Some(b) = self.0.take() {
            b.fail_for_good();
        }
    }

    /// This share of the work failed in a way the delivery retries as a whole (an
    /// exactly-once window that is aborted and rewound): the batch is not completed, but
    /// its partition does not stall, unless another share failed for good.
    pub fn abort(mut self) {
        if let Some(b) = self.0.take() {
            b.failure.fetch_max(RETRIED, Ordering::AcqRel);
        }
    }

    /// The source partition of the batch.
    pub fn partition(&self) -> &Arc<PartitionState> {
        &self.0.as_ref().expect("live token").partition
    }
}

impl Clone for AckToken {
    fn clone(&self) -> Self {
        AckToken(self.0.clone())
    }
}

impl Drop for AckToken {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            b.fail_for_good();
        }
    }
}
