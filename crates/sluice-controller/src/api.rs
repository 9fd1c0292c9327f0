//! The controller's requests to the Kubernetes API: counted by verb and paced by one token
//! bucket, so thousands of pipelines (a start, a leader change, a burst of changes) cannot
//! flood the API server. Watches are not counted here (they are long-lived streams).

use std::sync::Mutex;
use std::time::Duration;

use prometheus::{Counter, IntCounterVec, Opts, Registry};
use tokio::time::Instant;

/// How many requests per second, and how many at once after a quiet time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ApiLimits {
    /// Sustained requests per second.
    pub qps: f64,
    /// Requests allowed at once after a quiet time.
    pub burst: f64,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            qps: 200.0,
            burst: 400.0,
        }
    }
}

/// A request's verb, the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// GET (an object, or its metadata).
    Get,
    /// GET of a collection (a pipeline's pods, while workers are missing).
    List,
    /// PATCH (server-side apply; of the status too).
    Patch,
    /// POST (an Event).
    Create,
    /// DELETE.
    Delete,
}

impl Verb {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Patch => "patch",
            Verb::Create => "create",
            Verb::Delete => "delete",
        }
    }
}

/// The token bucket and its counters.
pub struct ApiBudget {
    limits: ApiLimits,
    /// Tokens left (negative: owed by requests already waiting) and when last refilled.
    bucket: Mutex<(f64, Instant)>,
    requests: IntCounterVec,
    waited: Counter,
}

impl ApiBudget {
    /// A budget of `limits`, counted in `registry`.
    pub fn new(limits: ApiLimits, registry: &Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "sluice_controller_api_requests_total",
                "Requests to the Kubernetes API (watches aside), by verb.",
            ),
            &["verb"],
        )
        .expect("metric");
        registry
            .register(Box::new(requests.clone()))
            .expect("register");
        let waited = Counter::new(
            "sluice_controller_api_throttled_seconds_total",
            "Time requests to the Kubernetes API waited for the controller's own rate limit.",
        )
        .expect("metric");
        registry
            .register(Box::new(waited.clone()))
            .expect("register");
        ApiBudget {
            limits,
            bucket: Mutex::new((limits.burst, Instant::now())),
            requests,
            waited,
        }
    }

    /// Wait for a token for one request of `verb`.
    pub async fn take(&self, verb: Verb) {
        self.requests.with_label_values(&[verb.label()]).inc();
        let wait = {
            let mut b = self.bucket.lock().expect("api bucket lock");
            let now = Instant::now();
            let (tokens, at) = *b;
            let refilled = (tokens + now.duration_since(at).as_secs_f64() * self.limits.qps)
                .min(self.limits.burst);
            let left = refilled - 1.0;
            *b = (left, now);
            (left < 0.0).then(|| Duration::from_secs_f64(-left / self.limits.qps))
        };
        if let Some(w) = wait {
            self.waited.inc_by(w.as_secs_f64());
            tokio::time::sleep(w).await;
        }
    }

    /// Requests of `verb` made so far.
    pub fn count(&self, verb: Verb) -> u64 {
        self.requests.with_label_values(&[verb.label()]).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_then_requests_wait_their_turn() {
        let b = ApiBudget::new(
            ApiLimits {
                qps: 10.0,
                burst: 5.0,
            },
            &Registry::new(),
        );
        let t0 = Instant::now();
        for _ in 0..5 {
            b.take(Verb::Get).await;
        }
        assert_eq!(t0.elapsed(), Duration::ZERO, "the burst");
        for _ in 0..10 {
            b.take(Verb::Patch).await;
        }
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(990) && took <= Duration::from_millis(1010),
            "ten more at 10/s: {took:?}"
        );
        assert_eq!((b.count(Verb::Get), b.count(Verb::Patch)), (5, 10));
    }
}
