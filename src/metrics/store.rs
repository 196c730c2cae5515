//! A [`Store`] wrapper that times every operation into
//! `pixiu_metadata_store_operation_duration_seconds` and counts the resets of its watches
//! after their first into `pixiu_metadata_store_watch_resets_total`.
//!
//! It sits between the services and the backend, so `store/` stays free of metrics and every
//! backend is measured the same way.

use std::{sync::Arc, time::SystemTime};

use futures::{StreamExt, stream::BoxStream};
use prometheus_client::metrics::family::Family;
use tokio::time::Instant;

use super::{BackendLabels, Counter, Histogram, Metrics, StoreLabels};
use crate::store::{Event, Key, ListQuery, PutOutcome, Record, Result, Store};

/// Times every operation of the store it wraps.
pub struct InstrumentedStore {
    inner: Arc<dyn Store>,
    histograms: Family<StoreLabels, Histogram>,
    watch_resets: Family<BackendLabels, Counter>,
}

impl InstrumentedStore {
    /// Wraps `inner`, recording into the store series of `metrics`.
    pub fn new(inner: Arc<dyn Store>, metrics: &Metrics) -> Self {
        Self {
            inner,
            histograms: metrics.store_operations.clone(),
            watch_resets: metrics.store_watch_resets.clone(),
        }
    }

    fn record<T>(&self, operation: &'static str, started: Instant, result: &Result<T>) {
        let labels = StoreLabels {
            backend: self.inner.backend(),
            operation,
            result: if result.is_ok() { "ok" } else { "error" },
        };
        self.histograms
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }
}

#[async_trait::async_trait]
impl Store for InstrumentedStore {
    async fn put(&self, key: &Key, value: &str, now: SystemTime) -> Result<PutOutcome> {
        let started = Instant::now();
        let result = self.inner.put(key, value, now).await;
        self.record("put", started, &result);
        result
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>> {
        let started = Instant::now();
        let result = self.inner.get(key).await;
        self.record("get", started, &result);
        result
    }

    async fn delete(&self, key: &Key, if_revision: Option<u64>) -> Result<bool> {
        let started = Instant::now();
        let result = self.inner.delete(key, if_revision).await;
        self.record("delete", started, &result);
        result
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<Record>> {
        let started = Instant::now();
        let result = self.inner.list(query).await;
        self.record("list", started, &result);
        result
    }

    fn watch(&self) -> BoxStream<'static, Event> {
        let resets = self
            .watch_resets
            .get_or_create(&BackendLabels {
                backend: self.inner.backend(),
            })
            .clone();
        // Every watch starts with a reset; any later one means the watcher fell behind.
        let mut started = false;
        self.inner
            .watch()
            .inspect(move |event| {
                if matches!(event, Event::Reset { .. }) && std::mem::replace(&mut started, true) {
                    resets.inc();
                }
            })
            .boxed()
    }

    async fn ready(&self) -> Result<()> {
        self.inner.ready().await
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn leadership(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.inner.leadership()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        metrics::Metrics,
        store::{WATCH_BUFFER, memory::MemoryStore},
    };

    #[tokio::test]
    async fn operations_are_timed_by_backend_operation_and_result() {
        let metrics = Metrics::new();
        let store = InstrumentedStore::new(Arc::new(MemoryStore::default()), &metrics);
        let key = Key::metadata("default", "greeter", "r1");
        store.put(&key, "v", SystemTime::now()).await.unwrap();
        assert!(store.get(&key).await.unwrap().is_some());
        assert!(store.delete(&key, None).await.unwrap());
        let text = metrics.encode();
        for operation in ["put", "get", "delete"] {
            let line = format!(
                "pixiu_metadata_store_operation_duration_seconds_count{{backend=\"memory\",operation=\"{operation}\",result=\"ok\"}} 1"
            );
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
    }

    #[tokio::test]
    async fn a_watch_that_falls_behind_counts_its_reset() {
        let metrics = Metrics::new();
        let store = InstrumentedStore::new(Arc::new(MemoryStore::default()), &metrics);
        let line = "pixiu_metadata_store_watch_resets_total{backend=\"memory\"}";
        let mut watch = store.watch();
        assert!(matches!(watch.next().await, Some(Event::Reset { .. })));
        let key = Key::metadata("default", "greeter", "r1");
        store.put(&key, "v0", SystemTime::now()).await.unwrap();
        assert!(matches!(watch.next().await, Some(Event::Put(_))));
        assert!(
            metrics.encode().contains(&format!("{line} 0")),
            "the first reset is no reset"
        );
        // More changes than the watch buffers while its reader is away.
        for i in 0..=WATCH_BUFFER {
            store
                .put(&key, &format!("v{i}"), SystemTime::now())
                .await
                .unwrap();
        }
        match watch.next().await {
            Some(Event::Reset { records, .. }) => assert_eq!(records.len(), 1),
            other => panic!("expected a reset, got {other:?}"),
        }
        let text = metrics.encode();
        assert!(
            text.contains(&format!("{line} 1")),
            "{line} 1 missing from\n{text}"
        );
    }
}
