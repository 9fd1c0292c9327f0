//! Server-side apply of the children, in order (ConfigMap, Service, PodDisruptionBudget,
//! Deployment, ServiceMonitor), with owner references and one field manager, and only
//! while the pipeline still exists.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, Preconditions};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sluice_api::crd::StreamPipeline;

use super::build::{Children, HEADLESS};
use super::dereference::service_monitor_resource;
use super::Stop;
use crate::context::{Context, MANAGER};

/// The StreamPipeline resource, for untyped access.
pub fn pipeline_resource() -> kube::api::ApiResource {
    kube::api::ApiResource::erase::<StreamPipeline>(&())
}

/// Apply `children`, if the pipeline is still there.
pub async fn apply(ctx: &Context, sp: &StreamPipeline, children: &Children) -> Result<(), Stop> {
    let ns = sp.namespace().unwrap_or_default();
    let name = sp.name_any();
    let uid = sp.metadata.uid.clone().unwrap_or_default();
    // This reconcile may run from a watch cache that has not seen the pipeline's deletion
    // yet, and applying then re-creates children the garbage collector is removing (seen on
    // a node: the Deployment scaled up again after its pipeline was deleted, and the new pod
    // failed for its ConfigMap, already gone). So ask the API server, not the cache.
    if !still_exists(&ctx.client, &ns, &name, &uid).await? {
        tracing::info!(pipeline = %format!("{ns}/{name}"), "the pipeline was deleted meanwhile; not applying its children");
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
    } = children;
    let c = &ctx.client;
    let failed = |kind: &'static str, name: &str| {
        let name = name.to_string();
        move |error| Stop::Child { kind, name, error }
    };
    ssa(c, &ns, config_map)
        .await
        .map_err(failed("ConfigMap", &names.config_map))?;
    service_headless(c, &ns, &uid, service)
        .await
        .map_err(failed("Service", &names.service))?;
    ssa(c, &ns, pdb)
        .await
        .map_err(failed("PodDisruptionBudget", &names.pdb))?;
    ssa(c, &ns, deployment)
        .await
        .map_err(failed("Deployment", &names.deployment))?;
    if let Some(sm) = service_monitor {
        let api: Api<DynamicObject> =
            Api::namespaced_with(c.clone(), &ns, &service_monitor_resource());
        api.patch(
            &names.service_monitor,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(sm),
        )
        .await
        .map_err(failed("ServiceMonitor", &names.service_monitor))?;
    }
    Ok(())
}

/// Server-side apply of `obj` in `ns`.
async fn ssa<K>(client: &Client, ns: &str, obj: &K) -> Result<K, kube::Error>
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

/// Apply the metrics Service. One made by an earlier sluice has a cluster IP, which the API
/// server does not let an update take away (`spec.clusterIP` is immutable): that one is
/// deleted (only that object: its uid is the precondition) and made again, headless.
async fn service_headless(
    client: &Client,
    ns: &str,
    owner: &str,
    svc: &Service,
) -> Result<Service, kube::Error> {
    let e = match ssa(client, ns, svc).await {
        Err(kube::Error::Api(ae)) if ae.code == 422 => kube::Error::Api(ae),
        other => return other,
    };
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let name = svc.metadata.name.clone().unwrap_or_default();
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
    api.delete(&name, &dp).await?;
    ssa(client, ns, svc).await
}

/// Whether the pipeline `name` with `uid` still exists and is not being deleted, read
/// from the API server (a live GET, not the watch cache).
async fn still_exists(
    client: &Client,
    ns: &str,
    name: &str,
    uid: &str,
) -> Result<bool, kube::Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &pipeline_resource());
    Ok(api.get_opt(name).await?.is_some_and(|o| {
        o.metadata.uid.as_deref() == Some(uid) && o.metadata.deletion_timestamp.is_none()
    }))
}
