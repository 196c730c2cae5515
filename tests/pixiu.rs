//! Pixiu data planes and upstream Pixiu's metadata clients against the real server.
//!
//! The emulated clients do what dubbo-go-pixiu's do (`pixiu/pkg/config/xds/apiclient/grpc.go`,
//! `grpc_envoy.go`, `lds.go`, `cds.go`; the reworked client of PR #1042), and fail the test
//! where the real one would panic, wipe its state or NACK.

mod common;

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    time::Duration,
};

use common::{AdsClient, TestServer, channel_to, metadata_client, with_namespace};
use envoy_types::pb::envoy::{
    config::{
        cluster::v3::Cluster,
        core::v3::{Node, TypedExtensionConfig},
        endpoint::v3::ClusterLoadAssignment,
    },
    service::{
        discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest},
        extension::v3::extension_config_discovery_service_client::ExtensionConfigDiscoveryServiceClient,
    },
};
use envoy_types::pb::google::{protobuf::value::Kind, rpc::Status as RpcStatus};
use pixiu_metadata::{
    config::{Backend, Config},
    pb::{
        dubbo_networking::{
            GetServiceMetadataRequest, PublishServiceMetadataRequest,
            service_metadata_service_client::ServiceMetadataServiceClient,
        },
        metadata::{GetMetadataRequest, PublishMetadataRequest},
        pixiu_api::{self as api, PixiuExtensionClusters, PixiuExtensionListeners},
    },
    push::{
        envoy::{CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL},
        pixiu::{
            CLUSTER_RESOURCE, CLUSTERS_TYPE_URL, ECDS_TYPE_URL, LISTENER_RESOURCE,
            LISTENERS_TYPE_URL,
        },
    },
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming, transport::Channel};

const QUIET: Duration = Duration::from_millis(600);

fn config(pixiu_dir: Option<&Path>, envoy_dir: Option<&Path>) -> Config {
    let mut config = Config::default();
    config.store.backend = Backend::Memory;
    config.pixiu.config_dir = pixiu_dir.map(Path::to_path_buf);
    config.pixiu.poll_interval = Duration::from_millis(50);
    config.envoy.config_dir = envoy_dir.map(Path::to_path_buf);
    config.envoy.poll_interval = Duration::from_millis(50);
    config
}

// === the emulated Pixiu ECDS client ===

/// Which Pixiu client to play.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// v0.6.0-rc2 .. develop: ACKs with `initial_resource_versions` + nonce, never NACKs,
    /// reconnects with the last response's nonce and versions.
    Released,
    /// PR #1042: ACKs with the nonce only after applying, NACKs with `error_detail` (code 3).
    Pr1042,
}

/// `xdsState` of `grpc.go`: what the client carries from response to request and across
/// reconnects.
#[derive(Debug, Clone, Default)]
struct XdsState {
    nonce: String,
    versions: HashMap<String, String>,
}

struct PixiuClient {
    style: Style,
    resource: &'static str,
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
    state: XdsState,
    /// PR #1042 fixture: content naming this listener or cluster is NACKed.
    refuse: Option<&'static str>,
}

fn pixiu_node() -> Node {
    Node {
        id: "pixiu-gateway-1".into(),
        cluster: "pixiu".into(),
        user_agent_name: "dubbo-go-pixiu".into(),
        ..Default::default()
    }
}

