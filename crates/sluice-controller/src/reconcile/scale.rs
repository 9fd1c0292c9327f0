//! Replicas: paused is zero, manual is `spec.replicas`, and otherwise the autoscaler
//! decides from lag read from Kafka, at most once per poll interval (reconciles caused by
//! status updates and child events reuse the last decision). The decision itself
//! ([`decide`]) is pure over the pipeline's memory.

use std::time::{Duration, Instant};

use kube::ResourceExt;
use sluice_api::config::StartFrom;
use sluice_api::crd::{ScalingMode, StreamPipeline};

use super::dereference::Found;
use super::status::Limited;
use super::Stop;
use crate::autoscale::lag::{LagError, PartitionLag};
use crate::autoscale::policy::{Lag, Policy, Reason};
use crate::autoscale::stall::stall_window;
use crate::context::{Context, Paced, PipelineKey, PipelineMemory};
use crate::kafka::{LagOf, Query};

/// The replicas to run and what the autoscaler saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scale {
    /// Replicas to run.
    pub replicas: u32,
    /// The autoscaler decided (automatic mode): `lag` and `desired` are its.
    pub decided: bool,
    /// Total lag, when known.
    pub lag: Option<i64>,
    /// What the lag alone asks for.
    pub desired: Option<i32>,
    /// Lag could not be read: why.
    pub lag_unknown: Option<String>,
    /// A cap that bound the replicas.
    pub limited: Option<Limited>,
    /// Stalled partitions (`topic/partition`).
    pub stalled: Vec<String>,
    /// Scaled to zero: why, and what wakes it.
    pub idle: Option<String>,
    /// `minReplicas` is 0 but the pipeline may not idle: why.
    pub idle_blocked: Option<String>,
    /// Woken from zero by this decision.
    pub woke: bool,
}

/// Whether the autoscaler will decide for `sp` in this reconcile (so the lag is needed):
/// automatic and not paused, and no decision of this generation within the poll interval.
pub(crate) fn due(ctx: &Context, sp: &StreamPipeline) -> bool {
    if sp.spec.paused || sp.spec.scaling.mode == ScalingMode::Manual {
        return false;
    }
    let key = PipelineKey::new(sp.namespace().unwrap_or_default(), sp.name_any());
    let uid = sp.metadata.uid.clone().unwrap_or_default();
    let poll = sp.spec.scaling.poll_interval.0.max(Duration::from_secs(1));
    ctx.memory(&key, &uid, |m| {
        !m.paced
            .as_ref()
            .is_some_and(|p| p.at.elapsed() < poll && p.generation == sp.metadata.generation)
    })
}

/// The replicas for `sp`, given what was found.
pub async fn scale(ctx: &Context, sp: &StreamPipeline, found: &Found) -> Result<Scale, Stop> {
    let key = PipelineKey::new(sp.namespace().unwrap_or_default(), sp.name_any());
    let uid = sp.metadata.uid.clone().unwrap_or_default();
    let scaling = &sp.spec.scaling;
    let partitions = found.partitions;
    if sp.spec.paused {
        ctx.memory(&key, &uid, |m| m.paced = None);
        return Ok(Scale::default());
    }
    if scaling.mode == ScalingMode::Manual {
        ctx.memory(&key, &uid, |m| m.paced = None);
        return Ok(Scale {
            replicas: (sp.spec.replicas.max(0) as u32).min(partitions),
            limited: Limited::manual(sp.spec.replicas, partitions),
            ..Default::default()
        });
    }
    let poll = scaling.poll_interval.0.max(Duration::from_secs(1));
    let generation = sp.metadata.generation;
    let last = ctx.memory(&key, &uid, |m| {
        m.paced
            .as_ref()
            .filter(|p| {
                p.at.elapsed() < poll && p.generation == generation && p.partitions == partitions
            })
            .map(|p| p.scale.clone())
    });
    if let Some(scale) = last {
        return Ok(scale);
    }
    let read = match &found.lag {
        Some(read) => read.clone(),
        // Not read with the partition count (the count changed since the last decision).
        None => {
            let query = Query {
                topics: found.topics.clone(),
                lag: Some(LagOf {
                    group: sp.spec.source.group_id.clone(),
                    start: sp.spec.source.start_from,
                }),
            };
            let answer = ctx.reads.ask(&found.connection, &found.kafka, query).await;
            answer.lag.expect("asked for the lag")
        }
    };
    let now = Instant::now();
    let (scale, reason) = ctx.memory(&key, &uid, |m| {
        let (scale, reason) = decide(m, now, sp, read, found);
        m.paced = Some(Paced {
            at: now,
            generation,
            partitions,
            scale: scale.clone(),
        });
        (scale, reason)
    });
    let labels = [key.namespace.as_str(), key.name.as_str()];
    if let Some(lag) = scale.lag {
        ctx.metrics.lag.with_label_values(&labels).set(lag);
    }
    ctx.metrics
        .decisions
        .with_label_values(&[labels[0], labels[1], reason.label()])
        .inc();
    Ok(scale)
}

