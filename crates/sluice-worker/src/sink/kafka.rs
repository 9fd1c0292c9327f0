//! The `kafka` sink: an idempotent producer with `acks=all`. A batch is settled only when
//! every record's delivery report is in.
//!
//! Retries are librdkafka's own: the idempotent producer retries every retriable error
//! with the same producer id and sequence number (so a retry can never write a second
//! copy) for up to `message.timeout.ms`, which is the pipeline's `retry.maxElapsed`. The
//! sink never sends an output again itself: a re-send after the timeout would be a new
//! message, a duplicate if the first attempt was written after all (and, on a compacted
//! topic, possibly a stale value after a newer one). A delivery report that still fails
//! is final: permanent errors (record too large, authorization, an invalid topic) and
//! timeouts (`retries_exhausted`) send the output to the dead-letter path, and the rest
//! of the batch is acknowledged as usual. What remains: an output that timed out may
//! have been written anyway, so it can be both in the output topic and a dead letter.
//!
//! An output over the topic's `max.message.bytes` is refused before it is produced
//! (`crate::kafka::limits`): the broker would refuse its whole produce batch, and every
//! batch-mate with it. A fatal producer error (e.g. an idempotence sequence violation) is reported
//! through [`KafkaSink::fatal`] and stops the worker: a restart resumes from the last
//! commit. Every output that fails from then on (in flight, queued, or refused at the send)
//! failed for the producer's state, not its own: its batch is aborted, never dead-lettered
//! and never committed, so the restart delivers it again.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::Notify;

use super::produce::{while_queue_full, OutputRecord, OutputTarget, Outstanding};
use super::{Sink, SinkBatch, SinkFailure, SinkMetrics};
use crate::deadletter::DeadLetters;
use crate::kafka::limits;
use crate::ops::throttle::LogThrottle;
use crate::retry::ErrorClass;

/// Batches that may wait for delivery reports at once; a sink with this many waits for
/// one to settle before it hands over the next.
const FLIGHT_SLOTS: usize = 1024;

/// A batch handed to the producer, waiting for its delivery reports: one entry of the
/// sink's fixed table. The delivery opaque of each output is a `usize` naming its entry
/// and its index in the batch ([`opaque`]), so producing allocates nothing per output and
/// a delivery report frees nothing.
#[derive(Default)]
struct InFlight {
    /// Delivery reports still to come, plus one held by the sending task until the batch
    /// is in [`InFlight::batch`]: the batch settles when this reaches zero.
    remaining: AtomicUsize,
    /// An output was purged (the producer is being dropped at a stop) or failed after the
    /// producer's fatal error: the batch is aborted, its records not committed and
    /// processed again, never dead-lettered.
    abandoned: AtomicBool,
    rejected: Mutex<Vec<(usize, SinkFailure)>>,
    batch: Mutex<Option<SinkBatch>>,
}

/// The delivery opaque of output `index` of the batch in table entry `slot`.
fn opaque(slot: usize, index: usize) -> usize {
    (slot << 32) | index
}

/// The (entry, index) an opaque names.
fn unpack(opaque: usize) -> (usize, usize) {
    (opaque >> 32, opaque & 0xffff_ffff)
}

// An opaque packs two 32-bit halves.
const _: () = assert!(usize::BITS >= 64);

struct Shared {
    metrics: SinkMetrics,
    dead_letters: Arc<DeadLetters>,
    /// The in-flight table, and its free entries.
    flights: Box<[InFlight]>,
    free: Mutex<Vec<usize>>,
    /// Signalled when an entry is freed.
    freed: Notify,
    outstanding: Outstanding,
    fatal: AtomicBool,
    /// One line per interval for rejected outputs.
    reject_log: LogThrottle,
}

impl Shared {
    fn reject(&self, opaque: usize, class: &'static str, message: String, attempts: u32) {
        let (slot, index) = unpack(opaque);
        self.flights[slot]
            .rejected
            .lock()
            .expect("rejected lock")
            .push((
                index,
                SinkFailure {
                    class,
                    message,
                    attempts,
                },
            ));
        self.finish_one(slot);
    }

    /// Output `opaque` failed for a reason that is not its own (a purge at a stop, the
    /// producer's fatal error): its batch is aborted when it settles.
    fn abandon(&self, opaque: usize) {
        let (slot, _) = unpack(opaque);
        self.flights[slot].abandoned.store(true, Ordering::Release);
        self.finish_one(slot);
    }

    /// True once an error said the producer failed fatally: the error callback (served
    /// before the delivery reports of the outputs the fatal error failed: both come
    /// through the producer's one main queue, in that order), or this report or refusal.
    fn failed_fatally(&self, e: &KafkaError) -> bool {
        if e.rdkafka_error_code().is_some_and(fatal_for_the_producer) {
            self.fatal.store(true, Ordering::Release);
        }
        self.fatal.load(Ordering::Acquire)
    }

