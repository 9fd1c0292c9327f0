//! Leader election with a `coordination.k8s.io/v1` Lease, so only one controller replica
//! acts when the chart runs several.
//!
//! A candidate takes the Lease when nobody holds it or the holder stopped renewing for
//! longer than the lease duration; updates use the resourceVersion, so two candidates can
//! never both win. The leader renews every `renew_every`; if it cannot renew before its
//! own lease would expire, it must stop acting ([`LeaseGuard::lost`]).

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
        match try_acquire(&api, &cfg).await {
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
            match try_acquire(&api, &cfg).await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("leadership taken by another replica");
                    let _ = tx.send(true);
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
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
