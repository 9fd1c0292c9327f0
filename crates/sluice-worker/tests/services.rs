//! Formats and services against real ones: the http sink against a real HTTP server on
//! loopback (`sluice_testkit::http_receiver`) and the real broker: every record delivered
//! with its headers and idempotency key; an endpoint that fails, slows down past the
//! timeout, answers 429 with `Retry-After` and refuses some records; per-partition order
//! with one output per request. Schema-registry records written by Confluent's own
//! serializers (Python `confluent-kafka`, Avro and Protobuf) and registered in a real
//! registry (Apicurio, `scripts/registry.sh`) decoded into JSON; bad ones dead-lettered by
//! class; an unreachable registry holding records, never failing them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sluice_testkit::http_receiver::{Answer, HttpReceiver, Received};
use sluice_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_sluice-worker");

struct Pipeline {
    input: String,
    group: String,
    worker: WorkerProcess,
}

/// A worker reading `input` (passthrough unless `extra` says otherwise) into `sink` (one
/// YAML list item), with `env` set; `extra`'s lines indented by two spaces go in `source`.
fn start(name: &str, input: &str, sink: &str, extra: &str, env: &[(&str, &str)]) -> Pipeline {
    let addr = format!("127.0.0.1:{}", free_port());
    // Lines of `extra` indented by two spaces belong to `source`.
    let (source_extra, extra): (Vec<&str>, Vec<&str>) =
        extra.lines().partition(|l| l.starts_with("  "));
    let (source_extra, extra) = (source_extra.join("\n"), extra.join("\n"));
    let group = unique(&format!("{name}-g"));
    let cfg = format!(
        r#"pipeline: {name}
source:
  bootstrapServers: "{b}"
  topic: {input}
  groupId: {group}
  sessionTimeout: 10s
{source_extra}
sinks:
  - {sink}
commit: {{interval: 500ms, drainTimeout: 8s}}
server: {{listen: "{addr}"}}
{extra}
"#,
        b = bootstrap()
    );
    let worker = WorkerProcess::start_with_env(BIN, &unique(name), &cfg, &addr, env);
    wait_for(
        "the worker's metrics endpoint",
        Duration::from_secs(30),
        || !worker.metrics().is_empty(),
    );
    Pipeline {
        input: input.to_string(),
        group,
        worker,
    }
}

impl Pipeline {
    fn wait_committed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = uncommitted(&bootstrap(), &self.group, &self.input);
            if left == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{left} records still uncommitted after {timeout:?}\n{}",
                self.worker.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn stop(mut self) {
        self.worker.signal("TERM");
        let st = self.worker.wait(Duration::from_secs(30)).expect("exit");
        assert!(st.success(), "{st:?}\n{}", self.worker.log_tail(30));
    }
}

