//! Server-side apply of the children, in order (ConfigMap, Service, PodDisruptionBudget,
//! Deployment, ServiceMonitor), with owner references and one field manager, and only
//! while the pipeline still exists. A child that shows the digest of what would be applied
//! ([`APPLIED_HASH`]) and that nobody changed since sluice applied it (its generation or
//! resourceVersion is the one sluice saw) is left alone: a steady pipeline costs no write.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, Preconditions};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sluice_api::crd::StreamPipeline;

use super::build::{Children, HEADLESS};
use super::dereference::{service_monitor_resource, Found, Seen};
use super::Stop;
use crate::api::Verb;
use crate::context::{Applied, Context, PipelineKey, Version, MANAGER};

/// The StreamPipeline resource, for untyped access.
pub fn pipeline_resource() -> kube::api::ApiResource {
    kube::api::ApiResource::erase::<StreamPipeline>(&())
}

/// Whether a child showing `seen` must be applied as `hash`; `applied` is what this
/// controller applied of it (adopted from what is seen when it applied nothing yet: after
/// a start, the annotation is trusted).
fn needed(seen: Option<&Seen>, hash: &str, applied: &mut Option<Version>) -> bool {
    let Some(s) = seen.filter(|s| s.owned && s.hash.as_deref() == Some(hash)) else {
        return true;
    };
    match applied {
        Some(v) => !(v.hash == hash && v.stamp == s.stamp),
        None => {
            *applied = Some(Version {
                hash: hash.to_string(),
                stamp: s.stamp.clone(),
            });
            false
        }
    }
}

/// Which children to apply: [ConfigMap, Service, PodDisruptionBudget, Deployment,
/// ServiceMonitor].
fn plan(found: &Found, children: &Children, applied: &mut Applied) -> [bool; 5] {
    let seen = &found.children;
    let h = &children.hashes;
    [
        needed(
            seen.config_map.as_ref(),
            &h.config_map,
            &mut applied.config_map,
        ),
        needed(seen.service.as_ref(), &h.service, &mut applied.service),
        needed(seen.pdb.as_ref(), &h.pdb, &mut applied.pdb),
        // Replicas too, which a user (or an HPA) may have changed while no controller ran.
        needed(
            seen.deployment.as_ref(),
            &h.deployment,
            &mut applied.deployment,
        ) || (found.exists && found.current as i32 != children.replicas),
        h.service_monitor.is_some() && applied.service_monitor != h.service_monitor,
    ]
}

