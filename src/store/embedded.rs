//! The embedded durable store, the default backend: a write-ahead journal in front of one
//! redb data file under the data directory.
//!
//! # Layout
//!
//! `pixiu-metadata.redb` holds the store as of the last checkpoint. Every table is keyed and
//! valued by raw bytes, decoded here, so a damaged row is an [`Error::Storage`] rather than a
//! panic inside redb's typed decoding.
//!
//! - `values`: record key → the raw value, exactly as published.
//! - `meta`: record key → `revision` and `refreshed_at_ms` (two little-endian `u64`).
//! - `state`: `revision` → the revision the data file is checkpointed at, and `format` → the
//!   layout version (2; a version 1 file, which kept namespace counts in a `counts` table, is
//!   upgraded on opening: the counts are now counted when the store opens).
//!
//! `journal-<generation>.log` files hold what was committed since: one frame per batch (see
//! [`super::journal`]).
//!
//! A record key is `kind label 0x00 namespace 0x00 name`: it sorts by `(kind, namespace, name)`
//! because namespaces hold neither NUL nor `/` and `0x00` sorts before every other byte.
//!
//! # Writes: group commit into the journal
//!
//! Every write goes to one writer thread through a channel. The thread takes everything
//! queued (up to [`MAX_BATCH_OPS`] operations or [`MAX_BATCH_BYTES`] of values), decides each
//! operation against the in-memory index (and the batch's earlier operations) with
//! consecutive revisions, appends the batch to the journal as one frame and waits for its
//! `fdatasync`, then publishes the events in revision order and answers every caller.
//! Concurrent publishers therefore share one fsync of a sequential append, and a write is
//! acknowledged only once it is durable.
//!
//! # Checkpoints
//!
//! Every [`CheckpointPolicy::interval`] (or once the journal file reaches
//! [`CheckpointPolicy::bytes`]) the writer moves on to a new journal file and hands the
//! changes of the old one, the latest per key, to a checkpoint thread, which writes them into
//! the data file in one redb transaction and then removes the old journal file. A key
//! rewritten many times between checkpoints is written there once, and none of it is on the
//! path of an acknowledgement. A failing checkpoint is retried (the journal keeps its
//! changes); no later one starts before it succeeds. Closing the store checkpoints what is
//! left; opening replays every journal file after the data file's revision into it (a frame a
//! crash cut short, never acknowledged, is dropped; damage elsewhere is an error).
//!
//! # Lease refreshes in memory
//!
//! Opened with a lease TTL ([`Options::lease_ttl`], what `serve` does), a publish of an
//! unchanged record whose stamp on disk is less than half a TTL old is answered from memory:
//! the index's stamp moves forward, an [`Event::Refreshed`] goes out at the record's current
//! revision, and nothing is written. Other refreshes go through the writer and journal the
//! stamp. On opening, stamps are recovered as [`checkpoint`](super::checkpoint) explains, so a
//! crash breaks no acknowledged refresh's promise. A refresh kept in memory does not change
//! the record's revision; the sweeper's conditional delete therefore also refuses a record
//! whose lease still runs in memory, and a record the writer is deleting is marked so no
//! refresh is answered from memory until the delete is through (it is queued behind it and
//! creates the record anew).
//!
//! # Reads and watches
//!
//! `get` and `list` answer from an in-memory index of every record's value and lease (the
//! values are the same `Arc`s the events carry, so the index costs a key and a few words per
//! record), loaded when the store opens and updated by the writer after each commit and
//! before any caller hears back, so a reader sees its own acknowledged writes; the data file
//! is read only on opening. The snapshot
//! behind [`Event::Reset`] is the index itself: the writer updates it and publishes the
//! batch's events under its write lock, a watcher subscribes and copies it under the read
//! lock, so no change is missed or seen twice. None involves the writer.

use std::{
    collections::HashMap,
    fmt,
    fs::{File, OpenOptions},
    io::{Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use futures::stream::BoxStream;
use parking_lot::{Mutex, RwLock};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, oneshot};

use super::{
    ByNamespace, Error, Event, Key, Kind, ListQuery, PutOutcome, Record, Result, Store,
    WATCH_BUFFER, checkpoint::Checkpoints, epoch_ms, journal, ordered::OrderedNames,
    sharded::ShardedMap,
};

/// The data file's name inside the data directory.
pub const FILE_NAME: &str = "pixiu-metadata.redb";

/// Most operations in one batch (one journal frame, one fdatasync).
pub const MAX_BATCH_OPS: usize = 1024;

/// Once a batch holds this many bytes of values, the writer stops adding to it (64 MiB).
pub const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;

/// The cache redb may fill with pages.
const CACHE_BYTES: usize = 256 * 1024 * 1024;

/// The layout version written to the `state` table. Version 1 had no journal and kept
/// namespace counts in a table of their own; it is upgraded on opening.
const FORMAT_VERSION: u64 = 2;

const VALUES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("values");
const META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("meta");
const COUNTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("counts");
const STATE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("state");

const STATE_REVISION: &[u8] = b"revision";
const STATE_FORMAT: &[u8] = b"format";

/// The embedded durable [`Store`]: a write-ahead journal, checkpointed into redb.
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
    /// Sharded: one hash table that outgrows itself rehashes every record at once under the
    /// write lock, and every read and write waits (see [`ShardedMap`]).
    records: ShardedMap<Key, Indexed>,
    /// The same keys in order by namespace and kind, so a page of `list` reads a range
    /// instead of every record; also each namespace's record count.
    names: OrderedNames,
    revision: u64,
}

impl Index {
    /// Stores `entry` under `key`, a new key in both maps.
    fn put(&mut self, key: &Key, entry: Indexed) {
        if let Some(slot) = self.records.get_mut(key) {
            *slot = entry;
            return;
        }
        self.records.insert(key.clone(), entry);
        self.names.insert(key);
    }

    /// Forgets `key`.
    fn remove(&mut self, key: &Key) {
        if self.records.remove(key).is_some() {
            self.names.remove(key);
        }
    }