fn seq_values(n: u64, poison: impl Fn(u64) -> bool) -> impl Iterator<Item = TestRecord> {
    (0..n).map(move |i| TestRecord {
        tombstone: false,
        partition: None,
        key: Some(key(i)),
        value: format!(r#"{{"seq":{i},"poison":{}}}"#, poison(i)).into_bytes(),
    })
}

/// The `seq` of each JSON value in a body of `batch.as` array or lines.
fn seqs(r: &Received) -> Vec<u64> {
    let text = r.text();
    let values: Vec<serde_json::Value> = if text.starts_with('[') {
        serde_json::from_str(&text).unwrap()
    } else {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    values.iter().map(|v| v["seq"].as_u64().unwrap()).collect()
}

/// `topic/partition/first-last` ranges of a batch's idempotency key.
fn ranges(key: &str) -> Vec<(String, i32, i64, i64)> {
    key.split(',')
        .map(|part| {
            let mut it = part.rsplitn(3, '/');
            let offsets = it.next().unwrap();
            let partition = it.next().unwrap().parse().unwrap();
            let topic = it.next().unwrap().to_string();
            let (lo, hi) = match offsets.split_once('-') {
                Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                None => (offsets.parse().unwrap(), offsets.parse().unwrap()),
            };
            (topic, partition, lo, hi)
        })
        .collect()
}

#[test]
fn every_record_is_posted_once_as_json_arrays_with_secret_headers_and_idempotency_keys() {
    let input = unique("http-in");
    create_topic_now(&input, 2);
    let n: u64 = 4_000;
    produce_records(&input, seq_values(n, |_| false));
    let rx = HttpReceiver::start(|r| {
        if r.header("authorization") == Some("Bearer s3cret") {
            Answer::ok()
        } else {
            Answer::status(401).body("who are you?")
        }
    });
    let p = start(
        "http-array",
        &input,
        &format!(
            "http: {{url: \"{}\", headers: [{{name: Authorization, valueEnv: INGEST_TOKEN}}, {{name: X-Source, value: sluice}}]}}",
            rx.url("/v1/events?src=test")
        ),
        "processor: {jq: {program: '{seq, doubled: (.seq * 2)}'}}\nbatching: {maxMessages: 300, linger: 20ms}",
        &[("INGEST_TOKEN", "Bearer s3cret")],
    );
    p.wait_committed(Duration::from_secs(120));
    let failed = p.worker.metric("sluice_dead_letters_total", "");
    p.stop();
    assert_eq!(failed, 0.0, "nothing was dead-lettered");
    let log = rx.log();
    assert!(
        log.iter().all(|r| r.status == 200),
        "every request authorized"
    );
    let mut got = BTreeMap::new();
    for r in &log {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/v1/events?src=test");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-source"), Some("sluice"));
        assert!(r.header("user-agent").unwrap().starts_with("sluice/"));
        let values: Vec<serde_json::Value> = serde_json::from_slice(&r.body).unwrap();
        assert!(values.len() <= 300, "batching.maxMessages holds");
        for v in &values {
            let s = v["seq"].as_u64().unwrap();
            assert_eq!(
                v["doubled"].as_u64(),
                Some(2 * s),
                "the processor's output is posted"
            );
            *got.entry(s).or_insert(0) += 1;
        }
        // The key names the source partitions and offsets the body came from.
        let key = r.header("idempotency-key").expect("an idempotency key");
        let rs = ranges(key);
        assert!(
            rs.iter()
                .all(|(t, p, lo, hi)| t == &input && (0..2).contains(p) && lo <= hi),
            "{key}"
        );
        let span: i64 = rs.iter().map(|(_, _, lo, hi)| hi - lo + 1).sum();
        assert!(
            span >= values.len() as i64,
            "{key} covers {} outputs",
            values.len()
        );
    }
    assert_eq!(got.len() as u64, n, "every record posted");
    assert!(got.values().all(|&c| c == 1), "no record posted twice");
    assert!(
        log.len() < n as usize / 10,
        "batched: {} requests for {n} records",
        log.len()
    );
}

