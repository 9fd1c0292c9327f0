//! `sluice-chaos`: run the fault scenarios against real worker processes and print the
//! reliability table. `make chaos` runs it with `--full` (the figures in RELIABILITY.md).
//!
//! ```text
//! sluice-chaos [--full] [--worker PATH] [SCENARIO...]
//! ```
//! Scenarios: sigkill, broker, kafka-output, postgres, poison, storm, slow, sigterm
//! (default: all).

use sluice_testkit::chaos::{self, Length, TABLE_HEADER};

fn main() -> std::process::ExitCode {
    let mut len = Length::Short;
    let mut worker = sluice_testkit::repo_root().join("target/release/sluice-worker");
    let mut only: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--full" => len = Length::Full,
            "--worker" => worker = args.next().expect("--worker PATH").into(),
            "-h" | "--help" => {
                let names: Vec<&str> = chaos::SCENARIOS.iter().map(|(n, _)| *n).collect();
                println!(
                    "sluice-chaos [--full] [--worker PATH] [{} ...]",
                    names.join("|")
                );
                return std::process::ExitCode::SUCCESS;
            }
            s => only.push(s.to_string()),
        }
    }
    if let Some(bad) = only
        .iter()
        .find(|o| !chaos::SCENARIOS.iter().any(|(n, _)| n == o))
    {
        eprintln!("sluice-chaos: no scenario named {bad:?} (see --help)");
        return std::process::ExitCode::from(2);
    }
    let bin = worker.to_string_lossy().to_string();
    assert!(
        worker.is_file(),
        "no worker binary at {bin} (cargo build --release -p sluice-worker)"
    );
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
