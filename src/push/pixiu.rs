//! Pixiu listeners and clusters from a watched directory, as the two ECDS resources Pixiu's
//! own xDS client (`api_type: GRPC`) subscribes to.
//!
//! `--pixiu-config-dir DIR` names a directory of Pixiu-style YAML (or JSON) files, each
//! holding `listeners` and `clusters` in the shape of Pixiu's own `conf.yaml` (at the top
//! level, or under `static_resources`). The union of all files becomes two
//! `envoy.config.core.v3.TypedExtensionConfig` resources in the [`PIXIU_PARTITION`]:
//! [`LISTENER_RESOURCE`] holding a `pixiu.api.v1.PixiuExtensionListeners` and
//! [`CLUSTER_RESOURCE`] holding a `pixiu.api.v1.PixiuExtensionClusters`.
//!
//! Pixiu applies each push as its complete state and panics on content it cannot read
//! (dubbo-go-pixiu `pixiu/pkg/config/xds/lds.go`, `cds.go`), and its newer client NACKs what
//! it refuses; so everything is checked here, before it is served:
//! - a listener has an address with a host and a port in 1..=65535, a known protocol and a
//!   filter chain with at least one named filter; the routes of an HTTP connection manager
//!   name a cluster; no two listeners share host, port and protocol (Pixiu renames listeners
//!   `host-port-protocol`, so they would collapse);
//! - a cluster has a unique name, a known discovery type and load-balancing policy, and
//!   EDS settings (required for `type: EDS`) carry `eds_config.api_config_source` with a
//!   known `api_type` and a `cluster_name`; endpoints have a host and a port and no two are
//!   the same.
//!
//! A file that fails these checks is refused as a whole (logged) and keeps its previous
//! content; a set whose files clash (a listener address or cluster name in two files) is
//! refused (logged) and the previous good set stays served. Both resources exist as soon as
//! the directory could be listed, so an operator who really empties it serves two empty
//! sets, while a directory that cannot be read serves nothing new.
//!
//! Resource versions are hashes of the encoded bytes (see `pixiu_xds::Version`); the
//! messages hold no hash maps (ordered maps and `prost_types::Struct`), so the same files
//! give the same versions after a restart or on another replica.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::Duration,
};

use envoy_types::pb::{envoy::config::core::v3::TypedExtensionConfig, google::protobuf::Any};
use pixiu_xds::{CacheWriter, Partition, ResourceName, TypeUrl, Update};
use prost::Message;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use super::{
    dir::{DirLoader, Format, Parser},
    doc::{Obj, ParseError, err},
};
use crate::pb::pixiu_api as api;

/// The partition of Pixiu's ECDS resources. Namespaces cannot contain `/`, so it never
/// collides with a namespace's partition.
pub const PIXIU_PARTITION: &str = "pixiu/ecds";
/// The type URL of ECDS resources.
pub const ECDS_TYPE_URL: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
/// The resource Pixiu subscribes to for its listeners (pixiu-api `pkg/xds/names.go`).
pub const LISTENER_RESOURCE: &str = "dubbo-go.pixiu/v1/discovery:listener";
/// The resource Pixiu subscribes to for its clusters.
pub const CLUSTER_RESOURCE: &str = "dubbo-go.pixiu/v1/discovery:cluster";
/// Type URL of the listeners inside [`LISTENER_RESOURCE`].
pub const LISTENERS_TYPE_URL: &str = "type.googleapis.com/pixiu.api.v1.PixiuExtensionListeners";
/// Type URL of the clusters inside [`CLUSTER_RESOURCE`].
pub const CLUSTERS_TYPE_URL: &str = "type.googleapis.com/pixiu.api.v1.PixiuExtensionClusters";
/// The network filter whose routes are checked to name a cluster.
pub const HTTP_CONNECTION_MANAGER: &str = "dgp.filter.httpconnectionmanager";

