//! Standard Envoy resources from a watched directory, into the [`GLOBAL_PARTITION`].
//!
//! `--envoy-config-dir DIR` names a directory of YAML (`.yaml`, `.yml`) or JSON (`.json`) files,
//! each holding `Listener`, `RouteConfiguration`, `Cluster` and `ClusterLoadAssignment`
//! resources. They are served to every client, so real gRPC xDS clients (`xds:///` targets)
//! and Envoy can use this server beside the metadata resources.
//!
//! A file holds one resource (an object with `"@type"`), a list of them, or an object with a
//! `resources` list, as in Envoy's bootstrap `static_resources`. Resources are written in the
//! protobuf JSON form of the Envoy API (snake_case field names, enums by name, durations as
//! `"1.5s"`, `Any` with `"@type"`). envoy-types' messages have no serde support, so the
//! mapping is explicit and covers the fields listed in `docs/protocol.md`; any other field is
//! an error naming its path, never silently dropped.
//!
//! The directory is watched by [`super::dir`] (polling every [`EnvoyConfig::poll_interval`];
//! a file that fails to read or parse keeps its previous good resources). After a scan
//! that changed anything, the four types are replaced together in one cache batch
//! ([`Update::ReplaceType`]), so a client never sees a listener without its route.
//! When two files define the same type and name, the first file in path order wins and the
//! clash is logged.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{
                Cluster,
                cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy},
            },
            core::v3::{
                Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality,
                SelfConfigSource, SocketAddress, address, config_source::ConfigSourceSpecifier,
                socket_address,
            },
            endpoint::v3::{
                ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
                lb_endpoint::HostIdentifier,
            },
            listener::v3::{ApiListener, Listener},
            route::v3::{
                Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
                route, route_action::ClusterSpecifier, route_match::PathSpecifier,
                weighted_cluster::ClusterWeight,
            },
        },
        extensions::filters::{
            http::router::v3::Router,
            network::http_connection_manager::v3::{
                HttpConnectionManager, HttpFilter, Rds,
                http_connection_manager::{CodecType, RouteSpecifier},
                http_filter::ConfigType,
            },
        },
    },
    google::protobuf::Any,
};
use pixiu_xds::{CacheWriter, Partition, ResourceName, TypeUrl, Update};
use prost::Message;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    GLOBAL_PARTITION,
    doc::{Obj, err},
};
pub use super::{dir::Format, doc::ParseError};

/// Type URL of `envoy.config.listener.v3.Listener`.
pub const LISTENER_TYPE_URL: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of `envoy.config.route.v3.RouteConfiguration`.
pub const ROUTE_TYPE_URL: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Type URL of `envoy.config.cluster.v3.Cluster`.
pub const CLUSTER_TYPE_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of `envoy.config.endpoint.v3.ClusterLoadAssignment`.
pub const ENDPOINT_TYPE_URL: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Type URL of the HTTP connection manager, the only supported `api_listener`.
pub const HCM_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
/// Type URL of the router HTTP filter, the only supported `http_filters[].typed_config`.
pub const ROUTER_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

/// The four types this module loads, in the order they are replaced.
pub const TYPE_URLS: [&str; 4] = [
    LISTENER_TYPE_URL,
    ROUTE_TYPE_URL,
    CLUSTER_TYPE_URL,
    ENDPOINT_TYPE_URL,
];

/// Where Envoy resources come from.
#[derive(Debug, Clone)]
pub struct EnvoyConfig {
    /// The watched directory (default none: no Envoy resources are served).
    pub config_dir: Option<PathBuf>,
    /// How often the directory is scanned for changes (default 1 s).
    pub poll_interval: Duration,
}

