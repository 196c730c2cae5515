//! Graceful shutdown: in-flight publishes finish and stay durable, streams end, and a client
//! that never completes its request cannot hold the server past the drain timeout.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pixiu_metadata::{
    config::{Backend, Config},
    pb::{
        METADATA_TYPE_URL,
        metadata::{GetMetadataRequest, PublishMetadataRequest},
    },
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn embedded(dir: &std::path::Path, drain_timeout: Duration) -> Config {
    let mut config = Config::default();
    config.store.backend = Backend::Embedded;
    config.store.data_dir = dir.to_path_buf();
    config.grpc.drain_timeout = drain_timeout;
    config
}

/// Starts the server on its own listener, returning its address, shutdown and task.
async fn start(
    config: Config,
) -> (
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), pixiu_metadata::Error>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(pixiu_metadata::run(config, listener, shutdown.clone()));
    (addr, shutdown, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_load_keeps_every_acknowledged_publish_and_ends_streams() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, shutdown, task) = start(embedded(dir.path(), Duration::from_secs(10))).await;
    let channel = channel_to(addr).await;
    let mut ads = AdsClient::open(
        channel.clone(),
        node("watcher", None),
        METADATA_TYPE_URL,
        &[],
    )
    .await;
    let _ = ads.recv().await;

    let mut publishers = Vec::new();
    for publisher in 0..4 {
        let mut md = metadata_client(channel.clone());
        publishers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0.. {
                let revision = format!("p{publisher}-{i}");
                let request = PublishMetadataRequest {
                    application_name: "greeter".into(),
                    revision: revision.clone(),
                    metadata_info: format!("value of {revision}"),
                };
                match md.publish(request).await {
                    Ok(_) => acknowledged.push(revision),
                    Err(_) => return acknowledged,
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the server stops within its drain timeout")
        .unwrap()
        .unwrap();
    let took = stopping.elapsed();
    let mut acknowledged = Vec::new();
    for publisher in publishers {
        acknowledged.extend(publisher.await.unwrap());
    }
    eprintln!(
        "stopped {took:?} after the signal, under 4 publishers; {} publishes acknowledged",
        acknowledged.len()
    );
    // In-flight publishes wait for their fsync, which a loaded disk can stretch; the drain
    // timeout (10 s) bounds it.
    assert!(
        took < Duration::from_secs(12),
        "graceful stop took {took:?}"
    );
    assert!(!acknowledged.is_empty());
    // The ADS stream was ended by the server, not left hanging: after the pushes of the
    // publishes made before the signal, it ends.
    tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = ads.responses.message().await {}
    })
    .await
    .expect("the stream ends on shutdown");

    // Every acknowledged publish is there after a restart.
    let (addr, shutdown, task) = start(embedded(dir.path(), Duration::from_secs(10))).await;
    let mut md = metadata_client(channel_to(addr).await);
    for revision in &acknowledged {
        let got = md
            .get(GetMetadataRequest {
                application_name: "greeter".into(),
                revision: revision.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("acknowledged {revision} lost: {s:?}"))
            .into_inner();
        assert_eq!(got.metadata_info, format!("value of {revision}"));
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_request_cannot_hold_shutdown() {
    const DRAIN: Duration = Duration::from_secs(1);
    let dir = tempfile::tempdir().unwrap();
    let (addr, shutdown, task) = start(embedded(dir.path(), DRAIN)).await;
    let _ = channel_to(addr).await;
    // A raw HTTP/2 client opens a Publish and never sends its body.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{addr}/pixiu.pkg.metadata.MetadataService/Publish"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (_response, _body) = client.send_request(request, false).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let stopping = Instant::now();
    shutdown.cancel();
    tokio::time::timeout(DRAIN + Duration::from_secs(5), task)
        .await
        .expect("the server stops after the drain timeout")
        .unwrap()
        .unwrap();
    let took = stopping.elapsed();
    eprintln!("a stuck request held shutdown for {took:?} (drain timeout {DRAIN:?})");
    assert!(
        took >= DRAIN,
        "the stuck request had its drain time: {took:?}"
    );
    assert!(took < DRAIN + Duration::from_secs(3), "{took:?}");
    connection.abort();
}
