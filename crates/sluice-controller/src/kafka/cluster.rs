//! One long-lived librdkafka client per Kafka connection, and the batched read: one
//! metadata request for every topic of the batch (all topics when a pipeline reads by
//! pattern or several read different topics; each query's topics are resolved from it, so
//! a topic that starts matching a pattern counts from the next poll), one offsets request (per partition
//! leader) for the low watermarks of all their partitions and one for the high ones, and
//! the groups' committed offsets with a bounded number of requests in flight.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::group_offsets::committed;
use super::{Answer, Query, Requests, Topics};
use crate::autoscale::lag::{
    explained, partition_lag, uncommitted_start, LagError, LastError, PartitionLag,
};

/// A partition: topic and number.
type Tp = (String, i32);
/// Per partition, a group's committed offset (`None`: no commit).
type Commits = HashMap<Tp, Option<i64>>;

/// Group offset requests in flight at once on one connection.
pub const GROUPS_IN_FLIGHT: usize = 64;

/// A client of one Kafka connection (no group of its own: it reads every group's offsets
/// through the admin API).
pub struct Cluster {
    consumer: BaseConsumer<LastError>,
}

impl Cluster {
    /// A client for `config`.
    pub fn new(config: &ClientConfig) -> Result<Self, LagError> {
        let consumer = config.create_with_context(LastError::default())?;
        Ok(Cluster { consumer })
    }

    /// `e` with the client's last out-of-band error attached (a refused login, a TLS
    /// failure: the request itself only says "transport failure").
    fn explained(&self, e: KafkaError) -> LagError {
        explained(&self.consumer, e)
    }

