//! A Prometheus histogram that observes without a lock, encoded through `prometheus-client`.
//!
//! `prometheus-client`'s own `Histogram` takes a mutex on every observation. That is fine
//! once per committed batch, but the SSE delivery lag is observed by every live stream on
//! every chunk it writes, thousands of streams at once on two cores; atomics keep that off
//! the fan-out's path.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Bucket upper bounds, in seconds or items, for each histogram (README, "Observability").
pub mod buckets {
    /// Commit of a write transaction: SQLite commits a batch in 0.2-3 ms, PostgreSQL on a
    /// LAN in 1-10 ms, storage in trouble in seconds. Fine below 10 ms, so a p99 can be told
    /// from twice it.
    pub const COMMIT: &[f64] = &[
        0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
        0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
    ];
    /// Readings per committed batch: 1 when traffic is light, up to `[storage] batch_size`
    /// (1000 by default, at most 100,000) under load.
    pub const BATCH: &[f64] = &[
        1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 20000.0,
        100000.0,
    ];
    /// Command round trip, publish to ack: 5-50 ms for a device on a LAN, 0.1-2 s on a
    /// cellular link, up to `[commands] timeout` (30 s by default).
    pub const COMMAND_RTT: &[f64] = &[
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    /// Commit to SSE frame written: well under a millisecond while clients keep up, tens of
    /// milliseconds in a fan-out to thousands, seconds for a client about to be cut off.
    pub const SSE_LAG: &[f64] = &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0,
    ];
    /// A history or series query: an indexed page in 1-10 ms, a long series from raw
    /// readings in up to seconds.
    pub const QUERY: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
}

/// A histogram with fixed bucket bounds; clones share their counts.
#[derive(Debug, Clone)]
pub struct Histogram(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; one more than `bounds` for what is past the last bound.
    counts: Box<[AtomicU64]>,
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    /// A histogram with these upper bounds, ascending (a `+Inf` bucket is implied).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "ascending bounds");
        Histogram(Arc::new(Inner {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }))
    }

    /// Records one value.
    pub fn observe(&self, v: f64) {
        let i = self.0.bounds.partition_point(|b| *b < v);
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        // Relaxed: a scrape may see a count without its share of the sum, never a torn sum.
        let _ = self
            .0
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some((f64::from_bits(s) + v).to_bits())
            });
    }

    /// Records one duration, in seconds.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// Each bucket's upper bound with its own (not cumulative) count, `+Inf` last.
    fn snapshot(&self) -> Vec<(f64, u64)> {
        let bounds = self.0.bounds.iter().copied().chain([f64::INFINITY]);
        bounds
            .zip(self.0.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect()
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets = self.snapshot();
        // The count from the same snapshot, so it always equals the `+Inf` bucket.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = f64::from_bits(self.0.sum.load(Ordering::Relaxed));
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;

    #[test]
    fn a_histogram_encodes_cumulative_buckets_with_its_count_and_sum() {
        let h = Histogram::new(buckets::COMMIT);
        h.observe_duration(Duration::from_micros(400));
        h.observe_duration(Duration::from_millis(3));
        h.observe_duration(Duration::from_secs(60));
        let mut registry = Registry::default();
        registry.register("x_seconds", "help", h.clone());
        let mut out = String::new();
        encode(&mut out, &registry).expect("encode");
        assert!(out.contains("x_seconds_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.003\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"10.0\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_count 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum 60.0034\n"), "{out}");
    }

    #[test]
    fn a_value_on_a_bound_falls_in_that_bucket() {
        let h = Histogram::new(buckets::BATCH);
        h.observe(1.0);
        h.observe(1000.0);
        let counts = h.snapshot();
        assert_eq!(counts[0], (1.0, 1));
        assert_eq!(counts[9], (1000.0, 1));
    }
}
