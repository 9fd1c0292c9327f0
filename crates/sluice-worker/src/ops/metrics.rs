//! Prometheus metrics of the worker. Labels are bounded: pipeline, topic, partition, sink,
//! stage; never an error string.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Every worker metric, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    /// The registry served on /metrics.
    pub registry: Registry,
    pipeline: String,
    consumed: IntCounterVec,
    dropped: IntCounterVec,
    processed: IntCounterVec,
    delivered: IntCounterVec,
    failed: IntCounterVec,
    depth: IntGaugeVec,
    paused: IntGaugeVec,
    stalled: IntGaugeVec,
    committed: IntGaugeVec,
    lag: IntGaugeVec,
    high_watermark: IntGaugeVec,
    /// Time from dispatch to the end of processing, observed per worker batch.
    pub processing_latency: Histogram,
    /// Time from the record timestamp to the sink acknowledgement, per output.
    pub end_to_end_latency: super::latency::LatencyHistogramVec,
    /// Outputs per flushed sink batch.
    pub batch_size: HistogramVec,
    /// Outputs delivered per sink.
    pub sink_outputs: IntCounterVec,
    /// Sink delivery retries.
    pub sink_retries: IntCounterVec,
    /// Records dead-lettered, by stage and class.
    pub dead_letters: IntCounterVec,
    /// Duration of offset commits.
    pub commit_latency: Histogram,
    /// Failed commits.
    pub commit_failures: IntCounter,
    /// Payload bytes dispatched and not yet acknowledged.
    pub in_flight_bytes: IntGauge,
    /// Rebalance events by kind (assign, revoke).
    pub rebalances: IntCounterVec,
    /// Partitions currently assigned.
    pub assigned_partitions: IntGauge,
    /// Offset resets on an out-of-range position (records deleted before processing).
    pub offset_resets: IntCounter,
    /// 1 while /healthz passes (updated when it is probed).
    pub healthy: IntGauge,
    /// Partitions stuck in fetch past `server.fetchStallTimeout`.
    pub fetch_stalled_partitions: IntGauge,
}

/// Handles for one partition, resolved once so the hot path does no label lookups.
#[derive(Clone, Debug)]
pub struct PartitionMetrics {
    /// Records read from the partition and handed to processing.
    pub consumed: IntCounter,
    /// Records read and not handed over: received already by this incarnation.
    pub dropped_redelivered: IntCounter,
    /// Records read and not handed over: below where `startFrom: latest` started the
    /// partition.
    pub dropped_before_start: IntCounter,
    /// Records read and not handed over: new records at offsets this partition's owner
    /// received before the log was truncated (an unclean leader election).
    pub dropped_truncated: IntCounter,
    /// Records processed.
    pub processed: IntCounter,
    /// Records whose outputs were all acknowledged.
    pub delivered: IntCounter,
    /// Records that failed in the processor.
    pub failed_processor: IntCounter,
    /// Records that failed in a sink.
    pub failed_sink: IntCounter,
    /// Records waiting in the partition's channel.
    pub depth: IntGauge,
    /// 1 while the partition is paused.
    pub paused: IntGauge,
    /// 1 while the partition cannot advance.
    pub stalled: IntGauge,
    /// Last committed offset.
    pub committed: IntGauge,
    /// High watermark minus committed offset.
    pub lag: IntGauge,
    /// Partition high watermark.
    pub high_watermark: IntGauge,
}

