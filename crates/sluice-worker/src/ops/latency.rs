//! The end-to-end latency histogram, `sluice_end_to_end_latency_seconds`: one observation
//! per output, so it is on the hot path of every sink.
//!
//! Record timestamps have millisecond resolution, so every observation is a whole number
//! of milliseconds. That makes the bucket an index computed from a table, where
//! prometheus's histogram searches its bounds linearly (and, for the preloaded backlogs of
//! a catch-up, walks almost all of them) behind a `RefCell` for each observation. The
//! exposition is the one a prometheus `HistogramVec` with [`LATENCY_BUCKETS`] gives: same
//! name, labels, bounds, cumulative counts, and the sum in seconds.
//!
//! A sink observes into a [`LocalLatency`] (plain integers) and flushes it once per
//! acknowledged batch: a handful of atomic adds per batch, not per output.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto;

use super::metrics::LATENCY_BUCKETS;

/// Buckets: the bounds of [`LATENCY_BUCKETS`] plus `+Inf`.
const BUCKETS: usize = LATENCY_BUCKETS.len() + 1;

/// Milliseconds below which the bucket is read from [`SMALL`]; above, the few remaining
/// bounds are compared.
const TABLE_MS: usize = 128;

/// The bucket of every whole millisecond below [`TABLE_MS`].
static SMALL: [u8; TABLE_MS] = small_table();

const fn small_table() -> [u8; TABLE_MS] {
    let mut t = [0u8; TABLE_MS];
    let mut ms = 0;
    while ms < TABLE_MS {
        t[ms] = search(ms as u64) as u8;
        ms += 1;
    }
    t
}

/// The bucket of `ms` milliseconds by the prometheus rule (the first bound at or above
/// the value in seconds), found by a search: the definition the table is built from.
const fn search(ms: u64) -> usize {
    let secs = ms as f64 / 1000.0;
    let mut i = 0;
    while i < LATENCY_BUCKETS.len() {
        if secs <= LATENCY_BUCKETS[i] {
            return i;
        }
        i += 1;
    }
    LATENCY_BUCKETS.len()
}

/// The bucket of an observation of `ms` milliseconds.
#[inline]
fn bucket(ms: u64) -> usize {
    match SMALL.get(ms as usize) {
        Some(&b) => b as usize,
        None => search(ms),
    }
}

/// The counts of one label set.
#[derive(Debug, Default)]
struct Core {
    /// Observations per bucket, not cumulative.
    buckets: [AtomicU64; BUCKETS],
    /// Sum of the observations in milliseconds.
    sum_ms: AtomicU64,
}

/// The histogram family: one child per (pipeline, sink), registered once.
#[derive(Clone, Debug)]
pub struct LatencyHistogramVec {
    desc: Desc,
    children: Arc<Mutex<BTreeMap<Vec<String>, Arc<Core>>>>,
}

impl LatencyHistogramVec {
    /// A family named `name` with the variable `labels`.
    pub fn new(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<Self> {
        let desc = Desc::new(
            name.to_string(),
            help.to_string(),
            labels.iter().map(|l| l.to_string()).collect(),
            Default::default(),
        )?;
        Ok(LatencyHistogramVec {
            desc,
            children: Default::default(),
        })
    }

    /// The child for these label values (created on first use).
    pub fn with_label_values(&self, values: &[&str]) -> LatencyHistogram {
        assert_eq!(
            values.len(),
            self.desc.variable_labels.len(),
            "one value per label of {}",
            self.desc.fq_name
        );
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        LatencyHistogram {
            core: children.entry(key).or_default().clone(),
        }
    }

    fn metric(&self, values: &[String], core: &Core) -> proto::Metric {
        let mut labels: Vec<proto::LabelPair> = self
            .desc
            .variable_labels
            .iter()
            .zip(values)
            .map(|(n, v)| {
                let mut l = proto::LabelPair::default();
                l.set_name(n.clone());
                l.set_value(v.clone());
                l
            })
            .collect();
        labels.sort_by(|a, b| a.name().cmp(b.name()));
        let mut h = proto::Histogram::default();
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len());
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += core.buckets[i].load(Ordering::Relaxed);
            let mut b = proto::Bucket::default();
            b.set_cumulative_count(cumulative);
            b.set_upper_bound(*bound);
            buckets.push(b);
        }
        // The count is the buckets' total, so `+Inf` always equals it even while a flush
        // is under way.
        cumulative += core.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        h.set_sample_count(cumulative);
        h.set_sample_sum(core.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0);
        h.set_bucket(buckets);
        let mut m = proto::Metric::from_label(labels);
        m.set_histogram(h);
        m
    }
}

impl Collector for LatencyHistogramVec {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        let mut f = proto::MetricFamily::default();
        f.set_name(self.desc.fq_name.clone());
        f.set_help(self.desc.help.clone());
        f.set_field_type(proto::MetricType::HISTOGRAM);
        f.set_metric(
            children
                .iter()
                .map(|(values, core)| self.metric(values, core))
                .collect(),
        );
        vec![f]
    }
}

/// One (pipeline, sink) child: shared, cheap to clone.
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    core: Arc<Core>,
}