    /// One delivery report of entry `slot` is in.
    fn finish_one(&self, slot: usize) {
        self.finish(slot, 1)
    }

    /// `count` delivery reports (or the sender's hold) of entry `slot` are in.
    fn finish(&self, slot: usize, count: usize) {
        let flight = &self.flights[slot];
        if flight.remaining.fetch_sub(count, Ordering::AcqRel) == count {
            let batch = flight.batch.lock().expect("batch lock").take();
            let rejected = std::mem::take(&mut *flight.rejected.lock().expect("lock"));
            let abandoned = flight.abandoned.swap(false, Ordering::AcqRel);
            self.free.lock().expect("free lock").push(slot);
            self.freed.notify_one();
            match batch {
                Some(batch) if abandoned => batch.abort(),
                Some(batch) => batch.settle(rejected, "kafka", &self.metrics, &self.dead_letters),
                None => {}
            }
            self.outstanding.end();
        }
    }

    /// Take a free entry of the table, waiting while every entry is in flight.
    async fn take_slot(&self) -> usize {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(slot) = self.free.lock().expect("free lock").pop() {
                return slot;
            }
            freed.await;
        }
    }
}

/// The sending task's hold on its table entry. Dropped after the batch is stored in the
/// entry, it releases the hold; dropped early (the task cancelled mid-batch), it also
/// stands in for the reports of the outputs never handed over, so the entry is freed
/// once the handed-over ones report (the batch, dropped with the task, fails its tokens).
struct Hold<'a> {
    shared: &'a Shared,
    slot: usize,
    unsent: usize,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.shared.finish(self.slot, self.unsent + 1);
    }
}

/// The producer's context: routes delivery reports to their batch.
pub(crate) struct SinkContext {
    shared: Arc<Shared>,
    topic: String,
}

impl ClientContext for SinkContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        crate::kafka::log::KAFKA_LOG.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error
            .rdkafka_error_code()
            .is_some_and(fatal_for_the_producer)
        {
            tracing::error!(sink = "kafka", topic = %self.topic, %reason, "fatal producer error; the worker stops and resumes from its last commit");
            self.shared.fatal.store(true, Ordering::Release);
        } else if crate::kafka::log::KAFKA_LOG.error_is_transient(&error, reason) {
            tracing::info!(sink = "kafka", topic = %self.topic, error = %error, %reason, "producer error (a passing state)");
        } else {
            tracing::warn!(sink = "kafka", topic = %self.topic, error = %error, %reason, "producer error");
        }
    }
}

/// The errors with which librdkafka's idempotent producer fails for good (librdkafka
/// 2.12.1, `rdkafka_request.c`, `rdkafka_msgset_writer.c`): a sequence or producer id the
/// broker and the producer no longer agree on, a gap it cannot close, an inconsistent
/// batch. An error event reports a fatal error by its cause, not by `_FATAL`
/// (`rd_kafka_event_error` of a fatal event is the underlying code), so these codes are how
/// the error callback and a delivery report can tell; outside the fatal path the producer
/// retries them itself and never reports them. [`KafkaSink::fatal`] also asks librdkafka.
fn fatal_for_the_producer(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        Fatal
            | OutOfOrderSequenceNumber
            | UnknownProducerId
            | InvalidProducerEpoch
            | ProducerFenced
            | Fenced
            | GaplessGuarantee
            | Inconsistent
    )
}

/// Classify a produce error, with a short class for metrics and dead-letter headers.
pub fn classify(e: &KafkaError) -> (ErrorClass, &'static str) {
    use RDKafkaErrorCode::*;
    match e.rdkafka_error_code() {
        Some(MessageSizeTooLarge | InvalidMessageSize) => {
            (ErrorClass::Permanent, "record_too_large")
        }
        Some(InvalidMessage | InvalidRecord | UnsupportedForMessageFormat) => {
            (ErrorClass::Permanent, "invalid_record")
        }
        Some(TopicAuthorizationFailed | ClusterAuthorizationFailed) => {
            (ErrorClass::Permanent, "not_authorized")
        }
        Some(InvalidTopic) => (ErrorClass::Permanent, "invalid_topic"),
        Some(Fatal) => (ErrorClass::Permanent, "fatal"),
        _ => (ErrorClass::Transient, "transient"),
    }
}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        match result {
            Ok(_) => self.shared.finish_one(unpack(opaque).0),
            Err((e, _))
                if matches!(
                    e.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
                ) || self.shared.failed_fatally(e) =>
            {
                self.shared.abandon(opaque)
            }
            Err((e, _)) => {
                let (class, name) = classify(e);
                if class == ErrorClass::Permanent {
                    return self.shared.reject(opaque, name, e.to_string(), 1);
                }
                // librdkafka's idempotent retries ran out (message.timeout.ms): no
                // re-send from here, which could duplicate a write that landed late.
                if let Some(n) = self.shared.reject_log.tick() {
                    tracing::error!(sink = "kafka", topic = %self.topic, error = %e,
                        outputs = n, "not delivered within retry.maxElapsed (librdkafka's idempotent retries ran out)");
                }
                self.shared
                    .reject(opaque, "retries_exhausted", e.to_string(), 2)
            }
        }
    }
}

