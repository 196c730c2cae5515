//! xDS conformance: one test per protocol rule, for State of the World and Delta, over a real
//! gRPC connection to the real server; a slow consumer; CSDS.
//!
//! Resources come from the metadata API (`pixiu.pkg.metadata.Metadata`, named
//! `<application>/<revision>`), so every change is a real publish or delete. The table in
//! `docs/protocol.md` ("xDS conformance") lists each rule with its test.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use envoy_types::pb::{
    envoy::{
        admin::v3::ClientResourceStatus,
        service::{
            discovery::v3::{
                DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
                aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            },
            status::v3::{
                ClientStatusRequest, ClientStatusResponse,
                client_status_discovery_service_client::ClientStatusDiscoveryServiceClient,
            },
        },
        r#type::matcher::v3::{NodeMatcher, StringMatcher, string_matcher::MatchPattern},
    },
    google::rpc::Status as RpcStatus,
};
use pixiu_metadata::pb::{
    METADATA_TYPE_URL,
    metadata::{DeleteMetadataRequest, GetMetadataRequest, Metadata, PublishMetadataRequest},
};
use prost::Message;
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming, transport::Channel};

const SILENCE: Duration = Duration::from_millis(300);
const UNKNOWN_TYPE_URL: &str = "type.googleapis.com/example.v1.NoSuchType";

// === helpers ===

async fn publish(channel: &Channel, name: &str, info: &str) {
    let (application, revision) = name.split_once('/').unwrap();
    metadata_client(channel.clone())
        .publish(PublishMetadataRequest {
            application_name: application.into(),
            revision: revision.into(),
            metadata_info: info.into(),
        })
        .await
        .unwrap();
}

async fn delete(channel: &Channel, name: &str) {
    let (application, revision) = name.split_once('/').unwrap();
    metadata_client(channel.clone())
        .delete(DeleteMetadataRequest {
            application_name: application.into(),
            revision: revision.into(),
        })
        .await
        .unwrap();
}

/// `name -> metadata_info` of a SotW response.
fn sotw_content(response: &DiscoveryResponse) -> BTreeMap<String, String> {
    response
        .resources
        .iter()
        .map(|any| {
            let md = Metadata::decode(any.value.as_slice()).unwrap();
            (
                format!("{}/{}", md.application_name, md.revision),
                md.metadata_info,
            )
        })
        .collect()
}

/// `name -> metadata_info` of the resources of a Delta response.
fn delta_content(response: &DeltaDiscoveryResponse) -> BTreeMap<String, String> {
    response
        .resources
        .iter()
        .map(|r| {
            let md = Metadata::decode(r.resource.as_ref().unwrap().value.as_slice()).unwrap();
            (r.name.clone(), md.metadata_info)
        })
        .collect()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn names(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn rejected() -> Option<RpcStatus> {
    Some(RpcStatus {
        code: Code::InvalidArgument as i32,
        message: "rejected by test client".into(),
        details: vec![],
    })
}

/// A Delta ADS client that behaves like a real one.
struct DeltaClient {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
}

impl DeltaClient {
    /// Opens a stream and sends `first` (with a node added).
    async fn open(channel: Channel, node_id: &str, mut first: DeltaDiscoveryRequest) -> Self {
        let (tx, rx) = mpsc::channel(16);
        first.node = Some(node(node_id, None));
        tx.send(first).await.unwrap();
        let responses = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, responses }
    }

    async fn subscribe(channel: Channel, type_url: &str, subscribe: &[&str]) -> Self {
        Self::open(
            channel,
            "delta-client",
            DeltaDiscoveryRequest {
                type_url: type_url.into(),
                resource_names_subscribe: names(subscribe),
                ..Default::default()
            },
        )
        .await
    }

    async fn send(&self, request: DeltaDiscoveryRequest) {
        self.tx.send(request).await.unwrap();
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), self.responses.message())
            .await
            .expect("a response within 10s")
            .expect("stream healthy")
            .expect("stream open")
    }

    async fn expect_silence(&mut self) {
        if let Ok(message) = tokio::time::timeout(SILENCE, self.responses.message()).await {
            panic!("expected no response, got {message:?}");
        }
    }

    async fn ack(&self, response: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn nack(&self, response: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: rejected(),
            ..Default::default()
        })
        .await;
    }
}

