//! Store changes into xDS resources: the only writer of the metadata part of the xDS cache.
//!
//! Layout of the cache, known here and nowhere else: one partition per namespace holds the
//! `Metadata` (named `<application>/<revision>`) and `ServiceDefinition` (named by
//! identifier) resources of that namespace; the [`GLOBAL_PARTITION`] holds resources every
//! client sees (standard Envoy resources). [`NamespaceResolver`] gives a stream the view
//! `[its namespace, global]`.

pub mod dir;
mod doc;
pub mod envoy;
pub mod mapping;
pub mod pixiu;

use std::{collections::BTreeMap, sync::Arc};

use envoy_types::pb::{
    envoy::config::core::v3::Node,
    google::protobuf::{Any, value::Kind as ValueKind},
};
use futures::StreamExt;
use pixiu_xds::{CacheWriter, Partition, ResourceName, StreamContext, TypeUrl, Update, View};
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::{
    model::{self, Kind, NAMESPACE_HEADER},
    pb::{self, metadata as proto},
    security::{Authorizer, Operation},
    store::{Event, Record, Store, take_waiting},
};

pub use crate::model::GLOBAL_PARTITION;

/// The node metadata key naming a client's namespace (istio's convention).
pub const NODE_NAMESPACE_KEY: &str = "NAMESPACE";

/// The xDS type URL of a record kind.
pub fn type_url(kind: Kind) -> &'static str {
    match kind {
        Kind::Metadata => pb::METADATA_TYPE_URL,
        Kind::Definition => pb::SERVICE_DEFINITION_TYPE_URL,
        Kind::Mapping => pb::SERVICE_MAPPING_TYPE_URL,
    }
}

/// The kinds whose records are resources one for one (mappings are aggregated per interface
/// by [`mapping::MappingIndex`]).
const RECORD_KINDS: [Kind; 2] = [Kind::Metadata, Kind::Definition];

/// The xDS resource of a record: its name and packed body.
///
/// A mapping record alone is packed as a `ServiceMapping` listing only its own application;
/// the resources pushed aggregate every application of the interface (see [`mapping`]).
pub fn resource(record: &Record) -> (ResourceName, Any) {
    let key = &record.key;
    let value = match key.kind {
        Kind::Metadata => {
            let (application, revision) = key
                .application_revision()
                .expect("metadata keys are always <application>/<revision>");
            proto::Metadata {
                application_name: application.to_string(),
                revision: revision.to_string(),
                metadata_info: record.value.to_string(),
                namespace: key.namespace.clone(),
            }
            .encode_to_vec()
        }
        Kind::Definition => proto::ServiceDefinition {
            identifier: key.name.clone(),
            service_definition: record.value.to_string(),
            namespace: key.namespace.clone(),
        }
        .encode_to_vec(),
        Kind::Mapping => {
            let (interface, application) = key
                .interface_application()
                .expect("mapping keys are always <interface>/<application>");
            let applications = std::iter::once(application.to_string()).collect();
            return (
                ResourceName::new(interface),
                mapping::resource(&key.namespace, interface, &applications),
            );
        }
    };
    (
        ResourceName::new(&key.name),
        Any {
            type_url: type_url(key.kind).to_string(),
            value,
        },
    )
}

/// Most store events applied to the cache as one snapshot.
const MAX_EVENTS_PER_SNAPSHOT: usize = 1024;

/// Follows `store`'s watch and mirrors it into the cache until `shutdown`.
///
/// Events that are already waiting when one arrives (a store commits a whole batch of writes
/// at once) go into the same snapshot, up to [`MAX_EVENTS_PER_SNAPSHOT`]: one copy of the
/// cache's changed paths and one wake-up of every stream per batch, not per write. Streams
/// see a snapshot at least as new as each write, as they would after coalescing anyway.
///
/// `warmed` turns true once the first full state is in the cache (for `/readyz` and for
/// callers that must not serve an empty cache as if it were the truth).
pub async fn run(
    store: Arc<dyn Store>,
    writer: CacheWriter,
    warmed: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut events = store.watch();
    let mut mappings = mapping::MappingIndex::default();
    let mut ended = false;
    while !ended {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            event = events.next() => match event {
                Some(event) => event,
                None => break,
            },
        };
        let mut is_reset = false;
        let mut batch = Vec::new();
        let mut n_events = 0;
        let mut take = |event: Event| {
            n_events += 1;
            is_reset |= matches!(event, Event::Reset { .. });
            batch.extend(updates(&writer, &mut mappings, event));
        };
        take(first);
        ended = !take_waiting(&mut events, MAX_EVENTS_PER_SNAPSHOT - 1, take);
        // Lease refreshes change nothing pushed: no need to look at the cache.
        if !batch.is_empty() {
            let seq = writer.apply(batch);
            debug!(snapshot.seq = seq, n_events, "cache updated");
        }
        if is_reset {
            warmed.send_replace(true);
        }
    }
    info!("store watch ended");
}

