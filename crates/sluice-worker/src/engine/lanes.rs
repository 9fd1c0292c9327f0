//! The hand-off between a partition's dispatcher and its worker lanes: what one hand-off
//! carries, how many lanes a partition gets, and which lane a key takes.

use crate::engine::ack::AckToken;
use crate::record::Record;

/// Most records per hand-off from the dispatcher to the pool.
pub const DISPATCH_BATCH: usize = 512;

/// A batch of records for one worker, and its share of the batch's completion.
#[derive(Debug)]
pub struct WorkItem {
    /// Records, in offset order.
    pub records: Vec<Record>,
    /// Acked once every output of these records reached every sink's batcher.
    pub token: AckToken,
}

/// How many worker lanes a partition gets, and how many batch slots each lane's channel
/// has: `partition` ordering runs one lane; the slots hold `queueCapacity` records split
/// over the lanes (at least 2 batches each).
pub fn lane_geometry(workers: &sluice_api::config::WorkersConfig) -> (usize, usize) {
    let lanes = match workers.ordering {
        sluice_api::config::Ordering::Partition => 1,
        _ => workers.per_partition as usize,
    };
    let slots = (workers.queue_capacity as usize)
        .div_ceil(DISPATCH_BATCH * lanes)
        .max(2);
    (lanes, slots)
}

/// Which worker lane a key goes to in `ordering: key`: a stable hash of the key bytes
/// modulo the lane count. Records without a key all take lane 0, so they keep their order.
pub fn lane_for_key(key: Option<&[u8]>, lanes: usize) -> usize {
    match key {
        None => 0,
        Some(k) if lanes > 1 => (fnv1a(k) % lanes as u64) as usize,
        Some(_) => 0,
    }
}

/// FNV-1a: fast on short keys and stable across processes and versions (a rebalance
/// must not change which lane a key takes, or order per key would be lost).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_key_always_takes_the_same_lane(key in prop::collection::vec(any::<u8>(), 0..64), lanes in 1usize..64) {
            let a = lane_for_key(Some(&key), lanes);
            prop_assert!(a < lanes);
            prop_assert_eq!(a, lane_for_key(Some(&key), lanes));
        }
    }

    #[test]
    fn keys_spread_over_all_lanes() {
        let mut seen = [0usize; 5];
        for i in 0..10_000 {
            seen[lane_for_key(Some(format!("device-{i}").as_bytes()), 5)] += 1;
        }
        for n in seen {
            assert!((1500..2500).contains(&n), "{seen:?}");
        }
    }

    #[test]
    fn records_without_a_key_keep_one_lane() {
        assert_eq!(lane_for_key(None, 8), 0);
        assert_eq!(lane_for_key(Some(b"x"), 1), 0);
    }
}
