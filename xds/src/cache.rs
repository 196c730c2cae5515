//! The versioned resource cache: *what exists and at which version*.
//!
//! One [`CacheWriter`] changes it, any number of [`Cache`] handles read it. Readers never see a
//! half-applied batch: every write builds a new immutable [`Snapshot`] (persistent maps, so a
//! write costs `O(log n)`, not a copy) and publishes it through a `tokio::sync::watch` channel.
//! A stream that falls behind simply sees the newest snapshot next time it looks, so
//! notifications coalesce by construction and a slow stream holds at most one old snapshot.
//!
//! The cache knows no resource type: a resource is a name, a type URL and the bytes of an
//! `Any`. Versions are derived from those bytes ([`Version::of_bytes`]).

use std::{fmt, sync::Arc, time::Instant};

use envoy_types::pb::google::protobuf::Any;
use imbl::OrdMap;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::watch;
use tokio_stream::{StreamExt, wrappers::WatchStream};

use crate::{
    interest::{Changed, Index, Interest},
    types::{Partition, ResourceName, TypeUrl, Version},
};

/// One resource as stored: its name, content-derived version and body.
///
/// The body is kept as its `Any`'s protobuf bytes, encoded once here: every response that
/// carries the resource copies those bytes into its frame (see [`crate::response`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Resource {
    /// The resource name within its type.
    pub name: ResourceName,
    /// Hash of the body's value.
    pub version: Version,
    /// The `Any`, encoded.
    packed: Box<[u8]>,
    /// Where the `Any`'s value starts in `packed`: it is the last field, so it runs to the
    /// end.
    value_at: usize,
}

impl Resource {
    /// Packs `body` under `name`, computing the version from the body's bytes.
    pub fn new(name: ResourceName, body: Any) -> Self {
        let version = Version::of_bytes(&body.value);
        let packed = body.encode_to_vec().into_boxed_slice();
        let value_at = packed.len() - body.value.len();
        Self {
            name,
            version,
            packed,
            value_at,
        }
    }

    /// The body's value: the resource's own message, encoded.
    pub fn value(&self) -> &[u8] {
        &self.packed[self.value_at..]
    }

    /// The body's type URL.
    pub fn type_url(&self) -> &str {
        // `type_url` is the first field when present: its key (one byte), then its length.
        let mut head = &self.packed[..self.value_at];
        if head.first() != Some(&TYPE_URL_KEY) {
            return "";
        }
        head = &head[1..];
        let Ok(len) = prost::encoding::decode_varint(&mut head) else {
            return "";
        };
        head.get(..len as usize)
            .and_then(|url| std::str::from_utf8(url).ok())
            .unwrap_or("")
    }

    /// The body as an `Any` (a copy).
    pub fn body(&self) -> Any {
        Any {
            type_url: self.type_url().to_owned(),
            value: self.value().to_vec(),
        }
    }

    /// The body as a protobuf-encoded `Any`.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }
}

/// Field 1, length-delimited.
const TYPE_URL_KEY: u8 = (1 << 3) | 2;

/// Shows the body's size, not its bytes.
impl fmt::Debug for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resource")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("type_url", &self.type_url())
            .field("value_len", &self.value().len())
            .finish()
    }
}

/// Which partitions a stream reads, in order of precedence.
///
/// When two partitions hold a resource of the same type and name, the first one listed wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    partitions: Vec<Partition>,
}

impl View {
    /// A view over the given partitions, first one winning on a name clash.
    pub fn new(partitions: impl IntoIterator<Item = Partition>) -> Self {
        Self {
            partitions: partitions.into_iter().collect(),
        }
    }

    /// The partitions, in order of precedence.
    pub fn partitions(&self) -> &[Partition] {
        &self.partitions
    }
}

/// The resources of one type in one partition.
#[derive(Debug, Clone, Default)]
struct TypeEntry {
    /// The snapshot sequence number of the last change to this entry.
    generation: u64,
    resources: OrdMap<ResourceName, Arc<Resource>>,
}

/// An immutable state of the whole cache.
#[derive(Debug, Clone)]
pub struct Snapshot {
    seq: u64,
    published_at: Instant,
    entries: OrdMap<(Partition, TypeUrl), TypeEntry>,
}

