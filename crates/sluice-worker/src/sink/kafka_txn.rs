//! A Kafka sink writing through the worker's transactional producer (exactly-once, see
//! `delivery/exactly_once.rs`): its outputs join the open transaction.
//!
//! An output that fails inside a transaction fails the whole window, which the delivery
//! aborts and rewinds (never a dead letter, never an exit):
//! - a transient failure (a broker lost, a leader moved, a purge on abort, the producer
//!   already in an abortable state) is simply produced again by the rewound window;
//! - an output the broker refuses for good (over the topic's `max.message.bytes`, a
//!   keyless record to a compacted topic, not authorised) is remembered in [`Refusals`]
//!   and dead-lettered, once, in a later transaction. (librdkafka makes the transaction
//!   abortable at a permanent produce error, so it cannot be dead-lettered in the
//!   transaction it failed in.) The broker refuses a whole produce batch, so every output
//!   of it is only a *suspect* at first: the rewound window produces each suspect alone
//!   (after the producer flushed, so nothing shares its batch); one refused alone is the
//!   culprit and is dead-lettered by the next attempt, one accepted is cleared.
//!
//! An output refused before it joined the transaction leaves the transaction healthy and
//! is dead-lettered in it at once: one over the topic's `max.message.bytes` (checked here
//! against the limit read at start, `crate::kafka::limits`, so the common refusal never
//! reaches the broker and never aborts a window), or one too large for the producer itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureRecord, Producer};

use crate::deadletter::DeadLetters;
use crate::kafka::producer::SharedProducer;
use crate::ops::throttle::LogThrottle;
use crate::record::{Origin, Output};
use crate::retry::ErrorClass;
use crate::sink::kafka::classify;
use crate::sink::produce::{while_queue_full, OutputTarget, Outstanding};
use crate::sink::{Sink, SinkBatch, SinkFailure, SinkMetrics};

/// Outputs the broker refused for good inside a transaction, by source record and output
/// (see the module docs), so the rewound window dead-letters them instead of producing
/// them again. Shared by the transactional sinks and the exactly-once delivery, which
/// forgets what a committed transaction settled.
#[derive(Debug, Default)]
pub struct Refusals(Mutex<HashMap<RefusedOutput, Refusal>>);

/// An output of a source record: its topic, partition and offset, and the output's
/// fingerprint.
type RefusedOutput = (Arc<str>, i32, i64, u64);

/// What is known of a refused output.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Refusal {
    /// Its produce batch was refused for good: it or a batch-mate is the culprit.
    Suspect,
    /// Refused alone: dead-lettered with this failure.
    Culprit(SinkFailure),
}

/// Which output of a source record: the same record gives the same outputs again after a
/// rewind (a processor is a function of its record), so a hash of the output names it.
fn fingerprint(sink_topic: &str, o: &Output) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    sink_topic.hash(&mut h);
    o.key.hash(&mut h);
    o.value.hash(&mut h);
    h.finish()
}

impl Refusals {
    fn get(&self, origin: &Origin, output: u64) -> Option<Refusal> {
        self.0
            .lock()
            .expect("refusals lock")
            .get(&(
                origin.topic.clone(),
                origin.partition,
                origin.offset,
                output,
            ))
            .cloned()
    }

    fn set(&self, origin: &Origin, output: u64, r: Option<Refusal>) {
        let mut m = self.0.lock().expect("refusals lock");
        let key = (
            origin.topic.clone(),
            origin.partition,
            origin.offset,
            output,
        );
        match r {
            Some(r) => {
                m.insert(key, r);
            }
            None => {
                m.remove(&key);
            }
        }
    }

    /// `topic`/`partition`'s offsets below `committed` are committed: their refusals
    /// were dead-lettered for good.
    pub fn committed(&self, topic: &str, partition: i32, committed: i64) {
        self.0
            .lock()
            .expect("refusals lock")
            .retain(|(t, p, o, _), _| &**t != topic || *p != partition || *o >= committed);
    }

    /// How many refusals wait for their dead letter.
    pub fn len(&self) -> usize {
        self.0.lock().expect("refusals lock").len()
    }

    /// True when none does.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A Kafka sink writing through the worker's transactional producer: a batch is settled
/// when every delivery report is in (acknowledged inside the open transaction, visible
/// to `read_committed` readers when the window commits).
pub struct TxnKafkaSink {
    producer: SharedProducer,
    target: OutputTarget,
    metrics: SinkMetrics,
    dead_letters: Arc<DeadLetters>,
    outstanding: Arc<Outstanding>,
    reject_log: Arc<LogThrottle>,
    refusals: Arc<Refusals>,
}

impl std::fmt::Debug for TxnKafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnKafkaSink")
            .field("topic", &self.target.topic)
            .finish()
    }
}

