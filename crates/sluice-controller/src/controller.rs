//! The reconciler: a kube-runtime Controller over StreamPipelines that owns their
//! Deployments, ConfigMaps, Services and PodDisruptionBudgets.
//!
//! Each reconcile is a visible pipeline: validate (pure) -> ask Kafka for the partition
//! count and lag (I/O) -> decide replicas (pure policy) -> build children (pure) -> apply
//! them with server-side apply and owner references -> write status with computed
//! conditions. An invalid spec waits for a change; transient errors back off exponentially.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::NamespaceResourceScope;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use rdkafka::ClientConfig;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sluice_api::config::StartFrom;
use sluice_api::crd::{PipelineSource, ScalingMode, StreamPipeline, StreamPipelineStatus};

use crate::autoscale::lag::{group_lag, partition_count, LagError, PartitionLag};
use crate::autoscale::policy::{Autoscaler, Lag, Limit, Policy, Reason};
use crate::autoscale::stall::{stall_window, StallDetector};
use crate::reconcile::build::{
    build_configmap, build_deployment, build_pdb, build_service, build_service_monitor,
    selector_string, Validated,
};
use crate::reconcile::status::{conditions, Observed};
use crate::reconcile::validate;

/// The field manager of every server-side apply.
pub const MANAGER: &str = "sluice-controller";

/// Why a reconcile failed (transiently; an invalid spec is not an error but a condition).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API.
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    /// A Secret the pipeline refers to is missing or lacks the key.
    #[error("secret {0}: {1}")]
    Secret(String, String),
    /// Kafka could not be reached.
    #[error("kafka: {0}")]
    Kafka(String),
}

impl Error {
    /// A bounded label for metrics and Events.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::Secret(..) => "secret",
            Error::Kafka(_) => "kafka",
        }
    }
}

/// Controller metrics (bounded labels: pipeline, namespace, category, decision).
#[derive(Clone)]
pub struct ControllerMetrics {
    /// The registry served on /metrics.
    pub registry: Registry,
    reconciles: IntCounterVec,
    duration: HistogramVec,
    errors: IntCounterVec,
    decisions: IntCounterVec,
    desired: IntGaugeVec,
    current: IntGaugeVec,
    lag: IntGaugeVec,
    partitions: IntGaugeVec,
    ready: IntGaugeVec,
    limited: IntGaugeVec,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        let registry = Registry::new();
        let p = ["namespace", "pipeline"];
        let c = |n: &str, h: &str, l: &[&str]| {
            let m = IntCounterVec::new(Opts::new(n, h), l).expect("metric");
            registry.register(Box::new(m.clone())).expect("register");
            m
        };
        let g = |n: &str, h: &str| {
            let m = IntGaugeVec::new(Opts::new(n, h), &p).expect("metric");
            registry.register(Box::new(m.clone())).expect("register");
            m
        };
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "sluice_controller_reconcile_duration_seconds",
                "Duration of reconciles.",
            ),
            &[],
        )
        .expect("metric");
        registry
            .register(Box::new(duration.clone()))
            .expect("register");
        ControllerMetrics {
            reconciles: c(
                "sluice_controller_reconciliations_total",
                "Reconciles, by result.",
                &["result"],
            ),
            errors: c(
                "sluice_controller_errors_total",
                "Reconcile errors, by category.",
                &["category"],
            ),
            decisions: c(
                "sluice_controller_scaling_decisions_total",
                "Scaling decisions, by reason.",
                &["namespace", "pipeline", "reason"],
            ),
            desired: g(
                "sluice_controller_desired_replicas",
                "Replicas the autoscaler wants.",
            ),
            current: g(
                "sluice_controller_current_replicas",
                "Replicas of the worker Deployment.",
            ),
            lag: g(
                "sluice_controller_observed_lag",
                "Consumer lag observed by the controller (records).",
            ),
            partitions: g(
                "sluice_controller_partitions",
                "Partitions of the input topic.",
            ),
            ready: g(
                "sluice_controller_ready_replicas",
                "Ready worker pods of the pipeline's Deployment.",
            ),
            limited: g(
                "sluice_controller_scaling_limited",
                "1 while maxReplicas or the partition count caps what lag asks for.",
            ),
            duration,
            registry,
        }
    }
}

