//! Reconciler scenarios against a mocked API server (tower-test), in the controller-rs
//! fixtures style: each scenario lists the calls the reconciler must make, and every step
//! checks the method, the path and the request body. Kafka is scripted.

mod support;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use serde_json::{json, Value};
use sluice_api::crd::StreamPipeline;
use sluice_controller::controller::{reconcile, Context};
use support::Scripted;

/// What the mock answers.
enum Reply {
    /// The request body back (server-side apply returns the applied object).
    Echo,
    /// 404 Not Found.
    NotFound,
    /// This object.
    Json(Value),
    /// An API error: status code and message.
    Status(u16, &'static str),
}

/// One expected call.
struct Step {
    method: Method,
    path: &'static str,
    body: Vec<&'static str>,
    reply: Reply,
}

fn step(method: Method, path: &'static str, body: &[&'static str], reply: Reply) -> Step {
    Step {
        method,
        path,
        body: body.to_vec(),
        reply,
    }
}

/// The calls for applying the four children; `replicas` is checked in the Deployment.
/// First the live read of the pipeline itself (not the watch cache): it must still exist.
fn apply_children(deploy_body: &'static str) -> Vec<Step> {
    vec![
        step(
            Method::GET,
            "/apis/sluice.dev/v1alpha1/namespaces/default/streampipelines/p",
            &[],
            Reply::Json(pipeline(json!({}))),
        ),
        step(
            Method::PATCH,
            "/api/v1/namespaces/default/configmaps/p-config?",
            &["config.yaml", "\"ownerReferences\""],
            Reply::Echo,
        ),
        step(
            Method::PATCH,
            "/api/v1/namespaces/default/services/p-metrics?",
            &["\"port\":9095"],
            Reply::Echo,
        ),
        step(
            Method::PATCH,
            "/apis/policy/v1/namespaces/default/poddisruptionbudgets/p?",
            &["maxUnavailable"],
            Reply::Echo,
        ),
        step(
            Method::PATCH,
            "/apis/apps/v1/namespaces/default/deployments/p?",
            &[deploy_body, "\"kind\":\"StreamPipeline\""],
            Reply::Echo,
        ),
    ]
}

/// The metadata of an object of `kind`, owned by the pipeline (uid `u-1`) or not.
fn meta(kind: &str, name: &str, owned: bool) -> Value {
    let owners = if owned {
        json!([{"apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline", "name": "p", "uid": "u-1", "controller": true}])
    } else {
        json!([])
    };
    json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": {"name": name, "namespace": "default", "ownerReferences": owners, "labels": {"app": kind}}
    })
}

/// The ownership check before anything is written: the Deployment (`existing` replicas),
/// then the other children (`others`: what the API server has of each), then whether
/// ServiceMonitors exist.
fn check_children(existing: Option<i32>, others: [Reply; 3]) -> Vec<Step> {
    let [cm, svc, pdb] = others;
    vec![
        get_deployment(existing),
        step(Method::GET, "/api/v1/namespaces/default/configmaps/p-config", &[], cm),
        step(Method::GET, "/api/v1/namespaces/default/services/p-metrics", &[], svc),
        step(Method::GET, "/apis/policy/v1/namespaces/default/poddisruptionbudgets/p", &[], pdb),
        step(Method::GET, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/servicemonitors.monitoring.coreos.com", &[], Reply::NotFound),
    ]
}

/// The ownership check of a pipeline whose children do not exist yet, or are its own.
fn own_children(existing: Option<i32>) -> Vec<Step> {
    match existing {
        None => check_children(None, [Reply::NotFound, Reply::NotFound, Reply::NotFound]),
        Some(r) => check_children(
            Some(r),
            [
                Reply::Json(meta("ConfigMap", "p-config", true)),
                Reply::Json(meta("Service", "p-metrics", true)),
                Reply::Json(meta("PodDisruptionBudget", "p", true)),
            ],
        ),
    }
}

fn get_deployment(existing: Option<i32>) -> Step {
    match existing {
        None => step(
            Method::GET,
            "/apis/apps/v1/namespaces/default/deployments/p",
            &[],
            Reply::NotFound,
        ),
        Some(r) => step(
            Method::GET,
            "/apis/apps/v1/namespaces/default/deployments/p",
            &[],
            Reply::Json(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "p", "namespace": "default", "ownerReferences": [
                    {"apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline", "name": "p", "uid": "u-1", "controller": true}
                ]},
                "spec": {"replicas": r, "selector": {"matchLabels": {"a": "b"}},
                         "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": []}}},
                "status": {"readyReplicas": r}
            })),
        ),
    }
}

