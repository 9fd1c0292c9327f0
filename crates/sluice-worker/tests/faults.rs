//! Faults a worker must ride out without a restart, an alarm or a skipped record (issue 19),
//! each against the real broker with real worker processes: outputs the broker refuses for
//! good under exactly-once, slow windows, slow transaction commits, a database outage and
//! an upstream transaction longer than the fetch-stall limit, transactional inputs, and
//! where a group starts (`startFrom: latest`, partitions added at runtime).

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, NewPartitions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use sluice_testkit::*;

/// The worker under test: this build's, or `SLUICE_TEST_WORKER_BIN` (to show what another
/// build, e.g. an older one, does in the same scenarios).
fn bin() -> String {
    std::env::var("SLUICE_TEST_WORKER_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_sluice-worker").to_string())
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Create `topic` on the broker under test with topic `config`.
fn topic_with(topic: &str, partitions: i32, config: &[(&str, &str)]) {
    block_on(create_topic_with(&bootstrap(), topic, partitions, config)).unwrap();
}

fn add_partitions(topic: &str, total: usize) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let res = block_on(
        admin.create_partitions([&NewPartitions::new(topic, total)], &AdminOptions::new()),
    )
    .unwrap();
    for r in res {
        r.unwrap();
    }
}

/// A worker with `body` (everything but `pipeline`, `source` and `server`).
fn worker(name: &str, input: &str, group: &str, source_extra: &str, body: &str) -> WorkerProcess {
    worker_on(&bootstrap(), name, input, group, source_extra, body, "")
}

fn worker_on(
    bootstrap: &str,
    name: &str,
    input: &str,
    group: &str,
    source_extra: &str,
    body: &str,
    server_extra: &str,
) -> WorkerProcess {
    let addr = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "pipeline: faults\nsource:\n  bootstrapServers: \"{bootstrap}\"\n  topic: {input}\n  groupId: {group}\n{source_extra}\n{body}\nserver: {{listen: \"{addr}\"{server_extra}}}\n"
    );
    let w = WorkerProcess::start(&bin(), &unique(name), &cfg, &addr);
    wait_for(
        "the worker's metrics endpoint",
        Duration::from_secs(30),
        || !w.metrics().is_empty(),
    );
    w
}

/// The worker must still run: it never exited (what a Kubernetes restart would be).
fn assert_alive(w: &mut WorkerProcess) {
    if let Some(st) = w.wait(Duration::ZERO) {
        panic!("the worker exited ({st}):\n{}", w.log_tail(40));
    }
}

