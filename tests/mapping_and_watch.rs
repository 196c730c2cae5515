//! Service-name mapping and the Watch streams, against the real server: registration, Get,
//! pushes over ADS (ours and upstream's type), expiry of one application's lease, and watches
//! that start with the current state, follow changes and resume without repeats.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{AdsClient, TestServer, metadata_client, node, with_namespace};
use pixiu_metadata::{
    config::{Backend, Config},
    pb::{
        dubbo_networking::{
            ServiceMappingRequest, ServiceMappingXdsResponse,
            service_name_mapping_service_client::ServiceNameMappingServiceClient,
        },
        metadata::{
            DeleteMetadataRequest, GetServiceMappingRequest, ListServiceMappingsRequest,
            PublishMetadataRequest, PublishServiceDefinitionRequest, RegisterServiceMappingRequest,
            ServiceMapping, UnregisterServiceMappingRequest, WatchMetadataRequest,
            WatchServiceDefinitionRequest, WatchServiceMappingRequest, WatchState,
            service_mapping_service_client::ServiceMappingServiceClient,
        },
    },
};
use prost::Message;
use tonic::{Code, Streaming};

const MAPPING: &str = "type.googleapis.com/pixiu.pkg.metadata.ServiceMapping";
const UPSTREAM: &str = "dubbo.networking.v1alpha1.v1.servicenamemapping";

async fn next<T>(stream: &mut Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a message within 10s")
        .expect("stream healthy")
        .expect("stream open")
}