fn status(body: &[&'static str]) -> Step {
    step(
        Method::PATCH,
        "/apis/sluice.dev/v1alpha1/namespaces/default/streampipelines/p/status?",
        body,
        Reply::Json(pipeline(json!({}))),
    )
}

fn event(reason: &'static str) -> Step {
    step(
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/default/events",
        &[reason],
        Reply::Echo,
    )
}

fn pipeline(spec_extra: Value) -> Value {
    let mut spec = json!({
        "source": {"bootstrapServers": "kafka:9092", "topic": "in", "groupId": "g"},
        "sinks": [{"kafka": {"topic": "out"}}],
        "scaling": {"minReplicas": 1, "maxReplicas": 10, "lagPerReplica": 1000}
    });
    for (k, v) in spec_extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline",
        "metadata": {"name": "p", "namespace": "default", "uid": "u-1", "generation": 1},
        "spec": spec
    })
}

/// Serve `steps` in order on the mock, checking each request.
fn serve(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    steps: Vec<Step>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut steps: VecDeque<Step> = steps.into();
        let mut served = 0;
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let body =
                String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
            let uri = parts.uri.to_string();
            let s = steps
                .pop_front()
                .unwrap_or_else(|| panic!("unexpected call {} {uri}", parts.method));
            assert_eq!(parts.method, s.method, "call {served}: {uri}");
            assert!(
                uri.starts_with(s.path),
                "call {served}: {} {uri}, expected {}",
                parts.method,
                s.path
            );
            if parts.method == Method::PATCH {
                assert!(
                    uri.contains("fieldManager=sluice-controller") && uri.contains("force=true"),
                    "server-side apply: {uri}"
                );
            }
            for want in &s.body {
                assert!(
                    body.contains(want),
                    "call {served} {uri}: body lacks {want}: {body}"
                );
            }
            let resp = match s.reply {
                Reply::Echo => Response::builder().status(StatusCode::OK).body(Body::from(body.into_bytes())),
                Reply::NotFound => Response::builder().status(StatusCode::NOT_FOUND).body(Body::from(
                    serde_json::to_vec(&json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})).unwrap(),
                )),
                Reply::Json(v) => Response::builder().status(StatusCode::OK).body(Body::from(serde_json::to_vec(&v).unwrap())),
                Reply::Status(code, message) => Response::builder().status(StatusCode::from_u16(code).unwrap()).body(Body::from(
                    serde_json::to_vec(&json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": code, "message": message})).unwrap(),
                )),
            };
            send.send_response(resp.unwrap());
            served += 1;
            if steps.is_empty() {
                break;
            }
        }
        assert!(
            steps.is_empty(),
            "{} expected calls never came",
            steps.len()
        );
        served
    })
}

struct Fixture {
    ctx: Arc<Context>,
    handle: Option<tower_test::mock::Handle<Request<Body>, Response<Body>>>,
}

fn fixture(partitions: u32, lag: i64) -> Fixture {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let kafka = Scripted::new(partitions, lag);
    let ctx = Context::new(client, kafka, "sluice/worker:test".into());
    Fixture {
        ctx,
        handle: Some(handle),
    }
}

