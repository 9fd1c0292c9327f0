//! The user's whole path on a real Kubernetes node: `helm install` the chart, `kubectl apply`
//! a StreamPipeline from manifests/examples, records flow through worker pods, the
//! controller scales on lag and back, pods are deleted and rolled mid-stream, the pipeline
//! is paused and resumed, it idles to zero pods and wakes on new records, the leader
//! controller is deleted, the pipeline is deleted and its
//! children are garbage-collected, and Prometheus scrapes what the ServiceMonitors select.
//!
//! It runs on the local single-node cluster of scripts/cluster.sh (started by the testkit
//! when it is not up, with images from scripts/images.sh), or on any cluster given by
//! `SLUICE_E2E_KUBECONFIG` (see `sluice_testkit::cluster`). Each step prints how long it
//! took; the autoscaling timeline is also written to target/e2e/autoscaling.md and the
//! scale-to-zero wake times to target/e2e/scale-to-zero.md.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_testkit::cluster::{cluster, split_image, Cluster};
use sluice_testkit::{
    audit, bootstrap, create_topic, poll, repo_root, run_ok, uncommitted, unique, wait_for,
    AuditReport, ProduceSpec,
};

const PARTITIONS: i32 = 4;
const POLL: u64 = 5;
const LAG_PER_REPLICA: u64 = 2_000;
const STABILIZATION: u64 = 30;
const RELEASE_NS: &str = "sluice-system";
/// `scaling.idleAfter` of the scale-to-zero step.
const IDLE_AFTER: u64 = 10;
/// Wake cycles (idle -> 0 pods -> produce -> pods -> drained) the scale-to-zero step runs.
const WAKES: u64 = 5;
/// Records produced to wake the pipeline in each cycle.
const WAKE_RECORDS: u64 = 600;

fn step<T>(name: &str, f: impl FnOnce() -> T) -> T {
    eprintln!("[e2e] {name} ...");
    let t = Instant::now();
    let r = f();
    eprintln!("[e2e] {name}: done in {:.1}s", t.elapsed().as_secs_f64());
    r
}

/// Prints the cluster's state ([`Cluster::diagnose`]) when the test fails while it lives.
struct DiagnoseOnPanic<'c> {
    c: &'c Cluster,
    namespaces: Vec<String>,
}

impl Drop for DiagnoseOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let ns: Vec<&str> = self.namespaces.iter().map(String::as_str).collect();
            self.c.diagnose(&ns);
        }
    }
}

fn produce_range(topic: &str, from: u64, count: u64, rate: Option<f64>) {
    let spec = ProduceSpec {
        bootstrap: bootstrap(),
        topic: topic.into(),
        from,
        count,
        rate,
        size: 100,
        linger_ms: 5,
    };
    sluice_testkit::produce(&spec, &std::sync::atomic::AtomicU64::new(0)).expect("produce");
}

fn audit_range(topic: &str, from: u64, count: u64) -> AuditReport {
    audit(&bootstrap(), topic, from, count, Duration::from_secs(60)).expect("audit")
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// One pipeline under test and what the test knows about it.
struct Pipeline<'c> {
    c: &'c Cluster,
    ns: String,
    name: String,
    input: String,
    outputs: [String; 2],
    group: String,
}

impl Pipeline<'_> {
    fn get(&self) -> Value {
        json(
            &self
                .c
                .k(&["get", "-n", &self.ns, "sp", &self.name, "-o", "json"]),
        )
    }

    fn status(&self, field: &str) -> i64 {
        self.get()["status"][field].as_i64().unwrap_or(-1)
    }

    fn deployment_replicas(&self) -> (i64, i64) {
        let d = self
            .c
            .k_opt(&[
                "get",
                "-n",
                &self.ns,
                "deployment",
                &self.name,
                "-o",
                "json",
            ])
            .map(|s| json(&s))
            .unwrap_or(Value::Null);
        (
            d["spec"]["replicas"].as_i64().unwrap_or(-1),
            d["status"]["readyReplicas"].as_i64().unwrap_or(0),
        )
    }

    fn patch(&self, patch: &str) {
        self.c.k(&[
            "patch", "-n", &self.ns, "sp", &self.name, "--type", "merge", "-p", patch,
        ]);
    }

    fn lag(&self) -> i64 {
        uncommitted(&bootstrap(), &self.group, &self.input)
    }

    /// The input's lag in total and the number of its partitions with any lag (one read).
    fn lag_and_busy(&self) -> (i64, usize) {
        match sluice_testkit::offsets::committed_and_end(&bootstrap(), &self.group, &self.input) {
            Ok(parts) => {
                let lags: Vec<i64> = parts.iter().map(|(c, hi)| hi - c.unwrap_or(0)).collect();
                (lags.iter().sum(), lags.iter().filter(|l| **l > 0).count())
            }
            Err(_) => (i64::MAX, usize::MAX),
        }
    }

    fn wait_drained(&self, what: &str, timeout: Duration) {
        wait_for(what, timeout, || self.lag() == 0);
    }

    fn worker_pods(&self) -> Vec<String> {
        pods_of(self.c, &self.ns, &self.name)
    }

    /// Every output topic holds every sequence number of `from..from+count`.
    fn assert_delivered(&self, from: u64, count: u64, what: &str) -> u64 {
        let mut dups = 0;
        for out in &self.outputs {
            let r = audit_range(out, from, count);
            assert_eq!(r.missing, 0, "{what}: {out}: {r}");
            eprintln!("[e2e] {what}: {out}: {r}");
            dups += r.duplicates;
        }
        dups
    }
}

