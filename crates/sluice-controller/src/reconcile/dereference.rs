//! What exists, read before anything is decided or written: the pipeline's children (each
//! must already be this pipeline's: sluice never takes over an object), the Secret keys the
//! pods read (reconcile/secrets.rs), the input topic's partition count, and, while workers
//! are missing, a pod the scheduler cannot place.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ApiResource, DynamicObject};
use kube::{Api, ResourceExt};
use rdkafka::ClientConfig;
use sluice_api::config::WorkerConfig;
use sluice_api::crd::StreamPipeline;

use super::build::{ChildNames, APPLIED_HASH};
use super::scale;
use super::secrets::PodSecrets;
use super::status::Blocker;
use super::Stop;
use crate::api::Verb;
use crate::autoscale::lag::{LagError, PartitionLag};
use crate::cache::Cache;
use crate::context::{Context, PipelineKey};
use crate::error::Error;
use crate::kafka::{ConnectionKey, LagOf, Query, Topics};

/// What sluice reads of an existing child: whose it is, the digest of what sluice applied
/// (its annotation), and a stamp that moves when anybody changes it (the generation of a
/// Deployment or PodDisruptionBudget, whose status changes all the time; the
/// resourceVersion of the others).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// It carries this pipeline's controller owner reference.
    pub owned: bool,
    /// Its [`APPLIED_HASH`] annotation.
    pub hash: Option<String>,
    /// Its generation or resourceVersion.
    pub stamp: Option<String>,
}

impl Seen {
    fn of(meta: &ObjectMeta, uid: &str, by_generation: bool) -> Self {
        Seen {
            owned: owned_by(meta, uid),
            hash: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(APPLIED_HASH).cloned()),
            stamp: if by_generation {
                meta.generation.map(|g| g.to_string())
            } else {
                meta.resource_version.clone()
            },
        }
    }
}

/// The children that exist (`None`: absent, or for the ServiceMonitor, not looked at).
#[derive(Clone, Debug, Default)]
pub struct SeenChildren {
    /// The ConfigMap.
    pub config_map: Option<Seen>,
    /// The metrics Service.
    pub service: Option<Seen>,
    /// The PodDisruptionBudget.
    pub pdb: Option<Seen>,
    /// The Deployment.
    pub deployment: Option<Seen>,
    /// The ServiceMonitor.
    pub service_monitor: Option<Seen>,
}

/// What the reconcile found.
#[derive(Clone, Debug)]
pub struct Found {
    /// The children that exist.
    pub children: SeenChildren,
    /// The worker Deployment exists.
    pub exists: bool,
    /// Its replicas.
    pub current: u32,
    /// Its ready replicas.
    pub ready: u32,
    /// The input topic's partition count.
    pub partitions: u32,
    /// How to reach Kafka (with the SASL password, when there is one).
    pub kafka: ClientConfig,
    /// Which connection that is.
    pub connection: ConnectionKey,
    /// The topics the pipeline reads (named, or a pattern resolved at every read).
    pub topics: Topics,
    /// The group's lag, read with the partition count when a decision is due.
    pub lag: Option<Result<Vec<PartitionLag>, LagError>>,
    /// The Prometheus Operator's ServiceMonitor CRD exists.
    pub monitors: bool,
    /// A worker pod the scheduler cannot place, and why (read only while workers are
    /// missing).
    pub unschedulable: Option<String>,
    /// The digest of every Secret key the pods read ([`super::secrets::secrets_digest`]).
    pub secrets_digest: String,
}

/// The Prometheus Operator's ServiceMonitor, as a dynamic resource.
pub fn service_monitor_resource() -> ApiResource {
    ApiResource {
        group: "monitoring.coreos.com".into(),
        version: "v1".into(),
        api_version: "monitoring.coreos.com/v1".into(),
        kind: "ServiceMonitor".into(),
        plural: "servicemonitors".into(),
    }
}

