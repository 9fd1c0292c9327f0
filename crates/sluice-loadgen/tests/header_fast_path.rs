//! sluice reads the headers of a record without any without an allocation: the librdkafka
//! header-count fast path of the vendored rdkafka-sys (vendor/patches/README.md).
//!
//! A record without headers still carries a header count (one byte, 0). librdkafka 2.12.1
//! allocated and freed a parse buffer to read it (two mallocs, two frees, about 1,100
//! instructions) on every `rd_kafka_message_headers` call, which sluice's consume path
//! makes for every record (`RecordBatchBuilder::push` asks rust-rdkafka for the headers).
//! The vendored patch reads the count in place. This fails when the fast path is lost: a
//! librdkafka upgrade without it, or the vendored tree dropped too early.
//!
//! valgrind's callgrind collects exactly the instructions run inside
//! `rd_kafka_message_headers` (`--toggle-collect`) while `sluice-bench sluice-null` runs
//! the sluice pipeline over a topic of headerless records; no allocator function may be
//! among them. Deterministic: what runs inside that function depends only on the records'
//! header bytes. Needs valgrind (scripts/setup.sh) and the broker under test
//! (`SLUICE_TEST_BOOTSTRAP`, or the local one on `SLUICE_KAFKA_PORT`, default 9092, which
//! `make test` starts).

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

const BENCH: &str = env!("CARGO_BIN_EXE_sluice-bench");
/// Records in the topic, none with headers.
const RECORDS: u64 = 200;
/// glibc's allocator functions as callgrind names them.
const ALLOCATOR: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "free",
    "cfree",
    "__libc_malloc",
    "__libc_calloc",
    "__libc_realloc",
    "__libc_free",
    "_int_malloc",
    "_int_free",
    "sysmalloc",
];

fn bootstrap() -> String {
    std::env::var("SLUICE_TEST_BOOTSTRAP").unwrap_or_else(|_| {
        let port = std::env::var("SLUICE_KAFKA_PORT").unwrap_or_else(|_| "9092".into());
        format!("127.0.0.1:{port}")
    })
}

fn run(what: &str, cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .env("SLUICE_BOOTSTRAP", bootstrap())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn sluice_reads_the_headers_of_a_record_without_any_without_allocating() {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let topic = format!("header-fast-path-{}-{nanos}", std::process::id());
    let count = RECORDS.to_string();
    run(
        "preload",
        Command::new(BENCH).args(["preload", "--topic", &topic, "--count", &count]),
    );

    let profile_path = std::env::temp_dir().join(format!("{topic}.callgrind"));
    run(
        "sluice-null under callgrind",
        Command::new("valgrind").args([
            "--tool=callgrind",
            "--toggle-collect=rd_kafka_message_headers",
            &format!("--callgrind-out-file={}", profile_path.display()),
            BENCH,
            "sluice-null",
            "--topic",
            &topic,
            "--count",
            &count,
        ]),
    );
    let profile = std::fs::read_to_string(&profile_path).expect("callgrind's output");
    let _ = std::fs::remove_file(&profile_path);

    // Callgrind names each function with cost once, `fn=(id) name` (then `fn=(id)`), its
    // callees `cfn=(id) name`; with --toggle-collect only what ran inside the toggled
    // function has cost. `summary:` is the instructions collected.
    let mut functions: Vec<&str> = profile
        .lines()
        .filter_map(|l| l.strip_prefix("fn=").or_else(|| l.strip_prefix("cfn=")))
        .filter_map(|l| l.split_once(") ").map(|(_, name)| name))
        .collect();
    functions.sort_unstable();
    functions.dedup();
    let instructions: u64 = profile
        .lines()
        .find_map(|l| l.strip_prefix("summary:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    eprintln!(
        "[header-fast-path] inside rd_kafka_message_headers: {instructions} instructions for \
         {RECORDS} records, in {functions:?}"
    );
    assert!(
        functions
            .iter()
            .any(|f| f.starts_with("rd_kafka_message_headers")),
        "callgrind saw rd_kafka_message_headers run: {functions:?}"
    );
    // The callers of rd_kafka_message_headers are named too (call arcs into it), so match
    // the allocator's and librdkafka's buffer functions by their exact C names.
    let allocating: Vec<&str> = functions
        .iter()
        .copied()
        .filter(|f| {
            let name = f.split('\'').next().unwrap_or(f);
            ALLOCATOR.contains(&name)
                || name.starts_with("rd_kafka_buf_new")
                || name.starts_with("rd_buf_init")
        })
        .collect();
    assert!(
        allocating.is_empty(),
        "reading the headers of records without any allocated ({allocating:?}, \
         {instructions} instructions for {RECORDS} records): the header-count fast path of \
         vendor/patches/librdkafka-header-count-fast-path.patch is not in the librdkafka \
         sluice links"
    );
}
