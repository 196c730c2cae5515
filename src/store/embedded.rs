//! The embedded durable store: one redb file under the data directory, the default backend.
//!
//! # Layout
//!
//! Every table is keyed and valued by raw bytes, decoded here, so a damaged row is an
//! [`Error::Storage`] rather than a panic inside redb's typed decoding.
//!
//! - `values`: record key → the raw value, exactly as published.
//! - `meta`: record key → `revision` and `refreshed_at_ms` (two little-endian `u64`). A lease
//!   refresh rewrites only this small row, never the value.
//! - `counts`: `kind 0x00 namespace` → how many records the namespace holds, so the
//!   per-namespace cap is checked without a scan.
//! - `state`: `revision` → the store revision (never goes backwards, survives restarts) and
//!   `format` → the layout version.
//!
//! A record key is `kind label 0x00 namespace 0x00 name`: it sorts by `(kind, namespace, name)`
//! because namespaces hold neither NUL nor `/` and `0x00` sorts before every other byte.
//!
//! # Writes: group commit
//!
//! Every write goes to one writer thread through a channel. The thread takes everything
//! queued (up to [`MAX_BATCH_OPS`] operations or [`MAX_BATCH_BYTES`] of values), applies it in
//! one write transaction with consecutive revisions, commits once with immediate durability
//! (fsync), then publishes the events in revision order and answers every caller. Concurrent
//! publishers therefore share one fsync, and a write is acknowledged only once it is durable.
//!
//! # Lease refreshes in memory
//!
//! Opened with a lease TTL ([`Options::lease_ttl`], what `serve` does), a publish of an
//! unchanged record whose stamp on disk is less than half a TTL old is answered from memory:
//! the index's stamp moves forward, an [`Event::Refreshed`] goes out at the record's current
//! revision, and nothing is written. Other refreshes go through the writer and checkpoint the
//! stamp. On opening, stamps are recovered as [`checkpoint`](super::checkpoint) explains, so a
//! crash breaks no acknowledged refresh's promise. A refresh kept in memory does not change
//! the record's revision; the sweeper's conditional delete therefore also refuses a record
//! whose lease still runs in memory, and a record the writer is deleting is marked so no
//! refresh is answered from memory until the delete is through (it is queued behind it and
//! creates the record anew).
//!
//! # Reads and watches
//!
//! `get` answers from an in-memory index of every record's value and lease (the values are
//! the same `Arc`s the events carry, so the index costs a key and a few words per record),
//! loaded when the store opens and updated by the writer after each commit and before any
//! caller hears back, so a reader sees its own acknowledged writes. `list` is a redb read
//! transaction on the blocking pool, with the leases taken from the index. The snapshot
//! behind [`Event::Reset`] is the index itself: the writer updates it and publishes the
//! batch's events under its write lock, a watcher subscribes and copies it under the read
//! lock, so no change is missed or seen twice. None involves the writer.

use std::{
    collections::HashMap,
    fmt,
    ops::Bound,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, SystemTime},
};

use futures::stream::BoxStream;
use parking_lot::{Mutex, RwLock};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, oneshot};

use super::{
    Error, Event, Key, Kind, ListQuery, PutOutcome, Record, Result, Store, checkpoint::Checkpoints,
    epoch_ms,
};

/// The data file's name inside the data directory.
pub const FILE_NAME: &str = "pixiu-metadata.redb";

/// Most operations applied in one write transaction.
pub const MAX_BATCH_OPS: usize = 1024;

/// Once a batch holds this many bytes of values, the writer stops adding to it (64 MiB).
pub const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;

/// Events buffered per watcher before it falls behind and is sent a fresh [`Event::Reset`].
const WATCH_BUFFER: usize = 4096;

/// The cache redb may fill with pages.
const CACHE_BYTES: usize = 256 * 1024 * 1024;

/// The layout version written to the `state` table.
const FORMAT_VERSION: u64 = 1;

const VALUES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("values");
const META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("meta");
const COUNTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("counts");
const STATE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("state");

const STATE_REVISION: &[u8] = b"revision";
const STATE_FORMAT: &[u8] = b"format";

/// The embedded durable [`Store`], on redb.
///
/// Cloning is cheap and shares the store. Dropping the last clone stops the writer thread
/// (after it finishes the batch at hand) and closes the file.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

/// Every committed record's value and lease, by key, and the revision of the newest: what
/// `get`, snapshots and refreshes kept in memory read.
#[derive(Debug, Default)]
struct Index {
    records: HashMap<Key, Indexed>,
    revision: u64,
}

#[derive(Debug, Clone)]
struct Indexed {
    value: Arc<str>,
    revision: u64,
    /// The lease stamp, refreshes kept in memory included.
    refreshed_at_ms: u64,
    /// The lease stamp in the file.
    stored_at_ms: u64,
    /// A delete of this record is in the writer's batch at hand.
    deleting: bool,
}

impl Indexed {
    fn record(&self, key: &Key) -> Record {
        Record {
            key: key.clone(),
            value: self.value.clone(),
            revision: self.revision,
            refreshed_at_ms: self.refreshed_at_ms,
        }
    }
}

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct Options {
    /// Most records per namespace and kind.
    pub max_records_per_namespace: usize,
    /// The lease TTL of the records. With one, refreshes are kept in memory between
    /// checkpoints (see the module documentation); without, every refresh is written.
    pub lease_ttl: Option<Duration>,
}

struct Inner {
    db: Arc<Database>,
    index: Arc<RwLock<Index>>,
    checkpoints: Option<Checkpoints>,
    /// The data file, for messages.
    file: PathBuf,
    /// Into the writer thread; `None` once dropping.
    ops: Option<mpsc::Sender<Op>>,
    events: broadcast::Sender<Event>,
    writer: Option<thread::JoinHandle<()>>,
    n_commits: Arc<AtomicU64>,
    /// Why the last commit failed, until one succeeds.
    last_commit_error: Arc<Mutex<Option<String>>>,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("file", &self.inner.file)
            .field("n_commits", &self.n_commits())
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer's loop once it has answered what is queued;
        // joining it closes the file before the drop returns, so it can be reopened at once.
        self.ops.take();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(file = %self.file.display(), "store writer thread panicked");
        }
    }
}

/// A write for the writer thread.
enum Op {
    Put {
        key: Key,
        encoded: Vec<u8>,
        value: Arc<str>,
        refreshed_at_ms: u64,
        reply: oneshot::Sender<Result<PutOutcome>>,
    },
    Delete {
        key: Key,
        encoded: Vec<u8>,
        if_revision: Option<u64>,
        reply: oneshot::Sender<Result<bool>>,
    },
}

impl Op {
    fn value_bytes(&self) -> usize {
        match self {
            Op::Put { value, .. } => value.len(),
            Op::Delete { .. } => 0,
        }
    }

