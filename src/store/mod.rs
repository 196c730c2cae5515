//! Storage backends behind one [`Store`] trait.
//!
//! A store keeps records (raw values with a lease stamp) and tells watchers about every
//! change. It knows nothing of gRPC or xDS: `api/` calls it, `push/` watches it.
//!
//! Backends: [`memory`] (tests, `--store memory`), [`embedded`] (the durable default) and
//! [`etcd`] and [`kube`] (shared by any number of replicas).

use std::{
    collections::BTreeMap,
    sync::{Arc, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{FutureExt, StreamExt, stream::BoxStream};
use tokio::sync::broadcast;

pub use crate::model::{Key, Kind};

pub mod checkpoint;
pub(crate) mod counts;
pub mod embedded;
pub mod etcd;
pub mod journal;
pub mod kube;
pub mod memory;
pub mod ordered;
pub(crate) mod probe;
pub mod sharded;

#[cfg(test)]
pub(crate) mod conformance;

/// One stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its key.
    pub key: Key,
    /// The raw value, exactly as published.
    pub value: Arc<str>,
    /// The store revision of the last write to this record (value or lease; a refresh the
    /// embedded store keeps in memory leaves it). Conditional deletes compare it (and the
    /// embedded store's also the lease in memory), so a refresh racing a delete wins.
    pub revision: u64,
    /// When a publish last created, changed or refreshed it, in milliseconds since the epoch.
    pub refreshed_at_ms: u64,
}

/// A key as the ordered maps of the memory store and of the etcd and Kubernetes stores'
/// mirrors hold it, which order it as [`Key`] is ordered.
pub(crate) type MapKey = (Kind, String, String);

/// A map by namespace whose entries are found and made from a borrowed name
/// (`entry_ref(namespace).or_default()`): only a namespace new to the map has its name copied.
pub(crate) type ByNamespace<T> = hashbrown::HashMap<String, T, std::hash::RandomState>;

/// `key` as a [`MapKey`].
pub(crate) fn map_key(key: &Key) -> MapKey {
    (key.kind, key.namespace.clone(), key.name.clone())
}

impl AsRef<Key> for Record {
    fn as_ref(&self) -> &Key {
        &self.key
    }
}

impl Record {
    /// `refreshed_at_ms` as a time.
    pub fn refreshed_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.refreshed_at_ms)
    }
}

/// Milliseconds since the epoch of `time` (0 before the epoch).
pub fn epoch_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What a put did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// No record existed; one was created.
    Created {
        /// The revision of the write.
        revision: u64,
    },
    /// A record with a different value existed and was overwritten.
    Updated {
        /// The revision of the write.
        revision: u64,
        /// The value it replaced.
        previous: Arc<str>,
    },
    /// The identical value existed; only its lease was refreshed.
    Refreshed {
        /// The revision of the refresh: the record's revision as it was when the refresh
        /// stayed in memory.
        revision: u64,
    },
}

impl PutOutcome {
    /// The revision of the write.
    pub fn revision(&self) -> u64 {
        match self {
            PutOutcome::Created { revision }
            | PutOutcome::Updated { revision, .. }
            | PutOutcome::Refreshed { revision } => *revision,
        }
    }
}

/// A change, as a watcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The complete state at `revision`: replace whatever was known. Always the first event of
    /// a watch, and sent again whenever the watcher fell behind and events were lost.
    Reset {
        /// Every record.
        records: Vec<Record>,
        /// The store revision the list was taken at.
        revision: u64,
    },
    /// A record was created or its value changed.
    Put(Record),
    /// A record's lease was refreshed; its value is unchanged. Watchers only move a known
    /// record's deadline forward with it: a refresh kept in memory comes at the record's
    /// current revision, not a new one.
    Refreshed {
        /// Its key.
        key: Key,
        /// The revision of the refresh (or the record's, for one kept in memory).
        revision: u64,
        /// The new lease stamp.
        refreshed_at_ms: u64,
    },
    /// A record was deleted.
    Delete {
        /// Its key.
        key: Key,
        /// The revision of the delete.
        revision: u64,
    },
}

