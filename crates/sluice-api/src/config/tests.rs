//! The configuration as a whole: parsing, defaults, overrides, refusals, fuzzing.

use super::*;

const MINIMAL: &str = r#"
pipeline: demo
source: {bootstrapServers: "127.0.0.1:9092", topic: in, groupId: g}
sinks: [{kafka: {topic: out}}]
"#;

fn err(yaml: &str) -> String {
    WorkerConfig::from_yaml(yaml).unwrap_err().to_string()
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = WorkerConfig::from_yaml(MINIMAL).unwrap();
    assert_eq!(c.workers.per_partition, 5);
    assert_eq!(c.workers.ordering, Ordering::Key);
    assert_eq!(c.batching.max_bytes.0, 1 << 20);
    assert_eq!(c.batching.linger.0.as_millis(), 5);
    assert_eq!(c.processor, ProcessorConfig::Passthrough {});
    assert_eq!(c.source.start_from, StartFrom::Earliest);
}

#[test]
fn rendered_yaml_round_trips() {
    let c = WorkerConfig::from_yaml(MINIMAL).unwrap();
    assert_eq!(WorkerConfig::from_yaml(&c.to_yaml()).unwrap(), c);
}

#[test]
fn unknown_field_is_named_with_its_path() {
    let e = err(&MINIMAL.replace("groupId: g", "groupId: g, grupId: x"));
    assert!(e.contains("source") && e.contains("grupId"), "{e}");
    assert!(e.contains("expected one of"), "{e}");
}

#[test]
fn unknown_sink_kind_lists_the_allowed_kinds() {
    let e = err(&MINIMAL.replace("kafka: {topic: out}", "s3: {bucket: b}"));
    assert!(
        e.contains("sinks[0]") && e.contains("s3") && e.contains("kafka"),
        "{e}"
    );
}

#[test]
fn out_of_range_values_say_what_is_allowed() {
    let cases = [
        (
            "workers: {perPartition: 0}",
            "workers.perPartition",
            "between 1 and 256",
        ),
        (
            "workers: {queueCapacity: 1}",
            "workers.queueCapacity",
            "between 2",
        ),
        (
            "batching: {maxMessages: 0}",
            "batching.maxMessages",
            "between 1",
        ),
        (
            "batching: {maxBytes: 10}",
            "batching.maxBytes",
            "at least 1KiB",
        ),
        (
            "batching: {linger: 5 parsecs}",
            "batching.linger",
            "not a duration",
        ),
        (
            "batching: {maxBytes: 1QB}",
            "batching.maxBytes",
            "unknown byte unit",
        ),
        (
            "workers: {ordering: random}",
            "workers.ordering",
            "partition",
        ),
        (
            "commit: {drainTimeout: 40s}",
            "commit.drainTimeout",
            "shorter than",
        ),
        ("server: {listen: nowhere}", "server.listen", "ip:port"),
    ];
    for (extra, field, want) in cases {
        let e = err(&format!("{MINIMAL}{extra}\n"));
        assert!(e.contains(field) && e.contains(want), "{extra}: {e}");
    }
}

#[test]
fn sink_that_feeds_its_own_input_is_refused() {
    let e = err(&MINIMAL.replace("topic: out", "topic: in"));
    assert!(e.contains("feed itself"), "{e}");
}

#[test]
fn the_worker_refuses_what_would_void_at_least_once() {
    let cases = [
        (
            MINIMAL.replace(
                "groupId: g",
                "groupId: g, consumerProperties: {enable.auto.commit: 'true'}",
            ),
            r#"source.consumerProperties["enable.auto.commit"]"#,
        ),
        (
            MINIMAL.replace("topic: out", "topic: out, producerProperties: {acks: '0'}"),
            r#"sinks[0].kafka.producerProperties["acks"]"#,
        ),
        (
            format!("{MINIMAL}deadLetter: {{topic: out}}\n"),
            "also the output topic of sinks[0]",
        ),
        (
            MINIMAL.replace(
                "[{kafka: {topic: out}}]",
                "[{kafka: {topic: out}}, {kafka: {topic: out}}]",
            ),
            "already the output of sinks[0]",
        ),
    ];
    for (yaml, want) in cases {
        let e = err(&yaml);
        assert!(e.contains(want), "{e}");
    }
    // The same topic name on another cluster is another topic.
    assert!(WorkerConfig::from_yaml(&MINIMAL.replace(
        "[{kafka: {topic: out}}]",
        "[{kafka: {topic: out}}, {kafka: {topic: out, bootstrapServers: 'other:9092'}}]"
    ))
    .is_ok());
}

