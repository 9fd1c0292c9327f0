//! The worker pool of one partition: W tasks (its lanes) that run the processor over
//! batches of records and fan the outputs out to every sink's batcher.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::deadletter::{DeadLetters, Letter};
use crate::engine::batcher::Piece;
use crate::engine::lanes::WorkItem;
use crate::engine::partition::PartitionState;
use crate::processor::ProcessError;
use crate::processor::Processor;
use crate::record::{Origin, Output, Record};

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
        if state.is_cancelled() {
            token.abort();
            continue;
        }
        if !prepared(processor.as_ref(), &records, &state).await {
            token.abort();
            continue;
        }
        let mut outputs: Vec<(Output, Origin)> = Vec::with_capacity(records.len());
        let mut letters: Vec<Letter> = Vec::new();
        for r in &records {
            scratch.clear();
            match process(processor.as_ref(), r, &mut scratch) {
                Ok(()) => {
                    // One origin per record, moved into its last output (most records
                    // have exactly one), cloned only for the others.
                    let n = scratch.len();
                    if let Some(last) = scratch.pop() {
                        let origin = Origin::of(r);
                        outputs.extend(
                            scratch
                                .drain(..)
                                .enumerate()
                                .map(|(i, o)| (o, origin.clone().output(i))),
                        );
                        outputs.push((last, origin.output(n - 1)));
                    }
                }
                Err(e) => {
                    state.metrics.failed_processor.inc();
                    letters.push(Letter {
                        origin: Origin::of(r),
                        key: r.key.clone(),
                        value: r.value.clone(),
                        headers: r.headers.clone(),
                        stage: e.stage.unwrap_or(processor.name()).to_string(),
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

/// Let the processor make ready for `records` ([`Processor::prepare`]), holding the batch
/// while a service it needs is unreachable: the lane waits, its channel fills, and the
/// partition is paused; nothing is failed. False when the partition was revoked (or the
/// worker is stopping, or an exactly-once window was aborted) meanwhile: the batch is then
/// left uncommitted for whoever reads the partition next, never delivered late.
async fn prepared(processor: &dyn Processor, records: &[Record], state: &PartitionState) -> bool {
    let mut waits = 0u32;
    while let Some(ready) = processor.prepare(records) {
        match ready.await {
            Ok(()) => return true,
            Err(e) => {
                if waits % 10 == 0 {
                    tracing::warn!(topic = %state.tp().topic, partition = state.tp().partition, error = %e.message, wait = ?e.wait, waits,
                        "holding a batch: a service the processor needs is unreachable");
                }
                waits += 1;
                tokio::select! {
                    _ = tokio::time::sleep(e.wait) => {}
                    _ = state.cancelled() => {}
                }
                if state.is_cancelled() || state.is_retired() {
                    return false;
                }
            }
        }
    }
    true
}

/// Run the processor over one record. A panic in it is the record's failure (class
/// `panic`, dead-lettered like any processor error), not the end of the lane: a lane that
/// died would stall its partition for good, and under exactly-once stop the worker at
/// every attempt.
fn process(
    processor: &dyn Processor,
    r: &Record,
    out: &mut Vec<Output>,
) -> Result<(), ProcessError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| processor.process(r, out))) {
        Ok(res) => res,
        Err(payload) => {
            out.clear();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the processor panicked".into());
            Err(ProcessError::new(
                "panic",
                format!("the processor panicked: {message}"),
            ))
        }
    }
}
