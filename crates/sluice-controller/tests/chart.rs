//! The Helm chart, the plain install and the examples, checked with real helm and kubectl
//! binaries and applied to the real kube-apiserver.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_testkit::{kubeconfig, repo_root, run_ok, tool, unique, wait_condition};

fn helm() -> Command {
    Command::new(tool("helm"))
}

fn kubectl() -> Command {
    let mut c = Command::new(tool("kubectl"));
    c.arg("--kubeconfig").arg(kubeconfig());
    c
}

fn chart() -> PathBuf {
    repo_root().join("charts/sluice")
}

fn template(ns: &str, extra: &[&str]) -> String {
    run_ok(
        helm()
            .args(["template", "sluice"])
            .arg(chart())
            .args(["--namespace", ns])
            .args(extra),
    )
}

fn docs(yaml: &str) -> Vec<serde_json::Value> {
    yaml.split("\n---")
        .filter_map(|d| serde_yaml::from_str::<serde_json::Value>(d).ok())
        .filter(|v| v.is_object())
        .collect()
}

fn kubectl_apply(ns: &str, yaml: &str, dry_run: bool) -> String {
    let mut cmd = kubectl();
    cmd.args(["apply", "-n", ns, "-f", "-"]);
    if dry_run {
        cmd.arg("--dry-run=server");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl apply failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn install_crd() {
    run_ok(
        kubectl()
            .args(["apply", "--server-side", "--force-conflicts", "-f"])
            .arg(repo_root().join("crds/streampipeline.yaml")),
    );
    wait_condition(
        &kubectl,
        None,
        &["crd/streampipelines.sluice.dev"],
        "Established",
        Duration::from_secs(60),
    );
}

fn namespace() -> String {
    let ns = unique("chart");
    run_ok(kubectl().args(["create", "namespace", &ns]));
    ns
}

#[test]
fn helm_lint_passes_with_and_without_monitoring() {
    run_ok(helm().arg("lint").arg(chart()));
    run_ok(
        helm()
            .arg("lint")
            .arg(chart())
            .args(["--set", "monitoring.serviceMonitor.enabled=true"]),
    );
}

#[test]
fn the_service_monitor_is_rendered_only_when_enabled() {
    let kinds = |extra: &[&str]| {
        docs(&template("sluice-system", extra))
            .iter()
            .map(|d| d["kind"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert!(!kinds(&[]).contains(&"ServiceMonitor".to_string()));
    let on = kinds(&["--set", "monitoring.serviceMonitor.enabled=true"]);
    assert!(on.contains(&"ServiceMonitor".to_string()), "{on:?}");
    for k in [
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
    ] {
        assert!(on.contains(&k.to_string()), "missing {k}");
    }
}

#[test]
fn the_chart_applies_to_a_real_api_server() {
    install_crd();
    let ns = namespace();
    let rendered = template(&ns, &[]);
    kubectl_apply(&ns, &rendered, true);
    let out = kubectl_apply(&ns, &rendered, false);
    assert!(
        out.contains("deployment.apps/sluice")
            && out.contains("clusterrole.rbac.authorization.k8s.io/sluice"),
        "{out}"
    );
}

#[test]
fn rbac_is_least_privilege() {
    let d = docs(&template("sluice-system", &[]));
    let role = d.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    let mut got: Vec<String> = Vec::new();
    for r in role["rules"].as_array().unwrap() {
        for g in r["apiGroups"].as_array().unwrap() {
            for res in r["resources"].as_array().unwrap() {
                let verbs: Vec<&str> = r["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap())
                    .collect();
                got.push(format!(
                    "{}/{}: {}",
                    g.as_str().unwrap(),
                    res.as_str().unwrap(),
                    verbs.join(",")
                ));
            }
        }
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            "/configmaps: get,list,watch,create,patch",
            "/pods: list,watch",
            "/secrets: get,list,watch",
            "/services: get,list,watch,create,patch",
            "apiextensions.k8s.io/customresourcedefinitions: get",
            "apps/deployments: get,list,watch,create,patch",
            "events.k8s.io/events: create,patch",
            "monitoring.coreos.com/servicemonitors: get,create,patch",
            "policy/poddisruptionbudgets: get,list,watch,create,patch",
            "sluice.dev/streampipelines/status: get,patch",
            "sluice.dev/streampipelines: get,list,watch",
        ]
    );
    for r in role["rules"].as_array().unwrap() {
        let s = r.to_string();
        assert!(!s.contains('*'), "no wildcards: {s}");
        assert!(
            !s.contains("delete"),
            "deletion is left to owner references: {s}"
        );
    }
    let lease_role = d.iter().find(|d| d["kind"] == "Role").unwrap();
    assert_eq!(lease_role["rules"][0]["resources"][0], "leases");
    assert_eq!(
        lease_role["rules"][1],
        serde_json::json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}),
        "the digests' key: made once, in the release namespace only"
    );
}

#[test]
fn the_controller_pod_is_locked_down() {
    let d = docs(&template("sluice-system", &[]));
    let dep = d.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
}

#[test]
fn generated_copies_are_fresh() {
    let root = repo_root();
    let crd = std::fs::read_to_string(root.join("crds/streampipeline.yaml")).unwrap();
    for copy in [
        "charts/sluice/crds/streampipeline.yaml",
        "manifests/install/crd.yaml",
    ] {
        assert!(
            std::fs::read_to_string(root.join(copy)).unwrap() == crd,
            "{copy} is stale: run `make crds`"
        );
    }
    let rendered = template("sluice-system", &[]);
    let checked_in = std::fs::read_to_string(root.join("manifests/install/sluice.yaml")).unwrap();
    assert!(
        checked_in == rendered,
        "manifests/install/sluice.yaml is stale: run `make manifests`"
    );
}

#[test]
fn the_plain_install_builds_and_applies() {
    install_crd();
    let out = run_ok(
        kubectl()
            .arg("kustomize")
            .arg(repo_root().join("manifests/install")),
    );
    let kinds: Vec<String> = docs(&out)
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(
        kinds.contains(&"Namespace".to_string())
            && kinds.contains(&"CustomResourceDefinition".to_string()),
        "{kinds:?}"
    );
    // A real apply: the namespace must exist before the objects in it.
    kubectl_apply("sluice-system", &out, false);
    run_ok(kubectl().args(["get", "deployment/sluice", "-n", "sluice-system"]));
}

#[test]
fn every_example_is_accepted_and_renders_a_valid_worker_config() {
    install_crd();
    let ns = namespace();
    let dir = repo_root().join("manifests/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        kubectl_apply(&ns, &text, true);
        for d in docs(&text)
            .into_iter()
            .filter(|d| d["kind"] == "StreamPipeline")
        {
            let sp: sluice_api::crd::StreamPipeline = serde_json::from_value(d).unwrap();
            let config = sp
                .worker_config()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // What the ConfigMap holds is what the worker reads back.
            let parsed = sluice_api::WorkerConfig::from_yaml(&config.to_yaml())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(parsed, config, "{}", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 4, "examples found: {seen}");
}
