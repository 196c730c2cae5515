//! The etcd v3 backend: records in etcd, shared by any number of replicas.
//!
//! # Key layout
//!
//! Every record is one etcd key:
//!
//! ```text
//! <prefix>/<kind>/<namespace>/<name>
//! ```
//!
//! - `<prefix>`: `--etcd-prefix`, default [`DEFAULT_PREFIX`] (`/pixiu-metadata`; a trailing
//!   `/` is dropped). Deployments sharing one etcd cluster use different prefixes.
//! - `<kind>`: `metadata` or `definition`.
//! - `<namespace>`: the record's namespace (namespaces never hold `/`).
//! - `<name>`: `<application>/<revision>` for metadata, the identifier for a definition (it may
//!   hold `/`; everything after the namespace is the name).
//!
//! For example `/pixiu-metadata/metadata/default/greeter/a1b2c3` and
//! `/pixiu-metadata/definition/default/org.apache.dubbo.Greeter:1.0.0::provider:greeter`.
//!
//! The value is a one-line envelope followed by the raw value, byte for byte as published:
//!
//! ```text
//! pixiu-metadata/v1 refreshed_at_ms=1767225600000
//! <raw value>
//! ```
//!
//! so `etcdctl get --prefix /pixiu-metadata/` shows records as they were published. A record's
//! [`revision`](super::Record::revision) is its etcd `mod_revision`. Keys under the prefix that
//! do not parse, or values without the envelope, are logged and ignored (taken as absent).
//!
//! # Writes
//!
//! A put is one transaction that compares the key's `mod_revision` with the one the store
//! believes current (`version == 0` when it believes the key absent): on success it writes the
//! new envelope, otherwise it reads the key and the put retries against what is really there.
//! So the outcome ([`PutOutcome::Created`], `Updated { previous }` or `Refreshed`) is exact even
//! with several replicas writing the same key. A refresh (identical value) rewrites the
//! envelope with the new lease stamp: it is still an etcd write, with a new revision, but
//! watchers see it as [`Event::Refreshed`] and nothing is pushed.
//!
//! Before creating a key the put counts the keys under `<prefix>/<kind>/<namespace>/` (a
//! `count_only` range read) and refuses with [`Error::NamespaceFull`] at the cap. The count
//! and the create are not one transaction: creates racing in the same namespace (on one or
//! several replicas) may each see room, so a namespace can exceed the cap by at most the
//! number of creates in flight at that moment. The cap guards against runaway growth, not
//! exact quotas.
//!
//! Deletes are a transaction comparing `mod_revision` with the given revision, so a sweeper's
//! delete loses against a re-publish that refreshed the record in between.
//!
//! # The sweeper election
//!
//! One replica at a time sweeps expired records: replicas campaign with etcd's election API
//! under `<prefix>.sweeper-election` (beside the records, not under them), each with its own
//! lease of [`SWEEPER_LEASE_TTL`]; see [`Store::leadership`] and the `election` module.
//!
//! Every etcd call is bounded by [`REQUEST_TIMEOUT`]; within it a transient failure (a member
//! that refuses connections, no leader) is retried, so one member down of three costs a retry,
//! not a failed write. When etcd does not answer in time, writes fail with
//! [`Error::Unavailable`]. A write that timed out may still have been applied; publishing again
//! is safe (an identical value is a refresh).
//!
//! # Reads and watches: the mirror
//!
//! `get`, `list` and watches are served from an in-memory mirror of the prefix, kept by the
//! store's own etcd watch, so reads and pushes keep working while etcd is down. At start the
//! store lists the prefix at one revision `R` (in pages, all at `R`) and watches from `R + 1`.
//! When the watch breaks it reconnects with backoff (100 ms doubling to 5 s) and resumes from
//! the last revision it saw plus one, so no event is lost or repeated. When etcd compacted that
//! revision away (the watch is cancelled with a `compact_revision`), the store lists the
//! prefix again, replaces the mirror and sends watchers an [`Event::Reset`]; the xDS cache
//! dedups identical content, so only the difference is pushed.
//!
//! etcd's history can also be replaced under a running store: a member that lost its data
//! directory, a cluster restored from an older snapshot. Resuming the watch would then wait for
//! revisions the new history has not reached, or apply its changes onto records it never had.
//! So before resuming, the store reads the prefix at the revision the mirror holds (the count
//! of keys and the last one written, one sorted range read) and lists again when they differ
//! or etcd cannot read that revision; and any answer older than the mirror (a write no newer)
//! marks the mirror stale and makes the watch task list again at once.
//!
//! Read-your-writes: a put or delete returns only once the mirror has reached the write's
//! revision (bounded by [`REQUEST_TIMEOUT`]; if the watch is broken at that moment the write
//! still succeeded and the mirror catches up when the watch resumes).
//!
//! `ready()` fails with the reason while the watch is not established (etcd unreachable or
//! without a leader), and from a request that found etcd unavailable until one succeeds (a
//! hung etcd keeps the watch's connection open until its keep-alive times out). Besides the
//! store's own requests, a probe asks etcd for one key every second ([`super::probe`]), so a
//! replica with no traffic notices a hung etcd, and its recovery, within seconds; `ready()`
//! itself reads what was found and never waits on etcd.

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, KvClient,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchClient, WatchOptions,
};
use futures::stream::BoxStream;
use parking_lot::Mutex;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{
    Error, Event, Key, Kind, ListQuery, MapKey, PutOutcome, Record, Result, Store, WATCH_BUFFER,
    epoch_ms, map_key,
    probe::{self, Failing},
};

mod election;

pub use election::LEASE_TTL as SWEEPER_LEASE_TTL;

/// This machine's host name, for the election's campaign value (`-` when unknown).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "-".into())
}

/// The key prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "/pixiu-metadata";

/// Longest wait for one etcd request before the operation fails with [`Error::Unavailable`].
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`EtcdStore::connect`] keeps trying to load the prefix before giving up.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait to open a TCP connection to one endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// HTTP/2 keep-alive interval and timeout, so a silently dead connection (and the watch on it)
/// is noticed within seconds. etcd closes connections that ping more often than every 5 s
/// (`--grpc-keepalive-min-time`), so the interval stays above that.
const KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(5));

/// First and longest pause between attempts to re-establish the watch.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// First and longest pause between attempts of one request (see [`retrying`]).
const RETRY_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(200));

/// Keys read per page when listing the prefix.
const LIST_PAGE: i64 = 256;

/// Largest etcd response accepted (a page of large values; watch responses are fragmented).
const MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

/// Puts retried after losing a compare to a concurrent writer before giving up.
const MAX_PUT_ATTEMPTS: usize = 16;

/// The envelope's first line, up to the lease stamp.
const ENVELOPE_HEADER: &str = "pixiu-metadata/v1 refreshed_at_ms=";

/// The etcd [`Store`].
///
/// Cloning is cheap and shares the store. Dropping the last clone stops its watch; the
/// streams returned by [`Store::watch`] then end.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    kv: KvClient,
    endpoints: Vec<String>,
    keys: Keys,
    max_records_per_namespace: usize,
    shared: Arc<Shared>,
    stop: CancellationToken,
    /// Whether this replica is the elected sweeper.
    leading: watch::Receiver<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What the store and its watch task share.