/// Reads partition counts and lag from Kafka. A trait so tests can substitute it.
pub trait KafkaInspector: Send + Sync + 'static {
    /// Partition count of the source topic.
    fn partitions(&self, config: &ClientConfig, topic: &str) -> Result<u32, LagError>;
    /// Lag of `group` on each partition of `topic`; `start` is where the group starts
    /// without a commit.
    fn lag(
        &self,
        config: &ClientConfig,
        group: &str,
        topic: &str,
        start: StartFrom,
    ) -> Result<Vec<PartitionLag>, LagError>;
}

/// The real inspector (rdkafka).
#[derive(Debug, Default)]
pub struct RdKafka;

impl KafkaInspector for RdKafka {
    fn partitions(&self, config: &ClientConfig, topic: &str) -> Result<u32, LagError> {
        partition_count(config, topic, Duration::from_secs(10)).map(|p| p as u32)
    }
    fn lag(
        &self,
        config: &ClientConfig,
        group: &str,
        topic: &str,
        start: StartFrom,
    ) -> Result<Vec<PartitionLag>, LagError> {
        group_lag(config, group, topic, start, Duration::from_secs(10))
    }
}

/// Shared state of the reconciler.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Kafka access.
    pub kafka: Arc<dyn KafkaInspector>,
    /// Image for pipelines that do not name one.
    pub default_image: String,
    /// Metrics.
    pub metrics: ControllerMetrics,
    recorder: Recorder,
    service_monitor_crd: Mutex<Option<(Instant, bool)>>,
    autoscalers: Mutex<HashMap<String, Autoscaler>>,
    stalls: Mutex<HashMap<String, StallDetector>>,
    failures: Mutex<HashMap<String, u32>>,
    paced: Mutex<HashMap<String, Paced>>,
}

impl Context {
    /// A context for `client`.
    pub fn new(client: Client, kafka: Arc<dyn KafkaInspector>, default_image: String) -> Arc<Self> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Arc::new(Context {
            client,
            kafka,
            default_image,
            metrics: ControllerMetrics::default(),
            recorder,
            service_monitor_crd: Mutex::new(None),
            autoscalers: Mutex::new(HashMap::new()),
            stalls: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            paced: Mutex::new(HashMap::new()),
        })
    }
}

async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<K, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
}

/// The Prometheus Operator's ServiceMonitor, as a dynamic resource.
pub fn service_monitor_resource() -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: "monitoring.coreos.com".into(),
        version: "v1".into(),
        api_version: "monitoring.coreos.com/v1".into(),
        kind: "ServiceMonitor".into(),
        plural: "servicemonitors".into(),
    }
}

/// Whether the Prometheus Operator's ServiceMonitor CRD exists (checked at most once a minute).
async fn has_service_monitors(ctx: &Context) -> Result<bool, kube::Error> {
    if let Some((at, known)) = *ctx.service_monitor_crd.lock().expect("crd cache lock") {
        if at.elapsed() < Duration::from_secs(60) {
            return Ok(known);
        }
    }
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    let known = crds
        .get_opt("servicemonitors.monitoring.coreos.com")
        .await?
        .is_some();
    *ctx.service_monitor_crd.lock().expect("crd cache lock") = Some((Instant::now(), known));
    Ok(known)
}

async fn kafka_config(
    client: &Client,
    ns: &str,
    source: &PipelineSource,
) -> Result<ClientConfig, Error> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &source.bootstrap_servers).set(
        "security.protocol",
        source.security.protocol.as_librdkafka(),
    );
    if let Some(m) = source.security.sasl_mechanism {
        c.set("sasl.mechanism", m.as_librdkafka());
        c.set(
            "sasl.username",
            source.security.username.clone().unwrap_or_default(),
        );
    }
    if let Some(r) = &source.security.password_secret_ref {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let s = secrets
            .get_opt(&r.name)
            .await?
            .ok_or_else(|| Error::Secret(r.name.clone(), "not found".into()))?;
        let v = s
            .data
            .and_then(|d| d.get(&r.key).cloned())
            .ok_or_else(|| Error::Secret(r.name.clone(), format!("has no key `{}`", r.key)))?;
        c.set("sasl.password", String::from_utf8_lossy(&v.0).to_string());
    }
    Ok(c)
}

