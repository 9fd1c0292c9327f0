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
//!
//! And the worker pods the scheduler cannot place ([`Unschedulable`]), from a watch of
//! sluice's worker pods that are `Pending` (the API server filters by label and phase, so
//! nothing about running pods crosses it): a reconcile names them in the Ready condition
//! without a request (it listed the pipeline's pods at every reconcile while some were not
//! ready: at 10,000 pipelines, most of the controller's API budget).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStatus};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodCondition, PodStatus, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::reconcile::build::{APPLIED_HASH, PIPELINE_LABEL};

/// The children's stores.
pub struct Cache {
    deployments: Store<Deployment>,
    config_maps: Store<PartialObjectMeta<ConfigMap>>,
    services: Store<PartialObjectMeta<Service>>,
    pdbs: Store<PartialObjectMeta<PodDisruptionBudget>>,
    secrets: Store<PartialObjectMeta<Secret>>,
    unschedulable: Arc<Unschedulable>,
    ready: [Arc<AtomicBool>; 5],
}

/// Pipeline (namespace, name) -> its unschedulable pods: pod name -> the scheduler's message.
type ByPipeline = HashMap<(String, String), BTreeMap<String, String>>;

/// The worker pods the scheduler cannot place, by pipeline. Filled from the watch of
/// pending worker pods.
#[derive(Debug, Default)]
pub struct Unschedulable {
    by_pipeline: Mutex<ByPipeline>,
    /// What a relist (`Init` .. `InitDone`) has shown so far; it replaces the index at its end.
    relist: Mutex<Option<ByPipeline>>,
}

impl Unschedulable {
    /// One unschedulable pod of pipeline `name` in `ns`, with the scheduler's message.
    pub fn of(&self, ns: &str, name: &str) -> Option<String> {
        let map = self.by_pipeline.lock().expect("unschedulable lock");
        let (pod, why) = map
            .get(&(ns.to_string(), name.to_string()))?
            .iter()
            .next()?;
        Some(format!("pod {pod} cannot be scheduled: {why}"))
    }

    /// Take one event of the pending-pods watch.
    pub fn apply(&self, e: &watcher::Event<Pod>) {
        let remove = |map: &mut ByPipeline, key: (String, String), pod: &str| {
            if let Some(pods) = map.get_mut(&key) {
                pods.remove(pod);
                if pods.is_empty() {
                    map.remove(&key);
                }
            }
        };
        let put = |map: &mut ByPipeline, p: &Pod| {
            let Some((key, pod)) = pipeline_of(p) else {
                return;
            };
            match unschedulable(p) {
                Some(why) => {
                    map.entry(key).or_default().insert(pod, why);
                }
                None => remove(map, key, &pod),
            }
        };
        match e {
            watcher::Event::Init => {
                *self.relist.lock().expect("unschedulable lock") = Some(HashMap::new());
            }
            watcher::Event::InitApply(p) => {
                if let Some(map) = self.relist.lock().expect("unschedulable lock").as_mut() {
                    put(map, p);
                }
            }
            watcher::Event::InitDone => {
                if let Some(map) = self.relist.lock().expect("unschedulable lock").take() {
                    *self.by_pipeline.lock().expect("unschedulable lock") = map;
                }
            }
            watcher::Event::Apply(p) => put(&mut self.by_pipeline.lock().expect("lock"), p),
            watcher::Event::Delete(p) => {
                if let Some((key, pod)) = pipeline_of(p) {
                    remove(&mut self.by_pipeline.lock().expect("lock"), key, &pod);
                }
            }
        }
    }
}

/// The pipeline (namespace, name) a worker pod belongs to, and the pod's name.
pub fn pipeline_of(p: &Pod) -> Option<((String, String), String)> {
    let ns = p.metadata.namespace.clone()?;
    let pipeline = p.metadata.labels.as_ref()?.get(PIPELINE_LABEL)?.clone();
    Some(((ns, pipeline), p.metadata.name.clone()?))
}

/// The scheduler's message when it cannot place `p` (`PodScheduled=False`, reason
/// `Unschedulable`: no node matches its selector, tolerations or affinity, or none has room).
fn unschedulable(p: &Pod) -> Option<String> {
    let c = p
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
    (c.reason.as_deref() == Some("Unschedulable")).then(|| {
        c.message
            .clone()
            .unwrap_or_else(|| "no reason given".into())
    })
}

