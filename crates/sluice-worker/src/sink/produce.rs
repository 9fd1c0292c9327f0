//! What the Kafka sinks (at-least-once [`super::kafka`], exactly-once
//! [`super::kafka_txn`]) and the dead-letter writer share, written once: which key and
//! headers an output is produced with ([`OutputTarget`], [`OutputRecord`]), the wait while
//! the producer's queue is full ([`while_queue_full`]), and the count of batches still
//! waiting for the broker that `flush` waits on ([`Outstanding`]).

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use sluice_api::config::{KafkaSinkConfig, KeySource};
use tokio::sync::Notify;

use crate::kafka::limits;
use crate::record::{Origin, Output};

/// How a Kafka sink turns an output into a record: its topic, the key it takes, the trace
/// header it adds, and what the topic refuses.
#[derive(Clone, Debug)]
pub struct OutputTarget {
    /// The output topic.
    pub topic: String,
    /// The output's key or its source record's.
    pub key: KeySource,
    /// The name of a header carrying `source-topic/partition/offset`, if any.
    pub trace_header: Option<String>,
    /// What the topic refuses (its `max.message.bytes`, whether it needs keys), as read
    /// at start.
    pub rules: limits::TopicRules,
    /// Encodes values in a schema registry's wire format (`format.schemaRegistry`).
    pub encoder: Option<std::sync::Arc<crate::format::encode::Encoder>>,
}

impl OutputTarget {
    /// The target of a sink `config`.
    pub fn new(config: &KafkaSinkConfig, rules: limits::TopicRules) -> Self {
        OutputTarget {
            topic: config.topic.clone(),
            key: config.key,
            trace_header: config.trace_header.clone(),
            rules,
            encoder: None,
        }
    }

    /// With values encoded by `encoder`.
    pub fn encoded(
        mut self,
        encoder: Option<std::sync::Arc<crate::format::encode::Encoder>>,
    ) -> Self {
        self.encoder = encoder;
        self
    }

    /// The record `output` (from `origin`) is produced as; with an encoder, the output's
    /// value in its wire format, or why it does not fit the schema (a tombstone stays one).
    pub fn record<'a>(
        &'a self,
        output: &'a Output,
        origin: &'a Origin,
    ) -> Result<OutputRecord<'a>, crate::sink::SinkFailure> {
        let value = match (&self.encoder, output.value.as_deref()) {
            (Some(e), Some(v)) => Some(Cow::Owned(e.encode(v).map_err(|message| {
                crate::sink::SinkFailure {
                    class: "schema_mismatch",
                    message,
                    attempts: 1,
                }
            })?)),
            (_, v) => v.map(Cow::Borrowed),
        };
        Ok(OutputRecord {
            key: match self.key {
                KeySource::Output => output.key.as_deref(),
                KeySource::Input => origin.key.as_deref(),
            },
            value,
            headers: &output.headers,
            trace: self.trace_header.as_deref().map(|name| {
                (
                    name,
                    format!("{}/{}/{}", origin.topic, origin.partition, origin.offset),
                )
            }),
        })
    }
}

/// One output as a Kafka record, borrowing the output.
#[derive(Debug)]
pub struct OutputRecord<'a> {
    /// The record key.
    pub key: Option<&'a [u8]>,
    /// The record value (encoded, with an encoder).
    pub value: Option<Cow<'a, [u8]>>,
    headers: &'a [crate::record::Header],
    trace: Option<(&'a str, String)>,
}

impl OutputRecord<'_> {
    /// The headers: the output's, then the trace header.
    pub fn headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        self.headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .chain(self.trace.iter().map(|(k, v)| (*k, Some(v.as_bytes()))))
    }

    /// The headers for the producer; `None` when there are none.
    pub fn kafka_headers(&self) -> Option<OwnedHeaders> {
        (!self.headers.is_empty() || self.trace.is_some()).then(|| {
            self.headers().fold(OwnedHeaders::new(), |h, (key, value)| {
                h.insert(Header { key, value })
            })
        })
    }

    /// Why the topic would refuse this record (and its whole produce batch with it), by
    /// `rules`: over its `max.message.bytes` alone (`record_too_large`), or without a key
    /// for a compacted topic (`invalid_record`). `None`: it may be produced.
    pub fn refused(&self, rules: &limits::TopicRules) -> Option<crate::sink::SinkFailure> {
        let failure = |class, message| crate::sink::SinkFailure {
            class,
            message,
            attempts: 1,
        };
        if rules.compacted && self.key.is_none() {
            return Some(failure(
                "invalid_record",
                limits::KEYLESS_ON_COMPACTED.to_string(),
            ));
        }
        let limit = rules.max_message_bytes?;
        let size = limits::batch_size_alone(self.key, self.value.as_deref(), self.headers());
        (size > limit).then(|| failure("record_too_large", limits::too_large(size, limit)))
    }
}