impl PixiuClient {
    /// `sendInitDeltaRequest`: a new stream whose first request subscribes to `resource` and
    /// carries whatever state the client still has.
    async fn connect(
        channel: Channel,
        style: Style,
        resource: &'static str,
        state: XdsState,
    ) -> Self {
        let (tx, rx) = mpsc::channel(16);
        tx.send(DeltaDiscoveryRequest {
            node: Some(pixiu_node()),
            type_url: ECDS_TYPE_URL.into(),
            resource_names_subscribe: vec![resource.into()],
            initial_resource_versions: state.versions.clone(),
            response_nonce: state.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let responses = ExtensionConfigDiscoveryServiceClient::new(channel)
            .delta_extension_configs(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self {
            style,
            resource,
            tx,
            responses,
            state,
            refuse: None,
        }
    }

    /// Receives one response, checks it as Pixiu would (panicking where Pixiu panics),
    /// applies it and ACKs (or, PR #1042, NACKs). Returns what the data plane now runs
    /// (listeners as Pixiu renames them, `host-port-protocol`; cluster names), or the NACK.
    async fn next(&mut self) -> Result<Vec<String>, String> {
        let response = tokio::time::timeout(Duration::from_secs(10), self.responses.message())
            .await
            .expect("a response within 10s")
            .expect("stream healthy")
            .expect("stream open");
        assert_eq!(response.type_url, ECDS_TYPE_URL);
        assert!(
            !response.resources.is_empty(),
            "a response without resources (removed: {:?}) would wipe Pixiu's {}",
            response.removed_resources,
            self.resource
        );
        let mut applied = Vec::new();
        let mut versions = HashMap::new();
        let mut problem = None;
        for resource in &response.resources {
            assert_eq!(
                resource.name, self.resource,
                "a resource this stream did not subscribe to (Pixiu panics)"
            );
            versions.insert(resource.name.clone(), resource.version.clone());
            let body = resource.resource.as_ref().expect("a resource body");
            assert_eq!(body.type_url, ECDS_TYPE_URL, "UnmarshalTo would fail");
            let config = TypedExtensionConfig::decode(body.value.as_slice()).unwrap();
            let inner = config
                .typed_config
                .expect("typed_config (ProtoAny.To panics)");
            match self.resource {
                LISTENER_RESOURCE => {
                    assert_eq!(inner.type_url, LISTENERS_TYPE_URL);
                    let listeners = PixiuExtensionListeners::decode(inner.value.as_slice())
                        .expect("ProtoAny.To panics on the wrong message");
                    for listener in &listeners.listeners {
                        problem = problem.or_else(|| self.refused(&listener.name));
                        applied.push(pixiu_listener_name(listener, &mut problem));
                    }
                }
                _ => {
                    assert_eq!(inner.type_url, CLUSTERS_TYPE_URL);
                    let clusters = PixiuExtensionClusters::decode(inner.value.as_slice())
                        .expect("ProtoAny.To panics on the wrong message");
                    for cluster in &clusters.clusters {
                        problem = problem.or_else(|| self.refused(&cluster.name));
                        check_cluster(cluster, &mut problem);
                        applied.push(cluster.name.clone());
                    }
                }
            }
        }
        match (self.style, problem) {
            (Style::Released, problem) => {
                assert!(
                    problem.is_none(),
                    "the released client would panic: {problem:?}"
                );
                // handleDeltaResponse then subscribeOnGoingChang.
                self.state = XdsState {
                    nonce: response.nonce.clone(),
                    versions,
                };
                self.send(DeltaDiscoveryRequest {
                    node: Some(pixiu_node()),
                    type_url: ECDS_TYPE_URL.into(),
                    initial_resource_versions: self.state.versions.clone(),
                    response_nonce: response.nonce.clone(),
                    ..Default::default()
                })
                .await;
                Ok(applied)
            }
            (Style::Pr1042, None) => {
                self.state = XdsState {
                    nonce: response.nonce.clone(),
                    versions,
                };
                self.send(DeltaDiscoveryRequest {
                    node: Some(pixiu_node()),
                    type_url: ECDS_TYPE_URL.into(),
                    response_nonce: response.nonce.clone(),
                    ..Default::default()
                })
                .await;
                Ok(applied)
            }
            (Style::Pr1042, Some(problem)) => {
                self.send(DeltaDiscoveryRequest {
                    node: Some(pixiu_node()),
                    type_url: ECDS_TYPE_URL.into(),
                    response_nonce: response.nonce.clone(),
                    error_detail: Some(RpcStatus {
                        code: 3,
                        message: problem.clone(),
                        details: vec![],
                    }),
                    ..Default::default()
                })
                .await;
                Err(problem)
            }
        }
    }

    fn refused(&self, name: &str) -> Option<String> {
        (self.refuse == Some(name)).then(|| format!("{name} refused by the data plane"))
    }

    async fn send(&self, request: DeltaDiscoveryRequest) {
        self.tx.send(request).await.unwrap();
    }

    async fn silence(&mut self, wait: Duration) {
        if let Ok(message) = tokio::time::timeout(wait, self.responses.message()).await {
            panic!("expected no response on {}, got {message:?}", self.resource);
        }
    }
}

/// `setupListeners` dereferences the address and filter chain; PR #1042 also NACKs bad
/// ports and empty chains.
fn pixiu_listener_name(listener: &api::Listener, problem: &mut Option<String>) -> String {
    let socket = listener
        .address
        .as_ref()
        .and_then(|a| a.socket_address.as_ref())
        .expect("setupListeners dereferences address.socket_address");
    let chain = listener
        .filter_chain
        .as_ref()
        .expect("makeFilterChain dereferences filter_chain");
    if chain.filters.is_empty() || !(1..=65535).contains(&socket.port) {
        problem.get_or_insert_with(|| format!("invalid listener {}", listener.name));
    }
    let protocol = api::listener::Protocols::try_from(listener.protocol).unwrap();
    format!(
        "{}-{}-{}",
        socket.address,
        socket.port,
        protocol.as_str_name()
    )
}

/// `makeEdsClusterConfig` dereferences `eds_config.api_config_source`; PR #1042 NACKs
/// unknown lb names and duplicate endpoints.
fn check_cluster(cluster: &api::Cluster, problem: &mut Option<String>) {
    if let Some(eds) = &cluster.eds_cluster_config {
        eds.eds_config
            .as_ref()
            .and_then(|c| c.api_config_source.as_ref())
            .expect("makeApiConfigSource dereferences api_config_source");
    }
    let lb_ok = ["", "Rand", "RoundRobin", "RingHashing", "MaglevHashing"]
        .contains(&cluster.lb_str.as_str());
    let mut seen = BTreeSet::new();
    let unique = cluster.endpoints.iter().all(|e| {
        let a = e.address.as_ref().unwrap();
        seen.insert((a.address.clone(), a.port))
    });
    if !lb_ok || !unique {
        problem.get_or_insert_with(|| format!("invalid cluster {}", cluster.name));
    }
}

const LISTENERS: &str = r#"
listeners:
  - name: net/http
    protocol_type: HTTP
    address: { socket_address: { address: 0.0.0.0, port: 8888 } }
    filter_chains:
      filters:
        - name: dgp.filter.httpconnectionmanager
          config:
            route_config:
              routes:
                - { match: { prefix: /user }, route: { cluster: user } }
            http_filters:
              - name: dgp.filter.http.httpproxy
"#;

fn clusters(names: &[&str]) -> String {
    let mut text = String::from("clusters:\n");
    for (i, name) in names.iter().enumerate() {
        text.push_str(&format!(
            "  - name: {name}\n    lb_policy: RoundRobin\n    endpoints:\n      - {{ id: {i}, socket_address: {{ address: 127.0.0.1, port: {} }} }}\n",
            20000 + i
        ));
    }
    text.push_str(
        "  - name: user-eds\n    type: EDS\n    eds_cluster_config:\n      eds_config:\n        api_config_source: { api_type: GRPC, cluster_name: [xds-server] }\n",
    );
    text
}

fn write(dir: &Path, file: &str, text: &str) {
    // Write then rename, as config management tools do, so no half-written file is read.
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

#[tokio::test]
async fn released_client_acks_its_way_reconnects_with_stale_state_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "listeners.yaml", LISTENERS);
    write(dir.path(), "clusters.yaml", &clusters(&["user"]));
    let server = TestServer::start(config(Some(dir.path()), None)).await;
    let channel = server.channel().await;
    let mut lds = PixiuClient::connect(
        channel.clone(),
        Style::Released,
        LISTENER_RESOURCE,
        XdsState::default(),
    )
    .await;
    let mut cds = PixiuClient::connect(
        channel.clone(),
        Style::Released,
        CLUSTER_RESOURCE,
        XdsState::default(),
    )
    .await;
    assert_eq!(lds.next().await.unwrap(), ["0.0.0.0-8888-HTTP"]);
    assert_eq!(cds.next().await.unwrap(), ["user", "user-eds"]);
    let first_cluster_state = cds.state.clone();
    lds.silence(QUIET).await;
    cds.silence(QUIET).await;

    // A change pushes the full set of clusters, to the cluster stream only.
    write(dir.path(), "clusters.yaml", &clusters(&["user", "order"]));
    assert_eq!(cds.next().await.unwrap(), ["user", "order", "user-eds"]);
    lds.silence(QUIET).await;

    // An invalid file, and a file that clashes with another, change nothing.
    write(
        dir.path(),
        "bad.yaml",
        "clusters: [ { name: x, type: Nope } ]",
    );
    write(dir.path(), "dup.yaml", "clusters: [ { name: order } ]");
    cds.silence(QUIET).await;
    std::fs::remove_file(dir.path().join("bad.yaml")).unwrap();
    std::fs::remove_file(dir.path().join("dup.yaml")).unwrap();
    cds.silence(QUIET).await;

    // Reconnect with the last nonce and versions: nothing to send, nothing wiped.
    let state = cds.state.clone();
    drop(cds);
    let mut cds =
        PixiuClient::connect(channel.clone(), Style::Released, CLUSTER_RESOURCE, state).await;
    cds.silence(QUIET).await;
    // Reconnect with an older version: the current set.
    let mut stale = PixiuClient::connect(
        channel.clone(),
        Style::Released,
        CLUSTER_RESOURCE,
        first_cluster_state,
    )
    .await;
    assert_eq!(stale.next().await.unwrap(), ["user", "order", "user-eds"]);
    drop(stale);

    // Across a restart: versions derive from content, so the stale state is still current
    // and the stale nonce (never issued by the new server) is honoured.
    let (lds_state, cds_state) = (lds.state.clone(), cds.state.clone());
    drop((lds, cds));
    server.stop().await;
    let server = TestServer::start(config(Some(dir.path()), None)).await;
    let channel = server.channel().await;
    let mut lds = PixiuClient::connect(
        channel.clone(),
        Style::Released,
        LISTENER_RESOURCE,
        lds_state,
    )
    .await;
    let mut cds = PixiuClient::connect(
        channel.clone(),
        Style::Released,
        CLUSTER_RESOURCE,
        cds_state,
    )
    .await;
    lds.silence(QUIET).await;
    cds.silence(QUIET).await;
    write(
        dir.path(),
        "listeners.yaml",
        &LISTENERS.replace("port: 8888", "port: 8889"),
    );
    assert_eq!(lds.next().await.unwrap(), ["0.0.0.0-8889-HTTP"]);
    cds.silence(QUIET).await;

    // The operator empties the directory: a full set that is empty, not a removal.
    std::fs::remove_file(dir.path().join("listeners.yaml")).unwrap();
    std::fs::remove_file(dir.path().join("clusters.yaml")).unwrap();
    assert_eq!(lds.next().await.unwrap(), Vec::<String>::new());
    assert_eq!(cds.next().await.unwrap(), Vec::<String>::new());

    // A restart on a directory that cannot be read yet (a volume not mounted): the client
    // holds a resource the server does not have, and is not told to remove it.
    let cds_state = cds.state.clone();
    drop((lds, cds));
    server.stop().await;
    let later = dir.path().join("later");
    let server = TestServer::start(config(Some(&later), None)).await;
    let channel = server.channel().await;
    let mut cds = PixiuClient::connect(
        channel.clone(),
        Style::Released,
        CLUSTER_RESOURCE,
        cds_state,
    )
    .await;
    cds.silence(QUIET).await;
    let staging = dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    std::fs::write(staging.join("clusters.yaml"), clusters(&["late"])).unwrap();
    std::fs::rename(&staging, &later).unwrap();
    assert_eq!(cds.next().await.unwrap(), ["late", "user-eds"]);
    drop(cds);
    server.stop().await;
}

#[tokio::test]
async fn pr1042_client_nacks_and_is_not_resent_the_same_content() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "clusters.yaml", &clusters(&["user"]));
    let server = TestServer::start(config(Some(dir.path()), None)).await;
    let channel = server.channel().await;
    let mut cds = PixiuClient::connect(
        channel.clone(),
        Style::Pr1042,
        CLUSTER_RESOURCE,
        XdsState::default(),
    )
    .await;
    cds.refuse = Some("order");
    assert_eq!(cds.next().await.unwrap(), ["user", "user-eds"]);
    cds.silence(QUIET).await;
    write(dir.path(), "clusters.yaml", &clusters(&["user", "order"]));
    assert!(cds.next().await.unwrap_err().contains("order"));
    cds.silence(QUIET).await;
    let nack = ecds_status(&server, "pixiu-gateway-1").await;
    assert_eq!(nack["state"], "NACKED", "{nack:#}");
    assert!(
        nack["nack"]["error_detail"]["message"]
            .as_str()
            .unwrap()
            .contains("order")
    );
    assert_eq!(nack["nack"]["error_detail"]["code"], 3);
    write(dir.path(), "clusters.yaml", &clusters(&["user", "pay"]));
    assert_eq!(cds.next().await.unwrap(), ["user", "pay", "user-eds"]);