impl Fixture {
    /// Run one reconcile of `sp` against `steps`; returns its Action.
    async fn reconcile(&mut self, sp: Value, steps: Vec<Step>) -> Action {
        let handle = self.handle.take().expect("one reconcile per fixture");
        let server = serve(handle, steps);
        let sp: StreamPipeline = serde_json::from_value(sp).unwrap();
        let action = tokio::time::timeout(
            Duration::from_secs(10),
            reconcile(Arc::new(sp), self.ctx.clone()),
        )
        .await
        .expect("reconcile finished")
        .expect("reconcile succeeded");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("all calls made")
            .expect("mock server");
        action
    }
}

#[tokio::test]
async fn create_applies_every_child_at_min_replicas_and_writes_status() {
    let mut f = fixture(8, 0);
    let mut steps = own_children(None);
    steps.extend(apply_children("\"replicas\":1"));
    steps.push(status(&[
        "\"partitions\":8",
        "\"replicas\":1",
        "\"lag\":0",
        "WorkersNotReady",
        "\"selector\"",
    ]));
    let a = f.reconcile(pipeline(json!({})), steps).await;
    assert_eq!(a, Action::requeue(Duration::from_secs(30)));
}

#[tokio::test]
async fn scale_up_on_lag_applies_more_replicas_at_once_and_records_an_event() {
    let mut f = fixture(8, 5_000);
    let mut steps = own_children(Some(1));
    steps.extend(apply_children("\"replicas\":5"));
    steps.push(event("Scaled"));
    steps.push(status(&[
        "\"desiredReplicas\":5",
        "\"replicas\":5",
        "\"lag\":5000",
        "lastScaleTime",
    ]));
    f.reconcile(pipeline(json!({})), steps).await;
}

#[tokio::test]
async fn the_partition_count_caps_replicas_and_reports_scaling_limited() {
    let mut f = fixture(3, 9_000);
    let mut steps = own_children(Some(3));
    steps.extend(apply_children("\"replicas\":3"));
    steps.push(status(&["\"partitions\":3", "AtPartitionCount"]));
    f.reconcile(pipeline(json!({})), steps).await;
}

#[tokio::test]
async fn scale_down_waits_for_the_window() {
    let mut f = fixture(8, 0);
    let mut steps = own_children(Some(5));
    steps.extend(apply_children("\"replicas\":5"));
    steps.push(status(&["\"desiredReplicas\":1", "\"replicas\":5"]));
    f.reconcile(pipeline(json!({})), steps).await;
}

#[tokio::test]
async fn lag_unknown_holds_replicas_and_reports_degraded() {
    let mut f = fixture(8, -1);
    let mut steps = own_children(Some(4));
    steps.extend(apply_children("\"replicas\":4"));
    steps.push(status(&["LagUnknown", "\"replicas\":4"]));
    f.reconcile(pipeline(json!({})), steps).await;
}

#[tokio::test]
async fn paused_scales_to_zero_and_reports_paused() {
    let mut f = fixture(8, 5_000);
    let mut steps = own_children(Some(3));
    steps.extend(apply_children("\"replicas\":0"));
    steps.push(event("Scaled"));
    steps.push(status(&["PausedBySpec", "\"replicas\":0"]));
    f.reconcile(pipeline(json!({"paused": true})), steps).await;
}

#[tokio::test]
async fn an_invalid_spec_writes_a_condition_and_waits_for_a_change() {
    let mut f = fixture(8, 0);
    let steps = vec![
        status(&["InvalidSpec", "feed itself"]),
        event("InvalidSpec"),
    ];
    let a = f
        .reconcile(
            pipeline(json!({"sinks": [{"kafka": {"topic": "in"}}]})),
            steps,
        )
        .await;
    assert_eq!(a, Action::await_change());
}

