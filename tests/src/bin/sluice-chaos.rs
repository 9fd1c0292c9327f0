//! `sluice-chaos`: run the fault scenarios against real worker processes and print the
//! reliability table. `make chaos` runs it with `--full` (the figures in RELIABILITY.md).
//!
//! ```text
//! sluice-chaos [--full] [--worker PATH] [SCENARIO...]
//! sluice-chaos --replicated [--full] [--worker PATH] [SCENARIO...]
//! sluice-chaos --bench [--rate N] [--worker PATH]
//! ```
//! `--replicated` runs the scenarios on a three-node cluster (`scripts/kafka-cluster.sh`),
//! each under both delivery guarantees: leader-kill, coordinator-kill, rolling-restart,
//! two-down, added-partitions, txn-upstream, db-outage, refused-outputs, panic.
//! `--bench` measures throughput and end-to-end latency while scenarios 1 and 5 happen,
//! next to the same run's steady state (`make bench` puts the table in BENCHMARKS.md).
//! Scenarios: sigkill, broker, kafka-output, postgres, poison, storm, slow, sigterm,
//! sigstop, broker-away, reassign, memory, slow-acks, eos-sigkill, eos-broker, eos-storm
//! (default: all).

use sluice_testkit::chaos::{self, Length, TABLE_HEADER};

fn main() -> std::process::ExitCode {
    let mut len = Length::Short;
    let mut worker = sluice_testkit::repo_root().join("target/release/sluice-worker");
    let mut only: Vec<String> = Vec::new();
    let mut bench = false;
    let mut replicated = false;
    let mut rate = 20_000.0;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--full" => len = Length::Full,
            "--bench" => bench = true,
            "--replicated" => replicated = true,
            "--rate" => {
                rate = args
                    .next()
                    .and_then(|r| r.parse().ok())
                    .expect("--rate RECORDS_PER_SECOND")
            }
            "--worker" => worker = args.next().expect("--worker PATH").into(),
            "-h" | "--help" => {
                let names: Vec<&str> = chaos::SCENARIOS.iter().map(|(n, _)| *n).collect();
                println!(
                    "sluice-chaos [--full] [--worker PATH] [{} ...]\nsluice-chaos --bench [--rate N] [--worker PATH]",
                    names.join("|")
                );
                return std::process::ExitCode::SUCCESS;
            }
            s => only.push(s.to_string()),
        }
    }
    let known = |o: &String| {
        if replicated {
            chaos::replicated::SCENARIOS.iter().any(|(n, _)| n == o)
        } else {
            chaos::SCENARIOS.iter().any(|(n, _)| n == o)
        }
    };
    if let Some(bad) = only.iter().find(|o| !known(o)) {
        eprintln!("sluice-chaos: no scenario named {bad:?} (see --help)");
        return std::process::ExitCode::from(2);
    }
    let bin = worker.to_string_lossy().to_string();
    assert!(
        worker.is_file(),
        "no worker binary at {bin} (cargo build --release -p sluice-worker)"
    );
    if bench {
        let mut lost = 0;
        let mut rows = Vec::new();
        for run in [chaos::bench_sigkill, chaos::bench_storm] {
            let b = run(&bin, rate);
            eprintln!("[chaos] {}", b.rows());
            lost += b.lost;
            rows.push(b);
        }
        println!("{}", chaos::FAULT_BENCH_HEADER);
        for b in &rows {
            println!("{}", b.rows());
        }
        for b in &rows {
            println!(
                "\n{}: lost {}, duplicates {}; during faults {:.2}x the steady delivered/s, p99 {:.1}x the steady p99",
                b.name,
                b.lost,
                b.duplicates,
                b.faults.rate / b.steady.rate,
                b.faults.p99_ms / b.steady.p99_ms
            );
        }
        return if lost > 0 {
            std::process::ExitCode::FAILURE
        } else {
            std::process::ExitCode::SUCCESS
        };
    }
    if replicated {
        use chaos::replicated::{Guarantee, SCENARIOS, TABLE_HEADER};
        let mut rows = Vec::new();
        for (name, run) in SCENARIOS {
            if !only.is_empty() && !only.iter().any(|o| o == name) {
                continue;
            }
            for g in [Guarantee::AtLeastOnce, Guarantee::ExactlyOnce] {
                eprintln!("[chaos] running {name}, {g:?} ({len:?})");
                let m = run(&bin, len, g);
                eprintln!("[chaos] {}", m.row());
                rows.push(m);
            }
        }
        println!("{TABLE_HEADER}");
        for r in &rows {
            println!("{}", r.row());
        }
        let lost: u64 = rows.iter().map(|r| r.outcome.lost).sum();
        return if lost > 0 {
            eprintln!("[chaos] {lost} records LOST");
            std::process::ExitCode::FAILURE
        } else {
            std::process::ExitCode::SUCCESS
        };
    }
    let mut rows = Vec::new();
    for (name, run) in chaos::SCENARIOS {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        eprintln!("[chaos] running {name} ({len:?})");
        let o = run(&bin, len);
        eprintln!("[chaos] {}", o.row());
        rows.push(o);
    }
    println!("{TABLE_HEADER}");
    for r in &rows {
        println!("{}", r.row());
    }
    let lost: u64 = rows.iter().map(|r| r.lost).sum();
    if lost > 0 {
        eprintln!("[chaos] {lost} records LOST");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
