//! The records that flow through a pipeline: what comes in, and what a processor emits.

use bytes::Bytes;

/// A record header: a name and an optional value.
pub type Header = (String, Option<Bytes>);

/// Owned copies of a librdkafka message's headers, in their order.
pub fn owned_headers<M: rdkafka::message::Message>(m: &M) -> Vec<Header> {
    use rdkafka::message::Headers;
    m.headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_string(), h.value.map(Bytes::copy_from_slice)))
                .collect()
        })
        .unwrap_or_default()
}

/// One input record, owned, as read from the source partition.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Source topic.
    pub topic: std::sync::Arc<str>,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Record timestamp in milliseconds since the epoch (create or log-append time),
    /// or `None` when the record has none.
    pub timestamp_ms: Option<i64>,
    /// The key, if any.
    pub key: Option<Bytes>,
    /// The value, if any (`None` is a tombstone).
    pub value: Option<Bytes>,
    /// Headers in their original order.
    pub headers: Vec<Header>,
}

/// What a record costs in the in-flight budget beyond its key and value: the record
/// itself, its output, its origin and the producer's copy. Measured: a Kafka-to-Kafka
/// pipeline of 100-byte records held about 580 bytes of RSS per record in flight while
/// its output was unreachable; without this charge the byte budget let small records
/// use several times the memory it names.
pub const RECORD_OVERHEAD: usize = 512;

impl Record {
    /// Decode a librdkafka message of `topic` into an owned record: key, value and
    /// headers copied as they are (no UTF-8 or JSON assumed; an absent value stays a
    /// tombstone, a null header value stays null), the timestamp of either kind.
    pub fn from_message<M: rdkafka::message::Message>(topic: &std::sync::Arc<str>, m: &M) -> Self {
        Record {
            topic: topic.clone(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key().map(Bytes::copy_from_slice),
            value: m.payload().map(Bytes::copy_from_slice),
            headers: owned_headers(m),
        }
    }

    /// Key plus value bytes.
    pub fn payload_len(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len) + self.value.as_ref().map_or(0, Bytes::len)
    }

    /// What this record costs in the in-flight budget (`memory.inFlightBytes`): its key
    /// and value plus [`RECORD_OVERHEAD`].
    pub fn budget_cost(&self) -> usize {
        self.payload_len() + RECORD_OVERHEAD
    }
}

/// Decodes up to a dispatch batch of librdkafka messages into owned records, copying every
/// key and value into **one** buffer per batch.
///
/// Copying each key and value into its own allocation cost two allocations per record, and
/// the first clone of such a buffer (a passthrough output, an [`Origin`]) a third and a
/// fourth: together with the frees on another thread this was the largest share of the
/// worker's CPU per record (BENCHMARKS.md, "Where the CPU goes"). Here a batch costs one
/// allocation for its bytes and one for the shared handle, and every clone is a reference
/// count. The buffer is freed when the last key or value of the batch is dropped, which
/// is when the batch's outputs are delivered: no later than the batch's budget permit.
///
/// The records are exactly those of [`Record::from_message`] (a property test checks it).
/// Keeping a record's key or value (a `Bytes`) alive keeps its batch's buffer alive: a
/// custom processor that stores keys for long should copy them.
#[derive(Debug, Default)]
pub struct RecordBatchBuilder {
    buf: Vec<u8>,
    metas: Vec<Meta>,
    /// A slowly decaying maximum of the batches' bytes: the next buffer starts this
    /// large, so a batch rarely grows (and copies) its buffer.
    hint: usize,
}

/// The most a batch buffer holds beyond the bytes of its records (reserved ahead, or left
/// over from growing): memory outside the byte budget, at most this much per partition.
const SLACK: usize = 64 << 10;

#[derive(Debug)]
struct Meta {
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<std::ops::Range<usize>>,
    value: Option<std::ops::Range<usize>>,
    headers: Vec<Header>,
}

impl RecordBatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// What a message costs in the in-flight budget: the same as
    /// [`Record::budget_cost`] of the record it becomes.
    pub fn budget_cost<M: rdkafka::message::Message>(m: &M) -> usize {
        m.key().map_or(0, <[u8]>::len) + m.payload().map_or(0, <[u8]>::len) + RECORD_OVERHEAD
    }

    /// Copy `m` in (key, value, headers, coordinates).
    pub fn push<M: rdkafka::message::Message>(&mut self, m: &M) {
        if self.buf.capacity() == 0 {
            // Room for a typical batch, but never more than SLACK ahead of what the
            // records charged to the budget hold: a reservation is memory the byte
            // budget does not see (a batch after a larger one, a record carried over).
            let need = m.key().map_or(0, <[u8]>::len) + m.payload().map_or(0, <[u8]>::len);
            self.buf.reserve(self.hint.min(SLACK).max(need));
        }
        let mut copy = |b: Option<&[u8]>| {
            b.map(|b| {
                let start = self.buf.len();
                self.buf.extend_from_slice(b);
                start..self.buf.len()
            })
        };
        let key = copy(m.key());
        let value = copy(m.payload());
        self.metas.push(Meta {
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key,
            value,
            headers: owned_headers(m),
        });
    }

    /// Messages pushed since the last [`RecordBatchBuilder::finish`].
    pub fn len(&self) -> usize {
        self.metas.len()
    }

    /// Nothing pushed since the last [`RecordBatchBuilder::finish`].
    pub fn is_empty(&self) -> bool {
        self.metas.is_empty()
    }

    /// The records of `topic`, in the order pushed; the builder is empty again.
    pub fn finish(&mut self, topic: &std::sync::Arc<str>) -> Vec<Record> {
        self.hint = self.buf.len().max(self.hint - self.hint / 8);
        // The buffer lives as long as the batch's outputs: give back growth slack beyond
        // SLACK, which the budget (charged per record) does not count.
        if self.buf.capacity() - self.buf.len() > SLACK {
            self.buf.shrink_to_fit();
        }
        let buf = Bytes::from(std::mem::take(&mut self.buf));
        self.metas
            .drain(..)
            .map(|m| Record {
                topic: topic.clone(),
                partition: m.partition,
                offset: m.offset,
                timestamp_ms: m.timestamp_ms,
                key: m.key.map(|r| buf.slice(r)),
                value: m.value.map(|r| buf.slice(r)),
                headers: m.headers,
            })
            .collect()
    }
}