/// Buckets of every latency histogram (seconds): fine below 10 ms, where the targets are.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01,
    0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Metrics {
    /// Create and register every metric for `pipeline`.
    pub fn new(pipeline: &str) -> Self {
        let registry = Registry::new();
        let p = ["pipeline", "topic", "partition"];
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let hist = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let size_buckets = prometheus::exponential_buckets(1.0, 4.0, 10).expect("buckets");
        let m = Metrics {
            pipeline: pipeline.to_string(),
            consumed: counter("sluice_messages_consumed_total", "Records read from the source partition and handed to processing (again when processed again: a rebalance, an exactly-once rewind); see sluice_records_dropped_total for records read and dropped.", &p),
            dropped: counter("sluice_records_dropped_total", "Records read from the source and not handed to processing, by reason: redelivered (this partition's owner received it already: it is in flight or done), before_start (below where startFrom: latest started the partition), truncated (new records at offsets the owner had received before the partition's log was truncated: an unclean leader election; not processed).", &["pipeline", "reason"]),
            processed: counter("sluice_messages_processed_total", "Records run through the processor.", &p),
            delivered: counter("sluice_messages_delivered_total", "Records whose outputs every sink acknowledged.", &p),
            failed: counter("sluice_messages_failed_total", "Records that failed, by stage (processor or sink).", &["pipeline", "topic", "partition", "stage"]),
            depth: gauge("sluice_channel_depth", "Records waiting in the partition's channel.", &p),
            paused: gauge("sluice_partition_paused", "1 while the partition is paused in the consumer.", &p),
            stalled: gauge("sluice_partition_stalled", "1 while the partition cannot advance (a record failed and there is no dead-letter topic).", &p),
            committed: gauge("sluice_committed_offset", "Last offset committed for the partition (the next offset to read).", &p),
            lag: gauge("sluice_consumer_lag", "Partition high watermark minus committed offset, in records.", &p),
            high_watermark: gauge("sluice_partition_high_watermark", "Partition high watermark as last seen by the consumer.", &p),
            processing_latency: hist("sluice_processing_latency_seconds", "Time from dispatch to the end of processing, per worker batch.", &["pipeline"], LATENCY_BUCKETS.to_vec()).with_label_values(&[pipeline]),
            end_to_end_latency: {
                let h = super::latency::LatencyHistogramVec::new("sluice_end_to_end_latency_seconds", "Time from the record timestamp to the sink acknowledgement, per output.", &["pipeline", "sink"]).expect("valid metric");
                registry.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            batch_size: hist("sluice_batch_size_messages", "Outputs per flushed sink batch.", &["pipeline", "sink"], size_buckets),
            sink_outputs: counter("sluice_sink_outputs_total", "Outputs acknowledged by a sink.", &["pipeline", "sink"]),
            dead_letters: counter("sluice_dead_letters_total", "Records written to the dead-letter topic, by failing stage and error class.", &["pipeline", "stage", "class"]),
            sink_retries: counter("sluice_sink_retries_total", "Outputs a sink sent again after a transient error.", &["pipeline", "sink"]),
            commit_latency: hist("sluice_commit_latency_seconds", "Duration of offset commits.", &["pipeline"], LATENCY_BUCKETS.to_vec()).with_label_values(&[pipeline]),
            commit_failures: counter("sluice_commit_failures_total", "Offset commits that failed.", &["pipeline"]).with_label_values(&[pipeline]),
            in_flight_bytes: gauge("sluice_in_flight_bytes", "Bytes charged to the in-flight budget: records dispatched and not yet acknowledged, key and value plus 512 bytes each.", &["pipeline"]).with_label_values(&[pipeline]),
            rebalances: counter("sluice_rebalances_total", "Consumer group rebalance events, by kind.", &["pipeline", "kind"]),
            assigned_partitions: gauge("sluice_assigned_partitions", "Partitions assigned to this worker.", &["pipeline"]).with_label_values(&[pipeline]),
            offset_resets: counter("sluice_offset_resets_total", "Times the consumer's position was out of range on the broker (retention or deletion passed it) and was reset to the earliest retained record.", &["pipeline"]).with_label_values(&[pipeline]),
            healthy: gauge("sluice_healthy", "1 while /healthz passes, 0 while it fails (updated on each probe).", &["pipeline"]).with_label_values(&[pipeline]),
            fetch_stalled_partitions: gauge("sluice_fetch_stalled_partitions", "Owned partitions with records to fetch, not held on purpose, that received nothing for longer than server.fetchStallTimeout (/healthz fails while above 0).", &["pipeline"]).with_label_values(&[pipeline]),
            registry,
        };
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector");
        m
    }

    /// The pipeline label.
    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// Resolve the handles of one partition.
    pub fn partition(&self, topic: &str, partition: i32) -> PartitionMetrics {
        let part = partition.to_string();
        let l = [self.pipeline.as_str(), topic, part.as_str()];
        let stage = |s: &str| {
            self.failed
                .with_label_values(&[self.pipeline.as_str(), topic, part.as_str(), s])
        };
        PartitionMetrics {
            consumed: self.consumed.with_label_values(&l),
            dropped_redelivered: self
                .dropped
                .with_label_values(&[self.pipeline.as_str(), "redelivered"]),
            dropped_before_start: self
                .dropped
                .with_label_values(&[self.pipeline.as_str(), "before_start"]),
            dropped_truncated: self
                .dropped
                .with_label_values(&[self.pipeline.as_str(), "truncated"]),
            processed: self.processed.with_label_values(&l),
            delivered: self.delivered.with_label_values(&l),
            failed_processor: stage("processor"),
            failed_sink: stage("sink"),
            depth: self.depth.with_label_values(&l),
            paused: self.paused.with_label_values(&l),
            stalled: self.stalled.with_label_values(&l),
            committed: self.committed.with_label_values(&l),
            lag: self.lag.with_label_values(&l),
            high_watermark: self.high_watermark.with_label_values(&l),
        }
    }

    /// Drop the gauges of a partition this worker no longer owns, so no stale series stay.
    /// Counters stay: they are per process and only ever go up.
    pub fn forget_partition(&self, topic: &str, partition: i32) {
        let part = partition.to_string();
        let l = [self.pipeline.as_str(), topic, part.as_str()];
        for g in [
            &self.depth,
            &self.paused,
            &self.stalled,
            &self.committed,
            &self.lag,
            &self.high_watermark,
        ] {
            let _ = g.remove_label_values(&l);
        }
    }

    /// Text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        buf
    }
}