/// What to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Which kind.
    pub kind: Kind,
    /// Only this namespace; all when `None`.
    pub namespace: Option<String>,
    /// Only names starting with this.
    pub name_prefix: String,
    /// Only keys after this `(namespace, name)`, for pagination.
    pub start_after: Option<(String, String)>,
    /// At most this many records.
    pub limit: usize,
}

impl ListQuery {
    /// Everything of one kind.
    pub fn all(kind: Kind) -> Self {
        Self {
            kind,
            namespace: None,
            name_prefix: String::new(),
            start_after: None,
            limit: usize::MAX,
        }
    }

    /// The first key, in key order, that a scan for this query has to look at: the kind,
    /// then the namespace and the name prefix when the query names a namespace, then the
    /// page's `start_after` when it lies further on. With [`ListQuery::is_past`] it bounds
    /// the scan of an ordered map to the keys around the page instead of every record.
    pub fn first_key(&self) -> Key {
        let (namespace, name) = match &self.namespace {
            Some(namespace) => (namespace.as_str(), self.name_prefix.as_str()),
            None => ("", ""),
        };
        let (namespace, name) = match &self.start_after {
            Some((ns, after)) if (ns.as_str(), after.as_str()) > (namespace, name) => {
                (ns.as_str(), after.as_str())
            }
            _ => (namespace, name),
        };
        Key {
            kind: self.kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// [`ListQuery::first_key`] as a [`MapKey`].
    pub(crate) fn first_map_key(&self) -> MapKey {
        let Key {
            kind,
            namespace,
            name,
        } = self.first_key();
        (kind, namespace, name)
    }

    /// What this query selects out of `records`, read from [`ListQuery::first_map_key`] on
    /// ([`ListQuery::scan`]).
    pub(crate) fn select(&self, records: &BTreeMap<MapKey, Record>) -> Vec<Record> {
        let ordered = records
            .range(self.first_map_key()..)
            .map(|(_, record)| record);
        self.scan(ordered).cloned().collect()
    }

    /// Whether a scan in key order that started at [`ListQuery::first_key`] has passed every
    /// key this query selects once it reaches `key`: another kind, or, when the query names
    /// a namespace, another namespace or a name past the prefix (the names that start with
    /// a prefix are contiguous in order and begin at the prefix itself).
    pub fn is_past(&self, key: &Key) -> bool {
        key.kind != self.kind
            || self.namespace.as_ref().is_some_and(|namespace| {
                *namespace != key.namespace || !key.name.starts_with(&self.name_prefix)
            })
    }

    /// What this query selects out of `ordered`, items in key order from
    /// [`ListQuery::first_key`] on (keys or records): those it matches, until
    /// [`ListQuery::is_past`], at most `limit`. Every ordered backend pages through this.
    pub fn scan<T: AsRef<Key>>(&self, ordered: impl Iterator<Item = T>) -> impl Iterator<Item = T> {
        ordered
            .take_while(|item| !self.is_past(item.as_ref()))
            .filter(|item| self.matches(item.as_ref()))
            .take(self.limit)
    }

    /// Whether `key` is selected by this query (ignoring `limit`).
    pub fn matches(&self, key: &Key) -> bool {
        key.kind == self.kind
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == key.namespace)
            && key.name.starts_with(&self.name_prefix)
            && self.start_after.as_ref().is_none_or(|(ns, name)| {
                (key.namespace.as_str(), key.name.as_str()) > (ns.as_str(), name.as_str())
            })
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend cannot take the operation now (down, unreachable, shutting down). Retrying
    /// later helps.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend failed in a way a retry will not fix (I/O error, corrupt data).
    #[error("store failed: {0}")]
    Storage(String),
    /// A namespace holds as many records as it may.
    #[error("namespace {namespace} holds {limit} records, the most it may")]
    NamespaceFull {
        /// The namespace.
        namespace: String,
        /// The configured limit.
        limit: usize,
    },
    /// The record is larger than the backend accepts (the Kubernetes API server's object size
    /// limit). Retrying does not help; a smaller value does.
    #[error("record too large for the store: {0}")]
    TooLarge(String),
    /// The backend refused the record for a reason a retry does not fix (a namespace that is
    /// not a Kubernetes namespace name, or does not exist).
    #[error("store refused the record: {0}")]
    Rejected(String),
}

/// Result of store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A backend that stores records and streams their changes.
///
/// Every implementation passes the same conformance suite (`store/conformance.rs`).
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores `value` under `key`, stamping the lease with `now`. Returns only once the write
    /// is as durable as the backend makes it. An identical value only refreshes the lease
    /// (which the embedded store may keep in memory until its next checkpoint).
    async fn put(&self, key: &Key, value: &str, now: SystemTime) -> Result<PutOutcome>;

    /// The record under `key`.
    async fn get(&self, key: &Key) -> Result<Option<Record>>;

    /// Deletes `key`; with `if_revision`, only when the record is still at that revision.
    /// Returns whether a record was deleted.
    async fn delete(&self, key: &Key, if_revision: Option<u64>) -> Result<bool>;

    /// Records selected by `query`, ordered by `(namespace, name)`.
    async fn list(&self, query: &ListQuery) -> Result<Vec<Record>>;

    /// Every change from now on, starting with an [`Event::Reset`] of the current state.
    /// The stream ends only when the store is dropped.
    fn watch(&self) -> BoxStream<'static, Event>;

    /// Whether the backend can take writes now (for `/readyz`).
    async fn ready(&self) -> Result<()>;

    /// A short name for logs: `memory`, `embedded`, ...
    fn backend(&self) -> &'static str;

    /// Whether this replica may sweep expired records, for backends shared by replicas that
    /// elect one sweeper (Kubernetes). `None` (the default): always.
    fn leadership(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
}

/// A mirror the backends that keep one (etcd, Kubernetes) let watchers follow.
pub(crate) trait Subscribe: Send + Sync + 'static {
    /// Subscribes to events and takes the mirror's state as an [`Event::Reset`] under one
    /// lock, so no event is missed or repeated.
    fn subscribe(&self) -> (Event, broadcast::Receiver<Event>);
}

/// Events a backend buffers for each watcher before the watcher falls behind and starts over
/// from an [`Event::Reset`] of the whole state.
///
/// A reset costs its watcher time in proportion to the records held, and while it works the
/// next events queue up again: with a buffer shorter than that time, a watcher that fell
/// behind once under a steady stream of writes falls behind again after every reset and never
/// catches up (with 4,096, the push layer and the lease sweeper of a store of a million records
/// did so at 20,000 publishes a second, and the copies of the state halved the write
/// throughput; docs/benchmarks.md, "A watcher that falls behind"). 65,536 events are over three
/// seconds of such writes. The ring is allocated once per store, about 8 MiB; a change stays
/// in it only until every watcher has read it, so it holds records only while one is behind.
pub(crate) const WATCH_BUFFER: usize = 65_536;

/// Hands `f` the events of a watch that are already waiting, at most `max`, without waiting
/// for more, so a reader that follows a store takes a committed batch in one turn; `false`
/// once the watch has ended.
pub fn take_waiting(
    events: &mut BoxStream<'static, Event>,
    max: usize,
    mut f: impl FnMut(Event),
) -> bool {
    for _ in 0..max {
        match events.next().now_or_never() {
            Some(Some(event)) => f(event),
            Some(None) => return false,
            None => break,
        }
    }
    true
}

/// The watch of a mirror: a reset, then every event; a fresh reset whenever the watcher fell
/// behind. Holds only a weak reference, so it ends once the mirror is dropped (or its event
/// channel closes).
pub(crate) fn follow<S: Subscribe>(source: Weak<S>) -> BoxStream<'static, Event> {
    futures::stream::unfold(
        (source, None),
        |(source, rx): (Weak<S>, Option<broadcast::Receiver<Event>>)| async move {
            let mut rx = match rx {
                Some(rx) => rx,
                None => {
                    let (reset, rx) = source.upgrade()?.subscribe();
                    return Some((reset, (source, Some(rx))));
                }
            };
            match rx.recv().await {
                Ok(event) => Some((event, (source, Some(rx)))),
                // Fell behind: start over with a fresh reset.
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "a store watcher fell behind; it starts over from the whole state"
                    );
                    let (reset, rx) = source.upgrade()?.subscribe();
                    Some((reset, (source, Some(rx))))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        },
    )
    .boxed()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    /// Keys over a small alphabet, so prefixes, namespaces and page starts collide often.
    pub(super) fn key() -> impl Strategy<Value = Key> {
        (0..3usize, "[ab]{0,2}", "[ab/]{0,4}").prop_map(|(kind, namespace, name)| Key {
            kind: Kind::ALL[kind],
            namespace,
            name,
        })
    }

