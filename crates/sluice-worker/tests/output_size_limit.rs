//! Outputs the output topic refuses (issue 19, R8 on the replicated cluster): over its
//! `max.message.bytes`, or without a key on a compacted topic. The broker refuses a whole
//! produce batch for either, so such an output sent to it takes its batch-mates down
//! (at-least-once: dead-lettered with it; exactly-once: the window aborted whole, again and
//! again under load). The worker refuses such an output itself, before it joins a batch or
//! a transaction: only it is dead-lettered, every other output is delivered once, and
//! exactly-once windows keep committing.

use std::collections::HashMap;
use std::time::Duration;

use sluice_testkit::*;

/// The topic limit of the output, as in R8.
const LIMIT: usize = 100_000;
/// Records offered; every `EVERY`th is over the limit.
const RECORDS: usize = 4_000;
const EVERY: usize = 100;

/// The worker under test: this build's, or `SLUICE_TEST_WORKER_BIN` (e.g. an older build,
/// to show what it does here).
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

/// What makes every `EVERY`th output one the topic refuses.
#[derive(Clone, Copy, PartialEq)]
enum Refused {
    /// 150 KB against the topic's `max.message.bytes` of `LIMIT`.
    TooLarge,
    /// No key, to a compacted topic.
    Keyless,
}

impl Refused {
    /// The dead-letter class the worker gives it.
    fn class(self) -> &'static str {
        match self {
            Refused::TooLarge => "record_too_large",
            Refused::Keyless => "invalid_record",
        }
    }
}

/// Whether record `i` is one the topic refuses.
fn refused(i: usize) -> bool {
    i % EVERY == EVERY - 1
}

/// The record offered at `i`: a small one, or (every `EVERY`th, for `TooLarge`) one of
/// 150 KB.
fn record(i: usize, case: Refused) -> Vec<u8> {
    let mut v = format!("r{i:06}:").into_bytes();
    if refused(i) && case == Refused::TooLarge {
        v.resize(150_000, b'x');
    }
    v
}

/// A backlog of `RECORDS` records (so the worker's produce batches are full ones) through
/// a worker with `guarantee`; returns what the output and the dead-letter topic hold
/// (read_committed) and the worker's log.
fn relay(guarantee: &str, case: Refused) -> (Vec<ReadRecord>, Vec<ReadRecord>, String) {
    let tag = format!(
        "{}-{guarantee}",
        match case {
            Refused::TooLarge => "size",
            Refused::Keyless => "keyless",
        }
    );
    let (input, output, dlq, group) = (
        unique(&format!("{tag}-in")),
        unique(&format!("{tag}-out")),
        unique(&format!("{tag}-dlq")),
        unique(&format!("{tag}-g")),
    );
    block_on(create_topic(&bootstrap(), &input, 4)).unwrap();
    block_on(create_topic(&bootstrap(), &dlq, 1)).unwrap();
    match case {
        Refused::TooLarge => topic_with(&output, 2, &[("max.message.bytes", &LIMIT.to_string())]),
        Refused::Keyless => topic_with(&output, 2, &[("cleanup.policy", "compact")]),
    }
    produce_records(
        &input,
        (0..RECORDS).map(|i| TestRecord {
            partition: Some((i % 4) as i32),
            key: (case == Refused::TooLarge || !refused(i)).then(|| format!("k{i}")),
            value: record(i, case),
            tombstone: false,
        }),
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "pipeline: sizes\nsource:\n  bootstrapServers: \"{}\"\n  topic: {input}\n  groupId: {group}\nsinks: [{{kafka: {{topic: {output}}}}}]\ndeadLetter: {{topic: {dlq}}}\ndelivery: {{guarantee: {guarantee}}}\ncommit: {{drainTimeout: 5s}}\nserver: {{listen: \"{addr}\"}}\n",
        bootstrap()
    );
    let mut w = WorkerProcess::start(&bin(), &unique(&tag), &cfg, &addr);
    poll(
        "every input record committed (exactly-once: windows keep committing)",
        Duration::from_secs(120),
        || {
            if let Some(st) = w.wait(Duration::ZERO) {
                panic!("the worker exited ({st}):\n{}", w.log_tail(40));
            }
            match uncommitted(&bootstrap(), &group, &input) {
                0 => Ok(()),
                n => Err(format!("{n} uncommitted\n{}", w.log_tail(10))),
            }
        },
    );
    let out = read_all(&output, Duration::from_secs(60));
    let letters = read_all(&dlq, Duration::from_secs(60));
    w.signal("TERM");
    assert!(w.wait(Duration::from_secs(30)).is_some_and(|s| s.success()));
    let log = std::fs::read_to_string(&w.log).unwrap_or_default();
    (out, letters, log)
}

