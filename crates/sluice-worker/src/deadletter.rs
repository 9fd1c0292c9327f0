//! The dead-letter path: where a record goes when it failed for good (a processor error,
//! a permanent sink error, or a transient one whose retries ran out).
//!
//! A letter is written to the dead-letter topic through an idempotent producer with
//! `acks=all`, carrying the failed payload and headers that say what failed, where and
//! how often. The record counts as done only once its letter is acknowledged. Without a
//! dead-letter topic, or when the letter itself cannot be written, the record's batch is
//! failed: its partition stops advancing (nothing is skipped) and reports itself stalled.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{FutureRecord, Producer};

use crate::kafka::log::LoggingContext;

/// The dead-letter producer (its librdkafka lines through [`crate::kafka::log`]).
use crate::kafka::producer::FutureProducer;
use rdkafka::ClientConfig;

use crate::engine::ack::AckToken;
use crate::kafka::producer::SharedProducer;
use crate::ops::throttle::LogThrottle;
use crate::record::{Header, Origin};
use crate::sink::produce::Outstanding;

/// Header names written on every letter.
pub mod headers {
    /// Short error class (`not_json`, `jq_error`, `constraint`, `retries_exhausted`, ...).
    pub const CLASS: &str = "sluice.error.class";
    /// The error message.
    pub const MESSAGE: &str = "sluice.error.message";
    /// The stage that failed: the processor's or the sink's name.
    pub const STAGE: &str = "sluice.error.stage";
    /// How many attempts were made.
    pub const ATTEMPTS: &str = "sluice.error.attempts";
    /// Source topic.
    pub const TOPIC: &str = "sluice.source.topic";
    /// Source partition.
    pub const PARTITION: &str = "sluice.source.partition";
    /// Source offset.
    pub const OFFSET: &str = "sluice.source.offset";
    /// Source record timestamp in ms since the epoch (absent when the record had none).
    pub const TIMESTAMP: &str = "sluice.source.timestamp";
    /// Present when the payload was too large for the dead-letter topic and was left out.
    pub const PAYLOAD_DROPPED: &str = "sluice.payload.dropped";
}

/// A record that failed for good, on its way to the dead-letter topic.
#[derive(Clone, Debug)]
pub struct Letter {
    /// The source record's coordinates.
    pub origin: Origin,
    /// The payload that failed: the input record's key and value for a processor
    /// failure, the rejected output's for a sink failure.
    pub key: Option<Bytes>,
    /// See `key`.
    pub value: Option<Bytes>,
    /// The failed record's own headers; the error headers are added after them.
    pub headers: Vec<Header>,
    /// The processor's or sink's name.
    pub stage: String,
    /// A short, bounded class.
    pub class: &'static str,
    /// The error message.
    pub message: String,
    /// Attempts made.
    pub attempts: u32,
}

impl Letter {
    /// Every header of the letter: the record's own (in order, null values kept), then
    /// the error headers; `topic` is the source topic.
    pub fn all_headers(&self, topic: &str) -> Vec<(String, Option<Vec<u8>>)> {
        let mut out: Vec<(String, Option<Vec<u8>>)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.as_ref().map(|v| v.to_vec())))
            .collect();
        let o = &self.origin;
        let mut add = |name: &str, value: Vec<u8>| out.push((name.into(), Some(value)));
        add(headers::CLASS, self.class.as_bytes().to_vec());
        add(headers::MESSAGE, self.message.as_bytes().to_vec());
        add(headers::STAGE, self.stage.as_bytes().to_vec());
        add(headers::ATTEMPTS, self.attempts.to_string().into_bytes());
        add(headers::TOPIC, topic.as_bytes().to_vec());
        add(headers::PARTITION, o.partition.to_string().into_bytes());
        add(headers::OFFSET, o.offset.to_string().into_bytes());
        if let Some(ts) = o.timestamp_ms {
            add(headers::TIMESTAMP, ts.to_string().into_bytes());
        }
        out
    }
}

/// A source record's coordinates: topic, partition, offset.
type SourceOffset = (Arc<str>, i32, i64);

enum Target {
    /// No dead-letter topic: fail the batch, stall the partition.
    Stall,
    /// A Kafka topic.
    Kafka {
        producer: SharedProducer,
        topic: String,
        /// exactly-once: the letters share the window's transaction. A letter that fails
        /// fails the window, which is aborted and processed again (see
        /// `sink/kafka_txn.rs`); one refused for good (too large for the dead-letter topic)
        /// is remembered here, by source record, and written without its payload then.
        transactional: Option<std::sync::Mutex<std::collections::HashSet<SourceOffset>>>,
    },
    /// Kept in memory (tests of the data path).
    Memory(std::sync::Mutex<Vec<Letter>>),
}

