//! The sluice operator.
//!
//! - [`controller`]: the kube-runtime Controller, its watches and error policy.
//! - [`reconcile`]: one pipeline's reconcile as a sequence of steps (validate,
//!   dereference, scale, build, apply, report), each in its own file.
//! - [`context`]: what reconciles share, with one memory per pipeline.
//! - [`autoscale::policy`]: the pure scaling decision (desired replicas from lag, with a
//!   scale-down stabilization window, caps, and "unknown lag holds").
//! - [`autoscale::lag`]: consumer lag per partition, read from Kafka; [`kafka`]: the seam.

pub mod api;
pub mod autoscale;
pub mod cache;
pub mod context;
pub mod controller;
pub mod error;
pub mod kafka;
pub mod lease;
pub mod metrics;
pub mod pace;
pub mod reconcile;
pub mod trim;

use kube::CustomResourceExt;
use sluice_api::crd::StreamPipeline;

/// The StreamPipeline CRD as YAML, as checked in under `crds/`.
pub fn crd_yaml() -> String {
    let crd = serde_json::to_value(StreamPipeline::crd()).expect("the CRD serializes");
    serde_yaml::to_string(&crd).expect("JSON renders as YAML")
}
