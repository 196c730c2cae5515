//! Watch streams for consumers that do not speak xDS.
//!
//! A watch follows exactly what ADS pushes: it reads the xDS cache (never writes it; `push/`
//! stays its only writer), so versions are the same content-derived resource versions, the
//! same on every replica and across restarts, and a reconnecting watcher that names the
//! versions it holds is sent only what changed.
//!
//! [`WatchState`] is the pure part: given the resources a watch selects in a snapshot, it
//! says what to send. [`WatchHub::spawn`] is the IO loop around it. Memory per watcher is
//! bounded: the cache's change notifications coalesce, so a slow watcher holds one snapshot
//! and one pending message, never a queue; and every watch holds a stream permit.

use std::{collections::BTreeMap, sync::Arc};

use pixiu_xds::{Cache, Partition, Resource, Snapshot, TypeUrl, View};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::status::Error;

/// Which resources a watch follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    /// The namespace (cache partition) it reads.
    pub namespace: String,
    /// The resource type.
    pub type_url: &'static str,
    /// The resources it follows.
    pub names: Names,
}

/// The names a [`Selector`] follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Names {
    /// One resource.
    Exact(String),
    /// Every resource whose name starts with this.
    Prefix(String),
}

impl Selector {
    /// The resources it selects in `snapshot`, ordered by name.
    pub fn select(&self, snapshot: &Snapshot) -> Vec<Arc<Resource>> {
        let partition = Partition::new(&self.namespace);
        let type_url = TypeUrl::new(self.type_url);
        match &self.names {
            Names::Exact(name) => snapshot
                .get(&View::new([partition]), &type_url, name)
                .cloned()
                .into_iter()
                .collect(),
            Names::Prefix(prefix) => snapshot
                .partition_resources(&partition, &type_url)
                .filter(|r| r.name.as_str().starts_with(prefix.as_str()))
                .cloned()
                .collect(),
        }
    }

    /// The generation of what it reads: equal numbers mean nothing it selects has changed.
    fn generation(&self, snapshot: &Snapshot) -> u64 {
        snapshot.generation(
            &View::new([Partition::new(&self.namespace)]),
            &TypeUrl::new(self.type_url),
        )
    }
}

/// What one watch message carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Diff {
    /// Resources created or changed since the previous message, ordered by name.
    pub updated: Vec<Arc<Resource>>,
    /// Names removed since the previous message (or, on a resumed stream's first message,
    /// known to the client and gone).
    pub removed: Vec<String>,
    /// Whether this is the first message of the stream.
    pub initial: bool,
    /// Whether nothing is selected after this message.
    pub empty: bool,
    /// The version of every selected resource after this message.
    pub versions: BTreeMap<String, String>,
}

impl Diff {
    /// Splits a diff into messages whose resources add up to at most `max_bytes` each (a
    /// larger resource goes alone), so no message outgrows a client's decoding limit
    /// (tonic's and grpcio's default is 4 MiB). Removals, `initial` and `empty` go on the last
    /// message: once it is applied the client holds the state the diff describes.
    pub fn split(self, max_bytes: usize) -> Vec<Diff> {
        let mut chunks: Vec<Vec<Arc<Resource>>> = Vec::new();
        let mut current = Vec::new();
        let mut current_bytes = 0usize;
        for resource in self.updated {
            let size = resource.value().len();
            if !current.is_empty() && current_bytes.saturating_add(size) > max_bytes {
                chunks.push(std::mem::take(&mut current));
                current_bytes = 0;
            }
            current_bytes = current_bytes.saturating_add(size);
            current.push(resource);
        }
        chunks.push(current);
        let n_chunks = chunks.len();
        chunks
            .into_iter()
            .enumerate()
            .map(|(idx, updated)| {
                let last = idx + 1 == n_chunks;
                Diff {
                    updated,
                    removed: if last {
                        self.removed.clone()
                    } else {
                        Vec::new()
                    },
                    initial: last && self.initial,
                    empty: last && self.empty,
                    versions: self.versions.clone(),
                }
            })
            .collect()
    }
}

