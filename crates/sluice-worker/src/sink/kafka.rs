//! The `kafka` sink: an idempotent producer with `acks=all`. A batch is acknowledged only
//! when every record's delivery report is in and successful.
//!
//! Transient delivery errors (timeouts, broker unavailable) re-send the record with
//! backoff; permanent ones (record too large, authorization) fail the batch, so its source
//! records are never committed. A fatal producer error (e.g. an idempotence sequence
//! violation) is reported through [`KafkaSink::fatal`] and stops the worker: a restart
//! resumes from the last commit.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::{mpsc, Notify};

use super::{Sink, SinkBatch, SinkMetrics};
use crate::record::Output;

/// Most re-sends of one batch before it is failed for good.
const MAX_RETRIES_PER_BATCH: u32 = 20;

/// A batch handed to the producer, waiting for its delivery reports.
pub struct InFlight {
    remaining: AtomicUsize,
    failed: AtomicBool,
    retries: AtomicU32,
    batch: Mutex<Option<SinkBatch>>,
}

struct Retry {
    output: Output,
    flight: Arc<InFlight>,
}

struct Shared {
    metrics: SinkMetrics,
    outstanding: AtomicUsize,
    idle: Notify,
    fatal: AtomicBool,
    retry_tx: mpsc::UnboundedSender<Retry>,
}

impl Shared {
    fn finish_one(&self, flight: &Arc<InFlight>) {
        if flight.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let batch = flight.batch.lock().expect("batch lock").take();
            if let Some(batch) = batch {
                if flight.failed.load(Ordering::Acquire) {
                    batch.fail();
                } else {
                    batch.acknowledge(&self.metrics);
                }
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

/// Errors that no retry can fix.
fn is_permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | InvalidMessageSize
                | InvalidMessage
                | InvalidRecord
                | TopicAuthorizationFailed
                | InvalidTopic
                | UnsupportedForMessageFormat
                | Fatal
        )
    )
}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = Arc<InFlight>;

    fn delivery(&self, result: &DeliveryResult<'_>, flight: Arc<InFlight>) {
        match result {
            Ok(_) => self.shared.finish_one(&flight),
            Err((e, msg)) => {
                let retries = flight.retries.fetch_add(1, Ordering::AcqRel);
                if is_permanent(e) || retries >= MAX_RETRIES_PER_BATCH {
                    tracing::error!(sink = "kafka", topic = %self.topic, error = %e, retries,
                        "output rejected for good; its source records will not be committed");
                    flight.failed.store(true, Ordering::Release);
                    self.shared.finish_one(&flight);
                } else {
                    tracing::warn!(sink = "kafka", topic = %self.topic, error = %e, "transient delivery error; sending again");
                    self.shared.metrics.retries.inc();
                    let output = Output {
                        key: msg.key().map(Bytes::copy_from_slice),
                        value: msg.payload().map(Bytes::copy_from_slice),
                        headers: msg
                            .headers()
                            .map(|h| {
                                h.iter()
                                    .map(|h| {
                                        (h.key.to_string(), h.value.map(Bytes::copy_from_slice))
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    };
                    if self
                        .shared
                        .retry_tx
                        .send(Retry {
                            output,
                            flight: flight.clone(),
                        })
                        .is_err()
                    {
                        flight.failed.store(true, Ordering::Release);
                        self.shared.finish_one(&flight);
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
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("topic", &self.topic)
            .finish()
    }
}

impl KafkaSink {
    /// Create the producer. `config` carries bootstrap servers and security; the
    /// delivery guarantees are set here and `overrides` are applied last.
    pub fn new(
        mut config: ClientConfig,
        topic: &str,
        overrides: &std::collections::BTreeMap<String, String>,
        metrics: SinkMetrics,
    ) -> Result<Arc<Self>, KafkaError> {
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("batch.num.messages", "10000")
            .set("batch.size", "1048576")
            .set("queue.buffering.max.messages", "500000")
            .set("queue.buffering.max.kbytes", "262144")
            .set("message.timeout.ms", "120000");
        for (k, v) in overrides {
            config.set(k, v);
        }
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            metrics,
            outstanding: AtomicUsize::new(0),
            idle: Notify::new(),
            fatal: AtomicBool::new(false),
            retry_tx,
        });
        let producer = config.create_with_context(SinkContext {
            shared: shared.clone(),
            topic: topic.to_string(),
        })?;
        let sink = Arc::new(KafkaSink {
            producer,
            topic: topic.to_string(),
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
    async fn send_one(&self, out: &Output, flight: &Arc<InFlight>) {
        let headers = (!out.headers.is_empty()).then(|| {
            out.headers.iter().fold(
                OwnedHeaders::new_with_capacity(out.headers.len()),
                |h, (k, v)| {
                    h.insert(Header {
                        key: k,
                        value: v.as_deref(),
                    })
                },
            )
        });
        let mut rec: BaseRecord<'_, [u8], [u8], Arc<InFlight>> =
            BaseRecord::with_opaque_to(&self.topic, flight.clone());
        if let Some(k) = &out.key {
            rec = rec.key(&k[..]);
        }
        if let Some(v) = &out.value {
            rec = rec.payload(&v[..]);
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
                Err((e, _)) => {
                    tracing::error!(sink = "kafka", topic = %self.topic, error = %e, "the producer refused a record; its source records will not be committed");
                    flight.failed.store(true, Ordering::Release);
                    self.shared.finish_one(flight);
                    return;
                }
            }
        }
    }
}

async fn retry_loop(sink: std::sync::Weak<KafkaSink>, mut rx: mpsc::UnboundedReceiver<Retry>) {
    while let Some(r) = rx.recv().await {
        let attempt = r.flight.retries.load(Ordering::Acquire).min(8);
        tokio::time::sleep(Duration::from_millis(50u64 << attempt).min(Duration::from_secs(5)))
            .await;
        let Some(sink) = sink.upgrade() else { return };
        sink.send_one(&r.output, &r.flight).await;
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
            let outputs: Vec<Output> = batch.items.iter().map(|(o, _)| o.clone()).collect();
            let flight = Arc::new(InFlight {
                remaining: AtomicUsize::new(n),
                failed: AtomicBool::new(false),
                retries: AtomicU32::new(0),
                batch: Mutex::new(Some(batch)),
            });
            self.shared.outstanding.fetch_add(1, Ordering::AcqRel);
            for out in &outputs {
                self.send_one(out, &flight).await;
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
