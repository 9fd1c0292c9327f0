//! Load generation and auditing for sluice, independent of the worker's code.
//!
//! - [`produce`] writes sequence-numbered JSON records at a chosen rate.
//! - [`audit`] reads a topic back and counts, per sequence number, how often it arrived:
//!   missing numbers are losses, extra copies are duplicates.
//! - [`offsets`] reads a group's committed offsets and the topic's end offsets.

pub mod offsets;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The JSON payload of record `seq`, padded with spaces inside a string to about `size`
/// bytes: `{"seq":42,"deviceId":"dev-42","tempC":21.5,"pad":"   "}`.
pub fn payload(seq: u64, size: usize) -> Vec<u8> {
    let temp = (seq % 400) as f64 / 10.0;
    let mut s = format!(
        r#"{{"seq":{seq},"deviceId":"dev-{}","tempC":{temp},"pad":""#,
        seq % 1000
    );
    while s.len() + 2 < size {
        s.push('.');
    }
    s.push_str("\"}");
    s.into_bytes()
}

/// The key of record `seq` (1000 distinct device keys).
pub fn key(seq: u64) -> String {
    format!("dev-{}", seq % 1000)
}

/// Find `"seq":N` in a payload without a full JSON parse.
pub fn parse_seq(payload: &[u8]) -> Option<u64> {
    let pat = b"\"seq\":";
    let pos = payload.windows(pat.len()).position(|w| w == pat)? + pat.len();
    let digits = payload[pos..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&payload[pos..pos + digits])
        .ok()?
        .parse()
        .ok()
}

/// The partition count of `topic` (an error when it does not exist).
pub fn partition_count(c: &BaseConsumer, topic: &str) -> anyhow::Result<i32> {
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let parts = md
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    if parts == 0 {
        bail!("topic {topic} does not exist");
    }
    Ok(parts as i32)
}

/// Create `topic` with `partitions` partitions; an existing topic is fine.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    create_topic_with(bootstrap, topic, partitions, &[]).await
}

/// [`create_topic`] with topic `config` (e.g. `max.message.bytes`) for a new topic.
pub async fn create_topic_with(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    config: &[(&str, &str)],
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("admin client")?;
    let mut t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for (k, v) in config {
        t = t.set(k, v);
    }
    let res = admin
        .create_topics(
            [&t],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .context("create topics")?;
    for r in res {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => bail!("cannot create topic {t}: {e}"),
        }
    }
    // Wait until the metadata shows every partition with a leader.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = c
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()
            .and_then(|m| {
                m.topics().first().map(|t| {
                    t.partitions().len() == partitions as usize
                        && t.partitions().iter().all(|p| p.leader() >= 0)
                })
            })
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("topic {topic} has no leaders after 30s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What to produce.
#[derive(Clone, Debug)]
pub struct ProduceSpec {
    /// Bootstrap servers.
    pub bootstrap: String,
    /// Topic.
    pub topic: String,
    /// First sequence number.
    pub from: u64,
    /// How many records.
    pub count: u64,
    /// Records per second; `None` for as fast as possible.
    pub rate: Option<f64>,
    /// Approximate payload size in bytes.
    pub size: usize,
    /// The generator's own `linger.ms` (it adds to measured end-to-end latency).
    pub linger_ms: u32,
}

/// Produce sequence-numbered records; `sent` counts acknowledged ones as they land.
/// Blocking: run it on a blocking thread.
pub fn produce(spec: &ProduceSpec, sent: &AtomicU64) -> anyhow::Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &spec.bootstrap)
        .set("linger.ms", spec.linger_ms.to_string())
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("enable.idempotence", "true")
        .create()
        .context("producer")?;
    let start = Instant::now();
    for i in 0..spec.count {
        let seq = spec.from + i;
        if let Some(rate) = spec.rate {
            // Pace in steps of about a millisecond: finer sleeps overshoot and turn a
            // steady rate into bursts.
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if due > now + Duration::from_millis(1) {
                std::thread::sleep(due - now);
            }
        }
        let p = payload(seq, spec.size);
        let k = key(seq);
        let mut rec = BaseRecord::to(&spec.topic).key(&k).payload(&p);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => bail!("produce failed: {e}"),
            }
        }
        sent.fetch_add(1, Ordering::Relaxed);
    }
    // Long enough to ride out a broker restart that the fault harness causes.
    producer.flush(Duration::from_secs(300)).context("flush")?;
    Ok(())
}

/// The result of reading a topic back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// Records read.
    pub read: u64,
    /// Distinct expected sequence numbers seen.
    pub distinct: u64,
    /// Copies beyond the first.
    pub duplicates: u64,
    /// Most copies of any one number.
    pub max_copies: u32,
    /// Missing numbers (first 20).
    pub missing_sample: Vec<u64>,
    /// How many are missing.
    pub missing: u64,
    /// Records whose payload had no sequence number.
    pub unparsable: u64,
}

impl AuditReport {
    /// True when every expected number arrived.
    pub fn complete(&self) -> bool {
        self.missing == 0
    }
}

impl std::fmt::Display for AuditReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "read {} records: {} distinct, {} missing{}, {} duplicates (max {} copies), {} unparsable",
            self.read,
            self.distinct,
            self.missing,
            if self.missing_sample.is_empty() { String::new() } else { format!(" e.g. {:?}", self.missing_sample) },
            self.duplicates,
            self.max_copies,
            self.unparsable
        )
    }
}

/// Read `topic` from the beginning until every number in `from..from+count` has been seen
/// or `timeout` passes, then report. Uses no consumer group. Blocking.
pub fn audit(
    bootstrap: &str,
    topic: &str,
    from: u64,
    count: u64,
    timeout: Duration,
) -> anyhow::Result<AuditReport> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "sluice-auditor")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let parts = partition_count(&c, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let mut copies = vec![0u32; count as usize];
    let mut r = AuditReport::default();
    let deadline = Instant::now() + timeout;
    while r.distinct < count && Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                r.read += 1;
                match m.payload().and_then(parse_seq) {
                    Some(s) if s >= from && s < from + count => {
                        let slot = &mut copies[(s - from) as usize];
                        *slot += 1;
                        if *slot == 1 {
                            r.distinct += 1;
                        }
                    }
                    Some(_) => {}
                    None => r.unparsable += 1,
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "audit read error"),
            None => {}
        }
    }
    // Drain what is already in the topic so duplicates are counted fully.
    let mut idle = 0;
    while idle < 3 {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                idle = 0;
                r.read += 1;
                if let Some(s) = m.payload().and_then(parse_seq) {
                    if s >= from && s < from + count {
                        copies[(s - from) as usize] += 1;
                    }
                }
            }
            _ => idle += 1,
        }
    }
    for (i, &n) in copies.iter().enumerate() {
        if n == 0 {
            r.missing += 1;
            if r.missing_sample.len() < 20 {
                r.missing_sample.push(from + i as u64);
            }
        } else {
            r.duplicates += (n - 1) as u64;
            r.max_copies = r.max_copies.max(n);
        }
    }
    r.distinct = count - r.missing;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_carries_its_sequence_number_and_size() {
        let p = payload(12345, 100);
        assert_eq!(p.len(), 100);
        assert_eq!(parse_seq(&p), Some(12345));
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["seq"], 12345);
        assert_eq!(parse_seq(b"{\"x\":1}"), None);
    }
}
