//! Processing and delivery against a real Kafka broker and a real PostgreSQL: the jq
//! processor, the postgres sink, fan-out to two sinks, transient outages, poison input,
//! permanent rejections and the dead-letter topic, and the stall without one.

use std::time::{Duration, Instant};

use sluice_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_sluice-worker");

/// The transform every test runs: `{"seq":N,"deviceId":"dev-7","tempC":3.1,...}` becomes
/// `{"seq":N,"device":"dev-7","tempF":37.58}`.
const PROGRAM: &str = r#"{seq, device: .deviceId, tempF: ((.tempC | tonumber) * 9 / 5 + 32)}"#;

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Run `sql` on the PostgreSQL under test; the rows come back as text columns.
fn pg(sql: &str) -> Vec<Vec<Option<String>>> {
    block_on(async {
        let (client, conn) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
        tokio::spawn(conn);
        let msgs = client.simple_query(sql).await.expect(sql);
        msgs.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect()
    })
}

fn pg_count(sql: &str) -> i64 {
    pg(sql)[0][0].as_deref().unwrap().parse().unwrap()
}

/// A fresh readings table; `device` is NOT NULL.
fn readings_table(name: &str) -> String {
    let table = unique(name).replace('-', "_");
    pg(&format!(
        "CREATE TABLE {table} (seq bigint PRIMARY KEY, device text NOT NULL, temp_f double precision)"
    ));
    table
}

fn create_topics(names: &[&str], partitions: i32) {
    let b = bootstrap();
    block_on(async {
        for n in names {
            create_topic(&b, n, partitions).await.unwrap();
        }
    });
}

struct Pipeline {
    input: String,
    group: String,
    worker: WorkerProcess,
}

