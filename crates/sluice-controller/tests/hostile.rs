//! Hostile and broken input against the real kube-apiserver and the real controller:
//! an object stored through a looser schema (a poison pipeline) next to a good one, a
//! user's objects in the way of a pipeline's children, and a child the API server refuses.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResourceExt};
use serde_json::json;
use sluice_api::crd::StreamPipeline;
use sluice_controller::controller::{pipeline_resource, run_in, Context};
use support::{eventually, install, setup, Scripted};

fn pipeline(name: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut spec = json!({
        "source": {"bootstrapServers": "kafka:9092", "topic": "in", "groupId": name},
        "sinks": [{"kafka": {"topic": "out"}}],
        "scaling": {"pollInterval": "2s"}
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline", "metadata": {"name": name}, "spec": spec})
}

async fn create(c: &Client, ns: &str, obj: serde_json::Value, dry_run: bool) -> Result<(), String> {
    let api: Api<DynamicObject> = Api::namespaced_with(c.clone(), ns, &pipeline_resource());
    let obj: DynamicObject = serde_json::from_value(obj).unwrap();
    let pp = PostParams {
        dry_run,
        ..Default::default()
    };
    api.create(&pp, &obj)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The Ready condition: (status, reason, message).
async fn ready(api: &Api<StreamPipeline>, name: &str) -> Option<(String, String, String)> {
    let sp = api.get_opt(name).await.ok()??;
    sp.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status, c.reason, c.message))
}

/// Warning Events about `name` with `reason`: their notes.
async fn warnings(c: &Client, ns: &str, name: &str, reason: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(c.clone(), ns);
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                && e.reason.as_deref() == Some(reason)
                && e.type_.as_deref() == Some("Warning")
        })
        .filter_map(|e| e.note)
        .collect()
}

fn start(c: &Client, ns: &str) -> tokio::task::JoinHandle<()> {
    let ctx = Context::new(c.clone(), Scripted::new(4, 0), "sluice/worker:test".into());
    let scoped = ns.to_string();
    tokio::spawn(async move { run_in(ctx, Some(&scoped)).await })
}