struct Shared {
    mirror: Mutex<Mirror>,
    events: broadcast::Sender<Event>,
    /// The etcd revision the mirror has reached.
    revision: watch::Sender<u64>,
    /// Since when and why the watch is not following etcd; empty while it is.
    down: Failing,
    /// Wakes the watch task when a request found etcd's history older than the mirror's.
    relist: tokio::sync::Notify,
    /// Since when and why requests (the store's own or the [`probe`]'s) fail with etcd
    /// unavailable, while the watch may not have noticed yet (a hung etcd keeps the stream
    /// open until its keep-alive times out); `None` once a request succeeds.
    failing: Failing,
}

#[derive(Debug, Default)]
struct Mirror {
    revision: u64,
    records: BTreeMap<MapKey, Record>,
    /// etcd answered with a revision the mirror had already passed: its history was replaced
    /// (a wiped data directory, a restored snapshot). Watch events are ignored until the
    /// prefix has been listed again.
    stale: bool,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .field("prefix", &self.inner.keys.root)
            .field("revision", &*self.inner.shared.revision.borrow())
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`http://host:port`), loads every record
    /// under `prefix` and starts following it. Holds at most `max_records_per_namespace`
    /// records per namespace and kind (see the module docs for the race bound).
    ///
    /// Fails with [`Error::Unavailable`] when etcd cannot be read within
    /// [`STARTUP_TIMEOUT`], and with [`Error::Storage`] when no endpoint is given.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        max_records_per_namespace: usize,
    ) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(Error::Storage(
                "no etcd endpoints given (--etcd-endpoints)".into(),
            ));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE.0, KEEP_ALIVE.1)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| etcd_error(&format!("connecting to etcd at {endpoints:?}"), e))?;
        let kv = client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let watch_client = client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let keys = Keys::new(prefix);

        let started = Instant::now();
        let mut backoff = Backoff::default();
        let (revision, records) = loop {
            match list_all(kv.clone(), &keys, endpoints).await {
                Ok(listed) => break listed,
                Err(e) if started.elapsed() + backoff.peek() >= STARTUP_TIMEOUT => {
                    return Err(Error::Unavailable(format!(
                        "cannot load {} from etcd at {endpoints:?}: {e}",
                        keys.root
                    )));
                }
                Err(e) => {
                    debug!(error = %e, "etcd not reachable yet");
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        };

        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let shared = Arc::new(Shared {
            mirror: Mutex::default(),
            events,
            revision: watch::Sender::new(0),
            down: Failing::default(),
            relist: tokio::sync::Notify::new(),
            failing: Failing::default(),
        });
        let n_records = records.len();
        shared.replace(records, revision);
        let stop = CancellationToken::new();
        let follower = Follower {
            watch: watch_client,
            kv: kv.clone(),
            endpoints: endpoints.to_vec(),
            keys: keys.clone(),
            shared: shared.clone(),
            stop: stop.clone(),
        };
        tokio::spawn(follower.run(i64::try_from(revision).unwrap_or(i64::MAX) + 1));
        tokio::spawn(probe(
            kv.clone(),
            endpoints.to_vec(),
            keys.root.clone(),
            shared.clone(),
            stop.clone(),
        ));
        let (leading_tx, leading) = watch::channel(false);
        tokio::spawn(election::run(
            client.clone(),
            // Beside the records' prefix, not under it: the mirror never sees election keys.
            format!("{}.sweeper-election", keys.root.trim_end_matches('/')),
            format!("pid {} on {}", std::process::id(), hostname()),
            leading_tx,
            stop.clone(),
        ));
        info!(?endpoints, prefix = %keys.root, revision, records = n_records, "etcd store open");
        Ok(Self {
            inner: Arc::new(Inner {
                kv,
                endpoints: endpoints.to_vec(),
                keys,
                max_records_per_namespace,
                shared,
                stop,
                leading,
            }),
        })
    }

    /// The etcd key of `key`.
    pub fn etcd_key(&self, key: &Key) -> String {
        self.inner.keys.record(key)
    }

    /// Runs one etcd request, retried while etcd's answer is transient; see [`retrying`].
    async fn call<T, F>(&self, doing: String, request: impl FnMut(KvClient) -> F) -> Result<T>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let result = retrying(&doing, &self.inner.endpoints, &self.inner.kv, request).await;
        self.inner.shared.failing.record(&result);
        result
    }

    /// Fails with [`Error::NamespaceFull`] when `key`'s namespace is at the cap.
    async fn check_room(&self, key: &Key) -> Result<()> {
        let limit = self.inner.max_records_per_namespace;
        if limit == usize::MAX {
            return Ok(());
        }
        let prefix = self.inner.keys.namespace(key.kind, &key.namespace);
        let response = self
            .call(
                format!("counting the records of namespace {}", key.namespace),
                |mut kv| {
                    let prefix = prefix.clone();
                    async move {
                        kv.get(
                            prefix,
                            Some(GetOptions::new().with_prefix().with_count_only()),
                        )
                        .await
                    }
                },
            )
            .await?;
        if usize::try_from(response.count()).unwrap_or(usize::MAX) >= limit {
            return Err(Error::NamespaceFull {
                namespace: key.namespace.clone(),
                limit,
            });
        }
        Ok(())
    }

    /// Waits (bounded) until the mirror has seen `revision`, so the caller reads its write.
    async fn caught_up(&self, revision: u64) {
        let mut rx = self.inner.shared.revision.subscribe();
        let reached = tokio::time::timeout(REQUEST_TIMEOUT, rx.wait_for(|r| *r >= revision));
        if reached.await.is_err() {
            warn!(
                revision,
                "the etcd watch has not delivered a write yet; reads on this replica may lag"
            );
        }
    }
}

/// The first (and only) operation response of a transaction.
fn first_op(response: &TxnResponse) -> Option<TxnOpResponse> {
    response.op_responses().into_iter().next()
}