/// Read what exists. A child owned by someone else, a missing Secret or topic, or Kafka out
/// of reach stops the reconcile with a condition.
pub async fn dereference(
    ctx: &Context,
    sp: &StreamPipeline,
    config: &WorkerConfig,
) -> Result<Found, Stop> {
    let ns = sp.namespace().unwrap_or_default();
    let name = sp.name_any();
    let uid = sp.metadata.uid.clone().unwrap_or_default();

    // Never take over: every child that exists must already be this pipeline's.
    let (deployment, children, monitors) = match ctx.cache.get().filter(|c| c.ready()) {
        Some(cache) => cached(ctx, cache, sp, &ns, &name, &uid).await?,
        None => read(ctx, sp, &ns, &name, &uid).await?,
    };
    let names = ChildNames::of(&name);
    let foreign: Vec<String> = [
        ("Deployment", &children.deployment, &names.deployment),
        ("ConfigMap", &children.config_map, &names.config_map),
        ("Service", &children.service, &names.service),
        ("PodDisruptionBudget", &children.pdb, &names.pdb),
        (
            "ServiceMonitor",
            &children.service_monitor,
            &names.service_monitor,
        ),
    ]
    .into_iter()
    .filter(|(_, seen, _)| seen.as_ref().is_some_and(|s| !s.owned))
    .map(|(kind, _, child)| format!("{kind} {child:?}"))
    .collect();
    if !foreign.is_empty() {
        let list = foreign.join(", ");
        return Err(Stop::Blocked {
            blocker: Blocker::ResourceConflict(format!(
                "{list} already exist(s) in namespace {ns:?} and do(es) not belong to this pipeline: sluice will not modify or adopt it; delete or rename it, or rename the pipeline"
            )),
            action: "Apply",
            result: "conflict",
            retry: Some(Duration::from_secs(30)),
        });
    }

    // The partition count. A missing topic or Secret is a condition (and a Warning Event
    // when it first appears), not a crash.
    let source = |blocker, retry| Stop::Blocked {
        blocker,
        action: "InspectSource",
        result: "source_error",
        retry: Some(retry),
    };
    let security = &config.source.security;
    let secrets = match PodSecrets::load(ctx, sp, security).await {
        Ok(secrets) => secrets,
        Err(Error::Secret(secret, why)) => {
            return Err(source(
                Blocker::SecretNotFound(format!(
                    "Secret {secret:?} in namespace {ns:?} {why}; create it or fix spec.source.security.passwordSecretRef, keyPasswordSecretRef or spec.secretFiles"
                )),
                Duration::from_secs(30),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let kafka = match secrets.client_config(&config.source.bootstrap_servers, security) {
        Ok(kafka) => kafka,
        Err(missing) => {
            return Err(source(
                Blocker::SecretNotFound(format!(
                    "{} needs a Secret, and none is given for `{}`: set spec.source.security.passwordSecretRef",
                    missing.what, missing.var
                )),
                Duration::from_secs(30),
            ))
        }
    };
    // One query for the partition count, and the lag too when a decision is due: batched
    // with the other pipelines' on the same Kafka.
    let connection = ConnectionKey::of(&kafka);
    let uid_key = (PipelineKey::new(&ns, &name), uid.clone());
    ctx.memory(&uid_key.0, &uid_key.1, |m| {
        m.connection = Some(connection.clone())
    });
    let topics = match config.source.subscription() {
        Ok(s) => Topics::of(&s),
        // Validated before: not reached.
        Err(e) => {
            return Err(Stop::Blocked {
                blocker: Blocker::InvalidSpec(e.to_string()),
                action: "Validate",
                result: "invalid",
                retry: None,
            })
        }
    };
    let query = Query {
        topics: topics.clone(),
        lag: scale::due(ctx, sp).then(|| LagOf {
            group: sp.spec.source.group_id.clone(),
            start: sp.spec.source.start_from,
        }),
    };
    let answer = ctx.reads.ask(&connection, &kafka, query).await;
    let partitions = match answer.partitions {
        Ok(p) => p,
        Err(e @ LagError::TopicNotFound(_)) => {
            return Err(source(
                Blocker::TopicNotFound(e.to_string()),
                Duration::from_secs(30),
            ))
        }
        Err(e @ LagError::Kafka { .. }) => {
            return Err(source(
                Blocker::KafkaUnavailable(e.to_string()),
                Duration::from_secs(15),
            ))
        }
    };
    ctx.metrics
        .partitions
        .with_label_values(&[ns.as_str(), name.as_str()])
        .set(partitions as i64);

    let current = deployment
        .as_ref()
        .and_then(|d| d.spec.as_ref()?.replicas)
        .unwrap_or(0)
        .max(0) as u32;
    let ready = deployment
        .as_ref()
        .and_then(|d| d.status.as_ref()?.ready_replicas)
        .unwrap_or(0)
        .max(0) as u32;
    // From the watch of pending worker pods (cache.rs), not a request.
    let unschedulable = if ready < current {
        ctx.cache.get().and_then(|c| c.unschedulable(&ns, &name))
    } else {
        None
    };
    Ok(Found {
        children,
        unschedulable,
        exists: deployment.is_some(),
        current,
        ready,
        partitions,
        kafka,
        connection,
        topics,
        lag: answer.lag,
        monitors,
        secrets_digest: secrets.digest().to_string(),
    })
}

/// Whether the Prometheus Operator's ServiceMonitor CRD exists (checked at most once a minute).
async fn has_service_monitors(ctx: &Context) -> Result<bool, kube::Error> {
    if let Some((at, known)) = *ctx.service_monitor_crd.lock().expect("crd cache lock") {
        if at.elapsed() < Duration::from_secs(60) {
            return Ok(known);
        }
    }
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    ctx.api.take(Verb::Get).await;
    let known = crds
        .get_opt("servicemonitors.monitoring.coreos.com")
        .await?
        .is_some();
    *ctx.service_monitor_crd.lock().expect("crd cache lock") = Some((Instant::now(), known));
    Ok(known)
}

/// Whether `meta` (an existing object) belongs to the pipeline with `uid`.
fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// Whether the ServiceMonitor must be looked at: when ServiceMonitors exist and this
/// controller has not applied the pipeline's since it started (it is not watched).
fn check_monitor(ctx: &Context, sp: &StreamPipeline, monitors: bool) -> bool {
    let key = PipelineKey::new(sp.namespace().unwrap_or_default(), sp.name_any());
    let uid = sp.metadata.uid.clone().unwrap_or_default();
    monitors && ctx.memory(&key, &uid, |m| m.applied.service_monitor.is_none())
}

/// The ServiceMonitor `name` in `ns`, read.
async fn read_monitor(
    ctx: &Context,
    ns: &str,
    name: &str,
    uid: &str,
) -> Result<Option<Seen>, Stop> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &service_monitor_resource());
    ctx.api.take(Verb::Get).await;
    let got = api
        .get_metadata_opt(name)
        .await
        .map_err(|error| Stop::Child {
            kind: "ServiceMonitor",
            name: name.to_string(),
            error,
        })?;
    Ok(got.map(|m| Seen::of(&m.metadata, uid, false)))
}

type Existing = (Option<Deployment>, SeenChildren, bool);

/// The children as the watches show them: no request, unless the ServiceMonitor must be
/// looked at.
async fn cached(
    ctx: &Context,
    cache: &Cache,
    sp: &StreamPipeline,
    ns: &str,
    name: &str,
    uid: &str,
) -> Result<Existing, Stop> {
    let names = ChildNames::of(name);
    let deployment = cache
        .deployment(ns, &names.deployment)
        .map(|d| (*d).clone());
    let monitors = has_service_monitors(ctx)
        .await
        .map_err(|error| Stop::Child {
            kind: "CustomResourceDefinition",
            name: "servicemonitors.monitoring.coreos.com".into(),
            error,
        })?;
    let service_monitor = if check_monitor(ctx, sp, monitors) {
        read_monitor(ctx, ns, &names.service_monitor, uid).await?
    } else {
        None
    };
    let children = SeenChildren {
        deployment: deployment
            .as_ref()
            .map(|d| Seen::of(&d.metadata, uid, true)),
        config_map: cache
            .config_map(ns, &names.config_map)
            .map(|m| Seen::of(&m, uid, false)),
        service: cache
            .service(ns, &names.service)
            .map(|m| Seen::of(&m, uid, false)),
        pdb: cache.pdb(ns, &names.pdb).map(|m| Seen::of(&m, uid, true)),
        service_monitor,
    };
    Ok((deployment, children, monitors))
}

/// The children as the API server has them, one request each (when there are no watches).
async fn read(
    ctx: &Context,
    sp: &StreamPipeline,
    ns: &str,
    name: &str,
    uid: &str,
) -> Result<Existing, Stop> {
    let c = &ctx.client;
    let names = ChildNames::of(name);
    let failed = |kind: &'static str, name: &str| {
        let name = name.to_string();
        move |error| Stop::Child { kind, name, error }
    };
    ctx.api.take(Verb::Get).await;
    let deployment = Api::<Deployment>::namespaced(c.clone(), ns)
        .get_opt(&names.deployment)
        .await
        .map_err(failed("Deployment", &names.deployment))?;
    ctx.api.take(Verb::Get).await;
    let config_map = Api::<ConfigMap>::namespaced(c.clone(), ns)
        .get_metadata_opt(&names.config_map)
        .await
        .map_err(failed("ConfigMap", &names.config_map))?;
    ctx.api.take(Verb::Get).await;
    let service = Api::<Service>::namespaced(c.clone(), ns)
        .get_metadata_opt(&names.service)
        .await
        .map_err(failed("Service", &names.service))?;
    ctx.api.take(Verb::Get).await;
    let pdb = Api::<PodDisruptionBudget>::namespaced(c.clone(), ns)
        .get_metadata_opt(&names.pdb)
        .await
        .map_err(failed("PodDisruptionBudget", &names.pdb))?;
    let monitors = has_service_monitors(ctx).await.map_err(failed(
        "CustomResourceDefinition",
        "servicemonitors.monitoring.coreos.com",
    ))?;
    let service_monitor = if monitors {
        read_monitor(ctx, ns, &names.service_monitor, uid).await?
    } else {
        None
    };
    let _ = sp;
    let children = SeenChildren {
        deployment: deployment
            .as_ref()
            .map(|d| Seen::of(&d.metadata, uid, true)),
        config_map: config_map.map(|m| Seen::of(&m.metadata, uid, false)),
        service: service.map(|m| Seen::of(&m.metadata, uid, false)),
        pdb: pdb.map(|m| Seen::of(&m.metadata, uid, true)),
        service_monitor,
    };
    Ok((deployment, children, monitors))
}