impl Default for EnvoyConfig {
    fn default() -> Self {
        Self {
            config_dir: None,
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// One parsed resource.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvoyResource {
    /// One of [`TYPE_URLS`].
    pub type_url: &'static str,
    /// The resource name (`cluster_name` for a `ClusterLoadAssignment`).
    pub name: String,
    /// The encoded message.
    pub body: Any,
}

/// The parser of Envoy resource files.
#[derive(Debug)]
pub struct EnvoyParser;

impl super::dir::Parser for EnvoyParser {
    type Item = EnvoyResource;
    const KIND: &'static str = "envoy";
    fn parse(text: &str, format: Format) -> Result<Vec<EnvoyResource>, ParseError> {
        parse(text, format)
    }
}

/// The Envoy resources of a directory, file by file.
pub type DirLoader = super::dir::DirLoader<EnvoyParser>;

/// Parses the resources of one file.
pub fn parse(text: &str, format: Format) -> Result<Vec<EnvoyResource>, ParseError> {
    let document: Value = match format {
        Format::Json => serde_json::from_str(text).map_err(|e| err("", e))?,
        Format::Yaml => serde_norway::from_str(text).map_err(|e| err("", e))?,
    };
    let items: Vec<(String, &Value)> = match &document {
        Value::Null => Vec::new(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("[{i}]"), v))
            .collect(),
        Value::Object(map) if map.contains_key("@type") => vec![(String::new(), &document)],
        Value::Object(_) => {
            let top = Obj::new(&document, "", &["resources"])?;
            top.list("resources")?
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("resources[{i}]"), v))
                .collect()
        }
        _ => {
            return Err(err(
                "",
                "expected a resource, a list, or {resources: [...]}",
            ));
        }
    };
    items
        .into_iter()
        .map(|(path, value)| resource(value, &path))
        .collect()
}

fn resource(value: &Value, path: &str) -> Result<EnvoyResource, ParseError> {
    let type_url = value
        .get("@type")
        .and_then(Value::as_str)
        .ok_or_else(|| err(path, "missing \"@type\""))?;
    let (type_url, name, value) = match type_url {
        LISTENER_TYPE_URL => {
            let listener = listener(value, path)?;
            (
                LISTENER_TYPE_URL,
                listener.name.clone(),
                listener.encode_to_vec(),
            )
        }
        ROUTE_TYPE_URL => {
            let route = route_configuration(value, path, true)?;
            (ROUTE_TYPE_URL, route.name.clone(), route.encode_to_vec())
        }
        CLUSTER_TYPE_URL => {
            let (cluster, metadata) = cluster(value, path)?;
            let mut bytes = cluster.encode_to_vec();
            // Fields may come in any order on the wire: the metadata, encoded from ordered
            // maps, is appended so the bytes (and the version) do not depend on hash order.
            if let Some(metadata) = metadata {
                prost::encoding::message::encode(CLUSTER_METADATA_TAG, &metadata, &mut bytes);
            }
            (CLUSTER_TYPE_URL, cluster.name.clone(), bytes)
        }
        ENDPOINT_TYPE_URL => {
            let cla = cluster_load_assignment(value, path)?;
            (
                ENDPOINT_TYPE_URL,
                cla.cluster_name.clone(),
                cla.encode_to_vec(),
            )
        }
        other => return Err(err(path, format!("unsupported \"@type\" {other:?}"))),
    };
    if name.is_empty() {
        return Err(err(path, "the resource has no name"));
    }
    Ok(EnvoyResource {
        type_url,
        name,
        body: Any {
            type_url: type_url.to_string(),
            value,
        },
    })
}

fn listener(value: &Value, path: &str) -> Result<Listener, ParseError> {
    let obj = Obj::new(value, path, &["@type", "name", "api_listener"])?;
    let api_listener = obj
        .opt_obj("api_listener", &["api_listener"])?
        .map(|api| -> Result<ApiListener, ParseError> {
            let hcm = api.obj("api_listener", &[])?;
            Ok(ApiListener {
                api_listener: Some(http_connection_manager(hcm.value, &hcm.path)?),
            })
        })
        .transpose()?;
    Ok(Listener {
        name: obj.string("name")?,
        api_listener,
        ..Default::default()
    })
}