    fn fail(self, error: &Error) {
        // The caller may have gone away; nobody to tell then.
        match self {
            Op::Put { reply, .. } => drop(reply.send(Err(copy_error(error)))),
            Op::Delete { reply, .. } => drop(reply.send(Err(copy_error(error)))),
        }
    }
}

/// The answer to one applied operation, held until the batch commits.
enum Done {
    Put(oneshot::Sender<Result<PutOutcome>>, Result<PutOutcome>),
    Delete(oneshot::Sender<Result<bool>>, Result<bool>),
}

impl Done {
    fn send(self) {
        // The caller may have gone away; the write stands regardless.
        match self {
            Done::Put(reply, result) => drop(reply.send(result)),
            Done::Delete(reply, result) => drop(reply.send(result)),
        }
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store in the directory `path`, creating the directory if
    /// missing. The data lives in `<path>/pixiu-metadata.redb`. Holds at most
    /// `max_records_per_namespace` records per namespace and kind.
    ///
    /// The whole file is checked on open: a corrupted or truncated file is an
    /// [`Error::Storage`] naming it; a file another process holds open is
    /// [`Error::Unavailable`]. An empty file is taken for a new store (as after a crash while
    /// creating it).
    pub fn open(path: &Path, max_records_per_namespace: usize) -> Result<Self> {
        Self::open_with(
            path,
            Options {
                max_records_per_namespace,
                lease_ttl: None,
            },
        )
    }

    /// [`EmbeddedStore::open`] with every option.
    pub fn open_with(path: &Path, options: Options) -> Result<Self> {
        let Options {
            max_records_per_namespace,
            lease_ttl,
        } = options;
        std::fs::create_dir_all(path).map_err(|e| {
            Error::Storage(format!("creating data directory {}: {e}", path.display()))
        })?;
        let file = path.join(FILE_NAME);
        let db = open_database(&file)?;
        init(&db, &file)?;
        let (records, revision) = read_all(&db, &file)?;
        let checkpoints = lease_ttl.map(Checkpoints::new);
        let open_ms = epoch_ms(SystemTime::now());
        let records = records
            .into_iter()
            .map(|r| {
                let refreshed_at_ms = checkpoints.map_or(r.refreshed_at_ms, |c| {
                    c.recovered(r.refreshed_at_ms, open_ms)
                });
                let entry = Indexed {
                    value: r.value,
                    revision: r.revision,
                    refreshed_at_ms,
                    stored_at_ms: r.refreshed_at_ms,
                    deleting: false,
                };
                (r.key, entry)
            })
            .collect();
        let index = Arc::new(RwLock::new(Index { records, revision }));
        let db = Arc::new(db);

        let (ops, rx) = mpsc::channel();
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let n_commits = Arc::new(AtomicU64::new(0));
        let last_commit_error = Arc::new(Mutex::new(None));
        let writer = Writer {
            db: db.clone(),
            index: index.clone(),
            checkpoints,
            file: file.clone(),
            rx,
            events: events.clone(),
            n_commits: n_commits.clone(),
            last_commit_error: last_commit_error.clone(),
            max_records_per_namespace,
        };
        let writer = thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| Error::Storage(format!("starting the store writer thread: {e}")))?;
        tracing::info!(file = %file.display(), "embedded store open");
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                index,
                checkpoints,
                file,
                ops: Some(ops),
                events,
                writer: Some(writer),
                n_commits,
                last_commit_error,
            }),
        })
    }

    /// The data file.
    pub fn file(&self) -> &Path {
        &self.inner.file
    }

    /// How many write transactions the writer committed since the store was opened. Fewer
    /// than the writes when concurrent writes shared commits.
    pub fn n_commits(&self) -> u64 {
        self.inner.n_commits.load(Ordering::Relaxed)
    }

    fn send(&self, op: Op) -> Result<()> {
        let unavailable = || Error::Unavailable("the store is closing".into());
        let ops = self.inner.ops.as_ref().ok_or_else(unavailable)?;
        ops.send(op).map_err(|_| unavailable())
    }

    /// Runs `read` on the blocking pool.
    async fn read<T, F>(&self, read: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || read(&inner))
            .await
            .map_err(|e| {
                if e.is_panic() {
                    Error::Storage(format!("reading {} panicked", self.inner.file.display()))
                } else {
                    Error::Unavailable("the runtime is shutting down".into())
                }
            })?
    }
}

/// Opens the redb file, turning every failure (including a panic on a damaged file) into an
/// error naming the file.
fn open_database(file: &Path) -> Result<Database> {
    let opened = std::panic::catch_unwind(|| {
        Database::builder()
            .set_check_integrity_on_open(true)
            .set_cache_size(CACHE_BYTES)
            .create(file)
    });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(Error::Unavailable(format!(
            "{} is open in another process",
            file.display()
        ))),
        Ok(Err(e)) => Err(Error::Storage(format!(
            "opening {}: {e} (the file is damaged or not a pixiu-metadata data file; restore it \
             from a backup or move it away to start empty)",
            file.display()
        ))),
        Err(_) => Err(Error::Storage(format!(
            "opening {}: the file is damaged (the database engine failed reading it); restore it \
             from a backup or move it away to start empty",
            file.display()
        ))),
    }
}

/// Creates the tables and checks the layout version.
fn init(db: &Database, file: &Path) -> Result<()> {
    let err = |e: redb::Error| storage(file, "initialising", e);
    let mut txn = db.begin_write().map_err(|e| err(e.into()))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| Error::Storage(format!("initialising {}: {e}", file.display())))?;
    {
        txn.open_table(VALUES).map_err(|e| err(e.into()))?;
        txn.open_table(META).map_err(|e| err(e.into()))?;
        txn.open_table(COUNTS).map_err(|e| err(e.into()))?;
        let mut state = txn.open_table(STATE).map_err(|e| err(e.into()))?;
        let format = state
            .get(STATE_FORMAT)
            .map_err(|e| err(e.into()))?
            .map(|g| decode_u64(g.value(), file, "the format version"))
            .transpose()?;
        match format {
            None => {
                state
                    .insert(STATE_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())
                    .map_err(|e| err(e.into()))?;
            }
            Some(FORMAT_VERSION) => {}
            Some(other) => {
                return Err(Error::Storage(format!(
                    "{} has layout version {other}; this build reads version {FORMAT_VERSION}",
                    file.display()
                )));
            }
        }
    }
    txn.commit().map_err(|e| err(e.into()))
}

/// A redb failure as a store error.
fn storage(file: &Path, doing: &str, e: redb::Error) -> Error {
    match e {
        redb::Error::DatabaseClosed => Error::Unavailable(format!("{} is closed", file.display())),
        e => Error::Storage(format!("{doing} {}: {e}", file.display())),
    }
}

