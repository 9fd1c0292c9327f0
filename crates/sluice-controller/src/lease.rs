//! Leader election with a `coordination.k8s.io/v1` Lease, so only one controller replica
//! acts when the chart runs several.
//!
//! A candidate takes the Lease when nobody holds it or the holder stopped renewing for
//! longer than the lease duration; updates use the resourceVersion, so two candidates can
//! never both win. The leader renews every `renew_every`; if it cannot renew before its
//! own lease would expire, it must stop acting ([`LeaseGuard::lost`]). Every call to the
//! API server is bounded by [`LeaseConfig::call_timeout`], shorter than the lease: a
//! renewal that hangs must not keep a leader acting past its lease while another replica
//! takes over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This candidate's identity (the pod name).
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub duration: Duration,
    /// How often the leader renews, and candidates retry.
    pub renew_every: Duration,
}

impl LeaseConfig {
    /// The longest one call to the API server may take: `renew_every`, and at most a
    /// third of the lease, so a hung call is given up well before the lease runs out.
    pub fn call_timeout(&self) -> Duration {
        self.renew_every.min(self.duration / 3)
    }
}

/// [`try_acquire`] bounded by [`LeaseConfig::call_timeout`]: a call that does not answer
/// in time is an error, never a wait.
pub async fn try_acquire_in_time(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, LeaseError> {
    match tokio::time::timeout(cfg.call_timeout(), try_acquire(api, cfg)).await {
        Ok(r) => r.map_err(LeaseError::Api),
        Err(_) => Err(LeaseError::Timeout(cfg.call_timeout())),
    }
}

/// Why one attempt to take or renew the lease failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API server refused or could not be reached.
    #[error("lease: {0}")]
    Api(kube::Error),
    /// The API server did not answer in time.
    #[error("lease: no answer within {0:?}")]
    Timeout(Duration),
}

impl LeaseError {
    /// A bounded label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            LeaseError::Api(_) => "kube_api",
            LeaseError::Timeout(_) => "timeout",
        }
    }
}

/// Held while this process leads; [`LeaseGuard::lost`] resolves when leadership is lost.
#[derive(Debug)]
pub struct LeaseGuard {
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseGuard {
    /// Resolves once the lease could not be renewed in time.
    pub async fn lost(&mut self) {
        while !*self.lost.borrow() {
            if self.lost.changed().await.is_err() {
                return;
            }
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn expired(l: &Lease, now: Timestamp) -> bool {
    let Some(spec) = &l.spec else { return true };
    let (Some(renew), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return true;
    };
    renew.0 + SignedDuration::from_secs(secs as i64) < now
}

/// One attempt to take or renew the lease. Ok(true) when this candidate holds it now.
pub async fn try_acquire(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.duration.as_secs() as i32),
        acquire_time: acquired.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(spec(0, None)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut l) => {
            let old = l.spec.clone().unwrap_or_default();
            let mine = old.holder_identity.as_deref() == Some(cfg.identity.as_str());
            if !mine && !expired(&l, now) {
                return Ok(false);
            }
            let transitions = old.lease_transitions.unwrap_or(0) + i32::from(!mine);
            l.spec = Some(spec(
                transitions,
                if mine { old.acquire_time } else { None },
            ));
            // replace() carries the resourceVersion: a concurrent taker makes this a 409.
            match api.replace(&cfg.name, &PostParams::default(), &l).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Wait until this candidate leads, then keep renewing in the background.
pub async fn acquire(client: Client, cfg: LeaseConfig) -> LeaseGuard {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    loop {
        match try_acquire_in_time(&api, &cfg).await {
            Ok(true) => break,
            Ok(false) => tracing::info!(lease = %cfg.name, "another replica leads; waiting"),
            Err(e) => tracing::warn!(error = %e, "lease: cannot reach the API server"),
        }
        tokio::time::sleep(cfg.renew_every).await;
    }
    tracing::info!(lease = %cfg.name, identity = %cfg.identity, "acquired leadership");
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(cfg.renew_every).await;
            match try_acquire_in_time(&api, &cfg).await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("leadership taken by another replica");
                    let _ = tx.send(true);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, category = e.label(), "lease renewal failed")
                }
            }
            // Stop acting before another replica may legitimately take over.
            if last_ok.elapsed() + cfg.renew_every >= cfg.duration {
                tracing::error!("could not renew the lease in time; giving up leadership");
                let _ = tx.send(true);
                return;
            }
        }
    });
    LeaseGuard { lost: rx, task }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;

    #[tokio::test(start_paused = true)]
    async fn a_call_that_never_answers_is_given_up_well_before_the_lease_runs_out() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        // The API server takes the request and never answers.
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(r) = handle.next_request().await {
                held.push(r);
            }
        });
        let api: Api<Lease> = Api::namespaced(Client::new(service, "default"), "default");
        let cfg = LeaseConfig {
            name: "l".into(),
            namespace: "default".into(),
            identity: "me".into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        };
        let t0 = tokio::time::Instant::now();
        let e = try_acquire_in_time(&api, &cfg).await.unwrap_err();
        assert_eq!(e.label(), "timeout", "{e}");
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
        assert!(cfg.call_timeout() < cfg.duration);
        // A short lease bounds the call by a third of it.
        let short = LeaseConfig {
            duration: Duration::from_secs(6),
            ..cfg
        };
        assert_eq!(short.call_timeout(), Duration::from_secs(2));
        hold.abort();
    }
}
