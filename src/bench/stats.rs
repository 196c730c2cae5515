//! Latency summaries and ratios: pure arithmetic over recorded samples.

use serde::Serialize;

/// Percentiles of a set of latencies, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    /// How many samples.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl Latency {
    /// The summary of `samples` (microseconds, any order); all zero when there are none.
    pub fn of(samples: &mut [u64]) -> Self {
        samples.sort_unstable();
        Self {
            count: samples.len() as u64,
            p50_us: percentile(samples, 0.50),
            p99_us: percentile(samples, 0.99),
            max_us: samples.last().copied().unwrap_or(0) as f64,
        }
    }
}

/// The `q`-quantile (0..=1) of sorted `samples` by the nearest-rank method; 0 when empty.
pub fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// `ours / theirs`, or `None` when either is missing or `theirs` is zero.
pub fn ratio(ours: Option<f64>, theirs: Option<f64>) -> Option<f64> {
    match (ours, theirs) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

/// A small deterministic generator (splitmix64) for picking random keys without a
/// dependency; the same seed gives the same sequence.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<u64> = (1..=100).rev().collect();
        let latency = Latency::of(&mut samples);
        assert_eq!(latency.count, 100);
        assert_eq!(latency.p50_us, 50.0);
        assert_eq!(latency.p99_us, 99.0);
        assert_eq!(latency.max_us, 100.0);
        assert_eq!(Latency::of(&mut []).p99_us, 0.0);
        assert_eq!(Latency::of(&mut [7]).p50_us, 7.0);
    }

    #[test]
    fn ratios_need_both_sides() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
    }

    proptest! {
        #[test]
        fn percentiles_are_ordered_samples(mut samples in proptest::collection::vec(0u64..1_000_000, 1..200)) {
            let latency = Latency::of(&mut samples);
            prop_assert!(latency.p50_us <= latency.p99_us);
            prop_assert!(latency.p99_us <= latency.max_us);
            prop_assert!(samples.contains(&(latency.p50_us as u64)));
        }

        #[test]
        fn below_stays_in_range(seed: u64, n in 1u64..1000) {
            let mut rng = SplitMix::new(seed);
            for _ in 0..50 {
                prop_assert!(rng.below(n) < n);
            }
        }
    }
}
