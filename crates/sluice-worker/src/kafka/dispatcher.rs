//! The Kafka source of a partition: drains its split-off librdkafka queue (a
//! [`PartitionFeed`]) into the partition's [`PartitionDispatch`], cutting what is ready into
//! batches.

use std::time::Duration;

use rdkafka::message::Message;
use sluice_rdkafka_ffi::{Flow, Msg, PartitionFeed};
use tokio::sync::watch;

use crate::engine::dispatch::PartitionDispatch;
use crate::engine::lanes::DISPATCH_BATCH;
use crate::record::RecordBatchBuilder;

/// How often an idle dispatcher checks whether the consumer moved past records it never
/// handed over (a transaction's commit marker at the end of the log).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Read `feed` into `lane` until `stop` turns true. A record taken but not dispatched
/// when it stops (it was waiting for budget) is never registered, so never committed
/// past: the partition's next owner reads it again.
///
/// Records are taken a batch at a time: one [`PartitionFeed::drain`] hands over every
/// record ready (up to a dispatch batch, or what the budget allows) under one lock of
/// librdkafka's queue, instead of one `poll` (an event, an `Arc`, clock reads and lock
/// pairs) per record. Per record this does only what must be per record: copy its key and
/// value into the batch's one buffer ([`RecordBatchBuilder`]), read its leader epoch and
/// take its cost from the budget; counters and the hand-off are per batch.
///
/// A record the drain gave is taken (librdkafka moved its application position past it,
/// and a pause resumes after it): one that does not fit the budget or begins a new leader
/// epoch is kept in `next`, copied, and begins the next batch; it is never left behind.
///
/// While idle, when statistics show the consumer's fetch position beyond what was handed
/// over (transaction markers, aborted records: never handed over), it reads librdkafka's
/// application position with `position` and reports it (see
/// [`crate::engine::partition::PartitionState::handed_over`]), so the commit can pass them.
pub async fn run_kafka_dispatcher(
    mut feed: PartitionFeed,
    lane: PartitionDispatch,
    stop: watch::Receiver<bool>,
    position: impl Fn() -> Option<i64>,
) {
    let mut lane = lane;
    let mut stop = stop;
    let topic = lane.state().tp().topic.clone();
    let partition = lane.state().tp().partition;
    let consumer_error = |m: &Msg<'_>| {
        let reason = m.payload().map(String::from_utf8_lossy).unwrap_or_default();
        tracing::warn!(topic = %topic, partition, error = ?m.error(), offset = m.offset(), %reason, "consumer error on partition queue");
    };
    // Each record is charged to the in-flight budget as it is taken from librdkafka, so
    // what a dispatcher holds uncharged is at most one record (`next`: taken, and waiting
    // for budget) and its batch buffer's slack (at most 64 KiB, `record.rs`), not a
    // whole batch per partition.
    let mut batch = RecordBatchBuilder::new();
    let mut next = RecordBatchBuilder::new();
    let mut next_cost = 0;
    // The leader epoch of the record in `next` (N12: how a record at a reused offset is
    // told from one received before).
    let mut next_epoch = None;
    // When to check for records the consumer moved past without handing them over: one
    // deadline, moved on only when a record is taken or the check ran, so a stream of ops
    // that are not records (aborted transactions' markers, outdated ops) cannot postpone it.
    let idle = tokio::time::sleep(IDLE_CHECK);
    tokio::pin!(idle);
    loop {
        if *stop.borrow() {
            break;
        }
        std::mem::swap(&mut batch, &mut next);
        let (first_cost, epoch) = if batch.is_empty() {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                () = feed.ready() => {}
                // Nothing received for a while: everything received is registered, and
                // the queue was served up to now.
                () = &mut idle => {
                    idle.as_mut().reset(tokio::time::Instant::now() + IDLE_CHECK);
                    let st = lane.state();
                    let known = st.handed_over_position().or(st.last_registered().map(|l| l + 1));
                    if st.fetch_position().is_some_and(|f| known.is_none_or(|k| f > k)) {
                        if let Some(app) = position() {
                            st.handed_over(app);
                        }
                    }
                    continue;
                }
            }
            // The first record: taken whatever the budget, which is waited for below.
            let mut first = None;
            feed.drain(|m| {
                if m.error().is_some() {
                    consumer_error(m);
                    return Flow::Continue;
                }
                batch.push(m);
                first = Some((RecordBatchBuilder::budget_cost(m), m.leader_epoch()));
                Flow::Stop
            });
            // Only errors, or ops librdkafka dropped as outdated (a seek, a pause).
            let Some(first) = first else { continue };
            lane.state().fetched();
            first
        } else {
            (next_cost, next_epoch)
        };
        let mut permit = tokio::select! {
            biased;
            // Not registered, so not committed: redelivered to whoever owns it next.
            _ = stop.changed() => break,
            p = lane.charge(first_cost) => p,
        };
        // The rest of what is ready, while it fits the batch and the budget.
        if batch.len() < DISPATCH_BATCH {
            feed.drain(|m| {
                if m.error().is_some() {
                    consumer_error(m);
                    return Flow::Stop;
                }
                let cost = RecordBatchBuilder::budget_cost(m);
                let e = m.leader_epoch();
                // One leader epoch per batch: a batch that began with redelivered records
                // of the old epoch and ran on into new ones at reused offsets would be
                // judged by its first record (N12). Epochs change only with a partition's
                // leader, so this cuts almost never.
                let charged = if e == epoch {
                    lane.try_charge(cost)
                } else {
                    None
                };
                match charged {
                    Some(p) => {
                        permit.merge(p);
                        batch.push(m);
                        if batch.len() < DISPATCH_BATCH {
                            Flow::Continue
                        } else {
                            Flow::Stop
                        }
                    }
                    None => {
                        next.push(m);
                        next_cost = cost;
                        next_epoch = e;
                        Flow::Stop
                    }
                }
            });
        }
        lane.state().fetched();
        let records = batch.finish(&topic);
        lane.dispatch_charged(records, permit, epoch).await;
        idle.as_mut()
            .reset(tokio::time::Instant::now() + IDLE_CHECK);
    }
}