/// Pixiu's cluster discovery types (`pixiu/pkg/model/cluster.go`), in enum order.
pub const DISCOVERY_TYPES: [&str; 5] = ["Static", "StrictDNS", "LogicalDns", "EDS", "OriginalDst"];
/// Pixiu's load-balancing policies (`pixiu/pkg/model/lb.go`).
pub const LB_POLICIES: [&str; 4] = ["Rand", "RoundRobin", "RingHashing", "MaglevHashing"];
/// Pixiu's API types of a config source (`pixiu/pkg/model/base.go`).
pub const API_TYPES: [&str; 4] = ["REST", "GRPC", "DUBBO", "ISTIO"];

/// Where Pixiu resources come from.
#[derive(Debug, Clone)]
pub struct PixiuConfig {
    /// The watched directory (default none: no ECDS resources are served).
    pub config_dir: Option<PathBuf>,
    /// How often the directory is scanned for changes (default 1 s).
    pub poll_interval: Duration,
}

impl Default for PixiuConfig {
    fn default() -> Self {
        Self {
            config_dir: None,
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// One listener or cluster of a file.
#[derive(Debug, Clone, PartialEq)]
pub enum PixiuItem {
    /// A listener.
    Listener(api::Listener),
    /// A cluster.
    Cluster(api::Cluster),
}

/// The parser of Pixiu config files.
#[derive(Debug)]
pub struct PixiuParser;

impl Parser for PixiuParser {
    type Item = PixiuItem;
    const KIND: &'static str = "pixiu";
    fn parse(text: &str, format: Format) -> Result<Vec<PixiuItem>, ParseError> {
        parse(text, format)
    }
}

/// Parses and checks the listeners and clusters of one file.
pub fn parse(text: &str, format: Format) -> Result<Vec<PixiuItem>, ParseError> {
    let document: Value = match format {
        Format::Json => serde_json::from_str(text).map_err(|e| err("", e))?,
        Format::Yaml => serde_norway::from_str(text).map_err(|e| err("", e))?,
    };
    if document.is_null() {
        return Ok(Vec::new());
    }
    let top = Obj::new(
        &document,
        "",
        &["static_resources", "listeners", "clusters"],
    )?;
    let resources = match top.opt_obj("static_resources", &["listeners", "clusters"])? {
        Some(inner) => {
            if top.get("listeners").is_some() || top.get("clusters").is_some() {
                return Err(err(
                    "",
                    "set listeners and clusters either at the top or under static_resources",
                ));
            }
            inner
        }
        None => top,
    };
    let mut items = Vec::new();
    for listener_obj in resources.objs(
        "listeners",
        &["name", "protocol_type", "address", "filter_chains"],
    )? {
        items.push(PixiuItem::Listener(listener(&listener_obj)?));
    }
    for cluster_obj in resources.objs(
        "clusters",
        &[
            "name",
            "type",
            "lb_policy",
            "eds_cluster_config",
            "endpoints",
        ],
    )? {
        items.push(PixiuItem::Cluster(cluster(&cluster_obj)?));
    }
    check_set(items.iter().map(|item| ("", item)))?;
    Ok(items)
}

fn listener(obj: &Obj<'_>) -> Result<api::Listener, ParseError> {
    let protocol = match obj.get("protocol_type") {
        None => api::listener::Protocols::Http,
        Some(_) => {
            let name = obj.string("protocol_type")?;
            api::listener::Protocols::from_str_name(&name.to_ascii_uppercase()).ok_or_else(
                || {
                    err(
                        &obj.sub("protocol_type"),
                        format!(
                            "unknown protocol {name:?} (HTTP, TCP, UDP, HTTPS, GRPC, HTTP2, TRIPLE)"
                        ),
                    )
                },
            )?
        }
    };
    let address = obj.obj("address", &["socket_address", "name"])?;
    let socket = socket_address(&address.obj(
        "socket_address",
        &["address", "port", "resolver_name", "domains", "certs_dir"],
    )?)?;
    let chain = obj.obj("filter_chains", &["filters"])?;
    let filters = chain
        .objs("filters", &["name", "config"])?
        .into_iter()
        .map(|filter| network_filter(&filter))
        .collect::<Result<Vec<_>, _>>()?;
    if filters.is_empty() {
        return Err(err(&chain.sub("filters"), "a filter chain needs a filter"));
    }
    Ok(api::Listener {
        name: obj.string("name")?,
        address: Some(api::Address {
            socket_address: Some(socket),
            name: address.string("name")?,
        }),
        filter_chain: Some(api::FilterChain { filters }),
        protocol: protocol as i32,
    })
}

fn network_filter(obj: &Obj<'_>) -> Result<api::NetworkFilter, ParseError> {
    let name = obj.string("name")?;
    if name.trim().is_empty() {
        return Err(err(&obj.sub("name"), "a filter needs a name"));
    }
    let config = match obj.get("config") {
        None => None,
        Some(Value::Object(map)) => {
            if name == HTTP_CONNECTION_MANAGER {
                check_routes(
                    obj.get("config").unwrap_or(&Value::Null),
                    &obj.sub("config"),
                )?;
            }
            Some(api::network_filter::Config::Struct(to_struct(map)))
        }
        Some(_) => return Err(err(&obj.sub("config"), "expected an object")),
    };
    Ok(api::NetworkFilter { name, config })
}

/// Every route of an HTTP connection manager names a cluster.
fn check_routes(config: &Value, path: &str) -> Result<(), ParseError> {
    let routes = config
        .get("route_config")
        .and_then(|r| r.get("routes"))
        .and_then(Value::as_array);
    for (i, route) in routes.into_iter().flatten().enumerate() {
        let cluster = route
            .get("route")
            .and_then(|r| r.get("cluster"))
            .and_then(Value::as_str)
            .unwrap_or("");
        if cluster.trim().is_empty() || cluster.trim() != cluster {
            return Err(err(
                &format!("{path}.route_config.routes[{i}].route.cluster"),
                "a route needs a cluster name (without surrounding spaces)",
            ));
        }
    }
    Ok(())
}

fn socket_address(obj: &Obj<'_>) -> Result<api::SocketAddress, ParseError> {
    let address = obj.string("address")?;
    if address.trim().is_empty() || address.trim() != address {
        return Err(err(
            &obj.sub("address"),
            "a host is required (without spaces)",
        ));
    }
    let port = obj.u32("port")?;
    if !(1..=65535).contains(&port) {
        return Err(err(&obj.sub("port"), "a port from 1 to 65535 is required"));
    }
    Ok(api::SocketAddress {
        address,
        port: i64::from(port),
        resolver_name: obj.string("resolver_name")?,
        domains: obj.strings("domains")?,
        certs_dir: obj.string("certs_dir")?,
    })
}

fn one_of(obj: &Obj<'_>, key: &str, allowed: &[&str]) -> Result<String, ParseError> {
    let value = obj.string(key)?;
    if !value.is_empty() && !allowed.contains(&value.as_str()) {
        return Err(err(
            &obj.sub(key),
            format!("unknown value {value:?} (one of {})", allowed.join(", ")),
        ));
    }
    Ok(value)
}

fn cluster(obj: &Obj<'_>) -> Result<api::Cluster, ParseError> {
    let name = obj.string("name")?;
    if name.trim().is_empty() || name.trim() != name {
        return Err(err(
            &obj.sub("name"),
            "a cluster needs a name (without surrounding spaces)",
        ));
    }
    let mut type_str = one_of(obj, "type", &DISCOVERY_TYPES)?;
    if type_str.is_empty() {
        type_str = "Static".to_string();
    }
    let discovery_type = DISCOVERY_TYPES
        .iter()
        .position(|t| *t == type_str)
        .and_then(|i| i32::try_from(i).ok())
        .unwrap_or(0);
    let lb_str = one_of(obj, "lb_policy", &LB_POLICIES)?;
    let eds_cluster_config = obj
        .opt_obj("eds_cluster_config", &["eds_config", "service_name"])?
        .map(|eds| eds_cluster_config(&eds))
        .transpose()?;
    if type_str == "EDS" && eds_cluster_config.is_none() {
        return Err(err(
            &obj.sub("eds_cluster_config"),
            "an EDS cluster needs eds_cluster_config.eds_config.api_config_source",
        ));
    }
    let mut seen = BTreeSet::new();
    let endpoints = obj
        .objs("endpoints", &["id", "ID", "name", "socket_address", "meta"])?
        .into_iter()
        .map(|endpoint| {
            let address = socket_address(&endpoint.obj(
                "socket_address",
                &["address", "port", "resolver_name", "domains", "certs_dir"],
            )?)?;
            if !seen.insert((address.address.clone(), address.port)) {
                return Err(err(
                    &endpoint.sub("socket_address"),
                    format!("duplicate endpoint {}:{}", address.address, address.port),
                ));
            }
            let id = match (endpoint.get("id"), endpoint.get("ID")) {
                (Some(_), Some(_)) => return Err(err(&endpoint.path, "set one of id and ID")),
                (Some(v), None) | (None, Some(v)) => scalar(v)
                    .ok_or_else(|| err(&endpoint.sub("id"), "expected a string or a number"))?,
                (None, None) => String::new(),
            };
            let metadata = match endpoint.get("meta") {
                None => BTreeMap::new(),
                Some(Value::Object(map)) => map
                    .iter()
                    .map(|(k, v)| {
                        scalar(v).map(|v| (k.clone(), v)).ok_or_else(|| {
                            err(
                                &format!("{}.{k}", endpoint.sub("meta")),
                                "expected a string",
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(err(&endpoint.sub("meta"), "expected an object")),
            };
            Ok(api::Endpoint {
                id,
                name: endpoint.string("name")?,
                address: Some(address),
                metadata,
            })
        })
        .collect::<Result<Vec<_>, ParseError>>()?;
    Ok(api::Cluster {
        name,
        type_str,
        r#type: discovery_type,
        eds_cluster_config,
        lb_str,
        lb: 0,
        health_checks: Vec::new(),
        endpoints,
    })
}

fn eds_cluster_config(obj: &Obj<'_>) -> Result<api::EdsClusterConfig, ParseError> {
    let source = obj.obj("eds_config", &["path", "api_config_source"])?;
    let api_source = source.obj(
        "api_config_source",
        &[
            "api_type",
            "cluster_name",
            "refresh_delay",
            "request_timeout",
        ],
    )?;
    let api_type = api_source.string("api_type")?;
    if !API_TYPES.contains(&api_type.as_str()) {
        return Err(err(
            &api_source.sub("api_type"),
            format!(
                "unknown api_type {api_type:?} (one of {})",
                API_TYPES.join(", ")
            ),
        ));
    }
    let cluster_name = api_source.strings("cluster_name")?;
    if cluster_name.is_empty() || cluster_name.iter().any(|c| c.trim().is_empty()) {
        return Err(err(
            &api_source.sub("cluster_name"),
            "name at least one cluster",
        ));
    }
    Ok(api::EdsClusterConfig {
        eds_config: Some(api::ConfigSource {
            path: source.string("path")?,
            api_config_source: Some(api::ApiConfigSource {
                api_type_str: api_type,
                cluster_name,
                refresh_delay: api_source.string("refresh_delay")?,
                request_timeout: api_source.string("request_timeout")?,
            }),
        }),
        service_name: obj.string("service_name")?,
    })
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn to_struct(map: &serde_json::Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
    }
}

fn to_value(value: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(to_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// The key under which Pixiu knows a listener: it renames every listener
/// `host-port-protocol` (`resolveListenerName` in `lds.go`).
fn listener_key(listener: &api::Listener) -> String {
    let socket = listener
        .address
        .as_ref()
        .and_then(|a| a.socket_address.as_ref());
    let protocol =
        api::listener::Protocols::try_from(listener.protocol).map_or("HTTP", |p| p.as_str_name());
    match socket {
        Some(s) => format!("{}-{}-{protocol}", s.address, s.port),
        None => format!("?-?-{protocol}"),
    }
}

/// Checks what must hold across a whole set: no two listeners Pixiu would collapse, no two
/// clusters of one name. `items` come with the file they are from, for the message.
fn check_set<'a>(items: impl Iterator<Item = (&'a str, &'a PixiuItem)>) -> Result<(), ParseError> {
    let mut listeners: BTreeMap<String, &str> = BTreeMap::new();
    let mut clusters: BTreeMap<&str, &str> = BTreeMap::new();
    for (file, item) in items {
        let (kind, key, first) = match item {
            PixiuItem::Listener(listener) => {
                let key = listener_key(listener);
                let first = listeners.insert(key.clone(), file);
                ("listener address", key, first)
            }
            PixiuItem::Cluster(cluster) => {
                let first = clusters.insert(&cluster.name, file);
                ("cluster name", cluster.name.clone(), first)
            }
        };
        if let Some(first) = first {
            let place = if first.is_empty() && file.is_empty() {
                String::new()
            } else {
                format!(" (in {first} and {file})")
            };
            return Err(err("", format!("duplicate {kind} {key:?}{place}")));
        }
    }
    Ok(())
}

/// The two ECDS resources of a set of items, in file order.
pub fn resources<'a>(items: impl Iterator<Item = &'a PixiuItem>) -> [(ResourceName, Any); 2] {
    let mut listeners = api::PixiuExtensionListeners::default();
    let mut clusters = api::PixiuExtensionClusters::default();
    for item in items {
        match item {
            PixiuItem::Listener(l) => listeners.listeners.push(l.clone()),
            PixiuItem::Cluster(c) => clusters.clusters.push(c.clone()),
        }
    }
    let pack = |name: &str, type_url: &str, value: Vec<u8>| {
        let config = TypedExtensionConfig {
            name: name.to_string(),
            typed_config: Some(Any {
                type_url: type_url.to_string(),
                value,
            }),
        };
        (
            ResourceName::new(name),
            Any {
                type_url: ECDS_TYPE_URL.to_string(),
                value: config.encode_to_vec(),
            },
        )
    };
    [
        pack(
            LISTENER_RESOURCE,
            LISTENERS_TYPE_URL,
            listeners.encode_to_vec(),
        ),
        pack(
            CLUSTER_RESOURCE,
            CLUSTERS_TYPE_URL,
            clusters.encode_to_vec(),
        ),
    ]
}

/// The cache update that serves the directory's current set, or the error that refuses it.
pub fn update(loader: &DirLoader<PixiuParser>) -> Result<Update, ParseError> {
    let files: Vec<(String, &PixiuItem)> = loader
        .files()
        .flat_map(|(path, items)| {
            let file = path.display().to_string();
            items.iter().map(move |item| (file.clone(), item))
        })
        .collect();
    check_set(files.iter().map(|(file, item)| (file.as_str(), *item)))?;
    Ok(Update::ReplaceType {
        partition: Partition::new(PIXIU_PARTITION),
        type_url: TypeUrl::new(ECDS_TYPE_URL),
        resources: resources(files.iter().map(|(_, item)| *item)).into(),
    })
}

fn publish(loader: &DirLoader<PixiuParser>, writer: &CacheWriter) {
    if !loader.listed() {
        return;
    }
    match update(loader) {
        Ok(update) => {
            let seq = writer.apply([update]);
            info!(snapshot.seq = seq, dir = %loader.dir().display(), "pixiu resources published");
        }
        Err(error) => {
            error!(dir = %loader.dir().display(), %error, "pixiu config set refused; the previous good set stays served");
        }
    }
}

/// Loads `config.config_dir` into the cache once, then spawns the task that follows it until
/// `shutdown`. Does nothing without a directory.
pub fn start(
    config: &PixiuConfig,
    writer: CacheWriter,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let dir = config.config_dir.clone()?;
    let mut loader = DirLoader::<PixiuParser>::new(dir);
    loader.scan();
    publish(&loader, &writer);
    debug!("pixiu resources loaded");
    Some(super::dir::follow(
        loader,
        config.poll_interval,
        shutdown,
        move |loader| publish(loader, &writer),
    ))
}

#[cfg(test)]
mod tests;