    /// The records `query` selects, in key order.
    fn list(&self, query: &ListQuery) -> Vec<Record> {
        self.names
            .select(query)
            .into_iter()
            .filter_map(|key| Some(self.records.get(&key)?.record(key)))
            .collect()
    }
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
    fn record(&self, key: Key) -> Record {
        Record {
            key,
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
    /// When the journal is checkpointed into the data file.
    pub checkpoint: CheckpointPolicy,
}

struct Inner {
    data: Arc<DataFile>,
    index: Arc<RwLock<Index>>,
    checkpoints: Option<Checkpoints>,
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
            .field("file", &self.inner.data.path)
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
            tracing::error!(file = %self.data.path.display(), "store writer thread panicked");
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
                checkpoint: CheckpointPolicy::default(),
            },
        )
    }

    /// [`EmbeddedStore::open`] with every option.
    pub fn open_with(path: &Path, options: Options) -> Result<Self> {
        Self::open_data_with(path, options, open_database)
    }

    /// [`Self::open_with`], opening the data file with `open` (here and whenever the
    /// checkpointer opens it again).
    fn open_data_with(path: &Path, options: Options, open: OpenData) -> Result<Self> {
        let Options {
            max_records_per_namespace,
            lease_ttl,
            checkpoint,
        } = options;
        std::fs::create_dir_all(path).map_err(|e| {
            Error::Storage(format!("creating data directory {}: {e}", path.display()))
        })?;
        let file = path.join(FILE_NAME);
        let db = open(&file)?;
        init(&db, &file)?;
        let (records, revision, generation) = recover(&db, &file, path)?;
        let checkpoints = lease_ttl.map(Checkpoints::new);
        let open_ms = epoch_ms(SystemTime::now());
        let mut index = Index {
            revision,
            ..Index::default()
        };
        for r in records {
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
            index.put(&r.key, entry);
        }
        let index = Arc::new(RwLock::new(index));
        let data = Arc::new(DataFile {
            path: file.clone(),
            db: RwLock::new(Some(db)),
            open,
        });
        let journal = Journal::create(path, generation)?;
        let checkpointer = Checkpointer::spawn(data.clone(), path.to_path_buf())?;

        let (ops, rx) = mpsc::channel();
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let n_commits = Arc::new(AtomicU64::new(0));
        let last_commit_error = Arc::new(Mutex::new(None));
        let writer = Writer {
            index: index.clone(),
            checkpoints,
            rx,
            events: events.clone(),
            n_commits: n_commits.clone(),
            last_commit_error: last_commit_error.clone(),
            max_records_per_namespace,
            journal,
            pending: HashMap::new(),
            pending_revision: revision,
            last_checkpoint: Instant::now(),
            policy: checkpoint,
            checkpointer,
        };
        let writer = thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| Error::Storage(format!("starting the store writer thread: {e}")))?;
        tracing::info!(file = %file.display(), "embedded store open");
        Ok(Self {
            inner: Arc::new(Inner {
                data,
                index,
                checkpoints,
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
        &self.inner.data.path
    }

    /// How many batches (journal frames) the writer made durable since the store was opened.
    /// Fewer than the writes when concurrent writes shared commits.
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
                    Error::Storage(format!(
                        "reading {} panicked",
                        self.inner.data.path.display()
                    ))
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
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))) => {
            Err(Error::Storage(format!(
                "opening {}: {e} (check that the data directory is writable by this user and \
                 its file system is mounted read-write and has room)",
                file.display()
            )))
        }
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

/// How the data file is opened: [`open_database`], or a faulty one in tests.
type OpenData = fn(&Path) -> Result<Database>;

/// The redb data file, shared by the checkpointer (which writes it) and readiness checks.
///
/// After a failed write (a full disk) redb refuses every later transaction of the same
/// [`Database`] ("previous I/O error"), so the checkpointer closes the file and opens it
/// again before it retries; meanwhile the file reads as unavailable.
struct DataFile {
    path: PathBuf,
    db: RwLock<Option<Database>>,
    open: OpenData,
}

impl DataFile {
    /// Runs `f` on the open database.
    fn with<T>(&self, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        match &*self.db.read() {
            Some(db) => f(db),
            None => Err(Error::Unavailable(format!(
                "{} is being opened again after a failed write",
                self.path.display()
            ))),
        }
    }

    /// Closes the database and opens it again; on failure it stays closed until the next
    /// attempt.
    fn reopen(&self) {
        let mut db = self.db.write();
        // Closed first: redb holds a lock on the file while open.
        *db = None;
        match (self.open)(&self.path) {
            Ok(opened) => {
                *db = Some(opened);
                tracing::info!(file = %self.path.display(), "data file opened again");
            }
            Err(error) => {
                tracing::error!(%error, "cannot open the data file again; retrying");
            }
        }
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
            Some(1) => {
                // The counts are now counted on opening.
                txn.delete_table(COUNTS).map_err(|e| err(e.into()))?;
                state
                    .insert(STATE_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())
                    .map_err(|e| err(e.into()))?;
                tracing::info!(file = %file.display(), "data file upgraded to layout version {FORMAT_VERSION}");
            }
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
        move |e| storage(&self.data.path, doing, e)
    }

    fn get(&self, key: &Key) -> Result<Option<Record>> {
        Ok(self
            .index
            .read()
            .records
            .get(key)
            .map(|entry| entry.record(key.clone())))
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

    /// The records `query` selects, in key order, from the index.
    fn list(&self, query: &ListQuery) -> Vec<Record> {
        self.index.read().list(query)
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
        self.data.with(|db| {
            let txn = db.begin_read().map_err(|e| err(e.into()))?;
            let state = txn.open_table(STATE).map_err(|e| err(e.into()))?;
            state.get(STATE_REVISION).map_err(|e| err(e.into()))?;
            Ok(())
        })
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
            .map(|(key, entry)| entry.record(key.clone()))
            .collect();
        let revision = index.revision;
        drop(index);
        // In `Kind` order, then by namespace and name, as `list` and the other stores give
        // them.
        records.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        (Event::Reset { records, revision }, rx)
    }
}

/// The store as the data file and the journal files after it hold it: every record, the
/// store revision, and the generation for the next journal file. Journaled changes are
/// checkpointed into the data file and their files removed before the store opens, so a
/// store opens with one fresh journal file.
fn recover(db: &Database, file: &Path, dir: &Path) -> Result<(Vec<Record>, u64, u64)> {
    let (records, stored_revision) = read_all(db, file)?;
    let mut journals = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| io_error("reading", dir, &e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("reading", dir, &e))?;
        if let Some(generation) = entry.file_name().to_str().and_then(journal::generation) {
            journals.push((generation, entry.path()));
        }
    }
    journals.sort();
    let next_generation = journals.last().map_or(1, |(g, _)| g + 1);
    if journals.is_empty() {
        return Ok((records, stored_revision, next_generation));
    }

