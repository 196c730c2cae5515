//! The JSON documents of the admin API, and how they are built from the cache and the stream
//! registry. Pure functions over snapshots: no IO, tested without a server.
//!
//! The types derive `Deserialize` too, so the `status` command reads `/debug/syncz` with them.

use std::collections::BTreeMap;

use pixiu_xds::{Registry, Snapshot, StreamStatus, TypeStatus, TypeUrl};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::{
    metrics::{Metrics, NamespaceLabels},
    model::Kind,
    pb::metadata as proto,
    push::GLOBAL_PARTITION,
};

use super::PushLog;

/// `/debug/syncz`: every connected stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// Open streams, by stream id.
    pub streams: Vec<StreamSync>,
}

/// One stream's sync status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamSync {
    /// Process-unique stream number.
    pub stream_id: u64,
    /// The client's `node.id`.
    pub node_id: String,
    /// The client's `node.cluster`.
    #[serde(default)]
    pub node_cluster: String,
    /// The client's namespace (its first partition).
    pub namespace: String,
    /// Every partition the stream reads, in order of precedence (`""` is the global one).
    pub partitions: Vec<String>,
    /// The peer address, when known.
    pub peer: Option<String>,
    /// `sotw` or `delta`.
    pub protocol: String,
    /// When the stream opened, RFC 3339.
    pub connected_since: String,
    /// Per type, by type URL.
    pub types: Vec<TypeSync>,
}

/// What one stream knows of one type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypeSync {
    /// The type URL.
    pub type_url: String,
    /// `SYNCED`, `STALE`, `NACKED` or `NOT SENT`.
    pub state: String,
    /// `true` when subscribed to every resource of the type.
    pub wildcard: bool,
    /// The names subscribed to explicitly.
    pub names: Vec<String>,
    /// Version of the last response sent.
    pub sent_version: Option<String>,
    /// Nonce of the last response sent.
    pub sent_nonce: Option<String>,
    /// The last version the client ACKed.
    pub acked_version: Option<String>,
    /// The last NACK, until the next ACK.
    pub nack: Option<NackView>,
    /// Resources the client holds.
    pub n_resources: usize,
    /// ACKs received.
    pub n_acks: u64,
    /// NACKs received.
    pub n_nacks: u64,
}

/// A NACK as the client sent it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NackView {
    /// The version rejected.
    pub version: String,
    /// The nonce rejected.
    pub nonce: String,
    /// The client's `error_detail`.
    pub error_detail: ErrorDetail,
}

/// `google.rpc.Status` of a NACK.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// gRPC status code.
    pub code: i32,
    /// The client's message.
    pub message: String,
}

/// `/debug/syncz` from the registry.
pub fn sync_status(registry: &Registry) -> SyncStatus {
    SyncStatus {
        streams: registry.streams().iter().map(stream_sync).collect(),
    }
}

fn stream_sync(stream: &StreamStatus) -> StreamSync {
    StreamSync {
        stream_id: stream.stream_id,
        node_id: stream.node_id.clone(),
        node_cluster: stream.node_cluster.clone(),
        namespace: stream
            .partitions
            .iter()
            .find(|p| p.as_str() != GLOBAL_PARTITION)
            .cloned()
            .unwrap_or_default(),
        partitions: stream.partitions.clone(),
        peer: stream.peer.map(|p| p.to_string()),
        protocol: stream.protocol.as_str().to_string(),
        connected_since: humantime::format_rfc3339_seconds(stream.connected_since).to_string(),
        types: stream
            .types
            .iter()
            .map(|(type_url, status)| type_sync(type_url, status))
            .collect(),
    }
}

fn type_sync(type_url: &TypeUrl, status: &TypeStatus) -> TypeSync {
    TypeSync {
        type_url: type_url.to_string(),
        state: status.state().as_str().to_string(),
        wildcard: status.subscription.is_wildcard(),
        names: status
            .subscription
            .names()
            .iter()
            .map(|n| n.to_string())
            .collect(),
        sent_version: status.sent_version.as_ref().map(|v| v.to_string()),
        sent_nonce: status.sent_nonce.as_ref().map(|v| v.to_string()),
        acked_version: status.acked_version.as_ref().map(|v| v.to_string()),
        nack: status.nack.as_ref().map(|n| NackView {
            version: n.version.to_string(),
            nonce: n.nonce.to_string(),
            error_detail: ErrorDetail {
                code: n.code,
                message: n.message.clone(),
            },
        }),
        n_resources: status.resources.len(),
        n_acks: status.n_acks,
        n_nacks: status.n_nacks,
    }
}