fn http_connection_manager(value: &Value, path: &str) -> Result<Any, ParseError> {
    let obj = Obj::new(
        value,
        path,
        &[
            "@type",
            "stat_prefix",
            "codec_type",
            "rds",
            "route_config",
            "http_filters",
        ],
    )?;
    obj.expect_type(HCM_TYPE_URL)?;
    let route_specifier = match (
        obj.opt_obj("rds", &["route_config_name", "config_source"])?,
        obj.get("route_config"),
    ) {
        (Some(_), Some(_)) => return Err(err(path, "set one of rds and route_config")),
        (Some(rds), None) => Some(RouteSpecifier::Rds(Rds {
            route_config_name: rds.string("route_config_name")?,
            config_source: Some(config_source(&rds.obj("config_source", &[])?)?),
        })),
        (None, Some(inline)) => Some(RouteSpecifier::RouteConfig(route_configuration(
            inline,
            &obj.sub("route_config"),
            false,
        )?)),
        (None, None) => None,
    };
    let http_filters = obj
        .list("http_filters")?
        .into_iter()
        .enumerate()
        .map(|(i, filter)| {
            let path = format!("{}[{i}]", obj.sub("http_filters"));
            let filter = Obj::new(filter, &path, &["name", "typed_config", "is_optional"])?;
            let config_type = filter
                .opt_obj("typed_config", &["@type"])?
                .map(|typed| -> Result<ConfigType, ParseError> {
                    typed.expect_type(ROUTER_TYPE_URL)?;
                    Ok(ConfigType::TypedConfig(Any {
                        type_url: ROUTER_TYPE_URL.to_string(),
                        value: Router::default().encode_to_vec(),
                    }))
                })
                .transpose()?;
            Ok(HttpFilter {
                name: filter.string("name")?,
                is_optional: filter.bool("is_optional")?,
                config_type,
                ..Default::default()
            })
        })
        .collect::<Result<_, ParseError>>()?;
    let hcm = HttpConnectionManager {
        stat_prefix: obj.string("stat_prefix")?,
        codec_type: obj.enumeration("codec_type", CodecType::from_str_name)?,
        route_specifier,
        http_filters,
        ..Default::default()
    };
    Ok(Any {
        type_url: HCM_TYPE_URL.to_string(),
        value: hcm.encode_to_vec(),
    })
}

fn route_configuration(
    value: &Value,
    path: &str,
    top_level: bool,
) -> Result<RouteConfiguration, ParseError> {
    let allowed: &[&str] = if top_level {
        &["@type", "name", "virtual_hosts"]
    } else {
        &["name", "virtual_hosts"]
    };
    let obj = Obj::new(value, path, allowed)?;
    let virtual_hosts = obj
        .objs("virtual_hosts", &["name", "domains", "routes"])?
        .into_iter()
        .map(|vh| {
            let routes = vh
                .objs("routes", &["name", "match", "route"])?
                .into_iter()
                .map(|r| route_entry(&r))
                .collect::<Result<_, _>>()?;
            Ok(VirtualHost {
                name: vh.string("name")?,
                domains: vh.strings("domains")?,
                routes,
                ..Default::default()
            })
        })
        .collect::<Result<_, ParseError>>()?;
    Ok(RouteConfiguration {
        name: obj.string("name")?,
        virtual_hosts,
        ..Default::default()
    })
}

