//! librdkafka's log lines and error callbacks, through the worker's own log formatter.
//!
//! librdkafka reports states that resolve by themselves as warnings: a group coordinator
//! still loading, a broker not reachable yet while it starts, a partition leader moving. A
//! worker that starts beside its broker would greet its user with a screen of them. Here
//! such a state is logged at info while it is young, and as a warning once it has lasted
//! [`LASTING`] (a broker that stays away still raises its warning; a coordinator that loads
//! for two seconds does not). Every other line keeps librdkafka's own level.
//!
//! Every librdkafka client of the worker logs through here: the consumer's and the Kafka
//! sink's contexts call [`KafkaLog::log`] and [`KafkaLog::error_is_transient`], the other
//! producers are created with [`LoggingContext`].

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::ClientContext;

/// How long a self-resolving state must last before it is a warning.
pub const LASTING: Duration = Duration::from_secs(30);

/// A recurrence within this gap continues the same episode; after a longer silence the
/// state counts as resolved and a new episode starts young again.
pub const QUIET: Duration = Duration::from_secs(30);

/// Fragments (lower case) of librdkafka messages that describe a state which resolves by
/// itself: the coordinator loading or moving, a broker not reachable (yet), a leader moving.
const TRANSIENT: &[&str] = &[
    "coordinator load in progress",
    "coordinator_load_in_progress",
    "coordinator not available",
    "coordinator_not_available",
    "not coordinator",
    "not_coordinator",
    "connection refused",
    "broker transport failure",
    "disconnected",
    "leader not available",
    "leader_not_available",
    "not leader",
    "not_leader",
    "all broker connections are down",
    "all brokers are down",
    "timed out",
];

/// Which [`TRANSIENT`] state `message` describes, if any.
pub fn transient_kind(message: &str) -> Option<usize> {
    let m = message.to_ascii_lowercase();
    TRANSIENT.iter().position(|t| m.contains(t))
}

/// How a line about a self-resolving state is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Escalation {
    /// Young: info.
    Young,
    /// It has lasted this long (at least [`LASTING`]): a warning.
    Lasting(Duration),
}

/// The open episodes of self-resolving states, by (facility, kind). A pure core: the
/// caller gives the time.
#[derive(Debug, Default)]
pub struct Episodes {
    open: HashMap<(String, usize), (Instant, Instant)>,
}

impl Episodes {
    /// Record one more line of state `kind` from facility `fac` at `now`.
    pub fn seen(&mut self, fac: &str, kind: usize, now: Instant) -> Escalation {
        let e = self
            .open
            .entry((fac.to_string(), kind))
            .or_insert((now, now));
        if now.saturating_duration_since(e.1) > QUIET {
            *e = (now, now);
        }
        e.1 = now;
        let age = now.saturating_duration_since(e.0);
        // Forget episodes that went quiet, so the map stays as small as the set of states
        // currently recurring.
        self.open
            .retain(|_, (_, last)| now.saturating_duration_since(*last) <= QUIET);
        if age >= LASTING {
            Escalation::Lasting(age)
        } else {
            Escalation::Young
        }
    }
}

/// The process's librdkafka log router.
#[derive(Debug, Default)]
pub struct KafkaLog {
    episodes: Mutex<Episodes>,
}

/// The one router every client of this process logs through.
pub static KAFKA_LOG: LazyLock<KafkaLog> = LazyLock::new(KafkaLog::default);

impl KafkaLog {
    fn escalation(&self, fac: &str, message: &str) -> Option<Escalation> {
        let kind = transient_kind(message)?;
        let mut e = self.episodes.lock().unwrap_or_else(|p| p.into_inner());
        Some(e.seen(fac, kind, Instant::now()))
    }

