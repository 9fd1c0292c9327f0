//! The fault harness, shortened for CI (`make chaos` runs the full one): every scenario
//! under load against real worker processes, the real broker and PostgreSQL, checked by
//! the independent auditor in `sluice_testkit::chaos`.

use sluice_testkit::chaos::replicated::{self, Guarantee, Measured};
use sluice_testkit::chaos::{self, Length, Outcome};

const BIN: &str = env!("CARGO_BIN_EXE_sluice-worker");

fn check(o: &Outcome, duplicates_allowed: bool) {
    eprintln!("[chaos] {}", o.row());
    assert_eq!(o.lost, 0, "{}: records lost", o.name);
    if !duplicates_allowed {
        assert_eq!(o.duplicates, 0, "{}: duplicates", o.name);
    }
}

#[test]
fn chaos_sigkill_loses_nothing() {
    check(&chaos::sigkill(BIN, Length::Short), true);
}

#[test]
fn chaos_broker_restart_loses_nothing_and_bounds_redelivery() {
    let o = chaos::broker_restart(BIN, Length::Short);
    check(&o, true);
    // Fetching is held while commits fail, so what is redelivered is what was in flight
    // plus about two commit intervals, not everything consumed until the group re-forms
    // (about 50,000 records here before that hold existed).
    assert!(o.duplicates < 15_000, "{}", o.row());
}

#[test]
fn chaos_kafka_output_outage_loses_nothing() {
    check(&chaos::kafka_output_outage(BIN, Length::Short), true);
}

#[test]
fn chaos_database_outage_loses_nothing_and_duplicates_nothing() {
    check(&chaos::database_outage(BIN, Length::Short), false);
}

#[test]
fn chaos_poison_input_loses_nothing() {
    check(&chaos::poison(BIN, Length::Short), false);
}

#[test]
fn chaos_rebalance_storm_loses_nothing() {
    check(&chaos::rebalance_storm(BIN, Length::Short), true);
}

#[test]
fn chaos_slow_processing_holds_memory_and_loses_nothing() {
    let o = chaos::slow_sink(BIN, Length::Short);
    check(&o, false);
    assert!(o.peak_rss_mib < 128.0, "{}", o.row());
}

#[test]
fn chaos_clean_sigterm_duplicates_nothing() {
    check(&chaos::clean_sigterm(BIN, Length::Short), false);
}

#[test]
fn chaos_worker_frozen_past_its_session_rejoins_and_loses_nothing() {
    let o = chaos::sigstop(BIN, Length::Short);
    check(&o, true);
}

#[test]
fn chaos_broker_away_past_the_session_rejoins_and_loses_nothing() {
    let o = chaos::broker_away(BIN, Length::Short);
    check(&o, true);
}

#[test]
fn chaos_every_incarnation_of_a_reassigned_partition_consumes() {
    check(&chaos::reassign(BIN, Length::Short), true);
}

#[test]
fn chaos_memory_stays_within_the_stated_bound_with_64_partitions_and_a_stalled_sink() {
    let o = chaos::memory_bound(BIN, Length::Short);
    check(&o, true);
    if !o.note.starts_with("skipped") {
        // The scenario's settings: a 16 MiB budget, one Kafka sink, an 8 MiB fetchBuffer,
        // 64 partitions.
        let bound = chaos::stated_memory_bound_mib(16.0, 1, 8.0, 64);
        assert!(o.peak_rss_mib <= bound, "{}", o.row());
    }
}

#[test]
fn chaos_delayed_produce_answers_duplicate_nothing_in_the_output() {
    let o = chaos::slow_acks(BIN, Length::Short);
    check(&o, false);
}

#[test]
fn chaos_exactly_once_sigkill_loses_nothing_and_duplicates_nothing() {
    check(&chaos::eos_sigkill(BIN, Length::Short), false);
}

#[test]
fn chaos_exactly_once_rebalance_storm_loses_nothing_and_duplicates_nothing() {
    check(&chaos::eos_rebalance_storm(BIN, Length::Short), false);
}

/// A broker fault on the replicated cluster (three nodes, replication factor 3,
/// `min.insync.replicas=2`) with the default settings: nothing lost, no worker restart,
/// no duplicate under exactly-once; at-least-once redelivers at most about 5 s of the
/// load (what was in flight plus a commit interval, while the group settles).
fn check_replicated(m: &Measured, g: Guarantee) {
    eprintln!("[chaos] {}", m.row());
    let o = &m.outcome;
    assert_eq!(o.lost, 0, "{}: records lost", o.name);
    assert_eq!(m.restarts, 0, "{}: worker restarts", o.name);
    match g {
        Guarantee::ExactlyOnce => assert_eq!(o.duplicates, 0, "{}: duplicates", o.name),
        Guarantee::AtLeastOnce => assert!(o.duplicates <= 10_000, "{}", m.row()),
    }
}

