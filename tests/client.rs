//! The Rust client against the real server: a provider publishes and a consumer receives
//! (with the push latency printed), a provider restarts with a new revision, leases live as
//! long as the client, and a subscription converges across a server restart without
//! duplicates or gaps, over Delta and over State of the World.

mod common;

use std::{net::SocketAddr, path::Path, time::Duration};

use common::TestServer;
use futures::StreamExt;
use pixiu_metadata::{
    client::{Backoff, Client, ClientConfig, Update, Updates, Variant},
    config::{Backend, Config},
    model::Key,
    pb::metadata::{Metadata, ServiceMapping},
    store::Store,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn fast(config: ClientConfig) -> ClientConfig {
    config.backoff(Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(300),
        ..Backoff::default()
    })
}

async fn next<T: std::fmt::Debug>(updates: &mut Updates<T>) -> Update<T> {
    tokio::time::timeout(Duration::from_secs(10), updates.next())
        .await
        .expect("an update within 10s")
        .expect("the subscription is open")
}

async fn silent<T: std::fmt::Debug>(updates: &mut Updates<T>, wait: Duration) {
    if let Ok(update) = tokio::time::timeout(wait, updates.next()).await {
        panic!("expected no update, got {update:?}");
    }
}

fn short(update: &Update<Metadata>) -> String {
    match update {
        Update::Added { name, resource, .. } => format!("+{name}={}", resource.metadata_info),
        Update::Updated { name, resource, .. } => format!("~{name}={}", resource.metadata_info),
        Update::Removed { name } => format!("-{name}"),
    }
}

#[tokio::test]
async fn provider_publishes_and_restarts_consumer_follows() {
    let mut config = Config::default();
    config.store.backend = Backend::Memory;
    config.lease.ttl = Duration::from_secs(2);
    let server = TestServer::start(config).await;
    let consumer = Client::connect(fast(ClientConfig::new(server.url()).namespace("shop")))
        .await
        .unwrap();
    // Subscribed before the provider exists.
    let mut metadata = consumer.subscribe::<Metadata>(["greeter/r1", "greeter/r2"]);
    let mut providers = consumer.subscribe::<ServiceMapping>(["org.example.Greeter"]);

    let provider_config = || {
        ClientConfig::new(server.url())
            .namespace("shop")
            .lease_ttl(Duration::from_secs(2))
    };
    let provider = Client::connect(provider_config()).await.unwrap();
    let started = tokio::time::Instant::now();
    provider
        .publish_metadata("greeter", "r1", "{\"revision\":\"r1\"}")
        .await
        .unwrap();
    let update = next(&mut metadata).await;
    let latency = started.elapsed();
    assert_eq!(short(&update), "+greeter/r1={\"revision\":\"r1\"}");
    println!("publish -> consumer latency: {latency:?}");
    provider
        .register_mapping("org.example.Greeter", "greeter")
        .await
        .unwrap();
    match next(&mut providers).await {
        Update::Added { resource, .. } => assert_eq!(resource.application_names, ["greeter"]),
        other => panic!("{other:?}"),
    }
    // The client refreshes its leases (every TTL/3): nothing expires while it lives.
    silent(&mut metadata, Duration::from_secs(3)).await;
    assert_eq!(
        consumer.get_mapping("org.example.Greeter").await.unwrap(),
        ["greeter"]
    );

    // The provider restarts with a new revision: r2 appears at once, r1 expires with its
    // lease, the mapping stays (the new instance registers it again).
    drop(provider);
    let provider = Client::connect(provider_config()).await.unwrap();
    let started = tokio::time::Instant::now();
    provider
        .publish_metadata("greeter", "r2", "{\"revision\":\"r2\"}")
        .await
        .unwrap();
    assert_eq!(
        short(&next(&mut metadata).await),
        "+greeter/r2={\"revision\":\"r2\"}"
    );
    println!(
        "new revision publish -> consumer latency: {:?}",
        started.elapsed()
    );
    provider
        .register_mapping("org.example.Greeter", "greeter")
        .await
        .unwrap();
    let expired_at = tokio::time::Instant::now();
    assert_eq!(short(&next(&mut metadata).await), "-greeter/r1");
    println!(
        "old revision removed {:?} after the restart",
        expired_at.elapsed()
    );
    assert_eq!(
        consumer.get_metadata("greeter", "r2").await.unwrap(),
        "{\"revision\":\"r2\"}"
    );
    silent(&mut providers, Duration::from_millis(500)).await;

    // Once no provider is left alive, the mapping disappears with its lease.
    drop(provider);
    match next(&mut providers).await {
        Update::Removed { name } => assert_eq!(name, "org.example.Greeter"),
        other => panic!("{other:?}"),
    }
    assert_eq!(short(&next(&mut metadata).await), "-greeter/r2");
    server.stop().await;
}

