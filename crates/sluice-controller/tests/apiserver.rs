//! The StreamPipeline CRD against a real kube-apiserver (+ etcd): schema, defaults, CEL
//! rules, the status and scale subresources.

mod support;

use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use sluice_api::crd::StreamPipeline;
use support::setup;

fn minimal(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "StreamPipeline",
        "metadata": {"name": name},
        "spec": {
            "source": {"bootstrapServers": "kafka:9092", "topic": "iot-events", "groupId": "iot"},
            "sinks": [{"kafka": {"topic": "iot-enriched"}}]
        }
    })
}

async fn create(
    api: &Api<kube::api::DynamicObject>,
    obj: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let obj: kube::api::DynamicObject = serde_json::from_value(obj).unwrap();
    api.create(&PostParams::default(), &obj)
        .await
        .map(|o| serde_json::to_value(o).unwrap())
        .map_err(|e| e.to_string())
}

fn dynamic(c: &Client, ns: &str) -> Api<kube::api::DynamicObject> {
    let ar = kube::api::ApiResource::erase::<StreamPipeline>(&());
    Api::namespaced_with(c.clone(), ns, &ar)
}

#[tokio::test]
async fn the_api_server_accepts_a_minimal_pipeline_and_fills_in_defaults() {
    let (c, ns) = setup("sp").await;
    let created = create(&dynamic(&c, &ns), minimal("iot"))
        .await
        .expect("valid pipeline");
    let spec = &created["spec"];
    assert_eq!(
        spec["workers"],
        json!({"perPartition": 5, "queueCapacity": 4096, "ordering": "key"})
    );
    assert_eq!(spec["batching"]["linger"], "5ms");
    assert_eq!(spec["scaling"]["scaleDownStabilization"], "5m");
    assert_eq!(spec["scaling"]["mode"], "lag");
    assert_eq!(spec["replicas"], 1);
    assert_eq!(spec["processor"], json!({"passthrough": {}}));
    // The typed client reads it back and it renders a valid worker config.
    let typed: Api<StreamPipeline> = Api::namespaced(c, &ns);
    let sp = typed.get("iot").await.unwrap();
    assert_eq!(sp.worker_config().unwrap().pipeline, "iot");
}