async fn sotw(server: &TestServer, names: &[&str]) -> AdsClient {
    AdsClient::open(
        server.channel().await,
        node("sotw-client", None),
        METADATA_TYPE_URL,
        names,
    )
    .await
}

/// A server holding `a/1 = a1` and `b/1 = b1`.
async fn server_with_ab() -> (TestServer, Channel) {
    let server = TestServer::memory().await;
    let channel = server.channel().await;
    publish(&channel, "a/1", "a1").await;
    publish(&channel, "b/1", "b1").await;
    (server, channel)
}

// === State of the World ===

#[tokio::test]
async fn sotw_subscribe_and_unsubscribe() {
    let (server, channel) = server_with_ab().await;
    let mut client = sotw(&server, &["a/1"]).await;
    let first = client.recv().await;
    assert_eq!(sotw_content(&first), map(&[("a/1", "a1")]));
    // The ACK replaces the subscription: a/1 out, b/1 in.
    client.ack(&first, &["b/1"]).await;
    let second = client.recv().await;
    assert_eq!(sotw_content(&second), map(&[("b/1", "b1")]));
    client.ack(&second, &["b/1"]).await;
    publish(&channel, "a/1", "a2").await;
    client.expect_silence(SILENCE).await;
    publish(&channel, "b/1", "b2").await;
    assert_eq!(sotw_content(&client.recv().await), map(&[("b/1", "b2")]));
    server.stop().await;
}

#[tokio::test]
async fn sotw_legacy_wildcard() {
    let (server, channel) = server_with_ab().await;
    let mut client = sotw(&server, &[]).await;
    let first = client.recv().await;
    assert_eq!(sotw_content(&first), map(&[("a/1", "a1"), ("b/1", "b1")]));
    // An ACK with the same empty list keeps the legacy wildcard.
    client.ack(&first, &[]).await;
    publish(&channel, "c/1", "c1").await;
    let next = client.recv().await;
    assert_eq!(
        sotw_content(&next),
        map(&[("a/1", "a1"), ("b/1", "b1"), ("c/1", "c1")])
    );
    server.stop().await;
}

#[tokio::test]
async fn sotw_explicit_wildcard() {
    let (server, channel) = server_with_ab().await;
    let mut client = sotw(&server, &["*", "z/9"]).await;
    let first = client.recv().await;
    assert_eq!(sotw_content(&first), map(&[("a/1", "a1"), ("b/1", "b1")]));
    client.ack(&first, &["*", "z/9"]).await;
    publish(&channel, "c/1", "c1").await;
    assert_eq!(client.recv().await.resources.len(), 3);
    server.stop().await;
}

#[tokio::test]
async fn sotw_nack_is_not_answered_by_a_resend_and_the_next_change_is_sent() {
    let (server, channel) = server_with_ab().await;
    let mut client = sotw(&server, &["a/1"]).await;
    let accepted = client.recv().await;
    client.ack(&accepted, &["a/1"]).await;
    publish(&channel, "a/1", "bad").await;
    let bad = client.recv().await;
    client.nack(&bad, &accepted.version_info, &["a/1"]).await;
    client.expect_silence(SILENCE).await;
    publish(&channel, "a/1", "good").await;
    let next = client.recv().await;
    assert_eq!(sotw_content(&next), map(&[("a/1", "good")]));
    assert_ne!(next.nonce, bad.nonce);
    server.stop().await;
}