#[test]
fn bad_topic_names_are_refused() {
    let e = err(&MINIMAL.replace("topic: in", "topic: \"in put\""));
    assert!(
        e.contains("source.topic") && e.contains("not a Kafka topic name"),
        "{e}"
    );
}

#[test]
fn sasl_needs_a_mechanism_and_user_but_never_a_password_in_the_file() {
    let e = err(&MINIMAL.replace(
        "groupId: g",
        "groupId: g, security: {protocol: SASL_PLAINTEXT}",
    ));
    assert!(e.contains("saslMechanism"), "{e}");
    let e = err(&MINIMAL.replace(
        "groupId: g",
        "groupId: g, security: {protocol: SASL_PLAINTEXT, saslMechanism: PLAIN, username: u, password: p}",
    ));
    assert!(e.contains("unknown field `password`"), "{e}");
}

#[test]
fn env_overrides_reach_nested_fields_and_list_items() {
    let env = vec![
        (
            "SLUICE__SOURCE__BOOTSTRAP_SERVERS".to_string(),
            "10.0.0.1:9092".to_string(),
        ),
        (
            "SLUICE__SINKS__0__KAFKA__TOPIC".to_string(),
            "other".to_string(),
        ),
        (
            "SLUICE__WORKERS__PER_PARTITION".to_string(),
            "3".to_string(),
        ),
        ("UNRELATED".to_string(), "x".to_string()),
    ];
    let c = WorkerConfig::from_yaml_with_env(MINIMAL, env).unwrap();
    assert_eq!(c.source.bootstrap_servers, "10.0.0.1:9092");
    assert_eq!(c.workers.per_partition, 3);
    match &c.sinks[0] {
        SinkConfig::Kafka(k) => assert_eq!(k.topic, "other"),
        s => panic!("{s:?}"),
    }
}

#[test]
fn env_overrides_are_validated_like_the_file() {
    let env = vec![(
        "SLUICE__WORKERS__PER_PARTITION".to_string(),
        "0".to_string(),
    )];
    let e = WorkerConfig::from_yaml_with_env(MINIMAL, env)
        .unwrap_err()
        .to_string();
    assert!(e.contains("workers.perPartition"), "{e}");
    let env = vec![(
        "SLUICE__SINKS__3__KAFKA__TOPIC".to_string(),
        "x".to_string(),
    )];
    let e = WorkerConfig::from_yaml_with_env(MINIMAL, env)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("SLUICE__SINKS__3") && e.contains("out of range"),
        "{e}"
    );
}

/// Cases per fuzzing property: `default`, or `PROPTEST_CASES` for a longer run.
fn fuzz_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// YAML-ish values built from the configuration's own keys and from scalars that
/// look like what its fields take (numbers, durations, sizes, booleans) or do not.
fn yamlish() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let keys = prop::sample::select(vec![
        "pipeline",
        "source",
        "bootstrapServers",
        "topic",
        "groupId",
        "sinks",
        "kafka",
        "postgres",
        "stdout",
        "null",
        "table",
        "columns",
        "name",
        "field",
        "type",
        "onConflict",
        "conflictKey",
        "processor",
        "jq",
        "program",
        "envelope",
        "delay",
        "perRecord",
        "workers",
        "perPartition",
        "queueCapacity",
        "ordering",
        "batching",
        "maxMessages",
        "maxBytes",
        "linger",
        "commit",
        "interval",
        "drainTimeout",
        "memory",
        "inFlightBytes",
        "fetchBuffer",
        "retry",
        "initialBackoff",
        "maxBackoff",
        "maxElapsed",
        "maxAttempts",
        "deadLetter",
        "security",
        "protocol",
        "saslMechanism",
        "passwordEnv",
        "caFile",
        "server",
        "listen",
        "x",
    ]);
    let scalar = prop_oneof![
        "-?[0-9]{1,20}",
        "-?[0-9]{1,5}(\\.[0-9]{1,3})?(us|ms|s|m|h|d|B|KiB|MiB|GiB|KB|MB|GB)?",
        "true|false|null|~|key|partition|unordered|ignore|update|SASL_SSL|PLAIN",
        "'[^']{0,12}'",
        "\\PC{0,10}",
    ];
    scalar.prop_recursive(3, 24, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec((keys.clone(), inner), 0..4).prop_map(|kv| {
                let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k}: {v}")).collect();
                format!("{{{}}}", body.join(", "))
            }),
        ]
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(fuzz_cases(1000)))]
    #[test]
    fn fuzz_config_parser_never_panics_on_arbitrary_text(s in "\\PC{0,200}") {
        let _ = WorkerConfig::from_yaml(&s);
    }

    /// Structured fuzzing: a valid configuration with one top-level section replaced
    /// or added by a random tree of real keys and plausible or wrong scalars. Either
    /// it parses and validates, or the error names where it went wrong.
    #[test]
    fn fuzz_config_sections_parse_or_name_the_field(
        section in proptest::sample::select(vec![
            "source", "sinks", "processor", "workers", "batching", "commit", "memory",
            "retry", "deadLetter", "server", "unknownSection",
        ]),
        value in yamlish(),
    ) {
        let base: Vec<&str> = MINIMAL
            .lines()
            .filter(|l| !l.starts_with(&format!("{section}:")))
            .collect();
        let text = format!("{}\n{section}: {value}\n", base.join("\n"));
        if let Err(e) = WorkerConfig::from_yaml(&text) {
            // `.` for YAML syntax (with line and column), else the field's path
            let e = e.to_string();
            proptest::prop_assert!(e.starts_with("invalid configuration at `"), "{e}\n{text}");
        }
    }
}