async fn write_status(
    client: &Client,
    ns: &str,
    name: &str,
    status: StreamPipelineStatus,
) -> Result<(), kube::Error> {
    // Untyped: the answer is the whole object, which need not parse (a poison spec).
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &pipeline_resource());
    let patch = serde_json::json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline", "status": status});
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Kafka(format!("kafka query did not complete: {e}")))
}

/// The StreamPipeline resource, for the untyped watch.
pub fn pipeline_resource() -> ApiResource {
    ApiResource::erase::<StreamPipeline>(&())
}

/// Whether the pipeline `name` with `uid` still exists and is not being deleted, read
/// from the API server (a live GET, not the watch cache).
async fn still_exists(client: &Client, ns: &str, name: &str, uid: &str) -> Result<bool, Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &pipeline_resource());
    Ok(api.get_opt(name).await?.is_some_and(|o| {
        o.metadata.uid.as_deref() == Some(uid) && o.metadata.deletion_timestamp.is_none()
    }))
}

/// Reconcile one StreamPipeline as the API server stored it. It is parsed here, per object:
/// one that does not parse (stored through an older or looser schema) gets `Ready=False,
/// InvalidSpec` naming the field, and every other pipeline goes on reconciling.
pub async fn reconcile_object(obj: Arc<DynamicObject>, ctx: Arc<Context>) -> Result<Action, Error> {
    let e = match validate::parse(&obj) {
        Ok(sp) => return reconcile(Arc::new(sp), ctx).await,
        Err(e) => e,
    };
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let generation = obj.metadata.generation;
    let previous: StreamPipelineStatus = obj
        .data
        .get("status")
        .and_then(|s| serde_json::from_value(s.clone()).ok())
        .unwrap_or_default();
    let status = StreamPipelineStatus {
        observed_generation: generation,
        conditions: conditions(
            &Observed {
                invalid: Some(e.to_string()),
                ..Default::default()
            },
            generation,
            &previous.conditions,
        ),
        ..previous.clone()
    };
    write_status(&ctx.client, &ns, &name, status).await?;
    publish(
        &ctx,
        &obj.object_ref(&pipeline_resource()),
        "InvalidSpec",
        e.to_string(),
        "Validate",
    )
    .await;
    ctx.metrics.reconciles.with_label_values(&["invalid"]).inc();
    Ok(Action::await_change())
}

async fn publish(
    ctx: &Context,
    obj_ref: &ObjectReference,
    reason: &str,
    note: String,
    action: &str,
) {
    let published = ctx
        .recorder
        .publish(
            &Event {
                type_: EventType::Warning,
                reason: reason.into(),
                note: Some(note),
                action: action.into(),
                secondary: None,
            },
            obj_ref,
        )
        .await;
    if let Err(e) = published {
        tracing::warn!(error = %e, reason, "could not publish an Event");
    }
}

/// An API error about one child, in a bounded category: the Ready reason and Event reason.
fn child_error_reason(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(ae) => match ae.code {
            400 | 422 => "ChildRejected",
            401 | 403 => "ChildForbidden",
            404 => "ChildNotFound",
            409 => "ChildConflict",
            429 => "ChildThrottled",
            _ => "ChildApiError",
        },
        _ => "ChildApiError",
    }
}

/// A permanent refusal (the request itself is wrong) waits for a change or a slow retry;
/// anything else backs off as a transient error.
fn child_error_is_permanent(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(ae) if matches!(ae.code, 400 | 401 | 403 | 404 | 422))
}

/// What the API server said, without the client's wrapping.
fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(ae) => ae.message.clone(),
        e => e.to_string(),
    }
}

/// Report a condition that stops the reconcile: `Ready=False` with its reason and
/// message, and a Warning Event when the reason is new (or the spec is invalid).
async fn refuse(
    ctx: &Context,
    sp: &StreamPipeline,
    status: StreamPipelineStatus,
    o: Observed,
    action: &str,
) -> Result<(), kube::Error> {
    let (reason, message) = match (&o.invalid, &o.source_error) {
        (Some(m), _) => ("InvalidSpec".to_string(), m.clone()),
        (None, Some((r, m))) => (r.clone(), m.clone()),
        _ => unreachable!("refuse() is called with invalid or source_error set"),
    };
    let previous = sp.status.clone().unwrap_or_default();
    // One Event when the reason appears (a Kafka error's text varies from poll to poll);
    // an invalid spec is reconciled only when it changes, so each version gets its Event.
    let new = !previous
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.reason == reason);
    let generation = sp.metadata.generation;
    let status = StreamPipelineStatus {
        conditions: conditions(&o, generation, &previous.conditions),
        ..status
    };
    let written = write_status(
        &ctx.client,
        &sp.namespace().unwrap_or_default(),
        &sp.name_any(),
        status,
    )
    .await;
    if new || reason == "InvalidSpec" {
        publish(ctx, &sp.object_ref(&()), &reason, message, action).await;
    }
    written
}

