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

impl Record {
    /// Key plus value bytes: what this record costs in the in-flight budget.
    pub fn payload_len(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len) + self.value.as_ref().map_or(0, Bytes::len)
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
/// to the sinks for latency, tracing headers and the dead-letter headers. (The topic is
/// the pipeline's one source topic, so it is not carried per output.)
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Origin {
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Source record timestamp (ms since the epoch).
    pub timestamp_ms: Option<i64>,
    /// Source record key.
    pub key: Option<Bytes>,
}

impl Origin {
    /// The origin of `record`.
    pub fn of(record: &Record) -> Self {
        Origin {
            partition: record.partition,
            offset: record.offset,
            timestamp_ms: record.timestamp_ms,
            key: record.key.clone(),
        }
    }
}