/// Only the refused records are dead-lettered (with `case`'s class), each once; every
/// other record is in the output exactly once.
fn assert_only_the_refused_are_dead_lettered(
    out: &[ReadRecord],
    letters: &[ReadRecord],
    case: Refused,
) {
    let expected: Vec<usize> = (0..RECORDS).filter(|&i| refused(i)).collect();
    let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
    for r in out {
        *seen.entry(r.value.clone().unwrap_or_default()).or_default() += 1;
    }
    let twice = seen.values().filter(|&&n| n > 1).count();
    assert_eq!(twice, 0, "outputs delivered more than once");
    let missing = (0..RECORDS)
        .filter(|&i| !refused(i) && !seen.contains_key(&record(i, case)))
        .count();
    assert_eq!(
        missing, 0,
        "outputs the topic takes not in the output topic"
    );
    assert_eq!(
        out.len(),
        RECORDS - expected.len(),
        "the output holds every record the topic takes, once, and nothing else"
    );
    // A letter is named by its value's prefix (`r000099:`): keyless ones have no key.
    let mut names: Vec<String> = letters
        .iter()
        .map(|l| {
            let v = l.value.as_deref().unwrap_or_default();
            String::from_utf8_lossy(&v[..v.len().min(8)]).into_owned()
        })
        .collect();
    names.sort();
    let want: Vec<String> = expected.iter().map(|i| format!("r{i:06}:")).collect();
    assert_eq!(
        names.len(),
        want.len(),
        "dead letters: only the refused records, once each (batch-mates dead-lettered?)"
    );
    assert_eq!(names, want, "the dead letters are the refused records");
    for l in letters {
        assert_eq!(l.header("sluice.error.class"), Some(case.class()), "{l:?}");
    }
}

/// No exactly-once window was aborted: nothing refused reached the broker.
fn assert_no_abort(log: &str) {
    let aborts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("window is aborted"))
        .collect();
    assert!(aborts.is_empty(), "windows were aborted:\n{aborts:#?}");
}

/// At-least-once: an oversized output's batch-mates are produced, not dead-lettered.
#[test]
fn at_least_once_only_outputs_over_the_topic_limit_are_dead_lettered() {
    let (out, letters, _) = relay("at-least-once", Refused::TooLarge);
    assert_only_the_refused_are_dead_lettered(&out, &letters, Refused::TooLarge);
}

/// Exactly-once: an oversized output never reaches the broker, so it never aborts a
/// window; it is dead-lettered in the window's own transaction and every window commits.
#[test]
fn exactly_once_outputs_over_the_topic_limit_are_dead_lettered_without_an_abort() {
    let (out, letters, log) = relay("exactly-once", Refused::TooLarge);
    assert_only_the_refused_are_dead_lettered(&out, &letters, Refused::TooLarge);
    assert_no_abort(&log);
}

/// At-least-once, a compacted output topic: a keyless output is dead-lettered alone.
/// Before, the broker refused its produce batch, librdkafka reported the batch-mates as
/// `_INVALID_DIFFERENT_RECORD`, and they were dead-lettered with it (`retries_exhausted`).
#[test]
fn at_least_once_only_keyless_outputs_to_a_compacted_topic_are_dead_lettered() {
    let (out, letters, _) = relay("at-least-once", Refused::Keyless);
    assert_only_the_refused_are_dead_lettered(&out, &letters, Refused::Keyless);
}

/// Exactly-once, a compacted output topic: a keyless output never reaches the broker,
/// so no window is aborted to search for it.
#[test]
fn exactly_once_keyless_outputs_to_a_compacted_topic_are_dead_lettered_without_an_abort() {
    let (out, letters, log) = relay("exactly-once", Refused::Keyless);
    assert_only_the_refused_are_dead_lettered(&out, &letters, Refused::Keyless);
    assert_no_abort(&log);
}
