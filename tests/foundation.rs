//! End-to-end tests of the seed's services and the ADS push, against the real server.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::*;
use pixiu_metadata::pb::{
    METADATA_TYPE_URL, SERVICE_DEFINITION_TYPE_URL,
    metadata::{
        GetMetadataRequest, GetServiceDefinitionRequest, Metadata, PublishMetadataRequest,
        PublishServiceDefinitionRequest, ServiceDefinition,
    },
};
use prost::Message;
use tonic::Code;

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
        .map(|any| {
            assert_eq!(any.type_url, METADATA_TYPE_URL);
            Metadata::decode(any.value.as_slice()).unwrap()
        })
        .collect()
}

const DUBBO_METADATA: &str = r#"{"app":"greeter","revision":"a1b2c3","services":{"org.apache.dubbo.Greeter:tri":{"name":"org.apache.dubbo.Greeter","protocol":"tri","path":"org.apache.dubbo.Greeter","params":{"side":"provider","release":"3.2.0"}}}}"#;

#[tokio::test]
async fn publish_and_get_round_trip_byte_exact() {
    let server = TestServer::memory().await;
    let mut md = metadata_client(server.channel().await);
    let mut sd = definition_client(server.channel().await);
    let large = "元数据-metadata ✓ ".repeat(40_000); // ~1 MB of non-ASCII
    assert!(large.len() < 1024 * 1024);
    let values = [
        DUBBO_METADATA.to_string(),
        "  spaces kept \n\t".to_string(),
        large.clone(),
        String::new(),
    ];
    for (i, value) in values.iter().enumerate() {
        let revision = format!("{:0128x}", i); // SHA-512-sized revision
        md.publish(publish_md("greeter", &revision, value))
            .await
            .unwrap();
        let got = md
            .get(get_md("greeter", &revision))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&got.metadata_info, value, "value {i} byte-exact");

        let identifier = format!("org.apache.dubbo.Greeter{i}:1.0.0::provider:greeter");
        sd.publish(PublishServiceDefinitionRequest {
            identifier: identifier.clone(),
            service_definition: value.clone(),
        })
        .await
        .unwrap();
        let got = sd
            .get(GetServiceDefinitionRequest { identifier })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&got.service_definition, value);
    }
    server.stop().await;
}