    /// Every kind and namespace of [`key`]'s alphabet, with how many of `keys` it holds.
    pub(super) fn walked_counts<'a>(
        keys: impl Iterator<Item = &'a Key> + Clone,
    ) -> Vec<(Kind, &'static str, usize)> {
        let mut counts = Vec::new();
        for kind in Kind::ALL {
            for namespace in ["", "a", "b", "ab", "ba"] {
                let walked = keys
                    .clone()
                    .filter(|k| k.kind == kind && k.namespace == namespace)
                    .count();
                counts.push((kind, namespace, walked));
            }
        }
        counts
    }

    /// Queries over the alphabet of [`key`].
    pub(super) fn query() -> impl Strategy<Value = ListQuery> {
        (
            0..3usize,
            proptest::option::of("[ab]{0,2}"),
            "[ab/]{0,2}",
            proptest::option::of(("[ab]{0,2}", "[ab/]{0,4}")),
            0..6usize,
        )
            .prop_map(
                |(kind, namespace, name_prefix, start_after, limit)| ListQuery {
                    kind: Kind::ALL[kind],
                    namespace,
                    name_prefix,
                    start_after,
                    limit,
                },
            )
    }

    proptest! {
        /// A scan in key order from `first_key` until `is_past` selects what a filter over
        /// every key does.
        #[test]
        fn a_bounded_scan_selects_what_a_full_one_does(
            keys in proptest::collection::btree_set(key(), 0..60),
            query in query(),
        ) {
            let full: Vec<&Key> = keys
                .iter()
                .filter(|k| query.matches(k))
                .take(query.limit)
                .collect();
            let bounded: Vec<&Key> = query.scan(keys.range(query.first_key()..)).collect();
            prop_assert_eq!(bounded, full);
        }
    }

    /// A page of `app/` metadata in namespace `ns` after `app/r7`.
    pub(super) fn page_after_r7() -> ListQuery {
        ListQuery {
            namespace: Some("ns".into()),
            name_prefix: "app/".into(),
            start_after: Some(("ns".into(), "app/r7".into())),
            limit: 10,
            ..ListQuery::all(Kind::Metadata)
        }
    }

    #[test]
    fn a_page_inside_a_namespace_starts_at_its_token_and_stops_after_the_prefix() {
        let query = page_after_r7();
        assert_eq!(query.first_key(), Key::metadata("ns", "app", "r7"));
        assert!(!query.is_past(&Key::metadata("ns", "app", "r8")));
        assert!(query.is_past(&Key::metadata("ns", "apq", "r0")));
        assert!(query.is_past(&Key::metadata("nt", "app", "r9")));
        assert!(query.is_past(&Key::definition("ns", "app/r9")));
        let keys: BTreeSet<Key> = (0..10)
            .map(|i| Key::metadata("ns", "app", &format!("r{i}")))
            .collect();
        let page: Vec<&Key> = query.scan(keys.range(query.first_key()..)).collect();
        assert_eq!(
            page,
            [
                &Key::metadata("ns", "app", "r8"),
                &Key::metadata("ns", "app", "r9")
            ]
        );
    }
}