impl LatencyHistogram {
    /// A local accumulator for one batch; [`LocalLatency::flush`] (or drop) adds it to
    /// the shared counts.
    pub fn local(&self) -> LocalLatency<'_> {
        LocalLatency {
            shared: &self.core,
            buckets: [0; BUCKETS],
            sum_ms: 0,
        }
    }
}

/// Observations not yet added to the shared histogram.
#[derive(Debug)]
pub struct LocalLatency<'a> {
    shared: &'a Core,
    buckets: [u64; BUCKETS],
    sum_ms: u64,
}

impl LocalLatency<'_> {
    /// Observe a latency of `ms` milliseconds.
    #[inline]
    pub fn observe_ms(&mut self, ms: u64) {
        self.buckets[bucket(ms)] += 1;
        self.sum_ms = self.sum_ms.saturating_add(ms);
    }

    /// Add the observations to the shared histogram.
    pub fn flush(&mut self) {
        for (shared, local) in self.shared.buckets.iter().zip(&mut self.buckets) {
            if *local != 0 {
                shared.fetch_add(std::mem::take(local), Ordering::Relaxed);
            }
        }
        if self.sum_ms != 0 {
            // Saturating, like the local sum: a backfill of very old records must not wrap
            // the sum (a counter going backwards reads as a reset).
            let add = std::mem::take(&mut self.sum_ms);
            let _ = self
                .shared
                .sum_ms
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_add(add))
                });
        }
    }
}

impl Drop for LocalLatency<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder, HistogramOpts, HistogramVec, Registry, TextEncoder};

    use super::*;

    fn text(r: &Registry) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&r.gather(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// Every whole millisecond up to two minutes falls in the bucket prometheus's own
    /// histogram puts it in, and the exposition (counts, sum, labels) is the same text.
    #[test]
    fn matches_prometheus_histogram_exposition() {
        let ours = Registry::new();
        let theirs = Registry::new();
        let name = "sluice_end_to_end_latency_seconds";
        let v = LatencyHistogramVec::new(name, "help", &["pipeline", "sink"]).unwrap();
        ours.register(Box::new(v.clone())).unwrap();
        let p = HistogramVec::new(
            HistogramOpts::new(name, "help").buckets(LATENCY_BUCKETS.to_vec()),
            &["pipeline", "sink"],
        )
        .unwrap();
        theirs.register(Box::new(p.clone())).unwrap();

        for sink in ["kafka", "null"] {
            let h = v.with_label_values(&["demo", sink]);
            let ph = p.with_label_values(&["demo", sink]);
            let mut local = h.local();
            // A sweep over every bound and its neighbours, and the large values.
            for ms in (0..=2_000).chain((2_000..=130_000).step_by(499)) {
                local.observe_ms(ms);
                ph.observe(ms as f64 / 1000.0);
            }
            local.flush();
        }
        // Identical but for the sum's last float digits: ours adds whole milliseconds and
        // divides once, prometheus adds the seconds one by one.
        let (ours, theirs) = (text(&ours), text(&theirs));
        let lines = |t: &str| -> Vec<String> { t.lines().map(String::from).collect() };
        let (ours, theirs) = (lines(&ours), lines(&theirs));
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            if a.contains("_sum{") {
                let value = |l: &str| -> f64 { l.rsplit(' ').next().unwrap().parse().unwrap() };
                assert!((value(a) - value(b)).abs() < 1e-6, "{a} vs {b}");
            } else {
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn table_equals_search() {
        for ms in 0..TABLE_MS as u64 + 10 {
            assert_eq!(bucket(ms), search(ms), "{ms} ms");
        }
        assert_eq!(bucket(0), 0, "0 ms is at or below 0.25 ms");
        assert_eq!(bucket(1), 3, "1 ms is at or below 1 ms");
        assert_eq!(bucket(u64::MAX), LATENCY_BUCKETS.len(), "+Inf");
    }

    #[test]
    fn the_sum_saturates_instead_of_wrapping() {
        let v = LatencyHistogramVec::new("y_seconds", "help", &["sink"]).unwrap();
        let h = v.with_label_values(&["a"]);
        for _ in 0..3 {
            let mut l = h.local();
            l.observe_ms(u64::MAX / 2);
        }
        let f = &v.collect()[0];
        let sum = f.get_metric()[0].get_histogram().get_sample_sum();
        assert_eq!(sum, u64::MAX as f64 / 1000.0);
    }

    #[test]
    fn dropped_local_is_flushed_and_count_is_the_bucket_total() {
        let v = LatencyHistogramVec::new("x_seconds", "help", &["sink"]).unwrap();
        let h = v.with_label_values(&["a"]);
        {
            let mut l = h.local();
            l.observe_ms(3);
            l.observe_ms(90_000);
        }
        let f = &v.collect()[0];
        let m = &f.get_metric()[0].get_histogram();
        assert_eq!(m.get_sample_count(), 2);
        assert_eq!(m.get_sample_sum(), 90.003);
        assert_eq!(m.get_bucket().last().unwrap().cumulative_count(), 1);
    }
}
