//! Record lifecycle end to end: leases and expiry, List and Delete, limits.

mod common;

use std::time::Duration;

use common::*;
use pixiu_metadata::{
    config::{Backend, Config},
    pb::{
        METADATA_TYPE_URL,
        metadata::{
            DeleteMetadataRequest, DeleteServiceDefinitionRequest, GetMetadataRequest,
            ListMetadataRequest, ListServiceDefinitionsRequest, Metadata, PublishMetadataRequest,
            PublishServiceDefinitionRequest,
        },
    },
};
use prost::Message;
use tonic::Code;

fn publish(app: &str, revision: &str, info: &str) -> PublishMetadataRequest {
    PublishMetadataRequest {
        application_name: app.into(),
        revision: revision.into(),
        metadata_info: info.into(),
    }
}

fn names(
    response: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> Vec<String> {
    response
        .resources
        .iter()
        .map(|any| {
            let m = Metadata::decode(any.value.as_slice()).unwrap();
            format!("{}/{}", m.application_name, m.revision)
        })
        .collect()
}

async fn server_with(ttl: Duration, max_records: usize) -> TestServer {
    let mut config = Config::default();
    config.store.backend = Backend::Memory;
    config.lease.ttl = ttl;
    config.store.max_records_per_namespace = max_records;
    TestServer::start(config).await
}

#[tokio::test]
async fn unrefreshed_records_expire_and_removal_is_pushed() {
    let ttl = Duration::from_millis(1500);
    let server = server_with(ttl, 1000).await;
    let mut md = metadata_client(server.channel().await);
    md.publish(publish("live", "r1", "refreshed"))
        .await
        .unwrap();
    md.publish(publish("stale", "r1", "not refreshed"))
        .await
        .unwrap();
    let mut ads = AdsClient::open(
        server.channel().await,
        node("c", None),
        METADATA_TYPE_URL,
        &[],
    )
    .await;
    let first = ads.recv().await;
    assert_eq!(names(&first), vec!["live/r1", "stale/r1"]);
    ads.ack(&first, &[]).await;

    // Keep "live" alive by re-publishing identical content well within the TTL.
    let started = tokio::time::Instant::now();
    let refresher = {
        let mut md = md.clone();
        tokio::spawn(async move {
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                md.publish(publish("live", "r1", "refreshed"))
                    .await
                    .unwrap();
            }
        })
    };
    // The expiry of "stale" is pushed as a SotW response that omits it.
    let push = ads.recv().await;
    let elapsed = started.elapsed();
    assert_eq!(names(&push), vec!["live/r1"]);
    assert!(
        elapsed >= ttl - Duration::from_millis(200),
        "expired too early: {elapsed:?}"
    );
    assert!(
        elapsed < ttl + Duration::from_secs(2),
        "expired too late: {elapsed:?}"
    );
    ads.ack(&push, &[]).await;
    let gone = md
        .get(GetMetadataRequest {
            application_name: "stale".into(),
            revision: "r1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    refresher.await.unwrap();
    // Refreshes pushed nothing, and "live" outlived several TTLs... until it stops refreshing.
    let got = md
        .get(GetMetadataRequest {
            application_name: "live".into(),
            revision: "r1".into(),
        })
        .await
        .unwrap();
    assert_eq!(got.into_inner().metadata_info, "refreshed");
    let push = ads.recv().await;
    assert!(names(&push).is_empty(), "live expires once refreshes stop");
    server.stop().await;
}

#[tokio::test]
async fn list_paginates_and_filters_delete_removes_and_pushes() {
    let server = server_with(Duration::from_secs(3600), 1000).await;
    let mut md = metadata_client(server.channel().await);
    for app in ["alpha", "beta"] {
        for i in 0..5 {
            md.publish(publish(app, &format!("r{i}"), &format!("{app} {i}")))
                .await
                .unwrap();
        }
    }
    md.publish(with_namespace(
        publish("alpha", "other-ns", "x"),
        "elsewhere",
    ))
    .await
    .unwrap();

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = md
            .list(ListMetadataRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.records.len() <= 3);
        seen.extend(
            page.records
                .iter()
                .map(|r| format!("{}/{}", r.application_name, r.revision)),
        );
        assert!(
            page.records
                .iter()
                .all(|r| r.namespace == "default" && r.refreshed_at_ms > 0)
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 10, "{seen:?}");
    let beta = md
        .list(ListMetadataRequest {
            application_name: "beta".into(),
            names_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(beta.records.len(), 5);
    assert!(
        beta.records
            .iter()
            .all(|r| r.application_name == "beta" && r.metadata_info.is_empty())
    );

    let mut ads = AdsClient::open(
        server.channel().await,
        node("c", None),
        METADATA_TYPE_URL,
        &["beta/r0"],
    )
    .await;
    let first = ads.recv().await;
    assert_eq!(names(&first), vec!["beta/r0"]);
    ads.ack(&first, &["beta/r0"]).await;
    let delete = DeleteMetadataRequest {
        application_name: "beta".into(),
        revision: "r0".into(),
    };
    md.delete(delete.clone()).await.unwrap();
    let push = ads.recv().await;
    assert!(names(&push).is_empty(), "the deletion is pushed");
    assert_eq!(md.delete(delete).await.unwrap_err().code(), Code::NotFound);

    let mut sd = definition_client(server.channel().await);
    for id in [
        "org.a.Svc:1.0.0::provider:a",
        "org.a.Svc:2.0.0::provider:a",
        "org.b.Svc:1.0.0::provider:b",
    ] {
        sd.publish(PublishServiceDefinitionRequest {
            identifier: id.into(),
            service_definition: "{}".into(),
        })
        .await
        .unwrap();
    }
    let a = sd
        .list(ListServiceDefinitionsRequest {
            identifier_prefix: "org.a.".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.records.len(), 2);
    sd.delete(DeleteServiceDefinitionRequest {
        identifier: "org.b.Svc:1.0.0::provider:b".into(),
    })
    .await
    .unwrap();
    let all = sd
        .list(ListServiceDefinitionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.records.len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn namespace_record_cap_is_resource_exhausted() {
    let server = server_with(Duration::from_secs(3600), 3).await;
    let mut md = metadata_client(server.channel().await);
    for i in 0..3 {
        md.publish(publish("app", &format!("r{i}"), "v"))
            .await
            .unwrap();
    }
    let status = md.publish(publish("app", "r3", "v")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Overwrites and refreshes of existing records still work, and other namespaces have
    // their own budget.
    md.publish(publish("app", "r0", "v2")).await.unwrap();
    md.publish(publish("app", "r1", "v")).await.unwrap();
    md.publish(with_namespace(publish("app", "r3", "v"), "other"))
        .await
        .unwrap();
    server.stop().await;
}