/// Whether `meta` (an existing object) belongs to the pipeline with `uid`.
fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// Existing objects the pipeline's children would overwrite that are not its own: (kind,
/// name) of each. Also returns the current Deployment.
async fn foreign_children(
    ctx: &Context,
    ns: &str,
    name: &str,
    uid: &str,
) -> Result<(Option<Deployment>, Vec<(&'static str, String)>), (&'static str, String, kube::Error)>
{
    let c = &ctx.client;
    let mut foreign = Vec::new();
    let mut check = |kind: &'static str, child: String, meta: Option<ObjectMeta>| {
        if meta.is_some_and(|m| !owned_by(&m, uid)) {
            foreign.push((kind, child));
        }
    };
    let deployment = Api::<Deployment>::namespaced(c.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| ("Deployment", name.to_string(), e))?;
    check(
        "Deployment",
        name.to_string(),
        deployment.as_ref().map(|d| d.metadata.clone()),
    );
    let cm = format!("{name}-config");
    let got = Api::<ConfigMap>::namespaced(c.clone(), ns)
        .get_metadata_opt(&cm)
        .await
        .map_err(|e| ("ConfigMap", cm.clone(), e))?;
    check("ConfigMap", cm, got.map(|m| m.metadata));
    let svc = format!("{name}-metrics");
    let got = Api::<Service>::namespaced(c.clone(), ns)
        .get_metadata_opt(&svc)
        .await
        .map_err(|e| ("Service", svc.clone(), e))?;
    check("Service", svc, got.map(|m| m.metadata));
    let got = Api::<PodDisruptionBudget>::namespaced(c.clone(), ns)
        .get_metadata_opt(name)
        .await
        .map_err(|e| ("PodDisruptionBudget", name.to_string(), e))?;
    check(
        "PodDisruptionBudget",
        name.to_string(),
        got.map(|m| m.metadata),
    );
    let monitors = has_service_monitors(ctx).await.map_err(|e| {
        (
            "CustomResourceDefinition",
            "servicemonitors.monitoring.coreos.com".into(),
            e,
        )
    })?;
    if monitors {
        let api: Api<DynamicObject> =
            Api::namespaced_with(c.clone(), ns, &service_monitor_resource());
        let got = api
            .get_metadata_opt(name)
            .await
            .map_err(|e| ("ServiceMonitor", name.to_string(), e))?;
        check("ServiceMonitor", name.to_string(), got.map(|m| m.metadata));
    }
    Ok((deployment, foreign))
}

/// The scaling decision reused until the next poll (reconciles caused by status updates
/// and child events do not decide again).
#[derive(Clone, Debug)]
struct Paced {
    at: Instant,
    generation: Option<i64>,
    partitions: u32,
    replicas: u32,
    desired: Option<i32>,
    lag: Option<i64>,
    lag_unknown: Option<String>,
    limited: Option<(String, String)>,
    stalled: Vec<i32>,
    idle: Option<String>,
    idle_blocked: Option<String>,
    woke: bool,
}