fn route_entry(obj: &Obj<'_>) -> Result<Route, ParseError> {
    let matcher = obj.obj("match", &["prefix", "path"])?;
    let path_specifier = match (matcher.get("prefix"), matcher.get("path")) {
        (Some(_), Some(_)) => return Err(err(&matcher.path, "set one of prefix and path")),
        (Some(_), None) => Some(PathSpecifier::Prefix(matcher.string("prefix")?)),
        (None, Some(_)) => Some(PathSpecifier::Path(matcher.string("path")?)),
        (None, None) => return Err(err(&matcher.path, "set prefix or path")),
    };
    let action = obj.obj("route", &["cluster", "weighted_clusters", "timeout"])?;
    let cluster_specifier = match (action.get("cluster"), action.get("weighted_clusters")) {
        (Some(_), Some(_)) => {
            return Err(err(
                &action.path,
                "set one of cluster and weighted_clusters",
            ));
        }
        (Some(_), None) => ClusterSpecifier::Cluster(action.string("cluster")?),
        (None, Some(_)) => {
            let weighted = action.obj("weighted_clusters", &["clusters"])?;
            let clusters = weighted
                .objs("clusters", &["name", "weight"])?
                .into_iter()
                .map(|c| {
                    Ok(ClusterWeight {
                        name: c.string("name")?,
                        weight: c.uint32_value("weight")?,
                        ..Default::default()
                    })
                })
                .collect::<Result<_, ParseError>>()?;
            ClusterSpecifier::WeightedClusters(WeightedCluster {
                clusters,
                ..Default::default()
            })
        }
        (None, None) => return Err(err(&action.path, "set cluster or weighted_clusters")),
    };
    Ok(Route {
        name: obj.string("name")?,
        r#match: Some(RouteMatch {
            path_specifier,
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(cluster_specifier),
            timeout: action.duration("timeout")?,
            ..Default::default()
        })),
        ..Default::default()
    })
}

/// The field number of `Cluster.metadata`.
const CLUSTER_METADATA_TAG: u32 = 25;

/// `envoy.config.core.v3.Metadata` with ordered maps, so that it encodes deterministically
/// (envoy-types' own uses hash maps).
#[derive(Clone, PartialEq, prost::Message)]
struct OrderedMetadata {
    #[prost(btree_map = "string, message", tag = "1")]
    filter_metadata: BTreeMap<String, prost_types::Struct>,
}

/// `metadata: {filter_metadata: {...}}` of a cluster. When set, it must name the cluster's
/// service as `filter_metadata.istio.services[0].name`, where Pixiu's `ISTIO` mode reads it
/// without checking (`readServiceNameOfCluster` in dubbo-go-pixiu's `grpc_envoy.go`).
fn cluster_metadata(obj: &Obj<'_>) -> Result<OrderedMetadata, ParseError> {
    let filters = obj.obj("filter_metadata", &[])?;
    let Value::Object(map) = filters.value else {
        return Err(err(&filters.path, "expected an object"));
    };
    let service_name = map
        .get("istio")
        .and_then(|istio| istio.get("services"))
        .and_then(Value::as_array)
        .and_then(|services| services.first())
        .and_then(|service| service.get("name"))
        .and_then(Value::as_str);
    if service_name.is_none_or(str::is_empty) {
        return Err(err(
            &filters.path,
            "cluster metadata needs istio.services[0].name (Pixiu's ISTIO mode reads it)",
        ));
    }
    let filter_metadata = map
        .iter()
        .map(|(name, value)| match value {
            Value::Object(fields) => Ok((name.clone(), json_struct(fields))),
            _ => Err(err(
                &format!("{}.{name}", filters.path),
                "expected an object",
            )),
        })
        .collect::<Result<_, _>>()?;
    Ok(OrderedMetadata { filter_metadata })
}

fn json_struct(map: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_value(v)))
            .collect(),
    }
}