/// Errors are not `Clone` (a batch failure goes to every caller in it); this copies one.
fn copy_error(e: &Error) -> Error {
    match e {
        Error::Unavailable(m) => Error::Unavailable(m.clone()),
        Error::Storage(m) => Error::Storage(m.clone()),
        Error::NamespaceFull { namespace, limit } => Error::NamespaceFull {
            namespace: namespace.clone(),
            limit: *limit,
        },
        Error::TooLarge(m) => Error::TooLarge(m.clone()),
        Error::Rejected(m) => Error::Rejected(m.clone()),
    }
}

/// The stored key of `key`.
fn encode_key(key: &Key) -> Result<Vec<u8>> {
    if key.namespace.contains('\0') {
        return Err(Error::Storage(format!(
            "cannot store {key}: the namespace contains NUL"
        )));
    }
    let label = key.kind.as_str();
    let mut out = Vec::with_capacity(label.len() + key.namespace.len() + key.name.len() + 2);
    out.extend_from_slice(label.as_bytes());
    out.push(0);
    out.extend_from_slice(key.namespace.as_bytes());
    out.push(0);
    out.extend_from_slice(key.name.as_bytes());
    Ok(out)
}

/// The `counts` key of `key`'s namespace.
fn namespace_key(key: &Key) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.kind.as_str().len() + key.namespace.len() + 1);
    out.extend_from_slice(key.kind.as_str().as_bytes());
    out.push(0);
    out.extend_from_slice(key.namespace.as_bytes());
    out
}

fn kind_prefix(kind: Kind) -> Vec<u8> {
    let mut out = kind.as_str().as_bytes().to_vec();
    out.push(0);
    out
}

