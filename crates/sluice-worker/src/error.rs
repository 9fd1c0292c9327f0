//! Why a pipeline stopped with an error.

use crate::delivery::exactly_once::TxnError;
use crate::sink::http::HttpSetupError;
use crate::sink::postgres::PostgresSetupError;

/// Why the pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A Kafka client could not be created or subscribed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Client configuration (e.g. a missing secret).
    #[error(transparent)]
    Client(#[from] crate::kafka::client::ClientError),
    /// The configuration does not hold (it is validated at start-up: a bug if seen).
    #[error(transparent)]
    Config(#[from] sluice_api::ConfigError),
    /// The PostgreSQL sink could not start.
    #[error(transparent)]
    Postgres(#[from] PostgresSetupError),
    /// The HTTP sink could not start.
    #[error(transparent)]
    Http(#[from] HttpSetupError),
    /// The schema registry client could not be made.
    #[error(transparent)]
    Registry(#[from] crate::format::registry::RegistrySetupError),
    /// A Kafka sink's schema could not be compiled or registered.
    #[error(transparent)]
    Encoder(#[from] crate::format::encode::EncoderSetupError),
    /// A fatal producer or consumer error; restart resumes from the last commit.
    #[error("fatal {0} error; restarting resumes from the last committed offsets")]
    Fatal(&'static str),
    /// exactly-once: a transaction failed and was aborted (see `delivery/exactly_once.rs`).
    #[error("transaction aborted ({0}); restarting resumes from the offsets of the last committed transaction")]
    Transaction(#[from] TxnError),
    /// A thread of the worker could not be started (which, and why).
    #[error("starting {0}")]
    Thread(String),
    /// The input topic grew: this worker owns more partitions than its consumer's
    /// prefetch was sized for. Not a failure: the pipeline is drained, committed and run
    /// again in the same process, its consumer sized for the topic as it is now.
    #[error("this worker owns {owned} partitions of the input topic, more than the {sized} its consumer's prefetch was sized for (partitions were added); draining and starting the consumer again, sized for the topic as it is now")]
    Resize {
        /// Partitions owned when it was noticed.
        owned: usize,
        /// Partitions the prefetch was sized for.
        sized: usize,
    },
}

impl PipelineError {
    /// A graceful stop to run the pipeline again ([`PipelineError::Resize`]), not a failure.
    pub fn is_resize(&self) -> bool {
        matches!(self, PipelineError::Resize { .. })
    }
}
