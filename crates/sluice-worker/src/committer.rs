//! The committer: commits, per partition, the tracker's contiguous watermark, only when it
//! moved. Periodically (asynchronously to the data path) and synchronously on revoke and
//! shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use crate::consumer::SluiceConsumer;
use crate::partition::PartitionState;

/// Which partitions have a watermark beyond their last commit, and what to commit. Pure.
pub fn plan<'a>(
    parts: impl IntoIterator<Item = (&'a str, i32, Option<i64>)>,
    last: &HashMap<(String, i32), i64>,
) -> Vec<(String, i32, i64)> {
    parts
        .into_iter()
        .filter_map(|(t, p, wm)| {
            let wm = wm?;
            match last.get(&(t.to_string(), p)) {
                Some(&prev) if prev >= wm => None,
                _ => Some((t.to_string(), p, wm)),
            }
        })
        .collect()
}

/// Commits watermarks for one consumer.
pub struct Committer {
    consumer: Arc<SluiceConsumer>,
    last: HashMap<(String, i32), i64>,
    latency: prometheus::Histogram,
    failures: prometheus::IntCounter,
}

impl Committer {
    /// A committer for `consumer`.
    pub fn new(
        consumer: Arc<SluiceConsumer>,
        latency: prometheus::Histogram,
        failures: prometheus::IntCounter,
    ) -> Self {
        Committer {
            consumer,
            last: HashMap::new(),
            latency,
            failures,
        }
    }

    /// Commit every partition in `parts` whose watermark moved. Synchronous on the broker
    /// (run on a blocking thread); returns how many partitions were committed.
    pub async fn commit(&mut self, parts: &[Arc<PartitionState>]) -> Result<usize, KafkaError> {
        let todo = plan(
            parts
                .iter()
                .map(|s| (&*s.topic, s.partition, s.watermark())),
            &self.last,
        );
        if todo.is_empty() {
            return Ok(0);
        }
        let mut tpl = TopicPartitionList::with_capacity(todo.len());
        for (t, p, o) in &todo {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
        }
        let consumer = self.consumer.clone();
        let started = Instant::now();
        let res = tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .expect("commit task panicked");
        self.latency.observe(started.elapsed().as_secs_f64());
        match res {
            Ok(()) => {
                for (t, p, o) in &todo {
                    self.last.insert((t.clone(), *p), *o);
                    if let Some(s) = parts.iter().find(|s| &*s.topic == t && s.partition == *p) {
                        s.metrics.committed.set(*o);
                    }
                }
                Ok(todo.len())
            }
            Err(e) => {
                self.failures.inc();
                Err(e)
            }
        }
    }

    /// Forget a partition this process no longer owns.
    pub fn forget(&mut self, topic: &str, partition: i32) {
        self.last.remove(&(topic.to_string(), partition));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_watermarks_that_moved() {
        let mut last = HashMap::new();
        last.insert(("t".to_string(), 0), 100);
        last.insert(("t".to_string(), 1), 50);
        let got = plan(
            [
                ("t", 0, Some(100)),
                ("t", 1, Some(70)),
                ("t", 2, None),
                ("t", 3, Some(1)),
            ],
            &last,
        );
        assert_eq!(got, vec![("t".into(), 1, 70), ("t".into(), 3, 1)]);
    }
}