    let mut by_key: HashMap<Vec<u8>, Record> = HashMap::with_capacity(records.len());
    for record in records {
        by_key.insert(encode_key(&record.key)?, record);
    }
    let mut revision = stored_revision;
    let mut changes: HashMap<Vec<u8>, Pending> = HashMap::new();
    for (_, path) in &journals {
        let bytes = std::fs::read(path).map_err(|e| io_error("reading", path, &e))?;
        let read = journal::read(&bytes).map_err(|damage| {
            Error::Storage(format!(
                "{}: {damage} (the journal is damaged; restore the data directory from a \
                 backup or move it away to start empty)",
                path.display()
            ))
        })?;
        if read.torn > 0 {
            tracing::warn!(file = %path.display(), bytes = read.torn, "dropping the journal's unfinished last write");
        }
        for entry in read.entries {
            // The data file already holds what a checkpoint finished before a crash.
            if entry.revision() <= stored_revision {
                continue;
            }
            revision = revision.max(entry.revision());
            match entry {
                journal::Entry::Put {
                    key,
                    revision,
                    refreshed_at_ms,
                    value,
                } => {
                    let decoded = decode_key(&key, path)?;
                    let value = decode_value(&value, &decoded, path)?;
                    changes.insert(
                        key.clone(),
                        Pending::Put {
                            value: value.clone(),
                            revision,
                            refreshed_at_ms,
                        },
                    );
                    by_key.insert(
                        key,
                        Record {
                            key: decoded,
                            value,
                            revision,
                            refreshed_at_ms,
                        },
                    );
                }
                journal::Entry::Lease {
                    key,
                    revision,
                    refreshed_at_ms,
                } => {
                    if let Some(record) = by_key.get_mut(&key) {
                        record.revision = revision;
                        record.refreshed_at_ms = refreshed_at_ms;
                        let lease = Pending::Lease {
                            revision,
                            refreshed_at_ms,
                        };
                        Pending::record(&mut changes, key, lease);
                    }
                }
                journal::Entry::Delete { key, .. } => {
                    by_key.remove(&key);
                    changes.insert(key, Pending::Delete);
                }
            }
        }
    }
    write_checkpoint(db, file, &changes, revision)?;
    for (_, path) in &journals {
        std::fs::remove_file(path).map_err(|e| io_error("removing", path, &e))?;
    }
    sync_dir(dir)?;
    tracing::info!(
        journals = journals.len(),
        changes = changes.len(),
        revision,
        "journal replayed into the data file"
    );
    let mut records: Vec<Record> = by_key.into_values().collect();
    records.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    Ok((records, revision, next_generation))
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
    index: Arc<RwLock<Index>>,
    checkpoints: Option<Checkpoints>,
    rx: mpsc::Receiver<Op>,
    events: broadcast::Sender<Event>,
    n_commits: Arc<AtomicU64>,
    last_commit_error: Arc<Mutex<Option<String>>>,
    max_records_per_namespace: usize,
    journal: Journal,
    /// Changes journaled since the last checkpoint began, by encoded key, the latest only.
    pending: HashMap<Vec<u8>, Pending>,
    /// The store revision `pending` reaches.
    pending_revision: u64,
    /// When the last checkpoint began (or the store opened).
    last_checkpoint: Instant,
    policy: CheckpointPolicy,
    checkpointer: Checkpointer,
}

/// The latest change of one key since the last checkpoint, for the checkpoint to write.
#[derive(Debug, Clone)]
enum Pending {
    Put {
        value: Arc<str>,
        revision: u64,
        refreshed_at_ms: u64,
    },
    Lease {
        revision: u64,
        refreshed_at_ms: u64,
    },
    Delete,
}

impl Pending {
    /// Records `change` of `key` after what `changes` holds for it.
    fn record(changes: &mut HashMap<Vec<u8>, Pending>, key: Vec<u8>, change: Pending) {
        let change = match changes.remove(&key) {
            Some(before) => before.then(change),
            None => change,
        };
        changes.insert(key, change);
    }

    /// `self` followed by `next`: what the checkpoint writes for both.
    fn then(self, next: Pending) -> Pending {
        match (self, next) {
            (
                Pending::Put { value, .. },
                Pending::Lease {
                    revision,
                    refreshed_at_ms,
                },
            ) => Pending::Put {
                value,
                revision,
                refreshed_at_ms,
            },
            (_, next) => next,
        }
    }
}

/// One change of a batch, decided and not yet durable.
struct Staged {
    encoded: Vec<u8>,
    revision: u64,
    change: Pending,
}

impl Staged {
    fn entry(&self) -> journal::EntryRef<'_> {
        let key = self.encoded.as_slice();
        let revision = self.revision;
        match &self.change {
            Pending::Put {
                value,
                refreshed_at_ms,
                ..
            } => journal::Entry::Put {
                key,
                revision,
                refreshed_at_ms: *refreshed_at_ms,
                value: value.as_bytes(),
            },
            Pending::Lease {
                refreshed_at_ms, ..
            } => journal::Entry::Lease {
                key,
                revision,
                refreshed_at_ms: *refreshed_at_ms,
            },
            Pending::Delete => journal::Entry::Delete { key, revision },
        }
    }
}

/// A key's state as a batch sees it: the index, then the batch's own earlier changes.
struct Overlay<'a> {
    index: &'a RwLock<Index>,
    /// `None`: deleted in this batch.
    records: HashMap<Key, Option<(Arc<str>, u64)>>,
    /// This batch's change of each namespace's record count, by kind.
    counts: ByNamespace<[isize; Kind::ALL.len()]>,
}

impl Overlay<'_> {
    fn current(&self, key: &Key) -> Option<(Arc<str>, u64)> {
        match self.records.get(key) {
            Some(state) => state.clone(),
            None => self
                .index
                .read()
                .records
                .get(key)
                .map(|e| (e.value.clone(), e.revision)),
        }
    }

    fn count(&self, key: &Key) -> usize {
        let stored = self.index.read().names.count(key.kind, &key.namespace);
        let delta = self
            .counts
            .get(key.namespace.as_str())
            .map_or(0, |deltas| deltas[key.kind as usize]);
        stored.saturating_add_signed(delta)
    }

    fn add(&mut self, key: &Key, delta: isize) {
        self.counts.entry_ref(key.namespace.as_str()).or_default()[key.kind as usize] += delta;
    }
}

