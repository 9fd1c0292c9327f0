//! A Kafka sink writing through the worker's transactional producer (exactly-once, see
//! `delivery/exactly_once.rs`): its outputs join the open transaction.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use crate::delivery::exactly_once::FutureProducer;
use sluice_api::config::{KafkaSinkConfig, KeySource};
use tokio::sync::Notify;

use crate::deadletter::DeadLetters;
use crate::ops::throttle::LogThrottle;
use crate::sink::kafka::classify;
use crate::sink::{Sink, SinkBatch, SinkFailure, SinkMetrics};

/// A Kafka sink writing through the worker's transactional producer: a batch is settled
/// when every delivery report is in (acknowledged inside the open transaction, visible
/// to `read_committed` readers when the window commits).
pub struct TxnKafkaSink {
    producer: FutureProducer,
    topic: String,
    key: KeySource,
    trace_header: Option<String>,
    source_topic: String,
    metrics: SinkMetrics,
    dead_letters: Arc<DeadLetters>,
    outstanding: Arc<AtomicUsize>,
    idle: Arc<Notify>,
    reject_log: Arc<LogThrottle>,
}

impl std::fmt::Debug for TxnKafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnKafkaSink")
            .field("topic", &self.topic)
            .finish()
    }
}

impl TxnKafkaSink {
    /// A sink for `config` over the transactional `producer`.
    pub fn new(
        producer: FutureProducer,
        config: &KafkaSinkConfig,
        source_topic: &str,
        metrics: SinkMetrics,
        dead_letters: Arc<DeadLetters>,
    ) -> Arc<Self> {
        Arc::new(TxnKafkaSink {
            producer,
            topic: config.topic.clone(),
            key: config.key,
            trace_header: config.trace_header.clone(),
            source_topic: source_topic.to_string(),
            metrics,
            dead_letters,
            outstanding: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(Notify::new()),
            reject_log: Arc::new(LogThrottle::default()),
        })
    }
}

impl Sink for TxnKafkaSink {
    fn name(&self) -> &str {
        "kafka"
    }

    fn deliver(&self, batch: SinkBatch) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if batch.items.is_empty() {
                batch.acknowledge(&self.metrics);
                return;
            }
            let mut pending = Vec::with_capacity(batch.items.len());
            let mut rejected = Vec::new();
            for (index, (o, origin)) in batch.items.iter().enumerate() {
                let key = match self.key {
                    KeySource::Output => o.key.as_deref(),
                    KeySource::Input => origin.key.as_deref(),
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
                let headers = (!o.headers.is_empty() || trace.is_some()).then(|| {
                    o.headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_deref()))
                        .chain(trace.iter().map(|(k, v)| (*k, Some(v.as_bytes()))))
                        .fold(OwnedHeaders::new(), |h, (key, value)| {
                            h.insert(Header { key, value })
                        })
                });
                let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic);
                if let Some(k) = key {
                    rec = rec.key(k);
                }
                if let Some(v) = o.value.as_deref() {
                    rec = rec.payload(v);
                }
                if let Some(h) = headers {
                    rec = rec.headers(h);
                }
                let mut backoff = Duration::from_micros(200);
                loop {
                    match self.producer.send_result(rec) {
                        Ok(f) => {
                            pending.push((index, f));
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            rec = back;
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_millis(50));
                        }
                        // Refused before it joined the transaction (e.g. too large):
                        // dead-lettered like any permanent rejection.
                        Err((e, _)) => {
                            let (_, class) = classify(&e);
                            if let Some(n) = self.reject_log.tick() {
                                tracing::error!(sink = "kafka", topic = %self.topic, error = %e, outputs = n, "the producer refused a record");
                            }
                            rejected.push((
                                index,
                                SinkFailure {
                                    class,
                                    message: e.to_string(),
                                    attempts: 1,
                                },
                            ));
                            break;
                        }
                    }
                }
            }
            self.outstanding.fetch_add(1, Ordering::AcqRel);
            let (metrics, dead_letters, outstanding, idle, log, topic) = (
                self.metrics.clone(),
                self.dead_letters.clone(),
                self.outstanding.clone(),
                self.idle.clone(),
                self.reject_log.clone(),
                self.topic.clone(),
            );
            tokio::spawn(tracing::Instrument::in_current_span(async move {
                for (index, f) in pending {
                    let err = match f.await {
                        Ok(Ok(_)) => continue,
                        Ok(Err((e, _))) => e,
                        Err(_) => KafkaError::Canceled,
                    };
                    // A delivery that failed inside a transaction makes it abortable:
                    // the window's commit fails and everything in it is aborted. The
                    // output is still settled (dead-lettered) so nothing waits forever.
                    if let Some(n) = log.tick() {
                        tracing::error!(sink = "kafka", %topic, error = %err, outputs = n, "an output was not delivered; the transaction will abort");
                    }
                    let (_, class) = classify(&err);
                    rejected.push((
                        index,
                        SinkFailure {
                            class,
                            message: err.to_string(),
                            attempts: 1,
                        },
                    ));
                }
                batch.settle(rejected, "kafka", &metrics, &dead_letters);
                if outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
                    idle.notify_waiters();
                }
            }));
        })
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let idle = self.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if self.outstanding.load(Ordering::Acquire) == 0 {
                    return true;
                }
                if tokio::time::timeout_at(deadline, idle).await.is_err() {
                    return self.outstanding.load(Ordering::Acquire) == 0;
                }
            }
        })
    }
}
