//! Log lines for events that repeat per record: a broker outage fails every in-flight
//! output at once, and one warning each would write tens of thousands of lines in a
//! millisecond. A [`LogThrottle`] lets one line through per interval and says how many
//! events it stands for; metrics still count every one.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one log line per interval for one kind of event.
#[derive(Debug)]
pub struct LogThrottle {
    every: Duration,
    /// When the last line was let through, and the events since (this one included).
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogThrottle {
    /// One line per `every`.
    pub fn new(every: Duration) -> Self {
        LogThrottle {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Count one event. `Some(n)` when this one should be logged, standing for `n` events
    /// (itself and those held back since the last line); `None` to stay quiet.
    pub fn tick(&self) -> Option<u64> {
        self.tick_at(Instant::now())
    }

    /// [`LogThrottle::tick`] at `now` (the tests' clock).
    fn tick_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().expect("throttle lock");
        s.1 += 1;
        match s.0 {
            Some(last) if now.duration_since(last) < self.every => None,
            _ => {
                let n = s.1;
                *s = (Some(now), 0);
                Some(n)
            }
        }
    }
}

impl Default for LogThrottle {
    /// One line every 5 seconds.
    fn default() -> Self {
        LogThrottle::new(Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_event_is_logged_and_a_burst_is_folded_into_the_next_line() {
        // A clock of its own: a burst on a loaded machine can outlast any real interval.
        let t = LogThrottle::new(Duration::from_millis(50));
        let start = Instant::now();
        assert_eq!(t.tick_at(start), Some(1));
        for i in 0..9_999 {
            let at = start + Duration::from_micros(i * 4);
            assert_eq!(t.tick_at(at), None);
        }
        let later = start + Duration::from_millis(60);
        assert_eq!(
            t.tick_at(later),
            Some(10_000),
            "the held-back events are counted"
        );
        assert_eq!(t.tick_at(later + Duration::from_millis(1)), None);
    }
}
