//! Reconciliation of one StreamPipeline, as a visible sequence of steps, each in its own
//! file:
//!
//! 1. [`validate`] (pure): the spec into a worker configuration, or `InvalidSpec`.
//! 2. [`dereference`] (reads): the children that exist (never another's), the Secrets the
//!    Kafka settings need ([`secrets`]), the topic's partition count.
//! 3. [`scale`]: replicas from lag (read from Kafka at most once per poll interval) and the
//!    pure policy.
//! 4. [`build`] (pure): the children.
//! 5. [`apply`]: server-side apply, if the pipeline still exists.
//! 6. [`report`]: the status (written from there only, and only when it changed), Events
//!    and metrics.
//!
//! A step that cannot go on returns a [`Stop`]; [`report`] turns it into a condition and
//! the next attempt (await a change, retry later, or back off). [`status`] holds every
//! reason a condition or an Event carries.

pub mod apply;
pub mod build;
pub mod dereference;
pub mod report;
pub mod scale;
pub mod secrets;
pub mod status;
pub mod validate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::runtime::controller::Action;
use kube::ResourceExt;
use sluice_api::crd::StreamPipeline;

use crate::context::{Context, PipelineKey};
use crate::error::{Error, Result};
use crate::pace;
use build::Validated;
use report::Report;
use status::Blocker;

/// Why a reconcile stops before its end.
#[derive(Debug)]
pub enum Stop {
    /// Report `Ready=False` with the blocker (and a Warning Event), then retry after
    /// `retry`, or wait for a change (`None`). `action` names the step for the Event;
    /// `result` labels the reconcile metric.
    Blocked {
        /// Why.
        blocker: Blocker,
        /// The step, for the Event.
        action: &'static str,
        /// The label of the reconcile metric.
        result: &'static str,
        /// When to try again (`None`: when the object changes).
        retry: Option<Duration>,
    },
    /// The API server failed or refused a request about a child.
    Child {
        /// The child's kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// What the API server said.
        error: kube::Error,
    },
    /// The pipeline was deleted meanwhile: nothing to apply, nothing to report.
    Gone,
    /// A transient failure: back off.
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

impl From<kube::Error> for Stop {
    fn from(e: kube::Error) -> Self {
        Stop::Failed(Error::Kube(e))
    }
}

/// Reconcile one StreamPipeline.
pub async fn reconcile(sp: Arc<StreamPipeline>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    if let Some(wait) = deferred(&ctx, &sp, started) {
        ctx.metrics.reconciled("deferred");
        return Ok(Action::requeue(wait));
    }
    let report = Report::of(&sp);
    let done = steps(&sp, &ctx, &report).await;
    if done.is_ok() {
        ctx.metrics
            .duration
            .with_label_values::<&str>(&[])
            .observe(started.elapsed().as_secs_f64());
    }
    report.finish(&ctx, done).await
}

/// How long to wait before the first look at a pipeline this controller has not seen yet
/// and that was reconciled before (its status is of this generation): until its slot (see
/// [`pace`]). A new pipeline, or a changed spec, is looked at at once.
fn deferred(ctx: &Context, sp: &StreamPipeline, now: Instant) -> Option<Duration> {
    let key = PipelineKey::new(sp.namespace().unwrap_or_default(), sp.name_any());
    let uid = sp.metadata.uid.clone().unwrap_or_default();
    let poll = sp.spec.scaling.poll_interval.0.max(Duration::from_secs(1));
    let known = sp.status.as_ref().is_some_and(|s| {
        s.observed_generation.is_some() && s.observed_generation == sp.metadata.generation
    });
    let start = ctx.memory(&key, &uid, |m| {
        *m.start_at
            .get_or_insert_with(|| now + pace::first_look(known, &uid, poll, pace::wall_clock()))
    });
    (start > now).then(|| start - now)
}

/// The worker configuration of `sp`: validated once per generation of its spec (the spec
/// does not change within one; checking librdkafka's properties builds native configs).
fn validated(
    ctx: &Context,
    sp: &StreamPipeline,
) -> Result<sluice_api::config::WorkerConfig, sluice_api::config::ConfigError> {
    let key = PipelineKey::new(sp.namespace().unwrap_or_default(), sp.name_any());
    let uid = sp.metadata.uid.clone().unwrap_or_default();
    let Some(generation) = sp.metadata.generation else {
        return validate::validate(sp);
    };
    let known = ctx.memory(&key, &uid, |m| {
        m.validated
            .as_ref()
            .filter(|(g, _)| *g == generation)
            .map(|(_, c)| c.clone())
    });
    if let Some(config) = known {
        return Ok(config);
    }
    let config = validate::validate(sp)?;
    ctx.memory(&key, &uid, |m| {
        m.validated = Some((generation, config.clone()))
    });
    Ok(config)
}

/// The steps, in order.
async fn steps(sp: &StreamPipeline, ctx: &Context, report: &Report) -> Result<Action, Stop> {
    // 1. Validate (pure; once per generation). An invalid spec waits for a change.
    let config = validated(ctx, sp).map_err(|e| Stop::Blocked {
        blocker: Blocker::InvalidSpec(e.to_string()),
        action: "Validate",
        result: "invalid",
        retry: None,
    })?;
    // 2. What exists: children (all must be this pipeline's), the Secret, the topic.
    let found = dereference::dereference(ctx, sp, &config).await?;
    // 3. Replicas, decided at most once per poll interval.
    let scale = scale::scale(ctx, sp, &found).await?;
    // 4. Build (pure) and 5. apply the children, if the pipeline is still there.
    let v = Validated {
        pipeline: sp.clone(),
        config,
        partitions: found.partitions,
        image: sp
            .spec
            .image
            .clone()
            .unwrap_or_else(|| ctx.default_image.clone()),
        secrets_digest: found.secrets_digest.clone(),
    };
    let children = build::Children::build(&v, scale.replicas, found.monitors);
    apply::apply(ctx, sp, &found, &children).await?;
    // 6. Status, Events, metrics.
    report.done(ctx, sp, &found, &scale).await?;
    Ok(Action::requeue(
        sp.spec.scaling.poll_interval.0.max(Duration::from_secs(1)),
    ))
}
