//! Replicas on one real etcd: a publish on one replica reaches subscribers of another, and
//! both ride out an etcd outage.

mod common;

use std::time::{Duration, Instant};

use clap::Parser;
use common::{etcd::Etcd, *};
use pixiu_metadata::{
    cli::{Cli, Command},
    config::{Backend, Config},
    pb::{
        METADATA_TYPE_URL,
        metadata::{GetMetadataRequest, Metadata, PublishMetadataRequest},
    },
};
use prost::Message;
use tonic::Code;

fn etcd_config(etcd: &Etcd) -> Config {
    let mut config = Config::default();
    config.store.backend = Backend::Etcd;
    config.store.etcd_endpoints = vec![etcd.endpoint()];
    config
}

fn publish_md(app: &str, revision: &str, info: &str) -> PublishMetadataRequest {
    PublishMetadataRequest {
        application_name: app.into(),
        revision: revision.into(),
        metadata_info: info.into(),
    }
}

fn get_md(app: &str, revision: &str) -> GetMetadataRequest {
    GetMetadataRequest {
        application_name: app.into(),
        revision: revision.into(),
    }
}

fn decode_metadata(
    response: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> Vec<Metadata> {
    response
        .resources
        .iter()
        .map(|any| Metadata::decode(any.value.as_slice()).unwrap())
        .collect()
}

/// Receives (and ACKs) responses until one holds `revision` with `info`.
async fn recv_until(ads: &mut AdsClient, revision: &str, info: &str) {
    loop {
        let response = ads.recv().await;
        ads.ack(&response, &[]).await;
        if decode_metadata(&response)
            .iter()
            .any(|m| m.revision == revision && m.metadata_info == info)
        {
            return;
        }
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[test]
fn etcd_flags() {
    let cli = Cli::try_parse_from([
        "pixiu-metadata",
        "serve",
        "--store",
        "etcd",
        "--etcd-endpoints",
        "http://10.0.0.1:2379,http://10.0.0.2:2379",
        "--etcd-prefix",
        "/mesh-a",
    ])
    .unwrap();
    let Command::Serve(args) = cli.command else {
        panic!("expected serve");
    };
    let config = args.config().unwrap();
    assert_eq!(config.store.backend, Backend::Etcd);
    assert_eq!(
        config.store.etcd_endpoints,
        ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    );
    assert_eq!(config.store.etcd_prefix, "/mesh-a");

    let cli = Cli::try_parse_from(["pixiu-metadata", "serve", "--store", "etcd"]).unwrap();
    let Command::Serve(args) = cli.command else {
        panic!("expected serve");
    };
    let error = args.config().unwrap_err().to_string();
    assert!(error.contains("--etcd-endpoints"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_replicas_publish_on_one_reaches_subscribers_of_another() {
    const N: usize = 50;
    let etcd = Etcd::start().await;
    let a = TestServer::start(etcd_config(&etcd)).await;
    let b = TestServer::start(etcd_config(&etcd)).await;
    let mut md_a = metadata_client(a.channel().await);
    let mut md_b = metadata_client(b.channel().await);
    let mut ads = AdsClient::open(
        b.channel().await,
        node("consumer-on-b", None),
        METADATA_TYPE_URL,
        &[],
    )
    .await;
    let first = ads.recv().await;
    assert!(decode_metadata(&first).is_empty());
    ads.ack(&first, &[]).await;

    let mut publish_latency = Vec::with_capacity(N);
    let mut a_to_b = Vec::with_capacity(N);
    for i in 0..N {
        let revision = format!("r{i}");
        let info = format!("{{\"app\":\"greeter\",\"n\":{i}}}");
        let started = Instant::now();
        md_a.publish(publish_md("greeter", &revision, &info))
            .await
            .unwrap();
        publish_latency.push(started.elapsed());
        recv_until(&mut ads, &revision, &info).await;
        a_to_b.push(started.elapsed());
    }
    publish_latency.sort();
    a_to_b.sort();
    eprintln!(
        "{N} publishes on replica A: publish acknowledged p50 {:?} p99 {:?}; pushed to a \
         subscriber of replica B (from the start of the publish) p50 {:?} p99 {:?}",
        percentile(&publish_latency, 50),
        percentile(&publish_latency, 99),
        percentile(&a_to_b, 50),
        percentile(&a_to_b, 99),
    );
    // B serves reads of what A wrote, byte for byte.
    let got = md_b
        .get(get_md("greeter", "r7"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.metadata_info, "{\"app\":\"greeter\",\"n\":7}");
    // And the other way round.
    md_b.publish(publish_md("greeter", "from-b", "v"))
        .await
        .unwrap();
    // A learns of B's write through its watch: allow it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let got = loop {
        match md_a.get(get_md("greeter", "from-b")).await {
            Ok(got) => break got,
            Err(status) if status.code() == Code::NotFound && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("A does not see B's write: {status:?}"),
        }
    };
    assert_eq!(got.into_inner().metadata_info, "v");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_outage_reads_and_streams_survive_and_writes_recover() {
    let mut etcd = Etcd::start().await;
    let a = TestServer::start(etcd_config(&etcd)).await;
    let b = TestServer::start(etcd_config(&etcd)).await;
    let mut md_a = metadata_client(a.channel().await);
    let mut md_b = metadata_client(b.channel().await);
    md_a.publish(publish_md("greeter", "r1", "before"))
        .await
        .unwrap();
    let mut ads = AdsClient::open(
        b.channel().await,
        node("consumer-on-b", None),
        METADATA_TYPE_URL,
        &[],
    )
    .await;
    recv_until(&mut ads, "r1", "before").await;

    etcd.kill();
    let started = Instant::now();
    let status = md_a
        .publish(publish_md("greeter", "r2", "during"))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(took < Duration::from_secs(5), "UNAVAILABLE after {took:?}");
    eprintln!("publish with etcd down: UNAVAILABLE after {took:?}");
    // Reads keep working from memory, on both replicas.
    for md in [&mut md_a, &mut md_b] {
        let got = md.get(get_md("greeter", "r1")).await.unwrap().into_inner();
        assert_eq!(got.metadata_info, "before");
    }
    // The subscriber keeps its stream (an error or a push would fail here).
    ads.expect_silence(Duration::from_secs(2)).await;

    etcd.restart().await;
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(20);
    loop {
        match md_a.publish(publish_md("greeter", "r2", "after")).await {
            Ok(_) => break,
            Err(status) if Instant::now() < deadline => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("writes did not recover within 20s: {status:?}"),
        }
    }
    eprintln!(
        "writes recovered {:?} after etcd restarted",
        restarted.elapsed()
    );
    // The publish made after recovery reaches B's subscriber on the same stream.
    recv_until(&mut ads, "r2", "after").await;
    let got = md_b
        .get(get_md("greeter", "r2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.metadata_info, "after");
    let got = md_b
        .get(get_md("greeter", "r1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.metadata_info, "before");
    a.stop().await;
    b.stop().await;
}
