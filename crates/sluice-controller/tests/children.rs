//! The pipeline's children against the real kube-apiserver (scripted Kafka): the metrics
//! Service is headless, also for a pipeline whose Service an earlier sluice made with a
//! cluster IP (which an update cannot take away). A rotated Secret rolls the workers as soon
//! as it changes. A worker the scheduler cannot place (a taint the pipeline's template does
//! not tolerate, say) is named in the Ready condition with the scheduler's reason. A steady
//! pipeline costs no request, and a child someone changed is restored.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;
use sluice_api::crd::StreamPipeline;
use sluice_controller::controller::{run_in, Context};
use support::{eventually, setup, Scripted};

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
        // Absent for a moment between the old one's deletion and the new one's creation.
        let svc = services.get_opt("p-metrics").await.unwrap();
        if let Some(svc) =
            svc.filter(|s| s.spec.as_ref().unwrap().cluster_ip.as_deref() == Some("None"))
        {
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

/// The pod template's annotation `key` of the Deployment `name`, once it has one other
/// than `not`.
async fn annotation(
    api: &Api<Deployment>,
    name: &str,
    key: &str,
    not: Option<&str>,
) -> (String, Deployment) {
    eventually(
        &format!("{name}: {key} other than {not:?}"),
        Duration::from_secs(60),
        || async {
            let d = api.get_opt(name).await.unwrap()?;
            let v = d
                .spec
                .as_ref()?
                .template
                .metadata
                .as_ref()?
                .annotations
                .as_ref()?
                .get(key)
                .cloned()?;
            (Some(v.as_str()) != not).then_some((v, d))
        },
    )
    .await
}

/// Create a Secret `name` with `stringData` `data` for each pair.
async fn create_secrets<const N: usize>(
    secrets: &Api<Secret>,
    all: [(&str, serde_json::Value); N],
) {
    for (name, data) in all {
        let s: Secret =
            serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))
                .unwrap();
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }
}

/// A rotated Secret rolls the workers, and at once: the pod template carries a digest of
/// every Secret key the pods read and the controller watches Secrets, so the new template is
/// applied when the Secret changes, not at the next poll (an hour away here). The roll
/// itself is the Deployment's: one pod at a time (maxSurge 0, maxUnavailable 1), each
/// drained on SIGTERM. The configuration, and so its hash, stays as it was, and no value
/// reaches the Deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_rolls_the_workers_without_waiting_for_the_next_poll() {
    let (c, ns) = setup("rotate").await;
    let secrets: Api<Secret> = Api::namespaced(c.clone(), &ns);
    create_secrets(
        &secrets,
        [
            ("kafka", json!({"password": "first-kafka-pw"})),
            (
                "pg",
                json!({"url": "postgres://u:first-pg-pw@db/x", "unused": "1"}),
            ),
            ("tls", json!({"ca.crt": "FIRST-CA"})),
        ],
    )
    .await;
    let pipelines: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
    let sp: StreamPipeline = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
        "metadata": {"name": "p"},
        "spec": {
            "source": {"bootstrapServers": "kafka:9093", "topic": "in", "groupId": "g",
                "security": {"protocol": "SASL_SSL", "saslMechanism": "SCRAM-SHA-512", "username": "u",
                    "passwordSecretRef": {"name": "kafka", "key": "password"},
                    "caFile": "/etc/sluice/secrets/ca.crt"}},
            "sinks": [{"postgres": {"table": "t", "connectionEnv": "PG_URL"}}],
            "secretEnv": [{"name": "PG_URL", "secretKeyRef": {"name": "pg", "key": "url"}}],
            "secretFiles": [{"name": "ca.crt", "secretKeyRef": {"name": "tls", "key": "ca.crt"}}],
            "scaling": {"pollInterval": "1h"}
        }
    }))
    .unwrap();
    pipelines.create(&PostParams::default(), &sp).await.unwrap();
    let ctx = Context::new(c.clone(), Scripted::new(4, 0), "sluice/worker:test".into());
    let controller = {
        let ns = ns.clone();
        tokio::spawn(async move { run_in(ctx, Some(&ns)).await })
    };
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), &ns);
    const DIGEST: &str = "sluice.dev/secrets-hash";
    let (mut digest, first) = annotation(&deployments, "p", DIGEST, None).await;
    // The digest is keyed by a Secret of the controller's own (Context::new: `default`).
    let key = Api::<Secret>::namespaced(c.clone(), "default")
        .get("sluice-digest-key")
        .await
        .unwrap();
    assert_eq!(key.data.unwrap()["key"].0.len(), 32);
    let config_hash = |d: &Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()["sluice.dev/config-hash"]
            .clone()
    };
    // Each Secret the pods read, rotated in turn: the SASL password, the PostgreSQL URL
    // (secretEnv), the CA (secretFiles). Each rolls the pods.
    for (secret, data) in [
        ("kafka", json!({"password": "second-kafka-pw"})),
        ("pg", json!({"url": "postgres://u:second-pg-pw@db/x"})),
        ("tls", json!({"ca.crt": "SECOND-CA"})),
    ] {
        secrets
            .patch(
                secret,
                &PatchParams::default(),
                &Patch::Merge(json!({"stringData": data})),
            )
            .await
            .unwrap();
        let (next, d) = annotation(&deployments, "p", DIGEST, Some(&digest)).await;
        assert_eq!(
            config_hash(&d),
            config_hash(&first),
            "{secret}: the configuration is the same"
        );
        let text = serde_json::to_string(&d).unwrap();
        for v in [
            "first-kafka-pw",
            "second-kafka-pw",
            "first-pg-pw",
            "second-pg-pw",
            "FIRST-CA",
            "SECOND-CA",
        ] {
            assert!(!text.contains(v), "{v} in the Deployment");
        }
        digest = next;
    }
    let d = deployments.get("p").await.unwrap();
    let rolling = d.spec.unwrap().strategy.unwrap().rolling_update.unwrap();
    assert_eq!(
        (rolling.max_surge, rolling.max_unavailable),
        (Some(IntOrString::Int(0)), Some(IntOrString::Int(1))),
        "one pod at a time"
    );
    controller.abort();
}

