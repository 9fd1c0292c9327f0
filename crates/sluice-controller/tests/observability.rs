//! Dashboards, alert rules (promtool) and the chart's monitoring objects.

use std::collections::HashSet;
use std::process::Command;

use serde_json::Value;
use sluice_testkit::{repo_root, run_ok, tool, which};

fn dashboards() -> Vec<(String, Value)> {
    let dir = repo_root().join("grafana");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: invalid JSON: {e}", p.display()));
            out.push((p.file_name().unwrap().to_string_lossy().into_owned(), v));
        }
    }
    assert!(out.len() >= 2, "pipeline and controller dashboards");
    out
}

fn exprs(board: &Value) -> Vec<String> {
    board["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn dashboards_have_unique_ids_a_datasource_variable_and_no_hard_coded_namespace() {
    for (name, board) in dashboards() {
        let vars: Vec<&str> = board["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert!(
            vars.contains(&"datasource") && vars.contains(&"namespace"),
            "{name}: variables {vars:?}"
        );
        let mut ids = HashSet::new();
        for p in board["panels"].as_array().unwrap() {
            assert!(
                ids.insert(p["id"].as_i64().unwrap()),
                "{name}: duplicate panel id {}",
                p["id"]
            );
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{name}: panel {} datasource",
                p["title"]
            );
            for t in p["targets"].as_array().unwrap() {
                assert_eq!(
                    t["datasource"]["uid"], "${datasource}",
                    "{name}: target datasource"
                );
                let e = t["expr"].as_str().unwrap();
                assert!(
                    !e.contains("namespace=\"") && !e.contains("namespace='"),
                    "{name}: hard-coded namespace in {e}"
                );
                assert!(
                    e.contains("$namespace"),
                    "{name}: {e} does not filter on $namespace"
                );
            }
        }
    }
}

#[test]
fn the_charts_dashboards_are_the_generated_ones() {
    let tmp = std::env::temp_dir().join(sluice_testkit::unique("dashboards"));
    run_ok(
        Command::new("python3")
            .arg(repo_root().join("scripts/gen_dashboards.py"))
            .arg(&tmp),
    );
    for (name, _) in dashboards() {
        let generated = std::fs::read_to_string(tmp.join(&name)).unwrap();
        for copy in [
            format!("grafana/{name}"),
            format!("charts/sluice/dashboards/{name}"),
        ] {
            assert!(
                std::fs::read_to_string(repo_root().join(&copy)).unwrap() == generated,
                "{copy} is stale: run `make dashboards`"
            );
        }
    }
}

fn promtool() -> Command {
    let p = which("promtool")
        .expect("promtool not found: scripts/setup.sh installs Debian's prometheus package");
    Command::new(p)
}

#[test]
fn promtool_checks_the_rules_and_every_alert_has_a_firing_and_a_quiet_test() {
    let rules = repo_root().join("charts/sluice/rules/sluice.rules.yaml");
    run_ok(promtool().args(["check", "rules"]).arg(&rules));
    run_ok(
        promtool()
            .current_dir(repo_root().join("tests/prometheus"))
            .args(["test", "rules", "sluice.rules.test.yaml"]),
    );
    // Every alert is exercised by the unit tests and has a runbook section.
    let text = std::fs::read_to_string(&rules).unwrap();
    let tests =
        std::fs::read_to_string(repo_root().join("tests/prometheus/sluice.rules.test.yaml"))
            .unwrap();
    let runbooks = std::fs::read_to_string(repo_root().join("docs/runbooks.md")).unwrap();
    let alerts: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 7, "{alerts:?}");
    for a in alerts {
        assert!(
            tests.contains(&format!("alertname: {a}")),
            "{a} has no promtool test"
        );
        assert!(
            runbooks.contains(&format!("## {a}")),
            "{a} has no runbook section"
        );
    }
}

#[test]
fn every_metric_used_by_dashboards_and_rules_is_in_the_catalog_and_emitted() {
    let root = repo_root();
    let catalog = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
    let mut source = String::new();
    for dir in ["crates/sluice-worker/src", "crates/sluice-controller/src"] {
        for e in walk(&root.join(dir)) {
            source.push_str(&std::fs::read_to_string(e).unwrap());
        }
    }
    let rules =
        std::fs::read_to_string(root.join("charts/sluice/rules/sluice.rules.yaml")).unwrap();
    let mut used: Vec<String> = dashboards().iter().flat_map(|(_, b)| exprs(b)).collect();
    used.push(rules);
    let re_name = |s: &str| -> Vec<String> {
        let mut out = Vec::new();
        let b = s.as_bytes();
        let mut i = 0;
        while let Some(pos) = s[i..].find("sluice_") {
            let start = i + pos;
            let mut end = start;
            while end < b.len() && (b[end].is_ascii_lowercase() || b[end] == b'_') {
                end += 1;
            }
            out.push(s[start..end].trim_end_matches("_bucket").to_string());
            i = end;
        }
        out
    };
    for name in used.iter().flat_map(|e| re_name(e)).collect::<HashSet<_>>() {
        assert!(
            catalog.contains(&format!("`{name}`")),
            "{name} is used but not in docs/metrics.md"
        );
        assert!(
            source.contains(&format!("\"{name}\"")),
            "{name} is used but no code emits it"
        );
    }
    for name in re_name(&source).into_iter().collect::<HashSet<_>>() {
        if source.contains(&format!("\"{name}\"")) {
            assert!(
                catalog.contains(&format!("`{name}`")),
                "{name} is emitted but not in docs/metrics.md"
            );
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

#[test]
fn with_monitoring_on_the_chart_renders_rules_dashboards_and_a_service_monitor() {
    let out = run_ok(
        Command::new(tool("helm"))
            .args(["template", "sluice"])
            .arg(repo_root().join("charts/sluice"))
            .args(["--set", "monitoring.serviceMonitor.enabled=true"])
            .args(["--set", "monitoring.prometheusRule.enabled=true"])
            .args(["--set", "monitoring.dashboards.enabled=true"]),
    );
    let docs: Vec<Value> = out
        .split("\n---")
        .filter_map(|d| serde_yaml::from_str::<Value>(d).ok())
        .filter(|v| v.is_object())
        .collect();
    let rule = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("PrometheusRule");
    let file: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("charts/sluice/rules/sluice.rules.yaml"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        rule["spec"]["groups"], file["groups"],
        "the PrometheusRule carries the tested rules verbatim"
    );
    let sm = docs
        .iter()
        .find(|d| d["kind"] == "ServiceMonitor")
        .expect("ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["honorLabels"], true);
    let boards: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap" && d["metadata"]["labels"]["grafana_dashboard"] == "1")
        .collect();
    assert_eq!(boards.len(), 2);
    for b in boards {
        for (_, v) in b["data"].as_object().unwrap() {
            serde_json::from_str::<Value>(v.as_str().unwrap())
                .expect("dashboard JSON survives templating");
        }
    }
}