/// Keep of a pod what [`Unschedulable`] reads: name, namespace, labels, and its
/// `PodScheduled` condition.
fn slim_pod(p: &mut Pod) {
    slim_meta(&mut p.metadata);
    p.metadata.annotations = None;
    p.spec = None;
    p.status = p.status.take().map(|s| PodStatus {
        conditions: s.conditions.map(|c| {
            c.into_iter()
                .filter(|c| c.type_ == "PodScheduled")
                .map(|c| PodCondition {
                    last_probe_time: None,
                    last_transition_time: None,
                    ..c
                })
                .collect()
        }),
        ..Default::default()
    });
}

/// The watch streams behind a [`Cache`], for the controller's triggers.
pub struct Triggers<D, C, S, P, X, U> {
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
    /// Worker pods that are `Pending` (slim).
    pub pending_pods: U,
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

    /// One worker pod of pipeline `name` in `ns` that the scheduler cannot place, with its
    /// message (see [`Unschedulable`]).
    pub fn unschedulable(&self, ns: &str, name: &str) -> Option<String> {
        self.unschedulable.of(ns, name)
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
            impl Stream<Item = Result<Pod, watcher::Error>> + Send + 'static,
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
        // Not among the stores the cache waits for: the condition it feeds is advice, and a
        // controller whose role cannot watch pods (an older chart) still reconciles.
        let unschedulable = Arc::new(Unschedulable::default());
        let u = {
            let index = unschedulable.clone();
            let selector = format!(
                "app.kubernetes.io/managed-by=sluice,app.kubernetes.io/name=sluice-worker,{PIPELINE_LABEL}"
            );
            watcher(
                scoped::<Pod>(client, namespace),
                watcher::Config::default()
                    .labels(&selector)
                    .fields("status.phase=Pending"),
            )
            .default_backoff()
            .modify(slim_pod)
            .inspect_ok(move |e| index.apply(e))
            .touched_objects()
        };
        (
            Cache {
                deployments,
                config_maps,
                services,
                pdbs,
                secrets,
                unschedulable,
                ready,
            },
            Triggers {
                deployments: d,
                config_maps: c,
                services: s,
                pdbs: p,
                secrets: x,
                pending_pods: u,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, pipeline: &str, name: &str, unschedulable: Option<&str>) -> Pod {
        let conditions = match unschedulable {
            Some(why) => {
                json!([{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why}])
            }
            None => json!([{"type": "PodScheduled", "status": "True"}]),
        };
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "labels": {PIPELINE_LABEL: pipeline}},
            "status": {"phase": "Pending", "conditions": conditions},
        }))
        .unwrap()
    }

    /// The index follows the watch: a pod unschedulable names its pipeline, one placed or
    /// gone no longer does, and a relist replaces what was known only at its end.
    #[test]
    fn the_index_follows_the_pending_pods_watch() {
        let u = Unschedulable::default();
        u.apply(&watcher::Event::Init);
        u.apply(&watcher::Event::InitApply(pod(
            "a",
            "p",
            "p-1",
            Some("no node"),
        )));
        assert_eq!(u.of("a", "p"), None, "not before the relist is done");
        u.apply(&watcher::Event::InitDone);
        assert_eq!(
            u.of("a", "p").as_deref(),
            Some("pod p-1 cannot be scheduled: no node")
        );
        assert_eq!(u.of("b", "p"), None, "by namespace");
        assert_eq!(u.of("a", "q"), None, "by pipeline");

        u.apply(&watcher::Event::Apply(pod("a", "p", "p-2", Some("full"))));
        u.apply(&watcher::Event::Apply(pod("a", "p", "p-1", None)));
        assert_eq!(
            u.of("a", "p").as_deref(),
            Some("pod p-2 cannot be scheduled: full")
        );
        u.apply(&watcher::Event::Delete(pod("a", "p", "p-2", Some("full"))));
        assert_eq!(u.of("a", "p"), None);
        assert!(
            u.by_pipeline.lock().unwrap().is_empty(),
            "nothing kept for a pipeline without one"
        );

        u.apply(&watcher::Event::Apply(pod("a", "p", "p-3", Some("x"))));
        u.apply(&watcher::Event::Init);
        u.apply(&watcher::Event::InitDone);
        assert_eq!(
            u.of("a", "p"),
            None,
            "a relist that shows nothing clears it"
        );
    }

    /// A slim pod keeps what the index reads and nothing of its spec.
    #[test]
    fn a_slim_pod_keeps_its_identity_and_scheduled_condition_only() {
        let mut p = pod("a", "p", "p-1", Some("no node"));
        p.spec = Some(Default::default());
        slim_pod(&mut p);
        assert!(p.spec.is_none());
        assert_eq!(
            pipeline_of(&p),
            Some((("a".into(), "p".into()), "p-1".into()))
        );
        assert_eq!(unschedulable(&p).as_deref(), Some("no node"));
    }
}
