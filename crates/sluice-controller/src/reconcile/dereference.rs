//! What exists, read before anything is decided or written: the pipeline's children (each
//! must already be this pipeline's: sluice never takes over an object), the SASL password
//! from its Secret, and the input topic's partition count.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::{Api, ResourceExt};
use rdkafka::ClientConfig;
use sluice_api::config::WorkerConfig;
use sluice_api::crd::StreamPipeline;

use super::build::{selector_string, ChildNames};
use super::secrets::PodSecrets;
use super::status::Blocker;
use super::Stop;
use crate::autoscale::lag::LagError;
use crate::context::Context;
use crate::error::Error;

/// What the reconcile found.
#[derive(Clone, Debug)]
pub struct Found {
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
    let (deployment, foreign, monitors) = children(ctx, &ns, &name, &uid).await?;
    if !foreign.is_empty() {
        let list = foreign
            .iter()
            .map(|(k, n)| format!("{k} {n:?}"))
            .collect::<Vec<_>>()
            .join(", ");
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
    let secrets = match PodSecrets::load(&ctx.client, &ns, &sp.spec, security).await {
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
    let (k, topic, cfg) = (
        ctx.kafka.clone(),
        sp.spec.source.topic.clone(),
        kafka.clone(),
    );
    let partitions = match blocking(move || k.partitions(&cfg, &topic)).await? {
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
    let unschedulable = if ready < current {
        unschedulable(ctx, &ns, &name).await?
    } else {
        None
    };
    Ok(Found {
        unschedulable,
        exists: deployment.is_some(),
        current,
        ready,
        partitions,
        kafka,
        monitors,
        secrets_digest: secrets.digest().to_string(),
    })
}

/// A worker pod of the pipeline that the scheduler cannot place (`PodScheduled=False,
/// reason=Unschedulable`: no node matches its selector, tolerations or affinity, or none has
/// room), named with the scheduler's message.
async fn unschedulable(ctx: &Context, ns: &str, name: &str) -> Result<Option<String>, Stop> {
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default().labels(&selector_string(name)))
        .await
        .map_err(|error| Stop::Child {
            kind: "Pod",
            name: format!("{name}-*"),
            error,
        })?;
    Ok(pods.items.iter().find_map(|p| {
        let c = p
            .status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
        (c.reason.as_deref() == Some("Unschedulable")).then(|| {
            format!(
                "pod {} cannot be scheduled: {}",
                p.name_any(),
                c.message.as_deref().unwrap_or("no reason given")
            )
        })
    }))
}

/// Run a blocking Kafka query off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Kafka(format!("kafka query did not complete: {e}")))
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

/// Whether `meta` (an existing object) belongs to the pipeline with `uid`.
fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// The children that exist: the current Deployment, the (kind, name) of each existing
/// object the pipeline's children would overwrite that is not its own, and whether
/// ServiceMonitors exist.
async fn children(
    ctx: &Context,
    ns: &str,
    name: &str,
    uid: &str,
) -> Result<(Option<Deployment>, Vec<(&'static str, String)>, bool), Stop> {
    let c = &ctx.client;
    let names = ChildNames::of(name);
    let failed = |kind: &'static str, name: &str| {
        let name = name.to_string();
        move |error| Stop::Child { kind, name, error }
    };
    let mut foreign = Vec::new();
    let mut check = |kind: &'static str, child: &str, meta: Option<ObjectMeta>| {
        if meta.is_some_and(|m| !owned_by(&m, uid)) {
            foreign.push((kind, child.to_string()));
        }
    };
    let deployment = Api::<Deployment>::namespaced(c.clone(), ns)
        .get_opt(&names.deployment)
        .await
        .map_err(failed("Deployment", &names.deployment))?;
    check(
        "Deployment",
        &names.deployment,
        deployment.as_ref().map(|d| d.metadata.clone()),
    );
    let got = Api::<ConfigMap>::namespaced(c.clone(), ns)
        .get_metadata_opt(&names.config_map)
        .await
        .map_err(failed("ConfigMap", &names.config_map))?;
    check("ConfigMap", &names.config_map, got.map(|m| m.metadata));
    let got = Api::<Service>::namespaced(c.clone(), ns)
        .get_metadata_opt(&names.service)
        .await
        .map_err(failed("Service", &names.service))?;
    check("Service", &names.service, got.map(|m| m.metadata));
    let got = Api::<PodDisruptionBudget>::namespaced(c.clone(), ns)
        .get_metadata_opt(&names.pdb)
        .await
        .map_err(failed("PodDisruptionBudget", &names.pdb))?;
    check("PodDisruptionBudget", &names.pdb, got.map(|m| m.metadata));
    let monitors = has_service_monitors(ctx).await.map_err(failed(
        "CustomResourceDefinition",
        "servicemonitors.monitoring.coreos.com",
    ))?;
    if monitors {
        let api: Api<DynamicObject> =
            Api::namespaced_with(c.clone(), ns, &service_monitor_resource());
        let got = api
            .get_metadata_opt(&names.service_monitor)
            .await
            .map_err(failed("ServiceMonitor", &names.service_monitor))?;
        check(
            "ServiceMonitor",
            &names.service_monitor,
            got.map(|m| m.metadata),
        );
    }
    Ok((deployment, foreign, monitors))
}