impl TxnKafkaSink {
    /// A sink for `config` over the transactional `producer`; `limit`: the topic's
    /// `max.message.bytes` (the producer's `batch.size` must be capped at it, see
    /// `crate::kafka::limits`).
    pub fn new(
        producer: SharedProducer,
        target: OutputTarget,
        metrics: SinkMetrics,
        dead_letters: Arc<DeadLetters>,
        refusals: Arc<Refusals>,
    ) -> Arc<Self> {
        Arc::new(TxnKafkaSink {
            producer,
            target,
            metrics,
            dead_letters,
            outstanding: Arc::default(),
            reject_log: Arc::new(LogThrottle::default()),
            refusals,
        })
    }
}

impl Sink for TxnKafkaSink {
    fn name(&self) -> &str {
        "kafka"
    }

    // The producer hands a record it did not take back inside its error.
    #[allow(clippy::result_large_err)]
    fn deliver(&self, batch: SinkBatch) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if batch.items.is_empty() {
                batch.acknowledge(&self.metrics);
                return;
            }
            let producer = self.producer.get();
            let mut pending = Vec::with_capacity(batch.items.len());
            let mut rejected = Vec::new();
            // The transaction cannot commit this window any more: abort it, rewind.
            let mut retry = false;
            for (index, (o, origin)) in batch.items.iter().enumerate() {
                let output = fingerprint(&self.target.topic, o);
                let suspect = match self.refusals.get(origin, output) {
                    // Refused for good in an aborted window: dead-lettered in this one.
                    Some(Refusal::Culprit(f)) => {
                        rejected.push((index, f));
                        continue;
                    }
                    Some(Refusal::Suspect) => true,
                    None => false,
                };
                let record = match self.target.record(o, origin) {
                    Ok(r) => r,
                    Err(f) => {
                        // Never produced, like a record over the size limit below.
                        if suspect {
                            self.refusals.set(origin, output, None);
                        }
                        rejected.push((index, f));
                        continue;
                    }
                };
                if let Some(f) = record.refused(&self.target.rules) {
                    // Never produced: the transaction stays healthy and the letter
                    // joins it, with no abort and no batch-mate touched.
                    if let Some(n) = self.reject_log.tick() {
                        tracing::error!(sink = "kafka", topic = %self.target.topic, class = f.class, error = %f.message, outputs = n,
                            "the topic would refuse an output; it goes to the dead-letter topic in this transaction");
                    }
                    if suspect {
                        self.refusals.set(origin, output, None);
                    }
                    rejected.push((index, f));
                    continue;
                }
                if suspect {
                    // Alone in its produce batch: what went before is delivered first.
                    let p = producer.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(30))).await;
                }
                let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.target.topic);
                if let Some(k) = record.key {
                    rec = rec.key(k);
                }
                if let Some(v) = record.value.as_deref() {
                    rec = rec.payload(v);
                }
                if let Some(h) = record.kafka_headers() {
                    rec = rec.headers(h);
                }
                match while_queue_full(rec, |r| producer.send_result(r)).await {
                    Ok(f) if suspect => {
                        let res = match f.await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err((e, _))) => Err(e),
                            Err(_) => Err(KafkaError::Canceled),
                        };
                        match res {
                            Ok(()) => self.refusals.set(origin, output, None),
                            Err(e) => {
                                retry = true;
                                if let Some(class) = refused(&e) {
                                    tracing::error!(sink = "kafka", topic = %self.target.topic, error = %e, partition = origin.partition, offset = origin.offset,
                                            "the broker refused an output for good, alone in its batch; it goes to the dead-letter topic");
                                    let f = SinkFailure {
                                        class,
                                        message: e.to_string(),
                                        attempts: 1,
                                    };
                                    self.refusals.set(origin, output, Some(Refusal::Culprit(f)));
                                }
                            }
                        }
                    }
                    Ok(f) => {
                        pending.push((index, f));
                    }
                    Err((e, _)) => {
                        match refused(&e) {
                            // Refused before it joined the transaction (e.g. too
                            // large for the producer): the transaction is healthy,
                            // dead-lettered in it like any permanent rejection.
                            Some(class) => {
                                if let Some(n) = self.reject_log.tick() {
                                    tracing::error!(sink = "kafka", topic = %self.target.topic, error = %e, outputs = n, "the producer refused a record");
                                }
                                rejected.push((
                                    index,
                                    SinkFailure {
                                        class,
                                        message: e.to_string(),
                                        attempts: 1,
                                    },
                                ));
                            }
                            // Typically the transaction is abortable already.
                            None => {
                                if let Some(n) = self.reject_log.tick() {
                                    tracing::warn!(sink = "kafka", topic = %self.target.topic, error = %e, outputs = n, "an output could not join the transaction; the window is aborted and processed again");
                                }
                                retry = true;
                            }
                        }
                    }
                }
            }
            self.outstanding.begin();
            let (metrics, dead_letters, outstanding, log, topic, refusals) = (
                self.metrics.clone(),
                self.dead_letters.clone(),
                self.outstanding.clone(),
                self.reject_log.clone(),
                self.target.topic.clone(),
                self.refusals.clone(),
            );
            tokio::spawn(tracing::Instrument::in_current_span(async move {
                for (index, f) in pending {
                    let err = match f.await {
                        Ok(Ok(_)) => continue,
                        Ok(Err((e, _))) => e,
                        Err(_) => KafkaError::Canceled,
                    };
                    // A delivery that failed inside a transaction fails the window: it is
                    // aborted and processed again. Refused for good, the output is
                    // remembered, and dead-lettered when the window reaches it again.
                    retry = true;
                    let (o, origin) = &batch.items[index];
                    match refused(&err) {
                        Some(_) => {
                            if let Some(n) = log.tick() {
                                tracing::error!(sink = "kafka", %topic, error = %err, partition = origin.partition, offset = origin.offset, outputs = n,
                                    "the broker refused a produce batch for good; the window is aborted and processed again, each output of that batch alone");
                            }
                            refusals.set(origin, fingerprint(&topic, o), Some(Refusal::Suspect));
                        }
                        None => {
                            if let Some(n) = log.tick() {
                                tracing::warn!(sink = "kafka", %topic, error = %err, outputs = n, "an output was not delivered (transient); the window is aborted and processed again");
                            }
                        }
                    }
                }
                if retry {
                    batch.abort();
                } else {
                    batch.settle(rejected, "kafka", &metrics, &dead_letters);
                }
                outstanding.end();
            }));
        })
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, bool> {
        Box::pin(self.outstanding.wait_idle(timeout))
    }
}