/// The largest sum of resource sizes in one watch message, in bytes (a resource larger than
/// this goes alone).
pub const MAX_MESSAGE_RESOURCE_BYTES: usize = 2 * 1024 * 1024;

/// The client's view of one watch: the version of each resource it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchState {
    known: BTreeMap<String, String>,
    sent_initial: bool,
}

impl WatchState {
    /// A fresh watch (`known` empty) or a resumed one: `known` maps each resource name the
    /// client holds to the version it holds.
    pub fn resume(known: BTreeMap<String, String>) -> Self {
        Self {
            known,
            sent_initial: false,
        }
    }

    /// The message to send now that `current` is selected, if any: always one first, then
    /// one only when something changed.
    pub fn step(&mut self, current: &[Arc<Resource>]) -> Option<Diff> {
        let mut updated = Vec::new();
        let mut next = BTreeMap::new();
        for resource in current {
            let name = resource.name.as_str();
            let version = resource.version.as_str();
            if self.known.get(name).map(String::as_str) != Some(version) {
                updated.push(resource.clone());
            }
            next.insert(name.to_string(), version.to_string());
        }
        let removed: Vec<String> = self
            .known
            .keys()
            .filter(|name| !next.contains_key(*name))
            .cloned()
            .collect();
        let initial = !self.sent_initial;
        if !initial && updated.is_empty() && removed.is_empty() {
            return None;
        }
        self.sent_initial = true;
        self.known = next;
        Some(Diff {
            updated,
            removed,
            initial,
            empty: self.known.is_empty(),
            versions: self.known.clone(),
        })
    }
}

/// The response stream of a watch.
pub type WatchStream<T> = ReceiverStream<Result<T, Status>>;

/// Starts watches over the cache, each holding a stream permit. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WatchHub {
    cache: Cache,
    permits: Arc<Semaphore>,
    max_streams: usize,
    shutdown: CancellationToken,
}

impl WatchHub {
    /// Watches over `cache`, at most `max_streams` open at once, all ending on `shutdown`.
    pub fn new(cache: Cache, max_streams: usize, shutdown: CancellationToken) -> Self {
        Self {
            cache,
            permits: Arc::new(Semaphore::new(max_streams)),
            max_streams,
            shutdown,
        }
    }

