//! Reconciliation: validate, build the children, apply, report status.

pub mod build;
pub mod status;
pub mod validate;