fn json_value(value: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(json_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn cluster(value: &Value, path: &str) -> Result<(Cluster, Option<OrderedMetadata>), ParseError> {
    let obj = Obj::new(
        value,
        path,
        &[
            "@type",
            "name",
            "type",
            "eds_cluster_config",
            "lb_policy",
            "connect_timeout",
            "metadata",
        ],
    )?;
    let metadata = obj
        .opt_obj("metadata", &["filter_metadata"])?
        .map(|m| cluster_metadata(&m))
        .transpose()?;
    let eds_cluster_config = obj
        .opt_obj("eds_cluster_config", &["service_name", "eds_config"])?
        .map(|eds| -> Result<EdsClusterConfig, ParseError> {
            Ok(EdsClusterConfig {
                service_name: eds.string("service_name")?,
                eds_config: Some(config_source(&eds.obj("eds_config", &[])?)?),
            })
        })
        .transpose()?;
    let discovery_type = obj
        .get("type")
        .map(|_| obj.enumeration("type", DiscoveryType::from_str_name))
        .transpose()?
        .map(ClusterDiscoveryType::Type);
    let cluster = Cluster {
        name: obj.string("name")?,
        cluster_discovery_type: discovery_type,
        eds_cluster_config,
        lb_policy: obj.enumeration("lb_policy", LbPolicy::from_str_name)?,
        connect_timeout: obj.duration("connect_timeout")?,
        ..Default::default()
    };
    Ok((cluster, metadata))
}

fn config_source(obj: &Obj<'_>) -> Result<ConfigSource, ParseError> {
    let obj = Obj::new(
        obj.value,
        &obj.path,
        &["ads", "self", "resource_api_version"],
    )?;
    let specifier = match (obj.opt_obj("ads", &[])?, obj.opt_obj("self", &[])?) {
        (Some(_), None) => ConfigSourceSpecifier::Ads(AggregatedConfigSource {}),
        (None, Some(_)) => ConfigSourceSpecifier::Self_(SelfConfigSource::default()),
        _ => return Err(err(&obj.path, "set one of ads: {} and self: {}")),
    };
    Ok(ConfigSource {
        config_source_specifier: Some(specifier),
        resource_api_version: obj.enumeration("resource_api_version", ApiVersion::from_str_name)?,
        ..Default::default()
    })
}

fn cluster_load_assignment(value: &Value, path: &str) -> Result<ClusterLoadAssignment, ParseError> {
    let obj = Obj::new(value, path, &["@type", "cluster_name", "endpoints"])?;
    let endpoints = obj
        .objs(
            "endpoints",
            &[
                "locality",
                "lb_endpoints",
                "load_balancing_weight",
                "priority",
            ],
        )?
        .into_iter()
        .map(|group| {
            let locality = group
                .opt_obj("locality", &["region", "zone", "sub_zone"])?
                .map(|l| -> Result<Locality, ParseError> {
                    Ok(Locality {
                        region: l.string("region")?,
                        zone: l.string("zone")?,
                        sub_zone: l.string("sub_zone")?,
                    })
                })
                .transpose()?;
            let lb_endpoints = group
                .objs(
                    "lb_endpoints",
                    &["endpoint", "health_status", "load_balancing_weight"],
                )?
                .into_iter()
                .map(|lb| lb_endpoint(&lb))
                .collect::<Result<Vec<_>, _>>()?;
            // Pixiu's ISTIO mode reads `lb_endpoints[0]` of every locality unchecked.
            if lb_endpoints.is_empty() {
                return Err(err(
                    &group.sub("lb_endpoints"),
                    "a locality needs at least one endpoint",
                ));
            }
            Ok(LocalityLbEndpoints {
                locality,
                lb_endpoints,
                load_balancing_weight: group.uint32_value("load_balancing_weight")?,
                priority: group.u32("priority")?,
                ..Default::default()
            })
        })
        .collect::<Result<_, ParseError>>()?;
    Ok(ClusterLoadAssignment {
        cluster_name: obj.string("cluster_name")?,
        endpoints,
        ..Default::default()
    })
}

fn lb_endpoint(obj: &Obj<'_>) -> Result<LbEndpoint, ParseError> {
    let endpoint = obj.obj("endpoint", &["address"])?;
    let address = endpoint.obj("address", &["socket_address"])?;
    let socket = address.obj("socket_address", &["address", "port_value"])?;
    Ok(LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: socket.string("address")?,
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(
                        socket.u32("port_value")?,
                    )),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        health_status: obj.enumeration("health_status", HealthStatus::from_str_name)?,
        load_balancing_weight: obj.uint32_value("load_balancing_weight")?,
        ..Default::default()
    })
}

