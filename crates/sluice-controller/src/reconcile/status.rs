//! Conditions, computed purely from what the reconcile observed, and every reason a
//! condition or an Event of the controller can carry: the words a user reads in
//! `kubectl describe` are all here.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::autoscale::policy::Limit;

/// What stops a reconcile before its children are applied: `Ready=False` with this reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocker {
    /// The spec is invalid: the message says how to fix it.
    InvalidSpec(String),
    /// A child's name is taken by an object the pipeline does not own.
    ResourceConflict(String),
    /// The input topic does not exist.
    TopicNotFound(String),
    /// Kafka could not be reached.
    KafkaUnavailable(String),
    /// The SASL password's Secret (or its key) is missing.
    SecretNotFound(String),
    /// The API server refused or failed a child.
    Child(ChildReason, String),
}

impl Blocker {
    /// The condition's (and the Event's) reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Blocker::InvalidSpec(_) => "InvalidSpec",
            Blocker::ResourceConflict(_) => "ResourceConflict",
            Blocker::TopicNotFound(_) => "TopicNotFound",
            Blocker::KafkaUnavailable(_) => "KafkaUnavailable",
            Blocker::SecretNotFound(_) => "SecretNotFound",
            Blocker::Child(r, _) => r.reason(),
        }
    }

    /// What a person can act on.
    pub fn message(&self) -> &str {
        match self {
            Blocker::InvalidSpec(m)
            | Blocker::ResourceConflict(m)
            | Blocker::TopicNotFound(m)
            | Blocker::KafkaUnavailable(m)
            | Blocker::SecretNotFound(m)
            | Blocker::Child(_, m) => m,
        }
    }
}

/// An API error about one child, in a bounded category.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildReason {
    /// 400, 422: the request itself is wrong.
    Rejected,
    /// 401, 403.
    Forbidden,
    /// 404.
    NotFound,
    /// 409.
    Conflict,
    /// 429.
    Throttled,
    /// Anything else.
    ApiError,
}

impl ChildReason {
    /// The category of an API answer's status `code` (`None`: no answer).
    pub fn of(code: Option<u16>) -> Self {
        match code {
            Some(400 | 422) => ChildReason::Rejected,
            Some(401 | 403) => ChildReason::Forbidden,
            Some(404) => ChildReason::NotFound,
            Some(409) => ChildReason::Conflict,
            Some(429) => ChildReason::Throttled,
            _ => ChildReason::ApiError,
        }
    }

    /// The condition's (and the Event's) reason.
    pub fn reason(self) -> &'static str {
        match self {
            ChildReason::Rejected => "ChildRejected",
            ChildReason::Forbidden => "ChildForbidden",
            ChildReason::NotFound => "ChildNotFound",
            ChildReason::Conflict => "ChildConflict",
            ChildReason::Throttled => "ChildThrottled",
            ChildReason::ApiError => "ChildApiError",
        }
    }

    /// A refusal that will not change by retrying: wait for a change or a slow retry.
    pub fn permanent(self) -> bool {
        matches!(
            self,
            ChildReason::Rejected | ChildReason::Forbidden | ChildReason::NotFound
        )
    }
}

/// A cap that bound the replicas: `ScalingLimited=True` with this reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limited {
    /// Which cap.
    pub limit: Limit,
    /// What it means here.
    pub message: String,
}

impl Limited {
    /// `limit` with its message, for a policy of `min`..`max` replicas and `partitions`.
    pub fn new(limit: Limit, min: u32, max: u32, partitions: u32) -> Self {
        let message = match limit {
            Limit::MaxReplicas => format!("lag asks for more than maxReplicas ({max})"),
            Limit::Partitions => format!("lag asks for more replicas than the input's {partitions} partitions; extra replicas would idle"),
            Limit::PartitionsWithLag => "the lag sits on fewer partitions than it would take replicas; a replica per partition with lag is the most that helps".to_string(),
            Limit::MinAbovePartitions => format!("minReplicas ({min}) is above the input's {partitions} partitions; running {partitions} (a replica without a partition would idle)"),
        };
        Limited { limit, message }
    }

    /// Manual scaling asked for `asked` replicas of a topic with fewer `partitions`.
    pub fn manual(asked: i32, partitions: u32) -> Option<Self> {
        (asked > partitions as i32).then(|| Limited {
            limit: Limit::Partitions,
            message: format!(
                "{asked} replicas asked for, the topic has {partitions} partitions: running {partitions} (a replica without a partition would idle)"
            ),
        })
    }

