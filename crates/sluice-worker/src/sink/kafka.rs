//! The `kafka` sink: an idempotent producer with `acks=all`. A batch is settled only when
//! every record's delivery report is in.
//!
//! Each output is classified on failure. Transient errors (timeouts, an unavailable
//! broker) send it again after a backoff from the pipeline's retry policy; permanent ones
//! (record too large, authorization, an invalid topic) and transient ones whose retries
//! ran out send it to the dead-letter path, and the rest of the batch is acknowledged as
//! usual. A fatal producer error (e.g. an idempotence sequence violation) is reported
//! through [`KafkaSink::fatal`] and stops the worker: a restart resumes from the last
//! commit.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use sluice_api::config::{KafkaSinkConfig, KeySource};
use tokio::sync::{mpsc, Notify};

use super::{Sink, SinkBatch, SinkFailure, SinkMetrics};
use crate::deadletter::DeadLetters;
use crate::retry::{ErrorClass, RetryPolicy};
use crate::throttle::LogThrottle;

/// A batch handed to the producer, waiting for its delivery reports.
struct InFlight {
    remaining: AtomicUsize,
    rejected: Mutex<Vec<(usize, SinkFailure)>>,
    first_failure: Mutex<Option<Instant>>,
    batch: Mutex<Option<SinkBatch>>,
}

/// One output on its way: the delivery opaque.
pub struct Slot {
    flight: Arc<InFlight>,
    index: usize,
    attempts: u32,
}

/// A record to send again after `delay`.
struct Retry {
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: Vec<(String, Option<Bytes>)>,
    slot: Box<Slot>,
    delay: Duration,
}

struct Shared {
    metrics: SinkMetrics,
    dead_letters: Arc<DeadLetters>,
    retry: RetryPolicy,
    outstanding: AtomicUsize,
    idle: Notify,
    fatal: AtomicBool,
    retry_tx: mpsc::UnboundedSender<Retry>,
    /// One line per interval for retried and for rejected outputs.
    retry_log: LogThrottle,
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
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal)) {
            tracing::error!(sink = "kafka", topic = %self.topic, %reason, "fatal producer error; the worker stops and resumes from its last commit");
            self.shared.fatal.store(true, Ordering::Release);
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
            Err((e, msg)) => {
                let (class, name) = classify(e);
                if class == ErrorClass::Permanent {
                    return self.shared.reject(&slot, name, e.to_string());
                }
                let started = *slot
                    .flight
                    .first_failure
                    .lock()
                    .expect("lock")
                    .get_or_insert_with(Instant::now);
                let Some(delay) = self
                    .shared
                    .retry
                    .next_delay(slot.attempts, started.elapsed())
                else {
                    if let Some(n) = self.shared.reject_log.tick() {
                        tracing::error!(sink = "kafka", topic = %self.topic, error = %e, attempts = slot.attempts,
                            outputs = n, "retries exhausted");
                    }
                    return self
                        .shared
                        .reject(&slot, "retries_exhausted", e.to_string());
                };
                if let Some(n) = self.shared.retry_log.tick() {
                    tracing::warn!(sink = "kafka", topic = %self.topic, error = %e, attempts = slot.attempts, ?delay,
                        outputs = n, "transient delivery error; sending again");
                }
                self.shared.metrics.retries.inc();
                slot.attempts += 1;
                let retry = Retry {
                    key: msg.key().map(Bytes::copy_from_slice),
                    value: msg.payload().map(Bytes::copy_from_slice),
                    headers: crate::record::owned_headers(msg),
                    slot,
                    delay,
                };
                if let Err(mpsc::error::SendError(r)) = self.shared.retry_tx.send(retry) {
                    // Shutting down: leave it unacknowledged (redelivered after restart).
                    let taken = r.slot.flight.batch.lock().expect("lock").take();
                    if let Some(b) = taken {
                        b.fail();
                    }
                }
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
    /// Create the producer. `client` carries bootstrap servers and security; the delivery
    /// guarantees are set here and the sink's `producerProperties` are applied last.
    /// `source_topic` is the pipeline's input topic (for the trace header).
    pub fn new(
        mut client: ClientConfig,
        config: &KafkaSinkConfig,
        source_topic: &str,
        retry: RetryPolicy,
        metrics: SinkMetrics,
        dead_letters: Arc<DeadLetters>,
    ) -> Result<Arc<Self>, KafkaError> {
        client
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("batch.num.messages", "10000")
            .set("batch.size", "1048576")
            .set("queue.buffering.max.messages", "500000")
            .set("queue.buffering.max.kbytes", "262144")
            // librdkafka retries within this; past it the report comes back to the retry
            // policy above.
            .set("message.timeout.ms", "30000");
        for (k, v) in &config.producer_properties {
            client.set(k, v);
        }
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            metrics,
            dead_letters,
            retry,
            outstanding: AtomicUsize::new(0),
            idle: Notify::new(),
            fatal: AtomicBool::new(false),
            retry_tx,
            retry_log: LogThrottle::default(),
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
            shared,
        });
        tokio::spawn(tracing::Instrument::in_current_span(retry_loop(
            Arc::downgrade(&sink),
            retry_rx,
        )));
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

async fn retry_loop(sink: std::sync::Weak<KafkaSink>, mut rx: mpsc::UnboundedReceiver<Retry>) {
    while let Some(r) = rx.recv().await {
        let sink = sink.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            tokio::time::sleep(r.delay).await;
            let Some(sink) = sink.upgrade() else { return };
            let headers = (!r.headers.is_empty())
                .then(|| kafka_headers(r.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref()))));
            sink.send_one(r.key.as_deref(), r.value.as_deref(), headers, r.slot)
                .await;
        }));
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
                first_failure: Mutex::new(None),
                batch: Mutex::new(Some(batch)),
            });
            self.shared.outstanding.fetch_add(1, Ordering::AcqRel);
            for (index, (key, value, headers, trace)) in records.iter().enumerate() {
                let headers = (!headers.is_empty() || trace.is_some()).then(|| {
                    kafka_headers(
                        headers
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_deref()))
                            .chain(trace.iter().map(|(k, v)| (*k, Some(v.as_bytes())))),
                    )
                });
                let slot = Box::new(Slot {
                    flight: flight.clone(),
                    index,
                    attempts: 1,
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
