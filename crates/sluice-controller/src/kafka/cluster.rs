//! One long-lived librdkafka client per Kafka connection, and the batched read: one
//! metadata request for every topic of the batch, one offsets request (per partition
//! leader) for the low watermarks of all their partitions and one for the high ones, and
//! the groups' committed offsets with a bounded number of requests in flight.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::group_offsets::committed;
use super::{Answer, Query, Requests};
use crate::autoscale::lag::{explained, partition_lag, LagError, LastError, PartitionLag};

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
        let topics: BTreeSet<&str> = queries.iter().map(|q| q.topic.as_str()).collect();
        let failed = |e: LagError| Answer::all_failed(queries, &e);
        // 1. One metadata request: one topic by name, several as the whole list.
        requests.metadata.inc();
        let only = (topics.len() == 1).then(|| *topics.first().expect("one topic"));
        let md = match self.consumer.fetch_metadata(only, timeout) {
            Ok(md) => md,
            Err(e) => return failed(self.explained(e)),
        };
        let mut partitions: HashMap<&str, Vec<i32>> = HashMap::new();
        for t in md.topics() {
            if let Some(&name) = topics.get(t.name()) {
                if t.error().is_none() && !t.partitions().is_empty() {
                    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
                    ids.sort_unstable();
                    partitions.insert(name, ids);
                }
            }
        }
        // 2. Watermarks of every partition of every topic whose lag is asked for.
        let lag_topics: BTreeSet<&str> = queries
            .iter()
            .filter(|q| q.lag.is_some() && partitions.contains_key(q.topic.as_str()))
            .map(|q| q.topic.as_str())
            .collect();
        let mut all = TopicPartitionList::new();
        for t in &lag_topics {
            for &p in &partitions[t] {
                all.add_partition(t, p);
            }
        }
        let watermarks = if lag_topics.is_empty() {
            Ok(HashMap::new())
        } else {
            self.watermarks(&all, requests, timeout)
        };
        // 3. The groups' committed offsets, one read per distinct group.
        let mut groups: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for q in queries {
            if let (Some(l), true) = (&q.lag, lag_topics.contains(q.topic.as_str())) {
                groups
                    .entry(l.group.as_str())
                    .or_default()
                    .insert(q.topic.as_str());
            }
        }
        let reads: Vec<(String, TopicPartitionList)> = groups
            .iter()
            .map(|(g, ts)| {
                let mut tpl = TopicPartitionList::new();
                for t in ts {
                    for &p in &partitions[t] {
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
            .map(|q| {
                let topic = q.topic.as_str();
                let Some(ids) = partitions.get(topic) else {
                    let e = LagError::TopicNotFound(q.topic.clone());
                    return Answer {
                        partitions: Err(e.clone()),
                        lag: q.lag.as_ref().map(|_| Err(e)),
                    };
                };
                let lag = q.lag.as_ref().map(|l| {
                    let marks = watermarks.as_ref().map_err(Clone::clone)?;
                    let commits = offsets[l.group.as_str()]
                        .as_ref()
                        .map_err(|e| LagError::from(e.clone()))?;
                    ids.iter()
                        .map(|&p| {
                            let &(low, high) =
                                marks.get(&(topic.to_string(), p)).ok_or_else(|| {
                                    LagError::from(KafkaError::OffsetFetch(
                                        rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
                                    ))
                                })?;
                            let committed = commits.get(&(topic.to_string(), p)).copied().flatten();
                            Ok(PartitionLag {
                                partition: p,
                                low,
                                high,
                                committed,
                                lag: partition_lag(low, high, committed, l.start),
                            })
                        })
                        .collect::<Result<Vec<_>, LagError>>()
                });
                Answer {
                    partitions: Ok(ids.len() as u32),
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