#[tokio::test]
async fn the_api_server_rejects_invalid_pipelines_with_actionable_messages() {
    let (c, ns) = setup("sp").await;
    let api = dynamic(&c, &ns);
    let corpus: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "no sinks",
            json!({"sinks": []}),
            "should have at least 1 items",
        ),
        (
            "max below min",
            json!({"scaling": {"minReplicas": 5, "maxReplicas": 2}}),
            "maxReplicas must be at least minReplicas",
        ),
        (
            "zero workers",
            json!({"workers": {"perPartition": 0}}),
            "perPartition",
        ),
        (
            "negative lag per replica",
            json!({"scaling": {"lagPerReplica": -1}}),
            "lagPerReplica",
        ),
        (
            "unknown ordering",
            json!({"workers": {"ordering": "random"}}),
            "supported values: \"partition\", \"key\", \"unordered\"",
        ),
        (
            "bad duration",
            json!({"batching": {"linger": "5 parsecs"}}),
            "spec.batching.linger",
        ),
        (
            "bad byte size",
            json!({"batching": {"maxBytes": true}}),
            "spec.batching.maxBytes",
        ),
        (
            "unknown sink kind",
            json!({"sinks": [{"s3": {"bucket": "b"}}]}),
            "spec.sinks[0]",
        ),
        (
            "sasl without a secret",
            json!({"source": {"bootstrapServers": "k:9092", "topic": "t", "groupId": "g", "security": {"protocol": "SASL_SSL"}}}),
            "passwordSecretRef",
        ),
        (
            "bad topic name",
            json!({"source": {"bootstrapServers": "k:9092", "topic": "a topic", "groupId": "g"}}),
            "spec.source.topic",
        ),
        (
            "wrong type",
            json!({"workers": {"perPartition": "five"}}),
            "spec.workers.perPartition",
        ),
        (
            "negative replicas",
            json!({"replicas": -1}),
            "spec.replicas",
        ),
        (
            "unknown scaling mode",
            json!({"scaling": {"mode": "magic"}}),
            "spec.scaling.mode",
        ),
        (
            "postgres sink without a table",
            json!({"sinks": [{"postgres": {"connectionEnv": "PG_URL"}}]}),
            "table",
        ),
        (
            "postgres table that is not an identifier",
            json!({"sinks": [{"postgres": {"table": "readings; DROP TABLE x"}}]}),
            "spec.sinks[0].postgres.table",
        ),
        (
            "unknown onConflict",
            json!({"sinks": [{"postgres": {"table": "t", "onConflict": "merge"}}]}),
            "spec.sinks[0].postgres.onConflict",
        ),
        (
            "pool of zero connections",
            json!({"sinks": [{"postgres": {"table": "t", "poolSize": 0}}]}),
            "spec.sinks[0].postgres.poolSize",
        ),
        (
            "secret env without a key",
            json!({"secretEnv": [{"name": "PG_URL", "secretKeyRef": {"name": "pg"}}]}),
            "key",
        ),
        (
            "secret env with a bad variable name",
            json!({"secretEnv": [{"name": "PG URL", "secretKeyRef": {"name": "pg", "key": "url"}}]}),
            "spec.secretEnv[0].name",
        ),
        (
            "a secret file named like a path",
            json!({"secretFiles": [{"name": "../etc/passwd", "secretKeyRef": {"name": "ca", "key": "ca.crt"}}]}),
            "spec.secretFiles[0].name",
        ),
        (
            "a secret file without its key",
            json!({"secretFiles": [{"name": "ca.pem", "secretKeyRef": {"name": "ca"}}]}),
            "spec.secretFiles[0].secretKeyRef.key",
        ),
        (
            "dead-letter topic that is not a topic name",
            json!({"deadLetter": {"topic": "dead letters"}}),
            "spec.deadLetter.topic",
        ),
        (
            "jq without a program",
            json!({"processor": {"jq": {"envelope": true}}}),
            "program",
        ),
        (
            "bad retry duration",
            json!({"retry": {"maxElapsed": 5}}),
            "spec.retry.maxElapsed",
        ),
    ];
    for (i, (what, patch, want)) in corpus.into_iter().enumerate() {
        let mut obj = minimal(&format!("bad-{i}"));
        for (k, v) in patch.as_object().unwrap() {
            obj["spec"][k] = v.clone();
        }
        match create(&api, obj).await {
            Ok(_) => panic!("{what}: accepted, expected a rejection mentioning {want:?}"),
            Err(e) => assert!(e.contains(want), "{what}: {e}"),
        }
    }
}

#[tokio::test]
async fn status_and_scale_subresources_work() {
    let (c, ns) = setup("sp").await;
    create(&dynamic(&c, &ns), minimal("scaled")).await.unwrap();
    let api: Api<StreamPipeline> = Api::namespaced(c, &ns);
    api.patch_status(
        "scaled",
        &PatchParams::apply("sluice-tests").force(),
        &Patch::Apply(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
            "status": {"replicas": 2, "partitions": 8, "selector": "sluice.dev/pipeline=scaled"}
        })),
    )
    .await
    .expect("status subresource");
    let scale = api.get_scale("scaled").await.expect("scale subresource");
    assert_eq!(scale.status.as_ref().unwrap().replicas, 2);
    assert_eq!(
        scale.status.as_ref().unwrap().selector.as_deref(),
        Some("sluice.dev/pipeline=scaled")
    );
    api.patch_scale(
        "scaled",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3}})),
    )
    .await
    .expect("scale patch");
    assert_eq!(api.get("scaled").await.unwrap().spec.replicas, 3);
}
