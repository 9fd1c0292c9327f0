//! The controller: a kube-runtime Controller over StreamPipelines that owns their
//! Deployments, ConfigMaps, Services and PodDisruptionBudgets, and calls
//! [`reconcile`](crate::reconcile::reconcile) for each (the steps are in `reconcile/`).
//! An invalid spec waits for a change; transient errors back off exponentially.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::DynamicObject;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use sluice_api::crd::StreamPipelineSpec;

pub use crate::api::ApiLimits;
use crate::cache::Cache;
pub use crate::context::{Context, PipelineKey, MANAGER};
pub use crate::error::Error;
pub use crate::kafka::{KafkaInspector, RdKafka};
pub use crate::metrics::ControllerMetrics;
pub use crate::reconcile::apply::pipeline_resource;
pub use crate::reconcile::dereference::service_monitor_resource;
pub use crate::reconcile::reconcile;
use crate::reconcile::report::Report;
use crate::reconcile::status::Blocker;
use crate::reconcile::{validate, Stop};

/// Reconciles running at once (the others wait in the queue). A steady reconcile spends
/// most of its time waiting for its lag read, which joins the connection's next Kafka batch
/// (kafka/reads.rs: a 100 ms linger, then one batch at a time), so the reconciles running
/// at once are also the most queries a batch holds. At 128, 10,000 pipelines polled every
/// 30 s (333 reconciles a second) saturated it: reconciles took 0.5 s on average, about 256
/// a second, the queue fell behind and new pipelines waited behind overdue polls (up to
/// 514 s for their first status). API requests stay bounded by `--api-qps` whatever this is.
const RECONCILES_AT_ONCE: u16 = 1024;

/// How often memory of deleted pipelines (and their metric series) is dropped.
const FORGET_EVERY: Duration = Duration::from_secs(5);

/// Reconcile one StreamPipeline as the API server stored it. It is parsed here, per object:
/// one that does not parse (stored through an older or looser schema) gets `Ready=False,
/// InvalidSpec` naming the field, and every other pipeline goes on reconciling.
pub async fn reconcile_object(obj: Arc<DynamicObject>, ctx: Arc<Context>) -> Result<Action, Error> {
    let e = match validate::parse(&obj) {
        Ok(sp) => return reconcile(Arc::new(sp), ctx).await,
        Err(e) => e,
    };
    let stop = Stop::Blocked {
        blocker: Blocker::InvalidSpec(e.to_string()),
        action: "Validate",
        result: "invalid",
        retry: None,
    };
    Report::unparsed(&obj).finish(&ctx, Err(stop)).await
}

/// Transient errors back off exponentially per object: 1 s, 2 s, 4 s ... up to 5 min.
pub fn error_policy(sp: Arc<DynamicObject>, err: &Error, ctx: Arc<Context>) -> Action {
    let key = PipelineKey::new(sp.namespace().unwrap_or_default(), sp.name_any());
    let uid = sp.metadata.uid.clone().unwrap_or_default();
    let n = ctx.memory(&key, &uid, |m| {
        m.failures += 1;
        m.failures
    });
    ctx.metrics.errors.with_label_values(&[err.label()]).inc();
    ctx.metrics.reconciled("error");
    tracing::warn!(pipeline = %sp.name_any(), category = err.label(), error = %err, attempt = n, "reconcile failed");
    Action::requeue(backoff(n))
}

/// The retry delay after `n` consecutive failures.
pub fn backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

/// Run the controller over every namespace until the stream ends (shutdown signal).
pub async fn run(ctx: Arc<Context>) {
    run_in(ctx, None).await
}

