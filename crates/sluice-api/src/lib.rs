//! Types shared by the sluice worker and the sluice operator.
//!
//! [`config::WorkerConfig`] is the one document a worker reads at start-up (the operator
//! renders it into a ConfigMap). Parsing goes through [`config::WorkerConfig::from_yaml`],
//! which rejects unknown fields and invalid values with an error that names the field.

pub mod config;
#[cfg(feature = "crd")]
pub mod crd;
pub mod jq;
pub mod units;

pub use config::{ConfigError, WorkerConfig};