/// A `(partition, type URL)` key of [`Snapshot`]'s entries, owned or borrowed, so a lookup
/// borrows the stream's strings instead of cloning them into a key: every stream looks up
/// its types several times per change, and each clone and drop is an atomic write to a
/// reference count.
trait EntryKey {
    fn parts(&self) -> (&Partition, &TypeUrl);
}

impl EntryKey for (Partition, TypeUrl) {
    fn parts(&self) -> (&Partition, &TypeUrl) {
        (&self.0, &self.1)
    }
}

impl EntryKey for (&Partition, &TypeUrl) {
    fn parts(&self) -> (&Partition, &TypeUrl) {
        (self.0, self.1)
    }
}

impl<'a> std::borrow::Borrow<dyn EntryKey + 'a> for (Partition, TypeUrl) {
    fn borrow(&self) -> &(dyn EntryKey + 'a) {
        self
    }
}

// Ordered as the tuple is, so the map finds a borrowed key where the owned one sorts.
impl PartialEq for dyn EntryKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn EntryKey + '_ {}

impl PartialOrd for dyn EntryKey + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for dyn EntryKey + '_ {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parts().cmp(&other.parts())
    }
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            seq: 0,
            published_at: Instant::now(),
            entries: OrdMap::new(),
        }
    }
}

impl Snapshot {
    /// When the writer published this snapshot: the start of a push's latency.
    pub fn published_at(&self) -> Instant {
        self.published_at
    }

    /// A number that grows with every write that changed something.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The last change to `type_url` as seen through `view`: equal numbers mean nothing that
    /// the view can see of this type has changed.
    ///
    /// Generations come from one counter shared by all entries, so a change in any partition
    /// of the view raises the maximum.
    pub fn generation(&self, view: &View, type_url: &TypeUrl) -> u64 {
        view.partitions
            .iter()
            .filter_map(|p| self.entry(p, type_url))
            .map(|e| e.generation)
            .max()
            .unwrap_or(0)
    }

    /// The resource `name` of `type_url` as seen through `view`.
    pub fn get(&self, view: &View, type_url: &TypeUrl, name: &str) -> Option<&Arc<Resource>> {
        view.partitions
            .iter()
            .find_map(|p| self.entry(p, type_url)?.resources.get(name))
    }

    /// Every resource of `type_url` visible through `view`, ordered by name.
    pub fn resources(&self, view: &View, type_url: &TypeUrl) -> Vec<&Arc<Resource>> {
        let mut entries = view
            .partitions
            .iter()
            .filter_map(|p| self.entry(p, type_url));
        match (entries.next(), entries.next()) {
            (None, _) => Vec::new(),
            (Some(only), None) => only.resources.values().collect(),
            (Some(first), Some(second)) => {
                let mut merged = std::collections::BTreeMap::new();
                // Later partitions first, so earlier ones overwrite them on a clash.
                let rest: Vec<_> = std::iter::once(second).chain(entries).collect();
                for entry in rest.into_iter().rev().chain(std::iter::once(first)) {
                    for (name, resource) in entry.resources.iter() {
                        merged.insert(name, resource);
                    }
                }
                merged.into_values().collect()
            }
        }
    }

    /// The number of resources of `type_url` in `partition`.
    pub fn len(&self, partition: &Partition, type_url: &TypeUrl) -> usize {
        self.entry(partition, type_url)
            .map_or(0, |e| e.resources.len())
    }

    /// Every `(partition, type URL)` that holds at least one resource.
    pub fn keys(&self) -> impl Iterator<Item = (&Partition, &TypeUrl)> {
        self.entries
            .iter()
            .filter(|(_, e)| !e.resources.is_empty())
            .map(|((p, t), _)| (p, t))
    }

    /// Every resource of `type_url` in `partition`, ordered by name.
    pub fn partition_resources(
        &self,
        partition: &Partition,
        type_url: &TypeUrl,
    ) -> impl Iterator<Item = &Arc<Resource>> {
        self.entry(partition, type_url)
            .into_iter()
            .flat_map(|e| e.resources.values())
    }

    fn entry(&self, partition: &Partition, type_url: &TypeUrl) -> Option<&TypeEntry> {
        self.entries.get(&(partition, type_url) as &dyn EntryKey)
    }
}