#[test]
fn chaos_replicated_leader_killed_costs_no_restart_at_least_once() {
    let g = Guarantee::AtLeastOnce;
    check_replicated(&replicated::leader_kill(BIN, Length::Short, g), g);
}

#[test]
fn chaos_replicated_leader_killed_costs_no_restart_and_no_duplicate_exactly_once() {
    let g = Guarantee::ExactlyOnce;
    check_replicated(&replicated::leader_kill(BIN, Length::Short, g), g);
}

#[test]
fn chaos_replicated_group_coordinator_killed_costs_no_restart_at_least_once() {
    let g = Guarantee::AtLeastOnce;
    check_replicated(&replicated::coordinator_kill(BIN, Length::Short, g), g);
}

#[test]
fn chaos_replicated_group_coordinator_killed_costs_no_restart_and_no_duplicate_exactly_once() {
    let g = Guarantee::ExactlyOnce;
    check_replicated(&replicated::coordinator_kill(BIN, Length::Short, g), g);
}

#[test]
fn chaos_replicated_partitions_added_mid_stream_are_read_at_least_once() {
    let g = Guarantee::AtLeastOnce;
    check_replicated(&replicated::added_partitions(BIN, Length::Short, g), g);
}

#[test]
fn chaos_replicated_partitions_added_mid_stream_are_read_exactly_once() {
    let g = Guarantee::ExactlyOnce;
    check_replicated(&replicated::added_partitions(BIN, Length::Short, g), g);
}

/// A topic that starts matching `source.topicPattern` while records flow is read from its
/// first record, under `startFrom: latest` too (the group has started: only what it read
/// at its first join starts at the end), and its outputs name it in the trace header. The
/// records it gets before the worker's next metadata refresh sees it are the ones a
/// start at its end would skip.
#[test]
fn chaos_a_topic_that_starts_matching_mid_stream_is_read_from_its_first_record() {
    use sluice_testkit::*;
    use std::time::Duration;
    let b = bootstrap();
    let base = unique("match");
    let (first, later, output) = (
        format!("{base}-a"),
        format!("{base}-b"),
        format!("{base}-out"),
    );
    create_topic_now(&first, 2);
    create_topic_now(&output, 2);
    let group = unique("match-g");
    let addr = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"pipeline: match
source:
  bootstrapServers: "{b}"
  topicPattern: "{base}-[ab]"
  groupId: {group}
  startFrom: latest
  sessionTimeout: 10s
  consumerProperties: {{topic.metadata.refresh.interval.ms: "3000"}}
sinks:
  - kafka: {{topic: {output}, traceHeader: sluice-source}}
commit: {{interval: 500ms, drainTimeout: 8s}}
server: {{listen: "{addr}"}}
"#
    );
    let mut w = WorkerProcess::start(BIN, &unique("match"), &config, &addr);
    // startFrom: latest: the group starts at the (empty) end of the first topic, committed.
    wait_for("the group's first commit", Duration::from_secs(60), || {
        offsets::committed_and_end(&b, &group, &first)
            .is_ok_and(|v| v.iter().all(|(c, _)| c.is_some()))
    });
    // Records flow into the first topic; mid-stream the second one appears and gets
    // records at once, before the worker's next metadata refresh (3 s) sees it.
    let spec = ProduceSpec {
        bootstrap: b.clone(),
        topic: first.clone(),
        from: 0,
        count: 3_000,
        rate: Some(500.0),
        size: 100,
        linger_ms: 5,
    };
    let flowing = std::thread::spawn(move || produce(&spec, &std::sync::atomic::AtomicU64::new(0)));
    std::thread::sleep(Duration::from_secs(2));
    create_topic_now(&later, 3);
    let spec = ProduceSpec {
        bootstrap: b.clone(),
        topic: later.clone(),
        from: 3_000,
        count: 2_000,
        rate: None,
        size: 100,
        linger_ms: 5,
    };
    produce(&spec, &std::sync::atomic::AtomicU64::new(0)).expect("produce the later topic");
    flowing
        .join()
        .expect("producer")
        .expect("produce the first topic");
    wait_for(
        "both topics committed to their end",
        Duration::from_secs(120),
        || uncommitted(&b, &group, &first) == 0 && uncommitted(&b, &group, &later) == 0,
    );
    w.signal("TERM");
    assert!(w.wait(Duration::from_secs(30)).expect("exits").success());
    let r = audit(&b, &output, 0, 5_000, Duration::from_secs(60)).unwrap();
    eprintln!("[chaos] topic added mid-stream: {r}");
    assert_eq!(r.missing, 0, "{r}");
    let sources: std::collections::BTreeSet<String> = read_all(&output, Duration::from_secs(30))
        .iter()
        .filter_map(|rec| {
            rec.headers
                .iter()
                .find(|(k, _)| k == "sluice-source")
                .and_then(|(_, v)| v.rsplitn(3, '/').nth(2).map(str::to_string))
        })
        .collect();
    assert_eq!(
        sources,
        [first, later].into_iter().collect(),
        "trace headers"
    );
}
