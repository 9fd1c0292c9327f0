//! When each pipeline is first looked at. Every pipeline has a slot in its poll interval,
//! fixed by its uid on the wall clock. A controller that starts (or takes over as leader)
//! with thousands of pipelines that were reconciled before waits for each one's slot, so
//! their reconciles and lag reads spread evenly over the first interval instead of all
//! coming at once; each requeues a poll interval after its last reconcile from then on.
//! Pure.

use std::time::Duration;

use sha2::{Digest, Sha256};

/// The pipeline's place in a `poll` interval: a fixed fraction of it, from its uid.
pub fn offset(uid: &str, poll: Duration) -> Duration {
    let h = Sha256::digest(uid.as_bytes());
    let x = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    let poll_ms = poll.as_millis().max(1) as u64;
    Duration::from_millis(x % poll_ms)
}

/// From `now` (time since the Unix epoch), how long until the slot `offset` of a `poll`
/// interval comes round: within `[0, poll)`.
pub fn until_slot(now: Duration, poll: Duration, offset: Duration) -> Duration {
    let poll_ms = poll.as_millis().max(1) as u64;
    let now_ms = now.as_millis() as u64;
    let phase = (now_ms + poll_ms - offset.as_millis() as u64 % poll_ms) % poll_ms;
    Duration::from_millis((poll_ms - phase) % poll_ms)
}

/// How long a controller that has just met a pipeline waits before looking at it: until
/// its slot when it was `known` (reconciled before, for this spec), not at all otherwise.
/// `now` is the time since the Unix epoch.
pub fn first_look(known: bool, uid: &str, poll: Duration, now: Duration) -> Duration {
    if known {
        until_slot(now, poll, offset(uid, poll))
    } else {
        Duration::ZERO
    }
}

/// Now, as time since the Unix epoch.
pub fn wall_clock() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn offsets_spread_over_the_interval_and_stay_put() {
        let poll = S(30);
        let offsets: Vec<Duration> = (0..10_000)
            .map(|i| offset(&format!("uid-{i}"), poll))
            .collect();
        assert!(offsets.iter().all(|o| *o < poll));
        // Every 3 s tenth of the interval holds about a tenth of them.
        for tenth in 0..10 {
            let n = offsets.iter().filter(|o| o.as_secs() / 3 == tenth).count();
            assert!((900..1_100).contains(&n), "tenth {tenth}: {n}");
        }
        assert_eq!(offset("uid-7", poll), offset("uid-7", poll));
    }

    #[test]
    fn after_a_start_known_pipelines_wait_for_their_slot_and_new_ones_do_not() {
        let (poll, now) = (S(30), S(1_000_000_020));
        let waits: Vec<Duration> = (0..3_000)
            .map(|i| first_look(true, &format!("uid-{i}"), poll, now))
            .collect();
        assert!(waits.iter().all(|w| *w < poll));
        // No second of the first interval gets more than a few percent of them.
        for s in 0..30 {
            let n = waits.iter().filter(|w| w.as_secs() == s).count();
            assert!(n < 150, "second {s}: {n} of 3,000");
        }
        assert_eq!(first_look(false, "uid-1", poll, now), Duration::ZERO);
    }

    #[test]
    fn the_slot_comes_round_once_per_interval() {
        let (poll, off) = (S(30), S(7));
        let base = 1_000_000_020; // a multiple of 30 s since the epoch
        assert_eq!(until_slot(S(base), poll, off), S(7));
        assert_eq!(until_slot(S(base + 7), poll, off), S(0));
        assert_eq!(until_slot(S(base + 8), poll, off), S(29));
    }
}
