//! The dispatcher: one per assigned partition. It reads the partition's own queue, cuts
//! what is ready into batches (a hand-off per batch, not per record), registers each
//! batch with the offset tracker and pushes it into the partition's worker lanes.
//!
//! [`Lane::dispatch`] is the source-agnostic half (used directly by the in-memory engine
//! benchmark); [`run_kafka_dispatcher`] feeds it from a librdkafka partition queue.

use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::ConsumerContext;
use sluice_api::config::Ordering;
use tokio::sync::{mpsc, watch};

use crate::ack::BatchAck;
use crate::backpressure::{ByteBudget, HoldReason};
use crate::partition::PartitionState;
use crate::pool::{lane_for_key, WorkItem};
use crate::record::Record;

/// Most records per hand-off from the dispatcher to the pool.
pub const DISPATCH_BATCH: usize = 512;

/// The dispatching half of one partition: its worker lanes and the byte budget.
#[derive(Debug)]
pub struct Lane {
    state: Arc<PartitionState>,
    workers: Vec<mpsc::Sender<WorkItem>>,
    ordering: Ordering,
    budget: ByteBudget,
    next_unordered: usize,
}

impl Lane {
    /// A lane over `workers` (one sender per worker).
    pub fn new(
        state: Arc<PartitionState>,
        workers: Vec<mpsc::Sender<WorkItem>>,
        ordering: Ordering,
        budget: ByteBudget,
    ) -> Self {
        assert!(!workers.is_empty(), "a partition needs at least one worker");
        Lane {
            state,
            workers,
            ordering,
            budget,
            next_unordered: 0,
        }
    }

    /// The partition this lane feeds.
    pub fn state(&self) -> &Arc<PartitionState> {
        &self.state
    }

    /// Hand a batch of records (in offset order) to the workers. Waits while the byte
    /// budget is spent (with the partition paused) or a worker's channel is full.
    pub async fn dispatch(&mut self, records: Vec<Record>) {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return;
        };
        let (first, last, n) = (first.offset, last.offset, records.len());
        let bytes: usize = records.iter().map(Record::budget_cost).sum();
        let permit = match self.budget.try_acquire(bytes) {
            Some(p) => p,
            None => {
                self.state.hold(HoldReason::Budget, true);
                let p = self.budget.acquire(bytes).await;
                self.state.hold(HoldReason::Budget, false);
                p
            }
        };
        if let Err(e) = self.state.register(first, last) {
            // Never dispatch what the tracker cannot account for.
            self.state.stall(&e.to_string());
            return;
        }
        let token = BatchAck::open(self.state.clone(), first, n, Some(permit));
        self.state.enqueued(n);
        match self.ordering {
            Ordering::Partition => {
                let _ = self.workers[0].send(WorkItem { records, token }).await;
            }
            Ordering::Unordered => {
                // The lane with the most free slots; ties go round-robin.
                let w = self.workers.len();
                let start = self.next_unordered;
                self.next_unordered = (start + 1) % w;
                let idx = (0..w)
                    .map(|i| (start + i) % w)
                    .max_by_key(|&i| {
                        (
                            self.workers[i].capacity(),
                            std::cmp::Reverse((i + w - start) % w),
                        )
                    })
                    .unwrap_or(0);
                let _ = self.workers[idx].send(WorkItem { records, token }).await;
            }
            Ordering::Key => {
                let w = self.workers.len();
                if w == 1 {
                    let _ = self.workers[0].send(WorkItem { records, token }).await;
                    return;
                }
                let mut split: Vec<Vec<Record>> = (0..w).map(|_| Vec::new()).collect();
                for r in records {
                    split[lane_for_key(r.key.as_deref(), w)].push(r);
                }
                for (i, part) in split.into_iter().enumerate() {
                    if !part.is_empty() {
                        let _ = self.workers[i]
                            .send(WorkItem {
                                records: part,
                                token: token.clone(),
                            })
                            .await;
                    }
                }
                token.ack();
            }
        }
        // A send that failed (the worker is gone) dropped its token unacked: the batch
        // can never complete, so its offsets are never committed.
    }
}

/// Read `queue` into `lane` until `stop` turns true. Whatever was read is dispatched
/// before returning, so every record taken from librdkafka is tracked.
pub async fn run_kafka_dispatcher<C: ConsumerContext + 'static>(
    queue: StreamPartitionQueue<C>,
    mut lane: Lane,
    mut stop: watch::Receiver<bool>,
) {
    let topic = lane.state().topic.clone();
    let consumed = lane.state().metrics.consumed.clone();
    let stream = queue.stream();
    tokio::pin!(stream);
    loop {
        if *stop.borrow() {
            break;
        }
        let first = tokio::select! {
            biased;
            _ = stop.changed() => break,
            m = stream.next() => m,
        };
        let mut batch = Vec::with_capacity(DISPATCH_BATCH);
        match first {
            Some(Ok(m)) => batch.push(Record::from_message(&topic, &m)),
            Some(Err(e)) => {
                tracing::warn!(topic = %topic, partition = lane.state().partition, error = %e, "consumer error on partition queue");
                continue;
            }
            None => break,
        }
        while batch.len() < DISPATCH_BATCH {
            match stream.next().now_or_never() {
                Some(Some(Ok(m))) => batch.push(Record::from_message(&topic, &m)),
                Some(Some(Err(e))) => {
                    tracing::warn!(topic = %topic, partition = lane.state().partition, error = %e, "consumer error on partition queue");
                    break;
                }
                _ => break,
            }
        }
        consumed.inc_by(batch.len() as u64);
        lane.dispatch(batch).await;
    }
}