/// Query parameters of `/debug/config_dump`; each one narrows the dump.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DumpFilter {
    /// A type URL, the message name at its end (`Metadata`), or a kind (`metadata`,
    /// `definition`).
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// A namespace (`""` selects the global partition).
    pub namespace: Option<String>,
    /// An application: its metadata, and definitions whose identifier ends with
    /// `:<application>` (Dubbo's `interface:version:group:side:application`).
    pub application: Option<String>,
}

/// `/debug/config_dump`: what the cache holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigDump {
    /// The snapshot sequence number this dump was taken at.
    pub snapshot_seq: u64,
    /// Resources, ordered by namespace, type URL and name.
    pub resources: Vec<DumpedResource>,
}

/// One cached resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DumpedResource {
    /// Its partition: the namespace, or `""` for resources every client sees.
    pub namespace: String,
    /// Its type URL.
    pub type_url: String,
    /// Its xDS resource name.
    pub name: String,
    /// Its content-derived version.
    pub version: String,
    /// `metadata` or `definition` for the service's own types.
    pub kind: Option<String>,
    /// The application (metadata only).
    pub application: Option<String>,
    /// The revision (metadata only).
    pub revision: Option<String>,
    /// The raw published value (metadata_info or service definition).
    pub value: Option<String>,
    /// Size of the packed resource, in bytes.
    pub size_bytes: usize,
}

fn kind_of(type_url: &str) -> Option<Kind> {
    Kind::ALL
        .into_iter()
        .find(|k| crate::push::type_url(*k) == type_url)
}

fn type_matches(wanted: &str, type_url: &str) -> bool {
    wanted == type_url
        || type_url.rsplit(['/', '.']).next() == Some(wanted)
        || kind_of(type_url).is_some_and(|k| k.as_str() == wanted)
}

/// Every type URL the server serves, from the lists of the modules that write them: its own
/// kinds, upstream's mapping, ECDS and the Envoy configuration directory's types.
fn served_type_urls() -> impl Iterator<Item = &'static str> {
    Kind::ALL
        .into_iter()
        .map(crate::push::type_url)
        .chain([
            crate::pb::UPSTREAM_MAPPING_TYPE_URL,
            crate::push::pixiu::ECDS_TYPE_URL,
        ])
        .chain(crate::push::envoy::TYPE_URLS)
}

/// The Pixiu types that travel only inside ECDS resources, never as resources of their own.
const INSIDE_ECDS: [&str; 2] = [
    crate::push::pixiu::LISTENERS_TYPE_URL,
    crate::push::pixiu::CLUSTERS_TYPE_URL,
];

/// Why a `/debug/config_dump` filter selects nothing the server could ever hold: a `type`
/// that names no type it serves (a typo would otherwise read as "nothing there"), or one of
/// the Pixiu types that only travel inside ECDS resources.
pub fn unknown_type(snapshot: &Snapshot, filter: &DumpFilter) -> Option<String> {
    let wanted = filter.type_.as_deref()?;
    if let Some(inner) = INSIDE_ECDS.iter().find(|t| type_matches(wanted, t)) {
        return Some(format!(
            "type {wanted:?} is not a resource of its own: {inner} travels inside the ECDS \
             resources ({}); give type=TypedExtensionConfig",
            crate::push::pixiu::ECDS_TYPE_URL
        ));
    }
    let known = served_type_urls().any(|t| type_matches(wanted, t))
        || snapshot
            .keys()
            .any(|(_, type_url)| type_matches(wanted, type_url.as_str()));
    (!known).then(|| {
        format!(
            "unknown type {wanted:?}: give a kind (metadata, definition, mapping), a message name \
             (Metadata, Listener, ...) or a type URL ({})",
            served_type_urls().collect::<Vec<_>>().join(", ")
        )
    })
}