    /// Log one librdkafka line at its level, or, for a self-resolving state, at info until
    /// it has lasted [`LASTING`].
    pub fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        use RDKafkaLogLevel as L;
        let serious = matches!(
            level,
            L::Emerg | L::Alert | L::Critical | L::Error | L::Warning
        );
        if serious {
            match self.escalation(fac, message) {
                Some(Escalation::Young) => {
                    tracing::info!(target: "librdkafka", "{fac} {message} (a passing state: a warning if it lasts {}s)", LASTING.as_secs());
                    return;
                }
                Some(Escalation::Lasting(age)) => {
                    tracing::warn!(target: "librdkafka", "{fac} {message} (for {}s)", age.as_secs());
                    return;
                }
                None => {}
            }
        }
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", "{fac} {message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", "{fac} {message}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", "{fac} {message}"),
            L::Debug => tracing::debug!(target: "librdkafka", "{fac} {message}"),
        }
    }

    /// For a client's error callback: true when `error` (with librdkafka's `reason`)
    /// describes a young self-resolving state, which the caller logs at info instead of
    /// as a warning.
    pub fn error_is_transient(&self, error: &KafkaError, reason: &str) -> bool {
        let text = format!("{error} {reason}");
        matches!(self.escalation("ERROR", &text), Some(Escalation::Young))
    }
}

/// A client context that only routes librdkafka's log lines and errors through
/// [`KAFKA_LOG`]: for the producers that need nothing else (dead letters, transactions).
#[derive(Clone, Copy, Debug, Default)]
pub struct LoggingContext;

impl ClientContext for LoggingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        KAFKA_LOG.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if KAFKA_LOG.error_is_transient(&error, reason) {
            tracing::info!(error = %error, %reason, "librdkafka client error (a passing state)");
        } else {
            tracing::error!(error = %error, %reason, "librdkafka client error");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coordinator_loading_is_a_passing_state_and_a_bad_config_is_not() {
        assert!(transient_kind("Failed to acquire idempotence PID from broker 1: Coordinator load in progress: retrying").is_some());
        assert!(transient_kind("Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after 0ms in state CONNECT)").is_some());
        assert!(
            transient_kind("127.0.0.1:9092/bootstrap: Disconnected (after 12ms in state UP)")
                .is_some()
        );
        assert_eq!(
            transient_kind("Configuration property \"foo\" not supported"),
            None
        );
        assert_eq!(transient_kind("SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-256"), None);
    }

    #[test]
    fn a_state_is_young_until_it_has_lasted_then_a_warning() {
        let t0 = Instant::now();
        let mut e = Episodes::default();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(e.seen("GETPID", 0, at(0)), Escalation::Young);
        assert_eq!(e.seen("GETPID", 0, at(10)), Escalation::Young);
        assert_eq!(e.seen("GETPID", 0, at(29)), Escalation::Young);
        assert_eq!(
            e.seen("GETPID", 0, at(31)),
            Escalation::Lasting(Duration::from_secs(31))
        );
    }

    #[test]
    fn after_a_quiet_gap_a_state_is_young_again() {
        let t0 = Instant::now();
        let mut e = Episodes::default();
        let at = |s: u64| t0 + Duration::from_secs(s);
        e.seen("FAIL", 1, at(0));
        e.seen("FAIL", 1, at(20));
        assert!(matches!(e.seen("FAIL", 1, at(40)), Escalation::Lasting(_)));
        // Resolved: nothing for longer than QUIET.
        assert_eq!(e.seen("FAIL", 1, at(40 + 31)), Escalation::Young);
    }

    #[test]
    fn states_and_facilities_are_counted_apart() {
        let t0 = Instant::now();
        let mut e = Episodes::default();
        let at = |s: u64| t0 + Duration::from_secs(s);
        e.seen("FAIL", 1, at(0));
        e.seen("FAIL", 1, at(25));
        assert_eq!(e.seen("GETPID", 1, at(35)), Escalation::Young);
        assert_eq!(e.seen("FAIL", 2, at(35)), Escalation::Young);
        assert!(matches!(e.seen("FAIL", 1, at(35)), Escalation::Lasting(_)));
    }

    #[test]
    fn quiet_episodes_are_forgotten() {
        let t0 = Instant::now();
        let mut e = Episodes::default();
        for k in 0..5 {
            e.seen("FAIL", k, t0);
        }
        e.seen("FAIL", 0, t0 + Duration::from_secs(60));
        assert_eq!(e.open.len(), 1);
    }
}