    // Reconnect with the applied versions and no nonce: nothing to send.
    let state = XdsState {
        nonce: String::new(),
        ..cds.state.clone()
    };
    drop(cds);
    let mut cds =
        PixiuClient::connect(channel.clone(), Style::Pr1042, CLUSTER_RESOURCE, state).await;
    cds.silence(QUIET).await;
    write(dir.path(), "clusters.yaml", &clusters(&["pay"]));
    assert_eq!(cds.next().await.unwrap(), ["pay", "user-eds"]);
    drop(cds);
    server.stop().await;
}

#[tokio::test]
async fn ecds_speaks_the_protocol_as_written_to_other_clients() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "listeners.yaml", LISTENERS);
    let server = TestServer::start(config(Some(dir.path()), None)).await;
    let channel = server.channel().await;
    let mut client = ExtensionConfigDiscoveryServiceClient::new(channel.clone());

    // SotW: StreamExtensionConfigs, by name.
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: "envoy-1".into(),
            user_agent_name: "envoy".into(),
            ..Default::default()
        }),
        type_url: ECDS_TYPE_URL.into(),
        resource_names: vec![LISTENER_RESOURCE.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut sotw = client
        .stream_extension_configs(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let response = sotw.message().await.unwrap().unwrap();
    assert_eq!(response.resources.len(), 1);
    let config = TypedExtensionConfig::decode(response.resources[0].value.as_slice()).unwrap();
    assert_eq!(config.name, LISTENER_RESOURCE);

    // Delta wildcard: both resources.
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "envoy-2".into(),
            ..Default::default()
        }),
        type_url: ECDS_TYPE_URL.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut delta = client
        .delta_extension_configs(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let response = delta.message().await.unwrap().unwrap();
    let mut names: Vec<_> = response.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, [CLUSTER_RESOURCE, LISTENER_RESOURCE]);

    let fetch = client
        .fetch_extension_configs(DiscoveryRequest::default())
        .await;
    assert_eq!(fetch.unwrap_err().code(), Code::Unimplemented);
    drop((tx, sotw, delta));
    server.stop().await;
}

