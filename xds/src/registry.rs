//! The registry of open streams and their sync status, shared by the stream tasks (writers)
//! and CSDS / admin pages (readers).
//!
//! Each stream owns a cell of its own ([`StreamCell`]): a stream task updates its status
//! under its cell's lock only, so streams never contend with each other; the registry-wide
//! lock is taken only when a stream opens or closes and when a reader copies the list.

use std::{collections::BTreeMap, sync::Arc};

use parking_lot::{Mutex, RwLock};

use crate::{
    status::{StreamStatus, TypeStatus},
    types::TypeUrl,
};

/// Open streams by stream id. Cheap to clone; every clone sees the same streams.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    streams: Arc<RwLock<BTreeMap<u64, Arc<Mutex<Entry>>>>>,
}

/// One stream as the registry holds it: compact, since every open stream has one. The
/// per-type status lives in a vector (a stream reads one to a few types) rather than in the
/// map [`StreamStatus::types`] is, whose smallest node has room for eleven.
#[derive(Debug)]
struct Entry {
    /// Everything but `types`, which stays empty here.
    stream: StreamStatus,
    types: Vec<(TypeUrl, TypeStatus)>,
}

impl Entry {
    fn status(&self) -> StreamStatus {
        let mut status = self.stream.clone();
        status.types = self.types.iter().cloned().collect();
        status
    }
}

/// One stream's entry in the [`Registry`], held by its task. Dropping it removes the stream.
#[derive(Debug)]
pub(crate) struct StreamCell {
    registry: Registry,
    stream_id: u64,
    entry: Arc<Mutex<Entry>>,
}

impl StreamCell {
    /// Brings the per-type status in line with `types`, copying only what changed: an ACK
    /// changes a version and a counter, not the subscription or the resources held.
    pub(crate) fn sync_types<'a>(
        &self,
        types: impl Iterator<Item = (&'a TypeUrl, &'a TypeStatus)>,
    ) {
        let mut entry = self.entry.lock();
        let mut seen = 0;
        for (type_url, current) in types {
            seen += 1;
            match entry.types.iter_mut().find(|(t, _)| t == type_url) {
                Some((_, stored)) => stored.sync_from(current),
                None => {
                    entry.types.reserve_exact(1);
                    entry.types.push((type_url.clone(), current.clone()));
                }
            }
        }
        // The state machines add types and never drop one, so every stored type was seen.
        debug_assert_eq!(seen, entry.types.len(), "a state machine dropped a type");
    }
}

impl Drop for StreamCell {
    fn drop(&mut self) {
        self.registry.streams.write().remove(&self.stream_id);
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a stream; it stays listed until the returned cell is dropped.
    pub(crate) fn insert(&self, mut stream: StreamStatus) -> StreamCell {
        let stream_id = stream.stream_id;
        let types = std::mem::take(&mut stream.types).into_iter().collect();
        let entry = Arc::new(Mutex::new(Entry { stream, types }));
        self.streams.write().insert(stream_id, entry.clone());
        StreamCell {
            registry: self.clone(),
            stream_id,
            entry,
        }
    }

    /// A copy of every open stream's status, ordered by stream id.
    pub fn streams(&self) -> Vec<StreamStatus> {
        let cells: Vec<_> = self.streams.read().values().cloned().collect();
        cells.iter().map(|cell| cell.lock().status()).collect()
    }

    /// The number of open streams.
    pub fn len(&self) -> usize {
        self.streams.read().len()
    }

    /// Whether no stream is open.
    pub fn is_empty(&self) -> bool {
        self.streams.read().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::status::Protocol;

    fn stream(stream_id: u64) -> StreamStatus {
        StreamStatus {
            stream_id,
            node_id: format!("node-{stream_id}"),
            node_cluster: String::new(),
            partitions: vec![],
            peer: None,
            protocol: Protocol::Sotw,
            connected_since: SystemTime::UNIX_EPOCH,
            types: BTreeMap::new(),
        }
    }

    #[test]
    fn cells_update_their_own_stream_and_leave_on_drop() {
        let registry = Registry::new();
        let one = registry.insert(stream(1));
        let two = registry.insert(stream(2));
        assert_eq!(registry.len(), 2);

        let type_url = TypeUrl::from("t");
        let mut status = TypeStatus {
            sent_version: Some("v1".into()),
            ..TypeStatus::default()
        };
        one.sync_types([(&type_url, &status)].into_iter());
        status.acked_version = Some("v1".into());
        status.n_acks = 1;
        one.sync_types([(&type_url, &status)].into_iter());

        let streams = registry.streams();
        assert_eq!(streams[0].types.get(&type_url), Some(&status));
        assert!(streams[1].types.is_empty(), "the other stream is untouched");

        drop(one);
        assert_eq!(registry.len(), 1);
        assert_eq!(registry.streams()[0].stream_id, 2);
        drop(two);
        assert!(registry.is_empty());
    }
}
