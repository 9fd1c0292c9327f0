//! Validation, pure: from the object as the API server stored it to a worker configuration
//! the controller is willing to roll out, or a [`ConfigError`] naming the field and the
//! rule.
//!
//! - [`parse`]: the stored object into the typed [`StreamPipeline`], with the path of the
//!   first field that does not fit (an object stored through a looser or older schema).
//!   The controller watches untyped objects and parses each one here, so an object that
//!   does not parse gets its own `InvalidSpec` condition and stops nothing else.
//! - [`validate`]: [`StreamPipeline::worker_config`] (the worker's own checks, the name
//!   rule, reserved properties and variables), then what needs the controller's libraries:
//!   every librdkafka property is set on a real librdkafka configuration, so a misspelt
//!   name or a refused value is caught before a pod crash-loops on it, and every client
//!   the worker makes is created from its whole configuration as the worker builds it
//!   (`sluice_api::config::clients`), so a combination librdkafka refuses is caught too;
//!   resource quantities are checked against Kubernetes' grammar; the scaling rules of
//!   the schema hold.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::DynamicObject;
use rdkafka::ClientConfig;
use sluice_api::config::{ConfigError, SinkConfig, WorkerConfig};
use sluice_api::crd::{StreamPipeline, REPLICAS};

/// The stored object as a [`StreamPipeline`]; the error names the first field that does
/// not fit and what it should be.
pub fn parse(obj: &DynamicObject) -> Result<StreamPipeline, ConfigError> {
    let mut value = serde_json::to_value(obj).map_err(|e| ConfigError::Parse {
        path: ".".into(),
        message: e.to_string(),
    })?;
    // A list's items may come without apiVersion and kind.
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), "sluice.dev/v1alpha1".into());
        map.insert("kind".into(), "StreamPipeline".into());
    }
    serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Parse {
        path: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

/// Everything the controller checks before it writes a child: the worker configuration to
/// render, or why not.
pub fn validate(sp: &StreamPipeline) -> Result<WorkerConfig, ConfigError> {
    let config = sp.worker_config()?;
    librdkafka(
        "source.consumerProperties",
        &config.source.consumer_properties,
    )?;
    for (i, sink) in config.sinks.iter().enumerate() {
        if let SinkConfig::Kafka(k) = sink {
            librdkafka(
                &format!("sinks[{i}].kafka.producerProperties"),
                &k.producer_properties,
            )?;
        }
    }
    clients(&config)?;
    if let Some(r) = &sp.spec.resources {
        for (what, map) in [("limits", &r.limits), ("requests", &r.requests)] {
            for (name, q) in map.iter().flatten() {
                quantity(&format!("resources.{what}.{name}"), q)?;
            }
        }
    }
    sp.spec.scaling.check()?;
    REPLICAS.check("replicas", sp.spec.replicas)?;
    Ok(config)
}

/// Create every Kafka client the worker makes for `config` from its whole configuration
/// (a placeholder bootstrap server, no security: librdkafka's cross-property checks run
/// when a client is created, never when a property is set), and drop it at once.
fn clients(config: &WorkerConfig) -> Result<(), ConfigError> {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::producer::BaseProducer;
    use sluice_api::config::clients::{all, Kind};
    for (field, kind, props) in all(config, 1) {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", "127.0.0.1:9");
        for (k, v) in props {
            c.set(k, v);
        }
        let created = match kind {
            Kind::Consumer => c.create::<BaseConsumer>().map(drop),
            Kind::Producer => c.create::<BaseProducer>().map(drop),
        };
        if let Err(e) = created {
            return Err(ConfigError::Invalid {
                field,
                message: format!("librdkafka refuses the worker's client configuration: {e}"),
            });
        }
    }
    Ok(())
}
/// Set each property on its own librdkafka configuration, so the error names it.
fn librdkafka(field: &str, props: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (k, v) in props {
        let mut c = ClientConfig::new();
        c.set(k, v);
        if let Err(e) = c.create_native_config() {
            return Err(ConfigError::Invalid {
                field: format!("{field}[{k:?}]"),
                message: format!("librdkafka refuses `{k}: {v}` ({e})"),
            });
        }
    }
    Ok(())
}

/// Kubernetes' quantity grammar: `<signedNumber><suffix>`, suffix a binary SI (Ki ... Ei),
/// a decimal SI (n, u, m, k, M, G, T, P, E) or an exponent (`e3`, `E-2`); never negative
/// for a resource.
fn quantity(field: &str, q: &Quantity) -> Result<(), ConfigError> {
    let s = q.0.as_str();
    let unsigned = s.strip_prefix('+').unwrap_or(s);
    let end = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(end);
    let number_ok = match number.split_once('.') {
        None => !number.is_empty(),
        Some((a, b)) => !(b.contains('.') || (a.is_empty() && b.is_empty())),
    };
    let exponent = |e: &str| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
    };
    let suffix_ok = matches!(
        suffix,
        "" | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
            | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
    ) || suffix.strip_prefix(['e', 'E']).is_some_and(exponent);
    if number_ok && suffix_ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            field: field.into(),
            message: format!(
                "`{s}` is not a Kubernetes quantity (a non-negative number with an optional suffix: 500m, 2, 1.5, 512Mi, 2Gi)"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_follow_the_kubernetes_grammar() {
        // `<digits>.` is a number in the grammar, so `1.` is one.
        for ok in [
            "2", "500m", "1.5", ".5", "1.", "512Mi", "2Gi", "1e3", "1E-2", "+1", "10k",
        ] {
            assert!(quantity("q", &Quantity(ok.into())).is_ok(), "{ok}");
        }
        for bad in [
            "two cores",
            "",
            "-1",
            "1.2.3",
            "5 Mi",
            "1MiB",
            "e3",
            "1e",
            ".",
        ] {
            let e = quantity("resources.limits.cpu", &Quantity(bad.into()))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("resources.limits.cpu") && e.contains("quantity"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn librdkafka_names_the_property_it_does_not_know_or_refuses() {
        let props = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        let e = librdkafka("source.consumerProperties", &props("fetch.max.byts", "1"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(r#"source.consumerProperties["fetch.max.byts"]"#),
            "{e}"
        );
        let e = librdkafka("p", &props("fetch.max.bytes", "lots"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("fetch.max.bytes"), "{e}");
        assert!(librdkafka("p", &props("fetch.max.bytes", "1048576")).is_ok());
        assert!(librdkafka("p", &props("compression.type", "zstd")).is_ok());
    }

    /// N11: combinations librdkafka refuses only when a client is created are refused
    /// before any pod starts, naming the field; what it accepts passes.
    #[test]
    fn combinations_librdkafka_refuses_at_client_creation_are_invalid_specs() {
        let refused = [
            (
                serde_json::json!({
                    "sinks": [{"kafka": {"topic": "out", "producerProperties": {"message.timeout.ms": "300000"}}}],
                    "deadLetter": {"topic": "dlq"},
                    "delivery": {"guarantee": "exactly-once"}
                }),
                "delivery",
            ),
            (
                serde_json::json!({"source": {"bootstrapServers": "kafka:9092", "topic": "in", "groupId": "g",
                    "consumerProperties": {"max.poll.interval.ms": "5000"}}}),
                "source.consumerProperties",
            ),
        ];
        for (extra, field) in refused {
            let e = validate(&pipeline("p", extra.clone()))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(field) && e.contains("librdkafka"),
                "{extra}: {e}"
            );
        }
        let fine = serde_json::json!({
            "sinks": [{"kafka": {"topic": "out", "producerProperties": {"message.timeout.ms": "15000"}}}],
            "deadLetter": {"topic": "dlq"},
            "delivery": {"guarantee": "exactly-once"}
        });
        let ok = validate(&pipeline("p", fine));
        assert!(ok.is_ok(), "{ok:?}");
    }

    /// N11: `statistics.interval.ms` (a liveness rule) and `transaction.timeout.ms` (the
    /// exactly-once window) are the worker's.
    #[test]
    fn the_statistics_interval_and_the_transaction_timeout_are_reserved() {
        let e = validate(&pipeline(
            "p",
            serde_json::json!({"source": {"bootstrapServers": "kafka:9092", "topic": "in", "groupId": "g",
                "consumerProperties": {"statistics.interval.ms": "30000"}}}),
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("statistics.interval.ms"), "{e}");
        let e = validate(&pipeline(
            "p",
            serde_json::json!({"sinks": [{"kafka": {"topic": "out", "producerProperties": {"transaction.timeout.ms": "60000"}}}]}),
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("transaction.timeout.ms"), "{e}");
    }

    fn pipeline(name: &str, extra: serde_json::Value) -> StreamPipeline {
        let mut spec = serde_json::json!({
            "source": {"bootstrapServers": "kafka:9092", "topic": "in", "groupId": "g"},
            "sinks": [{"kafka": {"topic": "out"}}]
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec
        }))
        .unwrap()
    }

    /// The invalid-spec corpus of what the schema cannot see: each case is refused before
    /// any child is written, and the condition names the field and the reason.
    #[test]
    fn the_invalid_spec_corpus_names_the_field_and_the_reason() {
        let consumer = |k: &str, v: &str| serde_json::json!({"source": {"bootstrapServers": "kafka:9092", "topic": "in", "groupId": "g", "consumerProperties": {k: v}}});
        let producer = |k: &str, v: &str| serde_json::json!({"sinks": [{"kafka": {"topic": "out", "producerProperties": {k: v}}}]});
        let long = "n".repeat(70);
        let corpus: Vec<(&str, &str, serde_json::Value, &[&str])> = vec![
            (
                "auto-commit",
                "p",
                consumer("enable.auto.commit", "true"),
                &[
                    r#"source.consumerProperties["enable.auto.commit"]"#,
                    "loss on a crash",
                ],
            ),
            (
                "automatic offset store",
                "p",
                consumer("enable.auto.offset.store", "true"),
                &[r#"["enable.auto.offset.store"]"#, "not yet delivered"],
            ),
            (
                "another group",
                "p",
                consumer("group.id", "other"),
                &[r#"["group.id"]"#, "source.groupId"],
            ),
            (
                "auto.offset.reset",
                "p",
                consumer("auto.offset.reset", "latest"),
                &[r#"["auto.offset.reset"]"#, "source.startFrom"],
            ),
            (
                "session timeout behind the drain check",
                "p",
                consumer("session.timeout.ms", "7000"),
                &[r#"["session.timeout.ms"]"#, "source.sessionTimeout"],
            ),
            (
                "a password in the properties",
                "p",
                consumer("sasl.password", "hunter2"),
                &[r#"["sasl.password"]"#, "passwordSecretRef"],
            ),
            (
                "acks=0",
                "p",
                producer("acks", "0"),
                &[r#"sinks[0].kafka.producerProperties["acks"]"#, "acks=all"],
            ),
            (
                "acks by its alias",
                "p",
                producer("request.required.acks", "1"),
                &[r#"["request.required.acks"]"#, "alias of acks"],
            ),
            (
                "no idempotence",
                "p",
                producer("enable.idempotence", "false"),
                &[r#"["enable.idempotence"]"#, "idempotent"],
            ),
            (
                "error-only delivery reports",
                "p",
                producer("delivery.report.only.error", "true"),
                &[r#"["delivery.report.only.error"]"#, "success reports"],
            ),
            (
                "a transactional producer",
                "p",
                producer("transactional.id", "t"),
                &[
                    r#"["transactional.id"]"#,
                    "delivery.guarantee: exactly-once",
                ],
            ),
            (
                "a misspelt consumer property",
                "p",
                consumer("fetch.max.byts", "1048576"),
                &[
                    r#"source.consumerProperties["fetch.max.byts"]"#,
                    "librdkafka refuses",
                ],
            ),
            (
                "a misspelt producer property",
                "p",
                producer("linger.msec", "5"),
                &[
                    r#"sinks[0].kafka.producerProperties["linger.msec"]"#,
                    "librdkafka refuses",
                ],
            ),
            (
                "a value librdkafka refuses",
                "p",
                consumer("fetch.wait.max.ms", "soon"),
                &[r#"["fetch.wait.max.ms"]"#, "librdkafka refuses"],
            ),
            (
                "dead letters into an output topic",
                "p",
                serde_json::json!({"deadLetter": {"topic": "out"}}),
                &["deadLetter.topic", "also the output topic of sinks[0]"],
            ),
            (
                "the same output twice",
                "p",
                serde_json::json!({"sinks": [{"kafka": {"topic": "out"}}, {"kafka": {"topic": "out"}}]}),
                &["sinks[1].kafka.topic", "already the output of sinks[0]"],
            ),
            (
                "a cpu limit in words",
                "p",
                serde_json::json!({"resources": {"limits": {"cpu": "two cores"}}}),
                &["resources.limits.cpu", "not a Kubernetes quantity"],
            ),
            (
                "a negative memory request",
                "p",
                serde_json::json!({"resources": {"requests": {"memory": "-1Gi"}}}),
                &["resources.requests.memory", "non-negative"],
            ),
            (
                "a dotted name",
                "iot.enrich.v2",
                serde_json::json!({}),
                &["metadata.name", "DNS-1035", "<name>-metrics"],
            ),
            (
                "a 70-character name",
                &long,
                serde_json::json!({}),
                &["metadata.name", "at most 55"],
            ),
            (
                "a log level that is not a filter",
                "p",
                serde_json::json!({"logLevel": "verbose-please"}),
                &["logLevel", "trace, debug, info, warn, error or off"],
            ),
            (
                "a custom processor on the stock image",
                "p",
                serde_json::json!({"processor": {"custom": {"name": "enrich"}}}),
                &["processor.custom", "spec.image"],
            ),
            (
                "SLUICE_CONFIG from a Secret",
                "p",
                serde_json::json!({"secretEnv": [{"name": "SLUICE_CONFIG", "secretKeyRef": {"name": "s", "key": "k"}}]}),
                &["secretEnv[0].name", "set by sluice"],
            ),
            (
                "SLUICE_LOG from a Secret",
                "p",
                serde_json::json!({"secretEnv": [{"name": "SLUICE_LOG", "secretKeyRef": {"name": "s", "key": "k"}}]}),
                &["secretEnv[0].name", "reserved"],
            ),
            (
                "exactly-once with a postgres sink",
                "p",
                serde_json::json!({"sinks": [{"kafka": {"topic": "out"}}, {"postgres": {"table": "t"}}], "deadLetter": {"topic": "dlq"}, "delivery": {"guarantee": "exactly-once"}}),
                &[
                    "sinks[1].postgres",
                    "cannot take part in the Kafka transaction",
                ],
            ),
            (
                "exactly-once with an http sink",
                "p",
                serde_json::json!({"sinks": [{"kafka": {"topic": "out"}}, {"http": {"url": "https://x/y"}}], "deadLetter": {"topic": "dlq"}, "delivery": {"guarantee": "exactly-once"}}),
                &["sinks[1].http", "cannot take part in the Kafka transaction"],
            ),
            (
                "an http header from an undeclared Secret env",
                "p",
                serde_json::json!({"sinks": [{"http": {"url": "https://x/y", "headers": [{"name": "Authorization", "valueEnv": "TOKEN"}]}}]}),
                &["sinks[0].http.headers[0].valueEnv", "spec.secretEnv"],
            ),
            (
                "an http caFile that is not mounted",
                "p",
                serde_json::json!({"sinks": [{"http": {"url": "https://x/y", "caFile": "/etc/sluice/secrets/ingest-ca.pem"}}]}),
                &["sinks[0].http.caFile", "secretFiles"],
            ),
            (
                "registry credentials from an undeclared Secret env",
                "p",
                serde_json::json!({"source": {"bootstrapServers": "k:9092", "topic": "t", "groupId": "g", "format": {"schemaRegistry": {"url": "https://r.example", "credentialsEnv": "SR_CREDS"}}}}),
                &[
                    "source.format.schemaRegistry.credentialsEnv",
                    "spec.secretEnv",
                ],
            ),
            (
                "a registry caFile that is not mounted",
                "p",
                serde_json::json!({"source": {"bootstrapServers": "k:9092", "topic": "t", "groupId": "g", "format": {"schemaRegistry": {"url": "https://r.example", "caFile": "/etc/sluice/secrets/sr-ca.pem"}}}}),
                &["source.format.schemaRegistry.caFile", "secretFiles"],
            ),
            (
                "a sink's registry credentials from an undeclared Secret env",
                "p",
                serde_json::json!({"sinks": [{"kafka": {"topic": "out", "format": {"schemaRegistry": {"url": "https://r.example", "credentialsEnv": "SR_CREDS", "schema": {"avro": "{\"type\": \"string\"}"}}}}}]}),
                &[
                    "sinks[0].kafka.format.schemaRegistry.credentialsEnv",
                    "spec.secretEnv",
                ],
            ),
            (
                "an http URL with credentials",
                "p",
                serde_json::json!({"sinks": [{"http": {"url": "https://u:p@x/y"}}]}),
                &["sinks[0].http.url", "credentials"],
            ),
            (
                "exactly-once with a sink on another cluster",
                "p",
                serde_json::json!({"sinks": [{"kafka": {"topic": "out", "bootstrapServers": "other:9092"}}], "deadLetter": {"topic": "dlq"}, "delivery": {"guarantee": "exactly-once"}}),
                &[
                    "sinks[0].kafka.bootstrapServers",
                    "cannot span two clusters",
                ],
            ),
            (
                "a client certificate without its key",
                "p",
                serde_json::json!({"source": {"bootstrapServers": "kafka:9093", "topic": "in", "groupId": "g", "security": {"protocol": "SSL", "certFile": "/etc/ssl/user.crt"}}}),
                &["source.security.keyFile", "private key"],
            ),
            (
                "a client certificate without TLS",
                "p",
                serde_json::json!({"source": {"bootstrapServers": "kafka:9092", "topic": "in", "groupId": "g", "security": {"certFile": "/etc/ssl/user.crt", "keyFile": "/etc/ssl/user.key"}}}),
                &["source.security.certFile", "only over TLS"],
            ),
            (
                "a client key that no secretFiles entry mounts",
                "p",
                serde_json::json!({"source": {"bootstrapServers": "kafka:9093", "topic": "in", "groupId": "g", "security": {"protocol": "SSL", "certFile": "/etc/ssl/user.crt", "keyFile": "/etc/sluice/secrets/user.key"}}}),
                &[
                    "source.security.keyFile",
                    "is not mounted",
                    "spec.secretFiles",
                ],
            ),
            (
                "a key password without a key",
                "p",
                serde_json::json!({"source": {"bootstrapServers": "kafka:9093", "topic": "in", "groupId": "g", "security": {"protocol": "SSL", "keyPasswordSecretRef": {"name": "u", "key": "p"}}}}),
                &["source.security.keyPasswordEnv", "only with keyFile"],
            ),
            (
                "a client key in the consumer properties",
                "p",
                consumer("ssl.key.pem", "-----BEGIN PRIVATE KEY-----"),
                &[
                    r#"source.consumerProperties["ssl.key.pem"]"#,
                    "source.security.keyFile",
                ],
            ),
            (
                "the key password variable from secretEnv",
                "p",
                serde_json::json!({"secretEnv": [{"name": "SLUICE_SSL_KEY_PASSWORD", "secretKeyRef": {"name": "s", "key": "k"}}]}),
                &["secretEnv[0].name", "reserved"],
            ),
            (
                "a topic and a topic list",
                "p",
                serde_json::json!({"source": {"bootstrapServers": "kafka:9092", "topic": "in", "topics": ["a", "b"], "groupId": "g"}}),
                &["source.topics", "one of topic, topics and topicPattern"],
            ),
            (
                "a topic listed twice",
                "p",
                serde_json::json!({"source": {"bootstrapServers": "kafka:9092", "topics": ["a", "b", "a"], "groupId": "g"}}),
                &["source.topics[2]", "listed twice"],
            ),
            (
                "a pattern with an escape librdkafka does not know",
                "p",
                serde_json::json!({"source": {"bootstrapServers": "kafka:9092", "topicPattern": "iot\\d+", "groupId": "g"}}),
                &["source.topicPattern", "POSIX"],
            ),
            (
                "a pattern that matches the output topic",
                "p",
                serde_json::json!({"source": {"bootstrapServers": "kafka:9092", "topicPattern": "ou.*", "groupId": "g"}}),
                &["sinks[0].kafka.topic", "feed itself"],
            ),
            (
                "OAUTHBEARER without oauth",
                "p",
                serde_json::json!({"source": {"bootstrapServers": "kafka:9093", "topic": "in", "groupId": "g", "security": {"protocol": "SASL_SSL", "saslMechanism": "OAUTHBEARER"}}}),
                &["source.security.oauth", "token endpoint"],
            ),
            (
                "oauth with a SCRAM mechanism",
                "p",
                serde_json::json!({"source": {"bootstrapServers": "kafka:9093", "topic": "in", "groupId": "g", "security": {
                    "protocol": "SASL_SSL", "saslMechanism": "SCRAM-SHA-512", "username": "u", "passwordSecretRef": {"name": "k", "key": "p"},
                    "oauth": {"tokenEndpointUrl": "https://idp/token", "clientId": "c", "clientSecretRef": {"name": "o", "key": "s"}}}}}),
                &[
                    "source.security.oauth",
                    "only with saslMechanism OAUTHBEARER",
                ],
            ),
            (
                "OAUTHBEARER with a user name",
                "p",
                serde_json::json!({"source": {"bootstrapServers": "kafka:9093", "topic": "in", "groupId": "g", "security": {
                    "protocol": "SASL_SSL", "saslMechanism": "OAUTHBEARER", "username": "u",
                    "oauth": {"tokenEndpointUrl": "https://idp/token", "clientId": "c", "clientSecretRef": {"name": "o", "key": "s"}}}}}),
                &["source.security.username", "token's subject"],
            ),
            (
                "a token endpoint that is not a URL",
                "p",
                serde_json::json!({"source": {"bootstrapServers": "kafka:9093", "topic": "in", "groupId": "g", "security": {
                    "protocol": "SASL_SSL", "saslMechanism": "OAUTHBEARER",
                    "oauth": {"tokenEndpointUrl": "idp:8443/token", "clientId": "c", "clientSecretRef": {"name": "o", "key": "s"}}}}}),
                &[
                    "source.security.oauth.tokenEndpointUrl",
                    "not an http(s) URL",
                ],
            ),
            (
                "an OAuth extension value with a comma",
                "p",
                serde_json::json!({"source": {"bootstrapServers": "kafka:9093", "topic": "in", "groupId": "g", "security": {
                    "protocol": "SASL_SSL", "saslMechanism": "OAUTHBEARER",
                    "oauth": {"tokenEndpointUrl": "https://idp/token", "clientId": "c", "clientSecretRef": {"name": "o", "key": "s"},
                        "extensions": {"logicalCluster": "lkc-1,lkc-2"}}}}}),
                &[
                    r#"source.security.oauth.extensions["logicalCluster"]"#,
                    "without `,`",
                ],
            ),
            (
                "a token endpoint CA that no secretFiles entry mounts",
                "p",
                serde_json::json!({"source": {"bootstrapServers": "kafka:9093", "topic": "in", "groupId": "g", "security": {
                    "protocol": "SASL_SSL", "saslMechanism": "OAUTHBEARER",
                    "oauth": {"tokenEndpointUrl": "https://idp/token", "clientId": "c", "clientSecretRef": {"name": "o", "key": "s"},
                        "caFile": "/etc/sluice/secrets/idp-ca.crt"}}}}),
                &["source.security.oauth.caFile", "is not mounted"],
            ),
            (
                "an OAuth client secret in the consumer properties",
                "p",
                consumer("sasl.oauthbearer.client.secret", "hunter2"),
                &[r#"["sasl.oauthbearer.client.secret"]"#, "clientSecretRef"],
            ),
            (
                "another OAUTHBEARER method's key in the consumer properties",
                "p",
                consumer(
                    "sasl.oauthbearer.assertion.private.key.passphrase",
                    "hunter2",
                ),
                &[
                    r#"["sasl.oauthbearer.assertion.private.key.passphrase"]"#,
                    "source.security.oauth",
                ],
            ),
            (
                "the token endpoint's CA in a sink's producer properties",
                "p",
                producer("https.ca.location", "/etc/ssl/idp.pem"),
                &[r#"["https.ca.location"]"#, "source.security"],
            ),
            (
                "the OAuth client secret variable from secretEnv",
                "p",
                serde_json::json!({"secretEnv": [{"name": "SLUICE_OAUTH_CLIENT_SECRET", "secretKeyRef": {"name": "s", "key": "k"}}]}),
                &["secretEnv[0].name", "reserved"],
            ),
            (
                "a template label of sluice's",
                "p",
                serde_json::json!({"template": {"metadata": {"labels": {"sluice.dev/pipeline": "other"}}}}),
                &[
                    r#"template.metadata.labels["sluice.dev/pipeline"]"#,
                    "select the worker pods",
                ],
            ),
            (
                "a template that runs the workers as root",
                "p",
                serde_json::json!({"template": {"securityContext": {"runAsUser": 0}}}),
                &["template.securityContext.runAsUser", "not weaken"],
            ),
            (
                "a template that turns seccomp off",
                "p",
                serde_json::json!({"template": {"securityContext": {"seccompProfile": {"type": "Unconfined"}}}}),
                &["template.securityContext.seccompProfile", "not weaken"],
            ),
            (
                "exactly-once without a dead-letter topic",
                "p",
                serde_json::json!({"delivery": {"guarantee": "exactly-once"}}),
                &["deadLetter", "stalled partition"],
            ),
        ];
        for (what, name, extra, wants) in corpus {
            let e = validate(&pipeline(name, extra))
                .err()
                .unwrap_or_else(|| panic!("{what}: accepted"))
                .to_string();
            for want in wants {
                assert!(e.contains(want), "{what}: {e:?} lacks {want:?}");
            }
        }
        // What is allowed stays allowed.
        let fine = [
            consumer("fetch.max.bytes", "1048576"),
            producer("compression.type", "zstd"),
            serde_json::json!({"logLevel": "debug,librdkafka=warn,sluice_worker::sink=trace"}),
            serde_json::json!({"processor": {"custom": {"name": "enrich"}}, "image": "me/worker:1"}),
            serde_json::json!({"resources": {"limits": {"cpu": "500m", "memory": "1Gi"}}}),
            serde_json::json!({"deadLetter": {"topic": "out", "bootstrapServers": "other:9092"}}),
            serde_json::json!({"deadLetter": {"topic": "dlq"}, "delivery": {"guarantee": "exactly-once", "transactionWindow": "250ms"}}),
            serde_json::json!({"template": {"metadata": {"labels": {"team": "a"}}, "securityContext": {"fsGroup": 2000, "runAsUser": 1000}, "tolerations": [{"key": "dedicated", "operator": "Exists"}]}}),
            serde_json::json!({
                "source": {"bootstrapServers": "kafka:9093", "topic": "in", "groupId": "g", "security": {
                    "protocol": "SSL", "caFile": "/etc/sluice/secrets/ca.crt",
                    "certFile": "/etc/sluice/secrets/user.crt", "keyFile": "/etc/sluice/secrets/user.key",
                    "keyPasswordSecretRef": {"name": "u", "key": "user.password"}}},
                "secretFiles": [
                    {"name": "ca.crt", "secretKeyRef": {"name": "c", "key": "ca.crt"}},
                    {"name": "user.crt", "secretKeyRef": {"name": "u", "key": "user.crt"}},
                    {"name": "user.key", "secretKeyRef": {"name": "u", "key": "user.key"}}]
            }),
            serde_json::json!({"source": {"bootstrapServers": "kafka:9092", "topics": ["orders-eu", "orders-us"], "groupId": "g"}}),
            serde_json::json!({"source": {"bootstrapServers": "kafka:9092", "topicPattern": "orders-[a-z]+", "groupId": "g"}}),
            serde_json::json!({
                "source": {"bootstrapServers": "kafka:9093", "topic": "in", "groupId": "g", "security": {
                    "protocol": "SASL_SSL", "saslMechanism": "OAUTHBEARER",
                    "oauth": {"tokenEndpointUrl": "https://idp.example.com/realms/kafka/protocol/openid-connect/token",
                        "clientId": "orders", "clientSecretRef": {"name": "orders-oauth", "key": "secret"},
                        "scope": "kafka", "extensions": {"logicalCluster": "lkc-1", "identityPoolId": "pool-2"},
                        "caFile": "/etc/sluice/secrets/idp-ca.crt"}}},
                "secretFiles": [{"name": "idp-ca.crt", "secretKeyRef": {"name": "idp", "key": "ca.crt"}}]
            }),
        ];
        for extra in fine {
            validate(&pipeline("p", extra.clone())).unwrap_or_else(|e| panic!("{extra}: {e}"));
        }
    }

    #[test]
    fn scale_to_zero_settings_need_min_replicas_zero_and_an_idle_after_the_poll_can_see() {
        let refused = [
            (
                serde_json::json!({"minReplicas": 1, "idleAfter": "5m"}),
                "only with minReplicas: 0",
            ),
            (
                serde_json::json!({"minReplicas": 2, "activationLag": 10}),
                "only with minReplicas: 0",
            ),
            (
                serde_json::json!({"minReplicas": 0, "idleAfter": "10s", "pollInterval": "30s"}),
                "shorter than pollInterval",
            ),
            // The default idleAfter (5m) against a longer poll.
            (
                serde_json::json!({"minReplicas": 0, "pollInterval": "10m"}),
                "idleAfter (5m) is shorter than pollInterval (10m)",
            ),
        ];
        for (s, want) in refused {
            let e = validate(&pipeline("p", serde_json::json!({"scaling": s.clone()})))
                .err()
                .unwrap_or_else(|| panic!("{s}: accepted"))
                .to_string();
            assert!(
                e.contains("scaling.idleAfter") && e.contains(want),
                "{s}: {e}"
            );
        }
        for s in [
            serde_json::json!({"minReplicas": 0}),
            serde_json::json!({"minReplicas": 0, "idleAfter": "30s", "pollInterval": "30s", "activationLag": 100}),
            serde_json::json!({"minReplicas": 1}),
        ] {
            validate(&pipeline("p", serde_json::json!({"scaling": s.clone()})))
                .unwrap_or_else(|e| panic!("{s}: {e}"));
        }
    }

    #[test]
    fn an_object_stored_through_a_looser_schema_names_its_field() {
        let mut obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {
                "source": {"bootstrapServers": "kafka:9092", "topic": "in", "groupId": "g"},
                "sinks": [{"kafka": {"topic": "out"}}],
                "batching": {"maxBytes": "lots"}
            }
        }))
        .unwrap();
        let e = parse(&obj).unwrap_err().to_string();
        assert!(
            e.contains("spec.batching.maxBytes") && e.contains("lots"),
            "{e}"
        );
        obj.data["spec"]["batching"]["maxBytes"] = serde_json::json!(-5);
        let e = parse(&obj).unwrap_err().to_string();
        assert!(e.contains("spec.batching.maxBytes"), "{e}");
        obj.data["spec"]["batching"]["maxBytes"] = serde_json::json!("1MiB");
        assert!(parse(&obj).is_ok());
        // Without apiVersion and kind (as list items may come), it parses all the same.
        obj.types = None;
        assert!(parse(&obj).is_ok());
    }
}
