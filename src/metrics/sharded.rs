//! A counter and a histogram that the runtime's worker threads update without sharing a
//! cache line, for the metrics counted once per push, ACK or request.
//!
//! prometheus-client's `Counter` is one atomic and its `Histogram` one mutex: every worker
//! that counts writes the same cache line, and a fan-out to 10,000 streams counts 30,000
//! times per update from both cores. Here each thread writes a shard of its own (a thread
//! takes the next of [`SHARDS`] the first time it counts), and a scrape adds the shards up.
//! Both encode exactly as prometheus-client's own types do.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric},
};

/// Shards per metric: more than the worker threads of a small server, so threads rarely
/// share one.
const SHARDS: usize = 8;

/// Most finite bucket bounds a [`Histogram`] takes; the `+Inf` bucket comes on top.
const MAX_BUCKETS: usize = 23;

/// One value per cache line pair (adjacent-line prefetch pulls lines in twos).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

/// The shard of the calling thread.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|shard| *shard)
}

/// One `T` per shard, each on cache lines of its own: a thread uses the shard it was given,
/// a reader looks at all of them.
#[derive(Debug, Default)]
pub(crate) struct PerThread<T>([Padded<T>; SHARDS]);

impl<T> PerThread<T> {
    /// The calling thread's.
    pub(crate) fn local(&self) -> &T {
        &self.0[shard()].0
    }

    /// Every shard's.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|padded| &padded.0)
    }
}

/// A monotonic counter (Prometheus type `counter`). Clones share the value.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<PerThread<AtomicU64>>);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.inc_by(1);
    }

    /// Adds `n`.
    pub fn inc_by(&self, n: u64) {
        self.0.local().fetch_add(n, Ordering::Relaxed);
    }

    /// The total of every shard.
    pub fn get(&self) -> u64 {
        self.0.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for Counter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for Counter {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One thread's observations: the count, the sum (an `f64`'s bits) and a count per bucket.
#[derive(Debug, Default)]
struct HistogramShard {
    count: AtomicU64,
    sum: AtomicU64,
    buckets: [AtomicU64; MAX_BUCKETS + 1],
}

#[derive(Debug)]
struct HistogramInner {
    /// The finite upper bounds, ascending; the `+Inf` bucket follows them.
    bounds: Vec<f64>,
    shards: PerThread<HistogramShard>,
}

/// A histogram with fixed buckets (Prometheus type `histogram`). Clones share the value.
#[derive(Debug, Clone)]
pub struct Histogram(Arc<HistogramInner>);

impl Histogram {
    /// A histogram with these upper bounds (as prometheus-client's `Histogram::new`: bounds
    /// that are not finite are dropped, and `+Inf` is added).
    ///
    /// # Panics
    ///
    /// With more than 23 finite bounds: the buckets are chosen in this crate.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Vec<f64> = bounds.into_iter().filter(|b| b.is_finite()).collect();
        assert!(
            bounds.len() <= MAX_BUCKETS,
            "a histogram takes at most {MAX_BUCKETS} buckets"
        );
        Self(Arc::new(HistogramInner {
            bounds,
            shards: Default::default(),
        }))
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        let inner = &self.0;
        // The first bound at or above the value; NaN, like a value above every bound, in +Inf.
        let bucket = inner
            .bounds
            .iter()
            .position(|bound| *bound >= value)
            .unwrap_or(inner.bounds.len());
        let shard = inner.shards.local();
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        shard.count.fetch_add(1, Ordering::Relaxed);
        // Only this thread writes its shard, so this loop does not spin in practice.
        let _ = shard
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    /// The sum, the count, and each bucket's upper bound and count (not cumulative), over
    /// every shard.
    fn totals(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let inner = &self.0;
        let mut buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .map(|bound| (bound, 0))
            .collect();
        let (mut sum, mut count) = (0.0, 0);
        for shard in inner.shards.iter() {
            count += shard.count.load(Ordering::Relaxed);
            sum += f64::from_bits(shard.sum.load(Ordering::Relaxed));
            for (total, n) in buckets.iter_mut().zip(&shard.buckets) {
                total.1 += n.load(Ordering::Relaxed);
            }
        }
        (sum, count, buckets)
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        let (sum, count, buckets) = self.totals();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::text::encode, metrics, registry::Registry};

    use super::*;

    fn text(register: impl FnOnce(&mut Registry)) -> String {
        let mut registry = Registry::default();
        register(&mut registry);
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn counts_from_many_threads_add_up() {
        let counter = Counter::default();
        std::thread::scope(|scope| {
            for _ in 0..(2 * SHARDS) {
                scope.spawn(|| {
                    for _ in 0..10_000 {
                        counter.inc();
                    }
                    counter.inc_by(5);
                });
            }
        });
        assert_eq!(counter.get(), 2 * SHARDS as u64 * 10_005);
    }

    #[test]
    fn encodes_as_prometheus_clients_own_types() {
        let bounds = || metrics::histogram::exponential_buckets(0.001, 2.0, 6);
        let values = [0.0005, 0.001, 0.0011, 0.03, 7.0, f64::NAN, 0.004];
        let ours = Histogram::new(bounds());
        let theirs = metrics::histogram::Histogram::new(bounds());
        let (our_counter, their_counter) = (
            Counter::default(),
            metrics::counter::Counter::<u64>::default(),
        );
        std::thread::scope(|scope| {
            for value in values {
                let (ours, our_counter) = (&ours, &our_counter);
                scope.spawn(move || {
                    ours.observe(value);
                    our_counter.inc_by(3);
                });
                theirs.observe(value);
                their_counter.inc_by(3);
            }
        });
        // NaN makes both sums NaN; compare the rest, then both without it.
        let ours_text = text(|r| {
            r.register("latency", "Seconds", ours.clone());
            r.register("pushes", "Pushes", our_counter.clone());
        });
        let theirs_text = text(|r| {
            r.register("latency", "Seconds", theirs.clone());
            r.register("pushes", "Pushes", their_counter.clone());
        });
        assert_eq!(ours_text, theirs_text);
        assert!(
            ours_text.contains("latency_bucket{le=\"0.004\"} 4"),
            "{ours_text}"
        );
        assert!(ours_text.contains("latency_count 7"), "{ours_text}");
        assert!(ours_text.contains("pushes_total 21"), "{ours_text}");

        let finite = Histogram::new(bounds());
        let reference = metrics::histogram::Histogram::new(bounds());
        for value in [0.0005, 0.25, 3.5] {
            finite.observe(value);
            reference.observe(value);
        }
        assert_eq!(
            text(|r| r.register("latency", "Seconds", finite)),
            text(|r| r.register("latency", "Seconds", reference))
        );
    }

    #[test]
    #[should_panic(expected = "at most")]
    fn refuses_more_buckets_than_it_holds() {
        Histogram::new((0..=MAX_BUCKETS).map(|i| i as f64));
    }
}
