//! The controller's metrics. Labels are bounded: namespace and pipeline (series removed
//! when the pipeline is forgotten), result, category, reason.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::autoscale::policy::Reason;
use crate::kafka::reads::KafkaMetrics;
use crate::kafka::Requests;

/// Controller metrics (bounded labels: pipeline, namespace, category, decision).
#[derive(Clone)]
pub struct ControllerMetrics {
    /// The registry served on /metrics.
    pub registry: Registry,
    pub(crate) reconciles: IntCounterVec,
    pub(crate) duration: HistogramVec,
    pub(crate) errors: IntCounterVec,
    pub(crate) decisions: IntCounterVec,
    pub(crate) desired: IntGaugeVec,
    pub(crate) current: IntGaugeVec,
    pub(crate) lag: IntGaugeVec,
    pub(crate) partitions: IntGaugeVec,
    pub(crate) ready: IntGaugeVec,
    pub(crate) limited: IntGaugeVec,
    /// The Kafka side: requests by kind, batches, connections.
    pub kafka: KafkaMetrics,
}

impl ControllerMetrics {
    /// The gauges with a series per pipeline.
    fn per_pipeline(&self) -> [&IntGaugeVec; 6] {
        [
            &self.desired,
            &self.current,
            &self.lag,
            &self.partitions,
            &self.ready,
            &self.limited,
        ]
    }

    /// Remove every series of the pipeline `namespace/name`.
    pub fn forget(&self, namespace: &str, name: &str) {
        for g in self.per_pipeline() {
            // Absent series (a pipeline that never got that far) are fine.
            let _ = g.remove_label_values(&[namespace, name]);
        }
        for r in Reason::ALL {
            let _ = self
                .decisions
                .remove_label_values(&[namespace, name, r.label()]);
        }
    }

    /// A counter for a reconcile `result`.
    pub(crate) fn reconciled(&self, result: &str) {
        self.reconciles.with_label_values(&[result]).inc();
    }
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        let registry = Registry::new();
        let p = ["namespace", "pipeline"];
        let c = |n: &str, h: &str, l: &[&str]| {
            let m = IntCounterVec::new(Opts::new(n, h), l).expect("metric");
            registry.register(Box::new(m.clone())).expect("register");
            m
        };
        let g = |n: &str, h: &str| {
            let m = IntGaugeVec::new(Opts::new(n, h), &p).expect("metric");
            registry.register(Box::new(m.clone())).expect("register");
            m
        };
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "sluice_controller_reconcile_duration_seconds",
                "Duration of reconciles.",
            ),
            &[],
        )
        .expect("metric");
        registry
            .register(Box::new(duration.clone()))
            .expect("register");
        let requests = c(
            "sluice_controller_kafka_requests_total",
            "Requests to Kafka for partition counts and lag, by request.",
            &["request"],
        );
        let counter = |n: &str, h: &str| {
            let m = IntCounter::new(n, h).expect("metric");
            registry.register(Box::new(m.clone())).expect("register");
            m
        };
        let connections = IntGauge::new(
            "sluice_controller_kafka_connections",
            "Kafka connections (one client each) the controller holds: one per distinct bootstrap servers and security settings in use.",
        )
        .expect("metric");
        registry
            .register(Box::new(connections.clone()))
            .expect("register");
        let kafka = KafkaMetrics {
            requests: Requests {
                metadata: requests.with_label_values(&["metadata"]),
                list_offsets: requests.with_label_values(&["list_offsets"]),
                offset_fetch: requests.with_label_values(&["offset_fetch"]),
            },
            batches: counter(
                "sluice_controller_kafka_batches_total",
                "Batches of Kafka queries (each: one metadata request, two offsets requests, the groups' committed offsets).",
            ),
            queries: counter(
                "sluice_controller_kafka_queries_total",
                "Queries (a topic's partition count, and a group's lag on it) answered in batches.",
            ),
            connections,
        };
        ControllerMetrics {
            kafka,
            reconciles: c(
                "sluice_controller_reconciliations_total",
                "Reconciles, by result.",
                &["result"],
            ),
            errors: c(
                "sluice_controller_errors_total",
                "Reconcile errors, by category.",
                &["category"],
            ),
            decisions: c(
                "sluice_controller_scaling_decisions_total",
                "Scaling decisions, by reason.",
                &["namespace", "pipeline", "reason"],
            ),
            desired: g(
                "sluice_controller_desired_replicas",
                "Replicas the autoscaler wants.",
            ),
            current: g(
                "sluice_controller_current_replicas",
                "Replicas of the worker Deployment.",
            ),
            lag: g(
                "sluice_controller_observed_lag",
                "Consumer lag observed by the controller (records).",
            ),
            partitions: g(
                "sluice_controller_partitions",
                "Partitions of the input topic.",
            ),
            ready: g(
                "sluice_controller_ready_replicas",
                "Ready worker pods of the pipeline's Deployment.",
            ),
            limited: g(
                "sluice_controller_scaling_limited",
                "1 while maxReplicas or the partition count caps what lag asks for.",
            ),
            duration,
            registry,
        }
    }
}
