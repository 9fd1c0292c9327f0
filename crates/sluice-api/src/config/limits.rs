//! The limits of one worker: its pool per partition (`workers`), sink batches (`batching`),
//! offset commits and drains (`commit`), memory (`memory`) and its HTTP server (`server`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::rules::{MAX_MESSAGES, PER_PARTITION, QUEUE_CAPACITY};
use super::ConfigError;
use crate::units::{ByteSize, HumanDuration};

/// How records of one partition are spread over its workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Ordering {
    /// One lane per partition: strict offset order (only one worker runs).
    Partition,
    /// `hash(key) % perPartition`: order is kept per key.
    #[default]
    Key,
    /// Any free worker; no order is promised.
    Unordered,
}

/// The fixed worker pool of each partition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkersConfig {
    /// Workers per assigned partition (1 to 256).
    #[serde(default = "default_per_partition")]
    #[schemars(range(min = PER_PARTITION.min, max = PER_PARTITION.max))]
    pub per_partition: u32,
    /// Records a partition may hold in its channel before it is paused in the consumer.
    /// It resumes when the channel is down to half of this.
    #[serde(default = "default_queue_capacity")]
    #[schemars(range(min = QUEUE_CAPACITY.min, max = QUEUE_CAPACITY.max))]
    pub queue_capacity: u32,
    /// How records are spread over the workers.
    #[serde(default)]
    pub ordering: Ordering,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig {
            per_partition: default_per_partition(),
            queue_capacity: default_queue_capacity(),
            ordering: Ordering::default(),
        }
    }
}

/// When a sink's batch is flushed: whichever limit is reached first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchingConfig {
    /// Outputs per batch.
    #[serde(default = "default_max_messages")]
    #[schemars(range(min = MAX_MESSAGES.min, max = MAX_MESSAGES.max))]
    pub max_messages: u32,
    /// Payload bytes per batch.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// How long the first output of a batch may wait for company.
    #[serde(default = "default_linger")]
    pub linger: HumanDuration,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_messages: default_max_messages(),
            max_bytes: default_max_bytes(),
            linger: default_linger(),
        }
    }
}

/// Offset commits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CommitConfig {
    /// How often the contiguous watermarks are committed.
    #[serde(default = "default_commit_interval")]
    pub interval: HumanDuration,
    /// How long a revoke or a shutdown waits for in-flight work before committing.
    /// Must be shorter than `source.sessionTimeout`.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: HumanDuration,
}

impl Default for CommitConfig {
    fn default() -> Self {
        CommitConfig {
            interval: default_commit_interval(),
            drain_timeout: default_drain_timeout(),
        }
    }
}

/// Memory bounds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemoryConfig {
    /// Payload bytes that may be in flight (dispatched, not yet acknowledged) across all
    /// partitions. When it is spent, dispatch waits and partitions pause.
    #[serde(default = "default_in_flight_bytes")]
    pub in_flight_bytes: ByteSize,
    /// librdkafka's prefetch buffer, in total: split over the input topic's partitions
    /// (`queued.max.messages.kbytes` per partition); also the largest fetch response.
    #[serde(default = "default_fetch_buffer")]
    pub fetch_buffer: ByteSize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            in_flight_bytes: default_in_flight_bytes(),
            fetch_buffer: default_fetch_buffer(),
        }
    }
}

/// The HTTP server for /metrics, /healthz and /readyz.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `/healthz` fails when an owned partition that has records to fetch and is not held
    /// on purpose (backpressure, a stall, a drain, a commit-failure hold) has received
    /// nothing for this long.
    #[serde(default = "default_fetch_stall_timeout")]
    pub fetch_stall_timeout: HumanDuration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            fetch_stall_timeout: default_fetch_stall_timeout(),
        }
    }
}

fn default_fetch_stall_timeout() -> HumanDuration {
    HumanDuration::from_millis(180_000)
}
fn default_per_partition() -> u32 {
    5
}
fn default_queue_capacity() -> u32 {
    4096
}
fn default_max_messages() -> u32 {
    5000
}
fn default_max_bytes() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_linger() -> HumanDuration {
    HumanDuration::from_millis(5)
}
fn default_commit_interval() -> HumanDuration {
    HumanDuration::from_millis(1000)
}
fn default_drain_timeout() -> HumanDuration {
    HumanDuration::from_millis(10_000)
}
fn default_in_flight_bytes() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_fetch_buffer() -> ByteSize {
    ByteSize(8 << 20)
}
fn default_listen() -> String {
    "0.0.0.0:9095".into()
}

impl WorkersConfig {
    /// The checks of `workers`.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        let WorkersConfig {
            per_partition,
            queue_capacity,
            ordering: _,
        } = self;
        PER_PARTITION.check("workers.perPartition", *per_partition)?;
        QUEUE_CAPACITY.check("workers.queueCapacity", *queue_capacity)
    }
}

impl BatchingConfig {
    /// The checks of `batching`.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        let BatchingConfig {
            max_messages,
            max_bytes,
            linger,
        } = self;
        MAX_MESSAGES.check("batching.maxMessages", *max_messages)?;
        if max_bytes.0 < 1024 {
            return Err(ConfigError::invalid(
                "batching.maxBytes",
                format!("must be at least 1KiB, got {max_bytes}"),
            ));
        }
        if linger.0.as_secs() > 60 {
            return Err(ConfigError::invalid(
                "batching.linger",
                format!("must be at most 60s, got {linger}"),
            ));
        }
        Ok(())
    }
}

impl CommitConfig {
    /// The checks of `commit`; a drain must end inside the group session (`session`).
    pub(super) fn check(&self, session: HumanDuration) -> Result<(), ConfigError> {
        let CommitConfig {
            interval,
            drain_timeout,
        } = self;
        if interval.0.as_millis() < 10 {
            return Err(ConfigError::invalid(
                "commit.interval",
                format!("must be at least 10ms, got {interval}"),
            ));
        }
        if drain_timeout.0 >= session.0 {
            return Err(ConfigError::invalid(
                "commit.drainTimeout",
                format!(
                    "must be shorter than source.sessionTimeout ({session}), got {drain_timeout}: a drain that outlives the session gets the member fenced"
                ),
            ));
        }
        Ok(())
    }
}

impl MemoryConfig {
    /// The checks of `memory`; the in-flight budget must hold one batch (`batch`).
    pub(super) fn check(&self, batch: ByteSize) -> Result<(), ConfigError> {
        let MemoryConfig {
            in_flight_bytes,
            fetch_buffer: _,
        } = self;
        if in_flight_bytes.0 < (1 << 20) {
            return Err(ConfigError::invalid(
                "memory.inFlightBytes",
                format!("must be at least 1MiB, got {in_flight_bytes}"),
            ));
        }
        if in_flight_bytes.0 < batch.0 {
            return Err(ConfigError::invalid(
                "memory.inFlightBytes",
                format!("must be at least batching.maxBytes ({batch}), got {in_flight_bytes}"),
            ));
        }
        Ok(())
    }
}

impl ServerConfig {
    /// The checks of `server`.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        let ServerConfig {
            listen,
            fetch_stall_timeout,
        } = self;
        if fetch_stall_timeout.0.as_secs() < 10 {
            return Err(ConfigError::invalid(
                "server.fetchStallTimeout",
                format!("must be at least 10s, got {fetch_stall_timeout}"),
            ));
        }
        if listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "server.listen",
                format!("`{listen}` is not an ip:port address"),
            ));
        }
        Ok(())
    }
}