/// The `/debug/syncz` row of `node_id`'s ECDS stream, once the server has recorded a NACK.
async fn ecds_status(server: &TestServer, node_id: &str) -> serde_json::Value {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<axum::body::Bytes>>();
    let url: http::Uri = format!("{}/debug/syncz", server.admin_url())
        .parse()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let response = client.get(url.clone()).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let row = status["streams"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["node_id"] == node_id)
            .flat_map(|s| s["types"].as_array().cloned().unwrap_or_default())
            .find(|t| t["type_url"] == ECDS_TYPE_URL && t["n_nacks"].as_u64() > Some(0));
        if let Some(row) = row {
            return row;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no NACK recorded: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// === the emulated ISTIO-mode client ===

fn istio_node() -> Node {
    Node {
        id: "sidecar~10.0.0.7~pixiu-gateway.default.svc.cluster.local".into(),
        cluster: "testCluster".into(),
        user_agent_name: "pixiu".into(),
        ..Default::default()
    }
}

/// `readServiceNameOfCluster`: panics (here: fails) on metadata without istio services.
fn service_name(cluster: &Cluster) -> String {
    let Some(metadata) = &cluster.metadata else {
        return String::new();
    };
    let services = &metadata
        .filter_metadata
        .get("istio")
        .expect("Pixiu dereferences filter_metadata[\"istio\"]")
        .fields["services"];
    let Some(Kind::ListValue(list)) = &services.kind else {
        panic!("services is not a list");
    };
    let Some(Kind::StructValue(first)) = &list.values.first().expect("services[0]").kind else {
        panic!("services[0] is not a struct");
    };
    match &first.fields["name"].kind {
        Some(Kind::StringValue(name)) => name.clone(),
        _ => String::new(),
    }
}

fn envoy_clusters(timeout: &str) -> String {
    let cluster = |name: &str, service: &str| {
        format!(
            r#"- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: "outbound|20000||{service}.default.svc.cluster.local"
  type: EDS
  connect_timeout: {timeout}
  eds_cluster_config: {{ eds_config: {{ ads: {{}} }}, service_name: {name} }}
  metadata:
    filter_metadata:
      istio: {{ services: [ {{ name: {service}, namespace: default }} ] }}
"#
        )
    };
    let cla = |name: &str, port: u32| {
        format!(
            r#"- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: {name}
  endpoints:
  - lb_endpoints:
    - endpoint: {{ address: {{ socket_address: {{ address: 10.0.0.1, port_value: {port} }} }} }}
"#
        )
    };
    [
        cluster("app-eds", "app"),
        cluster("other-eds", "other"),
        r#"- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: plain
  type: STATIC
"#
        .to_string(),
        cla("app-eds", 20000),
        cla("other-eds", 20001),
    ]
    .concat()
}

struct IstioClient {
    channel: Channel,
    cds: AdsClient,
    /// Services routed by the gateway's Dubbo filter (`WithIstioService`).
    services: BTreeSet<String>,
    /// `edsResources`: pending EDS names, never cleared.
    pending: BTreeSet<String>,
    /// Every EDS stream it opened, with the names it asked for; never closed.
    eds: Vec<(BTreeSet<String>, AdsClient)>,
}

impl IstioClient {
    async fn connect(channel: Channel, services: &[&str]) -> Self {
        let cds = AdsClient::open(channel.clone(), istio_node(), CLUSTER_TYPE_URL, &[]).await;
        Self {
            channel,
            cds,
            services: services.iter().map(|s| s.to_string()).collect(),
            pending: BTreeSet::new(),
            eds: Vec::new(),
        }
    }

    /// One CDS response (never ACKed), then a new EDS stream for every pending name.
    async fn on_cds(&mut self) {
        let response = self.cds.recv().await;
        assert!(!response.resources.is_empty(), "an empty CDS push");
        for any in &response.resources {
            let cluster = Cluster::decode(any.value.as_slice()).unwrap();
            if !self.services.contains(&service_name(&cluster)) {
                continue;
            }
            let name = cluster
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or(cluster.name.clone());
            self.pending.insert(name);
        }
        self.open_eds().await;
    }

    async fn open_eds(&mut self) {
        let names: Vec<&str> = self.pending.iter().map(String::as_str).collect();
        let eds = AdsClient::open(
            self.channel.clone(),
            istio_node(),
            ENDPOINT_TYPE_URL,
            &names,
        )
        .await;
        self.eds.push((self.pending.clone(), eds));
    }
}

/// Receives one EDS response on a stream and checks it as Pixiu's handler would.
async fn on_eds(requested: &BTreeSet<String>, eds: &mut AdsClient) -> Vec<u32> {
    let response = eds.recv().await;
    assert!(!response.resources.is_empty(), "an empty EDS push");
    let mut ports = Vec::new();
    for any in &response.resources {
        let cla = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
        assert!(
            requested.contains(&cla.cluster_name),
            "a load assignment it did not request: {} (Pixiu panics)",
            cla.cluster_name
        );
        for locality in &cla.endpoints {
            let endpoint = locality
                .lb_endpoints
                .first()
                .expect("Pixiu reads lb_endpoints[0]");
            if let Some(envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(e)) =
                &endpoint.host_identifier
                && let Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s)) =
                    e.address.as_ref().and_then(|a| a.address.as_ref())
                && let Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) =
                    s.port_specifier
            {
                ports.push(p);
            }
        }
    }
    ports
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test]
async fn istio_mode_cds_then_eds_without_acks_and_leaked_streams_stay_cheap() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "mesh.yaml", &envoy_clusters("1s"));
    let server = TestServer::start(config(None, Some(dir.path()))).await;
    let channel = server.channel().await;
    let mut pixiu = IstioClient::connect(channel.clone(), &["app"]).await;
    pixiu.on_cds().await;
    assert_eq!(pixiu.pending, BTreeSet::from(["app-eds".to_string()]));
    let (requested, eds) = pixiu.eds.last_mut().unwrap();
    assert_eq!(on_eds(requested, eds).await, [20000]);

    // Every CDS change opens one more EDS stream; the old ones stay open and keep working.
    for timeout in ["2s", "3s", "4s"] {
        write(dir.path(), "mesh.yaml", &envoy_clusters(timeout));
        pixiu.on_cds().await;
        let (requested, eds) = pixiu.eds.last_mut().unwrap();
        assert_eq!(on_eds(requested, eds).await, [20000]);
    }
    for (_, eds) in &mut pixiu.eds {
        eds.expect_silence(Duration::from_millis(100)).await;
    }

    // Leak many more, as a long-lived gateway does, and measure what they cost.
    let n_leaked = 300;
    let before = rss_bytes();
    let started = tokio::time::Instant::now();
    for _ in 0..n_leaked {
        pixiu.open_eds().await;
        let (requested, eds) = pixiu.eds.last_mut().unwrap();
        assert_eq!(on_eds(requested, eds).await, [20000]);
    }
    let per_stream = rss_bytes().saturating_sub(before) / n_leaked;
    println!("opened {n_leaked} EDS streams in {:?}", started.elapsed());
    println!(
        "{} EDS streams open; resident memory per leaked stream (client and server): {per_stream} bytes",
        pixiu.eds.len()
    );
    assert!(per_stream < 256 * 1024, "{per_stream} bytes per stream");

    // An endpoints change reaches every stream that asked for it, and only what it asked.
    write(
        dir.path(),
        "mesh.yaml",
        &envoy_clusters("4s").replace("port_value: 20000", "port_value: 20002"),
    );
    for (requested, eds) in &mut pixiu.eds {
        assert_eq!(on_eds(requested, eds).await, [20002]);
    }
    pixiu.cds.expect_silence(Duration::from_millis(100)).await;

    // No cluster of its routes exists: it opens an EDS stream naming nothing, which must
    // not be read as a wildcard for Pixiu (it would panic on the first assignment), while
    // any other client's empty first request still is one.
    let mut nothing = AdsClient::open(channel.clone(), istio_node(), ENDPOINT_TYPE_URL, &[]).await;
    nothing.expect_silence(QUIET).await;
    let mut other = AdsClient::open(
        channel.clone(),
        common::node("grpc-client", None),
        ENDPOINT_TYPE_URL,
        &[],
    )
    .await;
    assert_eq!(other.recv().await.resources.len(), 2);

    // Reconnect with version and nonce reset: the full set again.
    let mut again = IstioClient::connect(channel.clone(), &["app"]).await;
    again.on_cds().await;
    drop((pixiu, again, nothing, other));
    server.stop().await;
}