impl Writer {
    /// Applies batches until every sender is gone, checkpointing on the way; then a last
    /// checkpoint, so a clean stop leaves no journal to replay.
    fn run(mut self) {
        loop {
            let first = match self.rx.recv_timeout(self.policy.interval) {
                Ok(op) => op,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.maybe_checkpoint();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
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
            self.maybe_checkpoint();
        }
        self.checkpointer.wait_idle();
        if !self.pending.is_empty() && !self.checkpointer.failed() {
            self.start_checkpoint();
        }
        self.checkpointer.close();
    }

    /// Decides `batch` against the index, appends it to the journal as one frame and makes
    /// it durable, then publishes and answers.
    fn apply(&mut self, batch: Vec<Op>) {
        let n_ops = batch.len();
        let mut done = Vec::with_capacity(n_ops);
        let mut events = Vec::with_capacity(n_ops);
        let mut staged = Vec::with_capacity(n_ops);
        self.decide(batch, &mut done, &mut events, &mut staged);
        let written = if staged.is_empty() {
            Ok(())
        } else {
            let mut frame = Vec::with_capacity(
                staged
                    .iter()
                    .map(|s| s.encoded.len() + value_len(&s.change) + 32)
                    .sum::<usize>()
                    + journal::FRAME_HEADER,
            );
            journal::encode_frame(staged.iter().map(Staged::entry), &mut frame);
            self.journal.append(&frame)
        };
        match written {
            Ok(()) => {
                if !staged.is_empty() {
                    self.n_commits.fetch_add(1, Ordering::Relaxed);
                }
                self.last_commit_error.lock().take();
                tracing::trace!(n_ops, "store batch committed");
                for s in staged {
                    self.pending_revision = self.pending_revision.max(s.revision);
                    Pending::record(&mut self.pending, s.encoded, s.change);
                }
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
            }
        }
    }

    /// Decides every operation of `batch` in order, against the index and the batch's own
    /// earlier operations, with consecutive revisions.
    fn decide(
        &self,
        batch: Vec<Op>,
        done: &mut Vec<Done>,
        events: &mut Vec<Event>,
        staged: &mut Vec<Staged>,
    ) {
        let now_ms = epoch_ms(SystemTime::now());
        let mut overlay = Overlay {
            index: &self.index,
            records: HashMap::new(),
            counts: ByNamespace::default(),
        };
        let mut revision = self.index.read().revision;
        for op in batch {
            match op {
                Op::Put {
                    key,
                    encoded,
                    value,
                    refreshed_at_ms,
                    reply,
                } => {
                    let result = match overlay.current(&key) {
                        None if overlay.count(&key) >= self.max_records_per_namespace => {
                            Err(Error::NamespaceFull {
                                namespace: key.namespace.clone(),
                                limit: self.max_records_per_namespace,
                            })
                        }
                        None => {
                            revision += 1;
                            overlay.add(&key, 1);
                            Ok(PutOutcome::Created { revision })
                        }
                        Some((stored, _)) if *stored == *value => {
                            revision += 1;
                            Ok(PutOutcome::Refreshed { revision })
                        }
                        Some((previous, _)) => {
                            revision += 1;
                            Ok(PutOutcome::Updated { revision, previous })
                        }
                    };
                    if let Ok(outcome) = &result {
                        // A refresh's stored value is this one.
                        overlay
                            .records
                            .insert(key.clone(), Some((value.clone(), revision)));
                        if let PutOutcome::Refreshed { .. } = outcome {
                            events.push(Event::Refreshed {
                                key,
                                revision,
                                refreshed_at_ms,
                            });
                            staged.push(Staged {
                                encoded,
                                revision,
                                change: Pending::Lease {
                                    revision,
                                    refreshed_at_ms,
                                },
                            });
                        } else {
                            events.push(Event::Put(Record {
                                key,
                                value: value.clone(),
                                revision,
                                refreshed_at_ms,
                            }));
                            staged.push(Staged {
                                encoded,
                                revision,
                                change: Pending::Put {
                                    value,
                                    revision,
                                    refreshed_at_ms,
                                },
                            });
                        }
                    }
                    done.push(Done::Put(reply, result));
                }
                Op::Delete {
                    key,
                    encoded,
                    if_revision,
                    reply,
                } => {
                    let deleted = match overlay.current(&key) {
                        None => false,
                        Some((_, current)) if if_revision.is_some_and(|r| r != current) => false,
                        Some(_) => self.mark_deleting(&key, if_revision.is_some(), now_ms),
                    };
                    if deleted {
                        revision += 1;
                        overlay.add(&key, -1);
                        overlay.records.insert(key.clone(), None);
                        events.push(Event::Delete { key, revision });
                        staged.push(Staged {
                            encoded,
                            revision,
                            change: Pending::Delete,
                        });
                    }
                    done.push(Done::Delete(reply, Ok(deleted)));
                }
            }
        }
    }

    /// Marks `key` as being deleted, unless the delete is conditional and the lease still
    /// runs in memory (a refresh kept in memory leaves the revision as it was: the lease
    /// itself says whether the sweeper's delete still stands).
    fn mark_deleting(&self, key: &Key, conditional: bool, now_ms: u64) -> bool {
        let mut index = self.index.write();
        if let Some(entry) = index.records.get_mut(key) {
            if conditional
                && self
                    .checkpoints
                    .is_some_and(|c| c.live(entry.refreshed_at_ms, now_ms))
            {
                return false;
            }
            entry.deleting = true;
        }
        true
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
                Event::Put(record) => index.put(
                    &record.key,
                    Indexed {
                        value: record.value.clone(),
                        revision: record.revision,
                        refreshed_at_ms: record.refreshed_at_ms,
                        stored_at_ms: record.refreshed_at_ms,
                        deleting: false,
                    },
                ),
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
                Event::Delete { key, .. } => index.remove(key),
                // The writer never emits a reset.
                Event::Reset { .. } => {}
            }
            index.revision = index.revision.max(revision);
            // No watcher is fine.
            let _ = self.events.send(event);
        }
    }

    /// Starts a checkpoint when one is due and none is running.
    fn maybe_checkpoint(&mut self) {
        if self.pending.is_empty() || self.checkpointer.busy() {
            return;
        }
        if self.journal.len >= self.policy.bytes
            || self.last_checkpoint.elapsed() >= self.policy.interval
        {
            self.start_checkpoint();
        }
    }

    /// Hands the pending changes to the checkpointer and moves on to a new journal file; the
    /// checkpointer removes the old one once the changes are in the data file.
    fn start_checkpoint(&mut self) {
        let retired = match self.journal.rotate() {
            Ok(retired) => retired,
            Err(error) => {
                tracing::warn!(%error, "cannot start a new journal file; checkpoint postponed");
                self.last_checkpoint = Instant::now();
                return;
            }
        };
        self.last_checkpoint = Instant::now();
        self.checkpointer.start(Checkpoint {
            changes: std::mem::take(&mut self.pending),
            revision: self.pending_revision,
            retire: retired,
        });
    }
}