/// One paced decision from a lag reading: pure over the pipeline's memory.
pub(crate) fn decide(
    memory: &mut PipelineMemory,
    now: Instant,
    sp: &StreamPipeline,
    read: Result<Vec<PartitionLag>, LagError>,
    found: &Found,
) -> (Scale, Reason) {
    let scaling = &sp.spec.scaling;
    let start = sp.spec.source.start_from;
    let Found {
        exists,
        current,
        ready,
        partitions,
        ..
    } = *found;
    let mut scale = Scale {
        replicas: current,
        decided: true,
        ..Default::default()
    };
    let lag = match read {
        Ok(parts) => {
            let total: u64 = parts.iter().map(|p| p.lag).sum();
            // Only running workers can be stalled; with none ready, WorkersNotReady
            // already says why nothing moves.
            if ready > 0 {
                scale.stalled =
                    memory
                        .stalls
                        .observe(now, &parts, stall_window(scaling.poll_interval.0));
            } else {
                // No worker runs (scaled to zero, paused, starting): forget when the
                // commits last moved, or the first poll after workers are back (a wake
                // from zero) would count the time without any as a stall.
                memory.stalls = Default::default();
            }
            // Lag more replicas can reduce: not on stalled partitions.
            let moving = parts.iter().filter(|p| {
                p.lag > 0
                    && (scale.stalled.is_empty()
                        || !scale
                            .stalled
                            .contains(&format!("{}/{}", p.topic, p.partition)))
            });
            let (records, busy) = moving.fold((0u64, 0u32), |(r, b), p| (r + p.lag, b + 1));
            scale.lag = Some(total as i64);
            // Records ever written, to tell "no new records" from "consumed at once". A
            // group that starts at the end of the log and has a partition with no commit
            // must not idle: woken, its workers would start after the records that woke it.
            let uncommitted: Vec<String> = parts
                .iter()
                .filter(|p| p.committed.is_none())
                .map(|p| format!("{}/{}", p.topic, p.partition))
                .collect();
            let written = if start == StartFrom::Latest && !uncommitted.is_empty() {
                if scaling.min_replicas == 0 {
                    scale.idle_blocked = Some(format!(
                        "source.startFrom is latest and partition(s) {} have no committed offset: scaled to zero, the workers would start after the records that woke them, so the pipeline stays up until every partition has a commit",
                        super::status::listed(&uncommitted)
                    ));
                }
                None
            } else {
                Some(parts.iter().map(|p| p.high).sum::<i64>())
            };
            Lag::with_writes(records, busy, total, written)
        }
        Err(e) => {
            scale.lag_unknown = Some(e.to_string());
            Lag::Unknown
        }
    };
    let policy = Policy::from(scaling);
    // A Deployment that does not exist yet starts from the minimum (1 for a pipeline that
    // may scale to zero: it idles once quiet), and nothing of it can be "not ready" yet.
    let (base, ready) = if exists {
        (current, ready)
    } else {
        let m = policy.min.max(1).min(partitions);
        (m, m)
    };
    let d = memory
        .autoscaler
        .decide(now, base, ready, lag, partitions, &policy);
    scale.desired = d.desired.map(|r| r as i32);
    scale.replicas = d.replicas;
    scale.woke = d.reason == Reason::Wake;
    if matches!(d.reason, Reason::Idle | Reason::ScaleToZero) {
        scale.idle = Some(format!(
            "no lag and no new records for {}: scaled to zero; {} record(s) of lag wake it (checked every {})",
            sluice_api::units::HumanDuration(policy.idle_after.unwrap_or_default()),
            policy.activation,
            scaling.poll_interval,
        ));
    }
    scale.limited = d
        .limited
        .map(|l| Limited::new(l, policy.min, policy.max, partitions));
    (scale, d.reason)
}
