//! The Kubernetes cluster the end-to-end suite runs on, reached like the broker: an external
//! one when `SLUICE_E2E_KUBECONFIG` is set, otherwise the local single-node cluster of
//! `scripts/cluster.sh` (brought up here if it is not running) with the images of
//! `scripts/images.sh` imported into it.
//!
//! External cluster variables: `SLUICE_E2E_KUBECONFIG`, `SLUICE_E2E_BOOTSTRAP` (Kafka as the
//! pods see it), `SLUICE_E2E_CONTROLLER_IMAGE`, `SLUICE_E2E_WORKER_IMAGE`,
//! `SLUICE_E2E_ENRICH_IMAGE`, `SLUICE_E2E_BENCH_IMAGE`, `SLUICE_E2E_PROMETHEUS_IMAGE` (repository:tag each),
//! `SLUICE_E2E_PROMETHEUS_VERSION` and, for the operator's own images,
//! `SLUICE_E2E_PROMETHEUS_OPERATOR_IMAGE`, `SLUICE_E2E_CONFIG_RELOADER_IMAGE`; the test
//! itself reaches Kafka through `SLUICE_TEST_BOOTSTRAP` (e.g. a port-forward).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::{bootstrap, repo_root, run_ok, tool};

/// A cluster to run the user's path on.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// Kafka's bootstrap address as the pods see it.
    pub pod_bootstrap: String,
    /// Controller image (repository:tag).
    pub controller_image: String,
    /// Stock worker image.
    pub worker_image: String,
    /// The custom-processor example's image (examples/enrich-worker).
    pub enrich_image: String,
    /// sluice-loadgen's `sluice-bench` (its `http-receiver` is an HTTP service in the
    /// cluster).
    pub bench_image: String,
    /// A Prometheus server image with Kubernetes service discovery.
    pub prometheus_image: String,
    /// Its version, as the Prometheus Operator wants it (`v3.5.0`).
    pub prometheus_version: String,
    /// The Prometheus Operator's image and its config reloader's.
    pub prometheus_operator_image: String,
    /// The config reloader sidecar's image.
    pub config_reloader_image: String,
    /// Whether this is the local cluster of scripts/cluster.sh.
    pub local: bool,
}

