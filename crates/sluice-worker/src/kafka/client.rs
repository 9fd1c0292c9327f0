//! librdkafka client configuration shared by the consumer, the Kafka sinks and the
//! dead-letter producer.

use rdkafka::ClientConfig;
use sluice_api::config::security::{MissingCredential, ProcessEnvironment};
use sluice_api::config::SecurityConfig;

/// Why a client could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A secret the security settings need is not in the environment.
    #[error(transparent)]
    MissingCredential(#[from] MissingCredential),
}

/// Bootstrap servers plus the security settings, built by
/// [`SecurityConfig::librdkafka`] (the controller's lag reads are configured by the same
/// code). Secrets come from the process environment, files by their path.
pub fn base_config(
    bootstrap: &str,
    security: &SecurityConfig,
    client_id: &str,
) -> Result<ClientConfig, ClientError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("client.id", client_id);
    for (k, v) in security.librdkafka(&ProcessEnvironment)? {
        c.set(k, v);
    }
    Ok(c)
}
