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
    let typed: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
    let sp = typed.get("iot").await.unwrap();
    assert_eq!(sp.worker_config().unwrap().pipeline, "iot");

    // An http sink with its defaults and a header from a Secret.
    let mut obj = minimal("iot-http");
    obj["spec"]["sinks"] = json!([{"http": {"url": "https://ingest.example.com/v1/events",
        "headers": [{"name": "Authorization", "valueEnv": "INGEST_TOKEN"}, {"name": "X-Team", "value": "iot"}]}}]);
    obj["spec"]["secretEnv"] =
        json!([{"name": "INGEST_TOKEN", "secretKeyRef": {"name": "ingest", "key": "token"}}]);
    let created = create(&dynamic(&c, &ns), obj).await.expect("an http sink");
    let http = &created["spec"]["sinks"][0]["http"];
    assert_eq!(http["method"], "POST");
    assert_eq!(http["batch"], json!({"as": "array"}));
    assert_eq!(http["timeout"], "10s");
    assert_eq!(http["idempotencyHeader"], "Idempotency-Key");
    assert_eq!(http["maxInFlight"], 4);
    let sp = typed.get("iot-http").await.unwrap();
    assert!(sp.worker_config().is_ok());
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
            "an http header with a value and a valueEnv",
            json!({"sinks": [{"http": {"url": "https://x.example/y", "headers": [{"name": "A", "value": "v", "valueEnv": "E"}]}}]}),
            "a header has exactly one of value and valueEnv",
        ),
        (
            "an http method sluice does not send",
            json!({"sinks": [{"http": {"url": "https://x.example/y", "method": "GET"}}]}),
            "spec.sinks[0].http.method",
        ),
        (
            "an http URL that is no URL",
            json!({"sinks": [{"http": {"url": "x.example/y"}}]}),
            "spec.sinks[0].http.url",
        ),
        (
            "a registry URL that is no URL",
            json!({"source": {"bootstrapServers": "k:9092", "topic": "t", "groupId": "g", "format": {"schemaRegistry": {"url": "registry:8081"}}}}),
            "spec.source.format.schemaRegistry.url",
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
            "a topic and a topic list",
            json!({"source": {"bootstrapServers": "k:9092", "topic": "t", "topics": ["a"], "groupId": "g"}}),
            "set one of topic, topics and topicPattern",
        ),
        (
            "no topic at all",
            json!({"source": {"bootstrapServers": "k:9092", "groupId": "g"}}),
            "set one of topic, topics and topicPattern",
        ),
        (
            "a bad name in the topic list",
            json!({"source": {"bootstrapServers": "k:9092", "topics": ["a", "b c"], "groupId": "g"}}),
            "spec.source.topics[1]",
        ),
        (
            "OAUTHBEARER without oauth",
            json!({"source": {"bootstrapServers": "k:9092", "topic": "t", "groupId": "g", "security": {"protocol": "SASL_SSL", "saslMechanism": "OAUTHBEARER"}}}),
            "oauth (OAUTHBEARER)",
        ),
        (
            "a token endpoint that is not a URL",
            json!({"source": {"bootstrapServers": "k:9092", "topic": "t", "groupId": "g", "security": {"protocol": "SASL_SSL", "saslMechanism": "OAUTHBEARER",
                "oauth": {"tokenEndpointUrl": "idp/token", "clientId": "c", "clientSecretRef": {"name": "s", "key": "k"}}}}}),
            "spec.source.security.oauth.tokenEndpointUrl",
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
        // What the controller's types refuse, the schema refuses (issue 11).
        (
            "a byte size that is a word",
            json!({"batching": {"maxBytes": "lots"}}),
            "spec.batching.maxBytes",
        ),
        (
            "a negative byte size",
            json!({"batching": {"maxBytes": -5}}),
            "spec.batching.maxBytes",
        ),
        (
            "a byte size in terabytes (no such unit)",
            json!({"memory": {"inFlightBytes": "1TB"}}),
            "spec.memory.inFlightBytes",
        ),
        (
            "a byte size beyond 64 bits",
            json!({"memory": {"fetchBuffer": "99999999999999999999"}}),
            "spec.memory.fetchBuffer",
        ),
        (
            "a duration with two decimal points",
            json!({"batching": {"linger": "1.5.5s"}}),
            "spec.batching.linger",
        ),
        (
            "a duration beyond 64 bits",
            json!({"commit": {"drainTimeout": "99999999999999999999s"}}),
            "spec.commit.drainTimeout",
        ),
        (
            "attempts beyond 32 bits",
            json!({"retry": {"maxAttempts": 5_000_000_000u64}}),
            "spec.retry.maxAttempts",
        ),
        (
            "a log level that is not a filter",
            json!({"logLevel": "verbose-please"}),
            "spec.logLevel",
        ),
        (
            "a custom processor on the stock image",
            json!({"processor": {"custom": {"name": "enrich"}}}),
            "processor.custom needs spec.image",
        ),
        (
            "a secret env var the worker sets itself",
            json!({"secretEnv": [{"name": "SLUICE_CONFIG", "secretKeyRef": {"name": "s", "key": "k"}}]}),
            "are set by sluice",
        ),
        (
            "a secret env var that overrides the configuration",
            json!({"secretEnv": [{"name": "SLUICE__SOURCE__TOPIC", "secretKeyRef": {"name": "s", "key": "k"}}]}),
            "SLUICE__* would override",
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

/// The pod template: the pod spec's own schema, and sluice's rules (its label and
/// annotation keys, its security context) written twice, for the API server (CEL) and for
/// objects stored before the rules (`PodTemplate::check`): both refuse the same templates
/// and accept the same ones.
#[tokio::test]
async fn the_api_server_and_the_controller_refuse_the_same_pod_templates() {
    let (c, ns) = setup("sp").await;
    let api = dynamic(&c, &ns);
    let good = json!({
        "metadata": {"labels": {"team": "iot", "app.kubernetes.io/part-of": "billing"},
                     "annotations": {"example.com/owner": "iot", "prometheus.io/scrape": "true"}},
        "nodeSelector": {"pool": "streaming"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "streaming", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["streaming"]}]}]}}},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}],
        "priorityClassName": "streaming-high",
        "serviceAccountName": "iot-enrich",
        "automountServiceAccountToken": true,
        "imagePullSecrets": [{"name": "registry"}],
        "securityContext": {"fsGroup": 2000, "runAsUser": 1000, "runAsNonRoot": true,
                            "seccompProfile": {"type": "Localhost", "localhostProfile": "sluice.json"}}
    });
    let mut obj = minimal("placed");
    obj["spec"]["template"] = good.clone();
    let stored = create(&api, obj)
        .await
        .expect("a full template is accepted");
    assert_eq!(stored["spec"]["template"], good, "stored as given");
    let typed: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
    let sp = typed.get("placed").await.unwrap();
    sp.worker_config().expect("the controller accepts it too");

    let refused: Vec<(serde_json::Value, &str)> = vec![
        (
            json!({"metadata": {"labels": {"sluice.dev/pipeline": "other"}}}),
            "template.metadata.labels",
        ),
        (
            json!({"metadata": {"labels": {"app.kubernetes.io/name": "x"}}}),
            "template.metadata.labels",
        ),
        (
            json!({"metadata": {"annotations": {"sluice.dev/config-hash": "0"}}}),
            "template.metadata.annotations",
        ),
        (
            json!({"metadata": {"annotations": {"prometheus.io/port": "80"}}}),
            "template.metadata.annotations",
        ),
        (
            json!({"securityContext": {"runAsNonRoot": false}}),
            "template.securityContext.runAsNonRoot",
        ),
        (
            json!({"securityContext": {"runAsUser": 0}}),
            "template.securityContext.runAsUser",
        ),
        (
            json!({"securityContext": {"runAsGroup": 0}}),
            "template.securityContext.runAsGroup",
        ),
        (
            json!({"securityContext": {"seccompProfile": {"type": "Unconfined"}}}),
            "template.securityContext.seccompProfile",
        ),
        (
            json!({"securityContext": {"appArmorProfile": {"type": "Unconfined"}}}),
            "template.securityContext.appArmorProfile",
        ),
        (
            json!({"securityContext": {"windowsOptions": {"hostProcess": true}}}),
            "template.securityContext.windowsOptions.hostProcess",
        ),
    ];
    for (i, (template, field)) in refused.into_iter().enumerate() {
        let mut obj = minimal(&format!("refused-{i}"));
        obj["spec"]["template"] = template.clone();
        let e = create(&api, obj.clone())
            .await
            .expect_err(&template.to_string());
        assert!(e.contains(field), "{template}: the API server says {e}");
        let t: sluice_api::crd::PodTemplate = serde_json::from_value(template.clone()).unwrap();
        let e = t.check().expect_err(&template.to_string()).to_string();
        assert!(e.contains(field), "{template}: the controller says {e}");
    }
    // The pod spec's schema: shapes a Deployment's schema refuses.
    for (template, want) in [
        (
            json!({"tolerations": "dedicated"}),
            "spec.template.tolerations",
        ),
        (
            json!({"topologySpreadConstraints": [{"topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}]}),
            "maxSkew",
        ),
        (
            json!({"nodeSelector": {"pool": 5}}),
            "spec.template.nodeSelector.pool",
        ),
        (
            json!({"imagePullSecrets": [{"name": 5}]}),
            "spec.template.imagePullSecrets[0].name",
        ),
    ] {
        let mut obj = minimal("malformed");
        obj["spec"]["template"] = template.clone();
        let e = create(&api, obj).await.expect_err(&template.to_string());
        assert!(e.contains(want), "{template}: {e}");
    }
}

#[tokio::test]
async fn scale_to_zero_is_accepted_with_min_replicas_zero_and_refused_otherwise() {
    let (c, ns) = setup("sp").await;
    let api = dynamic(&c, &ns);
    let mut ok = minimal("idle");
    ok["spec"]["scaling"] = json!({"minReplicas": 0, "idleAfter": "2m", "activationLag": 50});
    let created = create(&api, ok).await.expect("minReplicas 0 is valid");
    assert_eq!(created["spec"]["scaling"]["minReplicas"], 0);
    assert_eq!(created["spec"]["scaling"]["idleAfter"], "2m");
    // Without the scale-to-zero fields, nothing is added to the stored object.
    let plain = create(&api, minimal("plain")).await.unwrap();
    assert!(plain["spec"]["scaling"].get("idleAfter").is_none());
    assert!(plain["spec"]["scaling"].get("activationLag").is_none());
    let refused = [
        (
            json!({"minReplicas": 1, "idleAfter": "5m"}),
            "idleAfter and activationLag apply only with minReplicas: 0",
        ),
        (
            json!({"minReplicas": 3, "activationLag": 5}),
            "idleAfter and activationLag apply only with minReplicas: 0",
        ),
        (
            json!({"minReplicas": 0, "activationLag": 0}),
            "activationLag",
        ),
        (json!({"minReplicas": -1}), "minReplicas"),
        (json!({"minReplicas": 0, "idleAfter": "soon"}), "idleAfter"),
    ];
    for (i, (scaling, want)) in refused.into_iter().enumerate() {
        let mut obj = minimal(&format!("bad-{i}"));
        obj["spec"]["scaling"] = scaling.clone();
        match create(&api, obj).await {
            Ok(_) => panic!("{scaling}: accepted, expected a rejection mentioning {want:?}"),
            Err(e) => assert!(e.contains(want), "{scaling}: {e}"),
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

#[tokio::test]
async fn names_that_cannot_name_the_children_are_refused_with_the_rule() {
    let (c, ns) = setup("sp").await;
    let api = dynamic(&c, &ns);
    let long = format!("p{}", "x".repeat(69));
    for name in ["iot.enrich.v2", long.as_str(), "9lives"] {
        let e = create(&api, minimal(name)).await.unwrap_err();
        assert!(
            e.contains("must be a DNS-1035 label of at most 55"),
            "{name}: {e}"
        );
    }
    let ok = "a".repeat(55);
    create(&api, minimal(&ok))
        .await
        .expect("55 characters are fine");
}

/// A tiny deterministic generator (no dependency): xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// Strings made of the pieces sizes and durations are written with, and some that are
/// not: most are wrong, some are right, a few are right but huge.
fn random_scalar(r: &mut Rng) -> serde_json::Value {
    const PIECES: &[&str] = &[
        "0",
        "1",
        "5",
        "9",
        "42",
        "1024",
        "99999",
        "4294967296",
        "18446744073709551616",
        "999999999999999999999",
        ".",
        ".5",
        "-",
        "+",
        " ",
        "e3",
        "B",
        "KB",
        "kB",
        "KiB",
        "MB",
        "MiB",
        "GB",
        "GiB",
        "TB",
        "ns",
        "us",
        "ms",
        "s",
        "m",
        "h",
        "d",
        "µs",
        "x",
        "lots",
    ];
    match r.next() % 4 {
        0 => json!((r.next() as i64) >> (r.next() % 64)),
        1 => json!(r.next() % 2_000_000),
        _ => {
            let n = 1 + r.next() % 4;
            json!((0..n).map(|_| r.pick(PIECES)).collect::<String>())
        }
    }
}

/// Parity: every value the API server accepts in a typed field, the controller's types
/// parse. Random values (seeded, so a failure can be replayed) and hand-picked edge cases,
/// in every size, duration and count field of the spec; each accepted object goes through
/// the controller's own parse.
#[tokio::test]
async fn every_value_the_api_server_accepts_the_controller_parses() {
    let (c, ns) = setup("parity").await;
    let api = dynamic(&c, &ns);
    let fields: &[(&str, &str)] = &[
        ("batching", "maxBytes"),
        ("memory", "inFlightBytes"),
        ("memory", "fetchBuffer"),
        ("batching", "linger"),
        ("batching", "maxMessages"),
        ("commit", "interval"),
        ("commit", "drainTimeout"),
        ("retry", "initialBackoff"),
        ("retry", "maxAttempts"),
        ("workers", "queueCapacity"),
        ("scaling", "lagPerReplica"),
        ("scaling", "pollInterval"),
    ];
    let picked = [
        json!("lots"),
        json!(-5),
        json!("1.5s"),
        json!("1.5.5s"),
        json!("2m 30s"),
        json!("2m30s"),
        json!("5ms "),
        json!(" 5ms"),
        json!("1 MiB"),
        json!("1MiB"),
        json!("0"),
        json!(0),
        json!("999999999GiB"),
        json!("999999999999999999"),
        json!("9999999999999999999"),
        json!(9_223_372_036_854_775_807i64),
        json!(4_294_967_296u64),
        json!(1.5),
        json!("999999999h"),
        json!("1.999ms"),
        json!("0.001ns"),
        json!(true),
        json!(""),
        json!("1e3"),
        json!("+5"),
        json!("5µs"),
    ];
    let mut rng = Rng(0x5EED_1157);
    let (mut accepted, mut refused) = (0, 0);
    for (i, (section, field)) in fields.iter().enumerate() {
        let mut values: Vec<serde_json::Value> = picked.to_vec();
        values.extend((0..40).map(|_| random_scalar(&mut rng)));
        for (j, v) in values.into_iter().enumerate() {
            let mut obj = minimal(&format!("parity-{i}-{j}"));
            obj["spec"][*section] = json!({ *field: v.clone() });
            let obj: kube::api::DynamicObject = serde_json::from_value(obj).unwrap();
            let pp = PostParams {
                dry_run: true,
                ..Default::default()
            };
            match api.create(&pp, &obj).await {
                Ok(stored) => {
                    accepted += 1;
                    if let Err(e) = sluice_controller::reconcile::validate::parse(&stored) {
                        panic!("spec.{section}.{field} = {v}: the API server accepted it, the controller cannot parse it: {e}");
                    }
                }
                Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => refused += 1,
                Err(e) => panic!("spec.{section}.{field} = {v}: {e}"),
            }
        }
    }
    assert!(
        accepted > 50 && refused > 200,
        "accepted {accepted}, refused {refused}"
    );
    println!("parity: {accepted} accepted values all parse; {refused} refused");
}