/// The cache updates for one store event.
fn updates(
    writer: &CacheWriter,
    mappings: &mut mapping::MappingIndex,
    event: Event,
) -> Vec<Update> {
    match event {
        Event::Put(record) if record.key.kind == Kind::Mapping => mappings.put(&record.key),
        Event::Delete { key, .. } if key.kind == Kind::Mapping => mappings.delete(&key),
        Event::Put(record) => {
            let (name, body) = resource(&record);
            vec![Update::Put {
                partition: Partition::new(&record.key.namespace),
                type_url: TypeUrl::new(type_url(record.key.kind)),
                name,
                body,
            }]
        }
        Event::Delete { key, .. } => vec![Update::Delete {
            partition: Partition::new(&key.namespace),
            type_url: TypeUrl::new(type_url(key.kind)),
            name: ResourceName::new(&key.name),
        }],
        Event::Refreshed { .. } => Vec::new(),
        Event::Reset { records, .. } => {
            // Replace every (namespace, type) we own, including ones that are now empty.
            let mut sets: BTreeMap<(String, Kind), Vec<(ResourceName, Any)>> = BTreeMap::new();
            let snapshot = writer.reader().snapshot();
            for kind in RECORD_KINDS {
                let url = TypeUrl::new(type_url(kind));
                for (partition, t) in snapshot.keys() {
                    if *t == url && partition.as_str() != GLOBAL_PARTITION {
                        sets.entry((partition.to_string(), kind)).or_default();
                    }
                }
            }
            for record in records.iter().filter(|r| r.key.kind != Kind::Mapping) {
                sets.entry((record.key.namespace.clone(), record.key.kind))
                    .or_default()
                    .push(resource(record));
            }
            let mapping_urls = [
                TypeUrl::new(pb::SERVICE_MAPPING_TYPE_URL),
                TypeUrl::new(pb::UPSTREAM_MAPPING_TYPE_URL),
            ];
            let mapping_namespaces: std::collections::BTreeSet<String> = snapshot
                .keys()
                .filter(|(partition, t)| {
                    mapping_urls.contains(t) && partition.as_str() != GLOBAL_PARTITION
                })
                .map(|(partition, _)| partition.to_string())
                .collect();
            let mut updates: Vec<Update> = sets
                .into_iter()
                .map(|((namespace, kind), resources)| Update::ReplaceType {
                    partition: Partition::new(namespace),
                    type_url: TypeUrl::new(type_url(kind)),
                    resources,
                })
                .collect();
            updates.extend(mappings.reset(&records, mapping_namespaces));
            updates
        }
    }
}

/// Gives each stream the view `[its namespace, global]`.
///
/// The namespace asked for comes from `node.metadata["NAMESPACE"]`, else the
/// `x-pixiu-namespace` header of the stream; the [`Authorizer`] decides from it and the
/// caller's identity (anonymous development clients: that, else the default). A stream
/// therefore never reads another namespace's partition, by name or by wildcard, unless the
/// policy grants it.
#[derive(Debug, Clone)]
pub struct NamespaceResolver {
    authorizer: Arc<Authorizer>,
}

impl NamespaceResolver {
    /// A resolver without authentication, falling back to `default_namespace`.
    pub fn new(default_namespace: impl Into<String>) -> Self {
        Self {
            authorizer: Arc::new(Authorizer::open(default_namespace)),
        }
    }

    /// A resolver deciding with `authorizer`.
    pub fn with_authorizer(authorizer: Arc<Authorizer>) -> Self {
        Self { authorizer }
    }