/// How a write of letters went.
enum Written {
    /// Every letter is stored.
    All,
    /// Not stored, through no fault of the letters: exactly-once, not in this window's
    /// transaction (the window is processed again); at-least-once, the producer failed
    /// fatally (the worker stops; its restart delivers the records again).
    Retry,
    /// A letter cannot be stored: its records' partitions stop advancing.
    Failed,
}

/// The dead-letter path of one pipeline.
pub struct DeadLetters {
    target: Target,
    counter: prometheus::IntCounterVec,
    pipeline: String,
    outstanding: Outstanding,
    /// Where letter writes run: `park` is also called from librdkafka's delivery-report
    /// thread, which has no runtime of its own.
    runtime: Option<tokio::runtime::Handle>,
    log: LogThrottle,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = match &self.target {
            Target::Stall => "stall",
            Target::Kafka { .. } => "kafka",
            Target::Memory(_) => "memory",
        };
        f.debug_struct("DeadLetters").field("target", &t).finish()
    }
}

impl DeadLetters {
    fn with(target: Target, metrics: &crate::ops::metrics::Metrics) -> Arc<Self> {
        Arc::new(DeadLetters {
            target,
            counter: metrics.dead_letters.clone(),
            pipeline: metrics.pipeline().to_string(),
            outstanding: Outstanding::default(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            log: LogThrottle::default(),
        })
    }

    /// No dead-letter topic: a failed record stalls its partition.
    pub fn stall(metrics: &crate::ops::metrics::Metrics) -> Arc<Self> {
        Self::with(Target::Stall, metrics)
    }

    /// Letters kept in memory, for tests; see [`DeadLetters::parked`].
    pub fn memory(metrics: &crate::ops::metrics::Metrics) -> Arc<Self> {
        Self::with(Target::Memory(Default::default()), metrics)
    }

    /// Letters written to `topic` through a producer made from `config` (bootstrap
    /// servers, security and `sluice_api::config::clients::dead_letter_producer`). Call
    /// it inside the Tokio runtime the writes should run on.
    pub fn kafka(
        config: ClientConfig,
        topic: &str,
        metrics: &crate::ops::metrics::Metrics,
    ) -> Result<Arc<Self>, rdkafka::error::KafkaError> {
        let producer: FutureProducer = config.create_with_context(LoggingContext)?;
        Ok(Self::with(
            Target::Kafka {
                producer: SharedProducer::new(producer),
                topic: topic.to_string(),
                transactional: None,
            },
            metrics,
        ))
    }

    /// Letters written to `topic` through the worker's transactional producer
    /// (exactly-once): each letter commits or aborts with its window's transaction.
    pub fn kafka_transactional(
        producer: SharedProducer,
        topic: &str,
        metrics: &crate::ops::metrics::Metrics,
    ) -> Arc<Self> {
        Self::with(
            Target::Kafka {
                producer,
                topic: topic.to_string(),
                transactional: Some(Default::default()),
            },
            metrics,
        )
    }

    /// Whether failed records are written somewhere (rather than stalling).
    pub fn enabled(&self) -> bool {
        !matches!(self.target, Target::Stall)
    }

    /// Letters parked in a memory target.
    pub fn parked(&self) -> Vec<Letter> {
        match &self.target {
            Target::Memory(m) => m.lock().expect("letters lock").clone(),
            _ => Vec::new(),
        }
    }

    /// Park `letters`. `tokens` (the shares of the batches the letters' records belong
    /// to) are acknowledged once every letter is stored, and failed otherwise.
    pub fn park(self: &Arc<Self>, letters: Vec<Letter>, tokens: Vec<AckToken>) {
        for l in &letters {
            // One line per interval, for the record that opened it and how many failed
            // since the last line; every letter carries its own details in its headers.
            if let Some(n) = self.log.tick() {
                tracing::warn!(topic = %l.origin.topic, partition = l.origin.partition, offset = l.origin.offset,
                    stage = %l.stage, class = l.class, attempts = l.attempts, error = %l.message,
                    dead_letter = self.enabled(), records = n, "record failed for good");
            }
        }
        match &self.target {
            Target::Stall => {
                tracing::error!(
                    "no dead-letter topic is configured: the partition stops advancing at the failed record (set deadLetter.topic to let it pass)"
                );
                for t in tokens {
                    t.fail();
                }
            }
            Target::Memory(m) => {
                self.count(&letters);
                m.lock().expect("letters lock").extend(letters);
                for t in tokens {
                    t.ack();
                }
            }
            Target::Kafka { .. } => {
                self.outstanding.begin();
                let this = self.clone();
                let handle = match &self.runtime {
                    Some(h) => h.clone(),
                    None => tokio::runtime::Handle::current(),
                };
                handle.spawn(tracing::Instrument::in_current_span(async move {
                    match this.write(&letters).await {
                        Written::All => {
                            this.count(&letters);
                            for t in tokens {
                                t.ack();
                            }
                        }
                        Written::Retry => {
                            for t in tokens {
                                t.abort();
                            }
                        }
                        Written::Failed => {
                            for t in tokens {
                                t.fail();
                            }
                        }
                    }
                    this.outstanding.end();
                }));
            }
        }
    }

    fn count(&self, letters: &[Letter]) {
        for l in letters {
            self.counter
                .with_label_values(&[&self.pipeline, &l.stage, l.class])
                .inc();
        }
    }

    async fn write(&self, letters: &[Letter]) -> Written {
        let Target::Kafka {
            producer,
            topic,
            transactional,
        } = &self.target
        else {
            return Written::Failed;
        };
        let bare = |l: &Letter| {
            transactional.as_ref().is_some_and(|t| {
                t.lock().expect("letters lock").contains(&(
                    l.origin.topic.clone(),
                    l.origin.partition,
                    l.origin.offset,
                ))
            })
        };
        let producer = &producer.get();
        let results = futures::future::join_all(
            letters
                .iter()
                .map(|l| send_letter(producer, topic, l, !bare(l))),
        )
        .await;
        let mut written = Written::All;
        for (l, res) in letters.iter().zip(results) {
            let Err(e) = res else { continue };
            let too_large = matches!(
                e.rdkafka_error_code(),
                Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
            );
            if let Some(t) = transactional {
                // The window's transaction cannot commit now: it is processed again, the
                // letter then without its payload when that was what the broker refused.
                if too_large && !bare(l) {
                    t.lock().expect("letters lock").insert((
                        l.origin.topic.clone(),
                        l.origin.partition,
                        l.origin.offset,
                    ));
                } else if crate::sink::kafka::classify(&e).0 == crate::retry::ErrorClass::Permanent
                    && bare(l)
                {
                    tracing::error!(%topic, error = %e, "a dead letter was refused for good; its partition stops advancing");
                    return Written::Failed;
                }
                if let Some(n) = self.log.tick() {
                    tracing::warn!(%topic, error = %e, letters = n, "a dead letter was not written in this window; the window is aborted and processed again");
                }
                written = Written::Retry;
                continue;
            }
            // A record too large for its sink is often too large for the dead-letter topic
            // too: keep the story (headers, source coordinates) and drop the payload.
            if too_large && send_letter(producer, topic, l, false).await.is_ok() {
                continue;
            }
            // The producer failed fatally: not the letter's failure. Its records are
            // neither stalled nor committed; the worker stops (`fatal`) and its restart
            // delivers them again.
            if producer.client().fatal_error().is_some() {
                if let Some(n) = self.log.tick() {
                    tracing::error!(%topic, error = %e, letters = n, "the dead-letter producer failed fatally; the worker stops and resumes from its last commit");
                }
                if !matches!(written, Written::Failed) {
                    written = Written::Retry;
                }
                continue;
            }
            tracing::error!(%topic, error = %e, "a dead letter could not be written; its partition stops advancing");
            written = Written::Failed;
        }
        written
    }

    /// True once the dead-letter topic's own (at-least-once) producer failed fatally (an
    /// idempotence sequence it cannot reason about, a fenced id): it can store no letter
    /// any more, so the worker stops and a restart resumes from the last commit, the way a
    /// Kafka sink's fatal error does. The exactly-once letters share the transactional
    /// producer, whose fatal errors the window renews in place.
    pub fn fatal(&self) -> bool {
        match &self.target {
            Target::Kafka {
                producer,
                transactional: None,
                ..
            } => producer.get().client().fatal_error().is_some(),
            _ => false,
        }
    }

    /// Wait until every parked letter is stored or failed, up to `timeout`.
    pub async fn flush(&self, timeout: Duration) -> bool {
        self.outstanding.wait_idle(timeout).await
    }
}

/// Write one letter (without its payload when `with_payload` is false).
async fn send_letter(
    producer: &FutureProducer,
    topic: &str,
    l: &Letter,
    with_payload: bool,
) -> Result<(), KafkaError> {
    let mut all = l.all_headers(&l.origin.topic);
    if !with_payload {
        let size = l.value.as_ref().map_or(0, Bytes::len) + l.key.as_ref().map_or(0, Bytes::len);
        all.push((
                    headers::PAYLOAD_DROPPED.into(),
                    Some(format!("{size} bytes of key and value did not fit the dead-letter topic; read them at the source coordinates").into_bytes()),
                ));
    }
    let headers = all
        .iter()
        .fold(OwnedHeaders::new_with_capacity(all.len()), |h, (k, v)| {
            h.insert(KafkaHeader {
                key: k,
                value: v.as_ref(),
            })
        });
    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
    if with_payload {
        if let Some(k) = &l.key {
            rec = rec.key(&k[..]);
        }
        if let Some(v) = &l.value {
            rec = rec.payload(&v[..]);
        }
    }
    // Waits while the producer queue is full; delivery itself is retried by
    // librdkafka up to message.timeout.ms.
    producer
        .send(rec, Duration::from_secs(60))
        .await
        .map(|_| ())
        .map_err(|(e, _)| e)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(1000)))]
        /// Fuzz the letter's headers: any record headers (null, empty-named, duplicated,
        /// named like ours) and any message survive in order, and the error headers after
        /// them always read back to the letter's coordinates.
        #[test]
        fn fuzz_letter_headers_keep_the_record_s_and_name_the_source(
            own in prop::collection::vec(
                ("\\PC{0,16}|sluice\\.error\\.class", prop::option::of(prop::collection::vec(any::<u8>(), 0..32))),
                0..6,
            ),
            message in "\\PC{0,200}",
            partition in any::<i32>(),
            offset in any::<i64>(),
            timestamp_ms in prop::option::of(any::<i64>()),
            attempts in any::<u32>(),
        ) {
            let letter = Letter {
                origin: Origin { topic: "in".into(), partition, offset, timestamp_ms, key: None, output: 0 },
                key: None,
                value: None,
                headers: own.iter().map(|(k, v)| (k.clone(), v.clone().map(Bytes::from))).collect(),
                stage: "jq".into(),
                class: "jq_error",
                message: message.clone(),
                attempts,
            };
            let all = letter.all_headers("in");
            prop_assert_eq!(&all[..own.len()], &own[..]);
            let ours: std::collections::HashMap<&str, &[u8]> = all[own.len()..]
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_deref().unwrap_or_default()))
                .collect();
            let text = |h: &str| String::from_utf8(ours[h].to_vec()).unwrap();
            prop_assert_eq!(text(headers::MESSAGE), message);
            prop_assert_eq!(text(headers::PARTITION).parse::<i32>().unwrap(), partition);
            prop_assert_eq!(text(headers::OFFSET).parse::<i64>().unwrap(), offset);
            prop_assert_eq!(text(headers::ATTEMPTS).parse::<u32>().unwrap(), attempts);
            prop_assert_eq!(
                ours.get(headers::TIMESTAMP).map(|t| String::from_utf8(t.to_vec()).unwrap().parse::<i64>().unwrap()),
                timestamp_ms
            );
        }
    }

    /// A fatal error of the dead-letter topic's own producer (here the broker answers a
    /// produce request with a sequence the idempotent producer cannot reason about, which
    /// librdkafka makes fatal) is reported by [`DeadLetters::fatal`], so the worker stops
    /// and its restart resumes from the last commit; the letters it failed are not the
    /// records' failure: their partition neither stalls nor advances. Before, the
    /// partition stalled and the worker ran on with a producer that could store nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fatal_error_of_the_dead_letter_producer_stops_the_worker_and_stalls_nothing() {
        use crate::engine::ack::BatchAck;
        use crate::engine::partition::{NoControl, PartitionState};
        use crate::ops::metrics::Metrics;
        use rdkafka::mocking::MockCluster;
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("dlq", 1, 1).unwrap();
        let metrics = Metrics::new("dlq-fatal");
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "20000");
        let dl = DeadLetters::kafka(client, "dlq", &metrics).unwrap();
        let partition = PartitionState::for_test("in", &metrics, Arc::new(NoControl));
        let park = |first: i64, n: usize| {
            partition.register(first, first + n as i64 - 1).unwrap();
            let token = BatchAck::open(partition.clone(), first, n, None);
            let letters = (first..first + n as i64)
                .map(|offset| Letter {
                    origin: Origin {
                        topic: "in".into(),
                        partition: 0,
                        offset,
                        timestamp_ms: None,
                        key: None,
                        output: 0,
                    },
                    key: None,
                    value: Some(Bytes::from_static(b"v")),
                    headers: Vec::new(),
                    stage: "jq".into(),
                    class: "jq_error",
                    message: "failed".into(),
                    attempts: 1,
                })
                .collect();
            dl.park(letters, vec![token]);
        };

        park(0, 5);
        assert!(
            dl.flush(Duration::from_secs(30)).await,
            "first letters settle"
        );
        assert_eq!(
            partition.watermark(),
            Some(5),
            "stored letters let the partition pass"
        );
        assert!(!dl.fatal());

        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
        );
        park(5, 5);
        assert!(
            dl.flush(Duration::from_secs(30)).await,
            "second letters settle"
        );
        assert!(
            dl.fatal(),
            "the dead-letter producer's fatal error is reported"
        );
        assert_eq!(
            partition.watermark(),
            Some(5),
            "nothing after it is committed"
        );
        assert!(
            !partition.is_stalled(),
            "the letters' partition is not stalled for the producer's failure"
        );
    }
}
