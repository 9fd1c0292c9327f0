//! The reconciler against a real kube-apiserver (+ etcd) and the real Kafka broker. Pods
//! never run here (no kubelet): what happens inside them is tested with the broker directly
//! in sluice-worker's tests.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, CustomResourceExt};
use serde_json::json;
use sluice_api::crd::StreamPipeline;
use sluice_controller::controller::{run_in, Context, RdKafka};
use sluice_controller::reconcile::build::CONFIG_HASH_ANNOTATION;
use sluice_testkit::{bootstrap, create_topic, unique};
use support::{client, eventually, install, namespace};

fn condition(sp: &StreamPipeline, t: &str) -> Option<(String, String)> {
    sp.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_becomes_a_deployment_configmap_service_and_pdb_and_follows_its_spec() {
    let c = client().await;
    let b = bootstrap();
    let topic = unique("rec-in");
    create_topic(&b, &topic, 6).await.unwrap();

    install(&c, &StreamPipeline::crd()).await;
    let ns = namespace(&c, "rec").await;

    let ctx = Context::new(c.clone(), Arc::new(RdKafka), "sluice/worker:test".into());
    let scoped = ns.clone();
    let controller = tokio::spawn(async move { run_in(ctx, Some(&scoped)).await });

    let pipelines: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
    let sp: StreamPipeline = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
        "metadata": {"name": "iot"},
        "spec": {
            "source": {"bootstrapServers": b, "topic": topic, "groupId": "iot"},
            "sinks": [{"kafka": {"topic": "iot-out"}}],
            "scaling": {"minReplicas": 2, "maxReplicas": 10, "pollInterval": "1s"}
        }
    }))
    .unwrap();
    pipelines.create(&PostParams::default(), &sp).await.unwrap();

    // Children exist, owned by the pipeline.
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), &ns);
    let d = eventually("the worker Deployment", Duration::from_secs(60), || async {
        deployments.get_opt("iot").await.unwrap()
    })
    .await;
    let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("StreamPipeline", "iot")
    );
    assert_eq!(
        d.spec.as_ref().unwrap().replicas,
        Some(2),
        "minReplicas with no lag"
    );
    let cm = Api::<ConfigMap>::namespaced(c.clone(), &ns)
        .get("iot-config")
        .await
        .unwrap();
    assert!(cm.data.unwrap()["config.yaml"].contains(&topic));
    Api::<Service>::namespaced(c.clone(), &ns)
        .get("iot-metrics")
        .await
        .unwrap();
    Api::<PodDisruptionBudget>::namespaced(c.clone(), &ns)
        .get("iot")
        .await
        .unwrap();

    // Status: partitions, replicas, conditions (no kubelet: workers never become ready).
    // The lag may be unknown at the first poll (a new group's coordinator still loading
    // on a busy broker): the status has it from the first poll that read it.
    let st = eventually(
        "status with partitions and lag",
        Duration::from_secs(60),
        || async {
            let sp = pipelines.get("iot").await.unwrap();
            let s = sp.status.as_ref()?;
            (s.partitions == Some(6) && s.lag.is_some()).then_some(sp)
        },
    )
    .await;
    let status = st.status.clone().unwrap();
    assert_eq!(status.replicas, Some(2));
    assert_eq!(status.lag, Some(0));
    assert_eq!(
        condition(&st, "Ready"),
        Some(("False".into(), "WorkersNotReady".into()))
    );
    assert_eq!(condition(&st, "Progressing").unwrap().0, "True");
    assert_eq!(status.observed_generation, st.metadata.generation);

    // The autoscaler adds replicas only once the current ones are ready (no kubelet here:
    // report them ready as the Deployment controller would).
    deployments
        .patch_status(
            "iot",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"replicas": 2, "readyReplicas": 2, "availableReplicas": 2}}),
            ),
        )
        .await
        .unwrap();

    // Lag scales up at once: 35,000 records and no commit, 10,000 per replica -> 4.
    let spec = sluice_testkit::ProduceSpec {
        bootstrap: b.clone(),
        topic: topic.clone(),
        from: 0,
        count: 35_000,
        rate: None,
        size: 100,
        linger_ms: 5,
    };
    tokio::task::spawn_blocking(move || {
        sluice_testkit::produce(&spec, &std::sync::atomic::AtomicU64::new(0))
    })
    .await
    .unwrap()
    .unwrap();
    eventually(
        "4 replicas for 35k lag",
        Duration::from_secs(60),
        || async {
            (deployments.get("iot").await.unwrap().spec?.replicas == Some(4)).then_some(())
        },
    )
    .await;
    let st = eventually("status lag", Duration::from_secs(30), || async {
        let sp = pipelines.get("iot").await.unwrap();
        (sp.status.as_ref()?.lag == Some(35_000)).then_some(sp)
    })
    .await;
    assert_eq!(st.status.as_ref().unwrap().desired_replicas, Some(4));
    let d = deployments.get("iot").await.unwrap();

    // A spec change rolls the config hash on the pod template.
    let hash = |d: &Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[CONFIG_HASH_ANNOTATION]
            .clone()
    };
    let before = hash(&d);
    pipelines
        .patch(
            "iot",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"batching": {"linger": "1ms"}}})),
        )
        .await
        .unwrap();
    eventually("a new config hash", Duration::from_secs(60), || async {
        let d = deployments.get("iot").await.unwrap();
        (hash(&d) != before).then_some(())
    })
    .await;

    // Paused scales to zero and says so.
    pipelines
        .patch(
            "iot",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true}})),
        )
        .await
        .unwrap();
    eventually(
        "zero replicas and Paused",
        Duration::from_secs(60),
        || async {
            let d = deployments.get("iot").await.unwrap();
            let sp = pipelines.get("iot").await.unwrap();
            (d.spec?.replicas == Some(0)
                && condition(&sp, "Paused").map(|c| c.0) == Some("True".into()))
            .then_some(())
        },
    )
    .await;

    // Manual mode through the scale subresource, capped at the partition count.
    pipelines
        .patch(
            "iot",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": false, "scaling": {"mode": "manual"}}})),
        )
        .await
        .unwrap();
    pipelines
        .patch_scale(
            "iot",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 9}})),
        )
        .await
        .unwrap();
    eventually(
        "replicas capped at 6 partitions",
        Duration::from_secs(60),
        || async {
            (deployments.get("iot").await.unwrap().spec?.replicas == Some(6)).then_some(())
        },
    )
    .await;

    // A spec the schema accepts but the worker would refuse: a condition, not a crash loop.
    pipelines
        .patch(
            "iot",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sinks": [{"kafka": {"topic": topic}}]}})),
        )
        .await
        .unwrap();
    let st = eventually("InvalidSpec", Duration::from_secs(60), || async {
        let sp = pipelines.get("iot").await.unwrap();
        (condition(&sp, "Ready").map(|c| c.1) == Some("InvalidSpec".into())).then_some(sp)
    })
    .await;
    let msg = &st
        .status
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("feed itself"), "{msg}");

    // A missing topic is a condition too.
    let p2: StreamPipeline = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
        "metadata": {"name": "missing"},
        "spec": {"source": {"bootstrapServers": b, "topic": unique("nope"), "groupId": "g"}, "sinks": [{"null": {}}]}
    }))
    .unwrap();
    pipelines.create(&PostParams::default(), &p2).await.unwrap();
    eventually("TopicNotFound", Duration::from_secs(60), || async {
        let sp = pipelines.get("missing").await.unwrap();
        (condition(&sp, "Ready").map(|c| c.1) == Some("TopicNotFound".into())).then_some(())
    })
    .await;
    assert!(
        deployments.get_opt("missing").await.unwrap().is_none(),
        "no workers for a missing topic"
    );

    controller.abort();
}