// === the watched directory ===

/// The complete new sets of the four types, for one atomic cache batch.
pub fn updates(loader: &DirLoader) -> Vec<Update> {
    let mut sets: BTreeMap<&'static str, BTreeMap<&str, (&Path, &Any)>> =
        TYPE_URLS.iter().map(|t| (*t, BTreeMap::new())).collect();
    for (path, resources) in loader.files() {
        for resource in resources {
            let set = sets.entry(resource.type_url).or_default();
            match set.get(resource.name.as_str()) {
                Some((first, _)) => warn!(
                    type_url = resource.type_url,
                    resource.name = resource.name,
                    file = %path.display(),
                    first = %first.display(),
                    "duplicate envoy resource; the first file wins"
                ),
                None => {
                    set.insert(&resource.name, (path, &resource.body));
                }
            }
        }
    }
    sets.into_iter()
        .map(|(type_url, set)| Update::ReplaceType {
            partition: Partition::new(GLOBAL_PARTITION),
            type_url: TypeUrl::new(type_url),
            resources: set
                .into_iter()
                .map(|(name, (_, body))| (ResourceName::new(name), body.clone()))
                .collect(),
        })
        .collect()
}

/// Loads `config.config_dir` into the cache once, then spawns the task that follows it until
/// `shutdown`. Does nothing without a directory.
pub fn start(
    config: &EnvoyConfig,
    writer: CacheWriter,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let dir = config.config_dir.clone()?;
    let mut loader = DirLoader::new(dir);
    loader.scan();
    let seq = writer.apply(updates(&loader));
    debug!(snapshot.seq = seq, "envoy resources loaded");
    Some(super::dir::follow(
        loader,
        config.poll_interval,
        shutdown,
        move |loader| {
            let seq = writer.apply(updates(loader));
            debug!(snapshot.seq = seq, "envoy resources updated");
        },
    ))
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};

    use super::*;

    /// The example of `docs/protocol.md`.
    const EXAMPLE: &str = r#"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: greeter
  api_listener:
    api_listener:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: greeter
      rds:
        route_config_name: greeter-route
        config_source: { ads: {}, resource_api_version: V3 }
      http_filters:
      - name: envoy.filters.http.router
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
- "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
  name: greeter-route
  virtual_hosts:
  - name: greeter
    domains: ["*"]
    routes:
    - match: { prefix: "" }
      route: { cluster: greeter-cluster, timeout: 2.5s }
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: greeter-cluster
  type: EDS
  eds_cluster_config:
    eds_config: { ads: {}, resource_api_version: V3 }
  lb_policy: ROUND_ROBIN
  connect_timeout: 1s
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: greeter-cluster
  endpoints:
  - locality: { region: local, zone: a }
    load_balancing_weight: 1
    lb_endpoints:
    - endpoint:
        address:
          socket_address: { address: 127.0.0.1, port_value: 50051 }
      health_status: HEALTHY
