//! The controller's side of Kafka access: per distinct connection (bootstrap servers plus
//! security, password included), one queue and one task that gathers the queries of the
//! reconciles running at about the same time into one batch, and hands the batch to the
//! [`KafkaInspector`] on a blocking thread. One batch runs at a time per connection, so the
//! request rate to each Kafka is bounded by the batch cadence, whatever the number of
//! pipelines. A connection no pipeline uses any more is dropped with its client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use rdkafka::ClientConfig;
use tokio::sync::{mpsc, oneshot};

use super::{Answer, Connection, ConnectionKey, KafkaInspector, Query, Requests};
use crate::autoscale::lag::LagError;

/// How long a batch waits for more queries after its first one.
pub const LINGER: Duration = Duration::from_millis(100);
/// The most queries in one batch.
pub const MAX_BATCH: usize = 2_000;

struct Pending {
    query: Query,
    reply: oneshot::Sender<Answer>,
}

struct Lane {
    tx: mpsc::UnboundedSender<Pending>,
}

/// Counters of the Kafka side (shared with the registry).
#[derive(Clone)]
pub struct KafkaMetrics {
    /// Requests, by kind.
    pub requests: Requests,
    /// Batches run.
    pub batches: IntCounter,
    /// Queries answered.
    pub queries: IntCounter,
    /// Open connections (one client each).
    pub connections: IntGauge,
}

/// Kafka reads, batched per connection.
pub struct Reads {
    inspector: Arc<dyn KafkaInspector>,
    lanes: Mutex<HashMap<ConnectionKey, Lane>>,
    metrics: KafkaMetrics,
}

impl Reads {
    /// Reads through `inspector`, counted in `metrics`.
    pub fn new(inspector: Arc<dyn KafkaInspector>, metrics: KafkaMetrics) -> Self {
        Reads {
            inspector,
            lanes: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Ask `query` of the Kafka that `key` and `config` name.
    pub async fn ask(&self, key: &ConnectionKey, config: &ClientConfig, query: Query) -> Answer {
        let (reply, answer) = oneshot::channel();
        let mut pending = Some(Pending { query, reply });
        {
            let mut lanes = self.lanes.lock().expect("lanes lock");
            if let Some(lane) = lanes.get(key) {
                match lane.tx.send(pending.take().expect("pending")) {
                    Ok(()) => {}
                    Err(mpsc::error::SendError(p)) => {
                        lanes.remove(key);
                        pending = Some(p);
                    }
                }
            }
            if let Some(p) = pending.take() {
                let lane = self.open(key.clone(), config.clone());
                let _ = lane.tx.send(p);
                lanes.insert(key.clone(), lane);
                self.metrics.connections.set(lanes.len() as i64);
            }
        }
        answer.await.unwrap_or_else(|_| {
            let e = LagError::from(rdkafka::error::KafkaError::Canceled);
            Answer {
                partitions: Err(e.clone()),
                lag: Some(Err(e)),
            }
        })
    }

    /// Drop the connections for which `in_use` says no (with their clients).
    pub fn retain(&self, in_use: impl Fn(&ConnectionKey) -> bool) {
        let mut lanes = self.lanes.lock().expect("lanes lock");
        lanes.retain(|k, _| in_use(k));
        self.metrics.connections.set(lanes.len() as i64);
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.lanes.lock().expect("lanes lock").len()
    }

    fn open(&self, key: ConnectionKey, config: ClientConfig) -> Lane {
        let (tx, mut rx) = mpsc::unbounded_channel::<Pending>();
        let inspector = self.inspector.clone();
        let metrics = self.metrics.clone();
        let connection = Arc::new(Connection::new(key, config, metrics.requests.clone()));
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                let until = tokio::time::Instant::now() + LINGER;
                while batch.len() < MAX_BATCH {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(p)) => batch.push(p),
                        _ => break,
                    }
                }
                let (queries, replies): (Vec<Query>, Vec<oneshot::Sender<Answer>>) =
                    batch.into_iter().map(|p| (p.query, p.reply)).unzip();
                let (i, c) = (inspector.clone(), connection.clone());
                let n = queries.len();
                let answers = tokio::task::spawn_blocking(move || i.read(&c, &queries)).await;
                metrics.batches.inc();
                metrics.queries.inc_by(n as u64);
                match answers {
                    Ok(answers) => {
                        for (reply, a) in replies.into_iter().zip(answers) {
                            let _ = reply.send(a);
                        }
                    }
                    // The replies drop: every asker sees "cancelled", an unknown lag.
                    Err(e) => tracing::warn!(error = %e, "a Kafka batch did not complete"),
                }
            }
            // The lane was dropped: so is the connection's client, off the async threads
            // (librdkafka's destroy waits for its threads).
            tokio::task::spawn_blocking(move || drop(connection));
        });
        Lane { tx }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::autoscale::lag::PartitionLag;
    use crate::kafka::Topics;
    use sluice_api::config::StartFrom;

    /// Counts batches; every topic has 2 partitions and no lag.
    #[derive(Default)]
    struct Counting {
        batches: AtomicUsize,
    }

    impl KafkaInspector for Counting {
        fn partitions(&self, _: &ClientConfig, _: &str) -> Result<u32, LagError> {
            Ok(2)
        }
        fn lag(
            &self,
            _: &ClientConfig,
            _: &str,
            _: &str,
            _: StartFrom,
        ) -> Result<Vec<PartitionLag>, LagError> {
            Ok(Vec::new())
        }
        fn read(&self, connection: &Connection, queries: &[Query]) -> Vec<Answer> {
            self.batches.fetch_add(1, Ordering::SeqCst);
            queries
                .iter()
                .map(|q| Answer {
                    partitions: match &q.topics {
                        Topics::Names(n) => self.partitions(&connection.config, &n[0]),
                        Topics::Pattern(_) => Ok(0),
                    },
                    lag: None,
                })
                .collect()
        }
    }

    fn metrics() -> KafkaMetrics {
        let c = |n: &str| IntCounter::new(n, "test").unwrap();
        KafkaMetrics {
            requests: Requests {
                metadata: c("m"),
                list_offsets: c("l"),
                offset_fetch: c("o"),
            },
            batches: c("b"),
            queries: c("q"),
            connections: IntGauge::new("c", "test").unwrap(),
        }
    }

    #[tokio::test]
    async fn queries_asked_together_share_a_batch_and_an_unused_connection_goes() {
        let inspector = Arc::new(Counting::default());
        let reads = Arc::new(Reads::new(inspector.clone(), metrics()));
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", "a:9092");
        let key = ConnectionKey::of(&config);
        let asks = (0..100).map(|i| {
            let (reads, key, config) = (reads.clone(), key.clone(), config.clone());
            tokio::spawn(async move {
                let q = Query {
                    topics: Topics::one(format!("t{i}")),
                    lag: None,
                };
                reads.ask(&key, &config, q).await
            })
        });
        for a in futures::future::join_all(asks).await {
            assert_eq!(a.unwrap().partitions.unwrap(), 2);
        }
        let batches = inspector.batches.load(Ordering::SeqCst);
        assert!(
            batches < 5,
            "100 queries asked at once took {batches} batches"
        );
        assert_eq!(reads.connections(), 1);
        // Another Kafka is another connection.
        let mut other = ClientConfig::new();
        other.set("bootstrap.servers", "b:9092");
        let q = Query {
            topics: Topics::one("t"),
            lag: None,
        };
        reads.ask(&ConnectionKey::of(&other), &other, q).await;
        assert_eq!(reads.connections(), 2);
        reads.retain(|k| *k == key);
        assert_eq!(reads.connections(), 1);
    }
}