    fn admit(&self) -> Result<OwnedSemaphorePermit, Error> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::TooManyStreams {
                limit: self.max_streams,
            })
    }

    /// Starts a watch of `selector` from `state`, sending `encode(diff)` for each message.
    pub fn spawn<T, F>(
        &self,
        selector: Selector,
        mut state: WatchState,
        encode: F,
    ) -> Result<WatchStream<T>, Error>
    where
        T: Send + 'static,
        F: Fn(Diff) -> T + Send + 'static,
    {
        let permit = self.admit()?;
        // One message in flight: later changes coalesce in the cache meanwhile.
        let (tx, rx) = mpsc::channel(1);
        // Subscribe before reading, so a write in between is not missed.
        let mut changes = self.cache.changes();
        let mut snapshot = self.cache.snapshot();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut last_generation = None;
            loop {
                let generation = selector.generation(&snapshot);
                if last_generation != Some(generation) {
                    last_generation = Some(generation);
                    if let Some(diff) = state.step(&selector.select(&snapshot)) {
                        for part in diff.split(MAX_MESSAGE_RESOURCE_BYTES) {
                            tokio::select! {
                                sent = tx.send(Ok(encode(part))) => if sent.is_err() { return },
                                () = shutdown.cancelled() => return,
                            }
                        }
                    }
                }
                snapshot = tokio::select! {
                    next = changes.next() => match next {
                        Some(next) => next,
                        None => return,
                    },
                    () = tx.closed() => return,
                    () = shutdown.cancelled() => return,
                };
            }
        });
        Ok(ReceiverStream::new(rx))
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::google::protobuf::Any;
    use pixiu_xds::{ResourceName, Update};

    use super::*;

    fn res(name: &str, body: &[u8]) -> Arc<Resource> {
        Arc::new(Resource::new(
            ResourceName::new(name),
            Any {
                type_url: "t".into(),
                value: body.to_vec(),
            },
        ))
    }

    fn names(diff: &Diff) -> (Vec<&str>, Vec<&str>) {
        (
            diff.updated.iter().map(|r| r.name.as_str()).collect(),
            diff.removed.iter().map(String::as_str).collect(),
        )
    }

    #[test]
    fn first_message_always_then_only_changes() {
        let mut state = WatchState::default();
        let first = state.step(&[]).unwrap();
        assert!(first.initial && first.empty);
        assert_eq!(state.step(&[]), None);
        let a1 = res("a", b"1");
        let diff = state.step(std::slice::from_ref(&a1)).unwrap();
        assert_eq!(names(&diff), (vec!["a"], vec![]));
        assert!(!diff.initial && !diff.empty);
        assert_eq!(state.step(std::slice::from_ref(&a1)), None);
        let diff = state.step(&[res("a", b"2"), res("b", b"1")]).unwrap();
        assert_eq!(names(&diff), (vec!["a", "b"], vec![]));
        let diff = state.step(&[res("b", b"1")]).unwrap();
        assert_eq!(names(&diff), (vec![], vec!["a"]));
    }

    #[test]
    fn resume_sends_only_what_changed() {
        let a = res("a", b"1");
        let b = res("b", b"1");
        let known = BTreeMap::from([
            ("a".to_string(), a.version.to_string()),
            ("gone".to_string(), "v".to_string()),
            ("b".to_string(), "stale".to_string()),
        ]);
        let mut state = WatchState::resume(known);
        let diff = state.step(&[a, b]).unwrap();
        assert!(diff.initial);
        assert_eq!(names(&diff), (vec!["b"], vec!["gone"]));
        assert_eq!(diff.versions.len(), 2);
    }

    #[test]
    fn split_keeps_messages_small_and_flags_on_the_last() {
        let diff = Diff {
            updated: vec![
                res("a", &[0; 6]),
                res("b", &[0; 6]),
                res("c", &[0; 20]),
                res("d", &[0; 1]),
            ],
            removed: vec!["gone".into()],
            initial: true,
            empty: false,
            versions: BTreeMap::new(),
        };
        let parts = diff.split(10);
        let shape: Vec<(Vec<&str>, Vec<&str>, bool)> = parts
            .iter()
            .map(|d| {
                let (updated, removed) = names(d);
                (updated, removed, d.initial)
            })
            .collect();
        assert_eq!(
            shape,
            [
                (vec!["a"], vec![], false),
                (vec!["b"], vec![], false),
                (vec!["c"], vec![], false),
                (vec!["d"], vec!["gone"], true),
            ]
        );
        let empty = Diff {
            updated: vec![],
            removed: vec![],
            initial: true,
            empty: true,
            versions: BTreeMap::new(),
        };
        assert_eq!(empty.clone().split(10), [empty]);
    }

    #[tokio::test]
    async fn hub_streams_changes_and_holds_a_permit() {
        use futures::StreamExt;
        let (cache, writer) = pixiu_xds::cache();
        let shutdown = CancellationToken::new();
        let hub = WatchHub::new(cache, 1, shutdown.clone());
        let selector = Selector {
            namespace: "ns".into(),
            type_url: "t",
            names: Names::Prefix("app/".into()),
        };
        let mut stream = hub
            .spawn(selector.clone(), WatchState::default(), |d| d)
            .unwrap();
        let first = stream.next().await.unwrap().unwrap();
        assert!(first.initial && first.empty);
        assert!(matches!(
            hub.spawn(selector, WatchState::default(), |d| d),
            Err(Error::TooManyStreams { limit: 1 })
        ));
        let put = |name: &str| Update::Put {
            partition: Partition::new("ns"),
            type_url: TypeUrl::new("t"),
            name: ResourceName::new(name),
            body: Any {
                type_url: "t".into(),
                value: b"x".to_vec(),
            },
        };
        writer.apply([put("other/1")]);
        writer.apply([put("app/1")]);
        let diff = stream.next().await.unwrap().unwrap();
        assert_eq!(names(&diff), (vec!["app/1"], vec![]));
        shutdown.cancel();
        assert!(stream.next().await.is_none());
    }
}
