//! The sluice operator.
//!
//! - [`autoscale::policy`]: the pure scaling decision (desired replicas from lag, with a
//!   scale-down stabilization window, caps, and "unknown lag holds").
//! - [`autoscale::lag`]: consumer lag per partition, read from Kafka.
//! - [`reconcile::build`]: the child objects (ConfigMap, Deployment, Service,
//!   PodDisruptionBudget) as pure functions of a validated pipeline.

pub mod autoscale;
pub mod controller;
pub mod lease;
pub mod reconcile;

use kube::CustomResourceExt;
use sluice_api::crd::StreamPipeline;

/// The StreamPipeline CRD as YAML, as checked in under `crds/`.
pub fn crd_yaml() -> String {
    let crd = serde_json::to_value(StreamPipeline::crd()).expect("the CRD serializes");
    serde_yaml::to_string(&crd).expect("JSON renders as YAML")
}