"#;

    #[test]
    fn parses_the_documented_example() {
        let resources = parse(EXAMPLE, Format::Yaml).unwrap();
        let names: Vec<_> = resources
            .iter()
            .map(|r| (r.type_url, r.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                (LISTENER_TYPE_URL, "greeter"),
                (ROUTE_TYPE_URL, "greeter-route"),
                (CLUSTER_TYPE_URL, "greeter-cluster"),
                (ENDPOINT_TYPE_URL, "greeter-cluster"),
            ]
        );
        let listener = Listener::decode(resources[0].body.value.as_slice()).unwrap();
        let hcm_any = listener.api_listener.unwrap().api_listener.unwrap();
        assert_eq!(hcm_any.type_url, HCM_TYPE_URL);
        let hcm = HttpConnectionManager::decode(hcm_any.value.as_slice()).unwrap();
        let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier else {
            panic!("rds expected");
        };
        assert_eq!(rds.route_config_name, "greeter-route");
        assert!(matches!(
            rds.config_source.unwrap().config_source_specifier,
            Some(ConfigSourceSpecifier::Ads(_))
        ));
        assert_eq!(hcm.http_filters.len(), 1);
        let route = RouteConfiguration::decode(resources[1].body.value.as_slice()).unwrap();
        let Some(route::Action::Route(action)) = &route.virtual_hosts[0].routes[0].action else {
            panic!("route action expected");
        };
        assert_eq!(
            action.timeout,
            Some(PbDuration {
                seconds: 2,
                nanos: 500_000_000
            })
        );
        let cluster = Cluster::decode(resources[2].body.value.as_slice()).unwrap();
        assert_eq!(
            cluster.cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
        );
        let cla = ClusterLoadAssignment::decode(resources[3].body.value.as_slice()).unwrap();
        assert_eq!(cla.endpoints[0].locality.as_ref().unwrap().zone, "a");
        assert_eq!(
            cla.endpoints[0].load_balancing_weight,
            Some(UInt32Value { value: 1 })
        );
    }

    #[test]
    fn cluster_metadata_names_the_istio_service_and_encodes_stably() {
        let yaml = r#"
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: outbound|20000||app.default.svc.cluster.local
  type: EDS
  eds_cluster_config: { eds_config: { ads: {} } }
  metadata:
    filter_metadata:
      istio:
        services: [ { name: app, namespace: default, host: app.default.svc.cluster.local } ]
      other: { b: 1, a: [x, y] }
"#;
        let first = parse(yaml, Format::Yaml).unwrap();
        for _ in 0..5 {
            assert_eq!(
                parse(yaml, Format::Yaml).unwrap(),
                first,
                "same bytes every time"
            );
        }
        let cluster = Cluster::decode(first[0].body.value.as_slice()).unwrap();
        let metadata = cluster.metadata.unwrap();
        let services = &metadata.filter_metadata["istio"].fields["services"];
        let Some(envoy_types::pb::google::protobuf::value::Kind::ListValue(list)) = &services.kind
        else {
            panic!("a list");
        };
        assert_eq!(list.values.len(), 1);
        let no_istio = r#"{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "c", "metadata": {"filter_metadata": {"envoy.lb": {}}}}"#;
        assert!(parse(no_istio, Format::Json).is_err());
        let no_services = r#"{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "c", "metadata": {"filter_metadata": {"istio": {"services": []}}}}"#;
        assert!(parse(no_services, Format::Json).is_err());
    }

    #[test]
    fn a_locality_without_endpoints_is_refused() {
        let json = r#"{"@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                       "cluster_name": "c", "endpoints": [{"locality": {"zone": "a"}, "lb_endpoints": []}]}"#;
        let error = parse(json, Format::Json).unwrap_err();
        assert_eq!(error.path, "endpoints[0].lb_endpoints");
    }

    #[test]
    fn json_and_single_resource_forms() {
        let json = r#"{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                       "name": "c", "type": "EDS", "lb_policy": "ROUND_ROBIN",
                       "eds_cluster_config": {"eds_config": {"ads": {}}}}"#;
        assert_eq!(parse(json, Format::Json).unwrap()[0].name, "c");
        let list =
            "- {\"@type\": type.googleapis.com/envoy.config.route.v3.RouteConfiguration, name: r}";
        assert_eq!(parse(list, Format::Yaml).unwrap()[0].name, "r");
        assert!(parse("", Format::Yaml).unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_path() {
        let unknown_field = r#"
resources:
- "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
  name: r
  virtual_hosts:
  - name: v
    routes:
    - match: { prefix: "/" }
      route: { cluster: c, retry_policy: {} }
"#;
        let error = parse(unknown_field, Format::Yaml).unwrap_err();
        assert_eq!(error.path, "resources[0].virtual_hosts[0].routes[0].route");
        assert!(error.message.contains("retry_policy"), "{error}");
        let bad_enum = r#"{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "c", "lb_policy": "FASTEST"}"#;
        let error = parse(bad_enum, Format::Json).unwrap_err();
        assert_eq!(error.path, "lb_policy");
        let no_type = "name: x";
        assert!(parse(no_type, Format::Yaml).is_err());
        let unknown_type = r#"{"@type": "type.googleapis.com/envoy.config.listener.v3.Nope"}"#;
        assert!(parse(unknown_type, Format::Json).is_err());
        let no_name = r#"{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster"}"#;
        assert!(parse(no_name, Format::Json).is_err());
        let bad_duration = r#"{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "c", "connect_timeout": "1m"}"#;
        assert!(parse(bad_duration, Format::Json).is_err());
    }

    fn names(updates: &[Update], type_url: &str) -> Vec<String> {
        updates
            .iter()
            .find_map(|u| match u {
                Update::ReplaceType {
                    type_url: t,
                    resources,
                    ..
                } if t.as_str() == type_url => {
                    Some(resources.iter().map(|(n, _)| n.to_string()).collect())
                }
                _ => None,
            })
            .unwrap()
    }

    fn cluster_yaml(names: &[&str]) -> String {
        names
            .iter()
            .map(|n| format!("- {{\"@type\": {CLUSTER_TYPE_URL}, name: {n}}}\n"))
            .collect()
    }

    #[test]
    fn directory_bad_file_keeps_previous_and_removal_drops() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        let b = dir.path().join("b.yml");
        std::fs::write(&a, cluster_yaml(&["one", "two"])).unwrap();
        std::fs::write(&b, cluster_yaml(&["two", "three"])).unwrap();
        std::fs::write(dir.path().join(".tmp.yaml"), "not: [valid").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let mut loader = DirLoader::new(dir.path());
        assert!(loader.scan());
        let updates = super::updates(&loader);
        assert_eq!(updates.len(), 4, "all four types replaced together");
        assert_eq!(names(&updates, CLUSTER_TYPE_URL), ["one", "three", "two"]);
        assert!(names(&updates, LISTENER_TYPE_URL).is_empty());
        assert!(!loader.scan(), "nothing changed");

        std::fs::write(&a, "- {\"@type\": broken").unwrap();
        assert!(!loader.scan(), "a bad file changes nothing");
        assert_eq!(
            names(&super::updates(&loader), CLUSTER_TYPE_URL),
            ["one", "three", "two"]
        );
        std::fs::write(&a, cluster_yaml(&["four"])).unwrap();
        assert!(loader.scan());
        assert_eq!(
            names(&super::updates(&loader), CLUSTER_TYPE_URL),
            ["four", "three", "two"]
        );
        std::fs::remove_file(&b).unwrap();
        assert!(loader.scan());
        assert_eq!(names(&super::updates(&loader), CLUSTER_TYPE_URL), ["four"]);
    }

    #[tokio::test]
    async fn start_loads_before_returning_and_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.yaml"), cluster_yaml(&["one"])).unwrap();
        let (cache, writer) = pixiu_xds::cache();
        let shutdown = CancellationToken::new();
        let config = EnvoyConfig {
            config_dir: Some(dir.path().to_path_buf()),
            poll_interval: Duration::from_millis(20),
        };
        let task = start(&config, writer, shutdown.clone()).unwrap();
        let view = pixiu_xds::View::new([Partition::new(GLOBAL_PARTITION)]);
        let clusters = TypeUrl::new(CLUSTER_TYPE_URL);
        assert!(cache.snapshot().get(&view, &clusters, "one").is_some());
        let mut changes = cache.changes();
        std::fs::write(dir.path().join("c.yaml"), cluster_yaml(&["two"])).unwrap();
        let snapshot = tokio::time::timeout(Duration::from_secs(5), changes.next())
            .await
            .unwrap()
            .unwrap();
        assert!(snapshot.get(&view, &clusters, "one").is_none());
        assert!(snapshot.get(&view, &clusters, "two").is_some());
        shutdown.cancel();
        task.await.unwrap();
    }
}
