//! The recent pushes the page lists: a bounded log fed by the ADS server's observer.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use parking_lot::Mutex;
use pixiu_xds::{Notice, Protocol, Pushed, StreamObserver, TypeUrl};

use super::views::PushEntry;
use crate::metrics::sharded::PerThread;

/// The last [`PushLog::CAPACITY`] responses written to any stream.
///
/// Every response of every stream is recorded, so recording must be cheap: each worker
/// thread records into a ring of its own (one lock shared by all, taken 10,000 times per
/// update in a fan-out, passed its cache line between the cores on nearly every push), once
/// a ring is full its oldest entry's strings are reused in place (no allocation), and the
/// time is formatted only when the page reads the log, which merges the rings by time.
#[derive(Debug, Clone, Default)]
pub struct PushLog {
    rings: Arc<PerThread<Mutex<VecDeque<Logged>>>>,
}

/// One recorded response, as cheap to overwrite as it can be.
#[derive(Debug)]
struct Logged {
    at: Instant,
    stream_id: u64,
    node_id: String,
    type_url: String,
    version: String,
    nonce: String,
    n_resources: usize,
    latency: Option<Duration>,
}

impl Logged {
    fn new(push: &Pushed<'_>, at: Instant) -> Self {
        Self {
            at,
            stream_id: push.stream_id,
            node_id: push.node_id.to_owned(),
            type_url: push.type_url.as_str().to_owned(),
            version: push.version.to_owned(),
            nonce: push.nonce.to_owned(),
            n_resources: push.n_resources,
            latency: latency(push, at),
        }
    }

    fn fill(&mut self, push: &Pushed<'_>, at: Instant) {
        fn set(field: &mut String, value: &str) {
            field.clear();
            field.push_str(value);
        }
        self.at = at;
        self.stream_id = push.stream_id;
        set(&mut self.node_id, push.node_id);
        set(&mut self.type_url, push.type_url.as_str());
        set(&mut self.version, push.version);
        set(&mut self.nonce, push.nonce);
        self.n_resources = push.n_resources;
        self.latency = latency(push, at);
    }

    /// The entry as the page shows it; `now` is the same moment on both clocks.
    fn entry(&self, now: (Instant, SystemTime)) -> PushEntry {
        let age = now.0.saturating_duration_since(self.at);
        let at = now.1.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH);
        PushEntry {
            at: humantime::format_rfc3339_millis(at).to_string(),
            stream_id: self.stream_id,
            node_id: self.node_id.clone(),
            type_url: self.type_url.clone(),
            version: self.version.clone(),
            nonce: self.nonce.clone(),
            n_resources: self.n_resources,
            cause: if self.latency.is_some() {
                "change"
            } else {
                "request"
            }
            .to_string(),
            latency_ms: self.latency.map(duration_ms),
        }
    }
}

/// From the change that caused a push to its hand-over at `at`; none for a push a request
/// caused.
fn latency(push: &Pushed<'_>, at: Instant) -> Option<Duration> {
    push.changed_at
        .map(|changed| at.saturating_duration_since(changed))
}

impl PushLog {
    /// How many pushes are kept: enough for a screenful, bounded whatever the push rate.
    pub const CAPACITY: usize = 100;

    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one response, handed over at `at`.
    pub fn record(&self, push: &Pushed<'_>, at: Instant) {
        let mut ring = self.rings.local().lock();
        if ring.len() >= Self::CAPACITY {
            let mut slot = ring.pop_front().expect("a full ring has a front");
            slot.fill(push, at);
            ring.push_back(slot);
        } else {
            ring.push_back(Logged::new(push, at));
        }
    }

    /// The logged pushes, newest first.
    pub fn recent(&self) -> Vec<PushEntry> {
        self.recent_at((Instant::now(), SystemTime::now()))
    }

    fn recent_at(&self, now: (Instant, SystemTime)) -> Vec<PushEntry> {
        let rings: Vec<_> = self.rings.iter().map(|ring| ring.lock()).collect();
        let mut all: Vec<&Logged> = rings.iter().flat_map(|ring| ring.iter()).collect();
        // Stable: a ring's pushes of one instant stay in the order they were recorded.
        all.sort_by_key(|logged| logged.at);
        all.iter()
            .rev()
            .take(Self::CAPACITY)
            .map(|logged| logged.entry(now))
            .collect()
    }
}