    /// The namespace of a stream.
    pub fn namespace(
        &self,
        node: Option<&Node>,
        context: &StreamContext,
    ) -> Result<String, tonic::Status> {
        let from_node = node
            .and_then(|n| n.metadata.as_ref())
            .and_then(|m| m.fields.get(NODE_NAMESPACE_KEY))
            .and_then(|v| match &v.kind {
                Some(ValueKind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        let from_header = || {
            context
                .metadata
                .get(NAMESPACE_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let source = if from_node.is_some() {
            "node namespace"
        } else {
            "namespace header"
        };
        let requested = from_node.or_else(from_header);
        if let Some(namespace) = &requested {
            model::check_namespace(namespace)
                .map_err(|e| tonic::Status::invalid_argument(format!("{source}: {e}")))?;
        }
        let decision = self
            .authorizer
            .authorize(
                &context.extensions,
                &context.metadata,
                requested.as_deref(),
                Operation::Subscribe,
            )
            .map_err(crate::security::status)?;
        Ok(decision.namespace)
    }
}

impl pixiu_xds::ViewResolver for NamespaceResolver {
    fn view(&self, node: Option<&Node>, context: &StreamContext) -> Result<View, tonic::Status> {
        let namespace = self.namespace(node, context)?;
        Ok(View::new([
            Partition::new(namespace),
            Partition::new(GLOBAL_PARTITION),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::store::{Key, memory::MemoryStore};

    #[tokio::test]
    async fn mirrors_store_into_cache() {
        let store = Arc::new(MemoryStore::default());
        store
            .put(&Key::metadata("ns1", "app", "r1"), "old", SystemTime::now())
            .await
            .unwrap();
        let (cache, writer) = pixiu_xds::cache();
        let (warmed_tx, mut warmed) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(store.clone(), writer, warmed_tx, shutdown.clone()));
        warmed.wait_for(|w| *w).await.unwrap();
        let view = View::new([Partition::new("ns1")]);
        let metadata = TypeUrl::new(pb::METADATA_TYPE_URL);
        let snap = cache.snapshot();
        let resource = snap.get(&view, &metadata, "app/r1").unwrap();
        let decoded = proto::Metadata::decode(resource.value()).unwrap();
        assert_eq!(decoded.metadata_info, "old");
        assert_eq!(decoded.namespace, "ns1");

        let mut changes = cache.changes();
        store
            .put(&Key::definition("ns1", "svc"), "def", SystemTime::now())
            .await
            .unwrap();
        let snap = changes.next().await.unwrap();
        let definitions = TypeUrl::new(pb::SERVICE_DEFINITION_TYPE_URL);
        assert!(snap.get(&view, &definitions, "svc").is_some());
        store
            .delete(&Key::metadata("ns1", "app", "r1"), None)
            .await
            .unwrap();
        let snap = changes.next().await.unwrap();
        assert!(snap.get(&view, &metadata, "app/r1").is_none());
        shutdown.cancel();
        task.await.unwrap();
    }

    /// Writes committed together reach the cache as one snapshot, in order.
    #[tokio::test(flavor = "current_thread")]
    async fn waiting_events_share_one_snapshot() {
        let store = Arc::new(MemoryStore::default());
        let (cache, writer) = pixiu_xds::cache();
        let (warmed_tx, mut warmed) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(store.clone(), writer, warmed_tx, shutdown.clone()));
        warmed.wait_for(|w| *w).await.unwrap();
        let before = cache.snapshot().seq();
        // The push task cannot run until this one awaits something that is not ready: all
        // 50 events wait in its watch.
        for i in 0..50 {
            let key = Key::metadata("ns1", "app", &format!("r{i}"));
            store.put(&key, "v1", SystemTime::now()).await.unwrap();
        }
        store
            .put(&Key::metadata("ns1", "app", "r0"), "v2", SystemTime::now())
            .await
            .unwrap();
        store
            .delete(&Key::metadata("ns1", "app", "r1"), None)
            .await
            .unwrap();
        let mut changes = cache.changes();
        let snap = changes.next().await.unwrap();
        assert_eq!(
            snap.seq(),
            before + 1,
            "one snapshot for the 52 waiting events"
        );
        let view = View::new([Partition::new("ns1")]);
        let metadata = TypeUrl::new(pb::METADATA_TYPE_URL);
        assert_eq!(snap.resources(&view, &metadata).len(), 49);
        let r0 = snap.get(&view, &metadata, "app/r0").unwrap();
        let decoded = proto::Metadata::decode(r0.value()).unwrap();
        assert_eq!(decoded.metadata_info, "v2", "the later write wins");
        assert!(snap.get(&view, &metadata, "app/r1").is_none());
        shutdown.cancel();
        task.await.unwrap();
    }
}
