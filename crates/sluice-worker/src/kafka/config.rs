//! The Kafka clients' settings as the worker builds them: the bootstrap servers and
//! security ([`base_config`]) plus the properties of `sluice_api::config::clients`, the
//! lists the controller validates too.

use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::ClientConfig;
use sluice_api::config::{clients, Subscription, WorkerConfig};

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

/// How many partitions the input topics have together (a worker may own all of them),
/// asked with a short-lived client before the consumer is made; `None` when the broker
/// does not say. A pattern that matches nothing yet is 0: the consumer is then re-made,
/// sized, when topics come (`PipelineError::Resize`).
pub async fn input_partitions(config: &WorkerConfig) -> Option<usize> {
    let s = &config.source;
    let cfg = base_config(
        &s.bootstrap_servers,
        &s.security,
        &format!("sluice-{}-metadata", config.pipeline),
    )
    .ok()?;
    let subscription = s.subscription().ok()?;
    tokio::task::spawn_blocking(move || {
        let c: rdkafka::consumer::BaseConsumer = cfg.create().ok()?;
        for _ in 0..3 {
            if let Ok(parts) = subscribed_partitions(&c, &subscription, Duration::from_secs(10)) {
                return Some(parts.len());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// Every partition of every topic `subscription` reads now: one metadata request (for
/// the named topics, or for all topics to match a pattern). A named topic the broker does
/// not know (or reports an error for) is an error; a matching topic with an error (one
/// being created or deleted) is left out, and a pattern that matches nothing is an empty
/// list.
pub fn subscribed_partitions<C: rdkafka::consumer::ConsumerContext>(
    c: &impl Consumer<C>,
    subscription: &Subscription,
    timeout: Duration,
) -> Result<Vec<crate::engine::partition::TopicPartition>, String> {
    let only = match subscription.names() {
        Some([one]) => Some(one.as_str()),
        _ => None,
    };
    let md = c
        .fetch_metadata(only, timeout)
        .map_err(|e| format!("reading the topics' metadata: {e}"))?;
    let mut out = Vec::new();
    for t in md.topics() {
        if !subscription.reads(t.name()) {
            continue;
        }
        if let Some(e) = t.error() {
            if subscription.names().is_some() {
                return Err(format!("topic {}: {:?}", t.name(), e));
            }
            continue;
        }
        for p in t.partitions() {
            out.push(crate::engine::partition::TopicPartition::new(
                t.name(),
                p.id(),
            ));
        }
    }
    if let Some(names) = subscription.names() {
        if let Some(missing) = names
            .iter()
            .find(|n| !out.iter().any(|tp| &*tp.topic == n.as_str()))
        {
            return Err(format!(
                "topic {missing} has no partitions (does it exist?)"
            ));
        }
    }
    out.sort_by(|a, b| (&*a.topic, a.partition).cmp(&(&*b.topic, b.partition)));
    Ok(out)
}