    /// The condition's reason.
    pub fn reason(&self) -> &'static str {
        match self.limit {
            Limit::MaxReplicas => "AtMaxReplicas",
            Limit::Partitions => "AtPartitionCount",
            Limit::PartitionsWithLag => "LagOnFewPartitions",
            Limit::MinAbovePartitions => "MinReplicasAbovePartitions",
        }
    }
}

/// The Normal Event recorded when replicas change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleEvent {
    /// Up or down on lag.
    Scaled,
    /// No lag and no new records: to zero.
    ScaledToZero,
    /// At zero, the lag reached the activation threshold.
    Woke,
}

impl ScaleEvent {
    /// The Event's reason.
    pub fn reason(self) -> &'static str {
        match self {
            ScaleEvent::Scaled => "Scaled",
            ScaleEvent::ScaledToZero => "ScaledToZero",
            ScaleEvent::Woke => "Woke",
        }
    }
}

/// What one reconcile saw and decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// What stopped the reconcile, if anything did.
    pub blocker: Option<Blocker>,
    /// `spec.paused`.
    pub paused: bool,
    /// Replicas asked of the Deployment.
    pub desired: u32,
    /// Ready worker pods.
    pub ready: u32,
    /// Lag could not be read (the autoscaler holds).
    pub lag_unknown: Option<String>,
    /// A cap bound the autoscaler.
    pub limited: Option<Limited>,
    /// Partitions with lag whose committed offset stood still for the stall window.
    pub stalled: Vec<String>,
    /// Scaled to zero for want of records: why, and what wakes it.
    pub idle: Option<String>,
    /// `minReplicas` is 0 but the pipeline may not idle: why.
    pub idle_blocked: Option<String>,
    /// A worker pod the scheduler cannot place: which, and the scheduler's reason.
    pub unschedulable: Option<String>,
    /// The group has had no member for most of Kafka's offsets retention (see
    /// [`offsets_expiring`]): what will happen, when, and what to do.
    pub offsets_expiring: Option<OffsetsExpiring>,
}

/// A group whose committed offsets Kafka will delete soon, or has deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffsetsExpiring {
    /// The condition's reason: `GroupEmptyTooLong` before the retention runs out,
    /// `OffsetsProbablyDeleted` after.
    pub reason: &'static str,
    /// What a person can act on.
    pub message: String,
}

/// How much of the offsets retention may pass without a member before the warning.
const OFFSETS_WARN_AT: f64 = 0.75;

/// Kafka deletes the committed offsets of a group that has had no member for its
/// `offsets.retention.minutes` (KIP-211: the clock starts when the last member leaves;
/// committing again without joining does not restart it). A pipeline at zero workers
/// (idle or paused) since `empty_since` is warned about once three quarters of
/// `retention` have passed at `now`: woken after the deletion, its group would start over
/// from `startFrom` (`earliest`: everything read again; `latest`: the records in between
/// skipped). The message holds instants, not ages, so it does not change at every poll.
pub fn offsets_expiring(
    group: &str,
    empty_since: Option<Timestamp>,
    now: Timestamp,
    retention: Duration,
) -> Option<OffsetsExpiring> {
    let since = empty_since?;
    let retention_s = retention.as_secs() as i64;
    let elapsed = now.as_second() - since.as_second();
    if (elapsed as f64) < retention_s as f64 * OFFSETS_WARN_AT {
        return None;
    }
    let deleted_at = Timestamp::from_second(since.as_second().saturating_add(retention_s))
        .unwrap_or(Timestamp::MAX);
    let since = Timestamp::from_second(since.as_second()).unwrap_or(since);
    let retention = humantime::format_duration(Duration::from_secs(retention_s as u64));
    let then = "a worker that joins then starts over from source.startFrom (earliest: every record read again; latest: the records in between skipped)";
    Some(if elapsed < retention_s {
        OffsetsExpiring {
            reason: "GroupEmptyTooLong",
            message: format!("consumer group {group:?} has had no worker since {since}; Kafka deletes the committed offsets of a group without members after offsets.retention.minutes ({retention}, the controller's --offsets-retention), at {deleted_at}, and {then}. Let a worker run before then (spec.paused: false, or scaling.minReplicas: 1 for a while), or raise offsets.retention.minutes"),
        }
    } else {
        OffsetsExpiring {
            reason: "OffsetsProbablyDeleted",
            message: format!("consumer group {group:?} has had no worker since {since}, longer than offsets.retention.minutes ({retention}, the controller's --offsets-retention): Kafka has probably deleted its committed offsets (at {deleted_at}), and {then}"),
        }
    })
}