#[tokio::test]
async fn sotw_stale_nonce_is_no_ack_or_nack_but_changes_the_subscription() {
    let (server, channel) = server_with_ab().await;
    let mut client = sotw(&server, &["a/1"]).await;
    let first = client.recv().await;
    client.ack(&first, &["a/1"]).await;
    publish(&channel, "a/1", "a2").await;
    let second = client.recv().await;
    // A request still carrying the first nonce (Envoy #10363): it asks for b/1 too and
    // carries an error, which must not count as a NACK of `second`.
    client
        .send(DiscoveryRequest {
            type_url: METADATA_TYPE_URL.into(),
            resource_names: names(&["a/1", "b/1"]),
            version_info: first.version_info.clone(),
            response_nonce: first.nonce.clone(),
            error_detail: rejected(),
            ..Default::default()
        })
        .await;
    let third = client.recv().await;
    assert_eq!(sotw_content(&third), map(&[("a/1", "a2"), ("b/1", "b1")]));
    let status = fetch_status(&channel, "sotw-client").await;
    assert!(
        status.iter().all(|s| s.client_status != "NACKED"),
        "a stale nonce is not a NACK: {status:?}"
    );
    let _ = second;
    server.stop().await;
}

/// Opens a SotW stream whose first request names `a/1` and claims to hold `version`.
async fn sotw_resume(
    channel: &Channel,
    version: &str,
) -> (mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(node("sotw-client", None)),
        type_url: METADATA_TYPE_URL.into(),
        resource_names: names(&["a/1"]),
        version_info: version.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let responses = AggregatedDiscoveryServiceClient::new(channel.clone())
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, responses)
}

async fn next(responses: &mut Streaming<DiscoveryResponse>) -> DiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("a response within 10s")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn sotw_reconnect_with_current_version_is_not_resent() {
    let (server, channel) = server_with_ab().await;
    let mut client = sotw(&server, &["a/1"]).await;
    let first = client.recv().await;
    drop(client);
    // Versions derive from content, so a client reconnecting (to this or another replica)
    // with the current version is not sent it again.
    let (_tx, mut resumed) = sotw_resume(&channel, &first.version_info).await;
    let silent = tokio::time::timeout(SILENCE, resumed.message()).await;
    assert!(silent.is_err(), "current version not resent: {silent:?}");
    publish(&channel, "a/1", "a2").await;
    assert_eq!(
        sotw_content(&next(&mut resumed).await),
        map(&[("a/1", "a2")])
    );
    // A client holding an older version gets the current one at once.
    let (_tx2, mut stale) = sotw_resume(&channel, &first.version_info).await;
    assert_eq!(sotw_content(&next(&mut stale).await), map(&[("a/1", "a2")]));
    server.stop().await;
}

#[tokio::test]
async fn sotw_removal_by_omission() {
    let (server, channel) = server_with_ab().await;
    let mut client = sotw(&server, &[]).await;
    let first = client.recv().await;
    client.ack(&first, &[]).await;
    delete(&channel, "b/1").await;
    let next = client.recv().await;
    assert_eq!(sotw_content(&next), map(&[("a/1", "a1")]));
    server.stop().await;
}