#[tokio::test]
async fn error_codes() {
    let server = TestServer::memory().await;
    let mut md = metadata_client(server.channel().await);
    let mut sd = definition_client(server.channel().await);

    let missing = md.get(get_md("nobody", "r")).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let missing = sd
        .get(GetServiceDefinitionRequest {
            identifier: "nothing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let invalid = [
        publish_md("", "r", "v"),
        publish_md("app", "", "v"),
        publish_md("app\0", "r", "v"),
        publish_md("app", "r\n", "v"),
        publish_md("a/b", "r", "v"),
        publish_md(&"a".repeat(254), "r", "v"),
    ];
    for request in invalid {
        let status = md.publish(request.clone()).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{request:?}: {status:?}"
        );
    }
    let status = sd
        .publish(PublishServiceDefinitionRequest {
            identifier: String::new(),
            service_definition: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = md.get(get_md("", "r")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let too_large = "x".repeat(1024 * 1024 + 1);
    let status = md
        .publish(publish_md("app", "r", &too_large))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let status = md
        .publish(publish_md("app", "r", &"x".repeat(3 * 1024 * 1024)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "transport limit");

    let bad_namespace = md
        .publish(with_namespace(publish_md("app", "r", "v"), "a/b"))
        .await
        .unwrap_err();
    assert_eq!(bad_namespace.code(), Code::InvalidArgument);
    // The server is still healthy after all of that.
    md.publish(publish_md("app", "r", "v")).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn namespaces_are_isolated() {
    let server = TestServer::memory().await;
    let mut md = metadata_client(server.channel().await);
    md.publish(with_namespace(
        publish_md("app", "r", "in team-a"),
        "team-a",
    ))
    .await
    .unwrap();
    md.publish(with_namespace(
        publish_md("app", "r", "in team-b"),
        "team-b",
    ))
    .await
    .unwrap();
    let a = md
        .get(with_namespace(get_md("app", "r"), "team-a"))
        .await
        .unwrap();
    assert_eq!(a.into_inner().metadata_info, "in team-a");
    let b = md
        .get(with_namespace(get_md("app", "r"), "team-b"))
        .await
        .unwrap();
    assert_eq!(b.into_inner().metadata_info, "in team-b");
    let default = md.get(get_md("app", "r")).await.unwrap_err();
    assert_eq!(default.code(), Code::NotFound);

    // An ADS client in team-a sees only team-a's metadata, even with a wildcard.
    let mut ads = AdsClient::open(
        server.channel().await,
        node("consumer-a", Some("team-a")),
        METADATA_TYPE_URL,
        &[],
    )
    .await;
    let response = ads.recv().await;
    let got = decode_metadata(&response);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].metadata_info, "in team-a");
    assert_eq!(got[0].namespace, "team-a");
    server.stop().await;
}

#[tokio::test]
async fn ads_subscriber_gets_current_value_then_pushes() {
    let server = TestServer::memory().await;
    let mut md = metadata_client(server.channel().await);
    md.publish(publish_md("greeter", "r1", "v1")).await.unwrap();

    let names = ["greeter/r1", "greeter/r2"];
    let mut ads = AdsClient::open(
        server.channel().await,
        node("consumer-1", None),
        METADATA_TYPE_URL,
        &names,
    )
    .await;
    let first = ads.recv().await;
    let got = decode_metadata(&first);
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].application_name.as_str(), got[0].revision.as_str()),
        ("greeter", "r1")
    );
    assert_eq!(got[0].metadata_info, "v1");
    ads.ack(&first, &names).await;
    ads.expect_silence(Duration::from_millis(300)).await;

    // r2 is subscribed before it exists, and arrives the moment it is published, from
    // another client.
    let mut other = metadata_client(server.channel().await);
    other
        .publish(publish_md("greeter", "r2", DUBBO_METADATA))
        .await
        .unwrap();
    let push = ads.recv().await;
    let got = decode_metadata(&push);
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].metadata_info, DUBBO_METADATA);
    assert_ne!(push.version_info, first.version_info);
    assert_ne!(push.nonce, first.nonce);
    ads.ack(&push, &names).await;

    // An identical re-publish pushes nothing.
    other
        .publish(publish_md("greeter", "r2", DUBBO_METADATA))
        .await
        .unwrap();
    ads.expect_silence(Duration::from_millis(300)).await;

    // An overwrite (revision collision) pushes the new content.
    other
        .publish(publish_md("greeter", "r1", "v1-overwritten"))
        .await
        .unwrap();
    let push = ads.recv().await;
    assert_eq!(decode_metadata(&push)[0].metadata_info, "v1-overwritten");
    ads.ack(&push, &names).await;

    // Something not subscribed pushes nothing.
    other
        .publish(publish_md("other-app", "r1", "x"))
        .await
        .unwrap();
    ads.expect_silence(Duration::from_millis(300)).await;
    server.stop().await;
}

#[tokio::test]
async fn nack_does_not_cause_a_resend_loop() {
    let server = TestServer::memory().await;
    let mut md = metadata_client(server.channel().await);
    md.publish(publish_md("app", "r", "good")).await.unwrap();
    let mut ads = AdsClient::open(
        server.channel().await,
        node("n", None),
        METADATA_TYPE_URL,
        &[],
    )
    .await;
    let first = ads.recv().await;
    ads.ack(&first, &[]).await;
    md.publish(publish_md("app", "r", "bad")).await.unwrap();
    let bad = ads.recv().await;
    ads.nack(&bad, &first.version_info, &[]).await;
    ads.expect_silence(Duration::from_millis(500)).await;
    // The next real change is sent normally.
    md.publish(publish_md("app", "r", "fixed")).await.unwrap();
    let fixed = ads.recv().await;
    assert_eq!(decode_metadata(&fixed)[0].metadata_info, "fixed");
    server.stop().await;
}