#[test]
fn a_jq_program_that_does_not_compile_is_refused_with_its_position() {
    let e = err(&format!(
        "{MINIMAL}processor: {{jq: {{program: '.a | foo'}}}}\n"
    ));
    assert!(
        e.contains("processor.jq.program")
            && e.contains("undefined filter `foo`")
            && e.contains("line 1, column 6"),
        "{e}"
    );
    assert!(WorkerConfig::from_yaml(&format!(
        "{MINIMAL}processor: {{jq: {{program: '.a | ascii_downcase'}}}}\n"
    ))
    .is_ok());
}

#[test]
fn a_pipeline_reads_one_topic_a_list_or_a_pattern_and_exactly_one_of_them() {
    let with = |topics: &str| MINIMAL.replace("topic: in", topics);
    let c = WorkerConfig::from_yaml(&with("topics: [in-a, in-b]")).unwrap();
    let s = c.source.subscription().unwrap();
    assert_eq!(s.librdkafka(), ["in-a", "in-b"]);
    assert!(s.reads("in-b") && !s.reads("in"));
    let c = WorkerConfig::from_yaml(&with(r#"topicPattern: "iot-[a-z]+\\.events""#)).unwrap();
    let s = c.source.subscription().unwrap();
    assert_eq!(s.librdkafka(), [r"^(iot-[a-z]+\.events)$"]);
    assert!(s.reads("iot-eu.events"));
    // The whole name: neither a prefix nor a suffix match.
    assert!(!s.reads("iot-eu.events-old") && !s.reads("old-iot-eu.events"));
    assert_eq!(s.to_string(), r"/iot-[a-z]+\.events/");
    for (topics, field, why) in [
        (
            "topic: in, topics: [a]",
            "source.topics",
            "one of topic, topics and topicPattern",
        ),
        (
            "topics: [a], topicPattern: b",
            "source.topics",
            "one of topic, topics and topicPattern",
        ),
        ("groupId: g0", "source.topic", "required"),
        ("topics: [a, b, a]", "source.topics[2]", "listed twice"),
        (
            "topics: [a, 'b c']",
            "source.topics[1]",
            "not a Kafka topic name",
        ),
        (
            "topicPattern: '^in.*'",
            "source.topicPattern",
            "leave out `^` and `$`",
        ),
        (r"topicPattern: 'in\d+'", "source.topicPattern", "POSIX"),
        ("topicPattern: '(?i)in'", "source.topicPattern", "POSIX"),
        (
            "topicPattern: 'in[0-9'",
            "source.topicPattern",
            "not a regular expression",
        ),
        // What glibc's regcomp and Rust's regex would read differently, or one of them not.
        (r"topicPattern: '\Aorders'", "source.topicPattern", "anchor"),
        (
            r"topicPattern: 'orders\x2dall'",
            "source.topicPattern",
            "POSIX",
        ),
        (
            "topicPattern: '[[:word:]]+'",
            "source.topicPattern",
            "class name",
        ),
        (r"topicPattern: '[a\.]+'", "source.topicPattern", "POSIX"),
        (
            "topicPattern: '[a[bc]]'",
            "source.topicPattern",
            "class inside a class",
        ),
        ("topicPattern: 'a+?'", "source.topicPattern", "lazy"),
        (
            "topicPattern: 'a|'",
            "source.topicPattern",
            "empty alternative",
        ),
        // Unbalanced: `^(a)|(b)$` would match any name starting with a or ending with b.
        (
            "topicPattern: 'a)|(b'",
            "source.topicPattern",
            "not a regular expression",
        ),
        ("topicPattern: ''", "source.topicPattern", "1 to 249"),
    ] {
        let e = err(&with(topics));
        assert!(e.contains(field) && e.contains(why), "{topics}: {e}");
    }
    let many: Vec<String> = (0..101).map(|i| format!("t{i}")).collect();
    let e = err(&with(&format!("topics: [{}]", many.join(", "))));
    assert!(e.contains("at most 100"), "{e}");
    for fine in [
        r"orders-[a-z]+\.events",
        "orders|payments",
        "iot-(eu|us)-[[:digit:]]{1,3}",
        "[^.]+-raw",
    ] {
        WorkerConfig::from_yaml(&with(&format!("topicPattern: '{fine}'")))
            .unwrap_or_else(|e| panic!("{fine}: {e}"));
    }
    // An output a pattern would read back is the input.
    let e = err(&with("topicPattern: 'o.*'"));
    assert!(
        e.contains("sinks[0].kafka.topic") && e.contains("feed itself"),
        "{e}"
    );
}

#[test]
fn an_http_sink_takes_its_defaults_and_refuses_what_it_cannot_send() {
    let with =
        |http: &str| MINIMAL.replace("[{kafka: {topic: out}}]", &format!("[{{http: {http}}}]"));
    let c = WorkerConfig::from_yaml(&with("{url: 'https://ingest.example.com/v1/e'}")).unwrap();
    let SinkConfig::Http(h) = &c.sinks[0] else {
        panic!("{:?}", c.sinks)
    };
    assert_eq!(h.method, HttpMethod::Post);
    assert_eq!(h.batch.as_, HttpBatchAs::Array);
    assert_eq!(h.timeout.get(), std::time::Duration::from_secs(10));
    assert_eq!(h.idempotency_header, "Idempotency-Key");
    assert_eq!(h.max_in_flight, 4);
    assert_eq!(c.sinks[0].kind(), "http");
    let c = WorkerConfig::from_yaml(&with(
        "{url: 'http://svc.ns:8080/x', method: PATCH, batch: {as: onePerRequest}, headers: [{name: X-Api-Key, valueEnv: KEY}], idempotencyHeader: ''}",
    ))
    .unwrap();
    let SinkConfig::Http(h) = &c.sinks[0] else {
        panic!()
    };
    assert_eq!(
        (h.method, h.batch.as_),
        (HttpMethod::Patch, HttpBatchAs::OnePerRequest)
    );
    let cases = [
        (
            "{url: 'ftp://x/y'}",
            "sinks[0].http.url",
            "not an http(s) URL",
        ),
        (
            "{url: 'https://'}",
            "sinks[0].http.url",
            "not an http(s) URL",
        ),
        (
            "{url: 'https://user:pw@x/y'}",
            "sinks[0].http.url",
            "credentials",
        ),
        (
            "{url: 'http://x/y', caFile: /ca.pem}",
            "sinks[0].http.caFile",
            "https",
        ),
        (
            "{url: 'https://x/y', timeout: 0s}",
            "sinks[0].http.timeout",
            "more than 0",
        ),
        (
            "{url: 'https://x/y', maxInFlight: 0}",
            "sinks[0].http.maxInFlight",
            "between 1 and 64",
        ),
        ("{url: 'https://x/y', method: GET}", "sinks[0]", "POST"),
        (
            "{url: 'https://x/y', batch: {as: csv}}",
            "sinks[0]",
            "onePerRequest",
        ),
        (
            "{url: 'https://x/y', headers: [{name: 'X A', value: v}]}",
            "sinks[0].http.headers[0].name",
            "not an HTTP header name",
        ),
        (
            "{url: 'https://x/y', headers: [{name: Host, value: v}]}",
            "sinks[0].http.headers[0].name",
            "HTTP client itself",
        ),
        (
            "{url: 'https://x/y', headers: [{name: Idempotency-Key, value: v}]}",
            "sinks[0].http.headers[0].name",
            "idempotencyHeader",
        ),
        (
            "{url: 'https://x/y', headers: [{name: A, value: v}, {name: a, value: w}]}",
            "sinks[0].http.headers[1].name",
            "twice",
        ),
        (
            "{url: 'https://x/y', headers: [{name: A}]}",
            "sinks[0].http.headers[0]",
            "exactly one of value and valueEnv",
        ),
        (
            "{url: 'https://x/y', headers: [{name: A, value: v, valueEnv: E}]}",
            "sinks[0].http.headers[0]",
            "exactly one of value and valueEnv",
        ),
        (
            "{url: 'https://x/y', headers: [{name: A, value: \"a\\nb\"}]}",
            "sinks[0].http.headers[0].value",
            "line breaks",
        ),
        (
            "{url: 'https://x/y', idempotencyHeader: 'a b'}",
            "sinks[0].http.idempotencyHeader",
            "not an HTTP header name",
        ),
    ];
    for (http, field, want) in cases {
        let e = err(&with(http));
        assert!(e.contains(field) && e.contains(want), "{http}: {e}");
    }
}

#[test]
fn a_schema_registry_format_is_checked_where_it_is_written() {
    let with = |f: &str| {
        MINIMAL.replace(
            "groupId: g}",
            &format!("groupId: g, format: {{schemaRegistry: {f}}}}}"),
        )
    };
    let c = WorkerConfig::from_yaml(&with(
        "{url: 'http://127.0.0.1:8081', credentialsEnv: SR_CREDS}",
    ))
    .unwrap();
    let f = c.source.format.as_ref().unwrap();
    assert_eq!(
        f.schema_registry.credentials_env.as_deref(),
        Some("SR_CREDS")
    );
    for (f, field, want) in [
        (
            "{url: 'registry:8081'}",
            "source.format.schemaRegistry.url",
            "not an http(s) URL",
        ),
        (
            "{url: 'https://u:p@r/'}",
            "source.format.schemaRegistry.url",
            "credentials",
        ),
        (
            "{url: 'http://r:8081', caFile: /ca.pem}",
            "source.format.schemaRegistry.caFile",
            "https",
        ),
        (
            "{url: 'http://r:8081', credentialsEnv: ''}",
            "source.format.schemaRegistry.credentialsEnv",
            "empty",
        ),
        ("{url: 'http://r:8081', subjects: x}", "source", "subjects"),
    ] {
        let e = err(&with(f));
        assert!(e.contains(field) && e.contains(want), "{f}: {e}");
    }
}

#[test]
fn a_kafka_sinks_schema_is_checked_where_it_is_written() {
    let with = |f: &str| {
        MINIMAL.replace(
            "{kafka: {topic: out}}",
            &format!("{{kafka: {{topic: out, format: {{schemaRegistry: {f}}}}}}}"),
        )
    };
    let c = WorkerConfig::from_yaml(&with(
        "{url: 'http://r:8081', schema: {avro: '{\"type\": \"string\"}'}}",
    ))
    .unwrap();
    let SinkConfig::Kafka(k) = &c.sinks[0] else {
        panic!()
    };
    let f = &k.format.as_ref().unwrap().schema_registry;
    assert_eq!(f.subject_strategy, SubjectStrategy::Topic);
    assert!(f.auto_register);
    let at = "sinks[0].kafka.format.schemaRegistry";
    for (f, field, want) in [
        (
            "{url: 'r:8081', schema: {avro: '{}'}}",
            format!("{at}.url"),
            "not an http(s) URL",
        ),
        (
            "{url: 'http://r', schema: {avro: 'record Reading'}}",
            format!("{at}.schema.avro"),
            "JSON",
        ),
        (
            "{url: 'http://r', schema: {protobuf: {proto: ''}}}",
            format!("{at}.schema.protobuf.proto"),
            "empty",
        ),
        (
            "{url: 'http://r', schema: {avro: '{}'}, subjectStrategy: name}",
            "sinks[0]".into(),
            "topicRecord",
        ),
        ("{url: 'http://r'}", "sinks[0]".into(), "schema"),
    ] {
        let e = err(&with(f));
        assert!(e.contains(&field) && e.contains(want), "{f}: {e}");
    }
}
