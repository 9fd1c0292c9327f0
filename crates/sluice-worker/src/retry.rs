//! Retry policy for transient sink errors: exponential backoff with jitter, bounded by an
//! attempt count and by the time elapsed since the first failure.

use std::time::Duration;

use rand::Rng;
use sluice_api::config::RetryConfig;

/// Whether an error may go away by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// A connection loss, a timeout, an unavailable broker: retry.
    Transient,
    /// Bad data, a constraint, a record too large, no permission: retrying cannot help.
    Permanent,
}

/// When to try again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Backoff before the second attempt.
    pub initial: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// No attempt starts later than this after the first failure.
    pub max_elapsed: Duration,
    /// Most attempts in all (0: unlimited).
    pub max_attempts: u32,
}

impl From<&RetryConfig> for RetryPolicy {
    fn from(c: &RetryConfig) -> Self {
        RetryPolicy {
            initial: c.initial_backoff.0,
            max_backoff: c.max_backoff.0,
            max_elapsed: c.max_elapsed.0,
            max_attempts: c.max_attempts,
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempts + 1`, after `attempts` failed ones, the first of
    /// which failed `elapsed` ago; `None` when the policy gives up.
    ///
    /// The backoff doubles from `initial` up to `maxBackoff`; the wait is drawn uniformly
    /// from its upper half ("equal jitter"), so workers that failed together do not retry
    /// together and no wait is shorter than half the backoff.
    pub fn next_delay(&self, attempts: u32, elapsed: Duration) -> Option<Duration> {
        if self.max_attempts > 0 && attempts >= self.max_attempts {
            return None;
        }
        let exp = attempts.saturating_sub(1).min(30);
        let backoff = self
            .initial
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff);
        let half = backoff / 2;
        let wait = half + rand::rng().random_range(Duration::ZERO..=half);
        if elapsed + wait > self.max_elapsed {
            return None;
        }
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            max_elapsed: Duration::from_secs(30),
            max_attempts,
        }
    }

    #[test]
    fn backoff_doubles_within_its_jitter_band_up_to_the_cap() {
        let p = policy(0);
        for (attempts, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (5, 1600),
            (6, 2000),
            (20, 2000),
        ] {
            for _ in 0..200 {
                let d = p.next_delay(attempts, Duration::ZERO).unwrap();
                let full = Duration::from_millis(full);
                assert!(d >= full / 2 && d <= full, "attempt {attempts}: {d:?}");
            }
        }
    }

    #[test]
    fn jitter_spreads_the_waits() {
        let p = policy(0);
        let waits: std::collections::BTreeSet<_> = (0..50)
            .map(|_| p.next_delay(4, Duration::ZERO).unwrap())
            .collect();
        assert!(waits.len() > 10, "{waits:?}");
    }

    #[test]
    fn gives_up_at_the_attempt_limit_or_past_the_elapsed_limit() {
        assert!(policy(3).next_delay(2, Duration::ZERO).is_some());
        assert!(policy(3).next_delay(3, Duration::ZERO).is_none());
        assert!(policy(0).next_delay(1000, Duration::ZERO).is_some());
        assert!(policy(0).next_delay(1, Duration::from_secs(29)).is_some());
        assert!(policy(0).next_delay(1, Duration::from_secs(30)).is_none());
    }
}