/// Report every replica of Deployment `name` ready (no kubelet runs here).
async fn mark_ready(c: &Client, ns: &str, name: &str) {
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), ns);
    let d = eventually("the worker Deployment", Duration::from_secs(30), || async {
        deployments.get_opt(name).await.unwrap()
    })
    .await;
    let r = d.spec.unwrap().replicas.unwrap_or(1);
    deployments
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"replicas": r, "readyReplicas": r, "availableReplicas": r}}),
            ),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_pipeline_gets_invalid_spec_and_the_good_one_next_to_it_becomes_ready() {
    let (c, ns) = setup("poison").await;
    // The CRD as an older release shipped it: maxBytes untyped. Only that field is looser,
    // and only until the poison object is stored.
    let mut loose = serde_json::to_value(StreamPipeline::crd()).unwrap();
    loose["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["batching"]["properties"]["maxBytes"] = json!({"x-kubernetes-int-or-string": true});
    install(&c, &serde_json::from_value(loose).unwrap()).await;
    let poison = pipeline("poison", json!({"batching": {"maxBytes": "lots"}}));
    eventually(
        "the looser schema to take effect",
        Duration::from_secs(30),
        || {
            let (c, ns, poison) = (c.clone(), ns.clone(), poison.clone());
            async move { create(&c, &ns, poison, false).await.ok() }
        },
    )
    .await;
    install(&c, &StreamPipeline::crd()).await;
    let probe = pipeline("probe", json!({"batching": {"maxBytes": "lots"}}));
    eventually(
        "the strict schema to be back",
        Duration::from_secs(30),
        || {
            let (c, ns, probe) = (c.clone(), ns.clone(), probe.clone());
            async move { create(&c, &ns, probe, true).await.err() }
        },
    )
    .await;

    let controller = start(&c, &ns);
    let started = Instant::now();
    create(&c, &ns, pipeline("good", json!({})), false)
        .await
        .unwrap();
    mark_ready(&c, &ns, "good").await;
    let api: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
    eventually(
        "the good pipeline Ready",
        Duration::from_secs(30),
        || async { ready(&api, "good").await.filter(|r| r.0 == "True") },
    )
    .await;
    let took = started.elapsed();

    // The poison object: its own condition and a Warning naming the field. The typed Api
    // cannot read it, so read its status untyped.
    let raw: Api<DynamicObject> = Api::namespaced_with(c.clone(), &ns, &pipeline_resource());
    let cond = eventually(
        "the poison pipeline's condition",
        Duration::from_secs(30),
        || async {
            let o = raw.get("poison").await.unwrap();
            let cs = o.data["status"]["conditions"].as_array()?.clone();
            cs.into_iter().find(|c| c["type"] == "Ready")
        },
    )
    .await;
    assert_eq!(
        (cond["status"].as_str(), cond["reason"].as_str()),
        (Some("False"), Some("InvalidSpec"))
    );
    let msg = cond["message"].as_str().unwrap();
    assert!(
        msg.contains("spec.batching.maxBytes") && msg.contains("lots"),
        "{msg}"
    );
    let notes = eventually(
        "a Warning Event about the poison",
        Duration::from_secs(15),
        || async {
            Some(warnings(&c, &ns, "poison", "InvalidSpec").await).filter(|n| !n.is_empty())
        },
    )
    .await;
    assert!(notes[0].contains("spec.batching.maxBytes"), "{notes:?}");
    println!("the good pipeline was Ready {took:?} after its creation, next to a poison one");
    controller.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_the_user_made_are_never_modified_and_the_pipeline_says_so() {
    let (c, ns) = setup("victim").await;
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), &ns);
    let svcs: Api<Service> = Api::namespaced(c.clone(), &ns);
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "victim-config", "labels": {"team": "payments"}},
        "data": {"config.yaml": "the user's own"}
    }))
    .unwrap();
    let cm = cms.create(&PostParams::default(), &cm).await.unwrap();
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "victim-metrics"},
        "spec": {"ports": [{"name": "http", "port": 80}], "selector": {"app": "payments"}}
    }))
    .unwrap();
    let svc = svcs.create(&PostParams::default(), &svc).await.unwrap();

    let controller = start(&c, &ns);
    create(&c, &ns, pipeline("victim", json!({})), false)
        .await
        .unwrap();
    let api: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
    let (status, _, message) =
        eventually("a ResourceConflict", Duration::from_secs(30), || async {
            ready(&api, "victim")
                .await
                .filter(|r| r.1 == "ResourceConflict")
        })
        .await;
    assert_eq!(status, "False");
    assert!(
        message.contains("ConfigMap \"victim-config\"")
            && message.contains("Service \"victim-metrics\""),
        "{message}"
    );
    let notes = eventually("a Warning Event", Duration::from_secs(15), || async {
        Some(warnings(&c, &ns, "victim", "ResourceConflict").await).filter(|n| !n.is_empty())
    })
    .await;
    assert!(notes[0].contains("victim-config"), "{notes:?}");
    // Nothing written: same resourceVersion, no owner, no Deployment.
    let after = cms.get("victim-config").await.unwrap();
    assert_eq!(
        after.metadata.resource_version,
        cm.metadata.resource_version
    );
    assert!(after.metadata.owner_references.is_none());
    assert_eq!(
        svcs.get("victim-metrics")
            .await
            .unwrap()
            .metadata
            .resource_version,
        svc.metadata.resource_version
    );
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), &ns);
    assert!(deployments.get_opt("victim").await.unwrap().is_none());

    // The user moves their objects away: the pipeline proceeds on its own.
    cms.delete("victim-config", &Default::default())
        .await
        .unwrap();
    svcs.delete("victim-metrics", &Default::default())
        .await
        .unwrap();
    eventually("the worker Deployment", Duration::from_secs(60), || async {
        deployments.get_opt("victim").await.unwrap()
    })
    .await;
    controller.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_the_api_server_refuses_is_a_condition_with_the_servers_message() {
    let (c, ns) = setup("refused").await;
    let controller = start(&c, &ns);
    // Every quantity is well formed, but requests above limits is for the API server to refuse.
    let bad = pipeline(
        "greedy",
        json!({"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}),
    );
    create(&c, &ns, bad, false).await.unwrap();
    let api: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
    let (status, _, message) = eventually("ChildRejected", Duration::from_secs(30), || async {
        ready(&api, "greedy")
            .await
            .filter(|r| r.1 == "ChildRejected")
    })
    .await;
    assert_eq!(status, "False");
    assert!(
        message.starts_with("Deployment \"greedy\"")
            && message.contains("must be less than or equal to cpu limit"),
        "{message}"
    );
    let notes = eventually("a Warning Event", Duration::from_secs(15), || async {
        Some(warnings(&c, &ns, "greedy", "ChildRejected").await).filter(|n| !n.is_empty())
    })
    .await;
    assert!(notes[0].contains("cpu limit"), "{notes:?}");
    controller.abort();
}