fn mapping_apps(
    response: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> Vec<Vec<String>> {
    response
        .resources
        .iter()
        .map(|any| {
            assert_eq!(any.type_url, MAPPING);
            ServiceMapping::decode(any.value.as_slice())
                .unwrap()
                .application_names
        })
        .collect()
}

#[tokio::test]
async fn mapping_is_pushed_and_each_application_expires_alone() {
    let mut config = Config::default();
    config.store.backend = Backend::Memory;
    config.lease.ttl = Duration::from_millis(1500);
    let server = TestServer::start(config).await;
    let channel = server.channel().await;
    let mut mappings = ServiceMappingServiceClient::new(channel.clone());
    let register = |application: &str| {
        with_namespace(
            RegisterServiceMappingRequest {
                interface: "org.example.Greeter".into(),
                application_name: application.into(),
            },
            "team-a",
        )
    };

    // Subscribed before any provider registers.
    let mut ours = AdsClient::open(
        channel.clone(),
        node("consumer", Some("team-a")),
        MAPPING,
        &["org.example.Greeter"],
    )
    .await;
    let first = ours.recv().await;
    assert!(first.resources.is_empty());
    ours.ack(&first, &["org.example.Greeter"]).await;
    let mut upstream = AdsClient::open(
        channel.clone(),
        node("dubbo-consumer", None),
        UPSTREAM,
        &["org.example.Greeter|team-a"],
    )
    .await;
    let first = upstream.recv().await;
    assert!(first.resources.is_empty());
    upstream.ack(&first, &["org.example.Greeter|team-a"]).await;

    let err = mappings
        .get(with_namespace(
            GetServiceMappingRequest {
                interface: "org.example.Greeter".into(),
            },
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let started = tokio::time::Instant::now();
    mappings.register(register("provider-b")).await.unwrap();
    let pushed = ours.recv().await;
    let latency = started.elapsed();
    assert_eq!(mapping_apps(&pushed), [vec!["provider-b".to_string()]]);
    ours.ack(&pushed, &["org.example.Greeter"]).await;
    println!("mapping push latency: {latency:?}");

    // Upstream's API writes the same records.
    ServiceNameMappingServiceClient::new(channel.clone())
        .register_service_app_mapping(ServiceMappingRequest {
            namespace: "team-a".into(),
            application_name: "provider-a".into(),
            interface_names: vec!["org.example.Greeter".into(), "org.example.Other".into()],
        })
        .await
        .unwrap();
    // A namespace may not hold '|': `org.example.Greeter|team-a` in namespace `x` and
    // `org.example.Greeter` in namespace `team-a|x` would both be upstream's
    // `org.example.Greeter|team-a|x`.
    let refused = ServiceNameMappingServiceClient::new(channel.clone())
        .register_service_app_mapping(ServiceMappingRequest {
            namespace: "team-a|x".into(),
            application_name: "intruder".into(),
            interface_names: vec!["org.example.Greeter".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert_eq!(refused.message(), "namespace must not contain '|'");
    let too_many = ServiceNameMappingServiceClient::new(channel.clone())
        .register_service_app_mapping(ServiceMappingRequest {
            namespace: "team-a".into(),
            application_name: "busy".into(),
            interface_names: (0..1001).map(|i| format!("org.example.I{i}")).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::ResourceExhausted);
    assert!(
        too_many.message().contains("holds 1001 entries"),
        "{too_many:?}"
    );
    let pushed = ours.recv().await;
    assert_eq!(
        mapping_apps(&pushed),
        [vec!["provider-a".to_string(), "provider-b".to_string()]]
    );
    ours.ack(&pushed, &["org.example.Greeter"]).await;
    // Upstream's type: named interface|namespace, an Any of ServiceMappingXdsResponse.
    let mut seen = upstream.recv().await;
    upstream.ack(&seen, &["org.example.Greeter|team-a"]).await;
    if seen.resources.len() == 1
        && ServiceMappingXdsResponse::decode(seen.resources[0].value.as_slice())
            .unwrap()
            .application_names
            .len()
            == 1
    {
        seen = upstream.recv().await;
        upstream.ack(&seen, &["org.example.Greeter|team-a"]).await;
    }
    assert_eq!(seen.type_url, UPSTREAM);
    assert_eq!(seen.resources[0].type_url, UPSTREAM);
    let decoded = ServiceMappingXdsResponse::decode(seen.resources[0].value.as_slice()).unwrap();
    assert_eq!(decoded.namespace, "team-a");
    assert_eq!(decoded.interface_name, "org.example.Greeter");
    assert_eq!(decoded.application_names, ["provider-a", "provider-b"]);
    // Upstream's older naming: the interface alone, in the stream's own namespace.
    let mut by_interface = AdsClient::open(
        channel.clone(),
        node("dubbo-consumer-2", Some("team-a")),
        UPSTREAM,
        &["org.example.Greeter"],
    )
    .await;
    let first = by_interface.recv().await;
    assert_eq!(first.resources.len(), 1);
    let decoded = ServiceMappingXdsResponse::decode(first.resources[0].value.as_slice()).unwrap();
    assert_eq!(decoded.application_names, ["provider-a", "provider-b"]);

    let got = mappings
        .get(with_namespace(
            GetServiceMappingRequest {
                interface: "org.example.Greeter".into(),
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.application_names, ["provider-a", "provider-b"]);
    let listed = mappings
        .list(with_namespace(
            ListServiceMappingsRequest::default(),
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.records.len(), 3);
    // Other namespaces see nothing.
    let err = mappings
        .get(GetServiceMappingRequest {
            interface: "org.example.Greeter".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = mappings
        .register(with_namespace(
            RegisterServiceMappingRequest {
                interface: "org.example.Greeter".into(),
                application_name: "a/b".into(),
            },
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // provider-b keeps refreshing, provider-a does not: provider-a expires alone.
    let refresher = {
        let mut mappings = mappings.clone();
        tokio::spawn(async move {
            loop {
                mappings
                    .register(with_namespace(
                        RegisterServiceMappingRequest {
                            interface: "org.example.Greeter".into(),
                            application_name: "provider-b".into(),
                        },
                        "team-a",
                    ))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let pushed = ours.recv().await;
    assert_eq!(mapping_apps(&pushed), [vec!["provider-b".to_string()]]);
    ours.ack(&pushed, &["org.example.Greeter"]).await;
    refresher.abort();
    // Then provider-b expires too, and the resource is removed.
    let pushed = ours.recv().await;
    assert!(pushed.resources.is_empty(), "{pushed:?}");
    ours.ack(&pushed, &["org.example.Greeter"]).await;

    mappings.register(register("provider-c")).await.unwrap();
    let err = mappings
        .unregister(with_namespace(
            UnregisterServiceMappingRequest {
                interface: "org.example.Greeter".into(),
                application_name: "nobody".into(),
            },
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    mappings
        .unregister(with_namespace(
            UnregisterServiceMappingRequest {
                interface: "org.example.Greeter".into(),
                application_name: "provider-c".into(),
            },
            "team-a",
        ))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn watches_start_with_the_state_follow_changes_and_resume() {
    let server = TestServer::memory().await;
    let channel = server.channel().await;
    let mut metadata = metadata_client(channel.clone());
    let publish = |revision: &str, info: &str| {
        with_namespace(
            PublishMetadataRequest {
                application_name: "shop".into(),
                revision: revision.into(),
                metadata_info: info.into(),
            },
            "ns",
        )
    };

    // All revisions of an application, before any is published: an explicit empty state.
    let mut all = metadata
        .watch(with_namespace(
            WatchMetadataRequest {
                application_name: "shop".into(),
                ..Default::default()
            },
            "ns",
        ))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut all).await;
    assert!(first.initial && first.empty && first.updated.is_empty());
    // One revision.
    let mut one = metadata
        .watch(with_namespace(
            WatchMetadataRequest {
                application_name: "shop".into(),
                revision: "r2".into(),
                ..Default::default()
            },
            "ns",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(next(&mut one).await.empty);

    let started = tokio::time::Instant::now();
    metadata.publish(publish("r1", "one")).await.unwrap();
    let message = next(&mut all).await;
    println!("watch latency: {:?}", started.elapsed());
    assert!(!message.initial && !message.empty);
    assert_eq!(message.updated.len(), 1);
    assert_eq!(message.updated[0].revision, "r1");
    assert_eq!(message.updated[0].metadata_info, "one");
    let v1 = message.updated[0].version.clone();

    metadata.publish(publish("r2", "two")).await.unwrap();
    let message = next(&mut all).await;
    assert_eq!(message.updated[0].revision, "r2");
    let v2 = message.updated[0].version.clone();
    let message = next(&mut one).await;
    assert_eq!(message.updated[0].metadata_info, "two");
    assert_eq!(message.updated[0].version, v2);

    metadata
        .delete(with_namespace(
            DeleteMetadataRequest {
                application_name: "shop".into(),
                revision: "r1".into(),
            },
            "ns",
        ))
        .await
        .unwrap();
    let message = next(&mut all).await;
    assert_eq!(message.removed, ["r1"]);
    assert!(message.updated.is_empty());
    drop(all);

    // Resume while r2 is unchanged, r1 is gone and r3 is new: only r3 and the removal of r1.
    metadata.publish(publish("r3", "three")).await.unwrap();
    let mut resumed = metadata
        .watch(with_namespace(
            WatchMetadataRequest {
                application_name: "shop".into(),
                known_versions: BTreeMap::from([("r1".to_string(), v1), ("r2".to_string(), v2)])
                    .into_iter()
                    .collect(),
                ..Default::default()
            },
            "ns",
        ))
        .await
        .unwrap()
        .into_inner();
    let message = next(&mut resumed).await;
    assert!(message.initial);
    assert_eq!(
        message
            .updated
            .iter()
            .map(|m| m.revision.as_str())
            .collect::<Vec<_>>(),
        ["r3"]
    );
    assert_eq!(message.removed, ["r1"]);

    // A definition: absent, then present, then unchanged on resume.
    let mut definitions = common::definition_client(channel.clone());
    let mut watch = definitions
        .watch(WatchServiceDefinitionRequest {
            identifier: "org.Api:1.0.0::provider:shop".into(),
            known_version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let message = next(&mut watch).await;
    assert_eq!(message.state(), WatchState::Absent);
    assert!(message.initial);
    definitions
        .publish(PublishServiceDefinitionRequest {
            identifier: "org.Api:1.0.0::provider:shop".into(),
            service_definition: "{\"methods\":[]}".into(),
        })
        .await
        .unwrap();
    let message = next(&mut watch).await;
    assert_eq!(message.state(), WatchState::Present);
    assert_eq!(message.service_definition, "{\"methods\":[]}");
    let mut resumed = definitions
        .watch(WatchServiceDefinitionRequest {
            identifier: "org.Api:1.0.0::provider:shop".into(),
            known_version: message.version.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let message = next(&mut resumed).await;
    assert_eq!(message.state(), WatchState::Unchanged);
    assert!(message.service_definition.is_empty());

    // A mapping.
    let mut mappings = ServiceMappingServiceClient::new(channel.clone());
    let mut watch = mappings
        .watch(WatchServiceMappingRequest {
            interface: "org.Api".into(),
            known_version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut watch).await.state(), WatchState::Absent);
    mappings
        .register(RegisterServiceMappingRequest {
            interface: "org.Api".into(),
            application_name: "shop".into(),
        })
        .await
        .unwrap();
    let message = next(&mut watch).await;
    assert_eq!(message.state(), WatchState::Present);
    assert_eq!(message.application_names, ["shop"]);
    mappings
        .unregister(UnregisterServiceMappingRequest {
            interface: "org.Api".into(),
            application_name: "shop".into(),
        })
        .await
        .unwrap();
    assert_eq!(next(&mut watch).await.state(), WatchState::Absent);

    let err = metadata
        .watch(WatchMetadataRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn a_slow_watcher_is_sent_the_latest_state_not_every_change() {
    let server = TestServer::memory().await;
    let channel = server.channel().await;
    let mut metadata = metadata_client(channel.clone());
    let mut watch = metadata_client(server.channel().await)
        .watch(WatchMetadataRequest {
            application_name: "big".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(next(&mut watch).await.empty);
    // 100 revisions of 200 KiB while the watcher reads nothing: far more than the transport
    // buffers, so the server must coalesce instead of queueing.
    let n_revisions = 100;
    let value = "x".repeat(200 * 1024);
    for i in 0..n_revisions {
        metadata
            .publish(PublishMetadataRequest {
                application_name: "big".into(),
                revision: format!("r{i:03}"),
                metadata_info: value.clone(),
            })
            .await
            .unwrap();
    }
    let mut held = std::collections::BTreeSet::new();
    let mut n_messages = 0;
    while held.len() < n_revisions {
        let message = next(&mut watch).await;
        n_messages += 1;
        for updated in message.updated {
            assert_eq!(updated.metadata_info.len(), value.len());
            held.insert(updated.revision);
        }
    }
    println!("{n_revisions} changes reached a slow watcher in {n_messages} messages");
    assert!(n_messages < n_revisions / 2, "{n_messages} messages");
    server.stop().await;
}