#[test]
fn failures_slowdowns_and_429s_are_ridden_out_and_only_refused_records_are_dead_lettered() {
    let input = unique("http-fault-in");
    let dlq = unique("http-fault-dlq");
    create_topic_now(&input, 1);
    create_topic_now(&dlq, 1);
    let n: u64 = 2_000;
    let poison = |i: u64| i % 250 == 7;
    produce_records(&input, seq_values(n, poison));
    let slowed = std::sync::atomic::AtomicBool::new(false);
    let rx = HttpReceiver::start(move |r| match r.n {
        0..=2 => Answer::status(503).body("warming up"),
        3 => Answer::status(429).header("Retry-After", "1"),
        _ if r.text().contains(r#""poison":true"#) => {
            Answer::status(400).body(r#"{"error": "poison record refused"}"#)
        }
        // Once, slower than the sink's timeout: the sink gives up on it and sends it
        // again, and this answer (200 all the same) makes a duplicate by key.
        n if n >= 5 && !slowed.swap(true, std::sync::atomic::Ordering::SeqCst) => {
            Answer::ok().after(Duration::from_millis(3_000))
        }
        n if n % 7 == 0 => Answer::ok().after(Duration::from_millis(200)),
        _ => Answer::ok(),
    });
    let p = start(
        "http-fault",
        &input,
        &format!(
            "http: {{url: \"{}\", batch: {{as: lines}}, timeout: 1s}}",
            rx.url("/ingest")
        ),
        &format!(
            "batching: {{maxMessages: 100, linger: 20ms}}\ndeadLetter: {{topic: {dlq}}}\nretry: {{initialBackoff: 50ms, maxBackoff: 500ms}}"
        ),
        &[],
    );
    p.wait_committed(Duration::from_secs(180));
    let retries = p
        .worker
        .metric("sluice_sink_retries_total", "sink=\"http\"");
    p.stop();
    assert!(
        retries > 0.0,
        "the 503s, the 429 and the timeout were retried"
    );
    let log = rx.log();
    assert_eq!(log[0].header("content-type"), Some("application/x-ndjson"));
    // Retry-After: the request after the 429 came no sooner than a second later.
    let after_429 = log
        .iter()
        .find(|r| r.n == 4)
        .expect("a request after the 429");
    let answered_429 = log.iter().find(|r| r.n == 3).unwrap().answered;
    assert!(
        after_429.at.duration_since(answered_429) >= Duration::from_millis(950),
        "Retry-After honoured: {:?}",
        after_429.at.duration_since(answered_429)
    );
    // Delivered, deduplicated by idempotency key as a receiver would: every good record once.
    let mut seen_keys = BTreeSet::new();
    let mut got: BTreeMap<u64, u32> = BTreeMap::new();
    for r in log.iter().filter(|r| r.status == 200) {
        let key = r.header("idempotency-key").unwrap().to_string();
        if !seen_keys.insert(key) {
            continue;
        }
        for s in seqs(r) {
            *got.entry(s).or_insert(0) += 1;
        }
    }
    let want: BTreeSet<u64> = (0..n).filter(|&i| !poison(i)).collect();
    assert_eq!(
        got.keys().copied().collect::<BTreeSet<_>>(),
        want,
        "every good record delivered, no poison one"
    );
    assert!(
        got.values().all(|&c| c == 1),
        "once each, by idempotency key"
    );
    let letters = read_all(&dlq, Duration::from_secs(30));
    let mut parked: Vec<u64> = letters
        .iter()
        .map(|l| {
            assert_eq!(l.header("sluice.error.class"), Some("http_rejected"));
            assert_eq!(l.header("sluice.error.stage"), Some("http"));
            let m = l.header("sluice.error.message").unwrap();
            assert!(
                m.contains("HTTP 400") && m.contains("poison record refused"),
                "{m}"
            );
            let v: serde_json::Value = serde_json::from_slice(l.value.as_ref().unwrap()).unwrap();
            v["seq"].as_u64().unwrap()
        })
        .collect();
    parked.sort();
    assert_eq!(parked, (0..n).filter(|&i| poison(i)).collect::<Vec<_>>());
}

#[test]
fn one_output_per_request_keeps_each_partitions_order_with_one_request_in_flight_per_partition() {
    let input = unique("http-order-in");
    create_topic_now(&input, 3);
    let n: u64 = 600;
    produce_records(&input, seq_values(n, |_| false));
    let rx = HttpReceiver::start(|r| match r.n {
        40 => Answer::status(500).body("oops"),
        n => Answer::ok().after(Duration::from_millis(n % 4)),
    });
    let p = start(
        "http-order",
        &input,
        &format!(
            "http: {{url: \"{}\", method: PUT, batch: {{as: onePerRequest}}, maxInFlight: 4, idempotencyHeader: X-Source-Record}}",
            rx.url("/one")
        ),
        "workers: {perPartition: 4, ordering: partition}\nbatching: {maxMessages: 50, linger: 5ms}\nretry: {initialBackoff: 50ms}",
        &[],
    );
    p.wait_committed(Duration::from_secs(120));
    p.stop();
    let log = rx.log();
    assert!(
        rx.max_in_flight() <= 4,
        "maxInFlight: {}",
        rx.max_in_flight()
    );
    // (partition, offset, came, answered, status) of each request, from its key.
    let mut by_partition: BTreeMap<i32, Vec<(i64, Instant, Instant, u16)>> = BTreeMap::new();
    for r in &log {
        assert_eq!(r.method, "PUT");
        let key = r.header("x-source-record").expect("the idempotency header");
        let (topic, partition, lo, hi) = ranges(key).remove(0);
        assert_eq!(
            (topic.as_str(), lo),
            (input.as_str(), hi),
            "one record: {key}"
        );
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert!(v["seq"].is_u64(), "the body is the value as it is");
        by_partition
            .entry(partition)
            .or_default()
            .push((lo, r.at, r.answered, r.status));
    }
    let mut delivered = 0;
    for (partition, mut reqs) in by_partition {
        reqs.sort_by_key(|r| r.1);
        for w in reqs.windows(2) {
            assert!(
                w[1].1 >= w[0].2,
                "partition {partition}: a request began before the one before it was answered"
            );
            let (a, b) = (w[0], w[1]);
            if a.3 == 200 {
                assert!(
                    b.0 > a.0,
                    "partition {partition}: offset {} after {}",
                    b.0,
                    a.0
                );
            } else {
                assert_eq!(
                    b.0, a.0,
                    "partition {partition}: a failed request is sent again first"
                );
            }
        }
        delivered += reqs.iter().filter(|r| r.3 == 200).count();
    }
    assert_eq!(delivered as u64, n, "every record delivered once");
}

/// What the registry client writes for record `i` (in both formats).
fn reading(i: u64) -> serde_json::Value {
    serde_json::json!({"id": i, "name": format!("sensor-{i}"), "temp": 20.0 + i as f64 / 4.0})
}

/// Write `n` Avro and `n` Protobuf records with Confluent's serializers into `topic`.
fn produce_registry_records(topic: &str, n: u64) {
    let out = registry_client(&[
        "produce",
        "--bootstrap",
        &bootstrap(),
        "--registry",
        &registry_url(),
        "--topic",
        topic,
        "-n",
        &n.to_string(),
    ]);
    assert_eq!(out.lines().count(), 2, "{out}");
}

#[test]
fn avro_and_protobuf_records_from_confluents_serializers_are_decoded_and_bad_ones_dead_lettered() {
    let input = unique("sr-in");
    let dlq = unique("sr-dlq");
    let n = 200;
    produce_registry_records(&input, n);
    create_topic_now(&dlq, 1);
    // Three that cannot be decoded: an id the registry does not have, a value that is no
    // wire format, and a known id with a payload that does not fit its schema.
    let avro_id = {
        let r = read_all(&input, Duration::from_secs(30));
        assert_eq!(r.len() as u64, 2 * n);
        u32::from_be_bytes(r[0].value.as_ref().unwrap()[1..5].try_into().unwrap())
    };
    let mut bad_id = vec![0u8, 0x7f, 0xff, 0xff, 0x01];
    bad_id.extend_from_slice(b"whatever");
    let mut truncated = vec![0u8];
    truncated.extend_from_slice(&avro_id.to_be_bytes());
    truncated.extend_from_slice(&[0x02, 0x20, b's']);
    produce_records(
        &input,
        [bad_id, br#"{"plain":"json"}"#.to_vec(), truncated]
            .into_iter()
            .map(|value| TestRecord {
                tombstone: false,
                partition: None,
                key: None,
                value,
            }),
    );
    let rx = HttpReceiver::start(|_| Answer::ok());
    let p = start(
        "sr-decode",
        &input,
        &format!("http: {{url: \"{}\", batch: {{as: lines}}}}", rx.url("/readings")),
        &format!(
            "  format: {{schemaRegistry: {{url: \"{}\"}}}}\nprocessor: {{jq: {{program: '{{id, name, temp}}'}}}}\ndeadLetter: {{topic: {dlq}}}",
            registry_url()
        ),
        &[],
    );
    p.wait_committed(Duration::from_secs(120));
    p.stop();
    let mut got: Vec<serde_json::Value> = rx
        .log()
        .iter()
        .flat_map(|r| {
            r.text()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    got.sort_by_key(|v| v["id"].as_u64());
    let want: Vec<serde_json::Value> = (0..n).flat_map(|i| [reading(i), reading(i)]).collect();
    assert_eq!(got, want, "every Avro and Protobuf record, field for field");
    let letters = read_all(&dlq, Duration::from_secs(30));
    let mut classes: Vec<&str> = letters
        .iter()
        .map(|l| {
            assert_eq!(l.header("sluice.error.stage"), Some("decode"));
            l.header("sluice.error.class").unwrap()
        })
        .collect();
    classes.sort();
    assert_eq!(
        classes,
        ["not_wire_format", "schema_decode", "schema_unknown"],
        "{letters:?}"
    );
}

#[test]
fn an_unreachable_registry_holds_records_until_it_answers_and_fails_none() {
    let input = unique("sr-hold-in");
    let dlq = unique("sr-hold-dlq");
    create_topic_now(&dlq, 1);
    let n = 50;
    produce_registry_records(&input, n);
    // The worker reaches the registry through a proxy that is cut before it starts.
    let target = registry_url();
    let authority = target
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let path = &target[target.find(&authority).unwrap() + authority.len()..];
    let proxy = TcpProxy::start(&authority);
    proxy.cut();
    let rx = HttpReceiver::start(|_| Answer::ok());
    let p = start(
        "sr-hold",
        &input,
        &format!("http: {{url: \"{}\"}}", rx.url("/r")),
        &format!(
            "  format: {{schemaRegistry: {{url: \"http://{}{path}\"}}}}\ndeadLetter: {{topic: {dlq}}}",
            proxy.addr
        ),
        &[],
    );
    // Held: nothing delivered, nothing dead-lettered, nothing committed, the worker live.
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        rx.log().is_empty(),
        "nothing delivered while the registry is unreachable"
    );
    assert_eq!(uncommitted(&bootstrap(), &p.group, &p.input), 2 * n as i64);
    assert_eq!(
        http_status(&p.worker.metrics_addr, "/healthz"),
        Some(200),
        "live while holding"
    );
    assert!(
        p.worker
            .log_tail(200)
            .contains("schema registry unreachable"),
        "the hold is logged"
    );
    proxy.restore();
    p.wait_committed(Duration::from_secs(60));
    let delivered: usize = rx
        .log()
        .iter()
        .map(|r| {
            serde_json::from_slice::<Vec<serde_json::Value>>(&r.body)
                .unwrap()
                .len()
        })
        .sum();
    p.stop();
    assert_eq!(delivered as u64, 2 * n);
    assert!(
        read_all(&dlq, Duration::from_secs(5)).is_empty(),
        "no record failed for it"
    );
}

#[test]
fn outputs_encoded_in_avro_and_protobuf_are_read_back_by_confluents_deserializers() {
    let input = unique("sr-rt-in");
    let avro_out = unique("sr-rt-avro");
    let proto_out = unique("sr-rt-pb");
    let dlq = unique("sr-rt-dlq");
    for t in [&avro_out, &proto_out, &dlq] {
        create_topic_now(t, 1);
    }
    let n = 100;
    produce_registry_records(&input, n);
    let avro_schema = r#"{"type":"record","name":"Reading","namespace":"sluice.test","fields":[{"name":"id","type":"long"},{"name":"name","type":"string"},{"name":"temp","type":"double"}]}"#;
    let proto = "syntax = \"proto3\";\npackage sluice.regprobe.pb;\nmessage Envelope { string source = 1; }\nmessage Reading { int64 id = 1; string name = 2; double temp = 3; }\n";
    let registry = registry_url();
    // Record 7 is made not to fit either schema (a string where a double goes).
    let p = start(
        "sr-roundtrip",
        &input,
        &format!(
            "kafka: {{topic: {avro_out}, format: {{schemaRegistry: {{url: \"{registry}\", schema: {{avro: '{avro_schema}'}}}}}}}}\n  - kafka: {{topic: {proto_out}, format: {{schemaRegistry: {{url: \"{registry}\", subjectStrategy: record, schema: {{protobuf: {{proto: {proto:?}, message: sluice.regprobe.pb.Reading}}}}}}}}}}"
        ),
        &format!(
            "  format: {{schemaRegistry: {{url: \"{registry}\"}}}}\nprocessor: {{jq: {{program: 'if .id == 7 then .temp = \"hot\" else . end'}}}}\ndeadLetter: {{topic: {dlq}}}"
        ),
        &[],
    );
    p.wait_committed(Duration::from_secs(120));
    p.stop();
    let good = (2 * n - 2).to_string();
    for topic in [&avro_out, &proto_out] {
        let out = registry_client(&[
            "consume",
            "--bootstrap",
            &bootstrap(),
            "--registry",
            &registry,
            "--topic",
            topic,
            "-n",
            &good,
            "--verify",
        ]);
        assert_eq!(
            out.lines().count().to_string(),
            good,
            "{topic}: every good record, field for field"
        );
    }
    let letters = read_all(&dlq, Duration::from_secs(30));
    assert_eq!(
        letters.len(),
        4,
        "record 7 in both formats, refused by both sinks"
    );
    for l in &letters {
        assert_eq!(l.header("sluice.error.class"), Some("schema_mismatch"));
        let v: serde_json::Value = serde_json::from_slice(l.value.as_ref().unwrap()).unwrap();
        assert_eq!(v["id"], 7, "the output that did not fit, as JSON");
    }
}

#[test]
fn each_output_of_a_record_has_its_own_idempotency_key_however_it_is_batched() {
    let input = unique("http-keys-in");
    create_topic_now(&input, 1);
    let n: u64 = 200;
    produce_records(&input, seq_values(n, |_| false));
    let rx = HttpReceiver::start(|_| Answer::ok());
    // Two outputs per record, batches of 3: a record's outputs often land in two batches.
    let p = start(
        "http-keys",
        &input,
        &format!("http: {{url: \"{}\", batch: {{as: onePerRequest}}}}", rx.url("/k")),
        "processor: {jq: {program: '{seq}, {seq, again: true}'}}\nbatching: {maxMessages: 3, linger: 1ms}",
        &[],
    );
    p.wait_committed(Duration::from_secs(120));
    p.stop();
    let mut keys = BTreeMap::new();
    for r in rx.log() {
        let key = r.header("idempotency-key").unwrap().to_string();
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert!(
            keys.insert(key.clone(), v.clone()).is_none(),
            "{key} sent twice"
        );
        let again = v.get("again").is_some();
        assert_eq!(key.ends_with(".1"), again, "{key}: {v}");
    }
    assert_eq!(keys.len() as u64, 2 * n, "a key for every output");
}

#[test]
fn an_https_endpoint_is_verified_against_the_ca_file_and_refused_without_it() {
    let dir = std::env::temp_dir().join(unique("sluice-https"));
    let (ca, cert, key) = sluice_testkit::http_receiver::test_certificates(&dir);
    let rx = HttpReceiver::start_tls(&cert, &key, |_| Answer::ok());
    let input = unique("https-in");
    let dlq = unique("https-dlq");
    create_topic_now(&input, 1);
    create_topic_now(&dlq, 1);
    let n: u64 = 100;
    produce_records(&input, seq_values(n, |_| false));
    // Trusting the test's CA: every record over TLS.
    let p = start(
        "https-ca",
        &input,
        &format!(
            "http: {{url: \"{}\", caFile: {}}}",
            rx.url("/s"),
            ca.display()
        ),
        "",
        &[],
    );
    p.wait_committed(Duration::from_secs(60));
    p.stop();
    let delivered: usize = rx
        .log()
        .iter()
        .map(|r| {
            serde_json::from_slice::<Vec<serde_json::Value>>(&r.body)
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(delivered as u64, n, "every record over HTTPS");
    // Without caFile (the system's roots), the server is not trusted: nothing is sent, and
    // once the retries run out the records are dead-lettered with the reason.
    let before = rx.log().len();
    let p = start(
        "https-untrusted",
        &input,
        &format!("http: {{url: \"{}\"}}", rx.url("/s")),
        &format!("retry: {{initialBackoff: 100ms, maxBackoff: 200ms, maxElapsed: 2s}}\ndeadLetter: {{topic: {dlq}}}"),
        &[],
    );
    p.wait_committed(Duration::from_secs(60));
    p.stop();
    assert_eq!(rx.log().len(), before, "no request reached the server");
    let letters = read_all(&dlq, Duration::from_secs(30));
    assert_eq!(letters.len() as u64, n);
    let m = letters[0].header("sluice.error.message").unwrap();
    assert_eq!(
        letters[0].header("sluice.error.class"),
        Some("retries_exhausted")
    );
    assert!(m.to_lowercase().contains("certificate"), "{m}");
    let _ = std::fs::remove_dir_all(&dir);
}
