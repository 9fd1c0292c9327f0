//! librdkafka client configuration shared by the consumer and the Kafka sink.

use rdkafka::ClientConfig;
use sluice_api::config::SecurityConfig;

/// Why a client could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The SASL password variable is not set.
    #[error("SASL is configured but the environment variable `{0}` (source.security.passwordEnv) is not set")]
    MissingPassword(String),
}

/// Bootstrap servers plus security settings. The SASL password is read from the
/// environment variable named in the config, never from the file.
pub fn base_config(
    bootstrap: &str,
    security: &SecurityConfig,
    client_id: &str,
) -> Result<ClientConfig, ClientError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("client.id", client_id)
        .set("security.protocol", security.protocol.as_librdkafka());
    if let Some(m) = security.sasl_mechanism {
        let password = std::env::var(&security.password_env)
            .map_err(|_| ClientError::MissingPassword(security.password_env.clone()))?;
        c.set("sasl.mechanism", m.as_librdkafka())
            .set(
                "sasl.username",
                security.username.clone().unwrap_or_default(),
            )
            .set("sasl.password", password);
    }
    if let Some(ca) = &security.ca_file {
        c.set("ssl.ca.location", ca);
    }
    Ok(c)
}
