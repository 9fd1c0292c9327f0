//! `retry` and `deadLetter`: what happens to a record a sink cannot take, first for a while
//! (retries with backoff), then for good (the dead-letter topic, or a stalled partition).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::rules::{topic_name, MAX_ATTEMPTS, TOPIC_NAME_LEN, TOPIC_NAME_PATTERN};
use super::ConfigError;
use crate::units::HumanDuration;

/// Retries of transient sink errors: exponential backoff with full jitter, until either
/// limit is reached. Then the record is dead-lettered (or its partition stalls).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConfig {
    /// The first backoff.
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff: HumanDuration,
    /// The longest backoff.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: HumanDuration,
    /// Give up after this long since the first failure.
    #[serde(default = "default_max_elapsed")]
    pub max_elapsed: HumanDuration,
    /// Give up after this many attempts (0: no limit but `maxElapsed`).
    #[serde(default)]
    #[schemars(range(min = MAX_ATTEMPTS.min, max = MAX_ATTEMPTS.max))]
    pub max_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            max_elapsed: default_max_elapsed(),
            max_attempts: 0,
        }
    }
}

/// The dead-letter topic: records that failed for good, with why, where and how often.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// The topic.
    #[schemars(
        length(min = TOPIC_NAME_LEN.min, max = TOPIC_NAME_LEN.max),
        regex(pattern = TOPIC_NAME_PATTERN)
    )]
    pub topic: String,
    /// Defaults to the source's bootstrap servers and security settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_servers: Option<String>,
}

fn default_initial_backoff() -> HumanDuration {
    HumanDuration::from_millis(100)
}
fn default_max_backoff() -> HumanDuration {
    HumanDuration::from_millis(10_000)
}
fn default_max_elapsed() -> HumanDuration {
    HumanDuration::from_millis(300_000)
}

impl RetryConfig {
    /// The checks of `retry`.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        let RetryConfig {
            initial_backoff,
            max_backoff,
            max_elapsed,
            max_attempts,
        } = self;
        if initial_backoff.0.as_millis() < 1 {
            return Err(ConfigError::invalid(
                "retry.initialBackoff",
                format!("must be at least 1ms, got {initial_backoff}"),
            ));
        }
        if max_backoff.0 < initial_backoff.0 {
            return Err(ConfigError::invalid(
                "retry.maxBackoff",
                format!(
                    "must be at least retry.initialBackoff ({initial_backoff}), got {max_backoff}"
                ),
            ));
        }
        if max_elapsed.0 < initial_backoff.0 {
            return Err(ConfigError::invalid(
                "retry.maxElapsed",
                format!(
                    "must be at least retry.initialBackoff ({initial_backoff}), got {max_elapsed}"
                ),
            ));
        }
        MAX_ATTEMPTS.check("retry.maxAttempts", *max_attempts)
    }
}

impl DeadLetterConfig {
    /// The checks of `deadLetter` on its own.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        topic_name("deadLetter.topic", &self.topic)
    }
}