/// Decodes one resource of the service's own types.
fn decode(namespace: &str, type_url: &TypeUrl, resource: &pixiu_xds::Resource) -> DumpedResource {
    let mut dumped = DumpedResource {
        namespace: namespace.to_string(),
        type_url: type_url.to_string(),
        name: resource.name.to_string(),
        version: resource.version.to_string(),
        kind: None,
        application: None,
        revision: None,
        value: None,
        size_bytes: resource.value().len(),
    };
    match kind_of(type_url.as_str()) {
        Some(Kind::Metadata) => {
            if let Ok(m) = proto::Metadata::decode(resource.value()) {
                dumped.kind = Some(Kind::Metadata.as_str().into());
                dumped.application = Some(m.application_name);
                dumped.revision = Some(m.revision);
                dumped.value = Some(m.metadata_info);
            }
        }
        Some(Kind::Definition) => {
            if let Ok(d) = proto::ServiceDefinition::decode(resource.value()) {
                dumped.kind = Some(Kind::Definition.as_str().into());
                dumped.value = Some(d.service_definition);
            }
        }
        Some(Kind::Mapping) => {
            if let Ok(m) = proto::ServiceMapping::decode(resource.value()) {
                dumped.kind = Some(Kind::Mapping.as_str().into());
                dumped.value = Some(m.application_names.join(","));
            }
        }
        None => {}
    }
    dumped
}

/// Whether a definition identifier belongs to `application` (Dubbo identifiers end with
/// `:<application>`).
fn definition_of(identifier: &str, application: &str) -> bool {
    identifier.rsplit(':').next() == Some(application)
}

/// `/debug/config_dump` from a snapshot.
pub fn config_dump(snapshot: &Snapshot, filter: &DumpFilter) -> ConfigDump {
    let mut resources = Vec::new();
    for (partition, type_url) in snapshot.keys() {
        if filter
            .namespace
            .as_ref()
            .is_some_and(|ns| ns != partition.as_str())
            || filter
                .type_
                .as_ref()
                .is_some_and(|t| !type_matches(t, type_url.as_str()))
        {
            continue;
        }
        for resource in snapshot.partition_resources(partition, type_url) {
            let dumped = decode(partition.as_str(), type_url, resource);
            if let Some(app) = &filter.application {
                let belongs = match dumped.kind.as_deref() {
                    Some("metadata") => dumped.application.as_ref() == Some(app),
                    Some("definition") => definition_of(&dumped.name, app),
                    _ => false,
                };
                if !belongs {
                    continue;
                }
            }
            resources.push(dumped);
        }
    }
    ConfigDump {
        snapshot_seq: snapshot.seq(),
        resources,
    }
}

/// `/api/overview`: everything the page shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overview {
    /// When this document was built, RFC 3339.
    pub generated_at: String,
    /// Whether the cache holds the store's full state.
    pub warmed: bool,
    /// The store backend.
    pub store: String,
    /// The snapshot sequence number.
    pub snapshot_seq: u64,
    /// Namespaces with their applications and definitions.
    pub namespaces: Vec<NamespaceView>,
    /// Connected clients.
    pub clients: Vec<StreamSync>,
    /// The latest pushes, newest first.
    pub pushes: Vec<PushEntry>,
}

/// One namespace on the page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamespaceView {
    /// Its name.
    pub name: String,
    /// Applications, by name.
    pub applications: Vec<ApplicationView>,
    /// Service definitions, by identifier.
    pub definitions: Vec<DefinitionView>,
}

/// One application and its revisions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplicationView {
    /// The application name.
    pub name: String,
    /// Its revisions, by name.
    pub revisions: Vec<RevisionView>,
}

/// One revision's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevisionView {
    /// The revision.
    pub revision: String,
    /// The xDS resource version.
    pub version: String,
    /// The raw metadata_info, its first [`OVERVIEW_VALUE_BYTES`] when `truncated`.
    pub metadata_info: String,
    /// The whole value's size.
    #[serde(default)]
    pub value_bytes: usize,
    /// Whether `metadata_info` was cut (the whole value is in `/debug/config_dump`).
    #[serde(default)]
    pub truncated: bool,
}

/// One service definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefinitionView {
    /// Its identifier.
    pub identifier: String,
    /// The xDS resource version.
    pub version: String,
    /// The raw definition, its first [`OVERVIEW_VALUE_BYTES`] when `truncated`.
    pub service_definition: String,
    /// The whole value's size.
    #[serde(default)]
    pub value_bytes: usize,
    /// Whether `service_definition` was cut (the whole value is in `/debug/config_dump`).
    #[serde(default)]
    pub truncated: bool,
}