fn value_len(change: &Pending) -> usize {
    match change {
        Pending::Put { value, .. } => value.len(),
        _ => 0,
    }
}

/// When the writer checkpoints the journal into the data file.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// At the latest this long after the last checkpoint began, once there are changes.
    pub interval: Duration,
    /// Or once the journal file holds this many bytes.
    pub bytes: u64,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            bytes: 64 * 1024 * 1024,
        }
    }
}

/// The journal file being appended to.
struct Journal {
    dir: PathBuf,
    generation: u64,
    file: File,
    /// The bytes of complete frames in it.
    len: u64,
}

impl Journal {
    /// Creates journal file `generation` in `dir`, empty.
    fn create(dir: &Path, generation: u64) -> Result<Self> {
        let path = dir.join(journal::file_name(generation));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_error("creating", &path, &e))?;
        sync_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            generation,
            file,
            len: 0,
        })
    }

    fn path(&self) -> PathBuf {
        self.dir.join(journal::file_name(self.generation))
    }

    /// Appends `frame` and waits until it is durable. On failure the file is cut back to
    /// its complete frames, so the next append starts clean.
    fn append(&mut self, frame: &[u8]) -> Result<()> {
        let written = self
            .file
            .write_all(frame)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += frame.len() as u64;
                Ok(())
            }
            Err(e) => {
                let path = self.path();
                let error = io_error("writing", &path, &e);
                if let Err(e) = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.seek(SeekFrom::Start(self.len)).map(drop))
                {
                    // The frame may stay behind, complete or not; a new file keeps what
                    // follows apart from it.
                    tracing::error!(error = %e, file = %path.display(), "cannot cut the journal back");
                    if let Ok(next) = Journal::create(&self.dir, self.generation + 1) {
                        *self = next;
                    }
                }
                Err(error)
            }
        }
    }

    /// Moves on to the next journal file; returns the path of the one left.
    fn rotate(&mut self) -> Result<PathBuf> {
        let next = Journal::create(&self.dir, self.generation + 1)?;
        let old = std::mem::replace(self, next);
        Ok(old.path())
    }
}

/// An I/O failure as a store error: a full disk, an exhausted quota or a file system
/// remounted read-only is the store not taking writes for now ([`Error::Unavailable`]), which
/// the operator can fix without a restart; anything else is [`Error::Storage`].
fn io_error(doing: &str, path: &Path, e: &std::io::Error) -> Error {
    use std::io::ErrorKind;
    let message = format!("{doing} {}: {e}", path.display());
    match e.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::ReadOnlyFilesystem => {
            Error::Unavailable(message)
        }
        _ => Error::Storage(message),
    }
}

/// Makes the directory's entries (a created or removed journal file) durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("syncing directory", dir, &e))
}

/// Changes to write into the data file in one transaction, then the journal file they came
/// from to remove.
struct Checkpoint {
    changes: HashMap<Vec<u8>, Pending>,
    revision: u64,
    retire: PathBuf,
}

/// The checkpointer thread, seen from the writer.
struct Checkpointer {
    tx: Option<mpsc::Sender<Checkpoint>>,
    thread: Option<thread::JoinHandle<()>>,
    state: Arc<CheckpointState>,
}

#[derive(Default)]
struct CheckpointState {
    busy: Mutex<bool>,
    idle: parking_lot::Condvar,
    /// A checkpoint was given up (at closing): later ones would pass over its changes.
    failed: AtomicBool,
    closing: AtomicBool,
}

impl Checkpointer {
    fn spawn(data: Arc<DataFile>, dir: PathBuf) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Checkpoint>();
        let state = Arc::new(CheckpointState::default());
        let thread_state = state.clone();
        let thread = thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || {
                // Checkpoints are never waited for: they yield the cores to the writer and
                // the request path.
                if let Err(error) =
                    rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10)
                {
                    tracing::debug!(%error, "cannot lower the checkpoint thread's priority");
                }
                for checkpoint in rx {
                    let mut attempt = 0u32;
                    loop {
                        let written = data.with(|db| {
                            write_checkpoint(db, &data.path, &checkpoint.changes, checkpoint.revision)
                        });
                        match written {
                            Ok(()) => {
                                let path = &checkpoint.retire;
                                if let Err(e) = std::fs::remove_file(path) {
                                    tracing::warn!(error = %e, file = %path.display(), "cannot remove a checkpointed journal file");
                                }
                                let _ = sync_dir(&dir);
                                tracing::debug!(revision = checkpoint.revision, changes = checkpoint.changes.len(), "store checkpoint written");
                                break;
                            }
                            Err(error) => {
                                attempt += 1;
                                tracing::error!(%error, attempt, "store checkpoint failed; the journal keeps the changes, retrying");
                                if thread_state.closing.load(Ordering::Relaxed) && attempt >= 3 {
                                    thread_state.failed.store(true, Ordering::Relaxed);
                                    break;
                                }
                                thread::sleep(Duration::from_millis(100) * attempt.min(50));
                                data.reopen();
                            }
                        }
                    }
                    *thread_state.busy.lock() = false;
                    thread_state.idle.notify_all();
                }
            })
            .map_err(|e| Error::Storage(format!("starting the store checkpoint thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            state,
        })
    }

    fn busy(&self) -> bool {
        *self.state.busy.lock()
    }

    fn failed(&self) -> bool {
        self.state.failed.load(Ordering::Relaxed)
    }

    fn start(&self, checkpoint: Checkpoint) {
        *self.state.busy.lock() = true;
        if let Some(tx) = &self.tx
            && tx.send(checkpoint).is_err()
        {
            *self.state.busy.lock() = false;
        }
    }

    /// Waits until no checkpoint runs; from now on a failing one is given up after a few
    /// attempts.
    fn wait_idle(&self) {
        self.state.closing.store(true, Ordering::Relaxed);
        let mut busy = self.state.busy.lock();
        while *busy {
            self.state.idle.wait(&mut busy);
        }
    }

    /// Lets the thread finish what it was given and waits for it.
    fn close(&mut self) {
        self.state.closing.store(true, Ordering::Relaxed);
        self.tx.take();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("store checkpoint thread panicked");
        }
    }
}