/// One change to apply with [`CacheWriter::apply`].
#[derive(Debug, Clone)]
pub enum Update {
    /// Insert or replace a resource. A put of identical bytes changes nothing.
    Put {
        /// Where the resource lives.
        partition: Partition,
        /// Its type URL; also `body.type_url` for well-formed resources.
        type_url: TypeUrl,
        /// Its name.
        name: ResourceName,
        /// Its content.
        body: Any,
    },
    /// Remove a resource, if present.
    Delete {
        /// Where the resource lives.
        partition: Partition,
        /// Its type URL.
        type_url: TypeUrl,
        /// Its name.
        name: ResourceName,
    },
    /// Replace every resource of one type in one partition (a relist).
    ReplaceType {
        /// Where the resources live.
        partition: Partition,
        /// Their type URL.
        type_url: TypeUrl,
        /// The complete new set.
        resources: Vec<(ResourceName, Any)>,
    },
}

/// A read handle on the cache. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cache {
    rx: watch::Receiver<Arc<Snapshot>>,
    interests: Arc<Mutex<Index>>,
}

/// The write handle on the cache. Writes are serialised; none holds a lock across an `await`.
#[derive(Debug, Clone)]
pub struct CacheWriter {
    tx: Arc<Mutex<watch::Sender<Arc<Snapshot>>>>,
    interests: Arc<Mutex<Index>>,
}

/// Creates an empty cache, returning its reader and its writer.
pub fn cache() -> (Cache, CacheWriter) {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let interests = Arc::new(Mutex::new(Index::default()));
    (
        Cache {
            rx,
            interests: interests.clone(),
        },
        CacheWriter {
            tx: Arc::new(Mutex::new(tx)),
            interests,
        },
    )
}

impl Cache {
    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.rx.borrow().clone()
    }

    /// A registration for changes of chosen resources: a stream wakes only when one of them
    /// may have changed (see [`crate::interest`]).
    pub fn interest(&self) -> Interest {
        Interest::new(self.interests.clone())
    }

    /// Wakes every stream's [`Interest`], whatever it wants (see [`crate::interest`]): how a
    /// server tells its streams to look at its shutdown flag.
    pub(crate) fn wake_every_interest(&self) {
        self.interests.lock().raise_every();
    }

    /// A receiver of every snapshot, for a reader that follows the whole cache. The current
    /// snapshot counts as seen.
    pub fn changes(&self) -> Changes {
        let mut rx = self.rx.clone();
        rx.mark_unchanged();
        Changes {
            stream: WatchStream::from_changes(rx),
        }
    }
}

/// Notifies one stream of new snapshots; coalesces any number of writes into one wake-up.
///
/// The wait outlives a cancelled [`Changes::next`]: a stream loop that selects over its
/// requests and its changes stays registered with the channel between them instead of
/// registering again (under the channel's lock) for every request it reads.
pub struct Changes {
    stream: WatchStream<Arc<Snapshot>>,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changes").finish_non_exhaustive()
    }
}

impl Changes {
    /// Waits for a snapshot newer than the last one returned. `None` when the writer is gone.
    pub async fn next(&mut self) -> Option<Arc<Snapshot>> {
        self.stream.next().await
    }
}

impl CacheWriter {
    /// Applies a batch of updates atomically: readers see all of them or none.
    ///
    /// Returns the snapshot sequence after the batch (unchanged if nothing changed).
    pub fn apply(&self, updates: impl IntoIterator<Item = Update>) -> u64 {
        let tx = self.tx.lock();
        let current = tx.borrow().clone();
        let mut next = Snapshot::clone(&current);
        let seq = current.seq + 1;
        let changed: Vec<Changed> = updates
            .into_iter()
            .filter_map(|update| apply_one(&mut next.entries, update, seq))
            .collect();
        if changed.is_empty() {
            return current.seq;
        }
        next.seq = seq;
        next.published_at = Instant::now();
        tx.send_replace(Arc::new(next));
        // Published first: a stream woken now reads this snapshot or a newer one.
        self.interests.lock().notify(&changed);
        seq
    }

    /// A reader of the same cache.
    pub fn reader(&self) -> Cache {
        Cache {
            rx: self.tx.lock().subscribe(),
            interests: self.interests.clone(),
        }
    }
}