fn duration_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// One observer that feeds both the metrics and the push log.
pub fn observer(metrics: crate::metrics::XdsObserver, pushes: PushLog) -> Arc<dyn StreamObserver> {
    Arc::new(Both(metrics, pushes))
}

struct Both(crate::metrics::XdsObserver, PushLog);

impl StreamObserver for Both {
    fn stream_opened(&self, protocol: Protocol) {
        self.0.stream_opened(protocol);
    }

    fn stream_closed(&self, protocol: Protocol) {
        self.0.stream_closed(protocol);
    }

    fn response_sent(&self, type_url: &TypeUrl, n_resources: usize, snapshot_seq: u64) {
        self.0.response_sent(type_url, n_resources, snapshot_seq);
    }

    fn notice(&self, notice: &Notice) {
        self.0.notice(notice);
    }

    fn pushed(&self, push: &Pushed<'_>) {
        // One look at the clock for both.
        let at = Instant::now();
        if let Some(latency) = latency(push, at) {
            self.0.push_latency(push.type_url, latency);
        }
        self.1.record(push, at);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Instant, UNIX_EPOCH};

    use super::*;

    fn push<'a>(
        type_url: &'a TypeUrl,
        stream_id: u64,
        nonce: &'a str,
        changed_at: Option<Instant>,
    ) -> Pushed<'a> {
        Pushed {
            stream_id,
            node_id: "node-1",
            type_url,
            version: "v1",
            nonce,
            n_resources: 2,
            snapshot_seq: 7,
            changed_at,
        }
    }

    #[test]
    fn keeps_the_newest_and_reuses_the_oldest_slots() {
        let log = PushLog::new();
        let base = Instant::now();
        let type_url = TypeUrl::new("type.googleapis.com/pixiu.pkg.metadata.Metadata");
        let n = PushLog::CAPACITY as u64 + 50;
        for i in 0..n {
            let nonce = format!("n{i}");
            let changed_at = (i % 2 == 0).then_some(base);
            let at = base + Duration::from_millis(i);
            log.record(&push(&type_url, i, &nonce, changed_at), at);
        }
        // The newest push was handed over at `now`.
        let now = (
            base + Duration::from_millis(n - 1),
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        );
        let recent = log.recent_at(now);
        assert_eq!(recent.len(), PushLog::CAPACITY);
        let newest = &recent[0];
        assert_eq!(newest.stream_id, n - 1);
        assert_eq!(newest.nonce, format!("n{}", n - 1));
        assert_eq!(newest.cause, "request");
        assert_eq!(newest.latency_ms, None);
        assert_eq!(newest.at, "2023-11-14T22:13:20.123Z");
        assert_eq!(newest.node_id, "node-1");
        assert_eq!(newest.n_resources, 2);
        let second = &recent[1];
        assert_eq!(second.cause, "change");
        assert_eq!(second.latency_ms, Some((n - 2) as f64));
        assert_eq!(second.at, "2023-11-14T22:13:20.122Z");
        // The oldest kept is the 51st recorded: a reused slot holds only its new values.
        let oldest = recent.last().unwrap();
        assert_eq!(oldest.stream_id, 50);
        assert_eq!(oldest.nonce, "n50");
    }

    /// Pushes recorded by several threads come back as one log, newest first: each thread's
    /// ring keeps its own newest, which hold every one of the newest overall.
    #[test]
    fn merges_the_threads_pushes_by_time() {
        let log = PushLog::new();
        let base = Instant::now();
        let type_url = TypeUrl::new("t");
        let threads = 4u64;
        let per_thread = 70u64;
        std::thread::scope(|scope| {
            for t in 0..threads {
                let (log, type_url) = (&log, &type_url);
                scope.spawn(move || {
                    for i in 0..per_thread {
                        // Interleaved in time across threads: push k at base + k µs.
                        let k = i * threads + t;
                        let at = base + Duration::from_micros(k);
                        log.record(&push(type_url, k, "n", None), at);
                    }
                });
            }
        });
        let recent = log.recent_at((Instant::now(), SystemTime::now()));
        let ids: Vec<u64> = recent.iter().map(|entry| entry.stream_id).collect();
        let total = threads * per_thread;
        let expected: Vec<u64> = (total - PushLog::CAPACITY as u64..total).rev().collect();
        assert_eq!(ids, expected);
    }
}