/// Writes `changes` and the revision they reach into the data file, durably.
fn write_checkpoint(
    db: &Database,
    file: &Path,
    changes: &HashMap<Vec<u8>, Pending>,
    revision: u64,
) -> Result<()> {
    let err = |e: redb::Error| storage(file, "checkpointing", e);
    let mut txn = db.begin_write().map_err(|e| err(e.into()))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| Error::Storage(format!("checkpointing {}: {e}", file.display())))?;
    {
        let mut values = txn.open_table(VALUES).map_err(|e| err(e.into()))?;
        let mut meta = txn.open_table(META).map_err(|e| err(e.into()))?;
        let mut state = txn.open_table(STATE).map_err(|e| err(e.into()))?;
        // In key order: consecutive inserts land in the same leaves, so each page is copied
        // and written once per checkpoint rather than once per change.
        let mut changes: Vec<(&Vec<u8>, &Pending)> = changes.iter().collect();
        changes.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (encoded, change) in changes {
            let key = encoded.as_slice();
            match change {
                Pending::Put {
                    value,
                    revision,
                    refreshed_at_ms,
                } => {
                    values
                        .insert(key, value.as_bytes())
                        .map_err(|e| err(e.into()))?;
                    meta.insert(key, encode_meta(*revision, *refreshed_at_ms).as_slice())
                        .map_err(|e| err(e.into()))?;
                }
                Pending::Lease {
                    revision,
                    refreshed_at_ms,
                } => {
                    // A lease change of a record the data file does not hold cannot be
                    // (its put came first); it is skipped rather than leave a lease alone.
                    if values.get(key).map_err(|e| err(e.into()))?.is_some() {
                        meta.insert(key, encode_meta(*revision, *refreshed_at_ms).as_slice())
                            .map_err(|e| err(e.into()))?;
                    }
                }
                Pending::Delete => {
                    values.remove(key).map_err(|e| err(e.into()))?;
                    meta.remove(key).map_err(|e| err(e.into()))?;
                }
            }
        }
        let stored = match state.get(STATE_REVISION).map_err(|e| err(e.into()))? {
            Some(g) => decode_u64(g.value(), file, "the store revision")?,
            None => 0,
        };
        state
            .insert(
                STATE_REVISION,
                stored.max(revision).to_le_bytes().as_slice(),
            )
            .map_err(|e| err(e.into()))?;
    }
    txn.commit().map_err(|e| err(e.into()))
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
        Ok(self.inner.list(query))
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
            async move { unbounded(&path, lease_ttl, CheckpointPolicy::default()) }
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

    /// A store without a namespace cap.
    fn unbounded(
        path: &Path,
        lease_ttl: Option<Duration>,
        checkpoint: CheckpointPolicy,
    ) -> EmbeddedStore {
        let options = Options {
            max_records_per_namespace: usize::MAX,
            lease_ttl,
            checkpoint,
        };
        EmbeddedStore::open_with(path, options).unwrap()
    }

    fn leased(path: &Path, ttl: Duration) -> EmbeddedStore {
        unbounded(path, Some(ttl), CheckpointPolicy::default())
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

    /// Puts that arrive together share a batch: each creation in it counts against its
    /// namespace and kind for the ones after it, before any of them is in the index.
    #[tokio::test]
    async fn creations_in_one_batch_count_against_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), 20).unwrap();
        let puts = (0..50).flat_map(|i| {
            let store = &store;
            [
                Key::metadata("ns", "a", &i.to_string()),
                Key::definition("ns", &format!("svc{i}")),
                Key::metadata("other", "a", &i.to_string()),
            ]
            .map(|key| async move {
                (
                    key.namespace.clone(),
                    key.kind,
                    store.put(&key, "v", at(1)).await,
                )
            })
        });
        let mut created: HashMap<(String, Kind), usize> = HashMap::new();
        for (namespace, kind, outcome) in futures::future::join_all(puts).await {
            match outcome {
                Ok(_) => *created.entry((namespace, kind)).or_default() += 1,
                Err(Error::NamespaceFull { limit: 20, .. }) => {}
                Err(error) => panic!("{error:?}"),
            }
        }
        assert_eq!(created.len(), 3, "{created:?}");
        assert!(created.values().all(|n| *n == 20), "{created:?}");
        // A deletion sent ahead of a creation (most often in the same batch) makes room.
        let (old, new) = (
            Key::metadata("ns", "a", "0"),
            Key::metadata("ns", "a", "new"),
        );
        let (deleted, created) =
            tokio::join!(store.delete(&old, None), store.put(&new, "v", at(2)));
        assert!(deleted.unwrap());
        created.unwrap();
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

    #[test]
    fn a_data_file_that_cannot_be_opened_is_not_called_damaged() {
        // The data file's name taken by a directory: an I/O error, not damage.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(FILE_NAME)).unwrap();
        match EmbeddedStore::open(dir.path(), usize::MAX) {
            Err(Error::Storage(message)) => {
                assert!(message.contains("writable"), "{message}");
                assert!(!message.contains("damaged"), "{message}");
            }
            other => panic!("expected a storage error, got {other:?}"),
        }
    }

    #[test]
    fn a_full_disk_is_unavailable_other_io_failures_are_storage_errors() {
        let path = Path::new("/data/journal");
        for code in [28, 122, 30] {
            let e = std::io::Error::from_raw_os_error(code);
            assert!(
                matches!(io_error("writing", path, &e), Error::Unavailable(_)),
                "{e}"
            );
        }
        let e = std::io::Error::from_raw_os_error(5);
        assert!(matches!(io_error("writing", path, &e), Error::Storage(_)));
    }

    /// The bytes of every journal file in `dir`.
    fn journal_bytes(dir: &Path) -> u64 {
        journal_files(dir)
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum()
    }

    fn journal_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(journal::generation)
                    .is_some()
            })
            .collect();
        files.sort();
        files
    }

    /// The value row of `key` in the data file, if it is open.
    fn stored_value(store: &EmbeddedStore, key: &Key) -> Option<Vec<u8>> {
        let db = store.inner.data.db.read();
        // Closed while the checkpointer opens it again.
        let txn = db.as_ref()?.begin_read().unwrap();
        let values = txn.open_table(VALUES).unwrap();
        let encoded = encode_key(key).unwrap();
        values
            .get(encoded.as_slice())
            .unwrap()
            .map(|g| g.value().to_vec())
    }

    fn never_checkpointing(path: &Path) -> EmbeddedStore {
        let policy = CheckpointPolicy {
            interval: Duration::from_secs(3600),
            bytes: u64::MAX,
        };
        unbounded(path, None, policy)
    }

    /// A copy of the data directory as a crash would leave it: the data file and the
    /// journal, nothing checkpointed since opening.
    fn copy_dir(from: &Path) -> tempfile::TempDir {
        let to = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.path().join(entry.file_name())).unwrap();
        }
        to
    }

    #[tokio::test]
    async fn refresh_journals_only_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), usize::MAX).unwrap();
        let key = Key::metadata("ns", "app", "r");
        let value = "v".repeat(100_000);
        let created = store.put(&key, &value, at(1)).await.unwrap();
        let refreshed = store.put(&key, &value, at(2)).await.unwrap();
        assert_eq!(
            refreshed,
            PutOutcome::Refreshed {
                revision: created.revision() + 1
            }
        );
        let record = store.get(&key).await.unwrap().unwrap();
        assert_eq!(record.revision, refreshed.revision());
        assert_eq!(record.refreshed_at_ms, 2);

        // A refresh journals far fewer bytes than a rewrite of the value would.
        let before = journal_bytes(dir.path());
        for i in 0..20 {
            store.put(&key, &value, at(3 + i)).await.unwrap();
        }
        assert!(journal_bytes(dir.path()) < before + 20 * value.len() as u64 / 2);

        // Closing checkpoints: the data file holds the value and the last lease, the
        // journal nothing.
        drop(store);
        assert_eq!(journal_bytes(dir.path()), 0);
        let store = EmbeddedStore::open(dir.path(), usize::MAX).unwrap();
        assert_eq!(stored_value(&store, &key).unwrap(), value.as_bytes());
        let record = store.get(&key).await.unwrap().unwrap();
        assert_eq!(record.refreshed_at_ms, 22);
        assert_eq!(record.revision, created.revision() + 21);
    }

    #[tokio::test]
    async fn acknowledged_writes_are_in_the_journal_before_any_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = never_checkpointing(dir.path());
        let (a, b, c) = (
            Key::metadata("ns", "a", "1"),
            Key::metadata("ns", "b", "1"),
            Key::definition("ns", "c"),
        );
        store.put(&a, "a1", at(1)).await.unwrap();
        store.put(&b, "b1", at(2)).await.unwrap();
        store.put(&a, "a2", at(3)).await.unwrap();
        store.put(&c, "c1", at(4)).await.unwrap();
        store.put(&c, "c1", at(5)).await.unwrap();
        assert!(store.delete(&b, None).await.unwrap());
        assert!(
            stored_value(&store, &a).is_none(),
            "nothing checkpointed yet"
        );

        let crashed = copy_dir(dir.path());
        let reopened = never_checkpointing(crashed.path());
        let metadata = reopened
            .list(&ListQuery::all(Kind::Metadata))
            .await
            .unwrap();
        assert_eq!(metadata.len(), 1);
        assert_eq!((&*metadata[0].value, metadata[0].revision), ("a2", 3));
        let definitions = reopened
            .list(&ListQuery::all(Kind::Definition))
            .await
            .unwrap();
        assert_eq!(definitions.len(), 1);
        assert_eq!(definitions[0].revision, 5);
        assert_eq!(definitions[0].refreshed_at_ms, 5);
        // The journal went into the data file on opening; the revision goes on from it.
        assert_eq!(stored_value(&reopened, &a).unwrap(), b"a2");
        assert_eq!(journal_bytes(crashed.path()), 0);
        let next = reopened.put(&b, "b2", at(7)).await.unwrap();
        assert_eq!(next, PutOutcome::Created { revision: 7 });
    }

    #[tokio::test]
    async fn a_journal_cut_short_keeps_every_complete_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = never_checkpointing(dir.path());
        let key = Key::metadata("ns", "a", "1");
        store.put(&key, "a1", at(1)).await.unwrap();
        let crashed = copy_dir(dir.path());
        let journal = journal_files(crashed.path()).pop().unwrap();
        // Half of a second frame, then the zeros of blocks allocated but never written.
        let mut frame = Vec::new();
        journal::encode_frame(
            [journal::Entry::Delete {
                key: encode_key(&key).unwrap().as_slice(),
                revision: 2,
            }],
            &mut frame,
        );
        let mut bytes = std::fs::read(&journal).unwrap();
        bytes.extend_from_slice(&frame[..frame.len() / 2]);
        std::fs::write(&journal, &bytes).unwrap();
        let reopened = never_checkpointing(crashed.path());
        assert_eq!(&*reopened.get(&key).await.unwrap().unwrap().value, "a1");
        drop(reopened);

        let crashed = copy_dir(dir.path());
        let journal = journal_files(crashed.path()).pop().unwrap();
        let mut bytes = std::fs::read(&journal).unwrap();
        bytes.resize(bytes.len() + 4096, 0);
        std::fs::write(&journal, &bytes).unwrap();
        let reopened = never_checkpointing(crashed.path());
        assert_eq!(&*reopened.get(&key).await.unwrap().unwrap().value, "a1");
    }

    #[tokio::test]
    async fn a_damaged_journal_is_a_storage_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = never_checkpointing(dir.path());
        store
            .put(&Key::metadata("ns", "a", "1"), "a1", at(1))
            .await
            .unwrap();
        store
            .put(&Key::metadata("ns", "b", "1"), "b1", at(2))
            .await
            .unwrap();
        let crashed = copy_dir(dir.path());
        let journal = journal_files(crashed.path()).pop().unwrap();
        let mut bytes = std::fs::read(&journal).unwrap();
        // The first frame's payload: a later frame follows it.
        bytes[journal::FRAME_HEADER + 2] ^= 0x40;
        std::fs::write(&journal, &bytes).unwrap();
        match EmbeddedStore::open(crashed.path(), usize::MAX) {
            Err(Error::Storage(message)) => {
                assert!(
                    message.contains(&journal.display().to_string()),
                    "{message}"
                );
                assert!(message.contains("checksum"), "{message}");
            }
            other => panic!("expected a storage error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn checkpoints_move_the_journal_into_the_data_file() {
        let dir = tempfile::tempdir().unwrap();
        let policy = CheckpointPolicy {
            interval: Duration::from_millis(50),
            bytes: u64::MAX,
        };
        let store = unbounded(dir.path(), None, policy);
        let key = Key::metadata("ns", "a", "1");
        store.put(&key, "a1", at(1)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while stored_value(&store, &key).is_none() {
            assert!(Instant::now() < deadline, "no checkpoint within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The checkpointed file is gone; the writer appends to a new, empty one.
        while journal_files(dir.path()).len() > 1 {
            assert!(Instant::now() < deadline, "the old journal file stayed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(journal_bytes(dir.path()), 0);
        // Writes go on into the new file, and a crash now keeps them.
        store.put(&key, "a2", at(2)).await.unwrap();
        let crashed = copy_dir(dir.path());
        let reopened = never_checkpointing(crashed.path());
        assert_eq!(&*reopened.get(&key).await.unwrap().unwrap().value, "a2");
    }

    /// Whether the disk under [`open_filling_disk`]'s data files is full. Only
    /// `a_checkpoint_on_a_full_disk_is_retried_until_it_fits` opens such a file.
    static DISK_FULL: AtomicBool = AtomicBool::new(false);

    /// A data file on a disk that fills up: writes fail with `ENOSPC` while [`DISK_FULL`].
    #[derive(Debug)]
    struct FillingDisk(redb::backends::FileBackend);

    impl FillingDisk {
        fn full() -> std::io::Result<()> {
            if DISK_FULL.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(28));
            }
            Ok(())
        }
    }

    impl redb::StorageBackend for FillingDisk {
        fn len(&self) -> std::io::Result<u64> {
            self.0.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.0.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            Self::full()?;
            self.0.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            Self::full()?;
            self.0.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            Self::full()?;
            self.0.write(offset, data)
        }
    }

    fn open_filling_disk(file: &Path) -> Result<Database> {
        let opened = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(file)
            .map_err(|e| io_error("opening", file, &e))?;
        let backend =
            redb::backends::FileBackend::new(opened).map_err(|e| Error::Storage(e.to_string()))?;
        Database::builder()
            .create_with_backend(FillingDisk(backend))
            .map_err(|e| Error::Storage(e.to_string()))
    }

    #[tokio::test]
    async fn a_checkpoint_on_a_full_disk_is_retried_until_it_fits() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            max_records_per_namespace: usize::MAX,
            lease_ttl: None,
            checkpoint: CheckpointPolicy {
                interval: Duration::from_millis(50),
                bytes: u64::MAX,
            },
        };
        let store = EmbeddedStore::open_data_with(dir.path(), options, open_filling_disk).unwrap();
        let key = Key::metadata("ns", "a", "1");
        // The data file's disk is full: writes are still acknowledged from the journal, and
        // checkpoints fail (redb then refuses every later transaction of that handle).
        DISK_FULL.store(true, Ordering::SeqCst);
        store.put(&key, "a1", at(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            journal_files(dir.path()).len(),
            2,
            "the checkpoint is pending"
        );
        assert!(journal_bytes(dir.path()) > 0);

        // Room again: the checkpointer opens the file anew and the journal drains.
        DISK_FULL.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        while stored_value(&store, &key).is_none() || journal_files(dir.path()).len() > 1 {
            assert!(
                Instant::now() < deadline,
                "no checkpoint within 20 s of the room coming back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(stored_value(&store, &key).unwrap(), b"a1");
        store.ready().await.unwrap();
        store.put(&key, "a2", at(2)).await.unwrap();
        drop(store);
        assert_eq!(
            journal_bytes(dir.path()),
            0,
            "a clean stop leaves the journal empty"
        );
    }

    /// A data file of layout version 1 (namespace counts in a table, no journal) opens,
    /// keeps its records and counts, and is upgraded.
    #[tokio::test]
    async fn a_version_1_data_file_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::metadata("ns", "a", "1");
        {
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let encoded = encode_key(&key).unwrap();
                let mut values = txn.open_table(VALUES).unwrap();
                values.insert(encoded.as_slice(), b"v1".as_slice()).unwrap();
                let mut meta = txn.open_table(META).unwrap();
                meta.insert(encoded.as_slice(), encode_meta(4, 9).as_slice())
                    .unwrap();
                let mut counts = txn.open_table(COUNTS).unwrap();
                counts
                    .insert(b"metadata\0ns".as_slice(), 1u64.to_le_bytes().as_slice())
                    .unwrap();
                let mut state = txn.open_table(STATE).unwrap();
                state
                    .insert(STATE_FORMAT, 1u64.to_le_bytes().as_slice())
                    .unwrap();
                state
                    .insert(STATE_REVISION, 4u64.to_le_bytes().as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let store = EmbeddedStore::open(dir.path(), 1).unwrap();
        let record = store.get(&key).await.unwrap().unwrap();
        assert_eq!(
            (&*record.value, record.revision, record.refreshed_at_ms),
            ("v1", 4, 9)
        );
        // The namespace is full at one record.
        assert!(matches!(
            store.put(&Key::metadata("ns", "b", "1"), "x", at(10)).await,
            Err(Error::NamespaceFull { .. })
        ));
        let db = store.inner.data.db.read();
        let txn = db.as_ref().unwrap().begin_read().unwrap();
        let state = txn.open_table(STATE).unwrap();
        let format = state.get(STATE_FORMAT).unwrap().unwrap().value().to_vec();
        assert_eq!(format, FORMAT_VERSION.to_le_bytes());
        assert!(txn.open_table(COUNTS).is_err(), "the counts table is gone");
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
