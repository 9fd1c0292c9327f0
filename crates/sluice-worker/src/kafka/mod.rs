//! The Kafka plumbing of the data path: the client settings ([`client`]), the group
//! consumer and its rebalance barrier ([`consumer`]), the reader of one partition's
//! queue ([`dispatcher`]), and librdkafka's log lines ([`log`]).

pub mod assignment;
pub mod client;
pub mod config;
pub mod consumer;
pub mod dispatcher;
pub mod limits;
pub mod log;
pub mod producer;
pub mod start_from;
