//! A live progress line for local runs: rates in and out, lag, end-to-end p99, pressure.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::proto::MetricFamily;

use crate::ops::metrics::Metrics;

/// Totals read from the registry at one instant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Records consumed.
    pub consumed: f64,
    /// Records delivered (all outputs acknowledged).
    pub delivered: f64,
    /// Sum of partition lag (high watermark minus committed offset), from the consumer's
    /// statistics: refreshed every few seconds, and it counts records in flight.
    pub lag: f64,
    /// Sum of the committed offsets of the owned partitions.
    pub committed: f64,
    /// Partitions paused.
    pub paused: f64,
    /// Partitions stalled.
    pub stalled: f64,
    /// Bytes in flight.
    pub in_flight: f64,
    /// End-to-end latency buckets (upper bound -> cumulative count), summed over sinks.
    pub e2e: Vec<(f64, u64)>,
}

fn sum(fams: &[MetricFamily], name: &str) -> f64 {
    fams.iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .map(|m| {
            if m.get_counter().has_value() {
                m.get_counter().value()
            } else {
                m.get_gauge().value()
            }
        })
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

impl Snapshot {
    /// Read the current totals.
    pub fn take(metrics: &Metrics) -> Self {
        let fams = metrics.registry.gather();
        let mut buckets: HashMap<u64, u64> = HashMap::new();
        for f in fams
            .iter()
            .filter(|f| f.name() == "sluice_end_to_end_latency_seconds")
        {
            for m in f.get_metric() {
                for b in m.get_histogram().get_bucket() {
                    *buckets.entry(b.upper_bound().to_bits()).or_default() += b.cumulative_count();
                }
            }
        }
        let mut e2e: Vec<(f64, u64)> = buckets
            .into_iter()
            .map(|(k, v)| (f64::from_bits(k), v))
            .collect();
        e2e.sort_by(|a, b| a.0.total_cmp(&b.0));
        Snapshot {
            consumed: sum(&fams, "sluice_messages_consumed_total"),
            delivered: sum(&fams, "sluice_messages_delivered_total"),
            lag: sum(&fams, "sluice_consumer_lag"),
            committed: sum(&fams, "sluice_committed_offset"),
            paused: sum(&fams, "sluice_partition_paused"),
            stalled: sum(&fams, "sluice_partition_stalled"),
            in_flight: sum(&fams, "sluice_in_flight_bytes"),
            e2e,
        }
    }
}

/// The `q` quantile (upper bucket bound) of the observations between two snapshots.
pub fn quantile_between(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let prev: HashMap<u64, u64> = before.iter().map(|(b, c)| (b.to_bits(), *c)).collect();
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|(b, c)| (*b, c - prev.get(&b.to_bits()).copied().unwrap_or(0).min(*c)))
        .collect();
    let total = delta.last().map(|d| d.1)?;
    if total == 0 {
        return None;
    }
    let want = (total as f64 * q).ceil() as u64;
    delta.iter().find(|(_, c)| *c >= want).map(|(b, _)| *b)
}

/// The `q` quantile of cumulative buckets `(upper bound, count)`, interpolated linearly
/// inside the bucket it falls in (as PromQL's `histogram_quantile` does).
pub fn quantile_interpolated(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lo, mut below) = (0.0, 0u64);
    for &(hi, c) in buckets {
        if c as f64 >= rank {
            if hi.is_infinite() {
                return Some(lo);
            }
            let inside = (c - below) as f64;
            let frac = if inside > 0.0 {
                (rank - below as f64) / inside
            } else {
                1.0
            };
            return Some(lo + (hi - lo) * frac);
        }
        lo = hi;
        below = c;
    }
    Some(lo)
}

