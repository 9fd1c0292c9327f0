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