    /// Answer `queries` with as few requests as the protocol allows.
    pub fn read(&self, queries: &[Query], requests: &Requests, timeout: Duration) -> Vec<Answer> {
        let failed = |e: LagError| Answer::all_failed(queries, &e);
        // 1. One metadata request: one topic by name, otherwise every topic (several
        //    names, or a pattern to match).
        let mut named: BTreeSet<&str> = BTreeSet::new();
        let mut pattern = false;
        for q in queries {
            match &q.topics {
                Topics::Names(n) => named.extend(n.iter().map(String::as_str)),
                Topics::Pattern(_) => pattern = true,
            }
        }
        requests.metadata.inc();
        let only = (!pattern && named.len() == 1).then(|| *named.first().expect("one topic"));
        let md = match self.consumer.fetch_metadata(only, timeout) {
            Ok(md) => md,
            Err(e) => return failed(self.explained(e)),
        };
        let mut partitions: HashMap<String, Vec<i32>> = HashMap::new();
        for t in md.topics() {
            if t.error().is_none() && !t.partitions().is_empty() {
                let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
                ids.sort_unstable();
                partitions.insert(t.name().to_string(), ids);
            }
        }
        let mut all: Vec<&str> = partitions.keys().map(String::as_str).collect();
        all.sort_unstable();
        let mut patterns = HashMap::new();
        let resolved: Vec<Result<Vec<&str>, LagError>> = queries
            .iter()
            .map(|q| q.topics.resolve(&all, &mut patterns))
            .collect();
        // 2. Watermarks of every partition of every topic whose lag is asked for.
        let mut lag_topics: BTreeSet<&str> = BTreeSet::new();
        // 3. ... and the groups' committed offsets, one read per distinct group.
        let mut groups: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (q, r) in queries.iter().zip(&resolved) {
            if let (Some(l), Ok(topics)) = (&q.lag, r) {
                lag_topics.extend(topics.iter().copied());
                groups
                    .entry(l.group.as_str())
                    .or_default()
                    .extend(topics.iter().copied());
            }
        }
        let mut every = TopicPartitionList::new();
        for t in &lag_topics {
            for &p in &partitions[*t] {
                every.add_partition(t, p);
            }
        }
        let watermarks = if lag_topics.is_empty() {
            Ok(HashMap::new())
        } else {
            self.watermarks(&every, requests, timeout)
        };
        let reads: Vec<(String, TopicPartitionList)> = groups
            .iter()
            .map(|(g, ts)| {
                let mut tpl = TopicPartitionList::new();
                for t in ts {
                    for &p in &partitions[*t] {
                        tpl.add_partition(t, p);
                    }
                }
                (g.to_string(), tpl)
            })
            .collect();
        requests.offset_fetch.inc_by(reads.len() as u64);
        let offsets: HashMap<&str, Result<Commits, KafkaError>> = groups
            .keys()
            .copied()
            .zip(
                committed(self.consumer.client(), &reads, GROUPS_IN_FLIGHT, timeout)
                    .into_iter()
                    .map(|r| r.map(|c| c.into_iter().map(|(t, p, o)| ((t, p), o)).collect())),
            )
            .collect();
        // 4. Answers.
        queries
            .iter()
            .zip(resolved)
            .map(|(q, r)| {
                let topics = match r {
                    Ok(t) => t,
                    Err(e) => {
                        return Answer {
                            partitions: Err(e.clone()),
                            lag: q.lag.as_ref().map(|_| Err(e)),
                        }
                    }
                };
                let count = topics.iter().map(|t| partitions[*t].len() as u32).sum();
                let lag = q.lag.as_ref().map(|l| {
                    let marks = watermarks.as_ref().map_err(Clone::clone)?;
                    let commits = offsets[l.group.as_str()]
                        .as_ref()
                        .map_err(|e| LagError::from(e.clone()))?;
                    // As the workers decide it: `latest` only while the group has no
                    // commit on any of these partitions.
                    let started = topics.iter().any(|t| {
                        partitions[*t].iter().any(|&p| {
                            commits
                                .get(&(t.to_string(), p))
                                .copied()
                                .flatten()
                                .is_some()
                        })
                    });
                    let start = uncommitted_start(l.start, started);
                    let mut out = Vec::new();
                    for topic in &topics {
                        let name: std::sync::Arc<str> = Arc::from(*topic);
                        for &p in &partitions[*topic] {
                            let key = (topic.to_string(), p);
                            let &(low, high) = marks.get(&key).ok_or_else(|| {
                                LagError::from(KafkaError::OffsetFetch(
                                    rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
                                ))
                            })?;
                            let committed = commits.get(&key).copied().flatten();
                            out.push(PartitionLag {
                                topic: name.clone(),
                                partition: p,
                                low,
                                high,
                                committed,
                                lag: partition_lag(low, high, committed, start),
                            });
                        }
                    }
                    Ok(out)
                });
                Answer {
                    partitions: Ok(count),
                    lag,
                }
            })
            .collect()
    }

    /// The low and high watermark of every partition in `all`: two offsets requests (per
    /// partition leader), for the log start and the end. A partition the broker could not
    /// answer for is left out (its topic's lag is then unknown).
    fn watermarks(
        &self,
        all: &TopicPartitionList,
        requests: &Requests,
        timeout: Duration,
    ) -> Result<HashMap<Tp, (i64, i64)>, LagError> {
        let at = |offset: Offset| -> Result<HashMap<(String, i32), i64>, LagError> {
            let mut tpl = all.clone();
            tpl.set_all_offsets(offset).map_err(LagError::from)?;
            requests.list_offsets.inc();
            let got = self
                .consumer
                .offsets_for_times(tpl, timeout)
                .map_err(|e| self.explained(e))?;
            Ok(got
                .elements()
                .iter()
                .filter(|e| e.error().is_ok())
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                    _ => None,
                })
                .collect())
        };
        let low = at(Offset::Beginning)?;
        let high = at(Offset::End)?;
        Ok(low
            .into_iter()
            .filter_map(|(k, l)| high.get(&k).map(|&h| (k, (l, h))))
            .collect())
    }
}