/// Reconcile one StreamPipeline.
pub async fn reconcile(sp: Arc<StreamPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = sp.namespace().unwrap_or_default();
    let name = sp.name_any();
    let uid = sp.metadata.uid.clone().unwrap_or_default();
    let key = format!("{ns}/{name}");
    let generation = sp.metadata.generation;
    let previous = sp.status.clone().unwrap_or_default();
    let mut status = StreamPipelineStatus {
        observed_generation: generation,
        selector: Some(selector_string(&name)),
        ..previous.clone()
    };
    let obj_ref = sp.object_ref(&());
    let labels = [ns.as_str(), name.as_str()];

    // 1. Validate (pure). An invalid spec waits for a change.
    let config = match validate::validate(&sp) {
        Ok(c) => c,
        Err(e) => {
            let o = Observed {
                invalid: Some(e.to_string()),
                ..Default::default()
            };
            refuse(&ctx, &sp, status, o, "Validate").await?;
            ctx.metrics.reconciles.with_label_values(&["invalid"]).inc();
            return Ok(Action::await_change());
        }
    };

    // 2. Never take over: every child that exists must already be this pipeline's.
    let existing = match foreign_children(&ctx, &ns, &name, &uid).await {
        Ok((existing, foreign)) if foreign.is_empty() => existing,
        Ok((_, foreign)) => {
            let list = foreign
                .iter()
                .map(|(k, n)| format!("{k} {n:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            let o = Observed {
                source_error: Some((
                    "ResourceConflict".into(),
                    format!(
                        "{list} already exist(s) in namespace {ns:?} and do(es) not belong to this pipeline: sluice will not modify or adopt it; delete or rename it, or rename the pipeline"
                    ),
                )),
                ..Default::default()
            };
            refuse(&ctx, &sp, status, o, "Apply").await?;
            ctx.metrics
                .reconciles
                .with_label_values(&["conflict"])
                .inc();
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        Err((kind, child, e)) => return child_failed(&ctx, &sp, status, kind, &child, e).await,
    };

    // 3. Ask Kafka for the partition count. A missing topic or Secret is a condition (and
    //    a Warning Event when it first appears), not a crash.
    let topic = sp.spec.source.topic.clone();
    let source = match kafka_config(&ctx.client, &ns, &sp.spec.source).await {
        Ok(kcfg) => {
            let (k, t2) = (ctx.kafka.clone(), topic.clone());
            match blocking(move || k.partitions(&kcfg, &t2).map(|p| (p, kcfg))).await? {
                Ok(found) => Ok(found),
                Err(e @ LagError::TopicNotFound(_)) => {
                    Err(("TopicNotFound", e.to_string(), Duration::from_secs(30)))
                }
                Err(e @ LagError::Kafka { .. }) => {
                    Err(("KafkaUnavailable", e.to_string(), Duration::from_secs(15)))
                }
            }
        }
        Err(Error::Secret(secret, why)) => Err((
            "SecretNotFound",
            format!(
                "Secret {secret:?} in namespace {ns:?} {why}; create it or fix spec.source.security.passwordSecretRef"
            ),
            Duration::from_secs(30),
        )),
        Err(e) => return Err(e),
    };
    let (partitions, kcfg) = match source {
        Ok(found) => found,
        Err((reason, message, retry)) => {
            let o = Observed {
                source_error: Some((reason.into(), message)),
                ..Default::default()
            };
            refuse(&ctx, &sp, status, o, "InspectSource").await?;
            ctx.metrics
                .reconciles
                .with_label_values(&["source_error"])
                .inc();
            return Ok(Action::requeue(retry));
        }
    };
    status.partitions = Some(partitions as i32);
    ctx.metrics
        .partitions
        .with_label_values(&labels)
        .set(partitions as i64);

    // 4. Decide replicas, at most once per poll interval.
    let current = existing
        .as_ref()
        .and_then(|d| d.spec.as_ref()?.replicas)
        .unwrap_or(0)
        .max(0) as u32;
    let ready = existing
        .as_ref()
        .and_then(|d| d.status.as_ref()?.ready_replicas)
        .unwrap_or(0)
        .max(0) as u32;
    let scaling = &sp.spec.scaling;
    let poll = scaling.poll_interval.0.max(Duration::from_secs(1));
    let mut observed = Observed {
        paused: sp.spec.paused,
        ready,
        ..Default::default()
    };
    let too_few = |asked: i32| {
        (asked > partitions as i32).then(|| {
            (
                "AtPartitionCount".to_string(),
                format!(
                    "{asked} replicas asked for, the topic has {partitions} partitions: running {partitions} (a replica without a partition would idle)"
                ),
            )
        })
    };
    let mut woke = false;
    let replicas = if sp.spec.paused {
        ctx.paced.lock().expect("paced lock").remove(&key);
        0
    } else if scaling.mode == ScalingMode::Manual {
        ctx.paced.lock().expect("paced lock").remove(&key);
        observed.limited = too_few(sp.spec.replicas);
        (sp.spec.replicas.max(0) as u32).min(partitions)
    } else {
        let last = ctx
            .paced
            .lock()
            .expect("paced lock")
            .get(&key)
            .filter(|p| {
                p.at.elapsed() < poll && p.generation == generation && p.partitions == partitions
            })
            .cloned();
        let paced = match last {
            Some(p) => p,
            None => {
                let p = decide(
                    &ctx,
                    &sp,
                    &key,
                    kcfg,
                    current,
                    ready,
                    partitions,
                    existing.is_some(),
                )
                .await?;
                ctx.paced
                    .lock()
                    .expect("paced lock")
                    .insert(key.clone(), p.clone());
                p
            }
        };
        status.lag = paced.lag.or(status.lag);
        status.desired_replicas = paced.desired;
        observed.lag_unknown = paced.lag_unknown.clone();
        observed.limited = paced.limited.clone();
        observed.stalled = paced.stalled.clone();
        observed.idle = paced.idle.clone();
        observed.idle_blocked = paced.idle_blocked.clone();
        woke = paced.woke;
        paced.replicas
    };
    observed.desired = replicas;

    // 5. Build (pure) and apply the children, if the pipeline is still there. This
    //    reconcile may run from a watch cache that has not seen its deletion yet, and
    //    applying then re-creates children the garbage collector is removing (seen on a
    //    node: the Deployment scaled up again after its pipeline was deleted, and the new
    //    pod failed for its ConfigMap, already gone). So ask the API server, not the cache.
    if !still_exists(&ctx.client, &ns, &name, &uid).await? {
        tracing::info!(pipeline = %key, "the pipeline was deleted meanwhile; not applying its children");
        return Ok(Action::await_change());
    }
    let v = Validated {
        pipeline: (*sp).clone(),
        config,
        partitions,
        image: sp
            .spec
            .image
            .clone()
            .unwrap_or_else(|| ctx.default_image.clone()),
    };
    let cm = build_configmap(&v);
    if let Err(e) = apply(&ctx.client, &ns, &cm).await {
        return child_failed(&ctx, &sp, status, "ConfigMap", &format!("{name}-config"), e).await;
    }
    if let Err(e) = apply(&ctx.client, &ns, &build_service(&v)).await {
        return child_failed(&ctx, &sp, status, "Service", &format!("{name}-metrics"), e).await;
    }
    if let Err(e) = apply(&ctx.client, &ns, &build_pdb(&v)).await {
        return child_failed(&ctx, &sp, status, "PodDisruptionBudget", &name, e).await;
    }
    if let Err(e) = apply(&ctx.client, &ns, &build_deployment(&v, replicas)).await {
        return child_failed(&ctx, &sp, status, "Deployment", &name, e).await;
    }
    if has_service_monitors(&ctx).await.unwrap_or(false) {
        let ar = service_monitor_resource();
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &ar);
        if let Err(e) = api
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(build_service_monitor(&v)),
            )
            .await
        {
            return child_failed(&ctx, &sp, status, "ServiceMonitor", &name, e).await;
        }
    }
    if existing.is_some() && replicas != current {
        status.last_scale_time = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        let reason = if observed.idle.is_some() {
            "ScaledToZero"
        } else if woke {
            "Woke"
        } else {
            "Scaled"
        };
        let _ = ctx
            .recorder
            .publish(
                &Event {
                    type_: EventType::Normal,
                    reason: reason.into(),
                    note: Some(format!(
                        "workers {current} -> {replicas} (lag {:?}, {partitions} partitions)",
                        status.lag
                    )),
                    action: "Scale".into(),
                    secondary: None,
                },
                &obj_ref,
            )
            .await;
    }
    ctx.metrics
        .desired
        .with_label_values(&labels)
        .set(replicas as i64);
    ctx.metrics
        .current
        .with_label_values(&labels)
        .set(current as i64);
    ctx.metrics
        .ready
        .with_label_values(&labels)
        .set(ready as i64);
    ctx.metrics
        .limited
        .with_label_values(&labels)
        .set(observed.limited.is_some() as i64);

    // 6. Status.
    status.replicas = Some(replicas as i32);
    status.conditions = conditions(&observed, generation, &previous.conditions);
    write_status(&ctx.client, &ns, &name, status).await?;
    ctx.failures.lock().expect("failures lock").remove(&key);
    ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
    ctx.metrics
        .duration
        .with_label_values::<&str>(&[])
        .observe(started.elapsed().as_secs_f64());
    Ok(Action::requeue(poll))
}

