//! Shared test harness: the real server on `127.0.0.1:0`, stopped and joined by the test.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::{net::SocketAddr, path::Path, time::Duration};

use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DiscoveryRequest, DiscoveryResponse,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use pixiu_metadata::{
    config::{Backend, Config},
    pb::metadata::{
        metadata_service_client::MetadataServiceClient,
        service_definition_service_client::ServiceDefinitionServiceClient,
    },
};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Streaming, transport::Channel};

pub struct TestServer {
    pub addr: SocketAddr,
    /// The admin HTTP port.
    pub admin_addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), pixiu_metadata::Error>>>,
}

impl TestServer {
    /// A server on the memory store.
    pub async fn memory() -> Self {
        let mut config = Config::default();
        config.store.backend = Backend::Memory;
        Self::start(config).await
    }

    /// A server on the embedded store in `dir`.
    pub async fn embedded(dir: &Path) -> Self {
        let mut config = Config::default();
        config.store.backend = Backend::Embedded;
        config.store.data_dir = dir.to_path_buf();
        Self::start(config).await
    }

    pub async fn start(mut config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        config.grpc.addr = addr;
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        config.admin.addr = admin_addr;
        let listeners = pixiu_metadata::Listeners {
            grpc: listener,
            admin: Some(admin),
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(pixiu_metadata::run(config, listeners, shutdown.clone()));
        Self {
            addr,
            admin_addr,
            shutdown,
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The admin HTTP base URL, e.g. `http://127.0.0.1:40000`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    pub async fn channel(&self) -> Channel {
        channel_to(self.addr).await
    }

    /// Stops the server and re-raises a panic or error from it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let task = self.task.take().unwrap();
        match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => panic!("server failed: {error:?}"),
            Ok(Err(join_error)) => std::panic::resume_unwind(join_error.into_panic()),
            Err(_) => panic!("server did not stop within 10s"),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Connects, retrying while the server is still starting (no sleeping before connecting).
pub async fn channel_to(addr: SocketAddr) -> Channel {
    let endpoint = Channel::from_shared(format!("http://{addr}")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return channel,
            Err(error) if tokio::time::Instant::now() > deadline => {
                panic!("cannot connect to {addr}: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

pub fn metadata_client(channel: Channel) -> MetadataServiceClient<Channel> {
    MetadataServiceClient::new(channel)
        .max_decoding_message_size(8 * 1024 * 1024)
        .max_encoding_message_size(8 * 1024 * 1024)
}

pub fn definition_client(channel: Channel) -> ServiceDefinitionServiceClient<Channel> {
    ServiceDefinitionServiceClient::new(channel)
        .max_decoding_message_size(8 * 1024 * 1024)
        .max_encoding_message_size(8 * 1024 * 1024)
}

pub fn with_namespace<T>(message: T, namespace: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-pixiu-namespace", namespace.parse().unwrap());
    request
}

/// A State-of-the-World ADS client that behaves like a real one.
pub struct AdsClient {
    tx: mpsc::Sender<DiscoveryRequest>,
    pub responses: Streaming<DiscoveryResponse>,
}

pub fn node(id: &str, namespace: Option<&str>) -> Node {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    Node {
        id: id.to_string(),
        metadata: namespace.map(|ns| Struct {
            fields: [(
                "NAMESPACE".to_string(),
                Value {
                    kind: Some(Kind::StringValue(ns.to_string())),
                },
            )]
            .into(),
        }),
        ..Default::default()
    }
}

impl AdsClient {
    /// Opens a stream and sends the first request.
    pub async fn open(channel: Channel, node: Node, type_url: &str, names: &[&str]) -> Self {
        let (tx, rx) = mpsc::channel(16);
        tx.send(DiscoveryRequest {
            node: Some(node),
            type_url: type_url.to_string(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
        let responses = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, responses }
    }

    pub async fn send(&self, request: DiscoveryRequest) {
        self.tx.send(request).await.unwrap();
    }

    /// The next response, failing the test after 10 s.
    pub async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), self.responses.message())
            .await
            .expect("a response within 10s")
            .expect("stream healthy")
            .expect("stream open")
    }

    /// Asserts that nothing arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Ok(message) = tokio::time::timeout(wait, self.responses.message()).await {
            panic!("expected no response, got {message:?}");
        }
    }

    /// ACKs `response` for `names`.
    pub async fn ack(&self, response: &DiscoveryResponse, names: &[&str]) {
        self.send(DiscoveryRequest {
            type_url: response.type_url.clone(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            version_info: response.version_info.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    /// NACKs `response`, reporting `previous_version` as the last accepted one.
    pub async fn nack(&self, response: &DiscoveryResponse, previous_version: &str, names: &[&str]) {
        self.send(DiscoveryRequest {
            type_url: response.type_url.clone(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            version_info: previous_version.to_string(),
            response_nonce: response.nonce.clone(),
            error_detail: Some(envoy_types::pb::google::rpc::Status {
                code: 3,
                message: "rejected by test client".into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }
}
/// One HTTP/1.1 GET on a connection of its own (closed after it), with an optional bearer
/// token: the status and the whole response, headers included. Panics without an answer
/// within 10 s.
pub async fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .unwrap_or_else(|_| panic!("GET {path}: no answer within 10 s"))
    .unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, response)
}

pub mod etcd;
pub mod kube;
pub mod pki;