#[tokio::test]
async fn sotw_unknown_type_url_is_answered_empty() {
    let (server, _channel) = server_with_ab().await;
    let mut client = AdsClient::open(
        server.channel().await,
        node("sotw-client", None),
        UNKNOWN_TYPE_URL,
        &["anything"],
    )
    .await;
    let response = client.recv().await;
    assert_eq!(response.type_url, UNKNOWN_TYPE_URL);
    assert!(response.resources.is_empty());
    assert!(!response.nonce.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn sotw_protocol_violation_is_invalid_argument() {
    let server = TestServer::memory().await;
    let request = DiscoveryRequest {
        node: Some(node("sotw-client", None)),
        type_url: String::new(),
        ..Default::default()
    };
    let mut responses = AggregatedDiscoveryServiceClient::new(server.channel().await)
        .stream_aggregated_resources(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let error = responses.message().await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    server.stop().await;
}

// === Delta ===

#[tokio::test]
async fn delta_subscribe_and_unsubscribe() {
    let (server, channel) = server_with_ab().await;
    let mut client = DeltaClient::subscribe(channel.clone(), METADATA_TYPE_URL, &["a/1"]).await;
    let first = client.recv().await;
    assert_eq!(delta_content(&first), map(&[("a/1", "a1")]));
    client.ack(&first).await;
    client
        .send(DeltaDiscoveryRequest {
            type_url: METADATA_TYPE_URL.into(),
            resource_names_subscribe: names(&["b/1"]),
            resource_names_unsubscribe: names(&["a/1"]),
            ..Default::default()
        })
        .await;
    let second = client.recv().await;
    assert_eq!(delta_content(&second), map(&[("b/1", "b1")]));
    assert!(
        second.removed_resources.is_empty(),
        "unsubscribed names are not removed"
    );
    client.ack(&second).await;
    publish(&channel, "a/1", "a2").await;
    client.expect_silence().await;
    publish(&channel, "b/1", "b2").await;
    assert_eq!(delta_content(&client.recv().await), map(&[("b/1", "b2")]));
    server.stop().await;
}

#[tokio::test]
async fn delta_legacy_wildcard() {
    let (server, channel) = server_with_ab().await;
    let mut client = DeltaClient::subscribe(channel.clone(), METADATA_TYPE_URL, &[]).await;
    let first = client.recv().await;
    assert_eq!(delta_content(&first), map(&[("a/1", "a1"), ("b/1", "b1")]));
    client.ack(&first).await;
    publish(&channel, "c/1", "c1").await;
    let next = client.recv().await;
    assert_eq!(
        delta_content(&next),
        map(&[("c/1", "c1")]),
        "only what changed"
    );
    server.stop().await;
}

#[tokio::test]
async fn delta_explicit_wildcard() {
    let (server, channel) = server_with_ab().await;
    let mut client = DeltaClient::subscribe(channel.clone(), METADATA_TYPE_URL, &["*"]).await;
    let first = client.recv().await;
    assert_eq!(delta_content(&first), map(&[("a/1", "a1"), ("b/1", "b1")]));
    client.ack(&first).await;
    // Unsubscribing `*` removes what the client held only through the wildcard.
    client
        .send(DeltaDiscoveryRequest {
            type_url: METADATA_TYPE_URL.into(),
            resource_names_subscribe: names(&["a/1"]),
            resource_names_unsubscribe: names(&["*"]),
            ..Default::default()
        })
        .await;
    let next = client.recv().await;
    assert_eq!(next.removed_resources, names(&["b/1"]));
    server.stop().await;
}

#[tokio::test]
async fn delta_nack_is_not_answered_by_a_resend_and_the_next_change_is_sent() {
    let (server, channel) = server_with_ab().await;
    let mut client = DeltaClient::subscribe(channel.clone(), METADATA_TYPE_URL, &["a/1"]).await;
    let first = client.recv().await;
    client.ack(&first).await;
    publish(&channel, "a/1", "bad").await;
    let bad = client.recv().await;
    client.nack(&bad).await;
    client.expect_silence().await;
    publish(&channel, "a/1", "good").await;
    assert_eq!(delta_content(&client.recv().await), map(&[("a/1", "good")]));
    server.stop().await;
}

#[tokio::test]
async fn delta_request_with_nonce_still_subscribes() {
    let (server, channel) = server_with_ab().await;
    publish(&channel, "c/1", "c1").await;
    let mut client = DeltaClient::subscribe(channel.clone(), METADATA_TYPE_URL, &["a/1"]).await;
    let first = client.recv().await;
    // An ACK that also subscribes (quilkin treats it as a pure ACK).
    client
        .send(DeltaDiscoveryRequest {
            type_url: METADATA_TYPE_URL.into(),
            response_nonce: first.nonce.clone(),
            resource_names_subscribe: names(&["b/1"]),
            ..Default::default()
        })
        .await;
    let second = client.recv().await;
    assert_eq!(delta_content(&second), map(&[("b/1", "b1")]));
    // A stale nonce is neither ACK nor NACK, and its subscription still applies.
    client
        .send(DeltaDiscoveryRequest {
            type_url: METADATA_TYPE_URL.into(),
            response_nonce: first.nonce.clone(),
            resource_names_subscribe: names(&["c/1"]),
            error_detail: rejected(),
            ..Default::default()
        })
        .await;
    let third = client.recv().await;
    assert_eq!(delta_content(&third), map(&[("c/1", "c1")]));
    let status = fetch_status(&channel, "delta-client").await;
    assert!(
        status.iter().all(|s| s.client_status != "NACKED"),
        "a stale nonce is not a NACK: {status:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn delta_reconnect_with_initial_resource_versions_receives_only_changes() {
    let (server, channel) = server_with_ab().await;
    publish(&channel, "c/1", "c1").await;
    let mut client = DeltaClient::subscribe(channel.clone(), METADATA_TYPE_URL, &["*"]).await;
    let first = client.recv().await;
    client.ack(&first).await;
    let held: std::collections::HashMap<String, String> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    assert_eq!(held.len(), 3);
    drop(client);
    publish(&channel, "b/1", "b2").await;
    delete(&channel, "c/1").await;
    let mut resumed = DeltaClient::open(
        channel.clone(),
        "delta-client",
        DeltaDiscoveryRequest {
            type_url: METADATA_TYPE_URL.into(),
            resource_names_subscribe: names(&["*"]),
            initial_resource_versions: held,
            ..Default::default()
        },
    )
    .await;
    let response = resumed.recv().await;
    assert_eq!(delta_content(&response), map(&[("b/1", "b2")]));
    assert_eq!(response.removed_resources, names(&["c/1"]));
    resumed.ack(&response).await;
    resumed.expect_silence().await;
    server.stop().await;
}

#[tokio::test]
async fn delta_removal_via_removed_resources() {
    let (server, channel) = server_with_ab().await;
    let mut client =
        DeltaClient::subscribe(channel.clone(), METADATA_TYPE_URL, &["a/1", "b/1"]).await;
    let first = client.recv().await;
    client.ack(&first).await;
    delete(&channel, "b/1").await;
    let next = client.recv().await;
    assert!(next.resources.is_empty());
    assert_eq!(next.removed_resources, names(&["b/1"]));
    // Still subscribed: it comes back when republished.
    client.ack(&next).await;
    publish(&channel, "b/1", "again").await;
    assert_eq!(
        delta_content(&client.recv().await),
        map(&[("b/1", "again")])
    );
    server.stop().await;
}

#[tokio::test]
async fn delta_unknown_type_url_is_answered_empty() {
    let server = TestServer::memory().await;
    let mut client = DeltaClient::subscribe(server.channel().await, UNKNOWN_TYPE_URL, &[]).await;
    let response = client.recv().await;
    assert_eq!(response.type_url, UNKNOWN_TYPE_URL);
    assert!(response.resources.is_empty() && response.removed_resources.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn delta_protocol_violation_is_invalid_argument() {
    let server = TestServer::memory().await;
    let request = DeltaDiscoveryRequest {
        node: Some(node("delta-client", None)),
        ..Default::default()
    };
    let mut responses = AggregatedDiscoveryServiceClient::new(server.channel().await)
        .delta_aggregated_resources(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let error = responses.message().await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    server.stop().await;
}

// === Envoy resources from the config directory ===

#[tokio::test]
async fn envoy_config_dir_changes_are_pushed() {
    const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("clusters.yaml");
    let clusters = |names: &[&str]| -> String {
        names
            .iter()
            .map(|n| format!("- {{\"@type\": {CLUSTER}, name: {n}, type: EDS, eds_cluster_config: {{eds_config: {{ads: {{}}}}}}}}\n"))
            .collect()
    };
    std::fs::write(&file, clusters(&["one", "two"])).unwrap();
    let mut config = pixiu_metadata::Config::default();
    config.store.backend = pixiu_metadata::config::Backend::Memory;
    config.envoy.config_dir = Some(dir.path().to_path_buf());
    config.envoy.poll_interval = Duration::from_millis(50);
    let server = TestServer::start(config).await;
    let mut client = DeltaClient::subscribe(server.channel().await, CLUSTER, &[]).await;
    let first = client.recv().await;
    let mut got: Vec<_> = first.resources.iter().map(|r| r.name.clone()).collect();
    got.sort();
    assert_eq!(got, ["one", "two"]);
    client.ack(&first).await;
    // A bad file keeps the previous good set.
    std::fs::write(&file, "- {broken").unwrap();
    client.expect_silence().await;
    std::fs::write(&file, clusters(&["one", "three"])).unwrap();
    let next = client.recv().await;
    assert_eq!(
        next.resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["three"]
    );
    assert_eq!(next.removed_resources, names(&["two"]));
    server.stop().await;
}

// === CSDS ===

/// One CSDS entry, flattened.
#[derive(Debug, PartialEq)]
struct Entry {
    type_url: String,
    name: String,
    client_status: String,
    error: String,
}

fn entries(response: &ClientStatusResponse) -> Vec<Entry> {
    response
        .config
        .iter()
        .flat_map(|c| &c.generic_xds_configs)
        .map(|g| Entry {
            type_url: g.type_url.clone(),
            name: g.name.clone(),
            client_status: ClientResourceStatus::try_from(g.client_status)
                .unwrap()
                .as_str_name()
                .into(),
            error: g
                .error_state
                .as_ref()
                .map(|e| e.details.clone())
                .unwrap_or_default(),
        })
        .collect()
}

fn node_request(node_id: &str) -> ClientStatusRequest {
    ClientStatusRequest {
        node_matchers: vec![NodeMatcher {
            node_id: Some(StringMatcher {
                match_pattern: Some(MatchPattern::Exact(node_id.into())),
                ignore_case: false,
            }),
            node_metadatas: vec![],
        }],
        ..Default::default()
    }
}

async fn fetch_status(channel: &Channel, node_id: &str) -> Vec<Entry> {
    let response = ClientStatusDiscoveryServiceClient::new(channel.clone())
        .fetch_client_status(node_request(node_id))
        .await
        .unwrap()
        .into_inner();
    entries(&response)
}

#[tokio::test]
async fn csds_reports_acked_nacked_and_missing_per_node() {
    let (server, channel) = server_with_ab().await;
    let mut acking = AdsClient::open(
        channel.clone(),
        node("csds-node", None),
        METADATA_TYPE_URL,
        &["a/1", "missing/1"],
    )
    .await;
    let first = acking.recv().await;
    acking.ack(&first, &["a/1", "missing/1"]).await;
    let mut nacking = DeltaClient::open(
        channel.clone(),
        "csds-node",
        DeltaDiscoveryRequest {
            type_url: METADATA_TYPE_URL.into(),
            resource_names_subscribe: names(&["b/1"]),
            ..Default::default()
        },
    )
    .await;
    let rejected_response = nacking.recv().await;
    nacking.nack(&rejected_response).await;
    let mut other = sotw(&server, &["a/1"]).await;
    other.recv().await;

    // ACK and NACK are processed asynchronously: poll until both show.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = fetch_status(&channel, "csds-node").await;
        let settled = status.iter().any(|e| e.client_status == "ACKED")
            && status.iter().any(|e| e.client_status == "NACKED");
        if settled || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let entry = |name: &str, client_status: &str, error: &str| Entry {
        type_url: METADATA_TYPE_URL.into(),
        name: name.into(),
        client_status: client_status.into(),
        error: error.into(),
    };
    assert_eq!(
        status,
        [
            entry("a/1", "ACKED", ""),
            entry("missing/1", "DOES_NOT_EXIST", ""),
            entry("b/1", "NACKED", "rejected by test client"),
        ]
    );

    // The streaming variant answers each request; without matchers every node is listed.
    let (tx, rx) = mpsc::channel(2);
    let mut stream = ClientStatusDiscoveryServiceClient::new(channel.clone())
        .stream_client_status(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(ClientStatusRequest::default()).await.unwrap();
    let all = stream.message().await.unwrap().unwrap();
    let mut node_ids: Vec<_> = all
        .config
        .iter()
        .map(|c| c.node.as_ref().unwrap().id.clone())
        .collect();
    node_ids.sort();
    assert_eq!(node_ids, ["csds-node", "sotw-client"]);
    tx.send(node_request("sotw-client")).await.unwrap();
    let one = stream.message().await.unwrap().unwrap();
    assert_eq!(one.config.len(), 1);
    drop(tx);
    server.stop().await;
}

// === slow consumers ===

const N_KEYS: usize = 100;
const N_PUBLISHES: usize = 10_000;

/// A client that stops reading while 10,000 changes happen: another subscriber is still
/// served promptly, the slow one converges to the latest state when it resumes, and it
/// receives far fewer responses than there were changes (they coalesce instead of queueing).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_consumer_costs_bounded_memory_and_slows_no_one() {
    let server = TestServer::memory().await;
    let channel = server.channel().await;
    let key = |i: usize| format!("storm/{i:03}");
    for i in 0..N_KEYS {
        publish(&channel, &key(i), "initial").await;
    }
    // The slow client has its own connection with a small HTTP/2 window, so it stops the
    // server's writes soon after it stops reading.
    let slow_channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(64 * 1024)
        .connect()
        .await
        .unwrap();
    let mut slow = AdsClient::open(slow_channel, node("slow", None), METADATA_TYPE_URL, &[]).await;
    let first = slow.recv().await;
    assert_eq!(first.resources.len(), N_KEYS);
    // From here on the slow client reads nothing.

    let mut fast = AdsClient::open(
        server.channel().await,
        node("fast", None),
        METADATA_TYPE_URL,
        &["probe/1"],
    )
    .await;
    let empty = fast.recv().await;
    fast.ack(&empty, &["probe/1"]).await;

    let started = Instant::now();
    let mut probe_latencies = Vec::new();
    let n_writers = 8;
    let per_round = 1_000;
    for round in 0..N_PUBLISHES / per_round {
        let mut writers = Vec::new();
        for w in 0..n_writers {
            let channel = channel.clone();
            writers.push(tokio::spawn(async move {
                let mut client = metadata_client(channel);
                for j in (w..per_round).step_by(n_writers) {
                    let n = round * per_round + j;
                    client
                        .publish(PublishMetadataRequest {
                            application_name: "storm".into(),
                            revision: format!("{:03}", n % N_KEYS),
                            metadata_info: format!("v{n}"),
                        })
                        .await
                        .unwrap();
                }
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
        // The probe: publish and time the push to the fast subscriber.
        let sent = Instant::now();
        publish(&channel, "probe/1", &format!("p{round}")).await;
        let response = fast.recv().await;
        probe_latencies.push(sent.elapsed());
        assert_eq!(
            sotw_content(&response),
            map(&[("probe/1", &format!("p{round}"))])
        );
        fast.ack(&response, &["probe/1"]).await;
    }
    let storm = started.elapsed();
    probe_latencies.sort();
    let max_latency = *probe_latencies.last().unwrap();
    let median_latency = probe_latencies[probe_latencies.len() / 2];

    // The latest state, as the store holds it: the writers of one round race on the same
    // keys (n and n + N_KEYS go to different writers), so which value of a round lands last
    // is not known in advance.
    let mut reader = metadata_client(channel.clone());
    let mut latest = BTreeMap::new();
    for i in 0..N_KEYS {
        let got = reader
            .get(GetMetadataRequest {
                application_name: "storm".into(),
                revision: format!("{i:03}"),
            })
            .await
            .unwrap()
            .into_inner();
        latest.insert(key(i), got.metadata_info);
    }
    let resumed = Instant::now();
    let mut n_responses = 0;
    loop {
        let response = slow.recv().await;
        n_responses += 1;
        let content = sotw_content(&response);
        let storm_only: BTreeMap<_, _> = content
            .into_iter()
            .filter(|(k, _)| k.starts_with("storm/"))
            .collect();
        if storm_only == latest {
            break;
        }
        assert!(n_responses < N_PUBLISHES, "the slow client never converged");
    }
    let converge = resumed.elapsed();
    println!(
        "slow consumer: {N_PUBLISHES} publishes in {storm:?}; probe push latency median {median_latency:?}, max {max_latency:?}; \
         slow stream converged after {n_responses} responses in {converge:?}"
    );
    assert!(
        max_latency < Duration::from_secs(1),
        "a stuck stream must not slow others: max probe latency {max_latency:?}"
    );
    assert!(
        n_responses < N_PUBLISHES / 10,
        "pending changes coalesce: {n_responses} responses for {N_PUBLISHES} changes"
    );
    server.stop().await;
}
