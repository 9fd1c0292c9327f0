//! A real Prometheus (Debian's package) on loopback scrapes a worker running a pipeline
//! against the test broker: the key series exist and move, and every PromQL expression of
//! every dashboard panel and alert rule parses and evaluates; the core panels return data.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde_json::Value;
use sluice_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_sluice-worker");

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn query(addr: &str, q: &str) -> Value {
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let body = http_get(addr, &format!("/api/v1/query?query={enc}")).unwrap_or_default();
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

fn result_len(v: &Value) -> usize {
    v["data"]["result"].as_array().map_or(0, |a| a.len())
}

fn first_value(v: &Value) -> f64 {
    v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn prometheus_scrapes_the_worker_and_every_dashboard_and_alert_expression_evaluates() {
    let prom = which("prometheus")
        .expect("prometheus not found: scripts/setup.sh installs Debian's prometheus package");
    let b = bootstrap();
    let (input, output, group) = pipeline_topics("prom", 4);
    let spec = ProduceSpec {
        bootstrap: b.clone(),
        topic: input.clone(),
        from: 0,
        count: 200_000,
        rate: Some(10_000.0),
        size: 100,
        linger_ms: 5,
    };
    let producer = std::thread::spawn(move || produce(&spec, &AtomicU64::new(0)).unwrap());
    let waddr = format!("127.0.0.1:{}", free_port());
    let _worker = WorkerProcess::start(
        BIN,
        &unique("prom-worker"),
        &worker_config(&b, &input, &output, &group, &waddr, ""),
        &waddr,
    );

    let dir = std::env::temp_dir().join(unique("prometheus"));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = repo_root().join("charts/sluice/rules/sluice.rules.yaml");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [\"{}\"]\nscrape_configs:\n  - job_name: sluice-worker\n    static_configs:\n      - targets: [\"{waddr}\"]\n        labels: {{namespace: sluice-test, pod: worker-0}}\n",
            rules.display()
        ),
    )
    .unwrap();
    let paddr = format!("127.0.0.1:{}", free_port());
    let _prom = Prometheus(
        Command::new(prom)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={paddr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus"),
    );

    // Throughput, lag and latency series exist and move.
    wait_for(
        "consumed records to be scraped",
        Duration::from_secs(90),
        || first_value(&query(&paddr, "sum(sluice_messages_consumed_total)")) > 1000.0,
    );
    wait_for("a positive consume rate", Duration::from_secs(60), || {
        first_value(&query(
            &paddr,
            "sum(rate(sluice_messages_consumed_total[10s]))",
        )) > 0.0
    });
    wait_for(
        "lag series (statistics every 5 s)",
        Duration::from_secs(60),
        || result_len(&query(&paddr, "sluice_consumer_lag")) >= 4,
    );
    wait_for(
        "end-to-end latency histogram",
        Duration::from_secs(60),
        || {
            first_value(&query(
                &paddr,
                "sum(rate(sluice_end_to_end_latency_seconds_count[10s]))",
            )) > 0.0
        },
    );
    let before = first_value(&query(&paddr, "sum(sluice_messages_delivered_total)"));
    wait_for("delivered to keep moving", Duration::from_secs(30), || {
        first_value(&query(&paddr, "sum(sluice_messages_delivered_total)")) > before
    });

    // Every dashboard expression and every rule expression parses and evaluates.
    let mut exprs: Vec<(String, String)> = Vec::new();
    for name in ["sluice-pipeline.json", "sluice-controller.json"] {
        let board: Value = serde_json::from_str(
            &std::fs::read_to_string(repo_root().join("grafana").join(name)).unwrap(),
        )
        .unwrap();
        for p in board["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().cloned().unwrap_or_default() {
                let e = t["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$namespace", ".*")
                    .replace("$pipeline", ".*");
                exprs.push((format!("{name}: {}", p["title"]), e));
            }
        }
    }
    let rule_file: Value = serde_yaml::from_str(&std::fs::read_to_string(&rules).unwrap()).unwrap();
    for g in rule_file["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let name = r["alert"]
                .as_str()
                .or(r["record"].as_str())
                .unwrap()
                .to_string();
            exprs.push((
                format!("rule {name}"),
                r["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    for (what, e) in &exprs {
        let v = query(&paddr, e);
        assert_eq!(v["status"], "success", "{what}: {e} -> {v}");
    }
    // The core pipeline panels return data from this single worker.
    let core = [
        "Records in / out",
        "End-to-end latency p50 / p99",
        "Lag per partition",
        "Total lag",
        "Paused / stalled partitions",
        "Memory per pod",
    ];
    for (what, e) in &exprs {
        if core.iter().any(|c| what.ends_with(&format!("\"{c}\""))) {
            wait_for(&format!("data for {what}"), Duration::from_secs(30), || {
                result_len(&query(&paddr, e)) > 0
            });
        }
    }
    // Recording rules evaluate on the live series.
    wait_for("sluice:lag:sum", Duration::from_secs(30), || {
        result_len(&query(&paddr, "sluice:lag:sum")) > 0
    });
    producer.join().unwrap();
}
