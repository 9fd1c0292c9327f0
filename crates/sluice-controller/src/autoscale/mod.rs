//! Lag-based autoscaling: read lag from Kafka, decide replicas with a pure policy.

pub mod lag;
pub mod policy;
pub mod stall;