/// A server on the embedded store in `dir`, on `addr`.
async fn start_at(
    addr: SocketAddr,
    dir: &Path,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), pixiu_metadata::Error>>,
) {
    let mut config = Config::default();
    config.store.backend = Backend::Embedded;
    config.store.data_dir = dir.to_path_buf();
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => break listener,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(pixiu_metadata::run(config, listener, shutdown.clone()));
    (shutdown, task)
}

async fn converges_across_a_server_restart(variant: Variant) {
    let dir = tempfile::tempdir().unwrap();
    // The port is bound again after the restart: one outside the ephemeral range, which no
    // client's connection can take while the server is down.
    let port = pixiu_metadata::loopback::free_port().unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (shutdown, task) = start_at(addr, dir.path()).await;
    let config = || fast(ClientConfig::new(format!("http://{addr}")).variant(variant));
    let connect = || async {
        loop {
            if let Ok(client) = Client::connect(config()).await {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let provider = connect().await;
    let consumer = connect().await;
    // Every metadata of the namespace.
    let mut updates = consumer.subscribe::<Metadata>(Vec::<String>::new());
    provider.publish_metadata("app", "r1", "one").await.unwrap();
    provider.publish_metadata("app", "r2", "two").await.unwrap();
    assert_eq!(short(&next(&mut updates).await), "+app/r1=one");
    assert_eq!(short(&next(&mut updates).await), "+app/r2=two");
    provider.forget_all();
    drop(provider);

    shutdown.cancel();
    task.await.unwrap().unwrap();
    // While the server is down, the data changes under it: r1 goes, r2 is unchanged, r3 is new.
    {
        let store =
            pixiu_metadata::store::embedded::EmbeddedStore::open(dir.path(), usize::MAX).unwrap();
        assert!(
            store
                .delete(&Key::metadata("default", "app", "r1"), None)
                .await
                .unwrap()
        );
        store
            .put(
                &Key::metadata("default", "app", "r3"),
                "three",
                std::time::SystemTime::now(),
            )
            .await
            .unwrap();
    }
    let (shutdown, task) = start_at(addr, dir.path()).await;
    // The consumer reconnects by itself and is told exactly what changed: no r2 again.
    let mut seen = vec![
        short(&next(&mut updates).await),
        short(&next(&mut updates).await),
    ];
    seen.sort();
    assert_eq!(seen, ["+app/r3=three", "-app/r1"], "{variant:?}");
    silent(&mut updates, Duration::from_millis(500)).await;
    // And follows new changes on the new server.
    let provider = connect().await;
    provider
        .publish_metadata("app", "r2", "two!")
        .await
        .unwrap();
    assert_eq!(short(&next(&mut updates).await), "~app/r2=two!");
    drop(consumer);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn delta_subscription_converges_across_a_server_restart() {
    converges_across_a_server_restart(Variant::Delta).await;
}

#[tokio::test]
async fn sotw_subscription_converges_across_a_server_restart() {
    converges_across_a_server_restart(Variant::Sotw).await;
}

/// A message that does not decode what the server sends as `Metadata` (field 1 is a string
/// on the wire, a varint here).
#[derive(Clone, PartialEq, prost::Message)]
struct NotMetadata {
    #[prost(uint64, tag = "1")]
    number: u64,
}

impl pixiu_metadata::client::Resource for NotMetadata {
    const TYPE_URL: &'static str = pixiu_metadata::pb::METADATA_TYPE_URL;
    fn name(&self) -> String {
        self.number.to_string()
    }
}

#[tokio::test]
async fn a_resource_that_does_not_decode_is_nacked() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::{client::legacy::Client as HttpClient, rt::TokioExecutor};

    let server = TestServer::memory().await;
    let client = Client::connect(ClientConfig::new(server.url()).node_id("nacking-consumer"))
        .await
        .unwrap();
    client.publish_metadata("app", "r1", "v").await.unwrap();
    let mut updates = client.subscribe::<NotMetadata>(["app/r1"]);
    silent(&mut updates, Duration::from_millis(500)).await;
    let http = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<axum::body::Bytes>>();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let url = format!("{}/debug/syncz", server.admin_url());
        let response = http.get(url.parse().unwrap()).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let syncz: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let text = syncz.to_string();
        if text.contains("nacking-consumer") && text.contains("\"n_nacks\":1") {
            assert!(text.contains("does not decode"), "{syncz:#}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no NACK recorded: {syncz:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(updates);
    server.stop().await;
}

/// An ADS server that speaks only State of the World, like many control planes.
struct SotwOnly(pixiu_xds::AdsServer);

#[tonic::async_trait]
impl envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService
    for SotwOnly
{
    type StreamAggregatedResourcesStream = pixiu_xds::server::ResponseStream<
        envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
    >;
    type DeltaAggregatedResourcesStream = pixiu_xds::server::ResponseStream<
        envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse,
    >;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<
            tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest>,
        >,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        self.0.serve_sotw(request)
    }

    async fn delta_aggregated_resources(
        &self,
        _request: tonic::Request<
            tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest>,
        >,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("no Delta here"))
    }
}

#[tokio::test]
async fn falls_back_to_state_of_the_world_when_delta_is_unimplemented() {
    use envoy_types::pb::{
        envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer,
        google::protobuf::Any,
    };
    use prost::Message;

    let (cache, writer) = pixiu_xds::cache();
    let put = |info: &str| pixiu_xds::Update::Put {
        partition: pixiu_xds::Partition::new("default"),
        type_url: pixiu_xds::TypeUrl::new(pixiu_metadata::pb::METADATA_TYPE_URL),
        name: pixiu_xds::ResourceName::new("app/r1"),
        body: Any {
            type_url: pixiu_metadata::pb::METADATA_TYPE_URL.into(),
            value: Metadata {
                application_name: "app".into(),
                revision: "r1".into(),
                metadata_info: info.into(),
                namespace: "default".into(),
            }
            .encode_to_vec(),
        },
    };
    writer.apply([put("one")]);
    let shutdown = CancellationToken::new();
    let ads = pixiu_xds::AdsServer::new(
        cache,
        std::sync::Arc::new(pixiu_metadata::push::NamespaceResolver::new("default")),
        pixiu_xds::Registry::new(),
        pixiu_xds::ServerConfig::default(),
        shutdown.clone(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(SotwOnly(ads)))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                shutdown.clone().cancelled_owned(),
            ),
    );
    let client = Client::connect(fast(ClientConfig::new(format!("http://{addr}"))))
        .await
        .unwrap();
    let mut updates = client.subscribe::<Metadata>(["app/r1"]);
    assert_eq!(short(&next(&mut updates).await), "+app/r1=one");
    writer.apply([put("uno")]);
    assert_eq!(short(&next(&mut updates).await), "~app/r1=uno");
    drop(updates);
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_mapping_registered_on_one_replica_reaches_a_consumer_of_another() {
    let etcd = common::etcd::Etcd::start().await;
    let replica = || {
        let mut config = Config::default();
        config.store.backend = Backend::Etcd;
        config.store.etcd_endpoints = vec![etcd.endpoint()];
        config.lease.ttl = Duration::from_secs(2);
        TestServer::start(config)
    };
    let a = replica().await;
    let b = replica().await;
    let provider = Client::connect(ClientConfig::new(a.url()).lease_ttl(Duration::from_secs(2)))
        .await
        .unwrap();
    let consumer = Client::connect(fast(ClientConfig::new(b.url())))
        .await
        .unwrap();
    let mut providers = consumer.subscribe::<ServiceMapping>(["org.example.Greeter"]);
    let started = tokio::time::Instant::now();
    provider
        .register_mapping("org.example.Greeter", "greeter")
        .await
        .unwrap();
    match next(&mut providers).await {
        Update::Added { resource, .. } => assert_eq!(resource.application_names, ["greeter"]),
        other => panic!("{other:?}"),
    }
    println!("mapping A -> B latency over etcd: {:?}", started.elapsed());
    // Kept alive by the provider's refreshes, then gone with its lease once it stops.
    silent(&mut providers, Duration::from_secs(3)).await;
    drop(provider);
    match next(&mut providers).await {
        Update::Removed { name } => assert_eq!(name, "org.example.Greeter"),
        other => panic!("{other:?}"),
    }
    drop(providers);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_subscription_the_server_refuses_ends_with_the_reason() {
    let server = TestServer::memory().await;
    // A namespace holding '/' is refused by the server: no retry would change the answer.
    let client = Client::connect(ClientConfig::new(server.url()).namespace("a/b"))
        .await
        .unwrap();
    let mut updates = client.subscribe::<Metadata>(["app/r1"]);
    let ended = tokio::time::timeout(Duration::from_secs(5), updates.next())
        .await
        .expect("the stream ends instead of reconnecting");
    assert!(ended.is_none(), "{ended:?}");
    let refusal = updates.refusal().expect("the reason is kept");
    assert_eq!(refusal.code(), tonic::Code::InvalidArgument, "{refusal:?}");
    server.stop().await;
}
