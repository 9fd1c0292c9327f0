//! Operating the worker: its liveness rules ([`health`]), the HTTP server for them and
//! the metrics ([`server`], [`metrics`], and the end-to-end histogram [`latency`]), the live progress line ([`progress`]) and log
//! throttling ([`throttle`]).

pub mod health;
pub mod latency;
pub mod metrics;
pub mod progress;
pub mod server;
pub mod throttle;
