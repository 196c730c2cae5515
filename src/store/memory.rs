//! An in-memory store: the reference implementation of [`Store`], for tests and
//! `--store memory`. Nothing survives a restart.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use futures::{StreamExt, stream::BoxStream};
use parking_lot::Mutex;
use tokio::sync::broadcast;

use super::{
    Error, Event, Key, ListQuery, PutOutcome, Record, Result, Store, WATCH_BUFFER, epoch_ms,
};

/// An in-memory [`Store`].
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<State>>,
    events: broadcast::Sender<Event>,
    max_records_per_namespace: usize,
}

#[derive(Debug, Default)]
struct State {
    revision: u64,
    records: BTreeMap<(crate::model::Kind, String, String), Record>,
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
            inner: Arc::default(),
            events,
            max_records_per_namespace,
        }
    }
}

fn map_key(key: &Key) -> (crate::model::Kind, String, String) {
    (key.kind, key.namespace.clone(), key.name.clone())
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn put(&self, key: &Key, value: &str, now: SystemTime) -> Result<PutOutcome> {
        let mut state = self.inner.lock();
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
                let n_in_namespace = state
                    .records
                    .keys()
                    .filter(|(k, ns, _)| *k == key.kind && *ns == key.namespace)
                    .count();
                if n_in_namespace >= self.max_records_per_namespace {
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
                (PutOutcome::Created { revision }, Event::Put(record))
            }
        };
        state.revision = revision;
        // Sent under the lock so watchers see events in revision order.
        let _ = self.events.send(event);
        Ok(outcome)
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>> {
        Ok(self.inner.lock().records.get(&map_key(key)).cloned())
    }

    async fn delete(&self, key: &Key, if_revision: Option<u64>) -> Result<bool> {
        let mut state = self.inner.lock();
        let map_key = map_key(key);
        match state.records.get(&map_key) {
            Some(record) if if_revision.is_none_or(|r| r == record.revision) => {
                state.records.remove(&map_key);
                state.revision += 1;
                let _ = self.events.send(Event::Delete {
                    key: key.clone(),
                    revision: state.revision,
                });
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<Record>> {
        Ok(self
            .inner
            .lock()
            .records
            .values()
            .filter(|r| query.matches(&r.key))
            .take(query.limit)
            .cloned()
            .collect())
    }

    fn watch(&self) -> BoxStream<'static, Event> {
        let store = self.clone();
        futures::stream::unfold(None, move |rx: Option<broadcast::Receiver<Event>>| {
            let store = store.clone();
            async move {
                let Some(mut rx) = rx else {
                    // Subscribe and list under one lock: no event is missed or repeated.
                    let state = store.inner.lock();
                    let rx = store.events.subscribe();
                    let reset = Event::Reset {
                        records: state.records.values().cloned().collect(),
                        revision: state.revision,
                    };
                    return Some((reset, Some(rx)));
                };
                match rx.recv().await {
                    Ok(event) => Some((event, Some(rx))),
                    // Fell behind: start over with a fresh list.
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        super::fell_behind(missed);
                        let state = store.inner.lock();
                        let rx = store.events.subscribe();
                        let reset = Event::Reset {
                            records: state.records.values().cloned().collect(),
                            revision: state.revision,
                        };
                        Some((reset, Some(rx)))
                    }
                    Err(broadcast::error::RecvError::Closed) => None,
                }
            }
        })
        .boxed()
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
}
