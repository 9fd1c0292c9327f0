//! A producer that can be replaced while in use.

use std::sync::{Arc, RwLock};

use crate::kafka::log::LoggingContext;

/// A producer whose librdkafka lines go through [`crate::kafka::log`].
pub type FutureProducer = rdkafka::producer::FutureProducer<LoggingContext>;

/// The exactly-once delivery renews its transactional producer after a fatal error (the
/// broker aborted a transaction that outlived its timeout during a coordinator failover,
/// and fenced the producer); the sinks and the dead-letter path take the current one for
/// each batch. At-least-once producers are never replaced.
#[derive(Clone)]
pub struct SharedProducer(Arc<RwLock<FutureProducer>>);

impl std::fmt::Debug for SharedProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedProducer").finish_non_exhaustive()
    }
}

impl SharedProducer {
    /// Share `producer`.
    pub fn new(producer: FutureProducer) -> Self {
        SharedProducer(Arc::new(RwLock::new(producer)))
    }

    /// The current producer.
    pub fn get(&self) -> FutureProducer {
        self.0.read().expect("producer lock").clone()
    }

    /// Replace the producer.
    pub fn set(&self, producer: FutureProducer) {
        *self.0.write().expect("producer lock") = producer;
    }
}
