//! `processor`: what runs on every record.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::rules::non_empty;
use super::ConfigError;
use crate::units::HumanDuration;

/// The processor run on every record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[serde(rename_all_fields = "camelCase")]
pub enum ProcessorConfig {
    /// Emit every record unchanged (key, value and headers).
    Passthrough {},
    /// Passthrough that first spends `perRecord` (a sleep) on each record: a load-testing
    /// aid that simulates expensive processing. It blocks its worker thread.
    Delay {
        /// Time spent per record.
        per_record: HumanDuration,
    },
    /// A jq program (run by jaq, a Rust implementation of jq). The record value is parsed
    /// as JSON and is the program's input; every value the program emits is one output.
    /// Variables: `$key` (string or null), `$topic`, `$partition`, `$offset`,
    /// `$timestamp` (ms or null) and `$headers` (an object of strings). A value that is not
    /// JSON, or a program error, sends the record to the dead-letter path.
    Jq {
        /// The jq program, e.g. `select(.temp > 30) | {device, celsius: .temp}`.
        program: String,
        /// `false` (default): each output is the new value; key and headers stay the
        /// input's. `true`: each output must be an object `{"value": ..., "key": "...",
        /// "headers": {"name": "value"}}` (key and headers optional, the key then stays
        /// the input's), so the program chooses the output key and headers.
        #[serde(default)]
        envelope: bool,
    },
    /// A processor compiled into a custom worker binary, looked up by name.
    Custom {
        /// Name the custom binary registered its processor under.
        name: String,
    },
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig::Passthrough {}
    }
}

impl ProcessorConfig {
    /// The checks of `processor`: a jq program must compile.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if let ProcessorConfig::Jq { program, .. } = self {
            non_empty("processor.jq.program", program)?;
            if let Err(e) = crate::jq::compile(program) {
                return Err(ConfigError::invalid("processor.jq.program", e.to_string()));
            }
        }
        Ok(())
    }
}