/// Keep of a stored pipeline what reconciles read: not its managed fields, nor the copy of
/// the spec `kubectl apply` leaves in an annotation (both as large as the spec itself).
fn slim_pipeline(o: &mut DynamicObject) {
    o.metadata.managed_fields = None;
    if let Some(a) = o.metadata.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// The pipelines in the namespace of the Secret `secret` (its metadata: the watch has no
/// more) whose pods read it. A pipeline that does not parse reads nothing (it waits for a
/// change of its own).
pub fn readers_of(
    pipelines: &Store<DynamicObject>,
    secret: &ObjectMeta,
) -> Vec<ObjectRef<DynamicObject>> {
    let (ns, name) = (
        secret.namespace.clone(),
        secret.name.clone().unwrap_or_default(),
    );
    pipelines
        .state()
        .into_iter()
        .filter(|p| p.namespace() == ns)
        .filter(|p| {
            p.data
                .get("spec")
                .and_then(|s| serde_json::from_value::<StreamPipelineSpec>(s.clone()).ok())
                .is_some_and(|spec| spec.secret_inputs().iter().any(|(_, r)| r.name == name))
        })
        .map(|p| ObjectRef::from_obj_with(p.as_ref(), pipeline_resource()))
        .collect()
}

/// Run the controller over one namespace (`Some`) or all of them (`None`).
pub async fn run_in(ctx: Arc<Context>, namespace: Option<&str>) {
    let c = ctx.client.clone();
    let cfg = watcher::Config::default;
    let ar = pipeline_resource();
    // Untyped: a stored object the typed client could not parse would fail the whole list
    // and stop every pipeline; each one is parsed in reconcile_object instead.
    let pipelines: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(c.clone(), ns, &ar),
        None => Api::all_with(c.clone(), &ar),
    };
    // The children's watches fill the cache reconciles read, and trigger their owners.
    let (cache, triggers) = Cache::watch(&c, namespace);
    if ctx.cache.set(cache).is_err() {
        tracing::warn!(
            "this context already runs a controller; its reconciles read the first one's watches"
        );
    }
    // The pipelines' own watch, kept slim in the store (no managed fields, no
    // last-applied copy of the spec), and a deleted pipeline forgotten as its deletion
    // arrives (the sweep below catches what a restarted watch missed).
    let writer = reflector::store::Writer::new(ar.clone());
    let store = writer.as_reader();
    let pipelines_read = store.clone();
    let forget_deleted = ctx.clone();
    let stream = watcher(pipelines, cfg().any_semantic())
        .default_backoff()
        .modify(slim_pipeline)
        .reflect(writer)
        .inspect_ok(move |e| {
            if let watcher::Event::Delete(o) = e {
                let key = PipelineKey::new(o.namespace().unwrap_or_default(), o.name_any());
                forget_deleted.forget(&key);
            }
        })
        .applied_objects();
    let controller = Controller::for_stream_with(stream, store.clone(), ar.clone())
        .owns_stream(triggers.deployments)
        .owns_stream(triggers.config_maps)
        .owns_stream(triggers.services)
        .owns_stream(triggers.pdbs)
        // A Secret the pods read changed: reconcile the pipelines that read it, so that the
        // digest on their pod template changes and the workers roll (reconcile/secrets.rs).
        .watches_stream(triggers.secrets, move |s| {
            readers_of(&pipelines_read, &s.metadata)
        })
        // A worker pod that became (or stopped being) unschedulable: its pipeline's Ready
        // condition says so at once rather than at the next poll.
        .watches_stream(triggers.pending_pods, {
            let ar = ar.clone();
            move |p| {
                crate::cache::pipeline_of(&p)
                    .map(|((ns, name), _)| ObjectRef::new_with(&name, ar.clone()).within(&ns))
            }
        });
    // Deleted pipelines: their memory and metric series go (the watch cache is the truth
    // of what exists; it is read once it has its first full list).
    let forgetter = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(FORGET_EVERY);
            let mut ready = false;
            for tick in 1u64.. {
                every.tick().await;
                // Memory children and pipelines gave up goes back to the system now and then.
                if tick % 12 == 0 {
                    crate::trim::release_freed_memory();
                }
                // Asked afresh each time rather than awaited once: the store's readiness
                // wakes only one of the tasks waiting for it (kube-runtime 5's DelayedInit
                // keeps one waker), and the controller waits on it too.
                ready = ready
                    || tokio::time::timeout(Duration::from_millis(10), store.wait_until_ready())
                        .await
                        .is_ok_and(|r| r.is_ok());
                if ready {
                    ctx.forget_missing(|k| {
                        store
                            .get(&ObjectRef::new_with(&k.name, ar.clone()).within(&k.namespace))
                            .is_some()
                    });
                }
            }
        })
    };
    controller
        .with_config(controller::Config::default().concurrency(RECONCILES_AT_ONCE))
        .shutdown_on_signal()
        .run(reconcile_object, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile loop");
            }
        })
        .await;
    forgetter.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_change_reconciles_exactly_the_pipelines_in_its_namespace_that_read_it() {
        use kube::runtime::reflector;
        let mut writer = reflector::store::Writer::<DynamicObject>::new(pipeline_resource());
        let store = writer.as_reader();
        let pipeline = |ns: &str, name: &str, secret: &str| -> DynamicObject {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "source": {"bootstrapServers": "k:9092", "topic": "in", "groupId": "g"},
                    "sinks": [{"kafka": {"topic": "out"}}],
                    "secretFiles": [{"name": "ca.crt", "secretKeyRef": {"name": secret, "key": "ca.crt"}}]
                }
            }))
            .unwrap()
        };
        let mut broken = pipeline("a", "broken", "tls");
        broken.data["spec"]["sinks"] = serde_json::json!("not a list");
        for p in [
            pipeline("a", "reads", "tls"),
            pipeline("a", "other", "other-tls"),
            pipeline("b", "elsewhere", "tls"),
            broken,
        ] {
            writer.apply_watcher_event(&watcher::Event::Apply(p));
        }
        let secret: ObjectMeta =
            serde_json::from_value(serde_json::json!({"name": "tls", "namespace": "a"})).unwrap();
        let names: Vec<String> = readers_of(&store, &secret)
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["reads"]);
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let got: Vec<u64> = (1..=12).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    }
}
