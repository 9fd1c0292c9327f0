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
//! commit.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use sluice_api::config::{KafkaSinkConfig, KeySource};
use tokio::sync::Notify;

use super::{Sink, SinkBatch, SinkFailure, SinkMetrics};
use crate::deadletter::DeadLetters;
use crate::kafka::limits;
use crate::ops::throttle::LogThrottle;
use crate::retry::ErrorClass;

/// A batch handed to the producer, waiting for its delivery reports.
struct InFlight {
    remaining: AtomicUsize,
    rejected: Mutex<Vec<(usize, SinkFailure)>>,
    batch: Mutex<Option<SinkBatch>>,
}

/// One output on its way: the delivery opaque.
pub struct Slot {
    flight: Arc<InFlight>,
    index: usize,
    attempts: u32,
}

struct Shared {
    metrics: SinkMetrics,
    dead_letters: Arc<DeadLetters>,
    outstanding: AtomicUsize,
    idle: Notify,
    fatal: AtomicBool,
    /// One line per interval for rejected outputs.
    reject_log: LogThrottle,
}

impl Shared {
    fn reject(&self, slot: &Slot, class: &'static str, message: String) {
        slot.flight.rejected.lock().expect("rejected lock").push((
            slot.index,
            SinkFailure {
                class,
                message,
                attempts: slot.attempts,
            },
        ));
        self.finish_one(&slot.flight);
    }

    fn finish_one(&self, flight: &Arc<InFlight>) {
        if flight.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let batch = flight.batch.lock().expect("batch lock").take();
            if let Some(batch) = batch {
                let rejected = std::mem::take(&mut *flight.rejected.lock().expect("lock"));
                batch.settle(rejected, "kafka", &self.metrics, &self.dead_letters);
            }
            if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.idle.notify_waiters();
            }
        }
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
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal)) {
            tracing::error!(sink = "kafka", topic = %self.topic, %reason, "fatal producer error; the worker stops and resumes from its last commit");
            self.shared.fatal.store(true, Ordering::Release);
        } else if crate::kafka::log::KAFKA_LOG.error_is_transient(&error, reason) {
            tracing::info!(sink = "kafka", topic = %self.topic, error = %error, %reason, "producer error (a passing state)");
        } else {
            tracing::warn!(sink = "kafka", topic = %self.topic, error = %error, %reason, "producer error");
        }
    }
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
    type DeliveryOpaque = Box<Slot>;

    fn delivery(&self, result: &DeliveryResult<'_>, mut slot: Box<Slot>) {
        match result {
            Ok(_) => self.shared.finish_one(&slot.flight),
            Err((e, _)) => {
                let (class, name) = classify(e);
                if class == ErrorClass::Permanent {
                    return self.shared.reject(&slot, name, e.to_string());
                }
                // librdkafka's idempotent retries ran out (message.timeout.ms): no
                // re-send from here, which could duplicate a write that landed late.
                if let Some(n) = self.shared.reject_log.tick() {
                    tracing::error!(sink = "kafka", topic = %self.topic, error = %e,
                        outputs = n, "not delivered within retry.maxElapsed (librdkafka's idempotent retries ran out)");
                }
                slot.attempts += 1;
                self.shared
                    .reject(&slot, "retries_exhausted", e.to_string())
            }
        }
    }
}

/// Write outputs to a Kafka topic.
pub struct KafkaSink {
    producer: ThreadedProducer<SinkContext>,
    topic: String,
    key: KeySource,
    trace_header: Option<String>,
    source_topic: String,
    /// The topic's `max.message.bytes`, when it could be read.
    limit: Option<usize>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("topic", &self.topic)
            .finish()
    }
}

fn kafka_headers<'a>(headers: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>) -> OwnedHeaders {
    headers.fold(OwnedHeaders::new(), |h, (key, value)| {
        h.insert(Header { key, value })
    })
}

