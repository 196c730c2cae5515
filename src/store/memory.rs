//! An in-memory store: the reference implementation of [`Store`], for tests and
//! `--store memory`. Nothing survives a restart.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use futures::stream::BoxStream;
use parking_lot::Mutex;
use tokio::sync::broadcast;

use super::{
    Error, Event, Key, ListQuery, MapKey, PutOutcome, Record, Result, Store, WATCH_BUFFER,
    counts::NamespaceCounts, epoch_ms, map_key,
};

/// An in-memory [`Store`].
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Shared>,
    max_records_per_namespace: usize,
}

/// The records and their watchers' channel, which watches follow (see [`super::follow`]).
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
}

#[derive(Debug, Default)]
struct State {
    revision: u64,
    records: BTreeMap<MapKey, Record>,
    counts: NamespaceCounts,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

impl MemoryStore {
    /// An empty store holding at most `max_records_per_namespace` records per namespace and
    /// kind.
    pub fn new(max_records_per_namespace: usize) -> Self {
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        Self {
            inner: Arc::new(Shared {
                state: Mutex::default(),
                events,
            }),
            max_records_per_namespace,
        }
    }
}

impl super::Subscribe for Shared {
    fn subscribe(&self) -> (Event, broadcast::Receiver<Event>) {
        // Subscribe and list under one lock: no event is missed or repeated.
        let state = self.state.lock();
        let rx = self.events.subscribe();
        let reset = Event::Reset {
            records: state.records.values().cloned().collect(),
            revision: state.revision,
        };
        (reset, rx)
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn put(&self, key: &Key, value: &str, now: SystemTime) -> Result<PutOutcome> {
        let mut state = self.inner.state.lock();
        let refreshed_at_ms = epoch_ms(now);
        let revision = state.revision + 1;
        let map_key = map_key(key);
        let (outcome, event) = match state.records.get_mut(&map_key) {
            Some(record) if &*record.value == value => {
                record.revision = revision;
                record.refreshed_at_ms = refreshed_at_ms;
                (
                    PutOutcome::Refreshed { revision },
                    Event::Refreshed {
                        key: key.clone(),
                        revision,
                        refreshed_at_ms,
                    },
                )
            }
            Some(record) => {
                let previous = std::mem::replace(&mut record.value, Arc::from(value));
                record.revision = revision;
                record.refreshed_at_ms = refreshed_at_ms;
                (
                    PutOutcome::Updated { revision, previous },
                    Event::Put(record.clone()),
                )
            }
            None => {
                if state.counts.get(key.kind, &key.namespace) >= self.max_records_per_namespace {
                    return Err(Error::NamespaceFull {
                        namespace: key.namespace.clone(),
                        limit: self.max_records_per_namespace,
                    });
                }
                let record = Record {
                    key: key.clone(),
                    value: Arc::from(value),
                    revision,
                    refreshed_at_ms,
                };
                state.records.insert(map_key, record.clone());
                state.counts.add(key);
                (PutOutcome::Created { revision }, Event::Put(record))
            }
        };
        state.revision = revision;
        // Sent under the lock so watchers see events in revision order.
        let _ = self.inner.events.send(event);
        Ok(outcome)
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>> {
        Ok(self.inner.state.lock().records.get(&map_key(key)).cloned())
    }

    async fn delete(&self, key: &Key, if_revision: Option<u64>) -> Result<bool> {
        let mut state = self.inner.state.lock();
        let map_key = map_key(key);
        match state.records.get(&map_key) {
            Some(record) if if_revision.is_none_or(|r| r == record.revision) => {
                state.records.remove(&map_key);
                state.counts.remove(key);
                state.revision += 1;
                let _ = self.inner.events.send(Event::Delete {
                    key: key.clone(),
                    revision: state.revision,
                });
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<Record>> {
        Ok(query.select(&self.inner.state.lock().records))
    }

    fn watch(&self) -> BoxStream<'static, Event> {
        super::follow(Arc::downgrade(&self.inner))
    }

    async fn ready(&self) -> Result<()> {
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        super::super::conformance::run(|| async { MemoryStore::default() }).await;
    }

    #[tokio::test]
    async fn watch_ends_when_the_store_is_dropped() {
        use futures::StreamExt;
        let store = MemoryStore::default();
        let mut watch = store.watch();
        assert!(matches!(watch.next().await, Some(Event::Reset { .. })));
        drop(store);
        assert!(watch.next().await.is_none());
    }
}
