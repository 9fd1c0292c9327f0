//! End to end on a full cluster (kind, k3d, a real one): install the chart, apply a
//! pipeline, wait for Ready and for lag to drain. Runs only when SLUICE_E2E_KUBECONFIG is
//! set; needs images the cluster can pull and a Kafka reachable from the pods:
//!
//! ```sh
//! SLUICE_E2E_KUBECONFIG=~/.kube/config \
//! SLUICE_E2E_BOOTSTRAP=kafka.kafka.svc:9092 \        # as seen from the pods
//! SLUICE_E2E_LOCAL_BOOTSTRAP=127.0.0.1:9092 \        # as seen from the test (port-forward)
//! SLUICE_E2E_CONTROLLER_IMAGE=ghcr.io/sluice-dev/sluice-controller:0.1.0 \
//! SLUICE_E2E_WORKER_IMAGE=ghcr.io/sluice-dev/sluice-worker:0.1.0 \
//! cargo test -p sluice-controller --test e2e_cluster -- --nocapture
//! ```

use std::process::Command;
use std::time::{Duration, Instant};

use sluice_testkit::{create_topic, repo_root, run_ok, tool, uncommitted, unique};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[test]
fn chart_install_then_pipeline_becomes_ready_and_drains_its_lag() {
    let Some(kubeconfig) = env("SLUICE_E2E_KUBECONFIG") else {
        eprintln!("SKIPPED: set SLUICE_E2E_KUBECONFIG (and SLUICE_E2E_BOOTSTRAP, SLUICE_E2E_LOCAL_BOOTSTRAP, SLUICE_E2E_*_IMAGE) to run the full-cluster e2e suite");
        return;
    };
    let bootstrap =
        env("SLUICE_E2E_BOOTSTRAP").expect("SLUICE_E2E_BOOTSTRAP: Kafka as seen from the pods");
    let local = env("SLUICE_E2E_LOCAL_BOOTSTRAP")
        .expect("SLUICE_E2E_LOCAL_BOOTSTRAP: Kafka as seen from this test");
    let (ci, wi) = (
        env("SLUICE_E2E_CONTROLLER_IMAGE").expect("SLUICE_E2E_CONTROLLER_IMAGE"),
        env("SLUICE_E2E_WORKER_IMAGE").expect("SLUICE_E2E_WORKER_IMAGE"),
    );
    let split = |i: &str| {
        i.rsplit_once(':')
            .map(|(r, t)| (r.to_string(), t.to_string()))
            .expect("image:tag")
    };
    let ((cr, ct), (wr, wt)) = (split(&ci), split(&wi));
    let kubectl = || {
        let mut c = Command::new(tool("kubectl"));
        c.arg("--kubeconfig").arg(&kubeconfig);
        c
    };
    run_ok(
        Command::new(tool("helm"))
            .args(["upgrade", "--install", "sluice"])
            .arg(repo_root().join("charts/sluice"))
            .args([
                "--kubeconfig",
                &kubeconfig,
                "--namespace",
                "sluice-system",
                "--create-namespace",
                "--wait",
            ])
            .args([
                "--set",
                &format!("controller.image.repository={cr}"),
                "--set",
                &format!("controller.image.tag={ct}"),
            ])
            .args([
                "--set",
                &format!("worker.image.repository={wr}"),
                "--set",
                &format!("worker.image.tag={wt}"),
            ]),
    );
    let (input, output, ns) = (unique("e2e-in"), unique("e2e-out"), unique("e2e"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        create_topic(&local, &input, 4).await.unwrap();
        create_topic(&local, &output, 4).await.unwrap();
    });
    run_ok(kubectl().args(["create", "namespace", &ns]));
    let pipeline = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: StreamPipeline\nmetadata: {{name: e2e, namespace: {ns}}}\nspec:\n  source: {{bootstrapServers: \"{bootstrap}\", topic: {input}, groupId: e2e}}\n  sinks: [{{kafka: {{topic: {output}}}}}]\n  scaling: {{minReplicas: 1, maxReplicas: 4, lagPerReplica: 20000, pollInterval: 5s}}\n"
    );
    let file = std::env::temp_dir().join(format!("{ns}.yaml"));
    std::fs::write(&file, pipeline).unwrap();
    run_ok(kubectl().arg("apply").arg("-f").arg(&file));
    run_ok(kubectl().args([
        "wait",
        "-n",
        &ns,
        "--for=condition=Ready",
        "--timeout=300s",
        "streampipeline/e2e",
    ]));
    let spec = sluice_testkit::ProduceSpec {
        bootstrap: local.clone(),
        topic: input.clone(),
        from: 0,
        count: 100_000,
        rate: None,
        size: 100,
        linger_ms: 5,
    };
    sluice_testkit::produce(&spec, &std::sync::atomic::AtomicU64::new(0)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while uncommitted(&local, "e2e", &input) > 0 {
        assert!(Instant::now() < deadline, "lag did not drain in 5 minutes");
        std::thread::sleep(Duration::from_secs(2));
    }
    let report =
        sluice_testkit::audit(&local, &output, 0, 100_000, Duration::from_secs(60)).unwrap();
    assert_eq!(report.missing, 0, "{report}");
    println!(
        "{}",
        run_ok(kubectl().args(["get", "streampipelines", "-n", &ns]))
    );
}