impl Observed {
    /// Only `blocker`.
    pub fn blocked(blocker: Blocker) -> Self {
        Observed {
            blocker: Some(blocker),
            ..Default::default()
        }
    }
}

fn cond(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }
}

/// `items` for a condition's message: the first 20, then how many more (a pattern over many
/// topics can name thousands of partitions).
pub fn listed(items: &[String]) -> String {
    const SHOWN: usize = 20;
    if items.len() <= SHOWN {
        items.join(", ")
    } else {
        format!(
            "{} and {} more",
            items[..SHOWN].join(", "),
            items.len() - SHOWN
        )
    }
}

/// The conditions Ready, Progressing, Degraded, PartitionStalled, ScalingLimited, Paused,
/// Idle and OffsetsExpiring. A condition
/// whose status did not change keeps its previous `lastTransitionTime`.
pub fn conditions(o: &Observed, generation: Option<i64>, previous: &[Condition]) -> Vec<Condition> {
    let mut out = Vec::new();
    let (ready, reason, message) = if let Some(b) = &o.blocker {
        (false, b.reason(), b.message().to_string())
    } else if o.paused {
        (
            false,
            "Paused",
            "spec.paused is true: workers are scaled to zero, committed offsets are kept"
                .to_string(),
        )
    } else if let Some(m) = o.idle.as_ref().filter(|_| o.desired == 0) {
        (true, "Idle", m.clone())
    } else if o.ready >= o.desired && o.desired > 0 {
        (
            true,
            "WorkersReady",
            format!("{} of {} workers ready", o.ready, o.desired),
        )
    } else if let Some(why) = &o.unschedulable {
        (
            false,
            "WorkersUnschedulable",
            format!("{} of {} workers ready; {why}", o.ready, o.desired),
        )
    } else {
        (
            false,
            "WorkersNotReady",
            format!("{} of {} workers ready", o.ready, o.desired),
        )
    };
    out.push(cond("Ready", ready, reason, message, generation));
    let progressing = o.blocker.is_none() && !o.paused && o.ready < o.desired;
    out.push(cond(
        "Progressing",
        progressing,
        if progressing { "RollingOut" } else { "Stable" },
        if progressing {
            format!("waiting for {} more workers", o.desired - o.ready)
        } else {
            String::new()
        },
        generation,
    ));
    let stall_message = (!o.stalled.is_empty()).then(|| {
        format!(
            "partition(s) {} have lag but their committed offset has not moved: a record may be failing with no dead-letter topic, or a sink may be down (see sluice_partition_stalled and the worker logs)",
            listed(&o.stalled)
        )
    });
    // An invalid spec is not Degraded (nothing runs to degrade); every other blocker is.
    let source_error = o
        .blocker
        .as_ref()
        .filter(|b| !matches!(b, Blocker::InvalidSpec(_)));
    let degraded = source_error.is_some() || o.lag_unknown.is_some() || stall_message.is_some();
    let (dr, dm) = match (source_error, &o.lag_unknown, &stall_message) {
        (Some(b), _, _) => (b.reason().to_string(), b.message().to_string()),
        (None, Some(m), _) => (
            "LagUnknown".into(),
            format!("consumer lag could not be read ({m}); holding the current replicas"),
        ),
        (None, None, Some(m)) => ("PartitionStalled".into(), m.clone()),
        _ => ("AsExpected".into(), String::new()),
    };
    out.push(cond("Degraded", degraded, &dr, dm, generation));
    out.push(cond(
        "PartitionStalled",
        stall_message.is_some(),
        if stall_message.is_some() {
            "CommitNotMoving"
        } else {
            "Flowing"
        },
        stall_message.clone().unwrap_or_default(),
        generation,
    ));
    let (lr, lm) = o
        .limited
        .as_ref()
        .map(|l| (l.reason(), l.message.clone()))
        .unwrap_or(("WithinLimits", String::new()));
    out.push(cond(
        "ScalingLimited",
        o.limited.is_some(),
        lr,
        lm,
        generation,
    ));
    out.push(cond(
        "Paused",
        o.paused,
        if o.paused { "PausedBySpec" } else { "Running" },
        "",
        generation,
    ));
    let (idle, ir, im) = match (&o.idle, &o.idle_blocked) {
        (Some(m), _) if !o.paused => (true, "NoNewRecords", m.clone()),
        (_, Some(m)) => (false, "NoCommittedOffset", m.clone()),
        _ => (false, "Active", String::new()),
    };
    out.push(cond("Idle", idle, ir, im, generation));
    let (or, om) = o
        .offsets_expiring
        .as_ref()
        .map(|e| (e.reason, e.message.clone()))
        .unwrap_or(("Kept", String::new()));
    out.push(cond(
        "OffsetsExpiring",
        o.offsets_expiring.is_some(),
        or,
        om,
        generation,
    ));
    for c in &mut out {
        if let Some(p) = previous.iter().find(|p| p.type_ == c.type_) {
            if p.status == c.status {
                c.last_transition_time = p.last_transition_time.clone();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(cs: &'a [Condition], t: &str) -> &'a Condition {
        cs.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn an_invalid_spec_is_not_ready_and_says_why() {
        let cs = conditions(
            &Observed::blocked(Blocker::InvalidSpec(
                "workers.perPartition: must be between 1 and 256".into(),
            )),
            Some(3),
            &[],
        );
        let r = get(&cs, "Ready");
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert!(r.message.contains("perPartition"));
        assert_eq!(r.observed_generation, Some(3));
    }

    #[test]
    fn a_worker_the_scheduler_cannot_place_is_named_with_the_schedulers_reason() {
        let why = "pod iot-abc cannot be scheduled: 0/1 nodes are available: 1 node(s) had untolerated taint {dedicated: streaming}";
        let cs = conditions(
            &Observed {
                desired: 2,
                ready: 1,
                unschedulable: Some(why.into()),
                ..Default::default()
            },
            Some(1),
            &[],
        );
        let ready = cs.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "WorkersUnschedulable")
        );
        assert_eq!(ready.message, format!("1 of 2 workers ready; {why}"));
    }

    #[test]
    fn paused_reports_paused() {
        let cs = conditions(
            &Observed {
                paused: true,
                ..Default::default()
            },
            None,
            &[],
        );
        assert_eq!(get(&cs, "Paused").status, "True");
        assert_eq!(get(&cs, "Ready").reason, "Paused");
    }

    #[test]
    fn unknown_lag_is_degraded_and_limits_are_reported() {
        let o = Observed {
            desired: 4,
            ready: 4,
            lag_unknown: Some("timeout".into()),
            limited: Some(Limited::new(Limit::Partitions, 1, 10, 4)),
            ..Default::default()
        };
        let cs = conditions(&o, None, &[]);
        assert_eq!(get(&cs, "Ready").status, "True");
        assert_eq!(
            (
                get(&cs, "Degraded").status.as_str(),
                get(&cs, "Degraded").reason.as_str()
            ),
            ("True", "LagUnknown")
        );
        assert_eq!(get(&cs, "ScalingLimited").status, "True");
    }

    #[test]
    fn an_idle_pipeline_is_ready_with_zero_workers_and_says_what_wakes_it() {
        let o = Observed {
            desired: 0,
            ready: 0,
            idle: Some("no lag and no new records for 5m: scaled to zero".into()),
            ..Default::default()
        };
        let cs = conditions(&o, Some(2), &[]);
        let i = get(&cs, "Idle");
        assert_eq!(
            (i.status.as_str(), i.reason.as_str()),
            ("True", "NoNewRecords")
        );
        let r = get(&cs, "Ready");
        assert_eq!((r.status.as_str(), r.reason.as_str()), ("True", "Idle"));
        assert_eq!(get(&cs, "Progressing").status, "False");
        // Paused wins over idle.
        let cs = conditions(
            &Observed {
                paused: true,
                ..o.clone()
            },
            None,
            &[],
        );
        assert_eq!(get(&cs, "Ready").reason, "Paused");
        assert_eq!(get(&cs, "Idle").status, "False");
        // Woken: not idle any more, workers starting.
        let cs = conditions(
            &Observed {
                desired: 1,
                ready: 0,
                ..Default::default()
            },
            None,
            &[],
        );
        assert_eq!(
            (
                get(&cs, "Idle").status.as_str(),
                get(&cs, "Idle").reason.as_str()
            ),
            ("False", "Active")
        );
        assert_eq!(get(&cs, "Ready").reason, "WorkersNotReady");
        let cs = conditions(
            &Observed {
                desired: 1,
                ready: 1,
                idle_blocked: Some("partition 3 has no committed offset".into()),
                ..Default::default()
            },
            None,
            &[],
        );
        assert_eq!(get(&cs, "Idle").reason, "NoCommittedOffset");
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let o = Observed {
            desired: 2,
            ready: 0,
            ..Default::default()
        };
        let first = conditions(&o, None, &[]);
        let mut old = first.clone();
        for c in &mut old {
            c.last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        }
        let again = conditions(&o, None, &old);
        assert_eq!(
            get(&again, "Ready").last_transition_time,
            get(&old, "Ready").last_transition_time
        );
        let changed = conditions(
            &Observed {
                desired: 2,
                ready: 2,
                ..Default::default()
            },
            None,
            &old,
        );
        assert_ne!(
            get(&changed, "Ready").last_transition_time,
            get(&old, "Ready").last_transition_time
        );
    }

    #[test]
    fn a_long_list_in_a_message_names_twenty_and_counts_the_rest() {
        let few: Vec<String> = (0..3).map(|p| format!("in/{p}")).collect();
        assert_eq!(listed(&few), "in/0, in/1, in/2");
        let many: Vec<String> = (0..2_000).map(|p| format!("in/{p}")).collect();
        let m = listed(&many);
        assert!(
            m.starts_with("in/0, in/1") && m.ends_with("in/19 and 1980 more"),
            "{m}"
        );
    }

    #[test]
    fn stalled_partitions_degrade_the_pipeline_and_name_the_partitions() {
        let o = Observed {
            desired: 2,
            ready: 2,
            stalled: vec!["in/0".into(), "in/3".into()],
            ..Default::default()
        };
        let cs = conditions(&o, Some(1), &[]);
        let s = get(&cs, "PartitionStalled");
        assert_eq!(
            (s.status.as_str(), s.reason.as_str()),
            ("True", "CommitNotMoving")
        );
        assert!(s.message.contains("in/0, in/3"), "{}", s.message);
        let d = get(&cs, "Degraded");
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "PartitionStalled")
        );
        assert_eq!(
            get(&cs, "Ready").status,
            "True",
            "the workers are up; the data is not moving"
        );
        let ok = conditions(
            &Observed {
                desired: 2,
                ready: 2,
                ..Default::default()
            },
            Some(1),
            &cs,
        );
        assert_eq!(get(&ok, "PartitionStalled").status, "False");
        assert_eq!(get(&ok, "Degraded").status, "False");
    }

    /// N9: a group without members loses its committed offsets after Kafka's retention;
    /// a pipeline at zero is warned about at three quarters of it, told after it, and the
    /// message does not change from one poll to the next (no status write per poll).
    #[test]
    fn a_pipeline_at_zero_is_warned_before_its_offsets_expire() {
        let day: i64 = 24 * 3600;
        let week = Duration::from_secs(7 * day as u64);
        let t = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
        assert_eq!(
            offsets_expiring("g", None, t(30 * day), week),
            None,
            "running, or never ran"
        );
        assert_eq!(
            offsets_expiring("g", Some(t(0)), t(5 * day), week),
            None,
            "5 of 7 days"
        );
        let warned = offsets_expiring("g", Some(t(0)), t(5 * day + day / 4), week).unwrap();
        assert_eq!(warned.reason, "GroupEmptyTooLong");
        for part in [
            "\"g\"",
            "7days",
            &t(0).to_string(),
            &t(7 * day).to_string(),
            "latest",
        ] {
            assert!(
                warned.message.contains(part),
                "{part} in {}",
                warned.message
            );
        }
        let later = offsets_expiring("g", Some(t(0)), t(6 * day), week).unwrap();
        assert_eq!(later, warned, "the same words a day later");
        let gone = offsets_expiring("g", Some(t(0)), t(7 * day), week).unwrap();
        assert_eq!(gone.reason, "OffsetsProbablyDeleted");
        // The condition.
        let o = Observed {
            idle: Some("no new records".into()),
            offsets_expiring: Some(warned),
            ..Default::default()
        };
        let cs = conditions(&o, Some(1), &[]);
        let c = get(&cs, "OffsetsExpiring");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "GroupEmptyTooLong")
        );
        assert_eq!(get(&cs, "Ready").reason, "Idle", "still idle and ready");
        let running = conditions(&Observed::default(), Some(1), &cs);
        let c = get(&running, "OffsetsExpiring");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Kept"));
    }
}
