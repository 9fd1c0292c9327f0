//! The pipeline's children against the real kube-apiserver (scripted Kafka): the metrics
//! Service is headless, also for a pipeline whose Service an earlier sluice made with a
//! cluster IP (which an update cannot take away).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::api::PostParams;
use kube::Api;
use serde_json::json;
use sluice_api::crd::StreamPipeline;
use sluice_controller::controller::{run_in, Context};
use support::{setup, Scripted};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_service_made_with_a_cluster_ip_is_replaced_by_a_headless_one() {
    let (c, ns) = setup("svc").await;
    let pipelines: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
    let sp: StreamPipeline = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
        "metadata": {"name": "p"},
        "spec": {
            "source": {"bootstrapServers": "kafka:9092", "topic": "in", "groupId": "g"},
            "sinks": [{"kafka": {"topic": "out"}}]
        }
    }))
    .unwrap();
    let sp = pipelines.create(&PostParams::default(), &sp).await.unwrap();
    let uid = sp.metadata.uid.clone().unwrap();
    // What an earlier sluice made: the same Service, owned by the pipeline, with a cluster IP.
    let services: Api<Service> = Api::namespaced(c.clone(), &ns);
    let old: Service = serde_json::from_value(json!({
        "metadata": {"name": "p-metrics", "labels": {"sluice.dev/pipeline": "p"},
            "ownerReferences": [{"apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
                "name": "p", "uid": uid, "controller": true}]},
        "spec": {"selector": {"sluice.dev/pipeline": "p"},
            "ports": [{"name": "metrics", "port": 9095, "targetPort": "metrics"}]}
    }))
    .unwrap();
    let old = services.create(&PostParams::default(), &old).await.unwrap();
    let ip = old.spec.as_ref().unwrap().cluster_ip.clone().unwrap();
    assert!(ip.contains('.'), "the API server gave it an address: {ip}");

    let ctx = Context::new(c.clone(), Scripted::new(4, 0), "sluice/worker:test".into());
    let controller = {
        let ns = ns.clone();
        tokio::spawn(async move { run_in(ctx, Some(&ns)).await })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let svc = loop {
        let svc = services.get("p-metrics").await.unwrap();
        if svc.spec.as_ref().unwrap().cluster_ip.as_deref() == Some("None") {
            break svc;
        }
        assert!(Instant::now() < deadline, "the Service is still {ip}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(svc.metadata.uid, old.metadata.uid, "made again");
    assert_eq!(svc.metadata.owner_references.unwrap()[0].uid, uid);
    let port = &svc.spec.unwrap().ports.unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("metrics"), 9095));
    controller.abort();
}

/// Reconciles that succeeded so far.
fn reconciled(ctx: &Context) -> u64 {
    ctx.metrics
        .registry
        .gather()
        .iter()
        .filter(|f| f.name() == "sluice_controller_reconciliations_total")
        .flat_map(|f| f.get_metric())
        .filter(|m| m.get_label().iter().any(|l| l.value() == "ok"))
        .map(|m| m.get_counter().value() as u64)
        .sum()
}

async fn until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_pipeline_costs_no_write_and_a_child_someone_changed_is_restored() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{DeleteParams, Patch, PatchParams};
    use sluice_controller::api::Verb;

    let (c, ns) = setup("steady").await;
    let ctx = Context::new(c.clone(), Scripted::new(4, 0), "sluice/worker:test".into());
    let controller = {
        let (ctx, ns) = (ctx.clone(), ns.clone());
        tokio::spawn(async move { run_in(ctx, Some(&ns)).await })
    };
    let pipelines: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
    let sp: StreamPipeline = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
        "metadata": {"name": "p"},
        "spec": {
            "source": {"bootstrapServers": "kafka:9092", "topic": "in", "groupId": "g"},
            "sinks": [{"kafka": {"topic": "out"}}],
            "scaling": {"pollInterval": "1s"}
        }
    }))
    .unwrap();
    pipelines.create(&PostParams::default(), &sp).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), &ns);
    until("status and children", || async {
        let st = pipelines.get("p").await.ok()?.status?;
        (st.partitions == Some(4)).then_some(())?;
        deployments.get_opt("p").await.ok()?
    })
    .await;

    // Nothing changes: polls go by (a decision a second) and nothing is written, not even
    // the status. (Reconciles right after the first may still see their own writes arrive.)
    let settled = reconciled(&ctx) + 2;
    until("two more reconciles", || async {
        (reconciled(&ctx) >= settled).then_some(())
    })
    .await;
    let (patches, gets) = (ctx.api_requests(Verb::Patch), ctx.api_requests(Verb::Get));
    let after = reconciled(&ctx) + 3;
    until("three more polls", || async {
        (reconciled(&ctx) >= after).then_some(())
    })
    .await;
    assert_eq!(
        (ctx.api_requests(Verb::Patch), ctx.api_requests(Verb::Get)),
        (patches, gets),
        "a steady pipeline read or wrote something"
    );

    // A user edits the Deployment's image and deletes the ConfigMap: both come back.
    deployments
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [{"name": "worker", "image": "someone/else:1"}]}}}})),
        )
        .await
        .unwrap();
    let configmaps: Api<ConfigMap> = Api::namespaced(c.clone(), &ns);
    configmaps
        .delete("p-config", &DeleteParams::default())
        .await
        .unwrap();
    until("the image restored", || async {
        let d = deployments.get("p").await.ok()?;
        let image = d.spec?.template.spec?.containers[0].image.clone()?;
        (image == "sluice/worker:test").then_some(())
    })
    .await;
    until("the ConfigMap restored", || async {
        configmaps.get_opt("p-config").await.ok()?
    })
    .await;
    controller.abort();
}
