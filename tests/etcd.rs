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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_answers_while_the_store_opens() {
    // etcd hangs while the replica starts: its first list waits, and the probes must not.
    let etcd = Etcd::start().await;
    etcd.freeze(true);
    let server = TestServer::start(etcd_config(&etcd)).await;
    let asked = Instant::now();
    let (code, _) = common::http_get(server.admin_addr, "/healthz", None).await;
    assert_eq!(code, 200);
    let (code, body) = common::http_get(server.admin_addr, "/readyz", None).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("store (etcd): opening"), "{body}");
    let (code, _) = common::http_get(server.admin_addr, "/debug/syncz", None).await;
    assert_eq!(code, 503);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );

    // etcd answers within the start-up timeout: the full admin port takes over.
    etcd.freeze(false);
    let thawed = Instant::now();
    loop {
        let (code, body) = common::http_get(server.admin_addr, "/readyz", None).await;
        if code == 200 {
            break;
        }
        assert!(thawed.elapsed() < Duration::from_secs(10), "still {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, body) = common::http_get(server.admin_addr, "/debug/syncz", None).await;
    assert_eq!(code, 200, "{body}");
    let mut client = metadata_client(server.channel().await);
    client.publish(publish_md("app", "1", "v")).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_shutdown_while_the_store_opens_stops_the_server() {
    let etcd = Etcd::start().await;
    etcd.freeze(true);
    let server = TestServer::start(etcd_config(&etcd)).await;
    assert_eq!(
        common::http_get(server.admin_addr, "/healthz", None)
            .await
            .0,
        200
    );
    let stopping = Instant::now();
    server.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopping.elapsed()
    );
    etcd.freeze(false);
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

fn cluster_config(endpoints: Vec<String>) -> Config {
    let mut config = Config::default();
    config.store.backend = Backend::Etcd;
    config.store.etcd_endpoints = endpoints;
    config
}

/// Publishes until acknowledged or `deadline`; returns whether it was acknowledged. Only
/// `UNAVAILABLE` is an acceptable failure.
async fn publish_retrying(
    md: &mut pixiu_metadata::pb::metadata::metadata_service_client::MetadataServiceClient<
        tonic::transport::Channel,
    >,
    request: PublishMetadataRequest,
    deadline: Instant,
) -> (bool, usize) {
    let mut n_unavailable = 0;
    loop {
        match md.publish(request.clone()).await {
            Ok(_) => return (true, n_unavailable),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                n_unavailable += 1;
                if Instant::now() > deadline {
                    return (false, n_unavailable);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_cluster_member_killed_loses_no_acknowledged_write() {
    const N: usize = 300;
    let mut cluster = common::etcd::EtcdCluster::start(3).await;
    let a = TestServer::start(cluster_config(cluster.endpoints())).await;
    let mut md = metadata_client(a.channel().await);
    let mut acknowledged = Vec::new();
    let mut n_unavailable = 0;
    let mut killed_at = None;
    for i in 0..N {
        if i == N / 3 {
            // Member 0 is the first endpoint the client knows; it dies mid-stream.
            cluster.kill(0);
            killed_at = Some(Instant::now());
        }
        if i == 2 * N / 3 {
            cluster.restart(0).await;
        }
        let request = publish_md("greeter", &format!("r{i}"), &format!("value {i}"));
        let (acked, n_failed) =
            publish_retrying(&mut md, request, Instant::now() + Duration::from_secs(10)).await;
        n_unavailable += n_failed;
        if acked {
            acknowledged.push(i);
        }
    }
    eprintln!(
        "3-member etcd, member 0 killed at publish {} ({:?} ago) and restarted at {}: {} of {N} \
         publishes acknowledged, {n_unavailable} UNAVAILABLE answers retried",
        N / 3,
        killed_at.map(|t| t.elapsed()),
        2 * N / 3,
        acknowledged.len()
    );
    assert_eq!(
        acknowledged.len(),
        N,
        "every publish is eventually acknowledged"
    );
    // The store retries on another member: a dead member costs retries inside the server,
    // hardly ever a failed publish (without those retries, about a quarter of these failed).
    assert!(
        n_unavailable <= 10,
        "{n_unavailable} publishes failed while two members of three were up"
    );

    // Kill another member: the cluster keeps its quorum with two of three.
    cluster.kill(1);
    // A fresh replica lists everything from etcd: each acknowledged write is there.
    let b = TestServer::start(cluster_config(cluster.endpoints())).await;
    let mut md_b = metadata_client(b.channel().await);
    for i in &acknowledged {
        let got = md_b
            .get(get_md("greeter", &format!("r{i}")))
            .await
            .unwrap_or_else(|s| panic!("acknowledged r{i} lost: {s:?}"))
            .into_inner();
        assert_eq!(got.metadata_info, format!("value {i}"));
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_down_30s_under_a_publisher_and_a_subscriber() {
    const OUTAGE: Duration = Duration::from_secs(30);
    let mut etcd = Etcd::start().await;
    let a = TestServer::start(etcd_config(&etcd)).await;
    let b = TestServer::start(etcd_config(&etcd)).await;
    let mut md_b = metadata_client(b.channel().await);
    let mut ads = AdsClient::open(
        b.channel().await,
        node("consumer-on-b", None),
        METADATA_TYPE_URL,
        &[],
    )
    .await;
    let first = ads.recv().await;
    ads.ack(&first, &[]).await;

    // A publisher on A, one new revision every 100 ms, for the whole test.
    let stop = tokio_util::sync::CancellationToken::new();
    let publisher = tokio::spawn({
        let channel = a.channel().await;
        let stop = stop.clone();
        async move {
            let mut md = metadata_client(channel);
            let mut acknowledged = Vec::new();
            let mut n_unavailable = 0usize;
            for i in 0.. {
                if stop.is_cancelled() {
                    break;
                }
                match md
                    .publish(publish_md("greeter", &format!("p{i}"), &format!("v{i}")))
                    .await
                {
                    Ok(_) => acknowledged.push(i),
                    Err(status) => {
                        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                        n_unavailable += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (acknowledged, n_unavailable)
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    etcd.kill();
    let down_at = Instant::now();
    // Reads keep working from memory during the whole outage.
    while down_at.elapsed() < OUTAGE {
        let listed = md_b
            .get(get_md("greeter", "p0"))
            .await
            .expect("reads work while etcd is down")
            .into_inner();
        assert_eq!(listed.metadata_info, "v0");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    etcd.restart().await;
    let restarted = Instant::now();
    // Give the publisher time to get through again, then stop it.
    let deadline = restarted + Duration::from_secs(20);
    loop {
        if md_b.get(get_md("greeter", "after-outage")).await.is_ok() {
            break;
        }
        let mut md_a = metadata_client(a.channel().await);
        let _ = md_a
            .publish(publish_md("greeter", "after-outage", "ok"))
            .await;
        assert!(
            Instant::now() < deadline,
            "writes did not recover within 20s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let recovered = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let (acknowledged, n_unavailable) = publisher.await.unwrap();
    eprintln!(
        "etcd down {OUTAGE:?}: {} publishes acknowledged, {n_unavailable} answered UNAVAILABLE; \
         writes recovered {recovered:?} after etcd restarted",
        acknowledged.len()
    );
    assert!(n_unavailable >= 100, "writes failed during the outage");

    // B's subscriber converges to every acknowledged publish, and B serves each one.
    let want: std::collections::BTreeSet<String> =
        acknowledged.iter().map(|i| format!("p{i}")).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = ads.recv().await;
        ads.ack(&response, &[]).await;
        let have: std::collections::BTreeSet<String> = decode_metadata(&response)
            .into_iter()
            .map(|m| m.revision)
            .collect();
        if want.is_subset(&have) {
            break;
        }
        assert!(Instant::now() < deadline, "the subscriber did not converge");
    }
    for i in &acknowledged {
        let got = md_b
            .get(get_md("greeter", &format!("p{i}")))
            .await
            .unwrap_or_else(|s| panic!("acknowledged p{i} lost: {s:?}"))
            .into_inner();
        assert_eq!(got.metadata_info, format!("v{i}"));
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_replica_lost_delta_subscriber_resumes_on_another_with_only_the_changes() {
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    };
    use std::collections::{BTreeMap, HashMap};

    async fn delta_stream(
        channel: tonic::transport::Channel,
        initial_resource_versions: HashMap<String, String>,
    ) -> (
        tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
        tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(DeltaDiscoveryRequest {
            node: Some(node("moving-consumer", None)),
            type_url: METADATA_TYPE_URL.into(),
            resource_names_subscribe: vec!["*".into()],
            initial_resource_versions,
            ..Default::default()
        })
        .await
        .unwrap();
        let responses = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        (tx, responses)
    }

    let etcd = Etcd::start().await;
    let a = TestServer::start(etcd_config(&etcd)).await;
    let b = TestServer::start(etcd_config(&etcd)).await;
    let mut md_b = metadata_client(b.channel().await);
    for i in 0..20 {
        md_b.publish(publish_md("greeter", &format!("r{i}"), &format!("v{i}")))
            .await
            .unwrap();
    }
    // The consumer follows replica A until it has all 20.
    let mut known: HashMap<String, String> = HashMap::new();
    {
        let (tx, mut responses) = delta_stream(a.channel().await, HashMap::new()).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while known.len() < 20 {
            let response = tokio::time::timeout(Duration::from_secs(10), responses.message())
                .await
                .expect("a response")
                .unwrap()
                .unwrap();
            for resource in &response.resources {
                known.insert(resource.name.clone(), resource.version.clone());
            }
            tx.send(DeltaDiscoveryRequest {
                type_url: METADATA_TYPE_URL.into(),
                response_nonce: response.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
            assert!(Instant::now() < deadline, "A did not send all 20");
        }
    }
    // Replica A is lost; meanwhile one revision changes, one is deleted, one is added.
    a.stop().await;
    md_b.publish(publish_md("greeter", "r3", "v3-changed"))
        .await
        .unwrap();
    let mut md_b_client = metadata_client(b.channel().await);
    md_b_client
        .delete(pixiu_metadata::pb::metadata::DeleteMetadataRequest {
            application_name: "greeter".into(),
            revision: "r5".into(),
        })
        .await
        .unwrap();
    md_b.publish(publish_md("greeter", "r20", "v20"))
        .await
        .unwrap();

    // It reconnects to B with the versions it holds: B sends only the difference.
    let (_tx, mut responses) = delta_stream(b.channel().await, known.clone()).await;
    let response = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("a response")
        .unwrap()
        .unwrap();
    let sent: BTreeMap<String, String> = response
        .resources
        .iter()
        .map(|r| {
            let any = r.resource.as_ref().expect("a resource body");
            (
                r.name.clone(),
                Metadata::decode(any.value.as_slice())
                    .unwrap()
                    .metadata_info,
            )
        })
        .collect();
    eprintln!(
        "resumed on replica B with {} known versions: {} resources sent, removed {:?}",
        known.len(),
        sent.len(),
        response.removed_resources
    );
    assert_eq!(
        sent,
        BTreeMap::from([
            ("greeter/r20".to_string(), "v20".to_string()),
            ("greeter/r3".to_string(), "v3-changed".to_string()),
        ]),
        "only what changed while it moved"
    );
    assert_eq!(response.removed_resources, vec!["greeter/r5".to_string()]);
    b.stop().await;
}
