//! Why a reconcile failed: transient errors, retried with a backoff. An invalid spec, a
//! missing topic or a refused child is not an error but a condition (`reconcile/status.rs`).

/// Why a reconcile failed (transiently; an invalid spec is not an error but a condition).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API.
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    /// A Secret the pipeline refers to is missing or lacks the key.
    #[error("secret {0}: {1}")]
    Secret(String, String),
    /// The key of the Secret digests (the controller's own Secret) is unusable.
    #[error("the Secret digests' key: {0}")]
    DigestKey(String),
    /// Kafka could not be reached.
    #[error("kafka: {0}")]
    Kafka(String),
}

impl Error {
    /// A bounded label for metrics and Events.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::Secret(..) => "secret",
            Error::DigestKey(_) => "digest_key",
            Error::Kafka(_) => "kafka",
        }
    }
}

/// The controller's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
