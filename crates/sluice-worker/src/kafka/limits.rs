//! What the output topic refuses, enforced before an output is produced: its size limit
//! and, on a compacted topic, a record without a key.
//!
//! The broker refuses a whole produce batch (a record batch) larger than the topic's
//! `max.message.bytes`, so an oversized output sent to librdkafka takes its batch-mates
//! down with it (at-least-once: all dead-lettered; exactly-once: the transaction becomes
//! abortable and the window is aborted whole). Each Kafka sink therefore reads the topic's
//! effective `max.message.bytes` at start (DescribeConfigs returns the broker's
//! `message.max.bytes` when the topic has no override) and refuses an output whose
//! [`batch_size_alone`] is over it, synchronously, before it joins a batch or a
//! transaction: it goes to the dead-letter path with class `record_too_large` and nothing
//! else is touched.
//!
//! The rule, against librdkafka 2.12's source:
//! - The size compared is the *uncompressed* size of a record batch holding this record
//!   alone, with the largest framing librdkafka can write (`RD_KAFKAP_MSGSET_V2_SIZE` +
//!   `RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`, varints at their widest, every header counted).
//!   librdkafka sends a batch uncompressed when compression would make it larger
//!   (`rd_kafka_msgset_writer_compress`), so what is sent is never larger than this: an
//!   output that passes the check always fits. An output over the limit uncompressed that
//!   would fit compressed is refused too (the conservative side: raise the topic's limit
//!   for such outputs).
//! - A batch of several outputs: librdkafka closes a batch before a message would take it
//!   over `min(message.max.bytes, batch.size)` (`rd_kafka_msgset_writer_write_msgq`; only
//!   a batch's first message may overshoot, and alone it passed the check above), so the
//!   sinks cap their producer's `batch.size` at the limit ([`cap_batch_size`]).
//! - A compacted topic (`cleanup.policy` with `compact`) refuses a record without a key,
//!   and with it its whole produce batch (librdkafka 2.12 reports the culprit as
//!   `INVALID_RECORD` and its batch-mates as `_INVALID_DIFFERENT_RECORD`: not written). Such
//!   an output is refused here too, with class `invalid_record`, so no batch-mate is
//!   touched and no exactly-once window is aborted.
//! - The broker's refusal stays handled as before (a rule that could not be read, or
//!   changed while the worker runs, or another record validation of the broker's):
//!   at-least-once dead-letters the batch, exactly-once aborts and searches for the culprit.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

/// A record batch's header (v2): base offset, length, leader epoch, magic, CRC,
/// attributes, last offset delta, first/max timestamp, producer id/epoch, base sequence,
/// record count (`RD_KAFKAP_MSGSET_V2_SIZE`).
const BATCH_HEADER: usize = 8 + 4 + 4 + 1 + 4 + 2 + 4 + 8 + 8 + 8 + 2 + 4 + 4;
/// A record's framing at its widest (`RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`): length,
/// attributes, timestamp delta, offset delta, key length, value length, header count.
const RECORD_OVERHEAD: usize = 5 + 1 + 10 + 5 + 5 + 5 + 5;
/// A header's framing at its widest: key length and value length varints.
const HEADER_OVERHEAD: usize = 5 + 5;

/// The size of a record batch holding this record alone, uncompressed, at the widest
/// framing (an upper bound of what librdkafka sends for it).
pub fn batch_size_alone<'a>(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> usize {
    BATCH_HEADER
        + RECORD_OVERHEAD
        + key.map_or(0, <[u8]>::len)
        + value.map_or(0, <[u8]>::len)
        + headers
            .into_iter()
            .map(|(k, v)| HEADER_OVERHEAD + k.len() + v.map_or(0, <[u8]>::len))
            .sum::<usize>()
}

/// Cap `client`'s `batch.size` at `limit`, so no batch of several outputs is over it.
pub fn cap_batch_size(client: &mut ClientConfig, limit: usize) {
    // librdkafka's default batch.size is 1,000,000.
    let configured = client
        .get("batch.size")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1_000_000);
    if limit < configured {
        client.set("batch.size", limit.to_string());
    }
}

