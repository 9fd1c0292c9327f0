//! The one registry of the partitions this process owns: the current incarnation of each,
//! with the task that feeds it. The coordinator writes it (assign, release); the consumer's
//! statistics callback reads it from librdkafka's thread (lag, fetch progress).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::engine::partition::{PartitionState, TopicPartition};

/// One owned partition: its current incarnation and its dispatcher.
#[derive(Debug)]
pub struct Entry {
    /// The incarnation's state.
    pub state: Arc<PartitionState>,
    /// Set to true to stop the dispatcher.
    pub stop: watch::Sender<bool>,
    /// The dispatcher task.
    pub dispatcher: JoinHandle<()>,
}

/// The owned partitions, shared between the coordinator and the consumer's context.
#[derive(Clone, Debug, Default)]
pub struct Registry(Arc<Mutex<HashMap<TopicPartition, Entry>>>);

impl Registry {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<TopicPartition, Entry>> {
        self.0.lock().expect("registry lock")
    }

    /// Record `entry` as the current incarnation of its partition; returns the entry it
    /// replaced, if one was there.
    pub fn insert(&self, entry: Entry) -> Option<Entry> {
        let tp = entry.state.tp().clone();
        self.map().insert(tp, entry)
    }

    /// Take the entry of `tp` out of the registry.
    pub fn take(&self, tp: &TopicPartition) -> Option<Entry> {
        self.map().remove(tp)
    }

    /// True while `tp` is owned.
    pub fn contains(&self, tp: &TopicPartition) -> bool {
        self.map().contains_key(tp)
    }

    /// The current incarnation of `tp`.
    pub fn state(&self, tp: &TopicPartition) -> Option<Arc<PartitionState>> {
        self.map().get(tp).map(|e| e.state.clone())
    }

    /// The current incarnation of every owned partition.
    pub fn states(&self) -> Vec<Arc<PartitionState>> {
        self.map().values().map(|e| e.state.clone()).collect()
    }

    /// Every owned partition.
    pub fn keys(&self) -> Vec<TopicPartition> {
        self.map().keys().cloned().collect()
    }

    /// How many partitions are owned.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// True when nothing is owned.
    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    /// Tell the dispatcher of `tp` to stop (it stays registered).
    pub fn stop(&self, tp: &TopicPartition) {
        if let Some(e) = self.map().get(tp) {
            let _ = e.stop.send(true);
        }
    }
}
