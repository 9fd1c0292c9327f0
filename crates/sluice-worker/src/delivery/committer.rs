//! The committer of at-least-once delivery: commits, per partition, the tracker's
//! contiguous watermark, only when it moved ([`Ledger`]). Periodically (asynchronously to
//! the data path) and synchronously on revoke and shutdown.

use std::sync::Arc;
use std::time::Instant;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use crate::delivery::Ledger;
use crate::engine::partition::{PartitionState, TopicPartition};
use crate::kafka::consumer::SluiceConsumer;

/// A commit handed to librdkafka and not answered yet.
struct InFlight {
    started: Instant,
    generation: u64,
    todo: Vec<(Arc<PartitionState>, i64)>,
    handle: tokio::task::JoinHandle<Result<(), KafkaError>>,
}

/// The answer to one commit.
#[derive(Debug)]
pub struct CommitResult {
    /// The coordinator's generation (see [`Committer::start`]) when the commit started.
    pub generation: u64,
    /// Partitions committed, or why not.
    pub result: Result<usize, String>,
}

/// Commits watermarks for one consumer, at most one commit at a time.
///
/// librdkafka cannot cancel a commit: one that waits for an absent group coordinator stays
/// outstanding, and while commits are outstanding it does not finish an unassign, rejoin
/// or start new partitions. So a commit is started only when the previous one has
/// answered; the caller stops *waiting* at its deadline, but does not pile up more.
pub struct Committer {
    consumer: Arc<SluiceConsumer>,
    /// Last committed offset per partition, with the incarnation it belongs to.
    last: Ledger,
    latency: prometheus::Histogram,
    failures: prometheus::IntCounter,
    in_flight: Option<InFlight>,
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
            last: Ledger::default(),
            latency,
            failures,
            in_flight: None,
        }
    }

    /// How long the commit in flight has been waiting, if one is.
    pub fn pending_for(&self) -> Option<std::time::Duration> {
        self.in_flight.as_ref().map(|f| f.started.elapsed())
    }

    /// Start committing every partition in `parts` whose watermark moved (retired
    /// incarnations included: a revoke's drain commits them), unless a commit is still in
    /// flight. Returns whether one was started. `generation` is handed back with the
    /// answer. With `force`, watermarks that did not move are committed again (a probe of
    /// the coordinator).
    pub fn start(&mut self, parts: &[Arc<PartitionState>], generation: u64, force: bool) -> bool {
        if self.in_flight.is_some() {
            return false;
        }
        let todo = self.last.moved(parts, force);
        if todo.is_empty() {
            return false;
        }
        let mut tpl = TopicPartitionList::with_capacity(todo.len());
        for (s, o) in &todo {
            if let Err(e) =
                tpl.add_partition_offset(&s.tp().topic, s.tp().partition, Offset::Offset(*o))
            {
                tracing::error!(error = %e, "cannot build the commit");
                return false;
            }
        }
        let consumer = self.consumer.clone();
        let handle = tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync));
        self.in_flight = Some(InFlight {
            started: Instant::now(),
            generation,
            todo,
            handle,
        });
        true
    }

    /// Wait for the commit in flight to answer. Cancel-safe: dropping the future leaves
    /// the commit in flight. Pending forever when there is none.
    pub async fn answered(&mut self) -> CommitResult {
        let Some(f) = self.in_flight.as_mut() else {
            return std::future::pending().await;
        };
        let res = (&mut f.handle).await;
        let f = self.in_flight.take().expect("in flight");
        self.latency.observe(f.started.elapsed().as_secs_f64());
        let result = match res {
            Ok(Ok(())) => {
                for (s, o) in &f.todo {
                    // Keyed with the incarnation: a late answer for an older one does not
                    // count as a commit of the current one.
                    self.last.record(s, *o);
                    s.metrics.committed.set(*o);
                }
                Ok(f.todo.len())
            }
            Ok(Err(e)) => {
                self.failures.inc();
                Err(e.to_string())
            }
            Err(e) => {
                self.failures.inc();
                Err(format!("commit task failed: {e}"))
            }
        };
        CommitResult {
            generation: f.generation,
            result,
        }
    }

    /// Wait for the commit in flight until `deadline`: `None` when it is still pending
    /// then (or there is none).
    pub async fn answered_by(&mut self, deadline: tokio::time::Instant) -> Option<CommitResult> {
        self.in_flight.as_ref()?;
        tokio::time::timeout_at(deadline, self.answered())
            .await
            .ok()
    }

    /// Commit what moved in `parts` now and wait for the answer until `deadline` (after
    /// the answer to a commit already in flight, within the same deadline).
    pub async fn commit_by(
        &mut self,
        parts: &[Arc<PartitionState>],
        generation: u64,
        deadline: tokio::time::Instant,
    ) -> Result<usize, String> {
        if self.in_flight.is_some() && self.answered_by(deadline).await.is_none() {
            return Err("the previous commit is still unanswered".into());
        }
        if !self.start(parts, generation, false) {
            return Ok(0);
        }
        match self.answered_by(deadline).await {
            Some(r) => r.result,
            None => Err("no answer before the deadline (left in flight)".into()),
        }
    }

    /// Forget a partition this process no longer owns.
    pub fn forget(&mut self, tp: &TopicPartition) {
        self.last.forget(tp);
    }
}
