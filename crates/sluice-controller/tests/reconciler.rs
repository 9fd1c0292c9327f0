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

/// A pipeline of several topics counts the partitions and the lag of them all, whether it
/// names them or matches them by pattern; the pattern is resolved again at every poll, so a
/// topic created later counts (its partitions raise the replica cap) without a change to
/// the pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_topics_count_together_and_a_pattern_is_read_again_every_poll() {
    let c = client().await;
    let b = bootstrap();
    let base = unique("multi");
    let (a, bb, later) = (
        format!("{base}-a"),
        format!("{base}-b"),
        format!("{base}-c"),
    );
    create_topic(&b, &a, 2).await.unwrap();
    create_topic(&b, &bb, 3).await.unwrap();
    sluice_testkit::produce_seq(&a, 400);
    sluice_testkit::produce_seq(&bb, 600);

    install(&c, &StreamPipeline::crd()).await;
    let ns = namespace(&c, "multi").await;
    let ctx = Context::new(c.clone(), Arc::new(RdKafka), "sluice/worker:test".into());
    let scoped = ns.clone();
    let controller = tokio::spawn(async move { run_in(ctx, Some(&scoped)).await });

    let pipelines: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
    for (name, source) in [
        (
            "listed",
            json!({"bootstrapServers": b, "topics": [a, bb], "groupId": unique("listed")}),
        ),
        (
            "matched",
            json!({"bootstrapServers": b, "topicPattern": format!("{base}-[a-z]"), "groupId": unique("matched")}),
        ),
    ] {
        let sp: StreamPipeline = serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
            "metadata": {"name": name},
            "spec": {
                "source": source,
                "sinks": [{"kafka": {"topic": format!("{base}-out")}}],
                "scaling": {"minReplicas": 1, "maxReplicas": 20, "lagPerReplica": 100, "pollInterval": "1s"}
            }
        }))
        .unwrap();
        pipelines.create(&PostParams::default(), &sp).await.unwrap();
    }
    // 5 partitions and 1,000 records of lag in both: 10 replicas wanted, capped at 5.
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), &ns);
    let replicas = |name: &'static str| {
        let deployments = deployments.clone();
        async move { deployments.get(name).await.ok()?.spec?.replicas }
    };
    for name in ["listed", "matched"] {
        eventually(
            &format!("{name}: 5 partitions, the lag of both topics, 5 replicas"),
            Duration::from_secs(60),
            || async {
                let s = pipelines.get(name).await.ok()?.status?;
                (s.partitions == Some(5) && s.lag == Some(1_000) && replicas(name).await == Some(5))
                    .then_some(())
            },
        )
        .await;
    }
    // A third topic that matches: the pattern's pipeline counts it from a coming poll, the
    // listed one does not.
    create_topic(&b, &later, 4).await.unwrap();
    sluice_testkit::produce_seq(&later, 300);
    sluice_testkit::poll_async(
        "the matched pipeline counts the new topic",
        Duration::from_secs(60),
        || async {
            let s = pipelines
                .get("matched")
                .await
                .map_err(|e| e.to_string())?
                .status
                .ok_or("no status")?;
            // The cap follows (no pod runs here, so the Deployment keeps the 5 it has
            // until they are ready: the condition shows the new cap).
            let capped = s
                .conditions
                .iter()
                .any(|c| c.type_ == "ScalingLimited" && c.message.contains("input's 9 partitions"));
            if s.partitions == Some(9) && s.lag == Some(1_300) && capped {
                Ok(())
            } else {
                Err(format!(
                    "partitions {:?}, lag {:?}, conditions {:?}",
                    s.partitions,
                    s.lag,
                    s.conditions
                        .iter()
                        .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
                        .collect::<Vec<_>>()
                ))
            }
        },
    )
    .await;
    let listed = pipelines.get("listed").await.unwrap().status.unwrap();
    assert_eq!((listed.partitions, listed.lag), (Some(5), Some(1_000)));
    controller.abort();
}