fn decode_key(bytes: &[u8], file: &Path) -> Result<Key> {
    let bad = || {
        Error::Storage(format!(
            "{}: damaged record key {:?}",
            file.display(),
            String::from_utf8_lossy(bytes)
        ))
    };
    let mut parts = bytes.splitn(3, |b| *b == 0);
    let (Some(label), Some(namespace), Some(name)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let kind = std::str::from_utf8(label)
        .ok()
        .and_then(Kind::from_label)
        .ok_or_else(bad)?;
    let namespace = std::str::from_utf8(namespace).map_err(|_| bad())?;
    let name = std::str::from_utf8(name).map_err(|_| bad())?;
    Ok(Key {
        kind,
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

fn decode_value(bytes: &[u8], key: &Key, file: &Path) -> Result<Arc<str>> {
    std::str::from_utf8(bytes).map(Arc::from).map_err(|e| {
        Error::Storage(format!(
            "{}: the value of {key} is damaged: {e}",
            file.display()
        ))
    })
}

fn decode_u64(bytes: &[u8], file: &Path, what: &str) -> Result<u64> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_le_bytes)
        .map_err(|_| Error::Storage(format!("{}: {what} is damaged", file.display())))
}

/// `(revision, refreshed_at_ms)` as stored in `meta`.
fn encode_meta(revision: u64, refreshed_at_ms: u64) -> [u8; 16] {
    let mut out = [0; 16];
    out[..8].copy_from_slice(&revision.to_le_bytes());
    out[8..].copy_from_slice(&refreshed_at_ms.to_le_bytes());
    out
}

fn decode_meta(bytes: &[u8], key: &Key, file: &Path) -> Result<(u64, u64)> {
    let bad = || Error::Storage(format!("{}: the lease of {key} is damaged", file.display()));
    let (revision, refreshed) = bytes.split_at_checked(8).ok_or_else(bad)?;
    let revision = <[u8; 8]>::try_from(revision).map_err(|_| bad())?;
    let refreshed = <[u8; 8]>::try_from(refreshed).map_err(|_| bad())?;
    Ok((u64::from_le_bytes(revision), u64::from_le_bytes(refreshed)))
}

fn event_revision(event: &Event) -> u64 {
    match event {
        Event::Reset { revision, .. }
        | Event::Refreshed { revision, .. }
        | Event::Delete { revision, .. } => *revision,
        Event::Put(record) => record.revision,
    }
}

/// The read side: plain redb read transactions.
impl Inner {
    fn err<'a>(&'a self, doing: &'a str) -> impl Fn(redb::Error) -> Error + 'a {
        move |e| storage(&self.file, doing, e)
    }

    fn get(&self, key: &Key) -> Result<Option<Record>> {
        Ok(self
            .index
            .read()
            .records
            .get(key)
            .map(|entry| entry.record(key)))
    }

    /// A refresh of `key` to the identical `value` at `now_ms`, answered from memory when the
    /// checkpoint rules allow; `None` when it has to go through the writer.
    fn refresh_in_memory(&self, key: &Key, value: &str, now_ms: u64) -> Option<PutOutcome> {
        let checkpoints = self.checkpoints?;
        let mut index = self.index.write();
        let entry = index.records.get_mut(key)?;
        if entry.deleting
            || *entry.value != *value
            || !checkpoints.in_memory(entry.stored_at_ms, now_ms)
        {
            return None;
        }
        entry.refreshed_at_ms = entry.refreshed_at_ms.max(now_ms);
        let revision = entry.revision;
        // Under the lock, so it is ordered with the writer's events and with subscriptions.
        // No watcher is fine.
        let _ = self.events.send(Event::Refreshed {
            key: key.clone(),
            revision,
            refreshed_at_ms: entry.refreshed_at_ms,
        });
        Some(PutOutcome::Refreshed { revision })
    }

    /// The records `query` selects, from one read transaction, with the store revision.
    fn list(&self, query: &ListQuery) -> Result<(Vec<Record>, u64)> {
        let err = self.err("reading");
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let state = txn.open_table(STATE).map_err(|e| err(e.into()))?;
        let revision = match state.get(STATE_REVISION).map_err(|e| err(e.into()))? {
            Some(g) => decode_u64(g.value(), &self.file, "the store revision")?,
            None => 0,
        };
        let values = txn.open_table(VALUES).map_err(|e| err(e.into()))?;
        let meta = txn.open_table(META).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        if query.limit == 0 {
            return Ok((out, revision));
        }

        let mut prefix = kind_prefix(query.kind);
        if let Some(namespace) = &query.namespace {
            if namespace.contains('\0') {
                return Ok((out, revision));
            }
            prefix.extend_from_slice(namespace.as_bytes());
            prefix.push(0);
            prefix.extend_from_slice(query.name_prefix.as_bytes());
        }
        let after = query
            .start_after
            .as_ref()
            .filter(|(namespace, _)| !namespace.contains('\0'))
            .map(|(namespace, name)| {
                let mut key = kind_prefix(query.kind);
                key.extend_from_slice(namespace.as_bytes());
                key.push(0);
                key.extend_from_slice(name.as_bytes());
                key
            });
        let lower = match &after {
            Some(after) if *after >= prefix => Bound::Excluded(after.as_slice()),
            _ => Bound::Included(prefix.as_slice()),
        };
        let range = values
            .range::<&[u8]>((lower, Bound::Unbounded))
            .map_err(|e| err(e.into()))?;
        for entry in range {
            let (encoded, value) = entry.map_err(|e| err(e.into()))?;
            let encoded = encoded.value();
            if !encoded.starts_with(&prefix) {
                break;
            }
            let key = decode_key(encoded, &self.file)?;
            if !query.matches(&key) {
                continue;
            }
            out.push(read_record(&meta, key, encoded, value.value(), &self.file)?);
            if out.len() >= query.limit {
                break;
            }
        }
        // The file's stamps miss the refreshes kept in memory.
        let index = self.index.read();
        for record in &mut out {
            if let Some(entry) = index.records.get(&record.key)
                && entry.revision == record.revision
            {
                record.refreshed_at_ms = record.refreshed_at_ms.max(entry.refreshed_at_ms);
            }
        }
        Ok((out, revision))
    }

    fn ready(&self) -> Result<()> {
        if self.writer.as_ref().is_none_or(|w| w.is_finished()) {
            return Err(Error::Unavailable("the store writer thread stopped".into()));
        }
        if let Some(error) = self.last_commit_error.lock().clone() {
            return Err(Error::Unavailable(format!(
                "the last commit failed: {error}"
            )));
        }
        let err = self.err("reading");
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let state = txn.open_table(STATE).map_err(|e| err(e.into()))?;
        state.get(STATE_REVISION).map_err(|e| err(e.into()))?;
        Ok(())
    }
}

impl super::Subscribe for Inner {
    fn subscribe(&self) -> (Event, broadcast::Receiver<Event>) {
        let index = self.index.read();
        // The writer publishes under the write lock: what the subscription brings is exactly
        // what the copy below does not hold.
        let rx = self.events.subscribe();
        let mut records: Vec<Record> = index
            .records
            .iter()
            .map(|(key, entry)| entry.record(key))
            .collect();
        let revision = index.revision;
        drop(index);
        // In `Kind` order, then by namespace and name, as `list` and the other stores give
        // them.
        records.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        (Event::Reset { records, revision }, rx)
    }
}

/// Every record in `db`, with the revision it is current at, from one read transaction.
fn read_all(db: &Database, file: &Path) -> Result<(Vec<Record>, u64)> {
    // One read transaction for all kinds, so the revision fits every record.
    let err = |e: redb::Error| storage(file, "reading", e);
    let txn = db.begin_read().map_err(|e| err(e.into()))?;
    let state = txn.open_table(STATE).map_err(|e| err(e.into()))?;
    let revision = match state.get(STATE_REVISION).map_err(|e| err(e.into()))? {
        Some(g) => decode_u64(g.value(), file, "the store revision")?,
        None => 0,
    };
    let values = txn.open_table(VALUES).map_err(|e| err(e.into()))?;
    let meta = txn.open_table(META).map_err(|e| err(e.into()))?;
    let mut out = Vec::new();
    // In `Kind` order, as the memory store lists them.
    for kind in Kind::ALL {
        let prefix = kind_prefix(kind);
        let range = values
            .range::<&[u8]>(prefix.as_slice()..)
            .map_err(|e| err(e.into()))?;
        for entry in range {
            let (encoded, value) = entry.map_err(|e| err(e.into()))?;
            let encoded = encoded.value();
            if !encoded.starts_with(&prefix) {
                break;
            }
            let key = decode_key(encoded, file)?;
            out.push(read_record(&meta, key, encoded, value.value(), file)?);
        }
    }
    Ok((out, revision))
}

/// The record under `key` (stored as `encoded`) with the raw `value`, its lease read from
/// `meta`.
fn read_record(
    meta: &redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    key: Key,
    encoded: &[u8],
    value: &[u8],
    file: &Path,
) -> Result<Record> {
    let lease = meta
        .get(encoded)
        .map_err(|e| storage(file, "reading", e.into()))?
        .ok_or_else(|| {
            Error::Storage(format!("{}: the lease of {key} is missing", file.display()))
        })?;
    let (revision, refreshed_at_ms) = decode_meta(lease.value(), &key, file)?;
    let value = decode_value(value, &key, file)?;
    Ok(Record {
        key,
        value,
        revision,
        refreshed_at_ms,
    })
}

/// The writer thread's state.
struct Writer {
    db: Arc<Database>,
    index: Arc<RwLock<Index>>,
    checkpoints: Option<Checkpoints>,
    file: PathBuf,
    rx: mpsc::Receiver<Op>,
    events: broadcast::Sender<Event>,
    n_commits: Arc<AtomicU64>,
    last_commit_error: Arc<Mutex<Option<String>>>,
    max_records_per_namespace: usize,
}

impl Writer {
    /// Applies batches until every sender is gone.
    fn run(self) {
        while let Ok(first) = self.rx.recv() {
            let mut bytes = first.value_bytes();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_OPS && bytes < MAX_BATCH_BYTES {
                match self.rx.try_recv() {
                    Ok(op) => {
                        bytes += op.value_bytes();
                        batch.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.apply(batch);
        }
    }

    /// Applies `batch` in one transaction, commits, then publishes and answers.
    fn apply(&self, batch: Vec<Op>) {
        let n_ops = batch.len();
        let mut done = Vec::with_capacity(n_ops);
        let mut events = Vec::with_capacity(n_ops);
        let mut batch = batch.into_iter();
        let committed = self.transact(&mut batch, &mut done, &mut events);
        match committed {
            Ok(()) => {
                self.n_commits.fetch_add(1, Ordering::Relaxed);
                self.last_commit_error.lock().take();
                tracing::trace!(n_ops, "store batch committed");
                self.publish_committed(events);
                for d in done {
                    d.send();
                }
            }
            Err(error) => {
                tracing::error!(%error, n_ops, "store batch failed; nothing of it was written");
                *self.last_commit_error.lock() = Some(error.to_string());
                // The deletes did not happen: their records refresh in memory again.
                let mut index = self.index.write();
                for event in &events {
                    if let Event::Delete { key, .. } = event
                        && let Some(entry) = index.records.get_mut(key)
                    {
                        entry.deleting = false;
                    }
                }
                drop(index);
                // Nothing was written: every caller in the batch hears the error, including
                // those whose own operation went through before the failure.
                for d in done {
                    match d {
                        Done::Put(reply, _) => drop(reply.send(Err(copy_error(&error)))),
                        Done::Delete(reply, _) => drop(reply.send(Err(copy_error(&error)))),
                    }
                }
                for op in batch {
                    op.fail(&error);
                }
            }
        }
    }

    /// Brings the index in line with a committed batch's events and publishes them, in
    /// revision order and under the index's write lock (see the module documentation),
    /// before anyone hears back: a caller that watches after its put returns sees the put in
    /// the reset, never an older state.
    fn publish_committed(&self, events: Vec<Event>) {
        let mut index = self.index.write();
        for event in events {
            let revision = event_revision(&event);
            match &event {
                Event::Put(record) => {
                    index.records.insert(
                        record.key.clone(),
                        Indexed {
                            value: record.value.clone(),
                            revision: record.revision,
                            refreshed_at_ms: record.refreshed_at_ms,
                            stored_at_ms: record.refreshed_at_ms,
                            deleting: false,
                        },
                    );
                }
                Event::Refreshed {
                    key,
                    revision,
                    refreshed_at_ms,
                } => {
                    if let Some(entry) = index.records.get_mut(key) {
                        entry.revision = *revision;
                        entry.refreshed_at_ms = entry.refreshed_at_ms.max(*refreshed_at_ms);
                        entry.stored_at_ms = *refreshed_at_ms;
                    }
                }
                Event::Delete { key, .. } => {
                    index.records.remove(key);
                }
                // The writer never emits a reset.
                Event::Reset { .. } => {}
            }
            index.revision = index.revision.max(revision);
            // No watcher is fine.
            let _ = self.events.send(event);
        }
    }

    /// Runs the write transaction. Operations it took from `batch` have their answers in
    /// `done`; on error, those still in `batch` were never started.
    fn transact(
        &self,
        batch: &mut std::vec::IntoIter<Op>,
        done: &mut Vec<Done>,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let file = &self.file;
        let err = |e: redb::Error| storage(file, "writing", e);
        let mut txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| Error::Storage(format!("writing {}: {e}", file.display())))?;
        {
            let mut tables = Tables {
                values: txn.open_table(VALUES).map_err(|e| err(e.into()))?,
                meta: txn.open_table(META).map_err(|e| err(e.into()))?,
                counts: txn.open_table(COUNTS).map_err(|e| err(e.into()))?,
                file,
                max_records_per_namespace: self.max_records_per_namespace,
                index: &self.index,
                checkpoints: self.checkpoints,
                now_ms: epoch_ms(SystemTime::now()),
            };
            let mut state = txn.open_table(STATE).map_err(|e| err(e.into()))?;
            let start = match state.get(STATE_REVISION).map_err(|e| err(e.into()))? {
                Some(g) => decode_u64(g.value(), file, "the store revision")?,
                None => 0,
            };
            let mut revision = start;
            for op in batch.by_ref() {
                match op {
                    Op::Put {
                        key,
                        encoded,
                        value,
                        refreshed_at_ms,
                        reply,
                    } => {
                        let result = tables.put(
                            &key,
                            &encoded,
                            value,
                            refreshed_at_ms,
                            revision + 1,
                            events,
                        )?;
                        if result.is_ok() {
                            revision += 1;
                        }
                        done.push(Done::Put(reply, result));
                    }
                    Op::Delete {
                        key,
                        encoded,
                        if_revision,
                        reply,
                    } => {
                        let result =
                            tables.delete(&key, &encoded, if_revision, revision + 1, events)?;
                        if result.as_ref().is_ok_and(|deleted| *deleted) {
                            revision += 1;
                        }
                        done.push(Done::Delete(reply, result));
                    }
                }
            }
            if revision != start {
                state
                    .insert(STATE_REVISION, revision.to_le_bytes().as_slice())
                    .map_err(|e| err(e.into()))?;
            }
        }
        txn.commit().map_err(|e| err(e.into()))
    }
}

/// The tables of one write transaction.
struct Tables<'t> {
    values: redb::Table<'t, &'static [u8], &'static [u8]>,
    meta: redb::Table<'t, &'static [u8], &'static [u8]>,
    counts: redb::Table<'t, &'static [u8], &'static [u8]>,
    file: &'t Path,
    max_records_per_namespace: usize,
    index: &'t RwLock<Index>,
    checkpoints: Option<Checkpoints>,
    /// The clock when the transaction began, for the lease check of conditional deletes.
    now_ms: u64,
}

/// What a put finds under its key.
enum Existing {
    Missing,
    Same,
    Different,
}

impl Tables<'_> {
    /// Puts one record at `revision`. The outer error aborts the transaction; the inner one
    /// is this operation's alone (nothing was written for it).
    fn put(
        &mut self,
        key: &Key,
        encoded: &[u8],
        value: Arc<str>,
        refreshed_at_ms: u64,
        revision: u64,
        events: &mut Vec<Event>,
    ) -> Result<Result<PutOutcome>> {
        let file = self.file;
        let err = move |e: redb::StorageError| storage(file, "writing", e.into());
        let existing = match self.values.get(encoded).map_err(&err)? {
            None => Existing::Missing,
            Some(stored) if stored.value() == value.as_bytes() => Existing::Same,
            Some(_) => Existing::Different,
        };
        let meta = encode_meta(revision, refreshed_at_ms);
        match existing {
            Existing::Same => {
                // A lease refresh: only the small meta row changes.
                self.meta.insert(encoded, meta.as_slice()).map_err(&err)?;
                events.push(Event::Refreshed {
                    key: key.clone(),
                    revision,
                    refreshed_at_ms,
                });
                Ok(Ok(PutOutcome::Refreshed { revision }))
            }
            Existing::Different => {
                let previous = {
                    let previous = self
                        .values
                        .insert(encoded, value.as_bytes())
                        .map_err(&err)?;
                    match previous {
                        Some(previous) => String::from_utf8_lossy(previous.value()).into(),
                        None => Arc::from(""),
                    }
                };
                self.meta.insert(encoded, meta.as_slice()).map_err(&err)?;
                events.push(Event::Put(Record {
                    key: key.clone(),
                    value,
                    revision,
                    refreshed_at_ms,
                }));
                Ok(Ok(PutOutcome::Updated { revision, previous }))
            }
            Existing::Missing => {
                let namespace = namespace_key(key);
                let count = match self.counts.get(namespace.as_slice()).map_err(&err)? {
                    Some(g) => match decode_u64(g.value(), self.file, "a namespace count") {
                        Ok(count) => count,
                        Err(e) => return Ok(Err(e)),
                    },
                    None => 0,
                };
                if usize::try_from(count).unwrap_or(usize::MAX) >= self.max_records_per_namespace {
                    return Ok(Err(Error::NamespaceFull {
                        namespace: key.namespace.clone(),
                        limit: self.max_records_per_namespace,
                    }));
                }
                self.counts
                    .insert(namespace.as_slice(), (count + 1).to_le_bytes().as_slice())
                    .map_err(&err)?;
                self.values
                    .insert(encoded, value.as_bytes())
                    .map_err(&err)?;
                self.meta.insert(encoded, meta.as_slice()).map_err(&err)?;
                events.push(Event::Put(Record {
                    key: key.clone(),
                    value,
                    revision,
                    refreshed_at_ms,
                }));
                Ok(Ok(PutOutcome::Created { revision }))
            }
        }
    }

    /// Deletes one record at `revision` when `if_revision` allows. Errors as for
    /// [`Tables::put`].
    fn delete(
        &mut self,
        key: &Key,
        encoded: &[u8],
        if_revision: Option<u64>,
        revision: u64,
        events: &mut Vec<Event>,
    ) -> Result<Result<bool>> {
        let file = self.file;
        let err = move |e: redb::StorageError| storage(file, "writing", e.into());
        let current = match self.meta.get(encoded).map_err(&err)? {
            None => return Ok(Ok(false)),
            Some(lease) => match decode_meta(lease.value(), key, self.file) {
                Ok((current, _)) => current,
                // A damaged lease still allows an unconditional delete.
                Err(e) if if_revision.is_some() => return Ok(Err(e)),
                Err(_) => 0,
            },
        };
        if if_revision.is_some_and(|r| r != current) {
            return Ok(Ok(false));
        }
        {
            let mut index = self.index.write();
            if let Some(entry) = index.records.get_mut(key) {
                // A refresh kept in memory leaves the revision as it was: the lease itself
                // says whether the sweeper's delete still stands.
                if if_revision.is_some()
                    && self
                        .checkpoints
                        .is_some_and(|c| c.live(entry.refreshed_at_ms, self.now_ms))
                {
                    return Ok(Ok(false));
                }
                entry.deleting = true;
            }
        }
        self.meta.remove(encoded).map_err(&err)?;
        self.values.remove(encoded).map_err(&err)?;
        let namespace = namespace_key(key);
        let count = match self.counts.get(namespace.as_slice()).map_err(&err)? {
            // A damaged count is rebuilt as best it can be: it only caps creation.
            Some(g) => decode_u64(g.value(), self.file, "a namespace count").unwrap_or(1),
            None => 1,
        };
        if count <= 1 {
            self.counts.remove(namespace.as_slice()).map_err(&err)?;
        } else {
            self.counts
                .insert(namespace.as_slice(), (count - 1).to_le_bytes().as_slice())
                .map_err(&err)?;
        }
        events.push(Event::Delete {
            key: key.clone(),
            revision,
        });
        Ok(Ok(true))
    }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn put(&self, key: &Key, value: &str, now: SystemTime) -> Result<PutOutcome> {
        let refreshed_at_ms = epoch_ms(now);
        if let Some(refreshed) = self.inner.refresh_in_memory(key, value, refreshed_at_ms) {
            return Ok(refreshed);
        }
        let encoded = encode_key(key)?;
        let (reply, answer) = oneshot::channel();
        self.send(Op::Put {
            key: key.clone(),
            encoded,
            value: Arc::from(value),
            refreshed_at_ms,
            reply,
        })?;
        answer
            .await
            .map_err(|_| Error::Unavailable("the store writer stopped".into()))?
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>> {
        // One point lookup: a few microseconds in redb's page cache, less than the hand-off
        // to the blocking pool would cost, so it runs in place.
        self.inner.get(key)
    }

    async fn delete(&self, key: &Key, if_revision: Option<u64>) -> Result<bool> {
        let Ok(encoded) = encode_key(key) else {
            // Such a key cannot have been stored.
            return Ok(false);
        };
        let (reply, answer) = oneshot::channel();
        self.send(Op::Delete {
            key: key.clone(),
            encoded,
            if_revision,
            reply,
        })?;
        answer
            .await
            .map_err(|_| Error::Unavailable("the store writer stopped".into()))?
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<Record>> {
        let query = query.clone();
        let (records, _) = self.read(move |inner| inner.list(&query)).await?;
        Ok(records)
    }

    fn watch(&self) -> BoxStream<'static, Event> {
        super::follow(Arc::downgrade(&self.inner))
    }

    async fn ready(&self) -> Result<()> {
        self.read(Inner::ready).await
    }

    fn backend(&self) -> &'static str {
        "embedded"
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use std::time::{Duration, Instant, UNIX_EPOCH};

    use super::*;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    /// The conformance suite on stores opened with `lease_ttl`, each in its own directory.
    async fn conformance_with(lease_ttl: Option<Duration>) {
        let dir = tempfile::tempdir().unwrap();
        let n = AtomicU64::new(0);
        super::super::conformance::run(|| {
            let path = dir
                .path()
                .join(n.fetch_add(1, Ordering::Relaxed).to_string());
            let options = Options {
                max_records_per_namespace: usize::MAX,
                lease_ttl,
            };
            async move { EmbeddedStore::open_with(&path, options).unwrap() }
        })
        .await;
    }

    #[tokio::test]
    async fn conformance() {
        conformance_with(None).await;
    }

    #[tokio::test]
    async fn conformance_with_leases_kept_in_memory() {
        conformance_with(Some(Duration::from_secs(3_600))).await;
    }

    fn leased(path: &Path, ttl: Duration) -> EmbeddedStore {
        EmbeddedStore::open_with(
            path,
            Options {
                max_records_per_namespace: usize::MAX,
                lease_ttl: Some(ttl),
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn refreshes_stay_in_memory_until_the_stamp_on_disk_is_half_a_ttl_old() {
        let dir = tempfile::tempdir().unwrap();
        let store = leased(dir.path(), Duration::from_secs(10));
        let key = Key::metadata("ns", "app", "r");
        let mut watch = store.watch();
        assert!(matches!(watch.next().await, Some(Event::Reset { .. })));
        let created = store.put(&key, "v", at(100_000)).await.unwrap();
        assert!(matches!(watch.next().await, Some(Event::Put(_))));
        let commits = store.n_commits();

        // Up to 5 s after the stamp on disk: memory only, at the same revision, and every
        // reader sees the new stamp.
        for (t, stamp) in [(101_000, 101_000), (104_999, 104_999), (103_000, 104_999)] {
            let refreshed = store.put(&key, "v", at(t)).await.unwrap();
            assert_eq!(
                refreshed,
                PutOutcome::Refreshed {
                    revision: created.revision()
                }
            );
            assert_eq!(
                watch.next().await,
                Some(Event::Refreshed {
                    key: key.clone(),
                    revision: created.revision(),
                    refreshed_at_ms: stamp,
                })
            );
        }
        assert_eq!(store.n_commits(), commits, "nothing written");
        assert_eq!(
            store.get(&key).await.unwrap().unwrap().refreshed_at_ms,
            104_999,
            "a refresh never moves the stamp back"
        );
        let listed = store.list(&ListQuery::all(Kind::Metadata)).await.unwrap();
        assert_eq!(listed[0].refreshed_at_ms, 104_999);
        let mut late = store.watch();
        let Some(Event::Reset { records, .. }) = late.next().await else {
            panic!("a watch starts with a reset");
        };
        assert_eq!(records[0].refreshed_at_ms, 104_999);

        // From 5 s on: a checkpoint, a commit and a new revision.
        let checkpoint = store.put(&key, "v", at(105_000)).await.unwrap();
        assert!(checkpoint.revision() > created.revision());
        assert_eq!(store.n_commits(), commits + 1);
        store.put(&key, "v", at(109_999)).await.unwrap();
        assert_eq!(store.n_commits(), commits + 1, "in memory again");
        // A changed value is always written.
        store.put(&key, "w", at(110_000)).await.unwrap();
        assert_eq!(store.n_commits(), commits + 2);
    }

    #[tokio::test]
    async fn reopening_moves_each_stamp_to_the_last_refresh_it_may_have_missed() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_secs(600);
        let now = SystemTime::now();
        let old = Key::metadata("ns", "old", "r");
        let fresh = Key::metadata("ns", "fresh", "r");
        {
            let store = leased(dir.path(), ttl);
            store.put(&old, "v", now - ttl).await.unwrap();
            store
                .put(&fresh, "v", now - Duration::from_secs(10))
                .await
                .unwrap();
            // Kept in memory: the file still says 10 s ago.
            store
                .put(&fresh, "v", now - Duration::from_secs(5))
                .await
                .unwrap();
        }
        let store = leased(dir.path(), ttl);
        let stamp = |record: Option<Record>| record.unwrap().refreshed_at_ms;
        // Half a TTL after the stamp on disk, for a record stamped long ago.
        assert_eq!(
            stamp(store.get(&old).await.unwrap()),
            epoch_ms(now - ttl / 2)
        );
        // No later than the opening, for a recent one: at or after the refresh it missed.
        let fresh_stamp = stamp(store.get(&fresh).await.unwrap());
        assert!(fresh_stamp >= epoch_ms(now - Duration::from_secs(5)));
        assert!(fresh_stamp <= epoch_ms(SystemTime::now()));
        // Opened without a lease TTL, the file's stamps are taken as they are.
        drop(store);
        let plain = EmbeddedStore::open(dir.path(), usize::MAX).unwrap();
        assert_eq!(
            stamp(plain.get(&fresh).await.unwrap()),
            epoch_ms(now - Duration::from_secs(10))
        );
    }

    #[tokio::test]
    async fn the_sweepers_delete_spares_a_lease_refreshed_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_secs(60);
        let store = leased(dir.path(), ttl);
        let now = SystemTime::now();
        let key = Key::metadata("ns", "app", "r");
        // Stamped 50 s ago on disk (its lease ends in 10 s), refreshed in memory 20 s later.
        let revision = store
            .put(&key, "v", now - Duration::from_secs(50))
            .await
            .unwrap()
            .revision();
        let refreshed = store
            .put(&key, "v", now - Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(refreshed.revision(), revision);
        // The same revision, but the lease still runs: refused.
        assert!(!store.delete(&key, Some(revision)).await.unwrap());
        assert!(store.get(&key).await.unwrap().is_some());
        // An expired lease at that revision goes; so does any record on an unconditional
        // delete.
        let gone = Key::metadata("ns", "gone", "r");
        let revision = store
            .put(&gone, "v", now - Duration::from_secs(61))
            .await
            .unwrap()
            .revision();
        assert!(store.delete(&gone, Some(revision)).await.unwrap());
        assert!(store.delete(&key, None).await.unwrap());
        // A refresh after the delete creates the record anew.
        assert!(matches!(
            store.put(&key, "v", now).await.unwrap(),
            PutOutcome::Created { .. }
        ));
    }

    #[tokio::test]
    async fn survives_reopen_and_revision_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let a = Key::metadata("ns", "app", "r1");
        let b = Key::definition("ns", "org.example.Svc");
        let (rev_a, last) = {
            let store = EmbeddedStore::open(dir.path(), usize::MAX).unwrap();
            let rev_a = store
                .put(&a, "value a", at(1_000))
                .await
                .unwrap()
                .revision();
            store.put(&b, "value b", at(2_000)).await.unwrap();
            let gone = Key::metadata("ns", "gone", "r");
            store.put(&gone, "x", at(1)).await.unwrap();
            let last = store.delete(&gone, None).await.unwrap();
            assert!(last);
            (
                rev_a,
                store.list(&ListQuery::all(Kind::Metadata)).await.unwrap(),
            )
        };
        assert_eq!(last.len(), 1);

        let store = EmbeddedStore::open(dir.path(), usize::MAX).unwrap();
        let record = store.get(&a).await.unwrap().unwrap();
        assert_eq!(&*record.value, "value a");
        assert_eq!(record.revision, rev_a);
        assert_eq!(record.refreshed_at_ms, 1_000);
        assert_eq!(&*store.get(&b).await.unwrap().unwrap().value, "value b");
        assert!(
            store
                .get(&Key::metadata("ns", "gone", "r"))
                .await
                .unwrap()
                .is_none()
        );

        // The reset is at the revision of the delete (4), and new writes go past it.
        let mut watch = store.watch();
        let Some(Event::Reset { records, revision }) = watch.next().await else {
            panic!("first event must be a reset");
        };
        assert_eq!(records.len(), 2);
        assert_eq!(revision, 4);
        let next = store.put(&a, "value a2", at(3_000)).await.unwrap();
        assert_eq!(next.revision(), 5);
        drop(watch);
        drop(store);

        let store = EmbeddedStore::open(dir.path(), usize::MAX).unwrap();
        let refreshed = store.put(&a, "value a2", at(4_000)).await.unwrap();
        assert_eq!(refreshed, PutOutcome::Refreshed { revision: 6 });
    }

    #[tokio::test]
    async fn namespace_count_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path(), 2).unwrap();
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
            // Other namespaces and kinds have their own count; refreshes and updates are
            // not creations.
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
        }
        let store = EmbeddedStore::open(dir.path(), 2).unwrap();
        let full = store.put(&Key::metadata("ns", "a", "3"), "v", at(1)).await;
        assert!(matches!(full, Err(Error::NamespaceFull { .. })), "{full:?}");
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_puts_share_commits() {
        const N: usize = 200;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), usize::MAX).unwrap();

        // One at a time: one commit (and fsync) each.
        let started = Instant::now();
        for i in 0..N {
            let key = Key::metadata("seq", &format!("app{i}"), "r");
            store.put(&key, &format!("value {i}"), at(1)).await.unwrap();
        }
        let sequential = started.elapsed();
        assert_eq!(store.n_commits(), N as u64);

        // All at once: they share commits.
        let started = Instant::now();
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let key = Key::metadata("ns", &format!("app{i}"), "r");
                    store.put(&key, &format!("value {i}"), at(1)).await.unwrap()
                })
            })
            .collect();
        let mut revisions = Vec::new();
        for task in tasks {
            let outcome = task.await.unwrap();
            assert!(matches!(outcome, PutOutcome::Created { .. }), "{outcome:?}");
            revisions.push(outcome.revision());
        }
        let concurrent = started.elapsed();
        let commits = store.n_commits() - N as u64;
        eprintln!(
            "{N} puts: one at a time {sequential:?} ({N} commits), concurrently {concurrent:?} \
             ({commits} commits)"
        );
        assert!(
            commits < N as u64,
            "{commits} commits for {N} concurrent puts"
        );
        revisions.sort_unstable();
        revisions.dedup();
        assert_eq!(revisions.len(), N);
        // Consecutive revisions after the sequential ones.
        assert_eq!(revisions.first(), Some(&(N as u64 + 1)));
        assert_eq!(revisions.last(), Some(&(2 * N as u64)));
        let listed = store
            .list(&ListQuery {
                namespace: Some("ns".into()),
                ..ListQuery::all(Kind::Metadata)
            })
            .await
            .unwrap();
        assert_eq!(listed.len(), N);
    }

    #[tokio::test]
    async fn garbage_file_is_a_storage_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(FILE_NAME);
        std::fs::write(&file, vec![0xA5; 64 * 1024]).unwrap();
        match EmbeddedStore::open(dir.path(), usize::MAX) {
            Err(Error::Storage(message)) => {
                assert!(message.contains(&file.display().to_string()), "{message}");
            }
            other => panic!("expected a storage error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn truncated_file_is_a_storage_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path(), usize::MAX).unwrap();
            for i in 0..100 {
                let key = Key::metadata("ns", &format!("app{i}"), "r");
                store.put(&key, &"x".repeat(10_000), at(1)).await.unwrap();
            }
        }
        let file = dir.path().join(FILE_NAME);
        let len = std::fs::metadata(&file).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.set_len(len / 2).unwrap();
        drop(f);
        match EmbeddedStore::open(dir.path(), usize::MAX) {
            Err(Error::Storage(message)) => {
                assert!(message.contains(&file.display().to_string()), "{message}");
            }
            other => panic!("expected a storage error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn damaged_pages_are_a_storage_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path(), usize::MAX).unwrap();
            for i in 0..100 {
                let key = Key::metadata("ns", &format!("app{i}"), "r");
                store.put(&key, &"x".repeat(10_000), at(1)).await.unwrap();
            }
        }
        let file = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&file).unwrap();
        // Scribble over every page past the header; the checksums catch it.
        for page in bytes.chunks_mut(4096).skip(1) {
            page[100..200].fill(0x5A);
        }
        std::fs::write(&file, bytes).unwrap();
        match EmbeddedStore::open(dir.path(), usize::MAX) {
            Err(Error::Storage(message)) => {
                assert!(message.contains(&file.display().to_string()), "{message}");
            }
            other => panic!("expected a storage error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn data_directory_that_is_a_file_is_a_storage_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-dir");
        std::fs::write(&path, "x").unwrap();
        let error = EmbeddedStore::open(&path, usize::MAX).unwrap_err();
        assert!(
            matches!(&error, Error::Storage(m) if m.contains(&path.display().to_string())),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn refresh_writes_only_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), usize::MAX).unwrap();
        let key = Key::metadata("ns", "app", "r");
        let value = "v".repeat(100_000);
        let created = store.put(&key, &value, at(1)).await.unwrap();

        // The value row as stored.
        let raw_value = |store: &EmbeddedStore| {
            let txn = store.inner.db.begin_read().unwrap();
            let values = txn.open_table(VALUES).unwrap();
            let encoded = encode_key(&key).unwrap();
            values
                .get(encoded.as_slice())
                .unwrap()
                .unwrap()
                .value()
                .to_vec()
        };
        let before = raw_value(&store);
        let refreshed = store.put(&key, &value, at(2)).await.unwrap();
        assert_eq!(
            refreshed,
            PutOutcome::Refreshed {
                revision: created.revision() + 1
            }
        );
        assert_eq!(raw_value(&store), before);
        let record = store.get(&key).await.unwrap().unwrap();
        assert_eq!(record.revision, refreshed.revision());
        assert_eq!(record.refreshed_at_ms, 2);

        // A refresh touches far fewer bytes than a rewrite of the value would: the file does
        // not grow by the value's size per refresh.
        let file_len = || std::fs::metadata(store.file()).unwrap().len();
        let len_before = file_len();
        for i in 0..20 {
            store.put(&key, &value, at(3 + i)).await.unwrap();
        }
        assert!(file_len() < len_before + 20 * value.len() as u64 / 2);
    }

    #[tokio::test]
    async fn watch_ends_when_the_store_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), usize::MAX).unwrap();
        let mut watch = store.watch();
        assert!(matches!(watch.next().await, Some(Event::Reset { .. })));
        drop(store);
        let end = tokio::time::timeout(Duration::from_secs(10), watch.next()).await;
        assert!(matches!(end, Ok(None)), "{end:?}");
        // And the file is free again.
        EmbeddedStore::open(dir.path(), usize::MAX).unwrap();
    }

    #[tokio::test]
    async fn watch_resets_after_lagging() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), usize::MAX).unwrap();
        let mut watch = store.watch();
        assert!(matches!(watch.next().await, Some(Event::Reset { .. })));
        let key = Key::metadata("ns", "app", "r");
        // More events than the buffer holds, in few commits.
        let tasks: Vec<_> = (0..WATCH_BUFFER as u64 + 10)
            .map(|i| {
                let store = store.clone();
                let key = key.clone();
                tokio::spawn(async move { store.put(&key, "v", at(i)).await.unwrap() })
            })
            .collect();
        let mut last = 0;
        for task in tasks {
            last = last.max(task.await.unwrap().revision());
        }
        match watch.next().await {
            Some(Event::Reset { records, revision }) => {
                assert_eq!(revision, last);
                assert_eq!(records.len(), 1);
            }
            other => panic!("expected a reset, got {other:?}"),
        }
        store.delete(&key, None).await.unwrap();
        assert!(matches!(watch.next().await, Some(Event::Delete { .. })));
    }

    #[tokio::test]
    async fn ready_and_backend() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), usize::MAX).unwrap();
        store.ready().await.unwrap();
        assert_eq!(store.backend(), "embedded");
    }

    #[test]
    fn keys_sort_by_kind_namespace_name() {
        let keys = [
            Key::metadata("a", "b", "c"),
            Key::metadata("a", "b", "c\u{1}"),
            Key::metadata("a-b", "a", "a"),
            Key::metadata("ab", "a", "a"),
            Key::definition("a", "z"),
            Key::definition("a", "zz"),
        ];
        let file = Path::new("test");
        for pair in keys.windows(2) {
            let (x, y) = (encode_key(&pair[0]).unwrap(), encode_key(&pair[1]).unwrap());
            if pair[0].kind == pair[1].kind {
                assert_eq!(
                    x.cmp(&y),
                    pair[0].cmp(&pair[1]),
                    "{} vs {}",
                    pair[0],
                    pair[1]
                );
            }
            assert_eq!(decode_key(&x, file).unwrap(), pair[0]);
        }
        assert!(matches!(
            decode_key(b"nonsense", file),
            Err(Error::Storage(_))
        ));
    }
}
