//! The Kafka clients' settings as the worker builds them: the bootstrap servers and
//! security ([`base_config`]) plus the properties of `sluice_api::config::clients`, the
//! lists the controller validates too.

use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::ClientConfig;
use sluice_api::config::{clients, WorkerConfig};

use crate::kafka::client::{base_config, ClientError};

/// How often librdkafka reports statistics (lag; a liveness rule).
pub const STATISTICS_INTERVAL: Duration = Duration::from_millis(clients::STATISTICS_INTERVAL_MS);

/// Partitions assumed when the broker does not tell how many the input topic has.
pub const ASSUMED_PARTITIONS: usize = 64;

/// `client` with `properties` set, in order.
pub fn with(mut client: ClientConfig, properties: Vec<clients::Property>) -> ClientConfig {
    for (k, v) in properties {
        client.set(k, v);
    }
    client
}

/// The group consumer's configuration for `config`, its prefetch sized for `partitions`.
pub fn consumer_config(
    config: &WorkerConfig,
    partitions: usize,
) -> Result<ClientConfig, ClientError> {
    let s = &config.source;
    let base = base_config(
        &s.bootstrap_servers,
        &s.security,
        &format!("sluice-{}", config.pipeline),
    )?;
    Ok(with(base, clients::consumer(config, partitions)))
}

/// How many partitions the input topic has (a worker may own all of them), asked with a
/// short-lived client before the consumer is made; `None` when the broker does not say.
pub async fn input_partitions(config: &WorkerConfig) -> Option<usize> {
    let s = &config.source;
    let cfg = base_config(
        &s.bootstrap_servers,
        &s.security,
        &format!("sluice-{}-metadata", config.pipeline),
    )
    .ok()?;
    let topic = s.topic.clone();
    tokio::task::spawn_blocking(move || {
        let c: rdkafka::consumer::BaseConsumer = cfg.create().ok()?;
        for _ in 0..3 {
            if let Ok(md) = c.fetch_metadata(Some(&topic), Duration::from_secs(10)) {
                if let Some(t) = md.topics().first().filter(|t| t.error().is_none()) {
                    if !t.partitions().is_empty() {
                        return Some(t.partitions().len());
                    }
                }
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}
