//! The recent pushes the page lists: a bounded log fed by the ADS server's observer.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, SystemTime},
};

use parking_lot::Mutex;
use pixiu_xds::{Notice, Protocol, Pushed, StreamObserver, TypeUrl};

use super::views::PushEntry;

/// The last [`PushLog::CAPACITY`] responses written to any stream, newest last.
///
/// Every response of every stream is recorded, so recording must be cheap: once the ring is
/// full, the oldest entry's strings are reused in place (no allocation), and the time is
/// formatted only when the page reads the log.
#[derive(Debug, Clone, Default)]
pub struct PushLog {
    entries: Arc<Mutex<VecDeque<Logged>>>,
}

/// One recorded response, as cheap to overwrite as it can be.
#[derive(Debug, Default)]
struct Logged {
    at: Option<SystemTime>,
    stream_id: u64,
    node_id: String,
    type_url: String,
    version: String,
    nonce: String,
    n_resources: usize,
    latency: Option<Duration>,
}

impl Logged {
    fn fill(&mut self, push: &Pushed<'_>, at: SystemTime) {
        fn set(field: &mut String, value: &str) {
            field.clear();
            field.push_str(value);
        }
        self.at = Some(at);
        self.stream_id = push.stream_id;
        set(&mut self.node_id, push.node_id);
        set(&mut self.type_url, push.type_url.as_str());
        set(&mut self.version, push.version);
        set(&mut self.nonce, push.nonce);
        self.n_resources = push.n_resources;
        self.latency = push.changed_at.map(|t| t.elapsed());
    }

    fn entry(&self) -> PushEntry {
        PushEntry {
            at: self
                .at
                .map(|at| humantime::format_rfc3339_millis(at).to_string())
                .unwrap_or_default(),
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

impl PushLog {
    /// How many pushes are kept: enough for a screenful, bounded whatever the push rate.
    pub const CAPACITY: usize = 100;

    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one response.
    pub fn record(&self, push: &Pushed<'_>, at: SystemTime) {
        let mut entries = self.entries.lock();
        let mut slot = if entries.len() >= Self::CAPACITY {
            entries.pop_front().unwrap_or_default()
        } else {
            Logged::default()
        };
        slot.fill(push, at);
        entries.push_back(slot);
    }

    /// The logged pushes, newest first.
    pub fn recent(&self) -> Vec<PushEntry> {
        self.entries
            .lock()
            .iter()
            .rev()
            .map(Logged::entry)
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
        self.0.pushed(push);
        self.1.record(push, SystemTime::now());
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
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let type_url = TypeUrl::new("type.googleapis.com/pixiu.pkg.metadata.Metadata");
        for i in 0..(PushLog::CAPACITY as u64 + 50) {
            let nonce = format!("n{i}");
            let changed_at = (i % 2 == 0).then(Instant::now);
            log.record(&push(&type_url, i, &nonce, changed_at), at);
        }
        let recent = log.recent();
        assert_eq!(recent.len(), PushLog::CAPACITY);
        let newest = &recent[0];
        assert_eq!(newest.stream_id, PushLog::CAPACITY as u64 + 49);
        assert_eq!(newest.nonce, format!("n{}", PushLog::CAPACITY + 49));
        assert_eq!(newest.cause, "request");
        assert_eq!(newest.latency_ms, None);
        assert_eq!(newest.at, "2023-11-14T22:13:20.123Z");
        assert_eq!(newest.node_id, "node-1");
        assert_eq!(newest.n_resources, 2);
        let second = &recent[1];
        assert_eq!(second.cause, "change");
        assert!(second.latency_ms.is_some());
        // The oldest kept is the 51st recorded: a reused slot holds only its new values.
        let oldest = recent.last().unwrap();
        assert_eq!(oldest.stream_id, 50);
        assert_eq!(oldest.nonce, "n50");
    }
}