/// A worker pod the scheduler cannot place keeps the pipeline not Ready, and the condition
/// says which pod and why, in the scheduler's words. (No scheduler runs beside this API
/// server: the test writes the pod and its PodScheduled condition as the scheduler would.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_the_scheduler_cannot_place_is_named_in_the_ready_condition() {
    let (c, ns) = setup("unsched").await;
    let pipelines: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
    let sp: StreamPipeline = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
        "metadata": {"name": "p"},
        "spec": {
            "source": {"bootstrapServers": "kafka:9092", "topic": "in", "groupId": "g"},
            "sinks": [{"kafka": {"topic": "out"}}],
            "scaling": {"pollInterval": "1s"},
            "template": {"nodeSelector": {"pool": "streaming"}}
        }
    }))
    .unwrap();
    pipelines.create(&PostParams::default(), &sp).await.unwrap();
    let ctx = Context::new(c.clone(), Scripted::new(4, 0), "sluice/worker:test".into());
    let controller = {
        let ns = ns.clone();
        tokio::spawn(async move { run_in(ctx, Some(&ns)).await })
    };
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), &ns);
    let d = eventually("the Deployment", Duration::from_secs(60), || async {
        deployments.get_opt("p").await.unwrap()
    })
    .await;
    let template = d.spec.unwrap().template;
    assert_eq!(
        template
            .spec
            .as_ref()
            .unwrap()
            .node_selector
            .as_ref()
            .unwrap()["pool"],
        "streaming"
    );
    // The worker pod, as the ReplicaSet would make it, and the scheduler's verdict.
    let pods: Api<Pod> = Api::namespaced(c.clone(), &ns);
    let mut pod: Pod =
        serde_json::from_value(json!({"metadata": {"name": "p-7d9f-x2k4q"}})).unwrap();
    pod.metadata.labels = template.metadata.unwrap().labels;
    pod.spec = template.spec;
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let why = "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector. preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling.";
    pods.patch_status(
        "p-7d9f-x2k4q",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why}
        ]}})),
    )
    .await
    .unwrap();
    let message = eventually(
        "Ready=False, WorkersUnschedulable",
        Duration::from_secs(60),
        || async {
            let sp = pipelines.get("p").await.unwrap();
            sp.status?
                .conditions
                .into_iter()
                .find(|c| {
                    c.type_ == "Ready" && c.status == "False" && c.reason == "WorkersUnschedulable"
                })
                .map(|c| c.message)
        },
    )
    .await;
    assert_eq!(
        message,
        format!("0 of 1 workers ready; pod p-7d9f-x2k4q cannot be scheduled: {why}")
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_pipeline_costs_no_write_and_a_child_someone_changed_is_restored() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::DeleteParams;
    use sluice_controller::api::Verb;

    let (c, ns) = setup("steady").await;
    let ctx = Context::new(c.clone(), Scripted::new(4, 0), "sluice/worker:test".into());
    let controller = {
        let (ctx, ns) = (ctx.clone(), ns.clone());
        tokio::spawn(async move { run_in(ctx, Some(&ns)).await })
    };
    // It reads Secrets too (the SASL password, a secretEnv, and a secretFiles entry whose
    // Secret does not exist yet): with the Secrets' versions from the watch, a steady
    // pipeline reads none of them again.
    let secrets: Api<Secret> = Api::namespaced(c.clone(), &ns);
    create_secrets(
        &secrets,
        [
            ("kafka", json!({"password": "pw"})),
            ("pg", json!({"url": "postgres://u:pw@db/x"})),
        ],
    )
    .await;
    let pipelines: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
    let sp: StreamPipeline = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
        "metadata": {"name": "p"},
        "spec": {
            "source": {"bootstrapServers": "kafka:9092", "topic": "in", "groupId": "g",
                "security": {"protocol": "SASL_PLAINTEXT", "saslMechanism": "SCRAM-SHA-512", "username": "u",
                    "passwordSecretRef": {"name": "kafka", "key": "password"}}},
            "sinks": [{"kafka": {"topic": "out"}}],
            "secretEnv": [{"name": "PG_URL", "secretKeyRef": {"name": "pg", "key": "url"}}],
            "secretFiles": [{"name": "extra.pem", "secretKeyRef": {"name": "later", "key": "extra.pem"}}],
            "scaling": {"pollInterval": "1s"}
        }
    }))
    .unwrap();
    pipelines.create(&PostParams::default(), &sp).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), &ns);
    eventually_60("status and children", || async {
        let st = pipelines.get("p").await.ok()?.status?;
        (st.partitions == Some(4)).then_some(())?;
        deployments.get_opt("p").await.ok()?
    })
    .await;

    // Nothing changes: polls go by (a decision a second) and nothing is written, not even
    // the status. (Reconciles right after the first may still see their own writes arrive.)
    let settled = reconciled(&ctx) + 2;
    eventually_60("two more reconciles", || async {
        (reconciled(&ctx) >= settled).then_some(())
    })
    .await;
    let (patches, gets) = (ctx.api_requests(Verb::Patch), ctx.api_requests(Verb::Get));
    let after = reconciled(&ctx) + 3;
    eventually_60("three more polls", || async {
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
    eventually_60("the image restored", || async {
        let d = deployments.get("p").await.ok()?;
        let image = d.spec?.template.spec?.containers[0].image.clone()?;
        (image == "sluice/worker:test").then_some(())
    })
    .await;
    eventually_60("the ConfigMap restored", || async {
        configmaps.get_opt("p-config").await.ok()?
    })
    .await;

    // A Secret the pods read changes: the watch shows its new version, it is read again,
    // and the digest on the pod template moves.
    const DIGEST: &str = "sluice.dev/secrets-hash";
    let (before, _) = annotation(&deployments, "p", DIGEST, None).await;
    let gets = ctx.api_requests(Verb::Get);
    secrets
        .patch(
            "kafka",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"password": "pw2"}})),
        )
        .await
        .unwrap();
    annotation(&deployments, "p", DIGEST, Some(&before)).await;
    assert!(
        ctx.api_requests(Verb::Get) > gets,
        "the Secret was read again"
    );
    controller.abort();
}

/// [`eventually`] with a minute's deadline.
async fn eventually_60<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    f: impl FnMut() -> F,
) -> T {
    eventually(what, Duration::from_secs(60), f).await
}