/// Probe `/healthz` every second for `d` (like a kubelet); returns the failed probes.
fn probe_for(w: &mut WorkerProcess, d: Duration) -> Vec<String> {
    let end = Instant::now() + d;
    let mut failed = Vec::new();
    while Instant::now() < end {
        assert_alive(w);
        if http_status(&w.metrics_addr, "/healthz") != Some(200) {
            failed.push(http_get(&w.metrics_addr, "/healthz").unwrap_or_default());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    failed
}

fn produce_keyed(topic: &str, records: impl IntoIterator<Item = (Option<String>, Vec<u8>)>) {
    produce_records(
        topic,
        records.into_iter().map(|(key, value)| TestRecord {
            partition: None,
            key,
            value,
            tombstone: false,
        }),
    );
}

/// Set `topic`'s configuration to `config` (AlterConfigs: what is not named goes back to
/// the broker's default).
fn alter_topic(topic: &str, config: &[(&str, &str)]) {
    block_on(async {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .create()
            .unwrap();
        let alter = config.iter().fold(
            AlterConfig::new(ResourceSpecifier::Topic(topic)),
            |a, (k, v)| a.set(k, v),
        );
        for r in admin
            .alter_configs([&alter], &AdminOptions::new())
            .await
            .unwrap()
        {
            r.unwrap();
        }
    });
}

/// N1: under exactly-once, an output the broker refuses for good (too large for the
/// output topic; a keyless record to a compacted topic) reaches the dead-letter topic once,
/// in a later transaction, and the worker goes on: no exit, no other record lost or doubled.
///
/// The worker refuses both itself when it knows the topic's rules (tests/output_size_limit.rs);
/// here the rules change after it read them at start (the limit lowered, compaction turned
/// on), so both reach the broker, and the abort-and-search path finds them.
#[test]
fn exactly_once_an_output_refused_for_good_is_dead_lettered_once_and_the_worker_lives_on() {
    let (input, output, dlq, group) = (
        unique("refused-in"),
        unique("refused-out"),
        unique("refused-dlq"),
        unique("refused-g"),
    );
    block_on(create_topic(&bootstrap(), &input, 2)).unwrap();
    block_on(create_topic(&bootstrap(), &dlq, 1)).unwrap();
    topic_with(&output, 2, &[]);
    let mut w = worker(
        "refused",
        &input,
        &group,
        "",
        &format!(
            "sinks: [{{kafka: {{topic: {output}}}}}]\ndeadLetter: {{topic: {dlq}}}\ndelivery: {{guarantee: exactly-once}}\ncommit: {{drainTimeout: 5s}}"
        ),
    );
    wait_for(
        "the worker read the output topic's rules",
        Duration::from_secs(60),
        || {
            assert_alive(&mut w);
            std::fs::read_to_string(&w.log)
                .unwrap_or_default()
                .contains("dead-lettered before they are produced")
        },
    );
    alter_topic(
        &output,
        &[
            ("cleanup.policy", "compact"),
            ("max.message.bytes", "50000"),
        ],
    );
    let mut records: Vec<(Option<String>, Vec<u8>)> = (0..300)
        .map(|i| (Some(format!("k{i}")), format!("small-{i}").into_bytes()))
        .collect();
    records.insert(100, (Some("big".into()), vec![b'x'; 60_000]));
    records.insert(200, (None, b"keyless".to_vec()));
    produce_keyed(&input, records);
    wait_for(
        "the input committed to its end",
        Duration::from_secs(90),
        || {
            assert_alive(&mut w);
            uncommitted(&bootstrap(), &group, &input) == 0
        },
    );
    assert_alive(&mut w);
    let out = read_all(&output, Duration::from_secs(30));
    let letters = read_all(&dlq, Duration::from_secs(30));
    assert_eq!(out.len(), 300, "every other output, once");
    let mut values: Vec<_> = out.iter().filter_map(|r| r.value.clone()).collect();
    values.sort();
    values.dedup();
    assert_eq!(values.len(), 300, "no output twice");
    let mut classes: Vec<_> = letters
        .iter()
        .map(|l| {
            l.header("sluice.error.class")
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    classes.sort();
    assert_eq!(
        classes,
        ["invalid_record", "record_too_large"],
        "{letters:?}"
    );
    let log = std::fs::read_to_string(&w.log).unwrap_or_default();
    assert!(
        log.contains("the window was aborted"),
        "the refusals reached the broker and a window was aborted to find them"
    );
    w.signal("TERM");
    assert!(w.wait(Duration::from_secs(30)).is_some_and(|s| s.success()));
}

/// N8: under exactly-once, a window that cannot drain within `commit.drainTimeout` (a
/// slow processor behind a backlog) is waited for while it progresses, and windows then
/// admit less: the worker never exits and every record is delivered once.
#[test]
fn exactly_once_a_window_slower_than_the_drain_timeout_commits_without_an_exit() {
    // 8 partitions x 512 records per window at about 1,000 records/s (a 2 ms processor
    // on the runtime's two threads): a window takes about 4 s to drain, twice the
    // drain timeout.
    let s = pipeline_topics("slowwin", 8);
    let (input, output, group) = (&s.0, &s.1, &s.2);
    let dlq = unique("slowwin-dlq");
    block_on(create_topic(&bootstrap(), &dlq, 1)).unwrap();
    produce_seq(input, 8_000);
    let mut w = worker(
        "slowwin",
        input,
        group,
        "",
        &format!(
            "processor: {{delay: {{perRecord: 2ms}}}}\nsinks: [{{kafka: {{topic: {output}}}}}]\nworkers: {{perPartition: 1}}\ndeadLetter: {{topic: {dlq}}}\ndelivery: {{guarantee: exactly-once}}\ncommit: {{drainTimeout: 2s}}"
        ),
    );
    wait_for(
        "the input committed to its end",
        Duration::from_secs(180),
        || {
            assert_alive(&mut w);
            uncommitted(&bootstrap(), group, input) == 0
        },
    );
    let r = audit(&bootstrap(), output, 0, 8_000, Duration::from_secs(60)).unwrap();
    assert_eq!((r.missing, r.duplicates), (0, 0), "{r:?}");
}

/// N2: under exactly-once, transaction commits that outlast the transaction window (every
/// answer from the broker delayed) must not starve the coordinator's liveness heartbeat.
#[test]
fn exactly_once_commits_slower_than_the_window_keep_the_worker_live() {
    let Some((listener, advertised)) = proxied_listener() else {
        eprintln!("skipped: needs the local broker's proxied listener");
        return;
    };
    let proxy = TcpProxy::start_on(&advertised, &listener);
    proxy.delay_responses(Duration::from_millis(25));
    let s = pipeline_topics("slowcommit", 2);
    let (input, output, group) = (&s.0, &s.1, &s.2);
    let dlq = unique("slowcommit-dlq");
    block_on(create_topic(&bootstrap(), &dlq, 1)).unwrap();
    let gen = {
        let spec = ProduceSpec {
            bootstrap: bootstrap(),
            topic: input.clone(),
            from: 0,
            count: 20_000,
            rate: Some(400.0),
            size: 100,
            linger_ms: 5,
        };
        std::thread::spawn(move || produce(&spec, &std::sync::atomic::AtomicU64::new(0)).unwrap())
    };
    // drainTimeout 2s: /healthz fails once the loop has not run for 2 x 2 s + 30 s.
    let mut w = worker_on(
        &advertised,
        "slowcommit",
        input,
        group,
        "",
        &format!(
            "sinks: [{{kafka: {{topic: {output}}}}}]\ndeadLetter: {{topic: {dlq}}}\ndelivery: {{guarantee: exactly-once, transactionWindow: 10ms}}\ncommit: {{drainTimeout: 2s}}"
        ),
        "",
    );
    let failed = probe_for(&mut w, Duration::from_secs(45));
    assert!(failed.is_empty(), "/healthz failed: {failed:?}");
    let commits = w.metric("sluice_commit_latency_seconds_count", "");
    assert!(
        commits > 10.0,
        "transactions committed meanwhile: {commits}"
    );
    drop(gen);
}

/// N6: a PostgreSQL outage longer than `server.fetchStallTimeout` holds the partitions
/// back through their sinks: not a fetch wedge, so `/healthz` stays 200 (a restart could
/// not help, and start-up needs the database).
#[test]
fn a_database_outage_longer_than_the_fetch_stall_timeout_fails_no_health_probe() {
    let url = postgres_url();
    let table = unique("faults_pg").replace('-', "_");
    block_on(async {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.batch_execute(&format!(
            "CREATE TABLE {table} (seq bigint PRIMARY KEY, device text)"
        ))
        .await
        .unwrap();
    });
    let host_port = url
        .rsplit('@')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let proxy = TcpProxy::start(&host_port);
    let s = pipeline_topics("pgout", 2);
    let (input, group) = (&s.0, &s.2);
    let spec = ProduceSpec {
        bootstrap: bootstrap(),
        topic: input.clone(),
        from: 0,
        count: 20_000,
        rate: Some(300.0),
        size: 100,
        linger_ms: 5,
    };
    let gen =
        std::thread::spawn(move || produce(&spec, &std::sync::atomic::AtomicU64::new(0)).unwrap());
    let addr = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "pipeline: faults\nsource:\n  bootstrapServers: \"{}\"\n  topic: {input}\n  groupId: {group}\nsinks: [{{postgres: {{table: {table}, columns: [{{name: seq}}, {{name: device, field: deviceId}}]}}}}]\nretry: {{maxBackoff: 1s, maxElapsed: 10m}}\nserver: {{listen: \"{addr}\", fetchStallTimeout: 10s}}\n",
        bootstrap()
    );
    let proxied = url.replace(&host_port, &proxy.addr);
    let mut w = WorkerProcess::start_with_env(
        &bin(),
        &unique("pgout"),
        &cfg,
        &addr,
        &[("SLUICE_POSTGRES_URL", &proxied)],
    );
    wait_for("rows arriving", Duration::from_secs(30), || {
        w.metric("sluice_sink_outputs_total", "postgres") > 0.0
    });
    proxy.cut();
    let failed = probe_for(&mut w, Duration::from_secs(35));
    proxy.restore();
    assert!(
        failed.is_empty(),
        "/healthz failed during the outage: {failed:?}"
    );
    drop(gen);
}

/// N7: an upstream transaction left open longer than `server.fetchStallTimeout` holds the
/// last stable offset back: a `read_committed` worker has nothing to fetch, which is not a
/// wedge; once it commits, its records are delivered.
#[test]
fn an_upstream_transaction_left_open_fails_no_health_probe() {
    let s = pipeline_topics("opentxn", 1);
    let (input, output, group) = (&s.0, &s.1, &s.2);
    produce_seq(input, 100);
    let mut w = worker_on(
        &bootstrap(),
        "opentxn",
        input,
        group,
        "",
        &format!("sinks: [{{kafka: {{topic: {output}}}}}]"),
        ", fetchStallTimeout: 10s",
    );
    wait_for("the first records", Duration::from_secs(30), || {
        uncommitted(&bootstrap(), group, input) == 0
    });
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("transactional.id", unique("upstream"))
        .set("transaction.timeout.ms", "120000")
        .create()
        .unwrap();
    p.init_transactions(Duration::from_secs(30)).unwrap();
    p.begin_transaction().unwrap();
    for i in 100..110u64 {
        let v = payload(i, 100);
        let k = key(i);
        p.send(BaseRecord::to(input).key(&k).payload(&v)).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
    // Committed records after the open transaction: readable only once it ends.
    produce_now_from(input, 110, 10);
    let failed = probe_for(&mut w, Duration::from_secs(30));
    assert!(
        failed.is_empty(),
        "/healthz failed behind the open transaction: {failed:?}"
    );
    p.commit_transaction(Duration::from_secs(30)).unwrap();
    wait_for("the rest delivered", Duration::from_secs(60), || {
        uncommitted(&bootstrap(), group, input) == 0
    });
    let r = audit(&bootstrap(), output, 0, 120, Duration::from_secs(30)).unwrap();
    assert_eq!((r.missing, r.duplicates), (0, 0), "{r:?}");
}

fn produce_now_from(topic: &str, from: u64, count: u64) {
    let spec = ProduceSpec {
        bootstrap: bootstrap(),
        topic: topic.into(),
        from,
        count,
        rate: None,
        size: 100,
        linger_ms: 5,
    };
    produce(&spec, &std::sync::atomic::AtomicU64::new(0)).unwrap();
}

/// N10: a topic written in transactions ends every partition in a commit marker the
/// consumer never hands over; a drained worker commits past it, so its lag is 0 (the
/// controller's lag, a scale to zero and the stall rule read the same commit), under both
/// guarantees.
#[test]
fn a_drained_transactional_input_is_committed_to_its_end() {
    for guarantee in ["at-least-once", "exactly-once"] {
        let s = pipeline_topics("txnin", 4);
        let (input, output, group) = (&s.0, &s.1, &s.2);
        let dlq = unique("txnin-dlq");
        block_on(create_topic(&bootstrap(), &dlq, 1)).unwrap();
        let p: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("transactional.id", unique("txn-upstream"))
            .create()
            .unwrap();
        p.init_transactions(Duration::from_secs(30)).unwrap();
        for t in 0..10u64 {
            p.begin_transaction().unwrap();
            for i in t * 100..(t + 1) * 100 {
                let v = payload(i, 100);
                let k = key(i);
                p.send(BaseRecord::to(input).key(&k).payload(&v)).unwrap();
            }
            p.commit_transaction(Duration::from_secs(30)).unwrap();
        }
        let mut w = worker(
            "txnin",
            input,
            group,
            "",
            &format!(
                "sinks: [{{kafka: {{topic: {output}}}}}]\ndeadLetter: {{topic: {dlq}}}\ndelivery: {{guarantee: {guarantee}}}"
            ),
        );
        wait_for(
            &format!("{guarantee}: the commits at the end of the log (past the markers)"),
            Duration::from_secs(60),
            || uncommitted(&bootstrap(), group, input) == 0,
        );
        assert_alive(&mut w);
        let r = audit(&bootstrap(), output, 0, 1000, Duration::from_secs(30)).unwrap();
        assert_eq!((r.missing, r.duplicates), (0, 0), "{guarantee}: {r:?}");
    }
}

/// N5: `startFrom: latest` applies when the group first starts; a partition that simply has
/// no commit yet (no record before the first join) is read from its first record.
#[test]
fn latest_never_skips_a_partition_that_had_no_commit_yet() {
    let s = pipeline_topics("latest", 2);
    let (input, output, group) = (&s.0, &s.1, &s.2);
    produce_records(
        input,
        (0..5).map(|i| TestRecord {
            partition: Some(0),
            key: None,
            value: payload(1000 + i, 100),
            tombstone: false,
        }),
    );
    let body = format!("sinks: [{{kafka: {{topic: {output}}}}}]");
    let mut w = worker("latest", input, group, "  startFrom: latest", &body);
    // Both partitions started at the end of their logs: the group's first join.
    wait_for(
        "both partitions at the end",
        Duration::from_secs(30),
        || {
            let log = std::fs::read_to_string(&w.log).unwrap_or_default();
            log.matches("starting at the end of the log").count() >= 2
        },
    );
    produce_records(
        input,
        (0..10).map(|i| TestRecord {
            partition: Some(0),
            key: None,
            value: payload(i, 100),
            tombstone: false,
        }),
    );
    wait_for("partition 0 committed", Duration::from_secs(30), || {
        uncommitted(&bootstrap(), group, input) == 0
    });
    w.signal("TERM");
    assert!(w.wait(Duration::from_secs(30)).is_some_and(|s| s.success()));
    // While no worker runs, the first records of partition 1.
    produce_records(
        input,
        (10..15).map(|i| TestRecord {
            partition: Some(1),
            key: None,
            value: payload(i, 100),
            tombstone: false,
        }),
    );
    let _w = worker("latest2", input, group, "  startFrom: latest", &body);
    wait_for("everything committed", Duration::from_secs(30), || {
        uncommitted(&bootstrap(), group, input) == 0
    });
    let r = audit(&bootstrap(), output, 0, 15, Duration::from_secs(30)).unwrap();
    assert_eq!(
        (r.missing, r.duplicates),
        (0, 0),
        "the records produced after the first join, none skipped: {r:?}"
    );
}

/// Partitions added to the input at runtime are picked up at the next metadata refresh and
/// read from their first record, `startFrom: latest` included (the group started before).
/// The worker then owns more partitions than its consumer's prefetch was sized for (the
/// limits are per partition), so it drains and makes its consumer again, sized for four,
/// in the same process: nothing lost or duplicated, no exit.
#[test]
fn partitions_added_at_runtime_are_read_from_their_first_record() {
    let s = pipeline_topics("grow", 2);
    let (input, output, group) = (&s.0, &s.1, &s.2);
    let mut w = worker(
        "grow",
        input,
        group,
        "  startFrom: latest\n  consumerProperties: {topic.metadata.refresh.interval.ms: \"2000\"}",
        &format!("sinks: [{{kafka: {{topic: {output}}}}}]"),
    );
    wait_for("both partitions assigned", Duration::from_secs(30), || {
        w.metric("sluice_assigned_partitions", "") == 2.0
    });
    add_partitions(input, 4);
    // Right away: before the worker has seen the new partitions.
    produce_records(
        input,
        (0..40).map(|i| TestRecord {
            partition: Some(2 + (i % 2) as i32),
            key: None,
            value: payload(i, 100),
            tombstone: false,
        }),
    );
    wait_for(
        "the new partitions assigned",
        Duration::from_secs(30),
        || w.metric("sluice_assigned_partitions", "") == 4.0,
    );
    wait_for("everything committed", Duration::from_secs(30), || {
        uncommitted(&bootstrap(), group, input) == 0
    });
    assert_alive(&mut w);
    let r = audit(&bootstrap(), output, 0, 40, Duration::from_secs(30)).unwrap();
    assert_eq!((r.missing, r.duplicates), (0, 0), "{r:?}");
    let log = w.log_tail(100_000);
    assert!(
        log.contains("more than the 2 its consumer's prefetch was sized for"),
        "the consumer is made again for the grown topic:\n{}",
        w.log_tail(30)
    );
    assert_eq!(
        log.matches("the input topic grew").count(),
        1,
        "sized once for four partitions, it does not churn:\n{}",
        w.log_tail(30)
    );
}
