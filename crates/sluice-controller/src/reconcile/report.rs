//! What a reconcile tells: the status (written from here only, and only when it differs
//! from what the object shows), Warning Events when a blocker appears, a Normal Event when
//! replicas change, and the per-pipeline metrics.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use sluice_api::crd::{StreamPipeline, StreamPipelineStatus};

use super::apply::pipeline_resource;
use super::build::selector_string;
use super::dereference::Found;
use super::scale::Scale;
use super::status::{conditions, offsets_expiring, Blocker, ChildReason, Observed, ScaleEvent};
use super::Stop;
use crate::api::Verb;
use crate::context::{Context, PipelineKey, MANAGER};
use crate::error::{Error, Result};

/// The status of one pipeline as this reconcile found it, and where to report.
#[derive(Debug)]
pub struct Report {
    key: PipelineKey,
    uid: String,
    generation: Option<i64>,
    obj_ref: ObjectReference,
    /// What the object shows.
    previous: StreamPipelineStatus,
    /// What every status this reconcile writes starts from.
    base: StreamPipelineStatus,
}

impl Report {
    /// The report of a parsed pipeline.
    pub fn of(sp: &StreamPipeline) -> Self {
        let previous = sp.status.clone().unwrap_or_default();
        let name = sp.name_any();
        Report {
            key: PipelineKey::new(sp.namespace().unwrap_or_default(), name.clone()),
            uid: sp.metadata.uid.clone().unwrap_or_default(),
            generation: sp.metadata.generation,
            obj_ref: sp.object_ref(&()),
            base: StreamPipelineStatus {
                observed_generation: sp.metadata.generation,
                selector: Some(selector_string(&name)),
                ..previous.clone()
            },
            previous,
        }
    }

    /// The report of a stored object that does not parse (its status is read as far as
    /// it goes).
    pub fn unparsed(obj: &DynamicObject) -> Self {
        let previous: StreamPipelineStatus = obj
            .data
            .get("status")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .unwrap_or_default();
        Report {
            key: PipelineKey::new(obj.namespace().unwrap_or_default(), obj.name_any()),
            uid: obj.metadata.uid.clone().unwrap_or_default(),
            generation: obj.metadata.generation,
            obj_ref: obj.object_ref(&pipeline_resource()),
            base: StreamPipelineStatus {
                observed_generation: obj.metadata.generation,
                ..previous.clone()
            },
            previous,
        }
    }