/// Read lag from Kafka and ask the policy: one paced decision.
#[allow(clippy::too_many_arguments)]
async fn decide(
    ctx: &Context,
    sp: &StreamPipeline,
    key: &str,
    kcfg: ClientConfig,
    current: u32,
    ready: u32,
    partitions: u32,
    exists: bool,
) -> Result<Paced, Error> {
    let ns = sp.namespace().unwrap_or_default();
    let name = sp.name_any();
    let labels = [ns.as_str(), name.as_str()];
    let scaling = &sp.spec.scaling;
    let (k, t2, g2, start) = (
        ctx.kafka.clone(),
        sp.spec.source.topic.clone(),
        sp.spec.source.group_id.clone(),
        sp.spec.source.start_from,
    );
    let mut paced = Paced {
        at: Instant::now(),
        generation: sp.metadata.generation,
        partitions,
        replicas: current,
        desired: None,
        lag: None,
        lag_unknown: None,
        limited: None,
        stalled: Vec::new(),
        idle: None,
        idle_blocked: None,
        woke: false,
    };
    let lag = match blocking(move || k.lag(&kcfg, &g2, &t2, start)).await? {
        Ok(parts) => {
            let total: u64 = parts.iter().map(|p| p.lag).sum();
            // Only running workers can be stalled; with none ready, WorkersNotReady
            // already says why nothing moves.
            if ready > 0 {
                paced.stalled = ctx
                    .stalls
                    .lock()
                    .expect("stalls lock")
                    .entry(key.to_string())
                    .or_default()
                    .observe(
                        Instant::now(),
                        &parts,
                        stall_window(scaling.poll_interval.0),
                    );
            } else {
                // No worker runs (scaled to zero, paused, starting): forget when the
                // commits last moved, or the first poll after workers are back (a wake
                // from zero) would count the time without any as a stall.
                ctx.stalls.lock().expect("stalls lock").remove(key);
            }
            // Lag more replicas can reduce: not on stalled partitions.
            let moving = parts
                .iter()
                .filter(|p| p.lag > 0 && !paced.stalled.contains(&p.partition));
            let (records, busy) = moving.fold((0u64, 0u32), |(r, b), p| (r + p.lag, b + 1));
            paced.lag = Some(total as i64);
            ctx.metrics.lag.with_label_values(&labels).set(total as i64);
            // Records ever written, to tell "no new records" from "consumed at once". A
            // group that starts at the end of the log and has a partition with no commit
            // must not idle: woken, its workers would start after the records that woke it.
            let uncommitted: Vec<String> = parts
                .iter()
                .filter(|p| p.committed.is_none())
                .map(|p| p.partition.to_string())
                .collect();
            let written = if start == StartFrom::Latest && !uncommitted.is_empty() {
                if scaling.min_replicas == 0 {
                    paced.idle_blocked = Some(format!(
                        "source.startFrom is latest and partition(s) {} have no committed offset: scaled to zero, the workers would start after the records that woke them, so the pipeline stays up until every partition has a commit",
                        uncommitted.join(", ")
                    ));
                }
                None
            } else {
                Some(parts.iter().map(|p| p.high).sum::<i64>())
            };
            Lag::with_writes(records, busy, total, written)
        }
        Err(e) => {
            paced.lag_unknown = Some(e.to_string());
            Lag::Unknown
        }
    };
    let policy = Policy {
        min: scaling.min_replicas.max(0) as u32,
        max: scaling.max_replicas.max(0) as u32,
        lag_per_replica: scaling.lag_per_replica.max(1) as u64,
        scale_down_window: scaling.scale_down_stabilization.0,
        idle_after: scaling.scale_to_zero_after(),
        activation: scaling.activation(),
    };
    // A Deployment that does not exist yet starts from the minimum (1 for a pipeline that
    // may scale to zero: it idles once quiet), and nothing of it can be "not ready" yet.
    let (base, ready) = if exists {
        (current, ready)
    } else {
        let m = policy.min.max(1).min(partitions);
        (m, m)
    };
    let d = ctx
        .autoscalers
        .lock()
        .expect("autoscalers lock")
        .entry(key.to_string())
        .or_default()
        .decide(Instant::now(), base, ready, lag, partitions, &policy);
    ctx.metrics
        .decisions
        .with_label_values(&[ns.as_str(), name.as_str(), d.reason.label()])
        .inc();
    paced.desired = d.desired.map(|r| r as i32);
    paced.replicas = d.replicas;
    paced.woke = d.reason == Reason::Wake;
    if matches!(d.reason, Reason::Idle | Reason::ScaleToZero) {
        paced.idle = Some(format!(
            "no lag and no new records for {}: scaled to zero; {} record(s) of lag wake it (checked every {})",
            sluice_api::units::HumanDuration(policy.idle_after.unwrap_or_default()),
            policy.activation,
            scaling.poll_interval,
        ));
    }
    paced.limited = d.limited.map(|l| match l {
        Limit::MaxReplicas => ("AtMaxReplicas".to_string(), format!("lag asks for more than maxReplicas ({})", policy.max)),
        Limit::Partitions => ("AtPartitionCount".to_string(), format!("lag asks for more replicas than the topic's {partitions} partitions; extra replicas would idle")),
        Limit::PartitionsWithLag => ("LagOnFewPartitions".to_string(), "the lag sits on fewer partitions than it would take replicas; a replica per partition with lag is the most that helps".to_string()),
        Limit::MinAbovePartitions => ("MinReplicasAbovePartitions".to_string(), format!("minReplicas ({}) is above the topic's {partitions} partitions; running {partitions} (a replica without a partition would idle)", policy.min)),
    });
    Ok(paced)
}

