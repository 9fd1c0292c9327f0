//! The Kafka plumbing of the data path: the client settings ([`client`]), the group
//! consumer and its rebalance barrier ([`consumer`]), and the reader of one partition's
//! queue ([`dispatcher`]).

pub mod assignment;
pub mod client;
pub mod config;
pub mod consumer;
pub mod dispatcher;
pub mod producer;
pub mod start_from;