/// Apply what changed of `children`, if the pipeline is still there.
pub async fn apply(
    ctx: &Context,
    sp: &StreamPipeline,
    found: &Found,
    children: &Children,
) -> Result<(), Stop> {
    let ns = sp.namespace().unwrap_or_default();
    let name = sp.name_any();
    let uid = sp.metadata.uid.clone().unwrap_or_default();
    let key = PipelineKey::new(&ns, &name);
    let mut applied = ctx.memory(&key, &uid, |m| m.applied.clone());
    let todo = plan(found, children, &mut applied);
    let remember = |applied: &Applied| ctx.memory(&key, &uid, |m| m.applied = applied.clone());
    remember(&applied);
    if !todo.contains(&true) {
        return Ok(());
    }
    tracing::debug!(pipeline = %key, config_map = todo[0], service = todo[1], pdb = todo[2], deployment = todo[3], service_monitor = todo[4], "applying");
    // This reconcile may run from a watch cache that has not seen the pipeline's deletion
    // yet, and applying then re-creates children the garbage collector is removing (seen on
    // a node: the Deployment scaled up again after its pipeline was deleted, and the new pod
    // failed for its ConfigMap, already gone). So ask the API server, not the cache.
    if !still_exists(ctx, &ns, &name, &uid).await? {
        tracing::info!(pipeline = %key, "the pipeline was deleted meanwhile; not applying its children");
        return Err(Stop::Gone);
    }
    // Every field, so a child added to `Children` cannot be forgotten here.
    let Children {
        names,
        config_map,
        service,
        pdb,
        deployment,
        service_monitor,
        hashes,
        replicas: _,
    } = children;
    let failed = |kind: &'static str, name: &str| {
        let name = name.to_string();
        move |error| Stop::Child { kind, name, error }
    };
    let version = |hash: &str, meta: &kube::api::ObjectMeta, by_generation: bool| {
        Some(Version {
            hash: hash.to_string(),
            stamp: if by_generation {
                meta.generation.map(|g| g.to_string())
            } else {
                meta.resource_version.clone()
            },
        })
    };
    if todo[0] {
        let got = ssa(ctx, &ns, config_map)
            .await
            .map_err(failed("ConfigMap", &names.config_map))?;
        applied.config_map = version(&hashes.config_map, &got.metadata, false);
        remember(&applied);
    }
    if todo[1] {
        let got = service_headless(ctx, &ns, &uid, service)
            .await
            .map_err(failed("Service", &names.service))?;
        applied.service = version(&hashes.service, &got.metadata, false);
        remember(&applied);
    }
    if todo[2] {
        let got = ssa(ctx, &ns, pdb)
            .await
            .map_err(failed("PodDisruptionBudget", &names.pdb))?;
        applied.pdb = version(&hashes.pdb, &got.metadata, true);
        remember(&applied);
    }
    if todo[3] {
        let got = ssa(ctx, &ns, deployment)
            .await
            .map_err(failed("Deployment", &names.deployment))?;
        applied.deployment = version(&hashes.deployment, &got.metadata, true);
        remember(&applied);
    }
    if let (true, Some(sm)) = (todo[4], service_monitor) {
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &ns, &service_monitor_resource());
        ctx.api.take(Verb::Patch).await;
        api.patch(
            &names.service_monitor,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(sm),
        )
        .await
        .map_err(failed("ServiceMonitor", &names.service_monitor))?;
        applied.service_monitor = hashes.service_monitor.clone();
        remember(&applied);
    }
    Ok(())
}

/// Server-side apply of `obj` in `ns`.
async fn ssa<K>(ctx: &Context, ns: &str, obj: &K) -> Result<K, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    ctx.api.take(Verb::Patch).await;
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
}

/// Apply the metrics Service. One made by an earlier sluice has a cluster IP, which the API
/// server does not let an update take away (`spec.clusterIP` is immutable): that one is
/// deleted (only that object: its uid is the precondition) and made again, headless.
async fn service_headless(
    ctx: &Context,
    ns: &str,
    owner: &str,
    svc: &Service,
) -> Result<Service, kube::Error> {
    let e = match ssa(ctx, ns, svc).await {
        Err(kube::Error::Api(ae)) if ae.code == 422 => kube::Error::Api(ae),
        other => return other,
    };
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    let name = svc.metadata.name.clone().unwrap_or_default();
    ctx.api.take(Verb::Get).await;
    let Some(old) = api.get_opt(&name).await? else {
        return Err(e);
    };
    let has_ip = old
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .is_some_and(|ip| !ip.is_empty() && ip != HEADLESS);
    let ours = old
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == owner && o.controller == Some(true));
    if !(has_ip && ours) {
        return Err(e);
    }
    tracing::info!(service = %format!("{ns}/{name}"), "replacing a metrics Service that has a cluster IP by a headless one");
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: old.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    ctx.api.take(Verb::Delete).await;
    api.delete(&name, &dp).await?;
    ssa(ctx, ns, svc).await
}

/// Whether the pipeline `name` with `uid` still exists and is not being deleted, read
/// from the API server (a live GET, not the watch cache).
async fn still_exists(ctx: &Context, ns: &str, name: &str, uid: &str) -> Result<bool, kube::Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &pipeline_resource());
    ctx.api.take(Verb::Get).await;
    Ok(api.get_opt(name).await?.is_some_and(|o| {
        o.metadata.uid.as_deref() == Some(uid) && o.metadata.deletion_timestamp.is_none()
    }))
}
