//! SASL and TLS against the real broker: the worker authenticates with SASL/PLAIN and
//! SCRAM-SHA-256/512, the password comes only from the environment variable the config
//! names and never appears in the worker's logs or metrics; TLS verifies the broker against
//! the configured CA, alone and under SASL (SASL_SSL); where the broker requires a client
//! certificate, the worker presents one (its key plain or encrypted) for the source, the
//! Kafka sink and the dead-letter topic, and one the broker does not trust leaves it
//! running, refused, with the reason in its log.

use std::time::Duration;

use sluice_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_sluice-worker");
const PASSWORD: &str = "sluice-secret";

/// `source.security` for user `sluice` with `mechanism` over SASL_PLAINTEXT, the password
/// from `SLUICE_TEST_KAFKA_PASSWORD`.
fn sasl_security(mechanism: &str) -> String {
    format!("{{protocol: SASL_PLAINTEXT, saslMechanism: {mechanism}, username: sluice, passwordEnv: SLUICE_TEST_KAFKA_PASSWORD}}")
}

fn sasl_config(sasl: &str, input: &str, output: &str, group: &str, addr: &str) -> String {
    security_config(sasl, &sasl_security("PLAIN"), input, output, group, addr)
}

/// A worker given a password the broker refuses with `mechanism`, over 100 input records;
/// returns (the worker, input, group) once the refusal is in its log.
fn start_refused(name: &str, sasl: &str, mechanism: &str) -> (WorkerProcess, String, String) {
    let (input, output, group) = pipeline_topics(name, 1);
    produce_seq(&input, 100);
    let addr = format!("127.0.0.1:{}", free_port());
    let w = WorkerProcess::start_with_env(
        BIN,
        &unique(name),
        &security_config(
            sasl,
            &sasl_security(mechanism),
            &input,
            &output,
            &group,
            &addr,
        ),
        &addr,
        &[("SLUICE_TEST_KAFKA_PASSWORD", "not-the-password")],
    );
    // Up to 30 s pass before the worker's clients try, and log, the refused login: at
    // start-up it first reads each Kafka sink's max.message.bytes (three attempts of 10 s
    // against a broker that refuses it, kafka/limits.rs, whose admin client logs nothing).
    wait_for(
        "the authentication failure in the log",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&w.log)
                .unwrap_or_default()
                .contains("Authentication failed")
        },
    );
    (w, input, group)
}

fn security_config(
    bootstrap: &str,
    security: &str,
    input: &str,
    output: &str,
    group: &str,
    addr: &str,
) -> String {
    format!(
        r#"pipeline: sasl
source:
  bootstrapServers: "{bootstrap}"
  topic: {input}
  groupId: {group}
  sessionTimeout: 10s
  security: {security}
sinks:
  - kafka: {{topic: {output}}}
commit: {{interval: 500ms, drainTimeout: 8s}}
server: {{listen: "{addr}"}}
"#
    )
}

#[test]
fn the_worker_authenticates_with_sasl_plain_and_never_logs_the_password() {
    let Some(sasl) = sasl_bootstrap() else {
        eprintln!("SKIPPED: external broker without SLUICE_TEST_SASL_BOOTSTRAP");
        return;
    };
    let b = bootstrap();
    let (input, output, group) = pipeline_topics("sasl", 2);
    let n = 20_000;
    produce_seq(&input, n);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut w = WorkerProcess::start_with_env(
        BIN,
        &unique("sasl"),
        &sasl_config(&sasl, &input, &output, &group, &addr),
        &addr,
        &[
            ("SLUICE_TEST_KAFKA_PASSWORD", PASSWORD),
            ("SLUICE_LOG", "debug,librdkafka=debug"),
        ],
    );
    wait_for(
        "everything committed through SASL",
        Duration::from_secs(120),
        || uncommitted(&b, &group, &input) == 0,
    );
    let metrics = w.metrics();
    w.signal("TERM");
    assert!(w.wait(Duration::from_secs(30)).expect("exits").success());
    let r = audit(&b, &output, 0, n, Duration::from_secs(60)).unwrap();
    assert_eq!(r.missing, 0, "{r}");
    let log = std::fs::read_to_string(&w.log).unwrap();
    assert!(
        !log.contains(PASSWORD),
        "the password appears in the worker log"
    );
    assert!(
        !metrics.contains(PASSWORD),
        "the password appears in the metrics"
    );
    assert!(
        !std::fs::read_to_string(&w.config)
            .unwrap()
            .contains(PASSWORD),
        "the password is in the config file"
    );
}