/// Applies one update; what it changed, if anything.
fn apply_one(
    entries: &mut OrdMap<(Partition, TypeUrl), TypeEntry>,
    update: Update,
    seq: u64,
) -> Option<Changed> {
    match update {
        Update::Put {
            partition,
            type_url,
            name,
            body,
        } => {
            let resource = Resource::new(name.clone(), body);
            let entry = entries
                .entry((partition.clone(), type_url.clone()))
                .or_default();
            if entry.resources.get(&name).is_some_and(|r| **r == resource) {
                return None;
            }
            entry.resources.insert(name.clone(), Arc::new(resource));
            entry.generation = seq;
            Some(Changed::Resource(partition, type_url, name))
        }
        Update::Delete {
            partition,
            type_url,
            name,
        } => {
            let entry = entries.get_mut(&(&partition, &type_url) as &dyn EntryKey)?;
            entry.resources.remove(&name)?;
            entry.generation = seq;
            Some(Changed::Resource(partition, type_url, name))
        }
        Update::ReplaceType {
            partition,
            type_url,
            resources,
        } => {
            let new: OrdMap<ResourceName, Arc<Resource>> = resources
                .into_iter()
                .map(|(name, body)| (name.clone(), Arc::new(Resource::new(name, body))))
                .collect();
            let entry = entries
                .entry((partition.clone(), type_url.clone()))
                .or_default();
            if entry.resources == new {
                return None;
            }
            entry.resources = new;
            entry.generation = seq;
            Some(Changed::Type(partition, type_url))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(value: &str) -> Any {
        Any {
            type_url: "t".into(),
            value: value.as_bytes().to_vec(),
        }
    }

    fn put(p: &str, name: &str, value: &str) -> Update {
        Update::Put {
            partition: p.into(),
            type_url: "t".into(),
            name: name.into(),
            body: any(value),
        }
    }

    #[test]
    fn identical_put_changes_nothing() {
        let (cache, writer) = cache();
        let s1 = writer.apply([put("a", "x", "1")]);
        let s2 = writer.apply([put("a", "x", "1")]);
        assert_eq!(s1, s2);
        assert_eq!(cache.snapshot().seq(), s1);
    }

    #[test]
    fn generation_tracks_changes_per_view() {
        let (cache, writer) = cache();
        let view = View::new(["a".into(), "shared".into()]);
        let other = View::new(["b".into()]);
        let t = TypeUrl::new("t");
        writer.apply([put("a", "x", "1")]);
        let g1 = cache.snapshot().generation(&view, &t);
        writer.apply([put("b", "x", "1")]);
        assert_eq!(cache.snapshot().generation(&view, &t), g1);
        assert!(cache.snapshot().generation(&other, &t) > g1);
        writer.apply([put("shared", "y", "1")]);
        assert!(cache.snapshot().generation(&view, &t) > g1);
    }

    #[test]
    fn first_partition_wins_on_clash() {
        let (cache, writer) = cache();
        writer.apply([
            put("shared", "x", "s"),
            put("a", "x", "a"),
            put("shared", "y", "s"),
        ]);
        let view = View::new(["a".into(), "shared".into()]);
        let snap = cache.snapshot();
        let t = TypeUrl::new("t");
        let got: Vec<_> = snap
            .resources(&view, &t)
            .iter()
            .map(|r| (r.name.to_string(), r.value().to_vec()))
            .collect();
        assert_eq!(
            got,
            vec![("x".into(), b"a".to_vec()), ("y".into(), b"s".to_vec())]
        );
        assert_eq!(snap.get(&view, &t, "x").unwrap().value(), b"a");
    }

    #[test]
    fn delete_and_replace() {
        let (cache, writer) = cache();
        let t = TypeUrl::new("t");
        let view = View::new(["a".into()]);
        writer.apply([put("a", "x", "1"), put("a", "y", "1")]);
        writer.apply([Update::Delete {
            partition: "a".into(),
            type_url: t.clone(),
            name: "x".into(),
        }]);
        assert_eq!(cache.snapshot().resources(&view, &t).len(), 1);
        let before = cache.snapshot().seq();
        assert_eq!(
            writer.apply([Update::Delete {
                partition: "a".into(),
                type_url: t.clone(),
                name: "x".into(),
            }]),
            before
        );
        writer.apply([Update::ReplaceType {
            partition: "a".into(),
            type_url: t.clone(),
            resources: vec![("z".into(), any("2"))],
        }]);
        let names: Vec<_> = cache
            .snapshot()
            .resources(&view, &t)
            .iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(names, vec!["z".to_string()]);
    }

    proptest::proptest! {
        /// A lookup with a borrowed `(partition, type URL)` finds what the owned key finds:
        /// the borrowed form orders keys exactly as the tuple does, including partitions and
        /// type URLs that are prefixes of one another.
        #[test]
        fn borrowed_lookups_agree_with_owned_keys(
            stored in proptest::collection::btree_set(("[ab]{0,3}", "[ab]{0,3}"), 0..24),
            probes in proptest::collection::vec(("[ab]{0,3}", "[ab]{0,3}"), 0..24),
        ) {
            let entries: OrdMap<(Partition, TypeUrl), TypeEntry> = stored
                .iter()
                .enumerate()
                .map(|(i, (p, t))| {
                    let entry = TypeEntry { generation: i as u64 + 1, ..Default::default() };
                    ((Partition::new(p), TypeUrl::new(t)), entry)
                })
                .collect();
            let snapshot = Snapshot { seq: 1, published_at: Instant::now(), entries };
            for (p, t) in stored.iter().chain(&probes) {
                let key = (Partition::new(p), TypeUrl::new(t));
                let owned = snapshot.entries.get(&key).map(|e| e.generation);
                let borrowed = snapshot.entry(&key.0, &key.1).map(|e| e.generation);
                proptest::prop_assert_eq!(owned, borrowed);
                proptest::prop_assert_eq!(owned.is_some(), stored.contains(&(p.clone(), t.clone())));
            }
        }
    }

    /// A stream loop cancels its wait for changes whenever a request comes first; a change
    /// made then is still seen by the next wait, and once only.
    #[tokio::test]
    async fn a_cancelled_wait_loses_no_change() {
        use futures::FutureExt;
        let (cache, writer) = cache();
        writer.apply([put("a", "x", "0")]);
        // What was written before counts as seen.
        let mut changes = cache.changes();
        assert!(
            changes.next().now_or_never().is_none(),
            "nothing changed yet"
        );
        writer.apply([put("a", "x", "1")]);
        let snap = changes.next().now_or_never().flatten().expect("the change");
        assert_eq!(snap.seq(), 2);
        assert!(changes.next().now_or_never().is_none(), "seen once");
        assert!(changes.next().now_or_never().is_none());
        for i in 3..6 {
            writer.apply([put("a", "x", &i.to_string())]);
        }
        let snap = changes
            .next()
            .now_or_never()
            .flatten()
            .expect("the changes");
        assert_eq!(snap.seq(), 5, "coalesced into the newest");
        drop(writer);
        assert!(changes.next().await.is_none(), "the writer is gone");
    }

    #[tokio::test]
    async fn changes_coalesce() {
        let (cache, writer) = cache();
        let mut changes = cache.changes();
        for i in 0..100 {
            writer.apply([put("a", "x", &i.to_string())]);
        }
        let snap = changes.next().await.unwrap();
        assert_eq!(snap.seq(), 100);
        let pending = tokio::time::timeout(std::time::Duration::from_millis(10), changes.next());
        assert!(
            pending.await.is_err(),
            "no second wake-up for coalesced writes"
        );
    }
}

/// How a change reaches the streams that want it (see [`crate::interest`]).
#[cfg(test)]
mod interest_tests {
    use envoy_types::pb::google::protobuf::Any;

    use super::{Update, cache};
    use crate::interest::{Key, Wanted};

    fn put(partition: &str, type_url: &str, name: &str, value: &str) -> Update {
        Update::Put {
            partition: partition.into(),
            type_url: type_url.into(),
            name: name.into(),
            body: Any {
                type_url: type_url.into(),
                value: value.as_bytes().to_vec(),
            },
        }
    }

    fn key(partition: &str, type_url: &str, wanted: Option<&str>) -> Key {
        (
            partition.into(),
            type_url.into(),
            wanted.map_or(Wanted::All, |n| Wanted::Named(n.into())),
        )
    }

    #[test]
    fn only_a_change_to_a_wanted_resource_wakes() {
        let (cache, writer) = cache();
        let mut named = cache.interest();
        named.set(vec![key("p", "t", Some("a"))]);
        let mut all = cache.interest();
        all.set(vec![key("p", "t", None)]);
        // Registering raises the signal once, for a change it may have missed.
        assert!(named.woken() && all.woken());
        assert!(!named.woken() && !all.woken());

        writer.apply([put("p", "t", "b", "1")]);
        assert!(!named.woken(), "another name");
        assert!(all.woken(), "a wildcard wants every name");
        writer.apply([put("q", "t", "a", "1"), put("p", "u", "a", "1")]);
        assert!(!named.woken() && !all.woken(), "another partition or type");
        writer.apply([put("p", "t", "b", "1")]);
        assert!(!all.woken(), "an identical put changes nothing");

        // Any number of changes before the stream looks: one wake-up, the newest snapshot.
        writer.apply([put("p", "t", "a", "1")]);
        let seq = writer.apply([put("p", "t", "a", "2")]);
        assert!(named.woken());
        assert!(!named.woken());
        assert_eq!(cache.snapshot().seq(), seq);

        writer.apply([Update::Delete {
            partition: "p".into(),
            type_url: "t".into(),
            name: "a".into(),
        }]);
        assert!(named.woken(), "a deletion");
        writer.apply([Update::ReplaceType {
            partition: "p".into(),
            type_url: "t".into(),
            resources: Vec::new(),
        }]);
        assert!(named.woken(), "a relist of the type wakes every name of it");
    }

    #[test]
    fn set_replaces_what_is_wanted_and_drop_unregisters() {
        let (cache, writer) = cache();
        let mut interest = cache.interest();
        interest.set(vec![key("p", "t", Some("a"))]);
        assert!(interest.is([(&"p".into(), &"t".into(), Some(&"a".into()))]));
        assert!(!interest.is([]));
        interest.woken();
        // The same registration again: nothing changes, no wake-up.
        interest.set(vec![key("p", "t", Some("a"))]);
        assert!(!interest.woken());

        interest.set(vec![key("p", "t", Some("b"))]);
        assert!(interest.woken());
        writer.apply([put("p", "t", "a", "1")]);
        assert!(!interest.woken(), "no longer wanted");
        writer.apply([put("p", "t", "b", "1")]);
        assert!(interest.woken());

        // `want` takes the borrowed form a stream's subscriptions give, and registers only a
        // difference.
        let (p, t, a, b) = ("p".into(), "t".into(), "a".into(), "b".into());
        interest.want(|| [(&p, &t, Some(&b))].into_iter());
        assert!(!interest.woken(), "already registered");
        interest.want(|| [(&p, &t, Some(&a)), (&p, &t, None)].into_iter());
        assert!(interest.woken());
        assert!(interest.is([(&p, &t, Some(&a)), (&p, &t, None)]));

        let other = cache.interest();
        assert_eq!(cache.interests.lock().types(), 1);
        drop(interest);
        drop(other);
        assert_eq!(cache.interests.lock().types(), 0, "nothing left behind");
        assert_eq!(cache.interests.lock().interests(), 0, "nothing left behind");
    }

    #[test]
    fn waking_every_interest_reaches_those_that_want_nothing() {
        let (cache, writer) = cache();
        let mut nothing = cache.interest();
        let mut named = cache.interest();
        named.set(vec![key("p", "t", Some("a"))]);
        named.woken();
        writer.apply([put("p", "t", "b", "1")]);
        assert!(!nothing.woken() && !named.woken());

        cache.wake_every_interest();
        assert!(nothing.woken() && named.woken());
        assert!(!nothing.woken() && !named.woken(), "one wake-up each");
    }

    #[tokio::test]
    async fn a_woken_stream_reads_the_snapshot_of_the_change() {
        let (cache, writer) = cache();
        let mut interest = cache.interest();
        interest.set(vec![key("p", "t", Some("a"))]);
        interest.changed().await;
        let waiting = tokio::spawn(async move {
            interest.changed().await;
            cache.snapshot().seq()
        });
        tokio::task::yield_now().await;
        let seq = writer.apply([put("p", "t", "a", "1")]);
        assert_eq!(waiting.await.unwrap(), seq);
    }
}