#[test]
fn helm_install_apply_autoscale_faults_delete_and_observe_on_a_real_node() {
    let c = cluster();
    let t0 = Instant::now();
    let (cr, ct) = split_image(&c.controller_image);
    let (wr, wt) = split_image(&c.worker_image);

    // 0. The monitoring stack a platform team already runs: the Prometheus Operator and a
    //    Prometheus (installed first, as in a real cluster; sluice's monitoring is turned on
    //    in step 6).
    step("monitoring stack: Prometheus Operator + Prometheus", || {
        observe::install_stack(&c)
    });

    // 1. Install: the README's helm command, with values only for the images.
    step("install: helm install charts/sluice", || {
        run_ok(
            c.helm()
                .args(["upgrade", "--install", "sluice"])
                .arg(repo_root().join("charts/sluice"))
                .args([
                    "--namespace",
                    RELEASE_NS,
                    "--create-namespace",
                    "--wait",
                    "--timeout",
                    "5m",
                ])
                .args(["--set", &format!("controller.image.repository={cr}")])
                .args(["--set", &format!("controller.image.tag={ct}")])
                .args(["--set", &format!("worker.image.repository={wr}")])
                .args(["--set", &format!("worker.image.tag={wt}")]),
        );
        let ready = c.jsonpath(RELEASE_NS, "deployment/sluice", "{.status.readyReplicas}");
        assert_eq!(
            ready, "2",
            "the controller Deployment runs 2 ready replicas"
        );
        wait_for(
            "one controller to hold the Lease",
            Duration::from_secs(60),
            || leader(&c).is_some(),
        );
    });

    let suffix = unique("e2e").replace("e2e-", "");
    let short = &suffix[suffix.len() - 8..];
    let p = Pipeline {
        c: &c,
        ns: format!("e2e-{short}"),
        name: "iot-enrich".into(),
        input: format!("e2e-iot-{suffix}"),
        outputs: [
            format!("e2e-enriched-{suffix}"),
            format!("e2e-archive-{suffix}"),
        ],
        group: format!("e2e-iot-enrich-{suffix}"),
    };
    let _diagnose = DiagnoseOnPanic {
        c: &c,
        namespaces: vec![RELEASE_NS.into(), p.ns.clone()],
    };
    rt().block_on(async {
        for t in [&p.input, &p.outputs[0], &p.outputs[1]] {
            create_topic(&bootstrap(), t, PARTITIONS)
                .await
                .expect("topic");
        }
    });
    c.k(&["create", "namespace", &p.ns]);
    // Objects of the user's in the same namespace: nothing sluice does may touch them.
    c.k(&[
        "create",
        "configmap",
        "-n",
        &p.ns,
        "user-settings",
        "--from-literal=owner=user",
    ]);
    let user_rv = c.jsonpath(
        &p.ns,
        "configmap/user-settings",
        "{.metadata.resourceVersion}",
    );

    // 2. Apply the example pipeline, pointed at the test broker.
    step(
        "apply: kubectl apply manifests/examples/iot-enrich.yaml",
        || {
            c.apply(&example_for_test(&p, &c.pod_bootstrap));
            c.wait_condition(
                Some(&p.ns),
                &["sp/iot-enrich"],
                "Ready",
                Duration::from_secs(180),
            );
            produce_range(&p.input, 0, 20_000, None);
            p.wait_drained(
                "the first 20k records to be committed",
                Duration::from_secs(120),
            );
            p.assert_delivered(0, 20_000, "apply");
            // What `kubectl get sp` shows, with real values (the first burst may have scaled
            // the pipeline up already: replicas are anything from 1 to the partition count).
            let mut table = String::new();
            wait_for(
                "kubectl get sp to show lag 0 and Ready=True",
                Duration::from_secs(120),
                || {
                    table = c.k(&["get", "sp", "-n", &p.ns]);
                    let row: Vec<&str> = table
                        .lines()
                        .nth(1)
                        .unwrap_or("")
                        .split_whitespace()
                        .collect();
                    row.len() >= 5 && row[3] == "0" && row[4] == "True"
                },
            );
            eprintln!("{table}");
            let row: Vec<&str> = table
                .lines()
                .nth(1)
                .expect("a row")
                .split_whitespace()
                .collect();
            let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
            assert_eq!(
                &header[..5],
                &["NAME", "PARTITIONS", "REPLICAS", "LAG", "READY"]
            );
            assert_eq!(&row[..2], &["iot-enrich", "4"], "{table}");
            let replicas: i32 = row[2].parse().expect("replicas");
            assert!((1..=PARTITIONS).contains(&replicas), "{table}");
        },
    );

    // 3. A config change rolls the Deployment (config hash) while records flow.
    step("config change rolls the Deployment with 0 missing", || {
        let hash = |p: &Pipeline| {
            p.c.jsonpath(
                &p.ns,
                "deployment/iot-enrich",
                "{.spec.template.metadata.annotations.sluice\\.dev/config-hash}",
            )
        };
        let before = hash(&p);
        let producer = spawn_produce(&p.input, 20_000, 10_000, Some(5_000.0));
        p.patch(r#"{"spec":{"workers":{"queueCapacity":256}}}"#);
        wait_for(
            "a new config hash on the pod template",
            Duration::from_secs(60),
            || {
                let h = hash(&p);
                !h.is_empty() && h != before
            },
        );
        producer.join().expect("producer");
        wait_for("the rollout to finish", Duration::from_secs(120), || {
            let (want, ready) = p.deployment_replicas();
            want >= 1 && ready == want && p.worker_pods().len() as i64 == want
        });
        p.wait_drained(
            "records produced during the rollout",
            Duration::from_secs(180),
        );
        p.assert_delivered(20_000, 10_000, "rollout");
    });

    // 4. Autoscale on lag: a backlog of 50 x lagPerReplica.
    let timeline = step(
        "autoscale: backlog -> scale up -> drain -> scale down",
        || autoscale(&p),
    );

    // 5. Faults on the node.
    step("delete a worker pod mid-stream", || {
        let from = 30_000 + timeline.backlog;
        let producer = spawn_produce(&p.input, from, 10_000, Some(2_000.0));
        producer.wait_sent(3_000);
        let victim = p
            .worker_pods()
            .into_iter()
            .next()
            .expect("a running worker");
        c.k(&["delete", "pod", "-n", &p.ns, &victim, "--wait=false"]);
        producer.join().expect("producer");
        p.wait_drained(
            "records produced around the pod deletion",
            Duration::from_secs(180),
        );
        p.assert_delivered(from, 10_000, "pod deleted");
    });
    step("pause and resume through the resource", || {
        let from = 40_000 + timeline.backlog;
        p.patch(r#"{"spec":{"paused":true}}"#);
        wait_for(
            "no worker pods while paused",
            Duration::from_secs(90),
            || p.deployment_replicas().0 == 0 && p.worker_pods().is_empty(),
        );
        produce_range(&p.input, from, 2_000, None);
        std::thread::sleep(Duration::from_secs(POLL));
        assert_eq!(p.lag(), 2_000, "nothing is consumed while paused");
        p.patch(r#"{"spec":{"paused":false}}"#);
        p.wait_drained("the paused backlog after resume", Duration::from_secs(120));
        p.assert_delivered(from, 2_000, "pause/resume");
    });
    step(
        "scale to zero: idle -> 0 pods -> produce -> pods -> drained",
        || scale_to_zero(&p, 42_000 + timeline.backlog),
    );
    step(
        "delete the leader controller: the other takes the Lease",
        || {
            let old = leader(&c).expect("a leader");
            c.k(&["delete", "pod", "-n", RELEASE_NS, &old, "--wait=false"]);
            wait_for(
                "another controller to hold the Lease",
                Duration::from_secs(90),
                || leader(&c).is_some_and(|l| l != old),
            );
            // Reconciles continue: a spec change is observed by the new leader.
            let generation = p.get()["metadata"]["generation"].as_i64().unwrap();
            p.patch(r#"{"spec":{"batching":{"linger":"10ms"}}}"#);
            wait_for(
                "the new leader to observe the change",
                Duration::from_secs(60),
                || p.status("observedGeneration") > generation,
            );
        },
    );

    // 6. Observe: Prometheus scrapes the worker and controller metrics.
    step(
        "observe: Prometheus scrapes workers and the controller",
        || observe::run(&c, &p, 45_000 + timeline.backlog),
    );

    // 7. The custom-processor example on its own image.
    step(
        "custom processor image (examples/enrich-worker), two input topics",
        || custom_processor(&c, &p.ns),
    );

    // 7a'. Formats and services: schema-registry records (Confluent's serializers) decoded
    //     and posted to an HTTP service running in the cluster.
    step(
        "schema-registry records posted to an HTTP service in the cluster",
        || registry_records_to_an_http_service(&c, &p.ns),
    );

    // 7b. A platform's cluster: a node tainted for a dedicated pool, and a SCRAM password
    //     rotated on the broker and in its Secret while records flow.
    step(
        "tainted node, then a SCRAM password rotated mid-stream",
        || tainted_node_and_rotated_password(&c, &p.ns),
    );

    // 8. Delete the pipeline: workers drain and exit 0; children are collected by the
    //    garbage collector; the user's objects stay as they were.
    step("delete the pipeline", || {
        let from = 50_000 + timeline.backlog;
        produce_range(&p.input, from, 2_000, None);
        p.wait_drained("the last records before deletion", Duration::from_secs(120));
        let exits = watch_exit_codes(&c, &p.ns, &p.name);
        c.k(&[
            "delete",
            "sp",
            "-n",
            &p.ns,
            &p.name,
            "--wait=true",
            "--timeout=120s",
        ]);
        for kind in ["deployment", "configmap", "service", "poddisruptionbudget"] {
            wait_for(
                &format!("{kind} collected"),
                Duration::from_secs(90),
                || {
                    c.k_opt(&[
                        "get",
                        "-n",
                        &p.ns,
                        kind,
                        "-l",
                        "sluice.dev/pipeline=iot-enrich",
                        "-o",
                        "name",
                    ])
                    .is_some_and(|s| s.trim().is_empty())
                },
            );
        }
        wait_for("worker pods gone", Duration::from_secs(120), || {
            p.worker_pods().is_empty()
                && c.k(&[
                    "get",
                    "pods",
                    "-n",
                    &p.ns,
                    "-l",
                    "sluice.dev/pipeline=iot-enrich",
                    "-o",
                    "name",
                ])
                .trim()
                .is_empty()
        });
        let codes = exits.codes();
        drop(exits);
        assert!(!codes.is_empty(), "saw the workers' exit codes");
        assert!(
            codes.iter().all(|(_, code)| *code == 0),
            "every worker exits 0 on deletion: {codes:?}"
        );
        assert_eq!(
            p.lag(),
            0,
            "everything consumed was committed before the workers left"
        );
        p.assert_delivered(from, 2_000, "deletion");
        let rv = c.jsonpath(
            &p.ns,
            "configmap/user-settings",
            "{.metadata.resourceVersion}",
        );
        assert_eq!(rv, user_rv, "the user's ConfigMap is untouched");
    });

    eprintln!(
        "[e2e] the whole path took {:.0}s",
        t0.elapsed().as_secs_f64()
    );
    c.k(&["delete", "namespace", &p.ns, "--wait=false"]);
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A producer in the background; `sent` counts the records written so far.
struct Producer {
    sent: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Producer {
    /// Wait until at least `n` records were written (so a fault lands mid-stream).
    fn wait_sent(&self, n: u64) {
        poll(
            &format!("{n} records produced"),
            Duration::from_secs(60),
            || {
                let sent = self.sent.load(Ordering::Relaxed);
                (sent >= n).then_some(()).ok_or(format!("{sent} sent"))
            },
        );
    }

    fn join(self) -> std::thread::Result<()> {
        self.thread.join()
    }
}

fn spawn_produce(topic: &str, from: u64, count: u64, rate: Option<f64>) -> Producer {
    let spec = ProduceSpec {
        bootstrap: bootstrap(),
        topic: topic.into(),
        from,
        count,
        rate,
        size: 100,
        linger_ms: 5,
    };
    let sent = Arc::new(AtomicU64::new(0));
    let s2 = sent.clone();
    let thread = std::thread::spawn(move || sluice_testkit::produce(&spec, &s2).expect("produce"));
    Producer { sent, thread }
}

/// The controller pod holding the Lease, if it is one of the running controller pods.
fn leader(c: &Cluster) -> Option<String> {
    let holder = c.jsonpath(
        RELEASE_NS,
        "lease/sluice-controller",
        "{.spec.holderIdentity}",
    );
    let pods = c.k(&[
        "get",
        "pods",
        "-n",
        RELEASE_NS,
        "-l",
        "app.kubernetes.io/name=sluice-controller",
        "--field-selector",
        "status.phase=Running",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]);
    pods.split_whitespace()
        .any(|p| p == holder)
        .then_some(holder)
}

/// manifests/examples/iot-enrich.yaml, as a user would adapt it to this cluster: the
/// namespace, the broker address the pods reach, this run's topics and group, small
/// resource requests (the node has 2 cores) and a scaling policy sized to the test.
fn example_for_test(p: &Pipeline, pod_bootstrap: &str) -> String {
    let text =
        std::fs::read_to_string(repo_root().join("manifests/examples/iot-enrich.yaml")).unwrap();
    let mut sp: Value = serde_yaml::from_str(&text).expect("example YAML");
    sp["metadata"]["namespace"] = p.ns.clone().into();
    let spec = &mut sp["spec"];
    spec["source"]["bootstrapServers"] = pod_bootstrap.into();
    spec["source"]["topic"] = p.input.clone().into();
    spec["source"]["groupId"] = p.group.clone().into();
    spec["sinks"][0]["kafka"]["topic"] = p.outputs[0].clone().into();
    spec["sinks"][1]["kafka"]["topic"] = p.outputs[1].clone().into();
    spec["resources"] = serde_json::json!({"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}});
    spec["scaling"] = serde_json::json!({
        "minReplicas": 1, "maxReplicas": 8, "lagPerReplica": LAG_PER_REPLICA,
        "pollInterval": format!("{POLL}s"), "scaleDownStabilization": format!("{STABILIZATION}s"),
    });
    serde_json::to_string(&sp).unwrap()
}

/// What the autoscaling step saw.
#[derive(Debug, Default)]
struct Timeline {
    backlog: u64,
    to_first_scale_up: f64,
    to_peak: f64,
    peak: i64,
    to_drained: f64,
    /// The last moment the lag asked for more than one replica (over `lagPerReplica`).
    last_wanting_more: f64,
    to_scale_down: f64,
    decisions: usize,
    replicas_seen: Vec<(f64, i64)>,
    duplicates: u64,
}

fn autoscale(p: &Pipeline) -> Timeline {
    let backlog = 50 * LAG_PER_REPLICA;
    let from = 30_000;
    // Slower processing (1 ms a record), so the backlog lasts long enough for more replicas
    // to drain it faster. The change rolls the pods; start once that settled at 1 replica.
    p.patch(r#"{"spec":{"processor":{"passthrough":null,"delay":{"perRecord":"1ms"}}}}"#);
    wait_for(
        "the rollout to the slower processor at 1 replica",
        Duration::from_secs(120),
        || {
            let (want, ready) = p.deployment_replicas();
            want == 1 && ready == 1 && p.worker_pods().len() == 1
        },
    );
    produce_range(&p.input, from, backlog, None);
    let t = Instant::now();
    let mut tl = Timeline {
        backlog,
        ..Default::default()
    };
    let mut last = 1;
    tl.replicas_seen.push((0.0, 1));
    let mut drained = false;
    let deadline = Duration::from_secs(300 + STABILIZATION);
    loop {
        let el = t.elapsed().as_secs_f64();
        assert!(t.elapsed() < deadline, "autoscaling did not finish: {tl:?}");
        let (r, _) = p.deployment_replicas();
        assert!(
            r <= PARTITIONS as i64,
            "never more replicas than partitions: {r}"
        );
        if r != last && r >= 0 {
            tl.replicas_seen.push((el, r));
            tl.decisions += 1;
            if r > last && tl.to_first_scale_up == 0.0 {
                tl.to_first_scale_up = el;
            }
            if r > tl.peak {
                tl.peak = r;
                tl.to_peak = el;
            }
            if drained && r < last && r == 1 {
                tl.to_scale_down = el;
            }
            last = r;
        }
        // How soon replicas rise is measured (the timeline), not asserted: a timed assertion
        // on a shared 2-core node fails by load, not by behaviour. That they rise at all
        // while the backlog lasts is asserted below (peak > 1).
        // The controller wants more than one replica while the lag is over lagPerReplica
        // *and* on more than one partition (`autoscale/policy.rs`: desired =
        // min(ceil(lag / lagPerReplica), partitions with lag)): near the end of a drain the
        // last lag is often on one partition, which one replica serves as fast as four.
        let (lag, busy) = p.lag_and_busy();
        if lag > LAG_PER_REPLICA as i64 && busy > 1 {
            tl.last_wanting_more = el;
        }
        if !drained && lag == 0 {
            drained = true;
            tl.to_drained = el;
        }
        if drained && tl.to_scale_down > 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(tl.peak > 1, "scaled up: {tl:?}");
    // The window runs from the controller's last recommendation of more than one replica,
    // made at a lag read (every POLL) while the lag was over lagPerReplica on more than one
    // partition: no earlier than POLL before that ended, which this loop saw last at
    // `last_wanting_more`.
    // (The lag reaching 0 comes later, by the drain of that last lagPerReplica and a commit:
    // measured from it, the window looked up to that much short.)
    assert!(
        tl.to_scale_down - tl.last_wanting_more >= STABILIZATION as f64 - POLL as f64,
        "scale-down waited for the stabilization window: {tl:?}"
    );
    // The scale-up and the scale-down rebalances both drain before letting go.
    tl.duplicates = p.assert_delivered(from, backlog, "autoscale");
    assert_eq!(tl.duplicates, 0, "scaling redelivers nothing: {tl:?}");
    write_timeline(&tl);
    tl
}

fn write_timeline(tl: &Timeline) {
    let steps: Vec<String> = tl
        .replicas_seen
        .iter()
        .map(|(t, r)| format!("{t:.1}s: {r}"))
        .collect();
    let text = format!(
        "| backlog | first scale-up | peak replicas (at) | lag drained | back to 1 replica | scale changes | duplicates |\n\
         |---|---|---|---|---|---|---|\n\
         | {} | {:.1} s | {} ({:.1} s) | {:.1} s | {:.1} s | {} | {} |\n\nreplicas over time: {}\n",
        tl.backlog, tl.to_first_scale_up, tl.peak, tl.to_peak, tl.to_drained, tl.to_scale_down,
        tl.decisions, tl.duplicates, steps.join(", ")
    );
    eprintln!("[e2e] autoscaling timeline (pollInterval {POLL}s, lagPerReplica {LAG_PER_REPLICA}, stabilization {STABILIZATION}s, {PARTITIONS} partitions):\n{text}");
    let dir = repo_root().join("target/e2e");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("autoscaling.md"), text);
}

/// One wake: from the first record produced to the Deployment asking for a pod, to a ready
/// worker, to the lag drained (seconds).
#[derive(Debug, Clone, Copy)]
struct Wake {
    to_scaled: f64,
    to_ready: f64,
    to_drained: f64,
}

/// `minReplicas: 0`: the pipeline idles to zero pods (`kubectl get sp` shows 0 replicas,
/// `Idle=True`), then each batch of records wakes it; measured, not asserted on time.
/// `from..from + WAKES * WAKE_RECORDS` are this step's sequence numbers.
fn scale_to_zero(p: &Pipeline, from: u64) {
    p.patch(&format!(
        r#"{{"spec":{{"scaling":{{"minReplicas":0,"idleAfter":"{IDLE_AFTER}s"}}}}}}"#
    ));
    let idle_condition = || {
        p.get()["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Idle")
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or("").to_string(),
                    c["reason"].as_str().unwrap_or("").to_string(),
                )
            })
    };
    let mut wakes = Vec::new();
    for i in 0..WAKES {
        let t = Instant::now();
        wait_for(
            "the idle pipeline to scale to zero pods",
            Duration::from_secs(IDLE_AFTER + 4 * POLL + 120),
            || p.deployment_replicas().0 == 0 && p.worker_pods().is_empty(),
        );
        let to_zero = t.elapsed().as_secs_f64();
        assert_eq!(
            idle_condition(),
            Some(("True".to_string(), "NoNewRecords".to_string())),
            "Idle=True once at zero"
        );
        let table = p.c.k(&["get", "sp", "-n", &p.ns]);
        let row: Vec<&str> = table
            .lines()
            .nth(1)
            .unwrap_or("")
            .split_whitespace()
            .collect();
        assert_eq!(
            (row[2], row[4]),
            ("0", "True"),
            "kubectl get sp at zero:\n{table}"
        );
        if i == 0 {
            eprintln!("{table}");
        }
        // No records, no pods: it stays at zero across polls. The hold differs from wake to
        // wake, so the records land at different points of the poll cycle (the wait for the
        // next poll is part of the time to wake).
        std::thread::sleep(Duration::from_millis(
            (POLL + 1) * 1000 + i * POLL * 1000 / WAKES,
        ));
        assert_eq!(
            p.deployment_replicas().0,
            0,
            "an idle pipeline stays at zero"
        );

        let start = from + i * WAKE_RECORDS;
        let t = Instant::now();
        produce_range(&p.input, start, WAKE_RECORDS, None);
        let mut w = Wake {
            to_scaled: 0.0,
            to_ready: 0.0,
            to_drained: 0.0,
        };
        wait_for(
            "new records to wake the pipeline and drain",
            Duration::from_secs(4 * POLL + 180),
            || {
                let el = t.elapsed().as_secs_f64();
                let (want, ready) = p.deployment_replicas();
                if w.to_scaled == 0.0 && want > 0 {
                    w.to_scaled = el;
                }
                if w.to_ready == 0.0 && ready > 0 {
                    w.to_ready = el;
                }
                if w.to_ready > 0.0 && w.to_drained == 0.0 && p.lag() == 0 {
                    w.to_drained = el;
                }
                w.to_drained > 0.0
            },
        );
        assert_ne!(
            idle_condition().map(|c| c.0),
            Some("True".to_string()),
            "Idle=False once woken"
        );
        let dups = p.assert_delivered(start, WAKE_RECORDS, "woken");
        eprintln!(
            "[e2e] wake {}: idle to 0 pods in {to_zero:.1}s; first record -> replicas>0 {:.1}s, -> worker ready {:.1}s, -> lag drained {:.1}s ({dups} duplicates)",
            i + 1,
            w.to_scaled,
            w.to_ready,
            w.to_drained
        );
        wakes.push(w);
    }
    p.patch(r#"{"spec":{"scaling":{"minReplicas":1,"idleAfter":null}}}"#);
    wait_for("back to one worker", Duration::from_secs(120), || {
        let (want, ready) = p.deployment_replicas();
        want >= 1 && ready >= 1
    });
    write_wakes(&wakes);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn write_wakes(wakes: &[Wake]) {
    let col = |f: fn(&Wake) -> f64| {
        let v: Vec<f64> = wakes.iter().map(f).collect();
        let runs: Vec<String> = v.iter().map(|x| format!("{x:.1}")).collect();
        format!("{:.1} s ({})", median(v), runs.join(", "))
    };
    let text = format!(
        "| runs | first record -> replicas > 0 | -> a worker ready | -> lag drained | pod start (replicas > 0 -> ready) |\n\
         |---|---|---|---|---|\n\
         | {} | {} | {} | {} | {} |\n\n(median, then each run, in seconds; {WAKE_RECORDS} records a wake)\n",
        wakes.len(),
        col(|w| w.to_scaled),
        col(|w| w.to_ready),
        col(|w| w.to_drained),
        col(|w| w.to_ready - w.to_scaled),
    );
    eprintln!(
        "[e2e] scale-to-zero wake times (pollInterval {POLL}s, idleAfter {IDLE_AFTER}s):\n{text}"
    );
    let dir = repo_root().join("target/e2e");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("scale-to-zero.md"), text);
}

/// Exit codes of the pipeline's worker containers, as a `kubectl get pods -w` sees them
/// terminate. The watch is stopped when this is dropped (a test leaves no process behind).
struct ExitWatch {
    seen: Arc<Mutex<BTreeSet<(String, i64)>>>,
    child: std::process::Child,
}

impl ExitWatch {
    fn codes(&self) -> BTreeSet<(String, i64)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for ExitWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start watching; returns once the watch has listed the pods that exist now, so no exit
/// after this call is missed.
fn watch_exit_codes(c: &Cluster, ns: &str, pipeline: &str) -> ExitWatch {
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let listed = Arc::new(AtomicU64::new(0));
    let mut child = c
        .kubectl()
        .args([
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            &format!("sluice.dev/pipeline={pipeline}"),
            "-w",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl watch");
    let out = child.stdout.take().unwrap();
    let (s2, l2) = (seen.clone(), listed.clone());
    std::thread::spawn(move || {
        // `-o json -w` prints one pretty-printed object after another.
        let mut buf = String::new();
        let mut depth = 0i32;
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
            buf.push_str(&line);
            buf.push('\n');
            if depth == 0 && !buf.trim().is_empty() {
                if let Ok(pod) = serde_json::from_str::<Value>(&buf) {
                    l2.fetch_add(1, Ordering::Relaxed);
                    let name = pod["metadata"]["name"].as_str().unwrap_or("").to_string();
                    for cs in pod["status"]["containerStatuses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        if let Some(code) = cs["state"]["terminated"]["exitCode"].as_i64() {
                            s2.lock().unwrap().insert((name.clone(), code));
                        }
                    }
                }
                buf.clear();
            }
        }
    });
    let watch = ExitWatch { seen, child };
    poll(
        "the pod watch to list the running workers",
        Duration::from_secs(60),
        || match listed.load(Ordering::Relaxed) {
            0 => Err("nothing listed yet".to_string()),
            _ => Ok(()),
        },
    );
    watch
}

/// examples/enrich-worker on its own image: `spec.image` plus `processor.custom`.
fn custom_processor(c: &Cluster, ns: &str) {
    let suffix = unique("enrich");
    // Two input topics, one pipeline (`source.topics`).
    let (input, second, output) = (
        format!("e2e-enrich-in-{suffix}"),
        format!("e2e-enrich-in2-{suffix}"),
        format!("e2e-enrich-out-{suffix}"),
    );
    rt().block_on(async {
        create_topic(&bootstrap(), &input, 2).await.expect("topic");
        create_topic(&bootstrap(), &second, 2).await.expect("topic");
        create_topic(&bootstrap(), &output, 2).await.expect("topic");
    });
    let group = format!("e2e-enrich-{suffix}");
    c.apply(
        &serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
            "metadata": {"name": "enrich", "namespace": ns},
            "spec": {
                "image": c.enrich_image,
                "source": {"bootstrapServers": c.pod_bootstrap, "topics": [input, second], "groupId": group},
                "processor": {"custom": {"name": "enrich"}},
                "sinks": [{"kafka": {"topic": output}}],
                "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
                "scaling": {"minReplicas": 1, "maxReplicas": 2, "pollInterval": "5s"},
            }
        })
        .to_string(),
    );
    c.wait_condition(Some(ns), &["sp/enrich"], "Ready", Duration::from_secs(180));
    let image = c.jsonpath(
        ns,
        "deployment/enrich",
        "{.spec.template.spec.containers[0].image}",
    );
    assert_eq!(image, c.enrich_image, "the pods run the custom image");
    assert_eq!(
        c.jsonpath(ns, "sp/enrich", "{.status.partitions}"),
        "4",
        "the partitions of both topics"
    );
    produce_range(&input, 0, 500, None);
    produce_range(&second, 500, 500, None);
    let r = audit_range(&output, 0, 1_000);
    assert_eq!(r.missing, 0, "both topics: {r}");
    let records = sluice_testkit::read_all(&output, Duration::from_secs(10));
    let first: Value =
        serde_json::from_slice(records[0].value.as_deref().expect("a value")).expect("JSON");
    assert!(
        first["site"].is_string() && first["tempF"].is_number(),
        "enriched by the custom processor: {first}"
    );
    c.k(&["delete", "sp", "-n", ns, "enrich", "--wait=true"]);
}

/// Avro and Protobuf records written by Confluent's Python serializers, registered in the
/// test's registry (reached by the pods through a proxy on the cluster's bridge), read by a
/// worker pod that decodes them and posts JSON arrays to an HTTP service in the cluster
/// (`sluice-bench http-receiver`, which prints each body): every record, field for field.
fn registry_records_to_an_http_service(c: &Cluster, ns: &str) {
    if !c.local {
        eprintln!(
            "[e2e] skipped on an external cluster: its pods cannot reach the test's registry"
        );
        return;
    }
    let suffix = unique("sr");
    let input = format!("e2e-sr-in-{suffix}");
    let n: u64 = 300;
    let registry = sluice_testkit::registry_url();
    let out = sluice_testkit::registry_client(&[
        "produce",
        "--bootstrap",
        &bootstrap(),
        "--registry",
        &registry,
        "--topic",
        &input,
        "-n",
        &n.to_string(),
    ]);
    assert_eq!(out.lines().count(), 2, "{out}");
    // The registry listens on loopback; the pods reach it on the bridge, as the broker.
    let authority = registry
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let path = registry[registry.find(&authority).unwrap() + authority.len()..].to_string();
    let bridge = c.pod_bootstrap.rsplit_once(':').unwrap().0.to_string();
    let proxy = sluice_testkit::TcpProxy::start_on(&format!("{bridge}:0"), &authority);
    let pod_registry = format!("http://{}{path}", proxy.addr);
    c.apply(
        &serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "ingest", "namespace": ns, "labels": {"app": "ingest"}},
            "spec": {
                "containers": [{"name": "receiver", "image": c.bench_image,
                    "args": ["http-receiver", "--listen", "0.0.0.0:8080", "--print"],
                    "ports": [{"containerPort": 8080}],
                    "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                    "resources": {"requests": {"cpu": "20m", "memory": "16Mi"}}}],
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532},
            }
        })
        .to_string(),
    );
    c.k(&[
        "wait",
        "-n",
        ns,
        "--for=condition=Ready",
        "pod/ingest",
        "--timeout=120s",
    ]);
    let ip = c.jsonpath(ns, "pod/ingest", "{.status.podIP}");
    c.apply(
        &serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
            "metadata": {"name": "readings-http", "namespace": ns},
            "spec": {
                "source": {"bootstrapServers": c.pod_bootstrap, "topic": input, "groupId": format!("e2e-sr-{suffix}"),
                           "format": {"schemaRegistry": {"url": pod_registry}}},
                "processor": {"jq": {"program": "{id, name, temp}"}},
                "sinks": [{"http": {"url": format!("http://{ip}:8080/readings"), "batch": {"as": "array"}}}],
                "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
                "scaling": {"minReplicas": 1, "maxReplicas": 1},
            }
        })
        .to_string(),
    );
    c.wait_condition(
        Some(ns),
        &["sp/readings-http"],
        "Ready",
        Duration::from_secs(180),
    );
    let got = poll(
        "every record posted to the HTTP service",
        Duration::from_secs(120),
        || {
            let logs = c.k(&["logs", "-n", ns, "pod/ingest"]);
            let values: Vec<Value> = logs
                .lines()
                .filter(|l| l.starts_with('['))
                .flat_map(|l| serde_json::from_str::<Vec<Value>>(l).unwrap_or_default())
                .collect();
            if values.len() as u64 >= 2 * n {
                Ok(values)
            } else {
                Err(format!("{} of {} so far", values.len(), 2 * n))
            }
        },
    );
    let mut ids: Vec<u64> = got
        .iter()
        .map(|v| {
            let i = v["id"].as_u64().expect("an id");
            assert_eq!(v["name"], format!("sensor-{i}"), "{v}");
            assert_eq!(v["temp"].as_f64(), Some(20.0 + i as f64 / 4.0), "{v}");
            i
        })
        .collect();
    ids.sort_unstable();
    let want: Vec<u64> = (0..n).flat_map(|i| [i, i]).collect();
    assert_eq!(ids, want, "each record once in each format");
    c.k(&["delete", "sp", "-n", ns, "readings-http", "--wait=true"]);
    c.k(&["delete", "pod", "-n", ns, "ingest", "--wait=false"]);
}

/// The taint a node of a dedicated pool carries in this test.
const POOL_TAINT: &str = "sluice.dev/e2e-pool=streaming:NoSchedule";

/// Takes the taint off the node when dropped (also when the step fails), so the steps after
/// it can place pods.
struct Tainted<'a> {
    c: &'a Cluster,
    node: String,
}

impl Drop for Tainted<'_> {
    fn drop(&mut self) {
        let _ = self
            .c
            .k_opt(&["taint", "node", &self.node, "sluice.dev/e2e-pool-"]);
    }
}

