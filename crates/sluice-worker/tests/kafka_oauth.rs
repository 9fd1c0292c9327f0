//! OAUTHBEARER with OpenID Connect client credentials, against the real broker's
//! OAUTHBEARER listener and a real OIDC provider (the local Keycloak of `scripts/oidc.sh`,
//! whose keys the broker's own validator checks every token against): the worker's
//! consumer and its Kafka sink get tokens with the client credentials, fetch new ones
//! before they expire (the provider's tokens live 15 s, the broker re-authenticates every
//! connection before its token expires and refuses an expired one), and keep the pipeline
//! running for several token lifetimes with nothing missing. The client secret comes only
//! from the environment variable the config names and never appears in the worker's log,
//! metrics or config file. A secret the provider refuses leaves the worker up (no exit:
//! on a node only the liveness rule for a worker out of its group restarts it), reading
//! nothing, with the provider's answer in its log.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use sluice_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_sluice-worker");

fn oauth_config(o: &OAuthListener, input: &str, output: &str, group: &str, addr: &str) -> String {
    // Every 100th record fails in jq and goes to the dead-letter topic: the consumer, the
    // sink's producer and the dead-letter producer each get their own tokens.
    format!(
        r#"pipeline: oauth
source:
  bootstrapServers: "{bootstrap}"
  topic: {input}
  groupId: {group}
  sessionTimeout: 10s
  security:
    protocol: SASL_PLAINTEXT
    saslMechanism: OAUTHBEARER
    oauth:
      tokenEndpointUrl: "{url}"
      clientId: "{client}"
      clientSecretEnv: SLUICE_TEST_OAUTH_SECRET
  # librdkafka logs each token it sets (security debug): how the test counts refreshes.
  consumerProperties: {{debug: security}}
processor: {{jq: {{program: 'if .seq % 100 == 7 then error("poison") else . end'}}}}
sinks:
  - kafka: {{topic: {output}}}
deadLetter: {{topic: {input}-dlq}}
commit: {{interval: 500ms, drainTimeout: 8s}}
server: {{listen: "{addr}"}}
"#,
        bootstrap = o.bootstrap,
        url = o.token_endpoint_url,
        client = o.client_id,
    )
}

/// What librdkafka logs (security debug) each time a client sets a new token.
const TOKEN_SET: &str = "after setting OAUTHBEARER token";

#[test]
fn the_worker_reads_and_writes_with_oidc_tokens_and_refreshes_them_before_they_expire() {
    let Some(o) = oauth_listener() else {
        eprintln!("SKIPPED: external broker without SLUICE_TEST_OAUTH_*");
        return;
    };
    let b = bootstrap();
    let (input, output, group) = pipeline_topics("oauth", 2);
    create_topic_now(&format!("{input}-dlq"), 1);
    // Records at a steady rate for three token lifetimes: the last ones are read, and
    // their outputs written, on connections that re-authenticated after the first token
    // had expired.
    let span = o.token_lifetime * 3;
    let rate = 200.0;
    let n = (rate * span.as_secs_f64()) as u64;
    let spec = ProduceSpec {
        bootstrap: b.clone(),
        topic: input.clone(),
        from: 0,
        count: n,
        rate: Some(rate),
        size: 100,
        linger_ms: 5,
    };
    let producer = std::thread::spawn(move || produce(&spec, &AtomicU64::new(0)));
    let addr = format!("127.0.0.1:{}", free_port());
    let mut w = WorkerProcess::start_with_env(
        BIN,
        &unique("oauth"),
        &oauth_config(&o, &input, &output, &group, &addr),
        &addr,
        &[
            ("SLUICE_TEST_OAUTH_SECRET", o.client_secret.as_str()),
            ("SLUICE_LOG", "info,librdkafka=debug"),
        ],
    );
    producer
        .join()
        .expect("producer thread")
        .expect("produce the input");
    wait_for(
        "everything committed through OAUTHBEARER",
        Duration::from_secs(120),
        || uncommitted(&b, &group, &input) == 0,
    );
    let metrics = w.metrics();
    w.signal("TERM");
    assert!(w.wait(Duration::from_secs(30)).expect("exits").success());
    let outputs = read_all(&output, Duration::from_secs(60));
    let letters = read_all(&format!("{input}-dlq"), Duration::from_secs(60));
    assert_eq!(
        (outputs.len() as u64, letters.len() as u64),
        (n - n / 100, n / 100)
    );

    let log = std::fs::read_to_string(&w.log).unwrap();
    // The consumer alone ran for three lifetimes: its first token and at least two more.
    let tokens = log.matches(TOKEN_SET).count();
    assert!(
        tokens >= 3,
        "only {tokens} OAUTHBEARER tokens set in {span:?} of tokens that live {:?}",
        o.token_lifetime
    );
    for (what, text) in [
        ("log", log.as_str()),
        ("metrics", metrics.as_str()),
        ("config file", &std::fs::read_to_string(&w.config).unwrap()),
    ] {
        assert!(
            !text.contains(&o.client_secret),
            "the client secret appears in the worker's {what}"
        );
    }
}

#[test]
fn a_client_secret_the_provider_refuses_leaves_the_worker_running_with_the_reason() {
    let Some(o) = oauth_listener() else {
        eprintln!("SKIPPED: external broker without SLUICE_TEST_OAUTH_*");
        return;
    };
    let b = bootstrap();
    let (input, output, group) = pipeline_topics("oauth-refused", 1);
    create_topic_now(&format!("{input}-dlq"), 1);
    produce_seq(&input, 100);
    let addr = format!("127.0.0.1:{}", free_port());
    let wrong = "not-the-client-secret-6b1e";
    let mut w = WorkerProcess::start_with_env(
        BIN,
        &unique("oauth-refused"),
        &oauth_config(&o, &input, &output, &group, &addr),
        &addr,
        &[("SLUICE_TEST_OAUTH_SECRET", wrong)],
    );
    // Up to 30 s pass before the worker's clients try (at start-up it first reads each
    // Kafka sink's max.message.bytes, three attempts of 10 s against a broker it cannot
    // log in to).
    wait_for(
        "the refused token request in the log",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&w.log)
                .unwrap_or_default()
                .contains("Failed to acquire SASL OAUTHBEARER token")
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        w.wait(Duration::from_millis(10)).is_none(),
        "the worker exited: a refused secret must not crash-loop the pod"
    );
    assert_eq!(
        uncommitted(&b, &group, &input),
        100,
        "nothing is read without a token"
    );
    w.signal("TERM");
    let _ = w.wait(Duration::from_secs(30));
    let log = std::fs::read_to_string(&w.log).unwrap();
    assert!(!log.contains(wrong), "the client secret appears in the log");
}
