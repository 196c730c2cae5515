//! The registry of open streams and their sync status, shared by the stream drivers (writers)
//! and CSDS / admin pages (readers).
//!
//! A stream's state machine lives in its registry entry ([`StreamCell`]): the driver steps
//! it under the entry's own lock, and readers take the per-type status from the machine
//! itself, so a step copies nothing and streams never contend with each other. The
//! registry-wide lock is taken only when a stream opens or closes and when a reader copies
//! the list.

use std::{collections::BTreeMap, sync::Arc};

use parking_lot::{Mutex, MutexGuard, RwLock};

use crate::{
    status::{StreamStatus, TypeStatus},
    types::TypeUrl,
};

/// What the registry reads of a stream's state machine.
pub(crate) trait TypeStatuses: Send + 'static {
    /// The status of every type the stream has asked for, copied.
    fn type_statuses(&self) -> BTreeMap<TypeUrl, TypeStatus>;
}

/// A stream's entry as readers of the registry see it: its machine behind a trait object.
type SharedEntry = Arc<Mutex<Entry<dyn TypeStatuses>>>;

/// Open streams by stream id. Cheap to clone; every clone sees the same streams.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    streams: Arc<RwLock<BTreeMap<u64, SharedEntry>>>,
}

/// One stream as the registry holds it: what is fixed when it opens, and its state machine.
struct Entry<M: ?Sized> {
    /// Everything but `types`, which stays empty here: the machine holds them.
    stream: StreamStatus,
    machine: M,
}

impl std::fmt::Debug for Entry<dyn TypeStatuses> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("stream", &self.stream.stream_id)
            .finish_non_exhaustive()
    }
}

/// One stream's entry in the [`Registry`], held by its driver. Dropping it removes the stream.
pub(crate) struct StreamCell<M> {
    registry: Registry,
    stream_id: u64,
    entry: Arc<Mutex<Entry<M>>>,
}

impl<M> StreamCell<M> {
    /// The stream's state machine, locked for one step. Readers of the registry wait for the
    /// step to finish; no other stream does.
    pub(crate) fn machine(&self) -> parking_lot::MappedMutexGuard<'_, M> {
        MutexGuard::map(self.entry.lock(), |entry| &mut entry.machine)
    }
}

impl<M> Drop for StreamCell<M> {
    fn drop(&mut self) {
        self.registry.streams.write().remove(&self.stream_id);
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a stream driven by `machine`; it stays listed until the returned cell is
    /// dropped.
    pub(crate) fn insert<M: TypeStatuses>(
        &self,
        mut stream: StreamStatus,
        machine: M,
    ) -> StreamCell<M> {
        let stream_id = stream.stream_id;
        stream.types.clear();
        let entry = Arc::new(Mutex::new(Entry { stream, machine }));
        let shared: SharedEntry = entry.clone();
        self.streams.write().insert(stream_id, shared);
        StreamCell {
            registry: self.clone(),
            stream_id,
            entry,
        }
    }

    /// A copy of every open stream's status, ordered by stream id.
    pub fn streams(&self) -> Vec<StreamStatus> {
        let cells: Vec<_> = self.streams.read().values().cloned().collect();
        cells
            .iter()
            .map(|cell| {
                let entry = cell.lock();
                StreamStatus {
                    types: entry.machine.type_statuses(),
                    ..entry.stream.clone()
                }
            })
            .collect()
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

    /// A machine that is only its per-type status.
    #[derive(Default)]
    struct Statuses(BTreeMap<TypeUrl, TypeStatus>);

    impl TypeStatuses for Statuses {
        fn type_statuses(&self) -> BTreeMap<TypeUrl, TypeStatus> {
            self.0.clone()
        }
    }

    #[test]
    fn readers_see_each_machine_as_it_is_now_and_streams_leave_on_drop() {
        let registry = Registry::new();
        let one = registry.insert(stream(1), Statuses::default());
        let two = registry.insert(stream(2), Statuses::default());
        assert_eq!(registry.len(), 2);

        let type_url = TypeUrl::from("t");
        let mut status = TypeStatus {
            sent_version: Some("v1".into()),
            ..TypeStatus::default()
        };
        one.machine().0.insert(type_url.clone(), status.clone());
        assert_eq!(registry.streams()[0].types.get(&type_url), Some(&status));
        status.acked_version = Some("v1".into());
        status.n_acks = 1;
        one.machine().0.insert(type_url.clone(), status.clone());

        let streams = registry.streams();
        assert_eq!(streams[0].node_id, "node-1");
        assert_eq!(streams[0].types.get(&type_url), Some(&status));
        assert!(streams[1].types.is_empty(), "the other stream is untouched");

        drop(one);
        assert_eq!(registry.len(), 1);
        assert_eq!(registry.streams()[0].stream_id, 2);
        drop(two);
        assert!(registry.is_empty());
    }
}