/// Set `user`'s SCRAM-SHA-512 password on the local broker (creating the user), with
/// Kafka's own `kafka-configs` (kafka.admin.ConfigCommand) from the broker's jars.
fn set_scram_password(user: &str, password: &str) {
    let libs = run_ok(
        std::process::Command::new("bash")
            .arg(repo_root().join("scripts/kafka.sh"))
            .arg("libs"),
    );
    let libs = libs
        .lines()
        .last()
        .expect("the broker's jars")
        .trim()
        .to_string();
    run_ok(
        std::process::Command::new("java")
            .args(["-cp", &format!("{libs}/*"), "kafka.admin.ConfigCommand"])
            .args(["--bootstrap-server", &bootstrap(), "--alter"])
            .args([
                "--add-config",
                &format!("SCRAM-SHA-512=[password={password}]"),
            ])
            .args(["--entity-type", "users", "--entity-name", user]),
    );
}

/// Issue 22 on the node. A pipeline whose pods the node's taint refuses is
/// `Ready=False, WorkersUnschedulable` with the scheduler's reason; with the toleration in
/// `spec.template` its worker runs. Then the pipeline's SCRAM password changes on the
/// broker and in its Secret while records flow: the Secret's digest on the pod template
/// changes, the pod rolls (the old one drains on SIGTERM, the new one logs in with the new
/// password), and every record arrives.
fn tainted_node_and_rotated_password(c: &Cluster, ns: &str) {
    if !c.local {
        eprintln!("[e2e] skipped: needs the local broker's SCRAM listener for pods and the right to taint a node");
        return;
    }
    // The pods' SCRAM listener is three ports above their plaintext one (scripts/kafka.sh).
    let (host, port) = c.pod_bootstrap.rsplit_once(':').expect("host:port");
    let pod_sasl = format!("{host}:{}", port.parse::<u16>().expect("port") + 3);
    let (input, output, group) = sluice_testkit::pipeline_topics("e2e-rot", 2);
    // A SCRAM user of its own: the broker's `sluice` user stays as it is.
    let user = group.clone();
    let (old_password, new_password) = ("first-password-0001", "second-password-0002");
    set_scram_password(&user, old_password);
    let secret = |password: &str| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "rotating-credentials", "namespace": ns},
            "stringData": {"password": password},
        })
        .to_string()
    };
    c.apply(&secret(old_password));

    // The node of a dedicated pool: new pods without the toleration cannot land on it.
    let node = c.k(&["get", "nodes", "-o", "jsonpath={.items[0].metadata.name}"]);
    let node = node.trim().to_string();
    c.k(&["taint", "node", &node, POOL_TAINT, "--overwrite"]);
    let tainted = Tainted { c, node };
    c.apply(
        &serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
            "metadata": {"name": "secured", "namespace": ns},
            "spec": {
                "source": {
                    "bootstrapServers": pod_sasl, "topic": input, "groupId": group,
                    "security": {
                        "protocol": "SASL_PLAINTEXT", "saslMechanism": "SCRAM-SHA-512",
                        "username": user,
                        "passwordSecretRef": {"name": "rotating-credentials", "key": "password"},
                    },
                },
                "sinks": [{"kafka": {"topic": output}}],
                "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
                "scaling": {"minReplicas": 1, "maxReplicas": 1, "pollInterval": "5s"},
            }
        })
        .to_string(),
    );
    let ready = || {
        let r = c.jsonpath(
            ns,
            "sp/secured",
            r#"{.status.conditions[?(@.type=="Ready")].reason}|{.status.conditions[?(@.type=="Ready")].message}"#,
        );
        r.split_once('|')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .unwrap_or_default()
    };
    poll(
        "Ready=False, WorkersUnschedulable",
        Duration::from_secs(120),
        || match ready() {
            (reason, message) if reason == "WorkersUnschedulable" => Ok(message),
            other => Err(format!("{other:?}")),
        },
    );
    let (_, message) = ready();
    assert!(
        message.contains("taint"),
        "the scheduler's reason: {message}"
    );
    c.k(&[
        "patch", "sp", "secured", "-n", ns, "--type", "merge", "-p",
        r#"{"spec":{"template":{"tolerations":[{"key":"sluice.dev/e2e-pool","operator":"Equal","value":"streaming","effect":"NoSchedule"}]}}}"#,
    ]);
    c.wait_condition(Some(ns), &["sp/secured"], "Ready", Duration::from_secs(180));
    drop(tainted);

    // Records flow; the password changes on the broker (existing sessions stay logged in),
    // then in the Secret.
    let producer = spawn_produce(&input, 0, 6_000, Some(300.0));
    producer.wait_sent(1_500);
    let pods_before = BTreeSet::from_iter(pods_of(c, ns, "secured"));
    let digest = || {
        c.jsonpath(
            ns,
            "deployment/secured",
            "{.spec.template.metadata.annotations.sluice\\.dev/secrets-hash}",
        )
    };
    let digest_before = digest();
    assert!(
        !digest_before.is_empty(),
        "the pod template carries the Secret's digest"
    );
    set_scram_password(&user, new_password);
    c.apply(&secret(new_password));
    wait_for(
        "a new Secret digest on the pod template",
        Duration::from_secs(60),
        || {
            let d = digest();
            !d.is_empty() && d != digest_before
        },
    );
    wait_for(
        "the worker pod rolled and ready",
        Duration::from_secs(180),
        || {
            let pods = BTreeSet::from_iter(pods_of(c, ns, "secured"));
            let ready = c.jsonpath(ns, "deployment/secured", "{.status.readyReplicas}");
            let updated = c.jsonpath(ns, "deployment/secured", "{.status.updatedReplicas}");
            pods.len() == 1 && pods.is_disjoint(&pods_before) && ready == "1" && updated == "1"
        },
    );
    producer.join().expect("producer");
    let r = audit_range(&output, 0, 6_000);
    assert_eq!(r.missing, 0, "records across the rotation: {r}");
    eprintln!("[e2e] password rotated mid-stream: {r}");
    c.k(&["delete", "sp", "-n", ns, "secured", "--wait=true"]);
    c.k(&["delete", "secret", "-n", ns, "rotating-credentials"]);
}