/// Offer `record` to `send` until the producer's queue has room: on `QueueFull` the
/// record comes back and is offered again after a backoff (200 µs, doubling to 50 ms).
/// Any other answer is returned.
pub async fn while_queue_full<R, T>(
    mut record: R,
    mut send: impl FnMut(R) -> Result<T, (KafkaError, R)>,
) -> Result<T, (KafkaError, R)> {
    let mut backoff = Duration::from_micros(200);
    loop {
        match send(record) {
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
            answer => return answer,
        }
    }
}

/// Batches handed to the broker and not yet settled: `flush` waits for zero.
#[derive(Debug, Default)]
pub struct Outstanding {
    count: AtomicUsize,
    idle: Notify,
}

impl Outstanding {
    /// One more batch outstanding.
    pub fn begin(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    /// A batch settled.
    pub fn end(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Wait until nothing is outstanding, up to `timeout`; false when something still is.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.count.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.count.load(Ordering::Acquire) == 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;

    fn target(key: KeySource, trace: Option<&str>) -> OutputTarget {
        OutputTarget {
            topic: "out".into(),
            key,
            trace_header: trace.map(String::from),
            rules: Default::default(),
            encoder: None,
        }
    }

    fn output() -> (Output, Origin) {
        (
            Output {
                key: Some(Bytes::from_static(b"k-out")),
                value: Some(Bytes::from_static(b"v")),
                headers: vec![("h".into(), Some(Bytes::from_static(b"1")))],
            },
            Origin {
                topic: "in".into(),
                partition: 3,
                offset: 42,
                timestamp_ms: None,
                key: Some(Bytes::from_static(b"k-in")),
                output: 0,
            },
        )
    }

    #[test]
    fn key_source_and_trace_header_shape_the_record() {
        let (o, origin) = output();
        let t = target(KeySource::Input, Some("sluice-source"));
        let r = t.record(&o, &origin).unwrap();
        assert_eq!(r.key, Some(&b"k-in"[..]));
        let h: Vec<_> = r.headers().collect();
        assert_eq!(
            h,
            vec![
                ("h", Some(&b"1"[..])),
                ("sluice-source", Some(&b"in/3/42"[..]))
            ]
        );
        let t = target(KeySource::Output, None);
        let r = t.record(&o, &origin).unwrap();
        assert_eq!(r.key, Some(&b"k-out"[..]));
        assert_eq!(r.headers().count(), 1);
        let bare = Output {
            headers: vec![],
            ..o.clone()
        };
        assert!(t.record(&bare, &origin).unwrap().kafka_headers().is_none());
    }

    #[test]
    fn over_the_limit_only_when_the_record_alone_is() {
        let (o, origin) = output();
        let t = target(KeySource::Output, None);
        let r = t.record(&o, &origin).unwrap();
        let limit = |l| limits::TopicRules {
            max_message_bytes: Some(l),
            compacted: false,
        };
        assert!(r.refused(&limits::TopicRules::default()).is_none());
        let f = r.refused(&limit(1)).expect("over 1 byte");
        assert_eq!(f.class, "record_too_large");
        let size = limits::batch_size_alone(r.key, r.value.as_deref(), r.headers());
        assert!(
            r.refused(&limit(size)).is_none(),
            "a record of exactly the limit fits"
        );
    }

    /// A compacted topic refuses a record without a key (and its produce batch with it):
    /// refused before it is produced; a keyed one, or any on a topic that does not
    /// compact, is not.
    #[test]
    fn a_keyless_output_is_refused_only_for_a_compacted_topic() {
        let (o, origin) = output();
        let compacted = limits::TopicRules {
            max_message_bytes: None,
            compacted: true,
        };
        let t = target(KeySource::Output, None);
        assert!(t.record(&o, &origin).unwrap().refused(&compacted).is_none());
        let keyless = Output {
            key: None,
            ..o.clone()
        };
        let r = t.record(&keyless, &origin).unwrap();
        assert_eq!(
            r.refused(&compacted).map(|f| f.class),
            Some("invalid_record")
        );
        assert!(r.refused(&limits::TopicRules::default()).is_none());
        // The key the sink takes is what counts: the input's here.
        let t = target(KeySource::Input, None);
        assert!(t
            .record(&keyless, &origin)
            .unwrap()
            .refused(&compacted)
            .is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_is_waited_out_other_errors_returned() {
        let mut tries = 0;
        let r: Result<u32, (KafkaError, u32)> = while_queue_full(7, |rec| {
            tries += 1;
            if tries < 4 {
                Err((
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    rec,
                ))
            } else {
                Ok(rec)
            }
        })
        .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(tries, 4);
        let r: Result<(), (KafkaError, u32)> = while_queue_full(7, |rec| {
            Err((
                KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                rec,
            ))
        })
        .await;
        assert!(matches!(r, Err((_, 7))));
    }

    #[tokio::test(start_paused = true)]
    async fn flush_waits_for_the_last_outstanding_batch() {
        let o = Arc::new(Outstanding::default());
        assert!(o.wait_idle(Duration::from_secs(1)).await);
        o.begin();
        o.begin();
        assert!(!o.wait_idle(Duration::from_secs(1)).await);
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.wait_idle(Duration::from_secs(60)).await });
        o.end();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        o.end();
        assert!(waiter.await.unwrap());
    }
}
