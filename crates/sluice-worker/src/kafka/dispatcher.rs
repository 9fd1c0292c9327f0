//! The Kafka source of a partition: reads its split-off librdkafka queue into the
//! partition's [`PartitionDispatch`], cutting what is ready into batches.

use std::time::Duration;

use futures::{FutureExt, StreamExt};
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::ConsumerContext;
use tokio::sync::watch;

use crate::engine::dispatch::{Epochs, PartitionDispatch};
use crate::engine::lanes::DISPATCH_BATCH;
use crate::record::RecordBatchBuilder;

/// How often an idle dispatcher checks whether the consumer moved past records it never
/// handed over (a transaction's commit marker at the end of the log).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Read `queue` into `lane` until `stop` turns true. A record read but not dispatched
/// when it stops (it was waiting for budget) is never registered, so never committed
/// past: the partition's next owner reads it again.
///
/// Per record this does only what must be per record: take the message from librdkafka,
/// copy its key and value into the batch's one buffer ([`RecordBatchBuilder`]) and take
/// its cost from the budget; counters and the hand-off are per batch.
///
/// While idle, when statistics show the consumer's fetch position beyond what was handed
/// over (transaction markers, aborted records: never handed over), it reads librdkafka's
/// application position with `position` and reports it (see
/// [`crate::engine::partition::PartitionState::handed_over`]), so the commit can pass them.
pub async fn run_kafka_dispatcher<C: ConsumerContext + 'static>(
    queue: StreamPartitionQueue<C>,
    mut lane: PartitionDispatch,
    mut stop: watch::Receiver<bool>,
    position: impl Fn() -> Option<i64>,
) {
    let topic = lane.state().tp().topic.clone();
    let stream = queue.stream();
    tokio::pin!(stream);
    // Each record is charged to the in-flight budget as it is taken from librdkafka, so
    // what a dispatcher holds uncharged is at most one record (`next`: read, and waiting
    // for budget) and its batch buffer's slack (at most 64 KiB, `record.rs`), not a
    // whole batch per partition.
    let mut batch = RecordBatchBuilder::new();
    let mut next = RecordBatchBuilder::new();
    let mut next_cost = 0;
    // The leader epochs of `batch`'s first and last records, and of the one in `next` (N12:
    // how a record at a reused offset is told from one received before).
    let mut next_epoch = None;
    loop {
        if *stop.borrow() {
            break;
        }
        std::mem::swap(&mut batch, &mut next);
        let (first_cost, epochs) = if batch.is_empty() {
            let m = tokio::select! {
                biased;
                _ = stop.changed() => break,
                m = stream.next() => m,
                // Nothing received for a while: everything received is registered, and
                // the queue was served up to now.
                _ = tokio::time::sleep(IDLE_CHECK) => {
                    let st = lane.state();
                    let known = st.handed_over_position().or(st.last_registered().map(|l| l + 1));
                    if st.fetch_position().is_some_and(|f| known.is_none_or(|k| f > k)) {
                        if let Some(app) = position() {
                            st.handed_over(app);
                        }
                    }
                    continue;
                }
            };
            match m {
                Some(Ok(m)) => {
                    lane.state().fetched();
                    let e = sluice_rdkafka_ffi::leader_epoch(&m);
                    batch.push(&m);
                    (
                        RecordBatchBuilder::budget_cost(&m),
                        Epochs { first: e, last: e },
                    )
                }
                Some(Err(e)) => {
                    tracing::warn!(topic = %topic, partition = lane.state().tp().partition, error = %e, "consumer error on partition queue");
                    continue;
                }
                None => break,
            }
        } else {
            let carried = Epochs {
                first: next_epoch,
                last: next_epoch,
            };
            (next_cost, carried)
        };
        let mut permit = tokio::select! {
            biased;
            // Not registered, so not committed: redelivered to whoever owns it next.
            _ = stop.changed() => break,
            p = lane.charge(first_cost) => p,
        };
        while batch.len() < DISPATCH_BATCH {
            match stream.next().now_or_never() {
                Some(Some(Ok(m))) => {
                    let cost = RecordBatchBuilder::budget_cost(&m);
                    let e = sluice_rdkafka_ffi::leader_epoch(&m);
                    // One leader epoch per batch: a batch that began with redelivered
                    // records of the old epoch and ran on into new ones at reused offsets
                    // would be judged by its first record (N12). Epochs change only with
                    // a partition's leader, so this cuts almost never.
                    if e != epochs.last {
                        next.push(&m);
                        next_cost = cost;
                        next_epoch = e;
                        break;
                    }
                    match lane.try_charge(cost) {
                        Some(p) => {
                            permit.merge(p);
                            batch.push(&m);
                        }
                        None => {
                            next.push(&m);
                            next_cost = cost;
                            next_epoch = e;
                            break;
                        }
                    }
                }
                Some(Some(Err(e))) => {
                    tracing::warn!(topic = %topic, partition = lane.state().tp().partition, error = %e, "consumer error on partition queue");
                    break;
                }
                _ => break,
            }
        }
        lane.state().fetched();
        let records = batch.finish(&topic);
        lane.dispatch_charged(records, permit, epochs).await;
    }
}