// === upstream Pixiu's metadata API ===

#[tokio::test]
async fn upstream_service_metadata_shares_the_store_with_the_seed_api() {
    let server = TestServer::memory().await;
    let channel = channel_to(server.addr).await;
    let mut upstream = ServiceMetadataServiceClient::new(channel.clone());
    let mut seed = metadata_client(channel.clone());
    let info = r#"{"app":"shop","revision":"r1","services":{}}"#;

    // Subscribed before anything is published, in namespace team-a.
    let mut consumer = AdsClient::open(
        channel.clone(),
        common::node("consumer", Some("team-a")),
        pixiu_metadata::pb::METADATA_TYPE_URL,
        &["shop/r1"],
    )
    .await;
    assert!(consumer.recv().await.resources.is_empty());

    upstream
        .publish(PublishServiceMetadataRequest {
            namespace: "team-a".into(),
            application_name: "shop".into(),
            revision: "r1".into(),
            metadata_info: info.into(),
        })
        .await
        .unwrap();
    let got = seed
        .get(with_namespace(
            GetMetadataRequest {
                application_name: "shop".into(),
                revision: "r1".into(),
            },
            "team-a",
        ))
        .await
        .unwrap();
    assert_eq!(got.get_ref().metadata_info, info);
    let pushed = consumer.recv().await;
    assert_eq!(pushed.resources.len(), 1, "pushed to the ADS consumer");

    seed.publish(with_namespace(
        PublishMetadataRequest {
            application_name: "cart".into(),
            revision: "r2".into(),
            metadata_info: "cart-info".into(),
        },
        "team-b",
    ))
    .await
    .unwrap();
    let got = upstream
        .get(GetServiceMetadataRequest {
            namespace: "team-b".into(),
            application_name: "cart".into(),
            revision: "r2".into(),
        })
        .await
        .unwrap();
    assert_eq!(got.get_ref().metadata_info, "cart-info");

    // An empty namespace is the seed's rule: the header, else the default namespace.
    seed.publish(PublishMetadataRequest {
        application_name: "cart".into(),
        revision: "r3".into(),
        metadata_info: "default-info".into(),
    })
    .await
    .unwrap();
    let got = upstream
        .get(GetServiceMetadataRequest {
            namespace: String::new(),
            application_name: "cart".into(),
            revision: "r3".into(),
        })
        .await
        .unwrap();
    assert_eq!(got.get_ref().metadata_info, "default-info");

    let missing = upstream
        .get(GetServiceMetadataRequest {
            namespace: "team-b".into(),
            application_name: "cart".into(),
            revision: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "not upstream's ABORTED");
    let bad = upstream
        .publish(PublishServiceMetadataRequest {
            namespace: "a/b".into(),
            application_name: "shop".into(),
            revision: "r1".into(),
            metadata_info: info.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    drop(consumer);
    server.stop().await;
}
