//! `ConfigError`: why a configuration was refused, always naming the field.

/// Why a configuration was refused. The message names the field and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The YAML could not be read or does not match the schema.
    #[error("invalid configuration at `{path}`: {message}")]
    Parse {
        /// Dotted path of the offending field (`.` for the document itself).
        path: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// The document parsed, but a value is out of range or inconsistent.
    #[error("invalid configuration at `{field}`: {message}")]
    Invalid {
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// An environment override could not be applied.
    #[error("invalid environment override `{var}`: {message}")]
    Override {
        /// The environment variable.
        var: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// A refusal of the value at `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}
