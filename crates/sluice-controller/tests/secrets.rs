//! No secret leaves its Secret: the controller (its real binary, against the real API
//! server and the broker's SASL listener) reads a SASL password to inspect the topic and
//! hands the workers a PostgreSQL URL through `secretEnv`, and neither value, nor a wrong
//! password that the broker refuses, appears in a ConfigMap, a Deployment, a status, an
//! Event or a line of the controller's log. A missing Secret is a condition and an Event
//! that say what to fix. Where the broker requires a client certificate, the controller
//! reads the topic with the one a Strimzi-shaped Secret (`user.crt`, `user.key`, `ca.crt`)
//! gives the workers, its key plain or encrypted, and a certificate the broker does not
//! trust is a condition naming the refused handshake. On the broker's OAUTHBEARER listener,
//! the controller gets its token from the real OIDC provider with the client secret the
//! workers get, and a secret the provider refuses is a condition naming the refusal.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Secret};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, CustomResourceExt};
use serde_json::json;
use sluice_api::crd::StreamPipeline;
use sluice_testkit::{
    bootstrap, create_topic, free_port, kubeconfig, mtls_listener, oauth_listener, sasl_bootstrap,
    unique,
};
use support::{client, install, namespace};

/// The broker's real SCRAM password for user `sluice` (scripts/kafka.sh).
const KAFKA_PASSWORD: &str = "sluice-secret";
/// A password the broker refuses.
const WRONG_PASSWORD: &str = "wrong-password-4f1c9e";
/// The password inside the PostgreSQL connection string.
const PG_PASSWORD: &str = "pg-password-7a2d10";

struct Controller {
    child: Child,
    log: std::path::PathBuf,
}

impl Controller {
    fn start(ns: &str) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", unique("controller-secrets")));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_sluice-controller"))
            .args(["--watch-namespace", ns, "--leader-election", "false"])
            // Its own namespace (the Secret digests' key) is the test's.
            .args(["--lease-namespace", ns])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
            .env("KUBECONFIG", kubeconfig())
            .env("SLUICE_LOG", "debug")
            .stdout(out.try_clone().expect("clone"))
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the controller");
        Controller { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn secret(c: &Client, ns: &str, name: &str, key: &str, value: &str) {
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "stringData": {key: value}
    }))
    .unwrap();
    Api::<Secret>::namespaced(c.clone(), ns)
        .create(&PostParams::default(), &s)
        .await
        .expect("create Secret");
}

fn pipeline(name: &str, sasl: &str, topic: &str, kafka_secret: &str) -> StreamPipeline {
    serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
        "metadata": {"name": name},
        "spec": {
            "source": {
                "bootstrapServers": sasl, "topic": topic, "groupId": name,
                "security": {
                    "protocol": "SASL_PLAINTEXT", "saslMechanism": "SCRAM-SHA-512",
                    "username": "sluice",
                    "passwordSecretRef": {"name": kafka_secret, "key": "password"}
                }
            },
            "sinks": [{"postgres": {"table": "readings", "connectionEnv": "PG_URL"}}],
            "secretEnv": [{"name": "PG_URL", "secretKeyRef": {"name": "pg", "key": "url"}}],
            "scaling": {"pollInterval": "1s"}
        }
    }))
    .unwrap()
}

