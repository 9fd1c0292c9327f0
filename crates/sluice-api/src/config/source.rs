//! `source`: the topic the pipeline reads, its consumer group and where it starts.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::properties::{self, RESERVED_CONSUMER_PROPERTIES};
use super::rules::{non_empty, topic_name};
use super::security::SecurityConfig;
use super::ConfigError;
use crate::units::HumanDuration;

/// The Kafka topic read by the pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// The input topic.
    pub topic: String,
    /// Consumer group id; one group per pipeline.
    pub group_id: String,
    /// Where to start when the group has no committed offset.
    #[serde(default)]
    pub start_from: StartFrom,
    /// Group session timeout. The revoke drain deadline must be shorter.
    #[serde(default = "default_session_timeout")]
    pub session_timeout: HumanDuration,
    /// Static membership id (e.g. the pod name), so a restart does not rebalance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_instance_id: Option<String>,
    /// TLS and SASL.
    #[serde(default)]
    pub security: SecurityConfig,
    /// Extra librdkafka consumer properties, applied last.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consumer_properties: BTreeMap<String, String>,
}

/// Where a group without a committed offset starts reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StartFrom {
    /// The log start offset: nothing that is still retained is skipped.
    #[default]
    Earliest,
    /// The end of the log: only records produced after the first join.
    Latest,
}

/// `source.sessionTimeout` when it is not set.
pub fn default_session_timeout() -> HumanDuration {
    HumanDuration::from_millis(30_000)
}

/// The shortest `source.sessionTimeout` (the broker's default `group.min.session.timeout.ms`).
pub const SESSION_TIMEOUT_MIN: Duration = Duration::from_secs(6);
/// The longest `source.sessionTimeout` (the broker's default `group.max.session.timeout.ms`).
pub const SESSION_TIMEOUT_MAX: Duration = Duration::from_secs(300);

impl SourceConfig {
    /// The checks of `source` on its own.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        let SourceConfig {
            bootstrap_servers,
            topic,
            group_id,
            start_from: _,
            session_timeout,
            group_instance_id: _,
            security,
            consumer_properties,
        } = self;
        non_empty("source.bootstrapServers", bootstrap_servers)?;
        topic_name("source.topic", topic)?;
        non_empty("source.groupId", group_id)?;
        properties::check(
            "source.consumerProperties",
            consumer_properties,
            RESERVED_CONSUMER_PROPERTIES,
        )?;
        if session_timeout.0 < SESSION_TIMEOUT_MIN || session_timeout.0 > SESSION_TIMEOUT_MAX {
            return Err(ConfigError::invalid(
                "source.sessionTimeout",
                format!(
                    "must be between {} and {}, got {session_timeout}",
                    HumanDuration(SESSION_TIMEOUT_MIN),
                    HumanDuration(SESSION_TIMEOUT_MAX)
                ),
            ));
        }
        security.check("source.security")
    }
}
