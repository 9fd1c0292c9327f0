//! Kafka access: partition counts and consumer lag. [`KafkaInspector`] is the seam tests
//! script; [`RdKafka`] is the real thing.

use std::time::Duration;

use rdkafka::ClientConfig;
use sluice_api::config::StartFrom;

use crate::autoscale::lag::{group_lag, partition_count, LagError, PartitionLag};

/// Reads partition counts and lag from Kafka. A trait so tests can substitute it.
pub trait KafkaInspector: Send + Sync + 'static {
    /// Partition count of the source topic.
    fn partitions(&self, config: &ClientConfig, topic: &str) -> Result<u32, LagError>;
    /// Lag of `group` on each partition of `topic`; `start` is where the group starts
    /// without a commit.
    fn lag(
        &self,
        config: &ClientConfig,
        group: &str,
        topic: &str,
        start: StartFrom,
    ) -> Result<Vec<PartitionLag>, LagError>;
}

/// The real inspector (rdkafka).
#[derive(Debug, Default)]
pub struct RdKafka;

impl KafkaInspector for RdKafka {
    fn partitions(&self, config: &ClientConfig, topic: &str) -> Result<u32, LagError> {
        partition_count(config, topic, Duration::from_secs(10)).map(|p| p as u32)
    }
    fn lag(
        &self,
        config: &ClientConfig,
        group: &str,
        topic: &str,
        start: StartFrom,
    ) -> Result<Vec<PartitionLag>, LagError> {
        group_lag(config, group, topic, start, Duration::from_secs(10))
    }
}