/// An API error about a child: `Ready=False` with the category as the reason and the API
/// server's message, a Warning Event, then a slow retry (the request was refused) or the
/// usual backoff (anything else).
async fn child_failed(
    ctx: &Context,
    sp: &StreamPipeline,
    status: StreamPipelineStatus,
    kind: &str,
    child: &str,
    e: kube::Error,
) -> Result<Action, Error> {
    let reason = child_error_reason(&e);
    let o = Observed {
        source_error: Some((
            reason.into(),
            format!("{kind} {child:?}: {}", api_message(&e)),
        )),
        ..Default::default()
    };
    // The API server may be what failed: the error is what matters, not this write.
    let _ = refuse(ctx, sp, status, o, "Apply").await;
    if child_error_is_permanent(&e) {
        ctx.metrics
            .reconciles
            .with_label_values(&["child_rejected"])
            .inc();
        Ok(Action::requeue(Duration::from_secs(60)))
    } else {
        Err(Error::Kube(e))
    }
}

/// Transient errors back off exponentially per object: 1 s, 2 s, 4 s ... up to 5 min.
pub fn error_policy(sp: Arc<DynamicObject>, err: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", sp.namespace().unwrap_or_default(), sp.name_any());
    let n = {
        let mut f = ctx.failures.lock().expect("failures lock");
        let n = f.entry(key).or_insert(0);
        *n += 1;
        *n
    };
    ctx.metrics.errors.with_label_values(&[err.label()]).inc();
    ctx.metrics.reconciles.with_label_values(&["error"]).inc();
    tracing::warn!(pipeline = %sp.name_any(), category = err.label(), error = %err, attempt = n, "reconcile failed");
    Action::requeue(backoff(n))
}

