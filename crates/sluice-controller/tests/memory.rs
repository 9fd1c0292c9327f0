//! A deleted pipeline leaves nothing behind in the controller: no memory and no metric
//! series (against the real kube-apiserver, with a scripted Kafka).

mod support;

use std::time::{Duration, Instant};

use kube::api::{DeleteParams, PostParams};
use kube::Api;
use serde_json::json;
use sluice_api::crd::StreamPipeline;
use sluice_controller::controller::{run_in, Context};
use support::{setup, Scripted};

/// Series of the registry that carry `pipeline=name` in `namespace`.
fn series(ctx: &Context, namespace: &str, name: &str) -> usize {
    ctx.metrics
        .registry
        .gather()
        .iter()
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            let has = |k: &str, v: &str| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == k && l.value() == v)
            };
            has("namespace", namespace) && has("pipeline", name)
        })
        .count()
}

/// Poll `ok` until it holds, with a deadline.
async fn until(what: &str, timeout: Duration, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pipeline_leaves_no_memory_and_no_series() {
    let (c, ns) = setup("mem").await;
    let ctx = Context::new(
        c.clone(),
        Scripted::new(4, 2_500),
        "sluice/worker:test".into(),
    );
    let controller = {
        let (ctx, ns) = (ctx.clone(), ns.clone());
        tokio::spawn(async move { run_in(ctx, Some(&ns)).await })
    };
    let pipelines: Api<StreamPipeline> = Api::namespaced(c.clone(), &ns);
    for name in ["gone", "kept"] {
        let sp: StreamPipeline = serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
            "metadata": {"name": name},
            "spec": {
                "source": {"bootstrapServers": "kafka:9092", "topic": "in", "groupId": name},
                "sinks": [{"kafka": {"topic": "out"}}],
                "scaling": {"pollInterval": "1s"}
            }
        }))
        .unwrap();
        pipelines.create(&PostParams::default(), &sp).await.unwrap();
    }
    // Both reconciled: remembered, with their lag, replicas and decision series.
    for name in ["gone", "kept"] {
        until(
            &format!("{name} reconciled"),
            Duration::from_secs(60),
            || ctx.remembers(&ns, name) && series(&ctx, &ns, name) >= 6,
        )
        .await;
    }

    pipelines
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap();
    until(
        "the deleted pipeline forgotten",
        Duration::from_secs(60),
        || !ctx.remembers(&ns, "gone") && series(&ctx, &ns, "gone") == 0,
    )
    .await;
    // The other one is untouched.
    assert!(ctx.remembers(&ns, "kept"));
    assert!(series(&ctx, &ns, "kept") >= 6);
    controller.abort();
}