/// The names of the running (not terminating) worker pods of pipeline `name`.
fn pods_of(c: &Cluster, ns: &str, name: &str) -> Vec<String> {
    c.k(&[
        "get", "pods", "-n", ns, "-l", &format!("sluice.dev/pipeline={name}"),
        "-o", "jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    ])
    .lines()
    .filter_map(|l| {
        let mut f = l.split_whitespace();
        let (name, phase, deleting) = (f.next()?, f.next()?, f.next());
        (phase == "Running" && deleting.is_none()).then(|| name.to_string())
    })
    .collect()
}

/// The Prometheus Operator (built from Go modules, scripts/images.sh) and a Prometheus in
/// the cluster; the chart's ServiceMonitor and PrometheusRule and the per-pipeline
/// ServiceMonitor are picked up; queries through Prometheus's HTTP API return the worker's
/// and the controller's series and the loaded rules.
mod observe {
    use super::*;

    const MON_NS: &str = "default";

    fn po_dir() -> std::path::PathBuf {
        let out = run_ok(
            std::process::Command::new("bash")
                .arg(repo_root().join("scripts/images.sh"))
                .arg("prometheus-operator-dir")
                .stderr(Stdio::inherit()),
        );
        std::path::PathBuf::from(out.trim())
    }

    fn docs(path: &std::path::Path) -> Vec<Value> {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_yaml::Deserializer::from_str(&text)
            .map(|d| <Value as serde::Deserialize>::deserialize(d).expect("YAML"))
            .filter(|v| !v.is_null())
            .collect()
    }

    /// Install the operator's CRDs, the operator and a Prometheus selecting every
    /// ServiceMonitor and PrometheusRule. Idempotent.
    pub fn install_stack(c: &Cluster) {
        let dir = po_dir();
        c.k(&["apply", "--server-side", "--force-conflicts", "-f"]
            .into_iter()
            .chain([dir
                .join("example/prometheus-operator-crd")
                .to_str()
                .unwrap()])
            .collect::<Vec<_>>());
        c.wait_condition(
            None,
            &[
                "crd/servicemonitors.monitoring.coreos.com",
                "crd/prometheuses.monitoring.coreos.com",
                "crd/prometheusrules.monitoring.coreos.com",
            ],
            "Established",
            Duration::from_secs(120),
        );
        let rbac = dir.join("example/rbac");
        for f in [
            "prometheus-operator/prometheus-operator-service-account.yaml",
            "prometheus-operator/prometheus-operator-cluster-role.yaml",
            "prometheus-operator/prometheus-operator-cluster-role-binding.yaml",
            "prometheus/prometheus-service-account.yaml",
            "prometheus/prometheus-cluster-role.yaml",
            "prometheus/prometheus-cluster-role-binding.yaml",
        ] {
            c.k(&["apply", "-f", rbac.join(f).to_str().unwrap()]);
        }
        // The operator's own Deployment, with the images built here.
        let mut dep =
            docs(&rbac.join("prometheus-operator/prometheus-operator-deployment.yaml")).remove(0);
        let ctr = &mut dep["spec"]["template"]["spec"]["containers"][0];
        ctr["image"] = c.prometheus_operator_image.clone().into();
        ctr["imagePullPolicy"] = "IfNotPresent".into();
        ctr["args"] = serde_json::json!([format!(
            "--prometheus-config-reloader={}",
            c.config_reloader_image
        )]);
        c.apply(&dep.to_string());
        c.apply(
            &serde_json::json!({
                "apiVersion": "monitoring.coreos.com/v1", "kind": "Prometheus",
                "metadata": {"name": "sluice", "namespace": MON_NS},
                "spec": {
                    "image": c.prometheus_image, "version": c.prometheus_version,
                    "serviceAccountName": "prometheus",
                    "serviceMonitorSelector": {}, "serviceMonitorNamespaceSelector": {},
                    "ruleSelector": {}, "ruleNamespaceSelector": {},
                    "scrapeInterval": "5s", "evaluationInterval": "5s",
                    "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
                    "securityContext": {"runAsUser": 65532, "runAsNonRoot": true, "fsGroup": 65532},
                }
            })
            .to_string(),
        );
    }

    fn prometheus_addr(c: &Cluster) -> Option<String> {
        let ip = c.jsonpath(MON_NS, "pod/prometheus-sluice-0", "{.status.podIP}");
        let ready = c.jsonpath(
            MON_NS,
            "pod/prometheus-sluice-0",
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        );
        (!ip.is_empty() && ready == "True").then(|| format!("{ip}:9090"))
    }

    fn query(addr: &str, q: &str) -> Vec<Value> {
        let enc: String = q
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        sluice_testkit::http_get(addr, &format!("/api/v1/query?query={enc}"))
            .and_then(|body| serde_json::from_str::<Value>(&body).ok())
            .and_then(|v| v["data"]["result"].as_array().cloned())
            .unwrap_or_default()
    }

    pub fn run(c: &Cluster, p: &Pipeline, from: u64) {
        let (ns, pipeline) = (p.ns.as_str(), p.name.as_str());
        // A user turns on the chart's monitoring once the operator runs.
        run_ok(
            c.helm()
                .args(["upgrade", "sluice"])
                .arg(repo_root().join("charts/sluice"))
                .args(["--namespace", RELEASE_NS, "--reuse-values", "--wait"])
                .args([
                    "--set",
                    "monitoring.serviceMonitor.enabled=true",
                    "--set",
                    "monitoring.prometheusRule.enabled=true",
                ]),
        );
        wait_for(
            "the pipeline's ServiceMonitor",
            Duration::from_secs(120),
            || {
                c.k_opt(&["get", "-n", ns, "servicemonitor", pipeline])
                    .is_some()
            },
        );
        // Prometheus scrapes the pods through a headless Service (no cluster IP taken).
        assert_eq!(
            c.jsonpath(
                ns,
                &format!("service/{pipeline}-metrics"),
                "{.spec.clusterIP}"
            ),
            "None",
            "the metrics Service is headless"
        );
        let mut addr = String::new();
        wait_for("Prometheus to run", Duration::from_secs(180), || {
            prometheus_addr(c).map(|a| addr = a).is_some()
        });
        eprintln!("[e2e] Prometheus at http://{addr}");
        let checks = [
            format!("sluice_messages_consumed_total{{namespace=\"{ns}\",pipeline=\"{pipeline}\"}}"),
            format!("sluice_consumer_lag{{namespace=\"{ns}\",pipeline=\"{pipeline}\"}}"),
            "sluice_controller_reconciliations_total".to_string(),
        ];
        for q in &checks {
            wait_for(
                &format!("Prometheus to return {q}"),
                Duration::from_secs(180),
                || !query(&addr, q).is_empty(),
            );
            eprintln!("[e2e] {q}: {} series", query(&addr, q).len());
        }
        // Records consumed now show in the scraped counter (the workers' counters start at 0
        // with each pod, and the pods of the steps before may all be new).
        produce_range(&p.input, from, 1_000, None);
        p.wait_drained("the observe step's records", Duration::from_secs(60));
        let consumed_q = format!(
            "sum(sluice_messages_consumed_total{{namespace=\"{ns}\",pipeline=\"{pipeline}\"}})"
        );
        wait_for(
            "the scraped consumed counter to count them",
            Duration::from_secs(120),
            || {
                query(&addr, &consumed_q)
                    .first()
                    .and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok())
                    .is_some_and(|v| v >= 1_000.0)
            },
        );
        wait_for(
            "the chart's PrometheusRule to load",
            Duration::from_secs(120),
            || {
                sluice_testkit::http_get(&addr, "/api/v1/rules")
                    .is_some_and(|b| b.contains("SluiceLagGrowing"))
            },
        );
    }
}
