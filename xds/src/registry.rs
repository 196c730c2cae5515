//! The registry of open streams and their sync status, shared by the stream tasks (writers)
//! and CSDS / admin pages (readers).

use std::{collections::BTreeMap, sync::Arc};

use parking_lot::RwLock;

use crate::{
    status::{StreamStatus, TypeStatus},
    types::TypeUrl,
};

/// Open streams by stream id. Cheap to clone; every clone sees the same streams.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    streams: Arc<RwLock<BTreeMap<u64, StreamStatus>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn insert(&self, status: StreamStatus) {
        self.streams.write().insert(status.stream_id, status);
    }

    pub(crate) fn update_types(
        &self,
        stream_id: u64,
        types: impl Iterator<Item = (TypeUrl, TypeStatus)>,
    ) {
        if let Some(stream) = self.streams.write().get_mut(&stream_id) {
            stream.types = types.collect();
        }
    }

    pub(crate) fn remove(&self, stream_id: u64) {
        self.streams.write().remove(&stream_id);
    }

    /// A copy of every open stream's status, ordered by stream id.
    pub fn streams(&self) -> Vec<StreamStatus> {
        self.streams.read().values().cloned().collect()
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
