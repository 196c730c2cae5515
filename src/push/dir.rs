//! A watched directory of YAML (`.yaml`, `.yml`) and JSON (`.json`) files, parsed file by
//! file by a [`Parser`], with each file's last good content kept.
//!
//! Watching is polling: every poll interval the directory is listed and each file's bytes
//! hashed; a file whose hash changed is parsed again. Polling needs no inotify (containers
//! and network filesystems often lack it), sees a file replaced by `rename`, and costs a read
//! of a few small files per second. A file that fails to read or parse is logged and keeps
//! its previous good content; a deleted file drops it. Hidden files (starting with `.`) are
//! skipped, so editors' and `rename`-based writers' temporary files are not read half-written.
//!
//! What the files mean, and what a change does, belongs to the caller: [`envoy`](super::envoy)
//! and [`pixiu`](super::pixiu) each bring a [`Parser`] and a publish function.

use std::{
    collections::BTreeMap,
    marker::PhantomData,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::doc::{ParseError, err};

/// What the files of a directory hold.
pub trait Parser: Send + 'static {
    /// One parsed item (a resource).
    type Item: Send + 'static;
    /// What the directory holds, for logs (`"envoy"`, `"pixiu"`).
    const KIND: &'static str;
    /// Parses one file.
    fn parse(text: &str, format: Format) -> Result<Vec<Self::Item>, ParseError>;
}

/// The format of a file, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.yaml` or `.yml`.
    Yaml,
    /// `.json`.
    Json,
}

impl Format {
    /// The format of `path`, or `None` for files this module does not read.
    pub fn of(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()? {
            "yaml" | "yml" => Some(Format::Yaml),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

/// One file's last good content.
#[derive(Debug)]
struct FileState<T> {
    /// Hash of the bytes last read, good or bad, so a bad file is reported once.
    hash: u128,
    /// The items of the last content that parsed.
    items: Vec<T>,
}

/// The items of a directory, file by file, with what was last read from each.
#[derive(Debug)]
pub struct DirLoader<P: Parser> {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState<P::Item>>,
    /// Whether the last scan could list the directory.
    listed: bool,
    /// Why the last scan could not list it, to warn once per reason rather than every poll.
    unlisted: Option<String>,
    parser: PhantomData<fn() -> P>,
}

impl<P: Parser> DirLoader<P> {
    /// A loader of `dir` that has read nothing yet.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            listed: false,
            unlisted: None,
            parser: PhantomData,
        }
    }

    /// The watched directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the last scan could list the directory: until it could, the items say
    /// nothing about what the directory holds.
    pub fn listed(&self) -> bool {
        self.listed
    }

    /// Why the directory could not be listed, while it cannot (warned once per reason).
    pub fn unlisted(&self) -> Option<&str> {
        self.unlisted.as_deref()
    }

    /// Every file's last good items, in path order.
    pub fn files(&self) -> impl Iterator<Item = (&Path, &[P::Item])> {
        self.files
            .iter()
            .map(|(path, state)| (path.as_path(), state.items.as_slice()))
    }

    /// Reads the directory again; returns whether the set of items may have changed (the
    /// first scan that lists the directory counts as a change).
    ///
    /// A file that cannot be read or parsed keeps its previous items (logged once per
    /// content); a file that is gone drops them. A directory that cannot be listed keeps
    /// everything (logged).
    pub fn scan(&mut self) -> bool {
        let kind = P::KIND;
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) => {
                let reason = error.to_string();
                if self.unlisted.as_ref() != Some(&reason) {
                    warn!(kind, dir = %self.dir.display(), %error, "cannot list the config directory; trying again every poll");
                } else {
                    debug!(kind, dir = %self.dir.display(), %error, "cannot list the config directory");
                }
                self.unlisted = Some(reason);
                return false;
            }
        };
        if self.unlisted.take().is_some() {
            info!(kind, dir = %self.dir.display(), "the config directory can be listed again");
        }
        let mut seen = Vec::new();
        let mut changed = !self.listed;
        self.listed = true;
        for entry in entries.flatten() {
            let path = entry.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| n.starts_with('.'));
            let Some(format) = Format::of(&path).filter(|_| !hidden && path.is_file()) else {
                continue;
            };
            seen.push(path.clone());
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(error) => {
                    warn!(kind, file = %path.display(), %error, "cannot read config file; keeping its previous content");
                    continue;
                }
            };
            let hash = xxhash_rust::xxh3::xxh3_128(&bytes);
            if self.files.get(&path).is_some_and(|f| f.hash == hash) {
                continue;
            }
            let parsed = std::str::from_utf8(&bytes)
                .map_err(|e| err("", e))
                .and_then(|text| P::parse(text, format));
            match parsed {
                Ok(items) => {
                    info!(kind, file = %path.display(), n_resources = items.len(), "config file loaded");
                    self.files.insert(path, FileState { hash, items });
                    changed = true;
                }
                Err(error) => {
                    warn!(kind, file = %path.display(), %error, "invalid config file; keeping its previous content");
                    let state = self.files.entry(path).or_insert(FileState {
                        hash,
                        items: Vec::new(),
                    });
                    state.hash = hash;
                }
            }
        }
        let n_before = self.files.len();
        self.files.retain(|path, _| seen.contains(path));
        if self.files.len() != n_before {
            info!(kind, dir = %self.dir.display(), "config file removed");
            changed = true;
        }
        changed
    }
}

/// Spawns the task that scans `loader` every `poll_interval` and calls `publish` after each
/// scan that changed something, until `shutdown`.
pub fn follow<P: Parser>(
    mut loader: DirLoader<P>,
    poll_interval: Duration,
    shutdown: CancellationToken,
    mut publish: impl FnMut(&DirLoader<P>) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        crate::poll::every(poll_interval, &shutdown, || {
            if loader.scan() {
                publish(&loader);
            }
        })
        .await;
    })
}
