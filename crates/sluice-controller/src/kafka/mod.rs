//! Kafka access: partition counts and consumer lag, shared per Kafka connection.
//!
//! - [`reads`]: the controller's side. Per distinct connection (bootstrap servers plus
//!   security, password included: [`ConnectionKey`]) one queue; the queries of reconciles
//!   running at about the same time become one batch, one batch at a time.
//! - [`KafkaInspector`]: the seam that answers a batch (tests script it; its default
//!   answers query by query through `partitions` and `lag`).
//! - [`RdKafka`] with [`cluster`]: the real one. One long-lived librdkafka client per
//!   connection, kept in the [`Connection`] (so it goes when the connection goes, and a
//!   changed password is another connection); per batch one metadata request for every
//!   topic, two offsets requests for the low and high watermarks of all their partitions,
//!   and the groups' committed offsets with a bounded number of requests in flight
//!   ([`group_offsets`]).
//!
//! A lag that could not be read is an error, never zero.

pub mod cluster;
mod group_offsets;
pub mod reads;

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::IntCounter;
use rdkafka::ClientConfig;
use sha2::{Digest, Sha256};
use sluice_api::config::{StartFrom, Subscription, TopicPattern};

use crate::autoscale::lag::{group_lag, partition_count, LagError, PartitionLag};
use cluster::Cluster;

/// How long one batch may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One question about a pipeline's input: the partition count of its topics, and the lag
/// of a group on them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The topics.
    pub topics: Topics,
    /// Also the lag of this group (`None`: the partition count only).
    pub lag: Option<LagOf>,
}

/// Which topics a pipeline reads: re-read from the cluster on every query, so a topic
/// that starts matching a pattern counts from the next poll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topics {
    /// These (one or more).
    Names(Vec<String>),
    /// Every topic whose whole name matches (`source.topicPattern`, validated).
    Pattern(String),
}

impl Topics {
    /// One topic.
    pub fn one(topic: impl Into<String>) -> Self {
        Topics::Names(vec![topic.into()])
    }

    /// What `subscription` reads.
    pub fn of(subscription: &Subscription) -> Self {
        match subscription {
            Subscription::Topics(t) => Topics::Names(t.clone()),
            Subscription::Pattern(p) => Topics::Pattern(p.as_str().to_string()),
        }
    }

    /// The topics of `all` (a cluster's topic names) this names or matches, and for names
    /// the first one `all` lacks.
    pub fn resolve<'a>(
        &'a self,
        all: &[&'a str],
        patterns: &mut HashMap<String, Option<TopicPattern>>,
    ) -> Result<Vec<&'a str>, LagError> {
        match self {
            Topics::Names(names) => {
                if let Some(missing) = names.iter().find(|n| !all.contains(&n.as_str())) {
                    return Err(LagError::TopicNotFound(missing.clone()));
                }
                Ok(names.iter().map(String::as_str).collect())
            }
            Topics::Pattern(p) => {
                let compiled = patterns
                    .entry(p.clone())
                    .or_insert_with(|| TopicPattern::new("source.topicPattern", p).ok());
                let matched: Vec<&str> = match compiled {
                    Some(c) => all.iter().copied().filter(|t| c.matches(t)).collect(),
                    None => Vec::new(),
                };
                if matched.is_empty() {
                    return Err(LagError::TopicNotFound(format!("/{p}/")));
                }
                Ok(matched)
            }
        }
    }
}

impl fmt::Display for Topics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topics::Names(t) => write!(f, "{}", t.join(",")),
            Topics::Pattern(p) => write!(f, "/{p}/"),
        }
    }
}

/// Whose lag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LagOf {
    /// The consumer group.
    pub group: String,
    /// Where the group starts without a commit.
    pub start: StartFrom,
}

/// The answer to a [`Query`].
#[derive(Clone, Debug)]
pub struct Answer {
    /// The topic's partition count.
    pub partitions: Result<u32, LagError>,
    /// The group's lag per partition, when asked for.
    pub lag: Option<Result<Vec<PartitionLag>, LagError>>,
}

impl Answer {
    /// `error` as the answer to every query (and to its lag, where asked).
    pub fn all_failed(queries: &[Query], error: &LagError) -> Vec<Answer> {
        queries
            .iter()
            .map(|q| Answer {
                partitions: Err(error.clone()),
                lag: q.lag.as_ref().map(|_| Err(error.clone())),
            })
            .collect()
    }
}

/// A distinct Kafka connection: a digest of the bootstrap servers and every security
/// setting, the password included (so a changed password is another connection, with a
/// new client, and the old one goes once unused). The digest never shows the password.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionKey(String);

impl ConnectionKey {
    /// The key of the librdkafka settings in `config`, secrets included (by value: the
    /// sanitized `config_map` shows a placeholder for every password).
    pub fn of(config: &ClientConfig) -> Self {
        let mut h = Sha256::new();
        // config_map is ordered by name: the same settings give the same key.
        for name in config.config_map().keys() {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(config.get(name).unwrap_or_default().as_bytes());
            h.update([0]);
        }
        ConnectionKey(
            h.finalize()
                .iter()
                .take(12)
                .map(|b| format!("{b:02x}"))
                .collect(),
        )
    }
}

impl fmt::Debug for ConnectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnectionKey({})", self.0)
    }
}

/// Kafka requests, by kind (counters of the controller's registry).
#[derive(Clone)]
pub struct Requests {
    /// Metadata requests.
    pub metadata: IntCounter,
    /// Offsets (ListOffsets) requests: each asks every partition leader once.
    pub list_offsets: IntCounter,
    /// Committed-offset (OffsetFetch) requests: one per group.
    pub offset_fetch: IntCounter,
}