/// Whether an answer of revision `answered`, to a request sent when the mirror had seen
/// revision `seen`, shows that etcd's history was replaced: an answer older than what was
/// seen, or a write no newer than it (a write makes a revision newer than any before it).
fn history_replaced(seen: u64, answered: u64, wrote: bool) -> bool {
    if wrote {
        answered <= seen
    } else {
        answered < seen
    }
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<u64> {
    header
        .map(|h| h.revision())
        .and_then(|r| u64::try_from(r).ok())
        .ok_or_else(|| Error::Storage("etcd answered without a revision".into()))
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn put(&self, key: &Key, value: &str, now: SystemTime) -> Result<PutOutcome> {
        let etcd_key = self.inner.keys.record(key);
        let envelope = encode_value(value, epoch_ms(now));
        // What we believe is stored: (mod_revision, value). The transaction checks it.
        let (mut current, seen): (Option<(i64, Arc<str>)>, u64) = {
            let mirror = self.inner.shared.mirror.lock();
            let current = mirror.records.get(&map_key(key)).map(|r| {
                (
                    i64::try_from(r.revision).unwrap_or(i64::MAX),
                    r.value.clone(),
                )
            });
            (current, mirror.revision)
        };
        for _ in 0..MAX_PUT_ATTEMPTS {
            let compare = match &current {
                None => {
                    self.check_room(key).await?;
                    Compare::version(etcd_key.as_bytes(), CompareOp::Equal, 0)
                }
                Some((mod_revision, _)) => {
                    Compare::mod_revision(etcd_key.as_bytes(), CompareOp::Equal, *mod_revision)
                }
            };
            let txn = Txn::new()
                .when([compare])
                .and_then([TxnOp::put(etcd_key.as_bytes(), envelope.clone(), None)])
                .or_else([TxnOp::get(etcd_key.as_bytes(), None)]);
            let response = self
                .call(format!("writing {key}"), |mut kv| {
                    let txn = txn.clone();
                    async move { kv.txn(txn).await }
                })
                .await?;
            let revision = header_revision(response.header())?;
            self.inner
                .shared
                .check_history(seen, revision, response.succeeded());
            if response.succeeded() {
                let outcome = match current {
                    None => PutOutcome::Created { revision },
                    Some((_, previous)) if *previous == *value => {
                        PutOutcome::Refreshed { revision }
                    }
                    Some((_, previous)) => PutOutcome::Updated { revision, previous },
                };
                self.caught_up(revision).await;
                return Ok(outcome);
            }
            // Another writer got there first (or the mirror lagged): retry against what is
            // stored now.
            current = match first_op(&response) {
                Some(TxnOpResponse::Get(get)) => get.kvs().first().map(|kv| {
                    let value = decode_value(kv.value()).map_or_else(
                        || Arc::from(String::from_utf8_lossy(kv.value())),
                        |(_, value)| value,
                    );
                    (kv.mod_revision(), value)
                }),
                _ => {
                    return Err(Error::Storage(format!(
                        "writing {key}: etcd answered a failed transaction without the read"
                    )));
                }
            };
        }
        Err(Error::Unavailable(format!(
            "writing {key}: lost {MAX_PUT_ATTEMPTS} races with concurrent writers"
        )))
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>> {
        Ok(self
            .inner
            .shared
            .mirror
            .lock()
            .records
            .get(&map_key(key))
            .cloned())
    }

    async fn delete(&self, key: &Key, if_revision: Option<u64>) -> Result<bool> {
        let etcd_key = self.inner.keys.record(key);
        let seen = self.inner.shared.mirror.lock().revision;
        let compares = match if_revision {
            // No etcd revision is that large: nothing can match.
            Some(revision) => match i64::try_from(revision) {
                Ok(revision) => vec![Compare::mod_revision(
                    etcd_key.as_bytes(),
                    CompareOp::Equal,
                    revision,
                )],
                Err(_) => return Ok(false),
            },
            None => Vec::new(),
        };
        let txn = Txn::new()
            .when(compares)
            .and_then([TxnOp::delete(etcd_key.as_bytes(), None)]);
        let response = self
            .call(format!("deleting {key}"), |mut kv| {
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await?;
        let deleted = response.succeeded()
            && matches!(first_op(&response), Some(TxnOpResponse::Delete(d)) if d.deleted() > 0);
        let revision = header_revision(response.header())?;
        self.inner.shared.check_history(seen, revision, deleted);
        if deleted {
            self.caught_up(revision).await;
        }
        Ok(deleted)
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<Record>> {
        Ok(query.select(&self.inner.shared.mirror.lock().records))
    }

    fn watch(&self) -> BoxStream<'static, Event> {
        // Only a weak reference: when the store is dropped its watch task ends, the event
        // channel closes and so does this stream.
        super::follow(Arc::downgrade(&self.inner.shared))
    }

    async fn ready(&self) -> Result<()> {
        let endpoints = &self.inner.endpoints;
        if let Some((down_for, reason)) = self.inner.shared.down.failing() {
            return Err(Error::Unavailable(format!(
                "not following etcd at {endpoints:?} for {down_for:.1?}: {reason}"
            )));
        }
        self.inner
            .shared
            .failing
            .check(&format!("etcd at {endpoints:?}"))
    }

    fn backend(&self) -> &'static str {
        "etcd"
    }

    fn leadership(&self) -> Option<watch::Receiver<bool>> {
        Some(self.inner.leading.clone())
    }
}

impl super::Subscribe for Shared {
    fn subscribe(&self) -> (Event, broadcast::Receiver<Event>) {
        let mirror = self.mirror.lock();
        let rx = self.events.subscribe();
        let reset = Event::Reset {
            records: mirror.records.values().cloned().collect(),
            revision: mirror.revision,
        };
        (reset, rx)
    }
}

impl Shared {
    /// Checks an etcd answer against the mirror: `answered` is the revision of the answer to
    /// a request sent when the mirror was at `seen`, `wrote` whether the request wrote.
    ///
    /// Within one history etcd's revision never goes back, and a write makes a revision newer
    /// than any before it. An answer older than `seen` (or a write not newer) means etcd's
    /// history was replaced under the mirror: a wiped data directory, a restored snapshot.
    /// The watch would resume at a revision the new history has not reached, or has reached
    /// with other changes, so the mirror is marked stale (reads of one's own write wait for
    /// the relist) and the watch task lists the prefix again.
    fn check_history(&self, seen: u64, answered: u64, wrote: bool) {
        if !history_replaced(seen, answered, wrote) {
            return;
        }
        let mut mirror = self.mirror.lock();
        if mirror.stale {
            return;
        }
        error!(
            mirror_revision = seen,
            etcd_revision = answered,
            "etcd answered with a revision older than one already seen: its history was \
             replaced (a wiped data directory or a restored snapshot); listing it again"
        );
        mirror.stale = true;
        self.revision.send_replace(0);
        drop(mirror);
        self.set_down(format!(
            "etcd's revision went back from {seen} to {answered}; listing again"
        ));
        self.relist.notify_one();
    }

    /// Replaces the mirror with a fresh list taken at `revision` and tells watchers.
    fn replace(&self, records: Vec<Record>, revision: u64) {
        let mut mirror = self.mirror.lock();
        mirror.records = records
            .iter()
            .map(|r| (map_key(&r.key), r.clone()))
            .collect();
        mirror.revision = revision;
        mirror.stale = false;
        let _ = self.events.send(Event::Reset { records, revision });
        self.revision.send_replace(revision);
    }

    /// Applies watched etcd events in order; returns the revision of the last one.
    fn apply(&self, keys: &Keys, events: &[etcd_client::Event]) -> Option<u64> {
        let mut mirror = self.mirror.lock();
        if mirror.stale {
            // Events of a replaced history; the watch task lists again.
            return None;
        }
        let mut last = None;
        for event in events {
            let Some(kv) = event.kv() else { continue };
            let Ok(revision) = u64::try_from(kv.mod_revision()) else {
                continue;
            };
            last = Some(revision);
            let Some(key) = keys.parse(kv.key()) else {
                warn!(key = %String::from_utf8_lossy(kv.key()), "ignoring an etcd key under the prefix that names no record");
                continue;
            };
            let map_key = map_key(&key);
            let decoded = match event.event_type() {
                EventType::Put => {
                    let decoded = decode_value(kv.value());
                    if decoded.is_none() {
                        warn!(%key, "ignoring an etcd value without the pixiu-metadata envelope");
                    }
                    decoded
                }
                EventType::Delete => None,
            };
            let out = match decoded {
                Some((refreshed_at_ms, value)) => match mirror.records.get_mut(&map_key) {
                    Some(record) if record.value == value => {
                        record.revision = revision;
                        record.refreshed_at_ms = refreshed_at_ms;
                        Event::Refreshed {
                            key,
                            revision,
                            refreshed_at_ms,
                        }
                    }
                    _ => {
                        let record = Record {
                            key,
                            value,
                            revision,
                            refreshed_at_ms,
                        };
                        mirror.records.insert(map_key, record.clone());
                        Event::Put(record)
                    }
                },
                None => match mirror.records.remove(&map_key) {
                    Some(_) => Event::Delete { key, revision },
                    None => continue,
                },
            };
            // Sent under the lock so watchers see events in revision order.
            let _ = self.events.send(out);
        }
        if let Some(last) = last {
            mirror.revision = mirror.revision.max(last);
            self.revision.send_replace(mirror.revision);
        }
        last
    }

    fn set_down(&self, reason: String) {
        if self.down.fail(reason.clone()) {
            warn!(reason = %reason, "lost the etcd watch; serving reads from memory, writes fail until etcd is back");
        } else {
            debug!(reason = %reason, "etcd watch still down");
        }
    }

    fn set_up(&self) {
        if let Some(down_for) = self.down.clear() {
            info!(?down_for, "etcd watch re-established");
        }
    }
}

/// Asks etcd for one key (a linearizable read, so a member without a quorum fails it) every
/// [`probe::PROBE_INTERVAL`] until `stop`, recording whether it answered as the store's own
/// requests do.
async fn probe(
    kv: KvClient,
    endpoints: Vec<String>,
    root: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    probe::run(&shared.failing, stop, || async {
        let options = GetOptions::new().with_count_only().with_limit(1);
        retrying("checking etcd", &endpoints, &kv, |mut kv| {
            let (root, options) = (root.clone(), options.clone());
            async move { kv.get(root, Some(options)).await }
        })
        .await
        .map(drop)
    })
    .await;
}

/// The task that keeps the mirror in step with etcd.
struct Follower {
    watch: WatchClient,
    kv: KvClient,
    /// For messages.
    endpoints: Vec<String>,
    keys: Keys,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

/// Why following stopped.
enum Ended {
    /// The stream failed or etcd cancelled it; resume from the next revision.
    Failed(String),
    /// The mirror no longer matches etcd's history at the next revision (compacted away, or
    /// the history was replaced): list the prefix again.
    Relist(String),
}

impl Follower {
    async fn run(self, mut next: i64) {
        let mut backoff = Backoff::default();
        // Whether the next watch resumes after a failure, and must first check that etcd
        // still has the history the mirror follows.
        let mut resuming = false;
        loop {
            let ended = tokio::select! {
                () = self.stop.cancelled() => return,
                () = self.shared.relist.notified() => {
                    Ended::Relist("a request found etcd's history replaced".into())
                }
                ended = self.follow(&mut next, &mut backoff, resuming) => ended,
            };
            match ended {
                Ended::Failed(reason) => {
                    self.shared.set_down(reason);
                    // The next follow waits out the backoff first, in the select above, so a
                    // request that finds etcd's history replaced ends the wait at once.
                    resuming = true;
                }
                Ended::Relist(reason) => {
                    info!(next, %reason, "listing the prefix again");
                    loop {
                        let listed = tokio::select! {
                            () = self.stop.cancelled() => return,
                            listed = list_all(self.kv.clone(), &self.keys, &self.endpoints) => listed,
                        };
                        match listed {
                            Ok((revision, records)) => {
                                self.shared.replace(records, revision);
                                next = i64::try_from(revision).unwrap_or(i64::MAX) + 1;
                                resuming = false;
                                break;
                            }
                            Err(reason) => {
                                self.shared.set_down(reason);
                                if self.pause(&mut backoff).await {
                                    return;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Before a watch resumes at `next`: whether etcd still holds the history the mirror
    /// follows. The mirror holds the prefix as of revision `next - 1`, so etcd must be able to
    /// read that revision (not compacted away, nor beyond a newer, shorter history) and hold
    /// there as many keys under the prefix, the last written being the mirror's last written
    /// record at the same revision. One range read, sorted by etcd, answers both. A key under
    /// the prefix that holds no record makes them differ too, and costs a list on resuming.
    async fn check(&self, next: i64) -> Option<Ended> {
        let at = next - 1;
        let options = GetOptions::new()
            .with_range(prefix_end(self.keys.root.as_bytes()))
            .with_sort(SortTarget::Mod, SortOrder::Descend)
            .with_limit(1)
            .with_keys_only()
            .with_revision(at);
        let root = self.keys.root.clone();
        let read = retrying(
            "checking etcd's history",
            &self.endpoints,
            &self.kv,
            |mut kv| {
                let (root, options) = (root.clone(), options.clone());
                async move { kv.get(root, Some(options)).await }
            },
        )
        .await;
        let response = match read {
            Ok(response) => response,
            // A revision compacted away, or one etcd has not reached.
            Err(Error::Storage(reason)) => {
                return Some(Ended::Relist(format!(
                    "etcd cannot read revision {at}: {reason}"
                )));
            }
            Err(e) => return Some(Ended::Failed(e.to_string())),
        };
        let etcd = (
            usize::try_from(response.count()).unwrap_or(usize::MAX),
            response.kvs().first().map(|kv| {
                (
                    kv.key().to_vec(),
                    u64::try_from(kv.mod_revision()).unwrap_or(0),
                )
            }),
        );
        let ours = {
            let mirror = self.shared.mirror.lock();
            let last = mirror.records.values().max_by_key(|r| r.revision);
            (
                mirror.records.len(),
                last.map(|r| (self.keys.record(&r.key).into_bytes(), r.revision)),
            )
        };
        (etcd != ours).then(|| {
            Ended::Relist(format!(
                "etcd holds {} keys under the prefix at revision {at}, the mirror {} records, \
                 or another one was written last",
                etcd.0, ours.0
            ))
        })
    }

    /// Sleeps for the next backoff step; true when the store was dropped meanwhile.
    async fn pause(&self, backoff: &mut Backoff) -> bool {
        tokio::select! {
            () = self.stop.cancelled() => true,
            () = tokio::time::sleep(backoff.next()) => false,
        }
    }

    /// Watches the prefix from `next`, applying events, until the watch ends; when
    /// `resuming` after a failure, first waits for the next backoff step and
    /// [checks](Self::check) that etcd still has the mirror's history.
    async fn follow(&self, next: &mut i64, backoff: &mut Backoff, resuming: bool) -> Ended {
        if resuming {
            tokio::time::sleep(backoff.next()).await;
            if let Some(ended) = self.check(*next).await {
                return ended;
            }
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(*next)
            .with_fragment();
        let opened = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.watch
                .clone()
                .watch(self.keys.root.as_bytes(), Some(options)),
        )
        .await;
        let mut stream = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Ended::Failed(format!("opening the watch: {e}")),
            Err(_) => {
                return Ended::Failed(format!(
                    "opening the watch: no answer within {REQUEST_TIMEOUT:?}"
                ));
            }
        };
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Ended::Failed("etcd closed the watch stream".into()),
                Err(e) => return Ended::Failed(format!("watch stream: {e}")),
            };
            if response.canceled() {
                if response.compact_revision() > 0 {
                    return Ended::Relist(format!(
                        "etcd compacted past the watch (to revision {})",
                        response.compact_revision()
                    ));
                }
                return Ended::Failed(format!(
                    "etcd cancelled the watch: {}",
                    response.cancel_reason()
                ));
            }
            if response.created() {
                self.shared.set_up();
                backoff.reset();
            }
            if let Some(last) = self.shared.apply(&self.keys, response.events()) {
                *next = i64::try_from(last).unwrap_or(i64::MAX) + 1;
            }
        }
    }
}

/// Lists every record under the prefix, in pages all read at one revision. Returns that
/// revision and the records; errors are messages (the caller retries).
async fn list_all(
    kv: KvClient,
    keys: &Keys,
    endpoints: &[String],
) -> Result<(u64, Vec<Record>), String> {
    let end = prefix_end(keys.root.as_bytes());
    let mut from = keys.root.as_bytes().to_vec();
    let mut revision = 0;
    let mut records = Vec::new();
    let doing = format!("listing {}", keys.root);
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(LIST_PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let response = retrying(&doing, endpoints, &kv, |mut kv| {
            let (from, options) = (from.clone(), options.clone());
            async move { kv.get(from, Some(options)).await }
        })
        .await
        .map_err(|e| e.to_string())?;
        if revision == 0 {
            revision = response
                .header()
                .map(|h| h.revision())
                .ok_or("etcd answered a list without a revision")?;
        }
        for kv in response.kvs() {
            match record_of(keys, kv) {
                Some(record) => records.push(record),
                None => warn!(
                    key = %String::from_utf8_lossy(kv.key()),
                    "ignoring an etcd key under the prefix that holds no record"
                ),
            }
        }
        match response.kvs().last() {
            Some(last) if response.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    let revision = u64::try_from(revision).map_err(|_| "etcd revision is negative")?;
    Ok((revision, records))
}

fn record_of(keys: &Keys, kv: &KeyValue) -> Option<Record> {
    let key = keys.parse(kv.key())?;
    let (refreshed_at_ms, value) = decode_value(kv.value())?;
    Some(Record {
        key,
        value,
        revision: u64::try_from(kv.mod_revision()).ok()?,
        refreshed_at_ms,
    })
}

/// The first key after every key starting with `prefix` (etcd's `range_end` of a prefix).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes: to the end of the keyspace.
    vec![0]
}

/// The key layout under one prefix.
#[derive(Debug, Clone)]
struct Keys {
    /// `<prefix>/`.
    root: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Self {
            root: format!("{}/", prefix.trim_end_matches('/')),
        }
    }

    fn record(&self, key: &Key) -> String {
        format!("{}{}/{}/{}", self.root, key.kind, key.namespace, key.name)
    }

    fn namespace(&self, kind: Kind, namespace: &str) -> String {
        format!("{}{kind}/{namespace}/", self.root)
    }

    fn parse(&self, raw: &[u8]) -> Option<Key> {
        let rest = std::str::from_utf8(raw).ok()?.strip_prefix(&self.root)?;
        let (kind, rest) = rest.split_once('/')?;
        let (namespace, name) = rest.split_once('/')?;
        if namespace.is_empty() || name.is_empty() {
            return None;
        }
        Some(Key {
            kind: Kind::from_label(kind)?,
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }
}

/// The stored value: the envelope line, then the raw value.
fn encode_value(value: &str, refreshed_at_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENVELOPE_HEADER.len() + 21 + value.len());
    out.extend_from_slice(ENVELOPE_HEADER.as_bytes());
    out.extend_from_slice(refreshed_at_ms.to_string().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(value.as_bytes());
    out
}

/// `(refreshed_at_ms, raw value)` of a stored value; `None` when it is not ours.
fn decode_value(bytes: &[u8]) -> Option<(u64, Arc<str>)> {
    let rest = bytes.strip_prefix(ENVELOPE_HEADER.as_bytes())?;
    let newline = rest.iter().position(|b| *b == b'\n')?;
    let stamp = std::str::from_utf8(&rest[..newline]).ok()?;
    if stamp.is_empty() || !stamp.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let refreshed_at_ms = stamp.parse().ok()?;
    let value = std::str::from_utf8(&rest[newline + 1..]).ok()?;
    Some((refreshed_at_ms, Arc::from(value)))
}

/// An etcd client error as a store error: the transport and etcd's transient codes are
/// [`Error::Unavailable`], the rest [`Error::Storage`].
fn etcd_error(doing: &str, e: etcd_client::Error) -> Error {
    use tonic::Code;
    match e {
        etcd_client::Error::GRpcStatus(status) => match status.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Unknown => Error::Unavailable(format!("{doing}: {}", status.message())),
            _ => Error::Storage(format!("{doing}: {}", status.message())),
        },
        e @ (etcd_client::Error::TransportError(_)
        | etcd_client::Error::IoError(_)
        | etcd_client::Error::WatchError(_)
        | etcd_client::Error::EndpointError(_)) => Error::Unavailable(format!("{doing}: {e}")),
        e => Error::Storage(format!("{doing}: {e}")),
    }
}

/// Pauses between reconnect attempts: [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`].
#[derive(Debug)]
struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BACKOFF_MIN, BACKOFF_MAX)
    }
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            next: min,
            min,
            max,
        }
    }

    fn peek(&self) -> Duration {
        self.next
    }

    fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Runs one etcd request, `request(kv)` making each attempt on a clone of `kv`, within
/// [`REQUEST_TIMEOUT`] in all.
///
/// A transient answer ([`Error::Unavailable`]: the transport, no leader) is retried after
/// [`RETRY_BACKOFF`] (doubling), at most [`attempts`] times. The client balances over every
/// endpoint and keeps dialling a dead member, so without this one member down of three would
/// fail about a third of the requests; the next attempt likely goes to another member. When
/// every member is down the attempts run out within a few hundred milliseconds, so writes
/// still fail fast. Writes are transactions comparing revisions, so an attempt repeated after
/// its answer was lost cannot apply twice: a put finds its own value and refreshes it, a delete
/// finds nothing left to delete.
async fn retrying<T, F>(
    doing: &str,
    endpoints: &[String],
    kv: &KvClient,
    mut request: impl FnMut(KvClient) -> F,
) -> Result<T>
where
    F: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    let mut backoff = Backoff::new(RETRY_BACKOFF.0, RETRY_BACKOFF.1);
    let mut left = attempts(endpoints.len());
    loop {
        left -= 1;
        let error = match tokio::time::timeout_at(deadline, request(kv.clone())).await {
            Ok(Ok(response)) => return Ok(response),
            Ok(Err(e)) => etcd_error(&format!("{doing} (etcd at {endpoints:?})"), e),
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "{doing}: etcd at {endpoints:?} did not answer within {REQUEST_TIMEOUT:?}"
                )));
            }
        };
        let pause = backoff.next();
        if !matches!(error, Error::Unavailable(_))
            || left == 0
            || tokio::time::Instant::now() + pause >= deadline
        {
            return Err(error);
        }
        debug!(%error, ?pause, "retrying a transient etcd failure");
        tokio::time::sleep(pause).await;
    }
}

/// How many times [`retrying`] tries one request with `n_endpoints` endpoints: twice per
/// endpoint, so a request fails only when several random picks all land on dead members.
fn attempts(n_endpoints: usize) -> u32 {
    u32::try_from(n_endpoints.saturating_mul(2))
        .unwrap_or(u32::MAX)
        .clamp(2, 8)
}

#[cfg(test)]
#[path = "../../tests/common/etcd.rs"]
mod etcd_process;

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use std::{
        sync::atomic::{AtomicU64, Ordering},
        time::UNIX_EPOCH,
    };

    use super::{
        etcd_process::{Etcd, Proxy},
        *,
    };

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    async fn next(watch: &mut BoxStream<'static, Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("a watch event within 10s")
            .expect("the watch does not end")
    }

    async fn connect(endpoint: &str, prefix: &str) -> EtcdStore {
        EtcdStore::connect(&[endpoint.to_string()], prefix, usize::MAX)
            .await
            .unwrap()
    }

    /// Polls `check` every 50 ms until it holds, failing after `within`.
    async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + within;
        while !check().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let etcd = Etcd::start().await;
        let endpoint = etcd.endpoint();
        let n = AtomicU64::new(0);
        super::super::conformance::run(|| {
            // A fresh prefix per case: the cases do not see each other's records.
            let prefix = format!("/conformance/{}", n.fetch_add(1, Ordering::Relaxed));
            let endpoint = endpoint.clone();
            async move { connect(&endpoint, &prefix).await }
        })
        .await;
    }

    #[test]
    fn keys_and_envelope_round_trip() {
        let keys = Keys::new("/pixiu-metadata/");
        let md = Key::metadata("default", "greeter", "a1b2");
        let def = Key::definition("team-a", "org.example.Greeter:1.0.0::provider:greeter");
        assert_eq!(
            keys.record(&md),
            "/pixiu-metadata/metadata/default/greeter/a1b2"
        );
        assert_eq!(
            keys.namespace(Kind::Definition, "team-a"),
            "/pixiu-metadata/definition/team-a/"
        );
        for key in [&md, &def] {
            assert_eq!(keys.parse(keys.record(key).as_bytes()).as_ref(), Some(key));
        }
        for junk in [
            "/pixiu-metadata/metadata/default",
            "/pixiu-metadata/metadata//x",
            "/pixiu-metadata/unknown/ns/x",
            "/other/metadata/ns/x",
        ] {
            assert_eq!(keys.parse(junk.as_bytes()), None, "{junk}");
        }

        for value in ["", "v", "line one\nline two\n", "中文 ✓"] {
            let encoded = encode_value(value, 1_767_225_600_000);
            assert!(encoded.ends_with(value.as_bytes()), "raw value kept as is");
            let (stamp, decoded) = decode_value(&encoded).unwrap();
            assert_eq!((stamp, &*decoded), (1_767_225_600_000, value));
        }
        assert_eq!(
            encode_value("x", 5),
            b"pixiu-metadata/v1 refreshed_at_ms=5\nx"
        );
        for junk in [
            &b"x"[..],
            b"pixiu-metadata/v1 refreshed_at_ms=\nx",
            b"pixiu-metadata/v1 refreshed_at_ms=12",
            b"pixiu-metadata/v1 refreshed_at_ms=1a\nx",
            b"pixiu-metadata/v1 refreshed_at_ms=1\n\xff",
        ] {
            assert_eq!(decode_value(junk), None);
        }
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
    }

    #[tokio::test]
    async fn layout_in_etcd_and_foreign_keys() {
        let etcd = Etcd::start().await;
        let store = connect(&etcd.endpoint(), "/layout/").await;
        let key = Key::metadata("default", "greeter", "r1");
        let revision = store
            .put(&key, "{\"raw\": 1}\n", at(42))
            .await
            .unwrap()
            .revision();

        let mut raw = Client::connect([etcd.endpoint()], None).await.unwrap();
        let got = raw
            .get("/layout/metadata/default/greeter/r1", None)
            .await
            .unwrap();
        let kv = &got.kvs()[0];
        assert_eq!(
            kv.value(),
            b"pixiu-metadata/v1 refreshed_at_ms=42\n{\"raw\": 1}\n"
        );
        assert_eq!(u64::try_from(kv.mod_revision()).unwrap(), revision);

        // A record written by another tool in our format shows up; junk under the prefix is
        // ignored, and a value overwritten with junk counts as deleted.
        let mut watch = store.watch();
        assert!(matches!(next(&mut watch).await, Event::Reset { .. }));
        raw.put(
            "/layout/definition/ns/org.example.Svc",
            encode_value("def", 7),
            None,
        )
        .await
        .unwrap();
        raw.put("/layout/not-a-record", "junk", None).await.unwrap();
        raw.put("/layout/metadata/default/greeter/r1", "junk", None)
            .await
            .unwrap();
        match next(&mut watch).await {
            Event::Put(record) => {
                assert_eq!(record.key, Key::definition("ns", "org.example.Svc"));
                assert_eq!((&*record.value, record.refreshed_at_ms), ("def", 7));
            }
            other => panic!("expected the foreign record, got {other:?}"),
        }
        match next(&mut watch).await {
            Event::Delete { key: deleted, .. } => assert_eq!(deleted, key),
            other => panic!("expected a delete, got {other:?}"),
        }
        assert_eq!(store.get(&key).await.unwrap(), None);
        // A fresh store lists the same.
        let again = connect(&etcd.endpoint(), "/layout").await;
        assert_eq!(
            again.list(&ListQuery::all(Kind::Definition)).await.unwrap(),
            store.list(&ListQuery::all(Kind::Definition)).await.unwrap()
        );
        assert!(
            again
                .list(&ListQuery::all(Kind::Metadata))
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn namespace_cap() {
        let etcd = Etcd::start().await;
        let store = EtcdStore::connect(&[etcd.endpoint()], "/cap", 2)
            .await
            .unwrap();
        store
            .put(&Key::metadata("ns", "a", "1"), "v", at(1))
            .await
            .unwrap();
        store
            .put(&Key::metadata("ns", "a", "2"), "v", at(1))
            .await
            .unwrap();
        let full = store.put(&Key::metadata("ns", "a", "3"), "v", at(1)).await;
        assert!(
            matches!(full, Err(Error::NamespaceFull { limit: 2, .. })),
            "{full:?}"
        );
        // Other namespaces and kinds have their own count; refreshes and updates are not
        // creations.
        store
            .put(&Key::metadata("other", "a", "1"), "v", at(1))
            .await
            .unwrap();
        store
            .put(&Key::definition("ns", "svc"), "v", at(1))
            .await
            .unwrap();
        store
            .put(&Key::metadata("ns", "a", "1"), "v", at(2))
            .await
            .unwrap();
        store
            .put(&Key::metadata("ns", "a", "1"), "v2", at(2))
            .await
            .unwrap();
        assert!(
            store
                .delete(&Key::metadata("ns", "a", "1"), None)
                .await
                .unwrap()
        );
        store
            .put(&Key::metadata("ns", "a", "3"), "v", at(1))
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_replica_sweeps_and_another_takes_over_when_it_stops() {
        let etcd = Etcd::start().await;
        let a = connect(&etcd.endpoint(), "/elect").await;
        let b = connect(&etcd.endpoint(), "/elect").await;
        let mut lead_a = a.leadership().expect("etcd elects a sweeper");
        let mut lead_b = b.leadership().expect("etcd elects a sweeper");
        // Exactly one of the two is elected.
        tokio::time::timeout(Duration::from_secs(10), async {
            while !(*lead_a.borrow_and_update() || *lead_b.borrow_and_update()) {
                tokio::select! {
                    _ = lead_a.changed() => {}
                    _ = lead_b.changed() => {}
                }
            }
        })
        .await
        .expect("a sweeper is elected within 10 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let leading = (*lead_a.borrow(), *lead_b.borrow());
        let (leader, mut follower) = match leading {
            (true, false) => (a, lead_b),
            (false, true) => (b, lead_a),
            other => panic!("exactly one sweeper, got {other:?}"),
        };
        // The election key lives beside the records: the mirror never sees it.
        assert!(
            leader
                .list(&ListQuery::all(Kind::Metadata))
                .await
                .unwrap()
                .is_empty()
        );
        // The leader stops: it gives up its lease and the other takes over well before the
        // lease would have expired.
        let stopped = Instant::now();
        drop(leader);
        tokio::time::timeout(Duration::from_secs(8), follower.wait_for(|l| *l))
            .await
            .expect("the other replica takes over before the lease TTL")
            .unwrap();
        let took = stopped.elapsed();
        eprintln!("sweeper hand-over after the leader stopped: {took:?}");
        assert!(took < SWEEPER_LEASE_TTL, "{took:?}");
    }

    #[tokio::test]
    async fn two_stores_share_records_and_outcomes() {
        let etcd = Etcd::start().await;
        let a = connect(&etcd.endpoint(), "/shared").await;
        let b = connect(&etcd.endpoint(), "/shared").await;
        let mut watch_b = b.watch();
        assert!(matches!(next(&mut watch_b).await, Event::Reset { .. }));
        let key = Key::metadata("ns", "app", "r");
        let created = a.put(&key, "v1", at(1)).await.unwrap();
        match next(&mut watch_b).await {
            Event::Put(record) => {
                assert_eq!(&*record.value, "v1");
                assert_eq!(record.revision, created.revision());
            }
            other => panic!("expected a put, got {other:?}"),
        }
        // B knows the record now: the same value is a refresh, another an update.
        assert!(matches!(
            b.put(&key, "v1", at(2)).await.unwrap(),
            PutOutcome::Refreshed { .. }
        ));
        match b.put(&key, "v2", at(3)).await.unwrap() {
            PutOutcome::Updated { previous, .. } => assert_eq!(&*previous, "v1"),
            other => panic!("expected an update, got {other:?}"),
        }
        // A's mirror may lag B's writes: the compare catches it and the outcome is exact.
        match a.put(&key, "v3", at(4)).await.unwrap() {
            PutOutcome::Updated { previous, .. } => assert_eq!(&*previous, "v2"),
            other => panic!("expected an update, got {other:?}"),
        }
        // A conditional delete with B's stale revision loses.
        assert!(!b.delete(&key, Some(created.revision())).await.unwrap());
        assert!(b.delete(&key, None).await.unwrap());
        eventually(Duration::from_secs(5), "A sees B's delete", || async {
            a.get(&key).await.unwrap().is_none()
        })
        .await;
    }

    #[tokio::test]
    async fn etcd_down_reads_work_writes_fail_then_recover() {
        let mut etcd = Etcd::start().await;
        let store = connect(&etcd.endpoint(), "/outage").await;
        let k1 = Key::metadata("ns", "app", "1");
        let k2 = Key::metadata("ns", "app", "2");
        store.put(&k1, "before", at(1)).await.unwrap();
        let mut watch = store.watch();
        assert!(matches!(next(&mut watch).await, Event::Reset { .. }));
        store.ready().await.unwrap();

        etcd.kill();
        let started = Instant::now();
        let failed = store.put(&k2, "during", at(2)).await;
        let took = started.elapsed();
        assert!(matches!(failed, Err(Error::Unavailable(_))), "{failed:?}");
        assert!(
            took < Duration::from_secs(5),
            "the write failed after {took:?}"
        );
        eprintln!(
            "put with etcd down failed after {took:?}: {}",
            failed.unwrap_err()
        );
        assert!(matches!(
            store.delete(&k1, None).await,
            Err(Error::Unavailable(_))
        ));
        // Reads keep working from memory.
        assert_eq!(&*store.get(&k1).await.unwrap().unwrap().value, "before");
        assert_eq!(
            store
                .list(&ListQuery::all(Kind::Metadata))
                .await
                .unwrap()
                .len(),
            1
        );
        eventually(
            Duration::from_secs(5),
            "ready() reports etcd down",
            || async { matches!(store.ready().await, Err(Error::Unavailable(_))) },
        )
        .await;
        eprintln!("ready with etcd down: {}", store.ready().await.unwrap_err());

        etcd.restart().await;
        eventually(Duration::from_secs(15), "ready() recovers", || async {
            store.ready().await.is_ok()
        })
        .await;
        eventually(Duration::from_secs(15), "writes succeed again", || async {
            store.put(&k2, "after", at(3)).await.is_ok()
        })
        .await;
        match next(&mut watch).await {
            Event::Put(record) => {
                assert_eq!(record.key, k2);
                assert_eq!(&*record.value, "after");
            }
            other => panic!("expected the write made after recovery, got {other:?}"),
        }
        assert_eq!(&*store.get(&k1).await.unwrap().unwrap().value, "before");
    }

    /// Cuts `store` off from etcd and waits until it notices.
    async fn cut_off(proxy: &Proxy, store: &EtcdStore) {
        proxy.cut();
        eventually(
            Duration::from_secs(5),
            "ready() reports the lost watch",
            || async { store.ready().await.is_err() },
        )
        .await;
    }

    #[tokio::test]
    async fn watch_resumes_after_disconnect_and_relists_after_compaction() {
        let etcd = Etcd::start().await;
        let proxy = Proxy::start(etcd.client_addr()).await;
        let store = connect(&proxy.endpoint(), "/resume").await;
        let direct = connect(&etcd.endpoint(), "/resume").await;
        let mut watch = store.watch();
        assert!(matches!(next(&mut watch).await, Event::Reset { .. }));
        let (k1, k2, k3) = (
            Key::metadata("ns", "app", "1"),
            Key::metadata("ns", "app", "2"),
            Key::metadata("ns", "app", "3"),
        );
        direct.put(&k1, "v1", at(1)).await.unwrap();
        assert!(matches!(next(&mut watch).await, Event::Put(r) if r.key == k1));

        // Disconnected: what happens meanwhile arrives as events once the watch resumes.
        cut_off(&proxy, &store).await;
        direct.put(&k2, "v1", at(2)).await.unwrap();
        direct.put(&k1, "v2", at(3)).await.unwrap();
        proxy.restore();
        match next(&mut watch).await {
            Event::Put(record) => assert_eq!((record.key, &*record.value), (k2.clone(), "v1")),
            other => panic!("expected the missed put of k2, got {other:?}"),
        }
        match next(&mut watch).await {
            Event::Put(record) => assert_eq!((record.key, &*record.value), (k1.clone(), "v2")),
            other => panic!("expected the missed update of k1, got {other:?}"),
        }

        // Disconnected while etcd compacts the history the watch needs: relist and reset.
        cut_off(&proxy, &store).await;
        assert!(direct.delete(&k1, None).await.unwrap());
        direct.put(&k3, "v1", at(4)).await.unwrap();
        let last = direct.put(&k2, "v2", at(5)).await.unwrap().revision();
        let mut raw = Client::connect([etcd.endpoint()], None).await.unwrap();
        raw.compact(
            i64::try_from(last).unwrap(),
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .unwrap();
        proxy.restore();
        match next(&mut watch).await {
            Event::Reset { records, revision } => {
                assert!(revision >= last);
                let got: Vec<_> = records
                    .iter()
                    .map(|r| (r.key.clone(), r.value.to_string()))
                    .collect();
                assert_eq!(
                    got,
                    vec![(k2.clone(), "v2".into()), (k3.clone(), "v1".into())]
                );
            }
            other => panic!("expected a reset after compaction, got {other:?}"),
        }
        assert_eq!(store.get(&k1).await.unwrap(), None);
        assert_eq!(&*store.get(&k2).await.unwrap().unwrap().value, "v2");
        eventually(Duration::from_secs(10), "ready() recovers", || async {
            store.ready().await.is_ok()
        })
        .await;
        // And it follows again from there.
        direct.put(&k1, "v3", at(6)).await.unwrap();
        assert!(matches!(next(&mut watch).await, Event::Put(r) if r.key == k1));
    }

    #[tokio::test]
    async fn a_hung_etcd_makes_the_store_unready_with_or_without_traffic() {
        let etcd = Etcd::start().await;
        let store = connect(&etcd.endpoint(), "/hung").await;
        let key = Key::metadata("ns", "app", "1");
        store.put(&key, "v1", at(1)).await.unwrap();
        store.ready().await.unwrap();

        // No request of the store's own: the probe finds it, and ready() never waits on etcd.
        etcd.freeze(true);
        let frozen = Instant::now();
        let mut slowest = Duration::ZERO;
        loop {
            let asked = Instant::now();
            let unready = store.ready().await;
            slowest = slowest.max(asked.elapsed());
            if matches!(&unready, Err(Error::Unavailable(reason)) if reason.contains("failing")) {
                break;
            }
            assert!(
                frozen.elapsed() < Duration::from_secs(10),
                "still {unready:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let noticed = frozen.elapsed();
        assert!(
            noticed < probe::PROBE_INTERVAL + REQUEST_TIMEOUT * 2,
            "{noticed:?}"
        );
        assert!(slowest < Duration::from_millis(100), "{slowest:?}");
        assert_eq!(&*store.get(&key).await.unwrap().unwrap().value, "v1");

        // Ready again as soon as etcd answers, before any write.
        etcd.freeze(false);
        eventually(Duration::from_secs(10), "ready() recovers", || async {
            store.ready().await.is_ok()
        })
        .await;

        // The watch's connection stays open to a stopped process until its keep-alive times
        // out; the first failed request is enough to report it.
        etcd.freeze(true);
        let failed = store.put(&key, "v2", at(2)).await;
        assert!(matches!(failed, Err(Error::Unavailable(_))), "{failed:?}");
        let unready = store.ready().await;
        assert!(
            matches!(&unready, Err(Error::Unavailable(reason)) if reason.contains("failing")),
            "{unready:?}"
        );
        etcd.freeze(false);
        eventually(
            Duration::from_secs(10),
            "ready() recovers again",
            || async { store.ready().await.is_ok() },
        )
        .await;
    }

    #[test]
    fn a_revision_that_goes_back_is_a_replaced_history() {
        // Reads answer at least the newest revision seen; writes make a newer one.
        assert!(!history_replaced(20, 20, false));
        assert!(!history_replaced(20, 25, false));
        assert!(history_replaced(20, 19, false));
        assert!(!history_replaced(20, 21, true));
        assert!(history_replaced(20, 20, true));
        assert!(history_replaced(20, 3, true));
    }

    /// Puts `n` records of application `app`, each valued `app`; returns their keys.
    async fn put_many(store: &EtcdStore, app: &str, n: usize) -> Vec<Key> {
        let keys: Vec<Key> = (0..n)
            .map(|i| Key::metadata("ns", app, &i.to_string()))
            .collect();
        for key in &keys {
            store.put(key, app, at(1)).await.unwrap();
        }
        keys
    }

    #[tokio::test]
    async fn a_replaced_history_is_listed_again() {
        let mut etcd = Etcd::start().await;
        let proxy = Proxy::start(etcd.client_addr()).await;
        let store = connect(&proxy.endpoint(), "/replaced").await;
        let old = put_many(&store, "old", 20).await;
        let mut watch = store.watch();
        assert!(
            matches!(next(&mut watch).await, Event::Reset { records, .. } if records.len() == 20)
        );

        // etcd loses its disk while the store is cut off, and another replica writes as many
        // keys into the new history as the store holds, past the store's revision: the same
        // count at the revision the watch would resume from, other keys.
        cut_off(&proxy, &store).await;
        etcd.wipe_and_restart().await;
        let other = connect(&etcd.endpoint(), "/replaced").await;
        let new = put_many(&other, "new", 25).await;
        proxy.restore();
        match next(&mut watch).await {
            Event::Reset { records, .. } => {
                let mut got: Vec<Key> = records.into_iter().map(|r| r.key).collect();
                got.sort();
                let mut want = new.clone();
                want.sort();
                assert_eq!(got, want, "the store follows the new history");
            }
            other => panic!("expected a reset to the new history, got {other:?}"),
        }
        assert!(store.get(&old[0]).await.unwrap().is_none());

        // etcd loses its disk again, long enough for the watch's backoff to grow, and comes
        // back empty: the store's own first write finds a revision older than its mirror's,
        // wakes the relist at once, and reads its write back.
        etcd.kill();
        tokio::time::sleep(Duration::from_secs(8)).await;
        etcd.wipe_and_restart().await;
        let fresh = Key::metadata("ns", "fresh", "1");
        let restarted = Instant::now();
        let took = loop {
            let started = Instant::now();
            if store.put(&fresh, "fresh", at(3)).await.is_ok() {
                break started.elapsed();
            }
            assert!(
                restarted.elapsed() < Duration::from_secs(15),
                "writes did not succeed again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(&*store.get(&fresh).await.unwrap().unwrap().value, "fresh");
        assert!(
            took < REQUEST_TIMEOUT,
            "the write waited {took:?} for the relist"
        );
        eventually(
            Duration::from_secs(15),
            "the lost records are gone",
            || async { store.get(&new[0]).await.unwrap().is_none() },
        )
        .await;
        eventually(Duration::from_secs(15), "ready() recovers", || async {
            store.ready().await.is_ok()
        })
        .await;
        let held = store.list(&ListQuery::all(Kind::Metadata)).await.unwrap();
        assert_eq!(held.len(), 1, "only the write made after the wipe");
    }

    #[tokio::test]
    async fn watch_ends_when_the_store_is_dropped() {
        let etcd = Etcd::start().await;
        let store = connect(&etcd.endpoint(), "/drop").await;
        let mut watch = store.watch();
        assert!(matches!(next(&mut watch).await, Event::Reset { .. }));
        drop(store);
        let end = tokio::time::timeout(Duration::from_secs(10), watch.next()).await;
        assert!(matches!(end, Ok(None)), "{end:?}");
    }

    #[tokio::test]
    async fn connect_fails_in_bounded_time_without_etcd() {
        let mut etcd = Etcd::start().await;
        let endpoint = etcd.endpoint();
        etcd.kill();
        let started = Instant::now();
        let error = EtcdStore::connect(&[endpoint], DEFAULT_PREFIX, usize::MAX)
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Unavailable(_)), "{error:?}");
        assert!(started.elapsed() < STARTUP_TIMEOUT + REQUEST_TIMEOUT * 2);
        assert!(matches!(
            EtcdStore::connect(&[], DEFAULT_PREFIX, usize::MAX).await,
            Err(Error::Storage(_))
        ));
    }

    #[test]
    fn requests_are_tried_twice_per_endpoint_within_bounds() {
        assert_eq!(attempts(0), 2);
        assert_eq!(attempts(1), 2);
        assert_eq!(attempts(3), 6);
        assert_eq!(attempts(1000), 8);
    }

    #[tokio::test]
    async fn a_dead_endpoint_beside_a_live_one_fails_no_request() {
        let etcd = Etcd::start().await;
        // A port nothing listens on: every connection to it is refused.
        let dead = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        let store = EtcdStore::connect(&[dead, etcd.endpoint()], "/dead-member", 1000)
            .await
            .unwrap();
        // Each request's first attempt picks either endpoint: without retries, about half of
        // these would fail.
        for i in 0..50 {
            let key = Key::metadata("ns", "app", &format!("r{i}"));
            store.put(&key, "v", at(1)).await.unwrap();
            assert!(store.delete(&key, None).await.unwrap(), "r{i} deleted");
        }
        store.ready().await.unwrap();
    }

    #[tokio::test]
    async fn idle_watch_survives_keep_alive_pings() {
        // etcd drops connections that ping too often (after ~8 s with a 2 s interval): an
        // idle store must stay ready across several keep-alive periods' worth of time.
        let etcd = Etcd::start().await;
        let store = connect(&etcd.endpoint(), "/idle").await;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(12) {
            if let Err(e) = store.ready().await {
                panic!("the watch dropped after {:?}: {e}", started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