/// Write outputs to a Kafka topic.
pub struct KafkaSink {
    producer: ThreadedProducer<SinkContext>,
    target: OutputTarget,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("topic", &self.target.topic)
            .finish()
    }
}

impl KafkaSink {
    /// Create the producer from `client`: bootstrap servers, security and the properties
    /// of `sluice_api::config::clients::sink_producer` (the delivery guarantees, the
    /// bound of the producer's queue, the sink's `producerProperties` last).
    /// `limit`: the
    /// topic's `max.message.bytes` (see `crate::kafka::limits`); the producer's
    /// `batch.size` is capped at it.
    pub fn new(
        mut client: ClientConfig,
        target: OutputTarget,
        metrics: SinkMetrics,
        dead_letters: Arc<DeadLetters>,
    ) -> Result<Arc<Self>, KafkaError> {
        if let Some(l) = target.rules.max_message_bytes {
            limits::cap_batch_size(&mut client, l);
        }
        let shared = Arc::new(Shared {
            metrics,
            dead_letters,
            flights: (0..FLIGHT_SLOTS).map(|_| InFlight::default()).collect(),
            free: Mutex::new((0..FLIGHT_SLOTS).rev().collect()),
            freed: Notify::new(),
            outstanding: Outstanding::default(),
            fatal: AtomicBool::new(false),
            reject_log: LogThrottle::default(),
        });
        let producer = client.create_with_context(SinkContext {
            shared: shared.clone(),
            topic: target.topic.clone(),
        })?;
        let sink = Arc::new(KafkaSink {
            producer,
            target,
            shared,
        });
        Ok(sink)
    }

    /// True once the producer hit a fatal error and can no longer deliver.
    pub fn fatal(&self) -> bool {
        self.shared.fatal.load(Ordering::Acquire) || self.producer.client().fatal_error().is_some()
    }

    /// Hand one output to the producer, waiting only while the producer's queue is full.
    /// A refusal other than a full queue rejects the output (the dead-letter path).
    // The producer hands a record it did not take back inside its error.
    #[allow(clippy::result_large_err)]
    async fn send_one(&self, record: &OutputRecord<'_>, opaque: usize) {
        let mut rec: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&self.target.topic, opaque);
        if let Some(k) = record.key {
            rec = rec.key(k);
        }
        if let Some(v) = record.value.as_deref() {
            rec = rec.payload(v);
        }
        if let Some(h) = record.kafka_headers() {
            rec = rec.headers(h);
        }
        if let Err((e, _)) = while_queue_full(rec, |r| self.producer.send(r)).await {
            if self.shared.failed_fatally(&e) {
                return self.shared.abandon(opaque);
            }
            let (_, class) = classify(&e);
            if let Some(n) = self.shared.reject_log.tick() {
                tracing::error!(sink = "kafka", topic = %self.target.topic, error = %e, outputs = n, "the producer refused a record");
            }
            self.shared.reject(opaque, class, e.to_string(), 1);
        }
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &str {
        "kafka"
    }