#[tokio::test]
async fn definitions_are_pushed_too() {
    let server = TestServer::memory().await;
    let mut ads = AdsClient::open(
        server.channel().await,
        node("n", None),
        SERVICE_DEFINITION_TYPE_URL,
        &["org.example.Greeter:1.0.0::provider:greeter"],
    )
    .await;
    let empty = ads.recv().await;
    assert!(empty.resources.is_empty());
    ads.ack(&empty, &["org.example.Greeter:1.0.0::provider:greeter"])
        .await;
    definition_client(server.channel().await)
        .publish(PublishServiceDefinitionRequest {
            identifier: "org.example.Greeter:1.0.0::provider:greeter".into(),
            service_definition: r#"{"canonicalName":"org.example.Greeter","methods":[]}"#.into(),
        })
        .await
        .unwrap();
    let push = ads.recv().await;
    let definition = ServiceDefinition::decode(push.resources[0].value.as_slice()).unwrap();
    assert_eq!(
        definition.identifier,
        "org.example.Greeter:1.0.0::provider:greeter"
    );
    assert!(definition.service_definition.contains("canonicalName"));
    server.stop().await;
}

/// A TCP forwarder that counts the connections it accepts, to prove what a client does on
/// the wire.
async fn counting_proxy(target: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn one_connection_carries_ads_and_publish_get() {
    let server = TestServer::memory().await;
    let (proxy, n_connections) = counting_proxy(server.addr).await;
    let channel = channel_to(proxy).await;
    let mut ads = AdsClient::open(
        channel.clone(),
        node("dp", None),
        METADATA_TYPE_URL,
        &["app/r"],
    )
    .await;
    let first = ads.recv().await;
    ads.ack(&first, &["app/r"]).await;
    let mut md = metadata_client(channel.clone());
    md.publish(publish_md("app", "r", "over the same connection"))
        .await
        .unwrap();
    let push = ads.recv().await;
    assert_eq!(
        decode_metadata(&push)[0].metadata_info,
        "over the same connection"
    );
    let got = md.get(get_md("app", "r")).await.unwrap().into_inner();
    assert_eq!(got.metadata_info, "over the same connection");
    assert_eq!(
        n_connections.load(Ordering::SeqCst),
        1,
        "one HTTP/2 connection for all"
    );
    server.stop().await;
}

#[tokio::test]
async fn restart_keeps_every_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::embedded(dir.path()).await;
    let mut md = metadata_client(server.channel().await);
    let mut sd = definition_client(server.channel().await);
    for i in 0..50 {
        md.publish(publish_md("app", &format!("r{i}"), &format!("value {i}")))
            .await
            .unwrap();
    }
    sd.publish(PublishServiceDefinitionRequest {
        identifier: "svc".into(),
        service_definition: "def".into(),
    })
    .await
    .unwrap();
    server.stop().await;

    let server = TestServer::embedded(dir.path()).await;
    let mut md = metadata_client(server.channel().await);
    for i in 0..50 {
        let got = md
            .get(get_md("app", &format!("r{i}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.metadata_info, format!("value {i}"));
    }
    let got = definition_client(server.channel().await)
        .get(GetServiceDefinitionRequest {
            identifier: "svc".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.service_definition, "def");
    // And the restarted server pushes what it recovered.
    let mut ads = AdsClient::open(
        server.channel().await,
        node("n", None),
        METADATA_TYPE_URL,
        &[],
    )
    .await;
    assert_eq!(decode_metadata(&ads.recv().await).len(), 50);
    server.stop().await;
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let server = TestServer::memory().await;
    let mut health = HealthClient::new(server.channel().await);
    let response = health
        .check(HealthCheckRequest {
            service: "pixiu.pkg.metadata.MetadataService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.status(), ServingStatus::Serving);

    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"pixiu.pkg.metadata.MetadataService".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"pixiu.pkg.metadata.ServiceDefinitionService".to_string()));
    server.stop().await;
}
