//! The Kafka source of a partition: reads its split-off librdkafka queue into the
//! partition's [`PartitionDispatch`], cutting what is ready into batches.

use futures::{FutureExt, StreamExt};
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::ConsumerContext;
use tokio::sync::watch;

use crate::engine::dispatch::PartitionDispatch;
use crate::engine::lanes::DISPATCH_BATCH;
use crate::record::RecordBatchBuilder;

/// Read `queue` into `lane` until `stop` turns true. A record read but not dispatched
/// when it stops (it was waiting for budget) is never registered, so never committed
/// past: the partition's next owner reads it again.
///
/// Per record this does only what must be per record: take the message from librdkafka,
/// copy its key and value into the batch's one buffer ([`RecordBatchBuilder`]) and take
/// its cost from the budget; counters and the hand-off are per batch.
pub async fn run_kafka_dispatcher<C: ConsumerContext + 'static>(
    queue: StreamPartitionQueue<C>,
    mut lane: PartitionDispatch,
    mut stop: watch::Receiver<bool>,
) {
    let topic = lane.state().tp().topic.clone();
    let consumed = lane.state().metrics.consumed.clone();
    let stream = queue.stream();
    tokio::pin!(stream);
    // Each record is charged to the in-flight budget as it is taken from librdkafka, so
    // what a dispatcher holds uncharged is at most one record (`next`: read, and waiting
    // for budget) and its batch buffer's slack (at most 64 KiB, `record.rs`), not a
    // whole batch per partition.
    let mut batch = RecordBatchBuilder::new();
    let mut next = RecordBatchBuilder::new();
    let mut next_cost = 0;
    loop {
        if *stop.borrow() {
            break;
        }
        std::mem::swap(&mut batch, &mut next);
        let first_cost = if batch.is_empty() {
            let m = tokio::select! {
                biased;
                _ = stop.changed() => break,
                m = stream.next() => m,
            };
            match m {
                Some(Ok(m)) => {
                    consumed.inc();
                    lane.state().fetched();
                    batch.push(&m);
                    RecordBatchBuilder::budget_cost(&m)
                }
                Some(Err(e)) => {
                    tracing::warn!(topic = %topic, partition = lane.state().tp().partition, error = %e, "consumer error on partition queue");
                    continue;
                }
                None => break,
            }
        } else {
            next_cost
        };
        let mut permit = tokio::select! {
            biased;
            // Not registered, so not committed: redelivered to whoever owns it next.
            _ = stop.changed() => break,
            p = lane.charge(first_cost) => p,
        };
        let mut read = 0;
        while batch.len() < DISPATCH_BATCH {
            match stream.next().now_or_never() {
                Some(Some(Ok(m))) => {
                    read += 1;
                    let cost = RecordBatchBuilder::budget_cost(&m);
                    match lane.try_charge(cost) {
                        Some(p) => {
                            permit.merge(p);
                            batch.push(&m);
                        }
                        None => {
                            next.push(&m);
                            next_cost = cost;
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
        consumed.inc_by(read);
        lane.state().fetched();
        let records = batch.finish(&topic);
        lane.dispatch_charged(records, permit).await;
    }
}