    /// The one place status is written: server-side apply of the status subresource, when
    /// `status` differs from what the object shows.
    async fn write(&self, ctx: &Context, status: StreamPipelineStatus) -> Result<(), kube::Error> {
        if status == self.previous {
            return Ok(());
        }
        // Untyped: the answer is the whole object, which need not parse (a poison spec).
        let api: Api<DynamicObject> = Api::namespaced_with(
            ctx.client.clone(),
            &self.key.namespace,
            &pipeline_resource(),
        );
        let patch = serde_json::json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "StreamPipeline", "status": status});
        ctx.api.take(Verb::Patch).await;
        api.patch_status(
            &self.key.name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        Ok(())
    }

    /// Report a blocker: `Ready=False` with its reason and message, and a Warning Event when
    /// the reason is new (or the spec is invalid).
    async fn refuse(
        &self,
        ctx: &Context,
        blocker: Blocker,
        action: &str,
    ) -> Result<(), kube::Error> {
        let reason = blocker.reason();
        // One Event when the reason appears (a Kafka error's text varies from poll to poll);
        // an invalid spec is reconciled only when it changes, so each version gets its Event.
        let new = !self
            .previous
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.reason == reason);
        let message = blocker.message().to_string();
        let invalid = matches!(blocker, Blocker::InvalidSpec(_));
        let status = StreamPipelineStatus {
            conditions: conditions(
                &Observed::blocked(blocker),
                self.generation,
                &self.previous.conditions,
            ),
            ..self.base.clone()
        };
        let written = self.write(ctx, status).await;
        if new || invalid {
            publish(
                ctx,
                &self.obj_ref,
                EventType::Warning,
                reason,
                message,
                action,
            )
            .await;
        }
        written
    }

    /// The reconcile went through: the Event of a replica change, the metrics, the status.
    pub async fn done(
        &self,
        ctx: &Context,
        sp: &StreamPipeline,
        found: &Found,
        scale: &Scale,
    ) -> Result<(), Stop> {
        let mut status = StreamPipelineStatus {
            partitions: Some(found.partitions as i32),
            ..self.base.clone()
        };
        if scale.decided {
            status.lag = scale.lag.or(status.lag);
            status.desired_replicas = scale.desired;
        }
        let replicas = scale.replicas;
        let current = found.current;
        let now = k8s_openapi::jiff::Timestamp::now();
        if found.exists && replicas != current {
            status.last_scale_time = Some(Time(now));
            let event = if scale.idle.is_some() {
                ScaleEvent::ScaledToZero
            } else if scale.woke {
                ScaleEvent::Woke
            } else {
                ScaleEvent::Scaled
            };
            publish(
                ctx,
                &self.obj_ref,
                EventType::Normal,
                event.reason(),
                format!(
                    "workers {current} -> {replicas} (lag {:?}, {} partitions)",
                    status.lag, found.partitions
                ),
                "Scale",
            )
            .await;
        }
        let labels = [self.key.namespace.as_str(), self.key.name.as_str()];
        let m = &ctx.metrics;
        m.desired.with_label_values(&labels).set(replicas as i64);
        m.current.with_label_values(&labels).set(current as i64);
        m.ready.with_label_values(&labels).set(found.ready as i64);
        m.limited
            .with_label_values(&labels)
            .set(scale.limited.is_some() as i64);
        let observed = Observed {
            blocker: None,
            paused: sp.spec.paused,
            desired: replicas,
            ready: found.ready,
            lag_unknown: scale.lag_unknown.clone(),
            limited: scale.limited.clone(),
            stalled: scale.stalled.clone(),
            idle: scale.idle.clone(),
            idle_blocked: scale.idle_blocked.clone(),
            unschedulable: found.unschedulable.clone(),
            // At zero since the scale to zero: the group has had no member since about
            // then (the workers drain and leave within their grace period). A pipeline
            // that never scaled (created paused) has no clock.
            offsets_expiring: offsets_expiring(
                &sp.spec.source.group_id,
                ctx.memory(&self.key, &self.uid, |m| {
                    if replicas > 0 {
                        m.zero_since = None;
                    } else if let Some(t) = &status.last_scale_time {
                        return Some(*m.zero_since.get_or_insert(t.0));
                    }
                    m.zero_since
                }),
                now,
                ctx.offsets_retention(),
            ),
        };
        status.replicas = Some(replicas as i32);
        status.conditions = conditions(&observed, self.generation, &self.previous.conditions);
        let warned = |cs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
            cs.iter()
                .find(|c| c.type_ == "OffsetsExpiring")
                .map(|c| (c.status == "True", c.reason.clone()))
        };
        let expiring = warned(&status.conditions);
        let new_warning = expiring.as_ref().is_some_and(|(on, _)| *on)
            && warned(&self.previous.conditions) != expiring;
        if let (true, Some(e)) = (new_warning, &observed.offsets_expiring) {
            publish(
                ctx,
                &self.obj_ref,
                EventType::Warning,
                e.reason,
                e.message.clone(),
                "Scale",
            )
            .await;
        }
        self.write(ctx, status).await?;
        Ok(())
    }

    /// How the reconcile ends: a stop becomes its condition, and the next attempt.
    pub async fn finish(&self, ctx: &Context, done: Result<Action, Stop>) -> Result<Action> {
        match done {
            Ok(action) => {
                ctx.memory(&self.key, &self.uid, |m| m.failures = 0);
                ctx.metrics.reconciled("ok");
                Ok(action)
            }
            Err(Stop::Blocked {
                blocker,
                action,
                result,
                retry,
            }) => {
                self.refuse(ctx, blocker, action).await?;
                ctx.metrics.reconciled(result);
                Ok(retry.map_or_else(Action::await_change, Action::requeue))
            }
            Err(Stop::Child { kind, name, error }) => {
                let (code, message) = match &error {
                    kube::Error::Api(ae) => (Some(ae.code), ae.message.clone()),
                    e => (None, e.to_string()),
                };
                let reason = ChildReason::of(code);
                let blocker = Blocker::Child(reason, format!("{kind} {name:?}: {message}"));
                // The API server may be what failed: the error is what matters, not this write.
                let _ = self.refuse(ctx, blocker, "Apply").await;
                if reason.permanent() {
                    ctx.metrics.reconciled("child_rejected");
                    Ok(Action::requeue(Duration::from_secs(60)))
                } else {
                    Err(Error::Kube(error))
                }
            }
            Err(Stop::Gone) => Ok(Action::await_change()),
            Err(Stop::Failed(e)) => Err(e),
        }
    }
}

/// Record an Event about the pipeline; a failure to record is logged, never fatal.
async fn publish(
    ctx: &Context,
    obj_ref: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
    action: &str,
) {
    ctx.api.take(Verb::Create).await;
    let published = ctx
        .recorder
        .publish(
            &Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: action.into(),
                secondary: None,
            },
            obj_ref,
        )
        .await;
    if let Err(e) = published {
        tracing::warn!(error = %e, reason, "could not publish an Event");
    }
}
