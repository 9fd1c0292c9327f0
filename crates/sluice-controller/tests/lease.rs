//! Leader election against the real kube-apiserver.

use std::time::{Duration, Instant};

mod support;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use sluice_controller::lease::{acquire, try_acquire, LeaseConfig};
use support::{client, namespace};

fn cfg(ns: &str, who: &str) -> LeaseConfig {
    LeaseConfig {
        name: "sluice-controller".into(),
        namespace: ns.into(),
        identity: who.into(),
        duration: Duration::from_secs(3),
        renew_every: Duration::from_millis(500),
    }
}

#[tokio::test]
async fn only_one_replica_leads_and_a_silent_leader_is_replaced() {
    let c = client().await;
    let ns = namespace(&c, "lease").await;
    let api: Api<Lease> = Api::namespaced(c.clone(), &ns);
    let a = acquire(c.clone(), cfg(&ns, "a")).await;
    assert!(
        !try_acquire(&api, &cfg(&ns, "b")).await.unwrap(),
        "b must not lead while a renews"
    );
    // a keeps renewing past its lease duration.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !try_acquire(&api, &cfg(&ns, "b")).await.unwrap(),
        "a still leads after renewing"
    );
    drop(a); // a stops renewing (crashed, partitioned)
    let started = Instant::now();
    loop {
        if try_acquire(&api, &cfg(&ns, "b")).await.unwrap() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "b never took over"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let lease = api.get("sluice-controller").await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("b"));
    assert_eq!(lease.lease_transitions, Some(1));
}