impl Cluster {
    /// `kubectl` against this cluster.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(tool("kubectl"));
        c.arg("--kubeconfig").arg(&self.kubeconfig);
        c
    }

    /// `helm` against this cluster.
    pub fn helm(&self) -> Command {
        let mut c = Command::new(tool("helm"));
        c.arg("--kubeconfig").arg(&self.kubeconfig);
        c
    }

    /// Run `kubectl ARGS`, panic on failure, return stdout.
    pub fn k(&self, args: &[&str]) -> String {
        run_ok(self.kubectl().args(args))
    }

    /// Run `kubectl ARGS`; `None` when it fails (e.g. the object does not exist).
    pub fn k_opt(&self, args: &[&str]) -> Option<String> {
        let out = self.kubectl().args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -` with `yaml` on stdin.
    pub fn apply(&self, yaml: &str) -> String {
        self.stdin(&["apply", "-f", "-"], yaml)
    }

    /// `kubectl ARGS` with `input` on stdin; panic on failure.
    pub fn stdin(&self, args: &[&str], input: &str) -> String {
        use std::io::Write;
        let mut child = self
            .kubectl()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
        let out = child.wait_with_output().expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed:\n{}\n{input}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl get KIND NAME -n NS -o jsonpath=PATH`, or "" when it does not exist.
    pub fn jsonpath(&self, ns: &str, what: &str, path: &str) -> String {
        self.k_opt(&["get", "-n", ns, what, "-o", &format!("jsonpath={path}")])
            .unwrap_or_default()
    }

    /// Print what explains a failed step: the pods, and per namespace in `namespaces` its
    /// recent events and the last log lines of each of its pods; then whether this host
    /// reaches Kafka where the pods are told to. Best effort: a failing command prints
    /// its error and the rest still runs.
    pub fn diagnose(&self, namespaces: &[&str]) {
        let show = |title: &str, args: &[&str]| match self.kubectl().args(args).output() {
            Ok(o) => eprintln!(
                "[diagnose] {title}:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("[diagnose] {title}: cannot run kubectl: {e}"),
        };
        show("pods", &["get", "pods", "-A", "-o", "wide"]);
        for ns in namespaces {
            show(
                &format!("events in {ns}"),
                &["get", "events", "-n", ns, "--sort-by=.lastTimestamp"],
            );
            let pods = self
                .k_opt(&["get", "pods", "-n", ns, "-o", "name"])
                .unwrap_or_default();
            for pod in pods.lines().filter(|l| !l.is_empty()) {
                show(
                    &format!("logs of {ns}/{pod} (last 40 lines)"),
                    &["logs", "-n", ns, pod, "--all-containers", "--tail=40"],
                );
            }
        }
        eprintln!(
            "[diagnose] this host {} Kafka's address for pods, {}",
            if accepts(&self.pod_bootstrap, Duration::from_secs(3)) {
                "reaches"
            } else {
                "does NOT reach"
            },
            self.pod_bootstrap
        );
    }

    /// Poll until every object in `what` has the condition `ty` with status `True`
    /// ([`crate::wait_condition`]).
    pub fn wait_condition(&self, ns: Option<&str>, what: &[&str], ty: &str, timeout: Duration) {
        crate::wait_condition(&|| self.kubectl(), ns, what, ty, timeout)
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The cluster under test (set up once per test process).
pub fn cluster() -> Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(|| {
        if let Some(k) = env("SLUICE_E2E_KUBECONFIG") {
            eprintln!("[testkit] cluster: external, SLUICE_E2E_KUBECONFIG={k}");
            let need = |n: &str| env(n).unwrap_or_else(|| panic!("{n} must be set with SLUICE_E2E_KUBECONFIG"));
            return Cluster {
                kubeconfig: PathBuf::from(k),
                pod_bootstrap: need("SLUICE_E2E_BOOTSTRAP"),
                controller_image: need("SLUICE_E2E_CONTROLLER_IMAGE"),
                worker_image: need("SLUICE_E2E_WORKER_IMAGE"),
                enrich_image: need("SLUICE_E2E_ENRICH_IMAGE"),
                bench_image: need("SLUICE_E2E_BENCH_IMAGE"),
                prometheus_image: need("SLUICE_E2E_PROMETHEUS_IMAGE"),
                prometheus_version: need("SLUICE_E2E_PROMETHEUS_VERSION"),
                prometheus_operator_image: need("SLUICE_E2E_PROMETHEUS_OPERATOR_IMAGE"),
                config_reloader_image: need("SLUICE_E2E_CONFIG_RELOADER_IMAGE"),
                local: false,
            };
        }
        if std::env::var("SLUICE_TEST_BOOTSTRAP").is_ok() {
            panic!("the local cluster's pods reach only the local broker; with SLUICE_TEST_BOOTSTRAP set, also set SLUICE_E2E_KUBECONFIG and SLUICE_E2E_BOOTSTRAP");
        }
        let scripts = repo_root().join("scripts");
        let sh = |script: &str, args: &[&str]| {
            let mut cmd = Command::new("bash");
            cmd.arg(scripts.join(script)).args(args).stderr(Stdio::inherit());
            // The variables `cargo test` sets for this process would make the scripts' own
            // `cargo build` see a changed environment and rebuild the release binaries.
            for (k, _) in std::env::vars_os() {
                let k = k.to_string_lossy().into_owned();
                let keep = matches!(k.as_str(), "CARGO_HOME" | "CARGO_TARGET_DIR");
                if !keep && (k.starts_with("CARGO") || k == "LD_LIBRARY_PATH") {
                    cmd.env_remove(&k);
                }
            }
            run_ok(&mut cmd)
        };
        // The broker first: it adds the listener pods use on the cluster's bridge.
        let b = bootstrap();
        sh("cluster.sh", &["up"]);
        sh("images.sh", &["load"]);
        let kubeconfig = PathBuf::from(sh("cluster.sh", &["kubeconfig"]).trim());
        let port: u16 = b
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("broker port");
        ensure_pod_listener(port + 8, &|action| {
            sh("kafka.sh", &[action]);
        });
        let tag = env("SLUICE_IMAGE_TAG").unwrap_or_else(|| "dev".into());
        let image = |n: &str| format!("sluice.local/{n}:{tag}");
        eprintln!("[testkit] cluster: local single node (scripts/cluster.sh), kubeconfig {}", kubeconfig.display());
        Cluster {
            kubeconfig,
            pod_bootstrap: format!("{BRIDGE_ADDR}:{}", port + 8),
            controller_image: image("sluice-controller"),
            worker_image: image("sluice-worker"),
            enrich_image: image("sluice-enrich-worker"),
            bench_image: image("sluice-bench"),
            prometheus_image: image("prometheus"),
            prometheus_version: sh("images.sh", &["prometheus-version"]).trim().to_string(),
            prometheus_operator_image: image("prometheus-operator"),
            config_reloader_image: image("prometheus-config-reloader"),
            local: true,
        }
    })
    .clone()
}

/// The cluster bridge's address, where the local broker has its listener for pods
/// (`scripts/kafka.sh`, port + 8) and the API server its address (`scripts/cluster.sh`).
pub const BRIDGE_ADDR: &str = "10.244.0.1";

/// Whether `addr` accepts a TCP connection within `timeout`.
fn accepts(addr: &str, timeout: Duration) -> bool {
    addr.parse()
        .ok()
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, timeout).is_ok())
}

/// The local broker adds its listener for pods only when the cluster's bridge exists as it
/// starts (`scripts/kafka.sh` makes it with `scripts/cluster.sh net`, which needs root; a
/// failure there leaves the listener out with one line of log). Without it every pod's
/// connection is refused and the suite would fail minutes later with `KafkaUnavailable`:
/// check it here, restart the broker with it (a restart keeps the data) when it is missing,
/// and say plainly what is wrong when that does not help.
fn ensure_pod_listener(port: u16, kafka_sh: &dyn Fn(&str)) {
    let addr = format!("{BRIDGE_ADDR}:{port}");
    if accepts(&addr, Duration::from_secs(3)) {
        return;
    }
    eprintln!(
        "[testkit] the local broker has no listener for pods on {addr} (started before the cluster's bridge existed?): restarting it (scripts/kafka.sh restart keeps its data)"
    );
    kafka_sh("restart");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !accepts(&addr, Duration::from_secs(3)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the local broker still has no listener for pods on {addr} after a restart: see the broker's log (scripts/kafka.sh) for its `listeners=` and `scripts/cluster.sh net`"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("[testkit] the broker's listener for pods on {addr} accepts connections");
}

/// Split `repository:tag`.
pub fn split_image(image: &str) -> (String, String) {
    image
        .rsplit_once(':')
        .map(|(r, t)| (r.to_string(), t.to_string()))
        .unwrap_or_else(|| panic!("{image}: expected repository:tag"))
}
