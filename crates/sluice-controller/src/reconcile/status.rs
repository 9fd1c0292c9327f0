//! Conditions, computed purely from what the reconcile observed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// What one reconcile saw and decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The spec is invalid: the message says how to fix it.
    pub invalid: Option<String>,
    /// The input topic could not be found or Kafka could not be reached.
    pub source_error: Option<(String, String)>,
    /// `spec.paused`.
    pub paused: bool,
    /// Replicas asked of the Deployment.
    pub desired: u32,
    /// Ready worker pods.
    pub ready: u32,
    /// Lag could not be read (the autoscaler holds).
    pub lag_unknown: Option<String>,
    /// A cap bound the autoscaler: (reason, message).
    pub limited: Option<(String, String)>,
    /// Partitions with lag whose committed offset stood still for the stall window.
    pub stalled: Vec<i32>,
    /// Scaled to zero for want of records: why, and what wakes it.
    pub idle: Option<String>,
    /// `minReplicas` is 0 but the pipeline may not idle: why.
    pub idle_blocked: Option<String>,
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

/// The conditions Ready, Progressing, Degraded, PartitionStalled, ScalingLimited, Paused
/// and Idle. A condition
/// whose status did not change keeps its previous `lastTransitionTime`.
pub fn conditions(o: &Observed, generation: Option<i64>, previous: &[Condition]) -> Vec<Condition> {
    let mut out = Vec::new();
    let (ready, reason, message) = if let Some(m) = &o.invalid {
        (false, "InvalidSpec", m.clone())
    } else if let Some((r, m)) = &o.source_error {
        (false, r.as_str(), m.clone())
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
    } else {
        (
            false,
            "WorkersNotReady",
            format!("{} of {} workers ready", o.ready, o.desired),
        )
    };
    out.push(cond("Ready", ready, reason, message, generation));
    let progressing =
        o.invalid.is_none() && o.source_error.is_none() && !o.paused && o.ready < o.desired;
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
            o.stalled
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    });
    let degraded = o.source_error.is_some() || o.lag_unknown.is_some() || stall_message.is_some();
    let (dr, dm) = match (&o.source_error, &o.lag_unknown, &stall_message) {
        (Some((r, m)), _, _) => (r.clone(), m.clone()),
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
        .clone()
        .unwrap_or_else(|| ("WithinLimits".into(), String::new()));
    out.push(cond(
        "ScalingLimited",
        o.limited.is_some(),
        &lr,
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
            &Observed {
                invalid: Some("workers.perPartition: must be between 1 and 256".into()),
                ..Default::default()
            },
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
            limited: Some((
                "AtPartitionCount".into(),
                "lag asks for 9 replicas; the topic has 4 partitions".into(),
            )),
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
    fn stalled_partitions_degrade_the_pipeline_and_name_the_partitions() {
        let o = Observed {
            desired: 2,
            ready: 2,
            stalled: vec![0, 3],
            ..Default::default()
        };
        let cs = conditions(&o, Some(1), &[]);
        let s = get(&cs, "PartitionStalled");
        assert_eq!(
            (s.status.as_str(), s.reason.as_str()),
            ("True", "CommitNotMoving")
        );
        assert!(s.message.contains("0, 3"), "{}", s.message);
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
}