    fn deliver(&self, batch: SinkBatch) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let n = batch.items.len();
            if n == 0 {
                batch.acknowledge(&self.shared.metrics);
                return;
            }
            let slot = self.shared.take_slot().await;
            let flight = &self.shared.flights[slot];
            // One report per output, plus the hold of this task: the batch cannot settle
            // before it is stored in its entry below, however fast the reports come.
            flight.remaining.store(n + 1, Ordering::Release);
            self.shared.outstanding.begin();
            let mut hold = Hold {
                shared: &self.shared,
                slot,
                unsent: n,
            };
            // The producer copies what it is given, so the sends borrow the batch itself.
            for (index, (o, origin)) in batch.items.iter().enumerate() {
                let opaque = opaque(slot, index);
                let record = match self.target.record(o, origin) {
                    Ok(r) => r,
                    Err(f) => {
                        if let Some(n) = self.shared.reject_log.tick() {
                            tracing::error!(sink = "kafka", topic = %self.target.topic, error = %f.message, outputs = n,
                                "an output does not fit the sink's schema; it goes to the dead-letter topic");
                        }
                        self.shared.reject(opaque, f.class, f.message, 1);
                        hold.unsent -= 1;
                        continue;
                    }
                };
                if let Some(f) = record.refused(&self.target.rules) {
                    if let Some(n) = self.shared.reject_log.tick() {
                        tracing::error!(sink = "kafka", topic = %self.target.topic, class = f.class, error = %f.message, outputs = n,
                            "the topic would refuse an output; it goes to the dead-letter topic, its batch-mates are produced");
                    }
                    self.shared.reject(opaque, f.class, f.message, f.attempts);
                    hold.unsent -= 1;
                    continue;
                }
                self.send_one(&record, opaque).await;
                hold.unsent -= 1;
            }
            *flight.batch.lock().expect("batch lock") = Some(batch);
            drop(hold);
        })
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, bool> {
        Box::pin(self.shared.outstanding.wait_idle(timeout))
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        let _ = self.producer.flush(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ack::BatchAck;
    use crate::engine::partition::{NoControl, PartitionState};
    use crate::ops::metrics::Metrics;
    use crate::record::{Origin, Output};
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use std::time::Instant;

    /// A batch of `n` outputs from offsets `first..first + n` of `partition`, registered
    /// with its tracker.
    fn batch(partition: &Arc<PartitionState>, first: i64, n: usize) -> SinkBatch {
        partition.register(first, first + n as i64 - 1).unwrap();
        let token = BatchAck::open(partition.clone(), first, n, None);
        SinkBatch {
            items: (0..n as i64)
                .map(|i| {
                    let output = Output {
                        key: Some(bytes::Bytes::from(format!("k{}", first + i))),
                        value: Some(bytes::Bytes::from_static(b"v")),
                        headers: Vec::new(),
                    };
                    let origin = Origin {
                        topic: "in".into(),
                        partition: 0,
                        offset: first + i,
                        timestamp_ms: None,
                        key: None,
                        output: 0,
                    };
                    (output, origin)
                })
                .collect(),
            bytes: n,
            tokens: vec![token],
            created: Instant::now(),
        }
    }

    /// An output that fails because the producer failed fatally (here the broker answers
    /// the first produce request with a sequence the idempotent producer cannot reason
    /// about, which librdkafka makes fatal) is not the record's failure: its batch is
    /// aborted, nothing goes to the dead-letter topic and nothing is committed, so the
    /// restart the fatal error causes delivers it again. Before this, the outputs were
    /// dead-lettered as `retries_exhausted` and their offsets committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outputs_failed_by_a_fatal_producer_error_are_redelivered_not_dead_lettered() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("out", 1, 1).unwrap();
        let metrics = Metrics::new("fatal");
        let dead_letters = crate::deadletter::DeadLetters::memory(&metrics);
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "20000");
        let config = sluice_api::config::KafkaSinkConfig {
            topic: "out".into(),
            bootstrap_servers: None,
            key: Default::default(),
            trace_header: None,
            producer_properties: Default::default(),
            format: None,
        };
        let sink = KafkaSink::new(
            client,
            OutputTarget::new(&config, Default::default()),
            SinkMetrics::new(&metrics, "kafka"),
            dead_letters.clone(),
        )
        .unwrap();
        let partition = PartitionState::for_test("in", &metrics, Arc::new(NoControl));

        // Delivered as usual first: the partition advances.
        sink.deliver(batch(&partition, 0, 10)).await;
        assert!(
            sink.flush(Duration::from_secs(30)).await,
            "first batch settles"
        );
        assert_eq!(partition.watermark(), Some(10));
        assert!(!sink.fatal());

        // The next produce request is answered OUT_OF_ORDER_SEQUENCE_NUMBER: fatal.
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
        );
        sink.deliver(batch(&partition, 10, 10)).await;
        assert!(
            sink.flush(Duration::from_secs(30)).await,
            "second batch settles"
        );
        assert!(sink.fatal(), "the producer's fatal error is reported");
        // And one handed over after the fatal error: refused at the send.
        sink.deliver(batch(&partition, 20, 5)).await;
        assert!(
            sink.flush(Duration::from_secs(30)).await,
            "third batch settles"
        );

        assert_eq!(
            dead_letters.parked().len(),
            0,
            "nothing is dead-lettered for the producer's own failure"
        );
        assert_eq!(
            partition.watermark(),
            Some(10),
            "nothing after the fatal error is committed"
        );
        assert!(
            !partition.is_stalled(),
            "an aborted batch does not stall its partition"
        );
    }
}
