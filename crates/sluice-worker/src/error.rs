//! Why a pipeline stopped with an error.

use crate::delivery::exactly_once::TxnError;
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
    /// The PostgreSQL sink could not start.
    #[error(transparent)]
    Postgres(#[from] PostgresSetupError),
    /// A fatal producer or consumer error; restart resumes from the last commit.
    #[error("fatal {0} error; restarting resumes from the last committed offsets")]
    Fatal(&'static str),
    /// exactly-once: a transaction failed and was aborted (see `delivery/exactly_once.rs`).
    #[error("transaction aborted ({0}); restarting resumes from the offsets of the last committed transaction")]
    Transaction(#[from] TxnError),
}
