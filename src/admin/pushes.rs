//! The recent pushes the page lists: a bounded log fed by the ADS server's observer.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, SystemTime},
};

use parking_lot::Mutex;
use pixiu_xds::{Notice, Protocol, Pushed, StreamObserver};

use super::views::PushEntry;

/// The last [`PushLog::CAPACITY`] responses written to any stream, newest last.
#[derive(Debug, Clone, Default)]
pub struct PushLog {
    entries: Arc<Mutex<VecDeque<PushEntry>>>,
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
        let entry = PushEntry {
            at: humantime::format_rfc3339_millis(at).to_string(),
            stream_id: push.stream_id,
            node_id: push.node_id.to_string(),
            type_url: push.type_url.to_string(),
            version: push.version.to_string(),
            nonce: push.nonce.to_string(),
            n_resources: push.n_resources,
            cause: if push.changed_at.is_some() {
                "change"
            } else {
                "request"
            }
            .to_string(),
            latency_ms: push.changed_at.map(|t| duration_ms(t.elapsed())),
        };
        let mut entries = self.entries.lock();
        if entries.len() == Self::CAPACITY {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    /// The logged pushes, newest first.
    pub fn recent(&self) -> Vec<PushEntry> {
        self.entries.lock().iter().rev().cloned().collect()
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

    fn response_sent(&self, type_url: &str, n_resources: usize, snapshot_seq: u64) {
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
