//! What the controller's watches show of the children: every Deployment, ConfigMap, Service
//! and PodDisruptionBudget in the watched namespaces, kept small (metadata, and a
//! Deployment's replicas), so a reconcile reads what exists without a request, and the
//! same watches trigger the owners' reconciles. All objects, not only sluice's: an object
//! a user made under a child's name must be seen to be refused.
//!
//! And the Secrets' versions: their metadata only, asked for as metadata (a Secret's data
//! never crosses the watch, and none is kept), so a reconcile knows without a request
//! whether a Secret its pods read changed since it last read it (reconcile/secrets.rs), and
//! a change triggers the pipelines that read it (controller.rs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStatus};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::reconcile::build::APPLIED_HASH;

/// The children's stores.
pub struct Cache {
    deployments: Store<Deployment>,
    config_maps: Store<PartialObjectMeta<ConfigMap>>,
    services: Store<PartialObjectMeta<Service>>,
    pdbs: Store<PartialObjectMeta<PodDisruptionBudget>>,
    secrets: Store<PartialObjectMeta<Secret>>,
    ready: [Arc<AtomicBool>; 5],
}

/// The watch streams behind a [`Cache`], for the controller's triggers.
pub struct Triggers<D, C, S, P, X> {
    /// Deployments.
    pub deployments: D,
    /// ConfigMaps (metadata).
    pub config_maps: C,
    /// Services (metadata).
    pub services: S,
    /// PodDisruptionBudgets (metadata).
    pub pdbs: P,
    /// Secrets (metadata).
    pub secrets: X,
}

impl Cache {
    /// Whether every store has had its first full list.
    pub fn ready(&self) -> bool {
        self.ready.iter().all(|r| r.load(Ordering::Acquire))
    }

    /// The Deployment `name` in `ns`.
    pub fn deployment(&self, ns: &str, name: &str) -> Option<Arc<Deployment>> {
        self.deployments.get(&ObjectRef::new(name).within(ns))
    }

    /// The ConfigMap `name` in `ns` (metadata).
    pub fn config_map(&self, ns: &str, name: &str) -> Option<ObjectMeta> {
        self.config_maps
            .get(&ObjectRef::new(name).within(ns))
            .map(|o| o.metadata.clone())
    }

    /// The Service `name` in `ns` (metadata).
    pub fn service(&self, ns: &str, name: &str) -> Option<ObjectMeta> {
        self.services
            .get(&ObjectRef::new(name).within(ns))
            .map(|o| o.metadata.clone())
    }

    /// The PodDisruptionBudget `name` in `ns` (metadata).
    pub fn pdb(&self, ns: &str, name: &str) -> Option<ObjectMeta> {
        self.pdbs
            .get(&ObjectRef::new(name).within(ns))
            .map(|o| o.metadata.clone())
    }

    /// The resourceVersion of the Secret `name` in `ns` (`None`: there is none).
    pub fn secret_version(&self, ns: &str, name: &str) -> Option<String> {
        self.secrets
            .get(&ObjectRef::new(name).within(ns))
            .and_then(|o| o.metadata.resource_version.clone())
    }

    /// Watch the children in `namespace` (all namespaces: `None`): the cache, and the
    /// streams to drive (the controller's `owns_stream`), which fill it.
    #[allow(clippy::type_complexity)]
    pub fn watch(
        client: &Client,
        namespace: Option<&str>,
    ) -> (
        Cache,
        Triggers<
            impl Stream<Item = Result<Deployment, watcher::Error>> + Send + 'static,
            impl Stream<Item = Result<PartialObjectMeta<ConfigMap>, watcher::Error>> + Send + 'static,
            impl Stream<Item = Result<PartialObjectMeta<Service>, watcher::Error>> + Send + 'static,
            impl Stream<Item = Result<PartialObjectMeta<PodDisruptionBudget>, watcher::Error>>
                + Send
                + 'static,
            impl Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + 'static,
        >,
    ) {
        let ready: [Arc<AtomicBool>; 5] = Default::default();
        let (deployments, d) = {
            let (reader, writer) = reflector::store();
            let flag = ready[0].clone();
            let s = watcher(
                scoped::<Deployment>(client, namespace),
                watcher::Config::default(),
            )
            .default_backoff()
            .modify(slim_deployment)
            .reflect(writer)
            .inspect_ok(move |e| mark(&flag, e))
            .touched_objects();
            (reader, s)
        };
        let (config_maps, c) = metadata::<ConfigMap>(client, namespace, ready[1].clone());
        let (services, s) = metadata::<Service>(client, namespace, ready[2].clone());
        let (pdbs, p) = metadata::<PodDisruptionBudget>(client, namespace, ready[3].clone());
        let (secrets, x) = metadata::<Secret>(client, namespace, ready[4].clone());
        (
            Cache {
                deployments,
                config_maps,
                services,
                pdbs,
                secrets,
                ready,
            },
            Triggers {
                deployments: d,
                config_maps: c,
                services: s,
                pdbs: p,
                secrets: x,
            },
        )
    }
}

fn mark<K>(ready: &AtomicBool, e: &watcher::Event<K>) {
    if matches!(e, watcher::Event::InitDone) {
        ready.store(true, Ordering::Release);
    }
}

pub(crate) fn scoped<K>(c: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(c.clone(), ns),
        None => Api::all(c.clone()),
    }
}

#[allow(clippy::type_complexity)]
fn metadata<K>(
    client: &Client,
    namespace: Option<&str>,
    ready: Arc<AtomicBool>,
) -> (
    Store<PartialObjectMeta<K>>,
    impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static,
)
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    // `Api<PartialObjectMeta<K>>` lists and watches with metadata-only requests (kube 5):
    // no Secret's data, nor a ConfigMap's, crosses these watches.
    let s = watcher(
        scoped::<PartialObjectMeta<K>>(client, namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|m: &mut PartialObjectMeta<K>| slim_meta(&mut m.metadata))
    .reflect(writer)
    .inspect_ok(move |e| mark(&ready, e))
    .touched_objects();
    (reader, s.boxed())
}

/// Keep of an object's metadata what the controller reads: identity, owners, versions, and
/// sluice's own annotation.
fn slim_meta(m: &mut ObjectMeta) {
    m.managed_fields = None;
    if let Some(a) = m.annotations.as_mut() {
        a.retain(|k, _| k == APPLIED_HASH);
    }
}

/// Keep of a Deployment its metadata (slim), its replicas and its ready replicas.
fn slim_deployment(d: &mut Deployment) {
    slim_meta(&mut d.metadata);
    d.spec = d.spec.take().map(|s| DeploymentSpec {
        replicas: s.replicas,
        selector: s.selector,
        ..Default::default()
    });
    d.status = d.status.take().map(|s| DeploymentStatus {
        replicas: s.replicas,
        ready_replicas: s.ready_replicas,
        ..Default::default()
    });
}