/// Start a worker reading `input` with the jq processor and the given sinks (YAML list
/// items) and extra top-level YAML; `pg_url` is its connection string.
fn start(name: &str, input: &str, sinks: &str, extra: &str, pg_url: &str) -> Pipeline {
    let addr = format!("127.0.0.1:{}", free_port());
    let group = unique(&format!("{name}-g"));
    let cfg = format!(
        r#"pipeline: {name}
source:
  bootstrapServers: "{b}"
  topic: {input}
  groupId: {group}
  sessionTimeout: 10s
processor:
  jq:
    program: '{PROGRAM}'
sinks:
{sinks}
batching: {{maxMessages: 2000, linger: 5ms}}
commit: {{interval: 500ms, drainTimeout: 8s}}
server: {{listen: "{addr}"}}
{extra}
"#,
        b = bootstrap()
    );
    let worker = WorkerProcess::start_with_env(
        BIN,
        &unique(name),
        &cfg,
        &addr,
        &[("SLUICE_POSTGRES_URL", pg_url)],
    );
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
            if Instant::now() > deadline {
                panic!(
                    "{left} records still uncommitted after {timeout:?}\n{}",
                    self.worker.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn stop(mut self) {
        self.worker.signal("TERM");
        let st = self.worker.wait(Duration::from_secs(30)).expect("exit");
        assert!(st.success(), "{st:?}\n{}", self.worker.log_tail(30));
    }
}

fn seq_records(n: u64) -> impl Iterator<Item = TestRecord> {
    (0..n).map(|i| TestRecord {
        tombstone: false,
        partition: None,
        key: Some(key(i)),
        value: payload(i, 100),
    })
}

fn temp_f(seq: u64) -> f64 {
    ((seq % 400) as f64 / 10.0) * 9.0 / 5.0 + 32.0
}

#[test]
fn fan_out_delivers_every_transformed_record_to_kafka_and_postgres() {
    let input = unique("fanout-in");
    let output = unique("fanout-out");
    create_topics(&[&input, &output], 4);
    let table = readings_table("fanout");
    let n = 100_000;
    produce_records(&input, seq_records(n));
    let p = start(
        "fanout",
        &input,
        &format!(
            "  - kafka: {{topic: {output}}}\n  - postgres: {{table: {table}, columns: [{{name: seq}}, {{name: device}}, {{name: temp_f, field: tempF}}]}}"
        ),
        "",
        &postgres_url(),
    );
    p.wait_committed(Duration::from_secs(240));
    let delivered = p
        .worker
        .metric("sluice_sink_outputs_total", "sink=\"postgres\"");
    p.stop();

    // Kafka: every record, transformed.
    let r = audit(&bootstrap(), &output, 0, n, Duration::from_secs(60)).unwrap();
    eprintln!("[fan-out] kafka {output}: {r}");
    assert_eq!((r.missing, r.read >= n), (0, true), "{r}");
    let sample = read_all(&output, Duration::from_secs(30));
    for rec in sample.iter().step_by(997) {
        let v: serde_json::Value = serde_json::from_slice(rec.value.as_ref().unwrap()).unwrap();
        let seq = v["seq"].as_u64().unwrap();
        assert_eq!(v["device"], format!("dev-{}", seq % 1000), "{v}");
        assert!(
            (v["tempF"].as_f64().unwrap() - temp_f(seq)).abs() < 1e-9,
            "{v}"
        );
        assert_eq!(
            v.as_object().unwrap().len(),
            3,
            "the transform drops the padding: {v}"
        );
    }
    // PostgreSQL: every record, once, transformed.
    assert_eq!(pg_count(&format!("SELECT count(*) FROM {table}")), n as i64);
    assert_eq!(
        pg_count(&format!("SELECT count(*) FROM {table} WHERE abs(temp_f - ((seq % 400) / 10.0 * 9 / 5 + 32)) > 1e-9 OR device <> 'dev-' || (seq % 1000)")),
        0,
        "every row carries the transform"
    );
    eprintln!(
        "[fan-out] postgres {table}: {n} rows; the postgres sink acknowledged {delivered} outputs"
    );
}

#[test]
fn a_database_outage_pauses_and_catches_up_without_losing_or_duplicating_rows() {
    let input = unique("outage-in");
    create_topics(&[&input], 4);
    let table = readings_table("outage");
    let url = postgres_url();
    // Route the worker through a proxy the test can cut.
    let host_port = url.rsplit('@').next().unwrap().split('/').next().unwrap();
    let proxy = TcpProxy::start(host_port);
    let proxied = url.replace(host_port, &proxy.addr);
    let n = 60_000;
    let spec = ProduceSpec {
        bootstrap: bootstrap(),
        topic: input.clone(),
        from: 0,
        count: n,
        rate: Some(3_000.0),
        size: 100,
        linger_ms: 5,
    };
    let producer =
        std::thread::spawn(move || produce(&spec, &std::sync::atomic::AtomicU64::new(0)).unwrap());
    let p = start(
        "outage",
        &input,
        &format!("  - postgres: {{table: {table}, columns: [{{name: seq}}, {{name: device}}, {{name: temp_f, field: tempF}}]}}"),
        // No dead-letter topic and generous retries: nothing may be given up on.
        "retry: {initialBackoff: 100ms, maxBackoff: 2s, maxElapsed: 10m}",
        &proxied,
    );
    wait_for("rows before the outage", Duration::from_secs(60), || {
        pg_count(&format!("SELECT count(*) FROM {table}")) > 5_000
    });
    proxy.cut();
    let cut_at = Instant::now();
    eprintln!("[outage] database cut off for 20 s");
    std::thread::sleep(Duration::from_secs(8));
    let rows_during = pg_count(&format!("SELECT count(*) FROM {table}"));
    let consumed_during = p.worker.metric("sluice_messages_consumed_total", "");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        pg_count(&format!("SELECT count(*) FROM {table}")),
        rows_during,
        "nothing reaches the database while it is cut off"
    );
    let consumed_later = p.worker.metric("sluice_messages_consumed_total", "");
    let retries = p
        .worker
        .metric("sluice_sink_retries_total", "sink=\"postgres\"");
    eprintln!(
        "[outage] during: {rows_during} rows, {retries} row retries, consumption {consumed_during} -> {consumed_later} in 3 s while 9k were produced"
    );
    assert!(retries > 0.0, "the sink retries while the database is away");
    assert!(
        consumed_later - consumed_during < 500.0,
        "backpressure stops consumption while the sink cannot write"
    );
    assert!(!p.worker.metrics().is_empty(), "the worker stays up");
    std::thread::sleep(Duration::from_secs(20).saturating_sub(cut_at.elapsed()));
    proxy.restore();
    eprintln!("[outage] database back");
    producer.join().unwrap();
    p.wait_committed(Duration::from_secs(180));
    assert!(
        !p.worker.metrics().contains("sluice_dead_letters_total{"),
        "nothing dead-lettered"
    );
    p.stop();
    let total = pg_count(&format!("SELECT count(*) FROM {table}"));
    let distinct = pg_count(&format!("SELECT count(DISTINCT seq) FROM {table}"));
    eprintln!("[outage] after: {total} rows, {distinct} distinct of {n}");
    assert_eq!((total, distinct), (n as i64, n as i64));
}

#[test]
fn poison_records_go_to_the_dead_letter_topic_with_their_story_and_good_ones_are_delivered() {
    let input = unique("poison-in");
    let output = unique("poison-out");
    let dlq = unique("poison-dlq");
    create_topics(&[&input, &output, &dlq], 4);
    let n: u64 = 20_000;
    let records = (0..n).map(|i| TestRecord {
        tombstone: false,
        partition: None,
        key: Some(key(i)),
        value: match i % 100 {
            // 1%: not JSON at all
            13 => format!("garbage {i} {{").into_bytes(),
            // 1%: JSON on which the program fails (`"hot" | tonumber`)
            57 => format!(r#"{{"seq":{i},"deviceId":"dev-x","tempC":"hot"}}"#).into_bytes(),
            _ => payload(i, 100),
        },
    });
    produce_records(&input, records);
    let p = start(
        "poison",
        &input,
        &format!("  - kafka: {{topic: {output}}}"),
        &format!("deadLetter: {{topic: {dlq}}}"),
        "unused",
    );
    p.wait_committed(Duration::from_secs(120));
    p.stop();

    let letters = read_all(&dlq, Duration::from_secs(30));
    assert_eq!(
        letters.len(),
        400,
        "exactly the 2% poison records are dead-lettered"
    );
    let mut classes = std::collections::BTreeMap::new();
    for l in &letters {
        *classes
            .entry(l.header("sluice.error.class").unwrap().to_string())
            .or_insert(0) += 1;
        assert_eq!(l.header("sluice.error.stage"), Some("jq"));
        assert_eq!(l.header("sluice.error.attempts"), Some("1"));
        assert_eq!(l.header("sluice.source.topic"), Some(input.as_str()));
        let partition: i32 = l
            .header("sluice.source.partition")
            .unwrap()
            .parse()
            .unwrap();
        let offset: i64 = l.header("sluice.source.offset").unwrap().parse().unwrap();
        assert!((0..4).contains(&partition) && offset >= 0);
        assert!(
            l.header("sluice.source.timestamp")
                .unwrap()
                .parse::<i64>()
                .unwrap()
                > 0
        );
        assert!(!l.header("sluice.error.message").unwrap().is_empty());
        // The letter carries the original input, untouched.
        let v = String::from_utf8(l.value.clone().unwrap()).unwrap();
        assert!(v.starts_with("garbage") || v.contains("\"hot\""), "{v}");
    }
    assert_eq!(
        classes,
        [("jq_error".to_string(), 200), ("not_json".to_string(), 200)].into(),
    );
    let out = read_all(&output, Duration::from_secs(30));
    let seqs: std::collections::BTreeSet<u64> = out
        .iter()
        .filter_map(|r| parse_seq(r.value.as_ref()?))
        .collect();
    let expected: std::collections::BTreeSet<u64> =
        (0..n).filter(|i| !matches!(i % 100, 13 | 57)).collect();
    assert_eq!(seqs, expected, "every good record is delivered");
}

#[test]
fn a_permanent_rejection_is_dead_lettered_at_once_and_the_rest_of_its_batch_is_written() {
    let input = unique("reject-in");
    let dlq = unique("reject-dlq");
    create_topics(&[&input, &dlq], 2);
    let table = readings_table("reject");
    let n: u64 = 10_000;
    // 1% of the records have no device: the NOT NULL column refuses them.
    let records = (0..n).map(|i| TestRecord {
        tombstone: false,
        partition: None,
        key: Some(key(i)),
        value: if i % 100 == 7 {
            format!(r#"{{"seq":{i},"deviceId":null,"tempC":1}}"#).into_bytes()
        } else {
            payload(i, 100)
        },
    });
    produce_records(&input, records);
    let p = start(
        "reject",
        &input,
        &format!("  - postgres: {{table: {table}, columns: [{{name: seq}}, {{name: device}}, {{name: temp_f, field: tempF}}]}}"),
        &format!("deadLetter: {{topic: {dlq}}}"),
        &postgres_url(),
    );
    p.wait_committed(Duration::from_secs(120));
    let retries = p
        .worker
        .metric("sluice_sink_retries_total", "sink=\"postgres\"");
    p.stop();
    assert_eq!(retries, 0.0, "a constraint violation is not retried");
    assert_eq!(pg_count(&format!("SELECT count(*) FROM {table}")), 9_900);
    let letters = read_all(&dlq, Duration::from_secs(30));
    assert_eq!(letters.len(), 100);
    for l in &letters {
        assert_eq!(l.header("sluice.error.class"), Some("constraint"));
        assert_eq!(l.header("sluice.error.stage"), Some("postgres"));
        assert!(
            l.header("sluice.error.message").unwrap().contains("23502"),
            "{:?}",
            l.headers
        );
        let v: serde_json::Value = serde_json::from_slice(l.value.as_ref().unwrap()).unwrap();
        assert_eq!(
            v["seq"].as_u64().unwrap() % 100,
            7,
            "the rejected output is parked: {v}"
        );
    }
}

#[test]
fn without_a_dead_letter_topic_a_poison_record_stalls_only_its_partition() {
    let input = unique("stall-in");
    let output = unique("stall-out");
    create_topics(&[&input, &output], 3);
    let per_partition: u64 = 2_000;
    let poison_at: u64 = 700;
    let records = (0..3 * per_partition).map(|i| {
        let partition = (i % 3) as i32;
        let nth = i / 3;
        TestRecord {
            tombstone: false,
            partition: Some(partition),
            key: None,
            value: if partition == 0 && nth == poison_at {
                b"not json".to_vec()
            } else {
                payload(i, 100)
            },
        }
    });
    produce_records(&input, records);
    let p = start(
        "stall",
        &input,
        &format!("  - kafka: {{topic: {output}}}"),
        "",
        "unused",
    );
    wait_for("the stall metric", Duration::from_secs(60), || {
        p.worker
            .metric("sluice_partition_stalled", "partition=\"0\"")
            == 1.0
    });
    wait_for(
        "the healthy partitions committed to the end",
        Duration::from_secs(60),
        || {
            offsets::committed_and_end(&bootstrap(), &p.group, &input)
                .map(|v| v[1..].iter().all(|(c, hi)| *c == Some(*hi)))
                .unwrap_or(false)
        },
    );
    // Give the stalled partition time to (wrongly) move on.
    std::thread::sleep(Duration::from_secs(3));
    let offs = offsets::committed_and_end(&bootstrap(), &p.group, &input).unwrap();
    eprintln!("[stall] committed/end per partition: {offs:?}");
    let committed0 = offs[0].0.unwrap_or(0);
    assert!(
        committed0 <= poison_at as i64,
        "partition 0 committed {committed0}, past the poison record at {poison_at}"
    );
    assert_eq!(
        p.worker
            .metric("sluice_partition_stalled", "partition=\"1\""),
        0.0
    );
    assert!(
        std::fs::read_to_string(&p.worker.log)
            .unwrap()
            .contains("no dead-letter topic"),
        "the log says why"
    );
    p.stop();
}

#[test]
fn a_jq_program_that_does_not_compile_stops_start_up_with_its_position() {
    let dir = std::env::temp_dir().join("sluice-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}.yaml", unique("bad-jq")));
    std::fs::write(
        &path,
        "pipeline: bad\nsource: {bootstrapServers: \"127.0.0.1:1\", topic: in, groupId: g}\nprocessor:\n  jq:\n    program: |\n      {seq,\n       device: .deviceId | }\nsinks: [{null: {}}]\n",
    )
    .unwrap();
    for check in [true, false] {
        let mut cmd = std::process::Command::new(BIN);
        cmd.arg("--config").arg(&path);
        if check {
            cmd.arg("--check");
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "check={check}: {err}");
        assert!(
            err.contains("the jq program does not compile") && err.contains("line 2, column 22"),
            "check={check}: {err}"
        );
    }
}

#[test]
fn odd_records_are_each_handled_deliberately() {
    let input = unique("odd-in");
    let output = unique("odd-out");
    let dlq = unique("odd-dlq");
    create_topics(&[&input, &output, &dlq], 2);
    let big_key = "k".repeat(200_000);
    let odd = vec![
        // a tombstone: delivered as a tombstone
        TestRecord {
            key: Some("tombstone".into()),
            tombstone: true,
            ..Default::default()
        },
        // an empty value: delivered empty
        TestRecord {
            key: Some("empty".into()),
            ..Default::default()
        },
        // bytes that are not UTF-8: delivered byte for byte
        TestRecord {
            key: Some("binary".into()),
            value: vec![0xff, 0xfe, 0x00, 0xc3, 0x28],
            ..Default::default()
        },
        // a 200 KB key: delivered
        TestRecord {
            key: Some(big_key.clone()),
            value: b"{}".to_vec(),
            ..Default::default()
        },
        // a value over the sink producer's 1 MB limit: dead-lettered as record_too_large
        TestRecord {
            key: Some("huge".into()),
            value: vec![b'x'; 1_020_000],
            ..Default::default()
        },
    ];
    produce_records(&input, odd.into_iter().chain(seq_records(1000)));
    let addr = format!("127.0.0.1:{}", free_port());
    let group = unique("odd-g");
    let cfg = worker_config(
        &bootstrap(),
        &input,
        &output,
        &group,
        &addr,
        &format!("deadLetter: {{topic: {dlq}}}"),
    );
    let w = WorkerProcess::start(BIN, &unique("odd"), &cfg, &addr);
    let p = Pipeline {
        input: input.clone(),
        group,
        worker: w,
    };
    p.wait_committed(Duration::from_secs(60));
    p.stop();
    let out = read_all(&output, Duration::from_secs(30));
    let by_key = |k: &str| {
        out.iter()
            .find(|r| r.key.as_deref() == Some(k.as_bytes()))
            .unwrap_or_else(|| panic!("no output with key {:.20}", k))
    };
    assert_eq!(by_key("tombstone").value, None);
    assert_eq!(by_key("empty").value.as_deref(), Some(&b""[..]));
    assert_eq!(
        by_key("binary").value.as_deref(),
        Some(&[0xff, 0xfe, 0x00, 0xc3, 0x28][..])
    );
    assert_eq!(by_key(&big_key).value.as_deref(), Some(&b"{}"[..]));
    assert!(out.iter().all(|r| r.key.as_deref() != Some(&b"huge"[..])));
    assert_eq!(
        out.len(),
        1004,
        "four odd records and the 1000 ordinary ones"
    );
    let letters = read_all(&dlq, Duration::from_secs(30));
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    assert_eq!(l.header("sluice.error.class"), Some("record_too_large"));
    assert_eq!(l.header("sluice.error.stage"), Some("kafka"));
    assert_eq!(l.key.as_deref(), Some(&b"huge"[..]));
    assert_eq!(
        l.value.as_ref().map(Vec::len),
        Some(1_020_000),
        "the letter keeps the payload"
    );
}

#[test]
fn kafka_key_and_trace_header_options_and_postgres_upserts() {
    let input = unique("opts-in");
    let output = unique("opts-out");
    create_topics(&[&input, &output], 2);
    let table = unique("opts").replace('-', "_");
    pg(&format!(
        "CREATE TABLE {table} (seq bigint PRIMARY KEY, device text NOT NULL, temp_f double precision)"
    ));
    // Every seq twice, first from device a then from device b; the same key keeps them
    // in order on one partition, so the upsert must end on b.
    let records = (0..2u64).flat_map(|round| {
        (0..200u64).map(move |i| TestRecord {
            tombstone: false,
            partition: None,
            key: Some(format!("k{i}")),
            value: format!(
                r#"{{"seq":{i},"deviceId":"{}","tempC":{round}}}"#,
                if round == 0 { "a" } else { "b" }
            )
            .into_bytes(),
        })
    });
    produce_records(&input, records);
    let addr = format!("127.0.0.1:{}", free_port());
    let group = unique("opts-g");
    let cfg = format!(
        r#"pipeline: opts
source: {{bootstrapServers: "{b}", topic: {input}, groupId: {group}, sessionTimeout: 10s}}
processor:
  jq:
    envelope: true
    program: '{{key: "chosen-by-jq", value: {{seq, device: .deviceId, temp_f: .tempC}}}}'
sinks:
  - kafka: {{topic: {output}, key: input, traceHeader: src}}
  - postgres: {{table: {table}, onConflict: update, conflictKey: [seq]}}
commit: {{interval: 500ms, drainTimeout: 8s}}
server: {{listen: "{addr}"}}
"#,
        b = bootstrap()
    );
    let worker = WorkerProcess::start_with_env(
        BIN,
        &unique("opts"),
        &cfg,
        &addr,
        &[("SLUICE_POSTGRES_URL", &postgres_url())],
    );
    let p = Pipeline {
        input: input.clone(),
        group,
        worker,
    };
    p.wait_committed(Duration::from_secs(60));
    let log = std::fs::read_to_string(&p.worker.log).unwrap();
    p.stop();
    assert!(
        !log.contains("sluice-secret"),
        "the connection string's password reached the log"
    );
    let out = read_all(&output, Duration::from_secs(30));
    assert_eq!(out.len(), 400);
    for r in &out {
        let v: serde_json::Value = serde_json::from_slice(r.value.as_ref().unwrap()).unwrap();
        let key = String::from_utf8(r.key.clone().unwrap()).unwrap();
        assert_eq!(
            key,
            format!("k{}", v["seq"]),
            "key: input keeps the source key"
        );
        let trace = r.header("src").unwrap();
        let (topic, rest) = trace.split_once('/').unwrap();
        assert_eq!(topic, input);
        let (partition, offset) = rest.split_once('/').unwrap();
        assert!(
            partition.parse::<i32>().is_ok() && offset.parse::<i64>().is_ok(),
            "{trace}"
        );
    }
    assert_eq!(pg_count(&format!("SELECT count(*) FROM {table}")), 200);
    assert_eq!(
        pg_count(&format!(
            "SELECT count(*) FROM {table} WHERE device = 'b' AND temp_f = 1"
        )),
        200,
        "the later row of each key wins"
    );
}

#[test]
fn the_postgres_sink_speaks_tls_and_verifies_the_server_certificate() {
    let Some(ca) = postgres_ca() else {
        eprintln!("SKIPPED: external PostgreSQL without SLUICE_TEST_POSTGRES_CA");
        return;
    };
    let tls_url = format!(
        "{}{}sslmode=require",
        postgres_url(),
        if postgres_url().contains('?') {
            "&"
        } else {
            "?"
        }
    );
    let input = unique("pgtls-in");
    create_topics(&[&input], 2);
    let table = readings_table("pgtls");
    let n: u64 = 5_000;
    produce_records(&input, seq_records(n));
    let p = start(
        "pgtls",
        &input,
        &format!(
            "  - postgres: {{table: {table}, caFile: \"{}\", columns: [{{name: seq}}, {{name: device}}, {{name: temp_f, field: tempF}}]}}",
            ca.display()
        ),
        "",
        &tls_url,
    );
    p.wait_committed(Duration::from_secs(120));
    // The worker's connections are encrypted (the server says so).
    let encrypted = pg_count(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'sluice' AND s.ssl",
    );
    p.stop();
    assert!(encrypted >= 1, "no TLS connection from the worker");
    assert_eq!(
        pg_count(&format!("SELECT count(DISTINCT seq) FROM {table}")),
        n as i64
    );

    // Without the CA, the server's certificate is not trusted: start-up fails and says why.
    let addr = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "pipeline: pgtls-untrusted\nsource: {{bootstrapServers: \"{}\", topic: {input}, groupId: {}}}\nsinks: [{{postgres: {{table: {table}}}}}]\nserver: {{listen: \"{addr}\"}}\n",
        bootstrap(),
        unique("pgtls-untrusted-g")
    );
    let mut w = WorkerProcess::start_with_env(
        BIN,
        &unique("pgtls-untrusted"),
        &cfg,
        &addr,
        &[("SLUICE_POSTGRES_URL", &tls_url)],
    );
    let st = w.wait(Duration::from_secs(60)).expect("the worker exits");
    let log = std::fs::read_to_string(&w.log).unwrap();
    assert!(!st.success(), "started without trusting the server:\n{log}");
    assert!(
        log.contains("certificate") || log.contains("UnknownIssuer"),
        "the failure should name the certificate:\n{log}"
    );
    assert!(
        !log.contains("sluice-secret"),
        "the password reached the log"
    );
}

/// L1: with `onConflict: update`, outputs whose conflict key is missing or null are never
/// dropped by the per-batch de-duplication: each is a row (a nullable unique key takes
/// them) or a dead letter of class `constraint` (a primary key refuses them).
#[test]
fn keyless_and_null_key_outputs_are_rows_or_dead_letters_never_dropped() {
    let input = unique("nullkey-in");
    let dead = unique("nullkey-dl");
    create_topics(&[&input, &dead], 1);
    let strict = unique("nullkey_pk").replace('-', "_");
    let loose = unique("nullkey_uq").replace('-', "_");
    pg(&format!(
        "CREATE TABLE {strict} (id bigint PRIMARY KEY, note text)"
    ));
    pg(&format!(
        "CREATE TABLE {loose} (id bigint UNIQUE, note text)"
    ));
    // 100 keyed, 30 without the key field, 20 with a null key, interleaved on one
    // partition so they share batches.
    let records = (0..150u64).map(|i| TestRecord {
        tombstone: false,
        partition: Some(0),
        key: None,
        value: match i % 5 {
            1 if i < 100 => format!(r#"{{"note":"keyless-{i}"}}"#),
            3 if i < 100 => format!(r#"{{"id":null,"note":"null-{i}"}}"#),
            _ => format!(r#"{{"id":{i},"note":"keyed-{i}"}}"#),
        }
        .into_bytes(),
    });
    let records: Vec<TestRecord> = records.collect();
    let keyless = records
        .iter()
        .filter(|r| {
            !String::from_utf8_lossy(&r.value).contains("\"id\":")
                || String::from_utf8_lossy(&r.value).contains("null")
        })
        .count() as i64;
    produce_records(&input, records);
    let addr = format!("127.0.0.1:{}", free_port());
    let group = unique("nullkey-g");
    let cfg = format!(
        r#"pipeline: nullkey
source: {{bootstrapServers: "{b}", topic: {input}, groupId: {group}, sessionTimeout: 10s}}
sinks:
  - postgres: {{table: {strict}, onConflict: update, conflictKey: [id]}}
  - postgres: {{table: {loose}, onConflict: update, conflictKey: [id]}}
deadLetter: {{topic: {dead}}}
batching: {{maxMessages: 2000, linger: 50ms}}
commit: {{interval: 500ms, drainTimeout: 8s}}
server: {{listen: "{addr}"}}
"#,
        b = bootstrap()
    );
    let worker = WorkerProcess::start_with_env(
        BIN,
        &unique("nullkey"),
        &cfg,
        &addr,
        &[("SLUICE_POSTGRES_URL", &postgres_url())],
    );
    let p = Pipeline {
        input: input.clone(),
        group,
        worker,
    };
    p.wait_committed(Duration::from_secs(60));
    p.stop();
    let keyed = 150 - keyless;
    assert_eq!(keyless, 40, "the test's own arithmetic");
    assert_eq!(
        pg_count(&format!("SELECT count(*) FROM {strict}")),
        keyed,
        "every keyed output is a row of the primary-key table"
    );
    assert_eq!(
        pg_count(&format!("SELECT count(*) FROM {loose}")),
        150,
        "a nullable unique key takes every keyless output as a row of its own"
    );
    let letters = read_all(&dead, Duration::from_secs(30));
    assert_eq!(
        letters.len() as i64,
        keyless,
        "every keyless output the primary key refuses is a dead letter"
    );
    assert!(letters
        .iter()
        .all(|l| l.header("sluice.error.class") == Some("constraint")));
}
