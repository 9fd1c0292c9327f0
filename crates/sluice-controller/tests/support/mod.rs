//! Shared by the controller's integration tests: a client for the test API server, the CRD,
//! a fresh namespace per test, and a scripted Kafka.
#![allow(dead_code)]

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, Config, CustomResourceExt};
use rdkafka::ClientConfig;
use sluice_api::crd::StreamPipeline;
use sluice_controller::autoscale::lag::{LagError, PartitionLag};
use sluice_controller::controller::KafkaInspector;
use sluice_testkit::{kubeconfig, unique};

/// A client for the test API server (`SLUICE_TEST_KUBECONFIG`, or the local one).
pub async fn client() -> Client {
    let kc = Kubeconfig::read_from(kubeconfig()).expect("kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(cfg).expect("client")
}

/// Apply a CRD with server-side apply and wait until it is established.
pub async fn install(c: &Client, crd: &CustomResourceDefinition) {
    let crds: Api<CustomResourceDefinition> = Api::all(c.clone());
    let name = crd.metadata.name.clone().expect("CRD name");
    crds.patch(
        &name,
        &PatchParams::apply("sluice-tests").force(),
        &Patch::Apply(crd),
    )
    .await
    .expect("apply CRD");
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(crds, &name, conditions::is_crd_established()),
    )
    .await
    .expect("CRD established in time")
    .expect("watch");
}

/// Poll `f` until it returns `Some`, with a deadline (never a bare sleep; see
/// [`sluice_testkit::poll_async`]).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    sluice_testkit::poll_async(what, timeout, || {
        let fut = f();
        async move { fut.await.ok_or_else(|| "not yet".to_string()) }
    })
    .await
}

/// A fresh namespace named after `prefix`.
pub async fn namespace(c: &Client, prefix: &str) -> String {
    let ns = unique(prefix);
    let obj: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap();
    Api::<Namespace>::all(c.clone())
        .create(&PostParams::default(), &obj)
        .await
        .expect("namespace");
    ns
}

/// Client, the StreamPipeline CRD installed, and a fresh namespace.
pub async fn setup(prefix: &str) -> (Client, String) {
    let c = client().await;
    install(&c, &StreamPipeline::crd()).await;
    let ns = namespace(&c, prefix).await;
    (c, ns)
}

/// Kafka as the test says it is: 0 partitions is a missing topic, negative lag a failed
/// lag query, and the lag is spread evenly over the partitions.
#[derive(Default)]
pub struct Scripted {
    pub partitions: AtomicU32,
    pub lag: AtomicI64,
    /// The group has no committed offset on any partition.
    pub uncommitted: std::sync::atomic::AtomicBool,
}

impl Scripted {
    pub fn new(partitions: u32, lag: i64) -> Arc<Self> {
        let s = Scripted::default();
        s.partitions.store(partitions, Ordering::SeqCst);
        s.lag.store(lag, Ordering::SeqCst);
        Arc::new(s)
    }
}

impl KafkaInspector for Scripted {
    fn partitions(&self, _: &ClientConfig, topic: &str) -> Result<u32, LagError> {
        match self.partitions.load(Ordering::SeqCst) {
            0 => Err(LagError::TopicNotFound(topic.into())),
            n => Ok(n),
        }
    }
    fn lag(
        &self,
        _: &ClientConfig,
        _: &str,
        topic: &str,
        _: sluice_api::config::StartFrom,
    ) -> Result<Vec<PartitionLag>, LagError> {
        match self.lag.load(Ordering::SeqCst) {
            l if l < 0 => Err(rdkafka::error::KafkaError::MetadataFetch(
                rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure,
            )
            .into()),
            // Spread evenly over the partitions (the remainder on the first ones).
            l => {
                let n = self.partitions.load(Ordering::SeqCst).max(1) as i64;
                Ok((0..n)
                    .map(|p| {
                        let lag = l / n + i64::from(p < l % n);
                        PartitionLag {
                            topic: topic.into(),
                            partition: p as i32,
                            low: 0,
                            high: lag,
                            committed: (!self.uncommitted.load(Ordering::SeqCst)).then_some(0),
                            lag: lag as u64,
                        }
                    })
                    .collect())
            }
        }
    }
}