/// One Kafka connection, as [`reads`] holds it while a pipeline uses it. The inspector
/// keeps its client for it here.
pub struct Connection {
    /// Which one.
    pub key: ConnectionKey,
    /// Its librdkafka settings.
    pub config: ClientConfig,
    /// Its request counters.
    pub requests: Requests,
    client: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Connection {
    /// A connection with no client yet.
    pub fn new(key: ConnectionKey, config: ClientConfig, requests: Requests) -> Self {
        Connection {
            key,
            config,
            requests,
            client: Mutex::new(None),
        }
    }

    /// Run `f` on the client of type `T` kept for this connection, made by `make` on first
    /// use (or when the one kept is of another type). A client `make` fails to build is
    /// not kept: the next call tries again.
    pub fn with_client<T: Any + Send, E, R>(
        &self,
        make: impl FnOnce(&ClientConfig) -> Result<T, E>,
        f: impl FnOnce(&T) -> R,
    ) -> Result<R, E> {
        let mut slot = self.client.lock().expect("connection client lock");
        if !slot.as_ref().is_some_and(|c| c.is::<T>()) {
            *slot = Some(Box::new(make(&self.config)?));
        }
        let client = slot
            .as_ref()
            .and_then(|c| c.downcast_ref::<T>())
            .expect("the client just kept");
        Ok(f(client))
    }
}

/// Reads partition counts and lag from Kafka. A trait so tests can substitute it.
pub trait KafkaInspector: Send + Sync + 'static {
    /// Partition count of one topic.
    fn partitions(&self, config: &ClientConfig, topic: &str) -> Result<u32, LagError>;
    /// Every topic's name (to match a pattern against); the default knows none.
    fn topic_names(&self, _config: &ClientConfig) -> Result<Vec<String>, LagError> {
        Ok(Vec::new())
    }
    /// Lag of `group` on each partition of `topic`; `start` is where the group starts
    /// without a commit.
    fn lag(
        &self,
        config: &ClientConfig,
        group: &str,
        topic: &str,
        start: StartFrom,
    ) -> Result<Vec<PartitionLag>, LagError>;
    /// Answer a batch of queries against one connection, in order. Blocking: called on a
    /// blocking thread. The default asks [`partitions`](Self::partitions) and
    /// [`lag`](Self::lag) query by query.
    fn read(&self, connection: &Connection, queries: &[Query]) -> Vec<Answer> {
        let config = &connection.config;
        let mut patterns = HashMap::new();
        queries
            .iter()
            .map(|q| {
                let names = match &q.topics {
                    Topics::Names(n) => Ok(n.clone()),
                    Topics::Pattern(_) => self.topic_names(config).and_then(|all| {
                        let all: Vec<&str> = all.iter().map(String::as_str).collect();
                        q.topics
                            .resolve(&all, &mut patterns)
                            .map(|m| m.into_iter().map(str::to_string).collect())
                    }),
                };
                let names = match names {
                    Ok(n) => n,
                    Err(e) => {
                        return Answer {
                            partitions: Err(e.clone()),
                            lag: q.lag.as_ref().map(|_| Err(e)),
                        }
                    }
                };
                let partitions = names
                    .iter()
                    .map(|t| self.partitions(config, t))
                    .sum::<Result<u32, LagError>>();
                let lag = q.lag.as_ref().map(|l| {
                    let mut all = Vec::new();
                    for t in &names {
                        all.extend(self.lag(config, &l.group, t, l.start)?);
                    }
                    Ok(all)
                });
                Answer { partitions, lag }
            })
            .collect()
    }
}

/// The real inspector (rdkafka).
#[derive(Debug, Default)]
pub struct RdKafka;

impl KafkaInspector for RdKafka {
    fn partitions(&self, config: &ClientConfig, topic: &str) -> Result<u32, LagError> {
        partition_count(config, topic, READ_TIMEOUT).map(|p| p as u32)
    }
    fn lag(
        &self,
        config: &ClientConfig,
        group: &str,
        topic: &str,
        start: StartFrom,
    ) -> Result<Vec<PartitionLag>, LagError> {
        group_lag(config, group, topic, start, READ_TIMEOUT)
    }
    /// The whole batch over the connection's one client.
    fn read(&self, connection: &Connection, queries: &[Query]) -> Vec<Answer> {
        connection
            .with_client(Cluster::new, |c| {
                c.read(queries, &connection.requests, READ_TIMEOUT)
            })
            .unwrap_or_else(|e| Answer::all_failed(queries, &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_its_servers_and_every_security_setting_the_password_included() {
        let base = || {
            let mut c = ClientConfig::new();
            c.set("bootstrap.servers", "kafka:9092")
                .set("security.protocol", "sasl_plaintext")
                .set("sasl.mechanism", "SCRAM-SHA-512")
                .set("sasl.username", "u")
                .set("sasl.password", "one");
            c
        };
        assert_eq!(ConnectionKey::of(&base()), ConnectionKey::of(&base()));
        let mut other_password = base();
        other_password.set("sasl.password", "two");
        assert_ne!(
            ConnectionKey::of(&base()),
            ConnectionKey::of(&other_password)
        );
        let mut other_user = base();
        other_user.set("sasl.username", "v");
        assert_ne!(ConnectionKey::of(&base()), ConnectionKey::of(&other_user));
        let mut other_servers = base();
        other_servers.set("bootstrap.servers", "kafka:9093");
        assert_ne!(
            ConnectionKey::of(&base()),
            ConnectionKey::of(&other_servers)
        );
    }
}