#[test]
fn a_missing_password_variable_fails_start_up_with_a_clear_message() {
    let dir = std::env::temp_dir().join(unique("sasl-cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.yaml");
    std::fs::write(
        &cfg,
        sasl_config("127.0.0.1:1", "in", "out", "g", "127.0.0.1:0"),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .env_remove("SLUICE_TEST_KAFKA_PASSWORD")
        .env("SLUICE_LOG_FORMAT", "text")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SLUICE_TEST_KAFKA_PASSWORD") && err.contains("not set"),
        "{err}"
    );
}

#[test]
fn a_wrong_password_is_refused_by_the_broker_and_nothing_is_consumed() {
    let Some(sasl) = sasl_bootstrap() else {
        eprintln!("SKIPPED: external broker without SLUICE_TEST_SASL_BOOTSTRAP");
        return;
    };
    let b = bootstrap();
    let (w, input, group) = start_refused("sasl-bad", &sasl, "PLAIN");
    assert_eq!(w.metric("sluice_messages_consumed_total", ""), 0.0);
    assert_eq!(
        uncommitted(&b, &group, &input),
        100,
        "nothing committed without authentication"
    );
}

/// Run 5,000 records through a worker with `security` on `bootstrap`; all must arrive.
fn run_secured(
    name: &str,
    bootstrap_servers: &str,
    security: &str,
    env: &[(&str, &str)],
) -> String {
    let b = bootstrap();
    let (input, output, group) = pipeline_topics(name, 2);
    let n = 5_000;
    produce_seq(&input, n);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut w = WorkerProcess::start_with_env(
        BIN,
        &unique(name),
        &security_config(bootstrap_servers, security, &input, &output, &group, &addr),
        &addr,
        env,
    );
    wait_for(
        &format!("everything committed through {name}"),
        Duration::from_secs(120),
        || uncommitted(&b, &group, &input) == 0,
    );
    w.signal("TERM");
    assert!(w.wait(Duration::from_secs(30)).expect("exits").success());
    let r = audit(&b, &output, 0, n, Duration::from_secs(60)).unwrap();
    assert_eq!(r.missing, 0, "{name}: {r}");
    std::fs::read_to_string(&w.log).unwrap()
}

#[test]
fn the_worker_authenticates_with_scram_sha_256_and_512() {
    let Some(sasl) = sasl_bootstrap() else {
        eprintln!("SKIPPED: external broker without SLUICE_TEST_SASL_BOOTSTRAP");
        return;
    };
    for mech in ["SCRAM-SHA-256", "SCRAM-SHA-512"] {
        let log = run_secured(
            &mech.to_lowercase(),
            &sasl,
            &sasl_security(mech),
            &[("SLUICE_TEST_KAFKA_PASSWORD", PASSWORD)],
        );
        assert!(
            !log.contains(PASSWORD),
            "{mech}: the password reached the log"
        );
    }
}

#[test]
fn a_wrong_scram_password_is_refused() {
    let Some(sasl) = sasl_bootstrap() else {
        eprintln!("SKIPPED: external broker without SLUICE_TEST_SASL_BOOTSTRAP");
        return;
    };
    let (w, _, _) = start_refused("scram-bad", &sasl, "SCRAM-SHA-512");
    assert_eq!(w.metric("sluice_messages_consumed_total", ""), 0.0);
    assert!(!std::fs::read_to_string(&w.log)
        .unwrap()
        .contains("not-the-password"));
}

#[test]
fn the_worker_speaks_tls_and_verifies_the_broker_against_the_configured_ca() {
    let Some((tls, ca)) = tls_bootstrap() else {
        eprintln!("SKIPPED: external broker without SLUICE_TEST_TLS_BOOTSTRAP/SLUICE_TEST_TLS_CA");
        return;
    };
    run_secured(
        "tls",
        &tls,
        &format!("{{protocol: SSL, caFile: \"{}\"}}", ca.display()),
        &[],
    );
    // Without the CA the broker's certificate is not trusted: nothing is consumed.
    let (input, output, group) = pipeline_topics("tls-untrusted", 1);
    produce_seq(&input, 100);
    let addr = format!("127.0.0.1:{}", free_port());
    let w = WorkerProcess::start(
        BIN,
        &unique("tls-untrusted"),
        &security_config(&tls, "{protocol: SSL}", &input, &output, &group, &addr),
        &addr,
    );
    wait_for(
        "the certificate failure in the log",
        Duration::from_secs(30),
        || {
            let log = std::fs::read_to_string(&w.log)
                .unwrap_or_default()
                .to_lowercase();
            log.contains("certificate") || log.contains("ssl handshake")
        },
    );
    assert_eq!(w.metric("sluice_messages_delivered_total", ""), 0.0);
}

#[test]
fn the_worker_speaks_sasl_over_tls_with_scram() {
    let Some((sasl_ssl, ca)) = sasl_ssl_bootstrap() else {
        eprintln!(
            "SKIPPED: external broker without SLUICE_TEST_SASL_SSL_BOOTSTRAP/SLUICE_TEST_TLS_CA"
        );
        return;
    };
    let log = run_secured(
        "sasl-ssl",
        &sasl_ssl,
        &format!(
            "{{protocol: SASL_SSL, saslMechanism: SCRAM-SHA-512, username: sluice, passwordEnv: SLUICE_TEST_KAFKA_PASSWORD, caFile: \"{}\"}}",
            ca.display()
        ),
        &[("SLUICE_TEST_KAFKA_PASSWORD", PASSWORD)],
    );
    assert!(!log.contains(PASSWORD), "the password reached the log");
}

/// `source.security` presenting `cert`/`key` to the client-certificate listener.
fn mtls_security(
    m: &MtlsListener,
    cert: &std::path::Path,
    key: &std::path::Path,
    extra: &str,
) -> String {
    format!(
        "{{protocol: SSL, caFile: \"{}\", certFile: \"{}\", keyFile: \"{}\"{extra}}}",
        m.ca.display(),
        cert.display(),
        key.display()
    )
}

#[test]
fn the_worker_presents_a_client_certificate_for_source_sink_and_dead_letters() {
    let Some(m) = mtls_listener() else {
        eprintln!(
            "SKIPPED: external broker without SLUICE_TEST_MTLS_BOOTSTRAP/SLUICE_TEST_MTLS_DIR"
        );
        return;
    };
    let b = bootstrap();
    for (name, key, extra, env) in [
        ("mtls", &m.key, "", Vec::<(&str, &str)>::new()),
        (
            "mtls-encrypted",
            &m.encrypted_key,
            ", keyPasswordEnv: SLUICE_TEST_KEY_PASSWORD",
            vec![("SLUICE_TEST_KEY_PASSWORD", m.key_password.as_str())],
        ),
    ] {
        let (input, output, group) = pipeline_topics(name, 2);
        let dlq = format!("{input}-dlq");
        create_topic_now(&dlq, 1);
        let n = 2_000;
        produce_seq(&input, n);
        let addr = format!("127.0.0.1:{}", free_port());
        // Every 100th record fails in jq and goes to the dead-letter topic: the consumer,
        // the sink's producer and the dead-letter producer all connect with the certificate.
        let config = format!(
            "{}processor: {{jq: {{program: 'if .seq % 100 == 7 then error(\"poison\") else . end'}}}}\ndeadLetter: {{topic: {dlq}}}\n",
            security_config(&m.bootstrap, &mtls_security(&m, &m.cert, key, extra), &input, &output, &group, &addr)
        );
        let mut w = WorkerProcess::start_with_env(BIN, &unique(name), &config, &addr, &env);
        wait_for(
            &format!("everything committed through {name}"),
            Duration::from_secs(120),
            || uncommitted(&b, &group, &input) == 0,
        );
        w.signal("TERM");
        assert!(w.wait(Duration::from_secs(30)).expect("exits").success());
        let outputs = read_all(&output, Duration::from_secs(60));
        let letters = read_all(&dlq, Duration::from_secs(60));
        assert_eq!((outputs.len(), letters.len()), (1_980, 20), "{name}");
        if !m.key_password.is_empty() {
            assert!(
                !std::fs::read_to_string(&w.log)
                    .unwrap()
                    .contains(&m.key_password),
                "{name}: the key password reached the log"
            );
        }
    }
}

#[test]
fn a_certificate_the_broker_does_not_trust_is_refused_and_the_worker_keeps_running() {
    let Some(m) = mtls_listener() else {
        eprintln!(
            "SKIPPED: external broker without SLUICE_TEST_MTLS_BOOTSTRAP/SLUICE_TEST_MTLS_DIR"
        );
        return;
    };
    let b = bootstrap();
    for (name, security) in [
        (
            "mtls-stranger",
            mtls_security(&m, &m.stranger_cert, &m.stranger_key, ""),
        ),
        (
            "mtls-none",
            format!("{{protocol: SSL, caFile: \"{}\"}}", m.ca.display()),
        ),
    ] {
        let (input, output, group) = pipeline_topics(name, 1);
        produce_seq(&input, 100);
        let addr = format!("127.0.0.1:{}", free_port());
        let mut w = WorkerProcess::start(
            BIN,
            &unique(name),
            &security_config(&m.bootstrap, &security, &input, &output, &group, &addr),
            &addr,
        );
        // (After up to 30 s of the start-up's max.message.bytes read: see start_refused.)
        wait_for(
            &format!("{name}: the refused handshake in the log"),
            Duration::from_secs(60),
            || {
                let log = std::fs::read_to_string(&w.log)
                    .unwrap_or_default()
                    .to_lowercase();
                log.contains("ssl") && (log.contains("certificate") || log.contains("handshake"))
            },
        );
        assert_eq!(
            w.metric("sluice_messages_consumed_total", ""),
            0.0,
            "{name}"
        );
        // (The group's offsets are read with a deadline: one read can time out on a busy
        // machine.)
        poll(
            &format!("{name}: 100 records uncommitted"),
            Duration::from_secs(30),
            || match uncommitted(&b, &group, &input) {
                100 => Ok(()),
                other => Err(format!("uncommitted: {other}")),
            },
        );
        assert!(
            w.wait(Duration::from_millis(100)).is_none(),
            "{name}: the worker exited"
        );
        assert_eq!(
            http_status(&addr, "/healthz"),
            Some(200),
            "{name}: not live"
        );
        w.signal("TERM");
        assert!(
            w.wait(Duration::from_secs(30)).is_some(),
            "{name}: no exit on SIGTERM"
        );
    }
}