/// The class of a produce error that refuses the output for good, or `None` for one the
/// rewound window may get past (transient; or fatal, which stops the worker at commit).
fn refused(e: &KafkaError) -> Option<&'static str> {
    match classify(e) {
        (ErrorClass::Permanent, "fatal") => None,
        (ErrorClass::Permanent, class) => Some(class),
        (ErrorClass::Transient, _) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::RDKafkaErrorCode as Code;

    /// N1: only the broker's refusals for good are remembered for a dead letter; a lost
    /// broker, a moved leader, a purge on abort or an abortable state are retried.
    #[test]
    fn only_refusals_for_good_go_to_the_dead_letter_topic() {
        let produce = |c| KafkaError::MessageProduction(c);
        for c in [
            Code::MessageSizeTooLarge,
            Code::InvalidRecord,
            Code::TopicAuthorizationFailed,
        ] {
            assert!(refused(&produce(c)).is_some(), "{c:?}");
        }
        for c in [
            Code::NotEnoughReplicas,
            Code::NotLeaderForPartition,
            Code::MessageTimedOut,
            Code::PurgeQueue,
            Code::PurgeInflight,
            Code::State,
            Code::BrokerTransportFailure,
            Code::Fatal,
        ] {
            assert!(refused(&produce(c)).is_none(), "{c:?}");
        }
    }

    #[test]
    fn a_refusal_is_forgotten_once_its_offset_is_committed() {
        let r = Refusals::default();
        let origin = |offset| Origin {
            topic: "in".into(),
            partition: 1,
            offset,
            timestamp_ms: None,
            key: None,
            output: 0,
        };
        let f = SinkFailure {
            class: "record_too_large",
            message: "too large".into(),
            attempts: 1,
        };
        r.set(&origin(10), 7, Some(Refusal::Culprit(f.clone())));
        r.set(&origin(20), 7, Some(Refusal::Suspect));
        assert_eq!(r.get(&origin(10), 7), Some(Refusal::Culprit(f)));
        assert_eq!(r.get(&origin(10), 8), None, "another output of the record");
        r.committed("in", 1, 11);
        assert_eq!(r.get(&origin(10), 7), None);
        assert_eq!(r.len(), 1);
        r.committed("in", 2, 100);
        assert_eq!(r.len(), 1, "another partition");
        r.set(&origin(20), 7, None);
        assert!(r.is_empty(), "a suspect accepted alone is cleared");
    }
}