/// One response written to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushEntry {
    /// When, RFC 3339.
    pub at: String,
    /// The stream.
    pub stream_id: u64,
    /// The client's node id.
    pub node_id: String,
    /// The type URL.
    pub type_url: String,
    /// The version sent.
    pub version: String,
    /// The nonce sent.
    pub nonce: String,
    /// Resources carried.
    pub n_resources: usize,
    /// `change` (a cache change was pushed) or `request` (a client asked).
    pub cause: String,
    /// For a change: milliseconds from the cache change to the response being written.
    pub latency_ms: Option<f64>,
}

/// The most of each value `/api/overview` carries: the page polls it every 2 s, so it must not
/// carry the whole store (values may be 1 MiB each).
pub const OVERVIEW_VALUE_BYTES: usize = 16 * 1024;

/// `value` cut to [`OVERVIEW_VALUE_BYTES`] on a character boundary: the text, the whole
/// size, whether it was cut.
pub(super) fn overview_value(value: Option<String>) -> (String, usize, bool) {
    let mut value = value.unwrap_or_default();
    let size = value.len();
    if size <= OVERVIEW_VALUE_BYTES {
        return (value, size, false);
    }
    let mut end = OVERVIEW_VALUE_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value.truncate(end);
    (value, size, true)
}

/// `/api/overview` from the snapshot, registry and push log.
pub fn overview(
    snapshot: &Snapshot,
    registry: &Registry,
    pushes: &PushLog,
    warmed: bool,
    store: &str,
) -> Overview {
    let mut namespaces: BTreeMap<String, NamespaceView> = BTreeMap::new();
    for resource in config_dump(snapshot, &DumpFilter::default()).resources {
        let Some(kind) = resource.kind.as_deref() else {
            continue;
        };
        let ns = namespaces
            .entry(resource.namespace.clone())
            .or_insert_with(|| NamespaceView {
                name: resource.namespace.clone(),
                applications: Vec::new(),
                definitions: Vec::new(),
            });
        if kind == "metadata" {
            let application = resource.application.unwrap_or_default();
            // Resources arrive ordered by name, `<application>/<revision>`: one pass groups them.
            if ns.applications.last().is_none_or(|a| a.name != application) {
                ns.applications.push(ApplicationView {
                    name: application,
                    revisions: Vec::new(),
                });
            }
            if let Some(app) = ns.applications.last_mut() {
                let (metadata_info, value_bytes, truncated) = overview_value(resource.value);
                app.revisions.push(RevisionView {
                    revision: resource.revision.unwrap_or_default(),
                    version: resource.version,
                    metadata_info,
                    value_bytes,
                    truncated,
                });
            }
        } else {
            let (service_definition, value_bytes, truncated) = overview_value(resource.value);
            ns.definitions.push(DefinitionView {
                identifier: resource.name,
                version: resource.version,
                service_definition,
                value_bytes,
                truncated,
            });
        }
    }
    Overview {
        generated_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        warmed,
        store: store.to_string(),
        snapshot_seq: snapshot.seq(),
        namespaces: namespaces.into_values().collect(),
        clients: sync_status(registry).streams,
        pushes: pushes.recent(),
    }
}

/// Sets the gauges that are read from state rather than counted: records per namespace,
/// connected clients, subscriptions per type.
pub fn refresh_gauges(metrics: &Metrics, snapshot: &Snapshot, registry: &Registry) {
    metrics.records.clear();
    for (partition, type_url) in snapshot.keys() {
        if partition.as_str() == GLOBAL_PARTITION {
            continue;
        }
        if let Some(kind) = kind_of(type_url.as_str()) {
            let n = snapshot.len(partition, type_url);
            metrics
                .records
                .get_or_create(&NamespaceLabels {
                    namespace: partition.to_string(),
                    kind: kind.as_str().to_string(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    let streams = registry.streams();
    metrics
        .xds_clients
        .set(i64::try_from(streams.len()).unwrap_or(i64::MAX));
    metrics.xds_subscriptions.clear();
    for type_url in streams.iter().flat_map(|s| s.types.keys()) {
        metrics
            .xds_subscriptions
            .get_or_create(&metrics.type_labels(type_url))
            .inc();
    }
}