/// What an output topic refuses, as read at start (see the module's doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TopicRules {
    /// The topic's effective `max.message.bytes`, when it could be read.
    pub max_message_bytes: Option<usize>,
    /// True when the topic's `cleanup.policy` compacts: a record needs a key.
    pub compacted: bool,
}

/// Whether a `cleanup.policy` value (`delete`, `compact`, `compact,delete`) compacts.
fn compacts(policy: &str) -> bool {
    policy.split(',').any(|p| p.trim() == "compact")
}

/// The rules of `topic` (its own configuration or the broker's defaults); the default
/// (nothing known) when they cannot be read: then only the broker enforces them.
pub async fn topic_rules(client: &ClientConfig, topic: &str) -> TopicRules {
    let admin: AdminClient<DefaultClientContext> = match client.create() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(%topic, error = %e, "could not read the output topic's max.message.bytes and cleanup.policy; outputs it refuses are found by the broker's refusal");
            return TopicRules::default();
        }
    };
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let mut last = String::from("no answer");
    for attempt in 1..=3 {
        let res = admin
            .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
            .await;
        let rules = match res {
            Ok(rs) => rs.into_iter().next().and_then(|r| match r {
                // Each read on its own: a limit that does not parse still lets the
                // policy count, and the other way round.
                Ok(c) => Some(TopicRules {
                    max_message_bytes: c
                        .get("max.message.bytes")
                        .and_then(|e| e.value.as_deref())
                        .and_then(|v| v.parse::<usize>().ok()),
                    compacted: c
                        .get("cleanup.policy")
                        .and_then(|e| e.value.as_deref())
                        .is_some_and(compacts),
                }),
                Err(e) => {
                    last = e.to_string();
                    None
                }
            }),
            Err(e) => {
                last = e.to_string();
                None
            }
        };
        if let Some(r) = rules {
            tracing::info!(%topic, max_message_bytes = r.max_message_bytes, compacted = r.compacted,
                "outputs the output topic would refuse (over max.message.bytes; without a key on a compacted topic) are dead-lettered before they are produced");
            return r;
        }
        // Said at once, not after the last attempt: a broker that refuses the login or
        // the certificate answers nothing, and start-up would wait 30 s in silence.
        tracing::warn!(%topic, attempt, of = 3, error = %last, "reading the output topic's max.message.bytes and cleanup.policy failed (DescribeConfigs); is the broker reachable and are the credentials accepted?");
    }
    tracing::warn!(%topic, error = %last, "could not read the output topic's max.message.bytes and cleanup.policy; outputs it refuses are found by the broker's refusal");
    TopicRules::default()
}

/// The failure of an output refused by the size check.
pub fn too_large(size: usize, limit: usize) -> String {
    format!("the output is {size} bytes in a record batch alone, over the topic's max.message.bytes {limit}; refused before it was produced")
}

/// The failure of an output without a key, refused for a compacted topic.
pub const KEYLESS_ON_COMPACTED: &str = "the output has no key and the topic is compacted (cleanup.policy compact), which refuses records without a key; refused before it was produced";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_counts_the_widest_framing_key_value_and_headers() {
        let empty = batch_size_alone(None, None, []);
        assert_eq!(empty, 61 + 36);
        let h: [(&str, Option<&[u8]>); 1] = [("trace", Some(b"t/0/1"))];
        assert_eq!(
            batch_size_alone(Some(b"k"), Some(&[0; 100]), h),
            empty + 1 + 100 + 10 + 5 + 5
        );
    }

    #[test]
    fn compact_in_any_cleanup_policy_compacts() {
        assert!(compacts("compact"));
        assert!(compacts("compact,delete"));
        assert!(compacts("delete, compact"));
        assert!(!compacts("delete"));
        assert!(!compacts(""));
        assert!(!compacts("compaction"));
    }

    #[test]
    fn batch_size_is_capped_at_the_limit_never_raised() {
        let mut c = ClientConfig::new();
        c.set("batch.size", "1048576");
        cap_batch_size(&mut c, 100_000);
        assert_eq!(c.get("batch.size"), Some("100000"));
        cap_batch_size(&mut c, 2_000_000);
        assert_eq!(c.get("batch.size"), Some("100000"));
        let mut d = ClientConfig::new();
        cap_batch_size(&mut d, 100_000);
        assert_eq!(d.get("batch.size"), Some("100000"));
    }
}