/// One output of a processor, delivered to every sink of the pipeline.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Output {
    /// Output key (Kafka sinks partition by it).
    pub key: Option<Bytes>,
    /// Output value.
    pub value: Option<Bytes>,
    /// Output headers.
    pub headers: Vec<Header>,
}

impl Output {
    /// Key plus value bytes.
    pub fn payload_len(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len) + self.value.as_ref().map_or(0, Bytes::len)
    }
}

/// Where an output came from: its source record's coordinates, carried with the output
/// to the sinks for latency, tracing headers and the dead-letter headers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Origin {
    /// Source topic (shared with every record of its partition: a reference count, not a
    /// copy).
    pub topic: std::sync::Arc<str>,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Source record timestamp (ms since the epoch).
    pub timestamp_ms: Option<i64>,
    /// Source record key.
    pub key: Option<Bytes>,
    /// Which output of its record this is, from 0 (a processor may emit several).
    pub output: u32,
}

impl Origin {
    /// The same origin, for the record's output number `output`.
    pub fn output(mut self, output: usize) -> Self {
        self.output = u32::try_from(output).unwrap_or(u32::MAX);
        self
    }

    /// The origin of `record`.
    pub fn of(record: &Record) -> Self {
        Origin {
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            timestamp_ms: record.timestamp_ms,
            key: record.key.clone(),
            output: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rdkafka::message::{Header as KafkaHeader, OwnedHeaders, OwnedMessage, Timestamp};

    use super::*;

    fn bytes(max: usize) -> impl Strategy<Value = Option<Vec<u8>>> {
        prop::option::of(prop::collection::vec(any::<u8>(), 0..max))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(2000)))]
        /// Fuzz the record decoding: whatever librdkafka hands over (any bytes, absent or
        /// empty key and value, duplicate, empty-named and null headers, any timestamp
        /// kind and value) becomes a record holding exactly that, without a panic.
        #[test]
        fn fuzz_record_decoding_keeps_every_byte(
            key in bytes(300),
            value in bytes(3000),
            headers in prop::collection::vec(("\\PC{0,12}", bytes(40)), 0..8),
            ts in (0..3u8, any::<i64>()),
            partition in any::<i32>(),
            offset in any::<i64>(),
        ) {
            let timestamp = match ts.0 {
                0 => Timestamp::NotAvailable,
                1 => Timestamp::CreateTime(ts.1),
                _ => Timestamp::LogAppendTime(ts.1),
            };
            let kafka_headers = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(KafkaHeader { key: k.as_str(), value: v.as_deref() })
            });
            let m = OwnedMessage::new(
                value.clone(),
                key.clone(),
                "in".into(),
                timestamp,
                partition,
                offset,
                (!headers.is_empty()).then_some(kafka_headers),
            );
            let r = Record::from_message(&"in".into(), &m);
            prop_assert_eq!(r.key.as_deref(), key.as_deref());
            prop_assert_eq!(r.value.as_deref(), value.as_deref());
            prop_assert_eq!((r.partition, r.offset), (partition, offset));
            prop_assert_eq!(r.timestamp_ms, timestamp.to_millis());
            let got: Vec<(String, Option<Vec<u8>>)> = r
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.as_ref().map(|b| b.to_vec())))
                .collect();
            prop_assert_eq!(got, headers);
            prop_assert_eq!(
                r.budget_cost(),
                key.map_or(0, |k| k.len()) + value.map_or(0, |v| v.len()) + RECORD_OVERHEAD
            );
            prop_assert_eq!(RecordBatchBuilder::budget_cost(&m), r.budget_cost());
        }

        /// The batch builder (one buffer per batch) decodes exactly what
        /// `Record::from_message` decodes, message by message, across batches.
        #[test]
        fn the_batch_builder_decodes_like_from_message(
            batches in prop::collection::vec(prop::collection::vec((bytes(40), bytes(300), prop::collection::vec(("\\PC{0,6}", bytes(10)), 0..3)), 0..20), 1..4),
        ) {
            let topic: std::sync::Arc<str> = "in".into();
            let mut b = RecordBatchBuilder::new();
            let mut offset = 0;
            for batch in batches {
                let msgs: Vec<OwnedMessage> = batch.into_iter().map(|(key, value, headers)| {
                    offset += 1;
                    let h = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                        h.insert(KafkaHeader { key: k.as_str(), value: v.as_deref() })
                    });
                    OwnedMessage::new(value, key, "in".into(), Timestamp::CreateTime(offset), 3, offset,
                        (!headers.is_empty()).then_some(h))
                }).collect();
                for m in &msgs {
                    b.push(m);
                }
                prop_assert_eq!(b.len(), msgs.len());
                let got = b.finish(&topic);
                prop_assert!(b.is_empty());
                let want: Vec<Record> = msgs.iter().map(|m| Record::from_message(&topic, m)).collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}