impl KafkaSink {
    /// Create the producer from `client`: bootstrap servers, security and the properties
    /// of `sluice_api::config::clients::sink_producer` (the delivery guarantees, the
    /// bound of the producer's queue, the sink's `producerProperties` last).
    /// `source_topic` is the pipeline's input topic (for the trace header). `limit`: the
    /// topic's `max.message.bytes` (see `crate::kafka::limits`); the producer's
    /// `batch.size` is capped at it.
    pub fn new(
        mut client: ClientConfig,
        config: &KafkaSinkConfig,
        source_topic: &str,
        limit: Option<usize>,
        metrics: SinkMetrics,
        dead_letters: Arc<DeadLetters>,
    ) -> Result<Arc<Self>, KafkaError> {
        if let Some(l) = limit {
            limits::cap_batch_size(&mut client, l);
        }
        let shared = Arc::new(Shared {
            metrics,
            dead_letters,
            outstanding: AtomicUsize::new(0),
            idle: Notify::new(),
            fatal: AtomicBool::new(false),
            reject_log: LogThrottle::default(),
        });
        let producer = client.create_with_context(SinkContext {
            shared: shared.clone(),
            topic: config.topic.clone(),
        })?;
        let sink = Arc::new(KafkaSink {
            producer,
            topic: config.topic.clone(),
            key: config.key,
            trace_header: config.trace_header.clone(),
            source_topic: source_topic.to_string(),
            limit,
            shared,
        });
        Ok(sink)
    }

    /// True once the producer hit a fatal error and can no longer deliver.
    pub fn fatal(&self) -> bool {
        self.shared.fatal.load(Ordering::Acquire)
    }

    /// Send one record, waiting while the producer's queue is full.
    async fn send_one(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
        slot: Box<Slot>,
    ) {
        let mut rec: BaseRecord<'_, [u8], [u8], Box<Slot>> =
            BaseRecord::with_opaque_to(&self.topic, slot);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        if let Some(h) = headers {
            rec = rec.headers(h);
        }
        let mut backoff = Duration::from_micros(200);
        loop {
            match self.producer.send(rec) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
                Err((e, back)) => {
                    let (_, class) = classify(&e);
                    if let Some(n) = self.shared.reject_log.tick() {
                        tracing::error!(sink = "kafka", topic = %self.topic, error = %e, outputs = n, "the producer refused a record");
                    }
                    self.shared
                        .reject(&back.delivery_opaque, class, e.to_string());
                    return;
                }
            }
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
            // Bytes are reference counted: the sends borrow these clones while the batch
            // (with its tokens) waits in the in-flight record for the delivery reports.
            let records: Vec<_> = batch
                .items
                .iter()
                .map(|(o, origin)| {
                    let key = match self.key {
                        KeySource::Output => o.key.clone(),
                        KeySource::Input => origin.key.clone(),
                    };
                    let trace = self.trace_header.as_ref().map(|name| {
                        (
                            name.as_str(),
                            format!(
                                "{}/{}/{}",
                                self.source_topic, origin.partition, origin.offset
                            ),
                        )
                    });
                    (key, o.value.clone(), o.headers.clone(), trace)
                })
                .collect();
            let flight = Arc::new(InFlight {
                remaining: AtomicUsize::new(n),
                rejected: Mutex::new(Vec::new()),
                batch: Mutex::new(Some(batch)),
            });
            self.shared.outstanding.fetch_add(1, Ordering::AcqRel);
            for (index, (key, value, headers, trace)) in records.iter().enumerate() {
                let slot = Box::new(Slot {
                    flight: flight.clone(),
                    index,
                    attempts: 1,
                });
                if let Some(limit) = self.limit {
                    let size = limits::batch_size_alone(
                        key.as_deref(),
                        value.as_deref(),
                        headers
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_deref()))
                            .chain(trace.iter().map(|(k, v)| (*k, Some(v.as_bytes())))),
                    );
                    if size > limit {
                        if let Some(n) = self.shared.reject_log.tick() {
                            tracing::error!(sink = "kafka", topic = %self.topic, size, max_message_bytes = limit, outputs = n,
                                "an output is over the topic's max.message.bytes; it goes to the dead-letter topic, its batch-mates are produced");
                        }
                        self.shared.reject(
                            &slot,
                            "record_too_large",
                            limits::too_large(size, limit),
                        );
                        continue;
                    }
                }
                let headers = (!headers.is_empty() || trace.is_some()).then(|| {
                    kafka_headers(
                        headers
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_deref()))
                            .chain(trace.iter().map(|(k, v)| (*k, Some(v.as_bytes())))),
                    )
                });
                self.send_one(key.as_deref(), value.as_deref(), headers, slot)
                    .await;
            }
        })
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let idle = self.shared.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if self.shared.outstanding.load(Ordering::Acquire) == 0 {
                    return true;
                }
                if tokio::time::timeout_at(deadline, idle).await.is_err() {
                    return self.shared.outstanding.load(Ordering::Acquire) == 0;
                }
            }
        })
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        let _ = self.producer.flush(Duration::from_secs(5));
    }
}