/// The retry delay after `n` consecutive failures.
pub fn backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

/// Run the controller over every namespace until the stream ends (shutdown signal).
pub async fn run(ctx: Arc<Context>) {
    run_in(ctx, None).await
}

fn scoped<K>(c: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(c.clone(), ns),
        None => Api::all(c.clone()),
    }
}

/// Run the controller over one namespace (`Some`) or all of them (`None`).
pub async fn run_in(ctx: Arc<Context>, namespace: Option<&str>) {
    let c = ctx.client.clone();
    let cfg = watcher::Config::default;
    let ar = pipeline_resource();
    // Untyped: a stored object the typed client could not parse would fail the whole list
    // and stop every pipeline; each one is parsed in reconcile_object instead.
    let pipelines: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(c.clone(), ns, &ar),
        None => Api::all_with(c.clone(), &ar),
    };
    Controller::new_with(pipelines, cfg().any_semantic(), ar)
        .owns(scoped::<Deployment>(&c, namespace), cfg())
        .owns(scoped::<ConfigMap>(&c, namespace), cfg())
        .owns(scoped::<Service>(&c, namespace), cfg())
        .owns(scoped::<PodDisruptionBudget>(&c, namespace), cfg())
        .shutdown_on_signal()
        .run(reconcile_object, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile loop");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let got: Vec<u64> = (1..=12).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    }
}
