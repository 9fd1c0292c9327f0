//! The worker pool of one partition: W tasks that run the processor over batches of
//! records and fan the outputs out to every sink's batcher.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::ack::AckToken;
use crate::batcher::Piece;
use crate::deadletter::{DeadLetters, Letter};
use crate::partition::PartitionState;
use crate::processor::Processor;
use crate::record::{Origin, Output, Record};

/// A batch of records for one worker, and its share of the batch's completion.
#[derive(Debug)]
pub struct WorkItem {
    /// Records, in offset order.
    pub records: Vec<Record>,
    /// Acked once every output of these records reached every sink's batcher.
    pub token: AckToken,
}

/// How many worker lanes a partition gets, and how many batch slots each lane's channel
/// has: `partition` ordering runs one lane; the slots hold `queueCapacity` records split
/// over the lanes (at least 2 batches each).
pub fn lane_geometry(workers: &sluice_api::config::WorkersConfig) -> (usize, usize) {
    let lanes = match workers.ordering {
        sluice_api::config::Ordering::Partition => 1,
        _ => workers.per_partition as usize,
    };
    let slots = (workers.queue_capacity as usize)
        .div_ceil(crate::dispatcher::DISPATCH_BATCH * lanes)
        .max(2);
    (lanes, slots)
}

/// Which worker lane a key goes to in `ordering: key`: a stable hash of the key bytes
/// modulo the lane count. Records without a key all take lane 0, so they keep their order.
pub fn lane_for_key(key: Option<&[u8]>, lanes: usize) -> usize {
    match key {
        None => 0,
        Some(k) if lanes > 1 => (fnv1a(k) % lanes as u64) as usize,
        Some(_) => 0,
    }
}

/// FNV-1a: fast on short keys and stable across processes and versions (a rebalance
/// must not change which lane a key takes, or order per key would be lost).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Spawn `lanes` workers for `state`. Each returns when its channel closes.
pub fn spawn_workers(
    state: &Arc<PartitionState>,
    lanes: usize,
    channel_batches: usize,
    processor: Arc<dyn Processor>,
    sinks: Arc<[mpsc::Sender<Piece>]>,
    dead_letters: Arc<DeadLetters>,
) -> (Vec<mpsc::Sender<WorkItem>>, Vec<JoinHandle<()>>) {
    let mut txs = Vec::with_capacity(lanes);
    let mut handles = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        let (tx, rx) = mpsc::channel(channel_batches.max(1));
        txs.push(tx);
        handles.push(tokio::spawn(tracing::Instrument::in_current_span(
            run_worker(
                rx,
                state.clone(),
                processor.clone(),
                sinks.clone(),
                dead_letters.clone(),
            ),
        )));
    }
    (txs, handles)
}

async fn run_worker(
    mut rx: mpsc::Receiver<WorkItem>,
    state: Arc<PartitionState>,
    processor: Arc<dyn Processor>,
    sinks: Arc<[mpsc::Sender<Piece>]>,
    dead_letters: Arc<DeadLetters>,
) {
    let mut scratch: Vec<Output> = Vec::new();
    while let Some(WorkItem { records, token }) = rx.recv().await {
        state.dequeued(records.len());
        let mut outputs: Vec<(Output, Origin)> = Vec::with_capacity(records.len());
        let mut letters: Vec<Letter> = Vec::new();
        for r in &records {
            scratch.clear();
            match processor.process(r, &mut scratch) {
                Ok(()) => {
                    // One origin per record, moved into its last output (most records
                    // have exactly one), cloned only for the others.
                    if let Some(last) = scratch.pop() {
                        let origin = Origin::of(r);
                        outputs.extend(scratch.drain(..).map(|o| (o, origin.clone())));
                        outputs.push((last, origin));
                    }
                }
                Err(e) => {
                    state.metrics.failed_processor.inc();
                    letters.push(Letter {
                        origin: Origin::of(r),
                        key: r.key.clone(),
                        value: r.value.clone(),
                        headers: r.headers.clone(),
                        stage: processor.name().to_string(),
                        class: e.class,
                        message: e.message,
                        attempts: 1,
                    });
                    // Without a dead-letter topic the batch stalls anyway: stop here.
                    if !dead_letters.enabled() {
                        break;
                    }
                }
            }
        }
        state.metrics.processed.inc_by(records.len() as u64);
        if !letters.is_empty() {
            let stalls = !dead_letters.enabled();
            dead_letters.park(letters, vec![token.clone()]);
            if stalls {
                token.fail();
                continue;
            }
        }
        if outputs.is_empty() {
            token.ack();
            continue;
        }
        // Fan out: every sink gets every output; the last sink takes the vector itself.
        let last = sinks.len() - 1;
        for (i, tx) in sinks.iter().enumerate() {
            let outs = if i == last {
                std::mem::take(&mut outputs)
            } else {
                outputs.clone()
            };
            // A closed batcher means shutdown: the piece's token is dropped unacked,
            // which keeps these records uncommitted.
            let _ = tx
                .send(Piece {
                    outputs: outs,
                    token: token.clone(),
                })
                .await;
        }
        token.ack();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_key_always_takes_the_same_lane(key in prop::collection::vec(any::<u8>(), 0..64), lanes in 1usize..64) {
            let a = lane_for_key(Some(&key), lanes);
            prop_assert!(a < lanes);
            prop_assert_eq!(a, lane_for_key(Some(&key), lanes));
        }
    }

    #[test]
    fn keys_spread_over_all_lanes() {
        let mut seen = [0usize; 5];
        for i in 0..10_000 {
            seen[lane_for_key(Some(format!("device-{i}").as_bytes()), 5)] += 1;
        }
        for n in seen {
            assert!((1500..2500).contains(&n), "{seen:?}");
        }
    }

    #[test]
    fn records_without_a_key_keep_one_lane() {
        assert_eq!(lane_for_key(None, 8), 0);
        assert_eq!(lane_for_key(Some(b"x"), 1), 0);
    }
}