#[tokio::test]
async fn a_missing_topic_writes_a_condition_and_retries_later() {
    let mut f = fixture(0, 0);
    let mut steps = own_children(None);
    steps.push(status(&["TopicNotFound"]));
    let a = f.reconcile(pipeline(json!({})), steps).await;
    assert_eq!(a, Action::requeue(Duration::from_secs(30)));
}

#[tokio::test]
async fn an_existing_object_the_pipeline_does_not_own_is_a_conflict_and_nothing_is_written() {
    let mut f = fixture(8, 0);
    // A ConfigMap and a Service the user made before the pipeline, with no owner.
    let mut steps = check_children(
        None,
        [
            Reply::Json(meta("ConfigMap", "p-config", false)),
            Reply::Json(meta("Service", "p-metrics", false)),
            Reply::NotFound,
        ],
    );
    // No PATCH of any child: the next call is the status, then the Event.
    steps.push(status(&[
        "ResourceConflict",
        "ConfigMap \\\"p-config\\\"",
        "Service \\\"p-metrics\\\"",
        "will not modify or adopt",
    ]));
    steps.push(event("ResourceConflict"));
    let a = f.reconcile(pipeline(json!({})), steps).await;
    assert_eq!(a, Action::requeue(Duration::from_secs(30)));
}

#[tokio::test]
async fn a_child_the_api_server_refuses_is_a_condition_with_its_message_and_an_event() {
    let mut f = fixture(8, 0);
    let mut steps = own_children(None);
    steps.extend(apply_children("\"replicas\":1").into_iter().take(4));
    steps.push(step(
        Method::PATCH,
        "/apis/apps/v1/namespaces/default/deployments/p?",
        &[],
        Reply::Status(422, "Deployment.apps \"p\" is invalid: spec.template.spec.containers[0].resources.requests: Invalid value: \"2\": must be less than or equal to cpu limit of 1"),
    ));
    steps.push(status(&[
        "ChildRejected",
        "must be less than or equal to cpu limit",
    ]));
    steps.push(event("ChildRejected"));
    let a = f.reconcile(pipeline(json!({})), steps).await;
    assert_eq!(a, Action::requeue(Duration::from_secs(60)));
}

/// A reconcile from a watch cache that has not seen the deletion yet: the live read finds
/// the pipeline gone, so nothing is applied (the children are the garbage collector's)
/// and no status is written.
#[tokio::test]
async fn a_pipeline_deleted_during_its_reconcile_gets_no_children_applied() {
    let mut f = fixture(8, 0);
    let mut steps = own_children(Some(2));
    steps.push(step(
        Method::GET,
        "/apis/sluice.dev/v1alpha1/namespaces/default/streampipelines/p",
        &[],
        Reply::NotFound,
    ));
    let a = f.reconcile(pipeline(json!({})), steps).await;
    assert_eq!(a, Action::await_change());
}

#[tokio::test]
async fn a_reconcile_within_the_poll_interval_reuses_the_last_decision() {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let kafka = Scripted::new(8, 0);
    let ctx = Context::new(
        Client::new(service, "default"),
        kafka.clone(),
        "sluice/worker:test".into(),
    );
    let mut steps = own_children(Some(2));
    steps.extend(apply_children("\"replicas\":2"));
    steps.push(status(&["\"replicas\":2"]));
    // Lag jumps; a status-triggered reconcile right after must not act on it.
    let mut again = own_children(Some(2));
    again.remove(4); // the ServiceMonitor CRD answer is cached
    steps.extend(again);
    steps.extend(apply_children("\"replicas\":2"));
    steps.push(status(&["\"replicas\":2"]));
    let server = serve(handle, steps);
    let sp: StreamPipeline = serde_json::from_value(pipeline(json!({}))).unwrap();
    let sp = Arc::new(sp);
    reconcile(sp.clone(), ctx.clone()).await.unwrap();
    kafka.lag.store(8_000, std::sync::atomic::Ordering::SeqCst);
    reconcile(sp, ctx).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("all calls made")
        .expect("mock server");
}