/// Wait until the controller has counted `partitions` partitions for `name` (it reached
/// Kafka); fail with `what` and the controller's log after 90 s.
async fn partitions_counted(
    api: &Api<StreamPipeline>,
    name: &str,
    partitions: i32,
    what: &str,
    controller: &Controller,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while api
        .get(name)
        .await
        .unwrap()
        .status
        .and_then(|s| s.partitions)
        != Some(partitions)
    {
        assert!(
            Instant::now() < deadline,
            "{name}: {what}:\n{}",
            controller.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The Ready condition's (reason, message) once it is `reason`.
async fn ready_reason(api: &Api<StreamPipeline>, name: &str, reason: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let sp = api.get(name).await.expect("get pipeline");
        let found = sp.status.as_ref().and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "Ready" && c.reason == reason)
                .map(|c| c.message.clone())
        });
        if let Some(m) = found {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: no Ready condition with reason {reason} in 90 s: {:?}",
            sp.status
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_configmap_a_deployment_a_status_an_event_or_the_log() {
    let Some(sasl) = sasl_bootstrap() else {
        eprintln!("SKIPPED: external broker without SLUICE_TEST_SASL_BOOTSTRAP");
        return;
    };
    let c = client().await;
    install(&c, &StreamPipeline::crd()).await;
    let ns = namespace(&c, "secrets").await;
    let topic = unique("secrets-in");
    create_topic(&bootstrap(), &topic, 3).await.unwrap();
    secret(&c, &ns, "kafka", "password", KAFKA_PASSWORD).await;
    secret(&c, &ns, "kafka-wrong", "password", WRONG_PASSWORD).await;
    let url = format!("postgres://sluice:{PG_PASSWORD}@db.example:5432/sluice");
    secret(&c, &ns, "pg", "url", &url).await;

    let controller = Controller::start(&ns);
    let api: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
    for (name, kafka_secret) in [
        ("good", "kafka"),
        ("refused", "kafka-wrong"),
        ("missing", "nope"),
    ] {
        api.create(
            &PostParams::default(),
            &pipeline(name, &sasl, &topic, kafka_secret),
        )
        .await
        .expect("create pipeline");
    }

    // The good password reached Kafka: the partitions were counted, the workers planned.
    partitions_counted(
        &api,
        "good",
        3,
        "the controller never read the topic through SASL",
        &controller,
    )
    .await;
    // The wrong one is refused by the broker, and the condition says so.
    let refused = ready_reason(&api, "refused", "KafkaUnavailable").await;
    assert!(
        refused.to_lowercase().contains("authentication"),
        "the condition should name the failed authentication: {refused}"
    );
    // A Secret that does not exist is named, with what to do.
    eprintln!("refused: {refused}");
    let missing = ready_reason(&api, "missing", "SecretNotFound").await;
    eprintln!("missing: {missing}");
    assert!(
        missing.contains("\"nope\"") && missing.contains("passwordSecretRef"),
        "{missing}"
    );
    let events = Api::<Event>::namespaced(c.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    let events = loop {
        let list = events.list(&ListParams::default()).await.unwrap().items;
        if list
            .iter()
            .any(|e| e.reason.as_deref() == Some("SecretNotFound"))
        {
            break list;
        }
        assert!(
            Instant::now() < deadline,
            "no SecretNotFound Event: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // Let a few more reconciles (and their log lines) happen.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut places: Vec<(String, String)> = Vec::new();
    for e in &events {
        places.push(("an Event".into(), serde_json::to_string(e).unwrap()));
    }
    for cm in Api::<ConfigMap>::namespaced(c.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
    {
        places.push(("a ConfigMap".into(), serde_json::to_string(&cm).unwrap()));
    }
    let deployments = Api::<Deployment>::namespaced(c.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    assert!(
        !deployments.is_empty(),
        "the good pipeline should have a Deployment"
    );
    for d in &deployments {
        places.push(("a Deployment".into(), serde_json::to_string(d).unwrap()));
    }
    for sp in api.list(&ListParams::default()).await.unwrap() {
        places.push((
            "a pipeline's status".into(),
            serde_json::to_string(&sp.status).unwrap(),
        ));
    }
    let log = controller.log();
    assert!(
        log.lines().count() > 5,
        "the controller logged almost nothing:\n{log}"
    );
    places.push(("the controller's log".into(), log));
    for (what, text) in &places {
        for s in [KAFKA_PASSWORD, WRONG_PASSWORD, PG_PASSWORD] {
            assert!(!text.contains(s), "{s:?} appears in {what}:\n{text}");
        }
    }
    eprintln!(
        "checked {} Events, ConfigMaps, Deployments, statuses and {} log lines: no secret",
        places.len() - 1,
        places.last().map_or(0, |(_, l)| l.lines().count())
    );
}

/// A Secret with these keys (values as they are).
async fn secret_of(c: &Client, ns: &str, name: &str, data: &[(&str, String)]) {
    let data: serde_json::Map<String, serde_json::Value> = data
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "stringData": data
    }))
    .unwrap();
    Api::<Secret>::namespaced(c.clone(), ns)
        .create(&PostParams::default(), &s)
        .await
        .expect("create Secret");
}

/// A pipeline on the client-certificate listener, its files from the Secret `user` the way
/// Strimzi's KafkaUser Secret is laid out; `key_password` names the Secret key holding an
/// encrypted key's password.
fn mtls_pipeline(
    name: &str,
    bootstrap: &str,
    topic: &str,
    user: &str,
    key_password: bool,
) -> StreamPipeline {
    let file = |f: &str, key: &str| json!({"name": f, "secretKeyRef": {"name": user, "key": key}});
    let mut security = json!({
        "protocol": "SSL",
        "caFile": "/etc/sluice/secrets/ca.crt",
        "certFile": "/etc/sluice/secrets/user.crt",
        "keyFile": "/etc/sluice/secrets/user.key"
    });
    if key_password {
        security["keyPasswordSecretRef"] = json!({"name": user, "key": "user.password"});
    }
    serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
        "metadata": {"name": name},
        "spec": {
            "source": {"bootstrapServers": bootstrap, "topic": topic, "groupId": name, "security": security},
            "sinks": [{"kafka": {"topic": format!("{topic}-out")}}],
            "secretFiles": [file("ca.crt", "ca.crt"), file("user.crt", "user.crt"), file("user.key", "user.key")],
            "scaling": {"pollInterval": "1s"}
        }
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_reads_kafka_with_the_workers_client_certificate_and_names_a_refused_one() {
    let Some(m) = mtls_listener() else {
        eprintln!(
            "SKIPPED: external broker without SLUICE_TEST_MTLS_BOOTSTRAP/SLUICE_TEST_MTLS_DIR"
        );
        return;
    };
    let read = |p: &std::path::PathBuf| std::fs::read_to_string(p).expect("test PKI file");
    let c = client().await;
    install(&c, &StreamPipeline::crd()).await;
    let ns = namespace(&c, "mtls").await;
    let topic = unique("mtls-in");
    create_topic(&bootstrap(), &topic, 3).await.unwrap();
    let ca = read(&m.ca);
    secret_of(
        &c,
        &ns,
        "user",
        &[
            ("user.crt", read(&m.cert)),
            ("user.key", read(&m.key)),
            ("ca.crt", ca.clone()),
        ],
    )
    .await;
    secret_of(
        &c,
        &ns,
        "user-encrypted",
        &[
            ("user.crt", read(&m.cert)),
            ("user.key", read(&m.encrypted_key)),
            ("user.password", m.key_password.clone()),
            ("ca.crt", ca.clone()),
        ],
    )
    .await;
    secret_of(
        &c,
        &ns,
        "stranger",
        &[
            ("user.crt", read(&m.stranger_cert)),
            ("user.key", read(&m.stranger_key)),
            ("ca.crt", ca),
        ],
    )
    .await;

    let controller = Controller::start(&ns);
    let api: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
    for (name, user, key_password) in [
        ("plain-key", "user", false),
        ("encrypted-key", "user-encrypted", true),
        ("stranger", "stranger", false),
    ] {
        api.create(
            &PostParams::default(),
            &mtls_pipeline(name, &m.bootstrap, &topic, user, key_password),
        )
        .await
        .expect("create pipeline");
    }
    // Both good certificates reach Kafka: the partitions are counted.
    for name in ["plain-key", "encrypted-key"] {
        partitions_counted(
            &api,
            name,
            3,
            "the controller never read the topic with the client certificate",
            &controller,
        )
        .await;
    }
    // The stranger's certificate is refused by the broker, and the condition says why.
    let refused = ready_reason(&api, "stranger", "KafkaUnavailable").await;
    eprintln!("stranger: {refused}");
    let lower = refused.to_lowercase();
    assert!(
        lower.contains("ssl") || lower.contains("certificate"),
        "the condition should name the refused handshake: {refused}"
    );
    // No Deployment for the refused one (no pods to crash-loop), one for each good one.
    let deployments: Vec<String> = Api::<Deployment>::namespaced(c.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|d| d.metadata.name)
        .collect();
    assert!(
        !deployments.contains(&"stranger".to_string()),
        "{deployments:?}"
    );
    // Neither the key nor its password leaves its Secret.
    let key_line = read(&m.key).lines().nth(1).unwrap_or_default().to_string();
    let log = controller.log();
    for (what, text) in [
        ("the controller's log", log.clone()),
        (
            "the ConfigMaps",
            serde_json::to_string(
                &Api::<ConfigMap>::namespaced(c.clone(), &ns)
                    .list(&ListParams::default())
                    .await
                    .unwrap()
                    .items,
            )
            .unwrap(),
        ),
    ] {
        assert!(
            !text.contains(&key_line),
            "a line of the private key appears in {what}"
        );
        assert!(
            !text.contains(&m.key_password),
            "the key password appears in {what}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_reads_kafka_with_oidc_client_credentials_and_names_a_refused_secret() {
    let Some(o) = oauth_listener() else {
        eprintln!("SKIPPED: external broker without SLUICE_TEST_OAUTH_*");
        return;
    };
    let c = client().await;
    install(&c, &StreamPipeline::crd()).await;
    let ns = namespace(&c, "oauth").await;
    let topic = unique("oauth-in");
    create_topic(&bootstrap(), &topic, 3).await.unwrap();
    let wrong = "wrong-client-secret-0c7d2e";
    secret(&c, &ns, "oauth-client", "secret", &o.client_secret).await;
    secret(&c, &ns, "oauth-wrong", "secret", wrong).await;

    let controller = Controller::start(&ns);
    let api: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
    for (name, secret_name) in [("good", "oauth-client"), ("refused", "oauth-wrong")] {
        let sp: StreamPipeline = serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
            "metadata": {"name": name},
            "spec": {
                "source": {"bootstrapServers": o.bootstrap, "topic": topic, "groupId": name, "security": {
                    "protocol": "SASL_PLAINTEXT", "saslMechanism": "OAUTHBEARER",
                    "oauth": {"tokenEndpointUrl": o.token_endpoint_url, "clientId": o.client_id,
                        "clientSecretRef": {"name": secret_name, "key": "secret"}}}},
                "sinks": [{"kafka": {"topic": format!("{topic}-out")}}],
                "scaling": {"pollInterval": "1s"}
            }
        }))
        .unwrap();
        api.create(&PostParams::default(), &sp)
            .await
            .expect("create pipeline");
    }
    // The good secret reaches Kafka: the partitions are counted.
    partitions_counted(
        &api,
        "good",
        3,
        "the controller never read the topic with an OIDC token",
        &controller,
    )
    .await;
    // The provider refuses the wrong one, and the condition says so.
    let refused = ready_reason(&api, "refused", "KafkaUnavailable").await;
    eprintln!("refused: {refused}");
    assert!(
        refused.contains("OAUTHBEARER"),
        "the condition should name the refused token request: {refused}"
    );
    let deployments: Vec<String> = Api::<Deployment>::namespaced(c.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|d| d.metadata.name)
        .collect();
    assert!(
        deployments.contains(&"good".to_string()) && !deployments.contains(&"refused".to_string()),
        "{deployments:?}"
    );
    // Neither secret leaves its Secret.
    let log = controller.log();
    let configmaps = serde_json::to_string(
        &Api::<ConfigMap>::namespaced(c.clone(), &ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items,
    )
    .unwrap();
    let statuses =
        serde_json::to_string(&api.list(&ListParams::default()).await.unwrap().items).unwrap();
    for (what, text) in [
        ("the controller's log", &log),
        ("the ConfigMaps", &configmaps),
        ("the pipelines", &statuses),
    ] {
        for s in [o.client_secret.as_str(), wrong] {
            assert!(!text.contains(s), "a client secret appears in {what}");
        }
    }
}