fn human(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// What the progress line knows about the input.
#[derive(Clone, Debug, Default)]
pub enum Input {
    /// Only the worker's own metrics: the line shows the uncommitted records (high
    /// watermark minus committed offset) from the consumer's statistics, which refresh
    /// every few seconds.
    #[default]
    Metrics,
    /// The records written to the input so far, counted from offset 0 of an input that
    /// started empty (the demo's generator counts them): the line shows the live lag,
    /// records written and not yet handed to the workers, and the uncommitted records.
    Counted(Arc<AtomicU64>),
}

/// The lag columns of one line: `(live lag, uncommitted)`; the live lag only when the
/// input is [`Input::Counted`].
pub fn lags(input: &Input, now: &Snapshot) -> (Option<f64>, f64) {
    match input {
        Input::Metrics => (None, now.lag),
        Input::Counted(written) => {
            let written = written.load(Ordering::Relaxed) as f64;
            (
                Some((written - now.consumed).max(0.0)),
                (written - now.committed).max(0.0),
            )
        }
    }
}

/// One progress line from two snapshots `dt` seconds apart.
pub fn line(input: &Input, prev: &Snapshot, now: &Snapshot, dt: f64) -> String {
    let dt = dt.max(1e-3);
    // Only once records flow: an interval with no deliveries has no latency to show.
    let p99 = quantile_between(&prev.e2e, &now.e2e, 0.99)
        .map(|s| {
            if s.is_infinite() {
                ">60s".into()
            } else {
                format!("<={:.1}ms", s * 1000.0)
            }
        })
        .unwrap_or_else(|| "-".into());
    let (live, uncommitted) = lags(input, now);
    let lag = match live {
        Some(l) => format!("lag {:>7}  uncommitted {:>7}", human(l), human(uncommitted)),
        None => format!("uncommitted {:>7}", human(uncommitted)),
    };
    format!(
        "in {:>7}/s  out {:>7}/s  total in {:>7} out {:>7}  {lag}  e2e p99 {:>9}  paused {} stalled {}  in-flight {:.1}MiB",
        human((now.consumed - prev.consumed) / dt),
        human((now.delivered - prev.delivered) / dt),
        human(now.consumed),
        human(now.delivered),
        p99,
        now.paused,
        now.stalled,
        now.in_flight / (1024.0 * 1024.0),
    )
}

/// Print a progress line to stderr every `every` until the task is dropped.
pub async fn report(metrics: Metrics, every: Duration, input: Input) {
    let mut prev = Snapshot::take(&metrics);
    let mut at = Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = Snapshot::take(&metrics);
        let text = line(&input, &prev, &now, at.elapsed().as_secs_f64());
        // One write of the whole line, so no log line lands inside it.
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(format!("[sluice] {text}\n").as_bytes());
        prev = now;
        at = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_uses_only_new_observations() {
        let before = vec![(0.001, 100), (0.01, 100), (f64::INFINITY, 100)];
        let after = vec![(0.001, 100), (0.01, 190), (f64::INFINITY, 200)];
        assert_eq!(quantile_between(&before, &after, 0.5), Some(0.01));
        assert_eq!(quantile_between(&before, &after, 0.99), Some(f64::INFINITY));
        assert_eq!(quantile_between(&after, &after, 0.99), None);
    }

    #[test]
    fn the_live_lag_counts_records_written_and_not_yet_consumed() {
        let written = Arc::new(AtomicU64::new(250_000));
        let now = Snapshot {
            consumed: 249_000.0,
            committed: 150_000.0,
            // The statistics' figure lags behind by seconds: not what the line shows.
            lag: 107_000.0,
            ..Snapshot::default()
        };
        assert_eq!(
            lags(&Input::Counted(written), &now),
            (Some(1_000.0), 100_000.0)
        );
        assert_eq!(lags(&Input::Metrics, &now), (None, 107_000.0));
        let l = line(&Input::Metrics, &Snapshot::default(), &now, 1.0);
        assert!(l.contains("uncommitted  107.0k"), "{l}");
        assert!(
            l.contains("e2e p99         -"),
            "no latency before records flow: {l}"
        );
    }
}
