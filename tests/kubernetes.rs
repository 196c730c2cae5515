//! The Kubernetes store through the real server, against a real kube-apiserver: the gRPC API,
//! ADS pushes of objects made with kubectl, names that are not DNS-safe, replicas, an API
//! server restart, and the RBAC in `deploy/`.

mod common;

use std::{path::Path, time::Duration};

use clap::Parser;
use common::{
    kube::{KubeApiserver, kubectl_with},
    *,
};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use pixiu_metadata::{
    cli::{Cli, Command},
    config::{Backend, Config},
    pb::{
        METADATA_TYPE_URL, SERVICE_DEFINITION_TYPE_URL,
        metadata::{
            DeleteMetadataRequest, GetMetadataRequest, GetServiceDefinitionRequest,
            ListMetadataRequest, Metadata, PublishMetadataRequest, PublishServiceDefinitionRequest,
            ServiceDefinition,
        },
    },
    store::kube::{names, resources},
};
use prost::Message;
use tonic::Code;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

fn kube_config(kubeconfig: &Path, identity: &str) -> Config {
    let mut config = Config::default();
    config.store.backend = Backend::Kubernetes;
    config.store.kubeconfig = Some(kubeconfig.to_path_buf());
    config.store.kube_identity = Some(identity.to_string());
    config
}

/// An API server with the CRDs from `deploy/` and a few namespaces.
async fn cluster() -> KubeApiserver {
    let server = KubeApiserver::start().await;
    let crds = std::fs::read_to_string(Path::new(DEPLOY).join("crds.yaml")).unwrap();
    server.apply_crds(&crds).await;
    server.create_namespaces(&["team-a", "team-b"]).await;
    server
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

fn decode_metadata(response: &DiscoveryResponse) -> Vec<Metadata> {
    response
        .resources
        .iter()
        .map(|any| Metadata::decode(any.value.as_slice()).unwrap())
        .collect()
}

/// Receives (and ACKs) responses until `done` holds for one.
async fn recv_until(ads: &mut AdsClient, done: impl Fn(&DiscoveryResponse) -> bool) {
    loop {
        let response = ads.recv().await;
        ads.ack(&response, &[]).await;
        if done(&response) {
            return;
        }
    }
}

fn holds(response: &DiscoveryResponse, app: &str, revision: &str, info: &str) -> bool {
    decode_metadata(response)
        .iter()
        .any(|m| m.application_name == app && m.revision == revision && m.metadata_info == info)
}

#[tokio::test]
async fn crds_subcommand_prints_what_deploy_holds() {
    let mut out = Vec::new();
    pixiu_metadata::cli::run_client(Command::Crds, &mut out)
        .await
        .unwrap();
    let printed = String::from_utf8(out).unwrap();
    let committed = std::fs::read_to_string(Path::new(DEPLOY).join("crds.yaml")).unwrap();
    assert_eq!(
        printed, committed,
        "deploy/crds.yaml is stale: regenerate it with `cargo run -- crds > deploy/crds.yaml`"
    );
    assert_eq!(printed, resources::crds_yaml());
}

#[test]
fn kubernetes_flags() {
    let cli = Cli::try_parse_from([
        "pixiu-metadata",
        "serve",
        "--store",
        "kubernetes",
        "--kubeconfig",
        "/etc/kube/config",
        "--kube-identity",
        "pod-1",
    ])
    .unwrap();
    let Command::Serve(args) = cli.command else {
        panic!("expected serve");
    };
    let config = args.config().unwrap();
    assert_eq!(config.store.backend, Backend::Kubernetes);
    assert_eq!(
        config.store.kubeconfig.as_deref(),
        Some(Path::new("/etc/kube/config"))
    );
    assert_eq!(config.store.kube_identity.as_deref(), Some("pod-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_publish_get_replace_watch_delete_with_names_kubernetes_refuses() {
    let cluster = cluster().await;
    let server = TestServer::start(kube_config(&cluster.kubeconfig(), "grpc")).await;
    let mut md = metadata_client(server.channel().await);
    let mut sd = definition_client(server.channel().await);
    let mut ads = AdsClient::open(
        server.channel().await,
        node("consumer", Some("team-a")),
        METADATA_TYPE_URL,
        &[],
    )
    .await;
    let first = ads.recv().await;
    assert!(decode_metadata(&first).is_empty());
    ads.ack(&first, &[]).await;

    // Names Kubernetes would refuse as object names: upper case, '@', ':', a 128-character
    // SHA-512 revision.
    let app = "Greeter.Service@Prod";
    let revision = "A".repeat(64) + &"f".repeat(64);
    md.publish(with_namespace(publish_md(app, &revision, "v1"), "team-a"))
        .await
        .unwrap();
    recv_until(&mut ads, |r| holds(r, app, &revision, "v1")).await;
    let got = md
        .get(with_namespace(get_md(app, &revision), "team-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.metadata_info, "v1");

    // Replace: the new value is pushed.
    md.publish(with_namespace(publish_md(app, &revision, "v2"), "team-a"))
        .await
        .unwrap();
    recv_until(&mut ads, |r| holds(r, app, &revision, "v2")).await;

    // Operators see the encoded name and the originals.
    let object_name = names::object_name(&format!("{app}/{revision}"));
    let json = cluster
        .kubectl(&["get", "md", "-n", "team-a", &object_name, "-o", "json"])
        .await;
    let object: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(object["spec"]["application"], app);
    assert_eq!(object["spec"]["revision"], revision.as_str());
    assert_eq!(object["spec"]["metadataInfo"], "v2");
    let listed = md
        .list(with_namespace(
            ListMetadataRequest {
                application_name: app.into(),
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.records.len(), 1);
    assert_eq!(listed.records[0].application_name, app);
    assert_eq!(listed.records[0].revision, revision);

    // Service definitions with Dubbo identifiers.
    let identifier = "org.apache.dubbo.Greeter:1.0.0::provider:Greeter";
    sd.publish(with_namespace(
        PublishServiceDefinitionRequest {
            identifier: identifier.into(),
            service_definition: "{\"methods\":[]}".into(),
        },
        "team-a",
    ))
    .await
    .unwrap();
    let got = sd
        .get(with_namespace(
            GetServiceDefinitionRequest {
                identifier: identifier.into(),
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.service_definition, "{\"methods\":[]}");

    // Delete: the subscriber's set no longer holds it.
    md.delete(with_namespace(
        DeleteMetadataRequest {
            application_name: app.into(),
            revision: revision.clone(),
        },
        "team-a",
    ))
    .await
    .unwrap();
    recv_until(&mut ads, |r| decode_metadata(r).is_empty()).await;
    let missing = md
        .get(with_namespace(get_md(app, &revision), "team-a"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Too large for the API server (1 MiB of characters JSON escapes six-fold).
    let escaped = "\u{1}".repeat(1024 * 1024);
    let status = md
        .publish(with_namespace(publish_md("big", "1", &escaped), "team-a"))
        .await
        .unwrap_err();
    eprintln!("too large: {:?} {}", status.code(), status.message());
    assert_eq!(status.code(), Code::ResourceExhausted);
    // A namespace Kubernetes does not have.
    let status = md
        .publish(with_namespace(publish_md("app", "1", "v"), "nowhere"))
        .await
        .unwrap_err();
    eprintln!(
        "missing namespace: {:?} {}",
        status.code(),
        status.message()
    );
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("nowhere"), "{}", status.message());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_made_with_kubectl_are_pushed_and_replicas_share_writes() {
    let cluster = cluster().await;
    let a = TestServer::start(kube_config(&cluster.kubeconfig(), "replica-a")).await;
    let b = TestServer::start(kube_config(&cluster.kubeconfig(), "replica-b")).await;
    let mut ads_b = AdsClient::open(
        b.channel().await,
        node("consumer-on-b", Some("team-b")),
        METADATA_TYPE_URL,
        &[],
    )
    .await;
    let first = ads_b.recv().await;
    ads_b.ack(&first, &[]).await;

    // An operator's object.
    let yaml = "apiVersion: metadata.networking.dubbo.io/v1\nkind: Metadata\nmetadata:\n  \
                name: greeter-by-hand\n  namespace: team-b\nspec:\n  application: greeter\n  \
                revision: hand-1\n  metadataInfo: '{\"by\":\"kubectl\"}'\n";
    cluster
        .kubectl_stdin(&["apply", "-f", "-"], Some(yaml))
        .await;
    recv_until(&mut ads_b, |r| {
        holds(r, "greeter", "hand-1", "{\"by\":\"kubectl\"}")
    })
    .await;
    let mut md_a = metadata_client(a.channel().await);
    eventually(
        Duration::from_secs(10),
        "replica A serves the object",
        || {
            let mut md_a = md_a.clone();
            async move {
                md_a.get(with_namespace(get_md("greeter", "hand-1"), "team-b"))
                    .await
                    .is_ok_and(|r| r.into_inner().metadata_info == "{\"by\":\"kubectl\"}")
            }
        },
    )
    .await;
    // kubectl edit (here: apply) pushes the change.
    cluster
        .kubectl_stdin(
            &["apply", "-f", "-"],
            Some(&yaml.replace("kubectl", "kubectl again")),
        )
        .await;
    recv_until(&mut ads_b, |r| {
        holds(r, "greeter", "hand-1", "{\"by\":\"kubectl again\"}")
    })
    .await;

    // A publish on A reaches B's subscriber and B's Get.
    for i in 0..10 {
        let revision = format!("r{i}");
        let info = format!("value {i}");
        md_a.publish(with_namespace(
            publish_md("greeter", &revision, &info),
            "team-b",
        ))
        .await
        .unwrap();
        recv_until(&mut ads_b, |r| holds(r, "greeter", &revision, &info)).await;
    }
    let mut md_b = metadata_client(b.channel().await);
    let got = md_b
        .get(with_namespace(get_md("greeter", "r9"), "team-b"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.metadata_info, "value 9");
    // kubectl sees them all, selectable by application.
    let names = cluster
        .kubectl(&[
            "get",
            "md",
            "-n",
            "team-b",
            "-l",
            "metadata.networking.dubbo.io/application=greeter",
            "-o",
            "name",
        ])
        .await;
    assert_eq!(names.lines().count(), 10, "{names}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_restart_loses_no_event() {
    let mut cluster = cluster().await;
    let server = TestServer::start(kube_config(&cluster.kubeconfig(), "outage")).await;
    let mut md = metadata_client(server.channel().await);
    md.publish(publish_md("app", "1", "before")).await.unwrap();
    let mut ads = AdsClient::open(
        server.channel().await,
        node("c", None),
        METADATA_TYPE_URL,
        &[],
    )
    .await;
    recv_until(&mut ads, |r| holds(r, "app", "1", "before")).await;

    cluster.kill();
    let status = md
        .publish(publish_md("app", "2", "during"))
        .await
        .unwrap_err();
    eprintln!(
        "publish with the API server down: {:?} {}",
        status.code(),
        status.message()
    );
    assert_eq!(status.code(), Code::Unavailable);
    // Reads still work from the mirror.
    assert_eq!(
        md.get(get_md("app", "1"))
            .await
            .unwrap()
            .into_inner()
            .metadata_info,
        "before"
    );

    cluster.restart().await;
    // Writes by an operator right after the restart, while the watch reconnects.
    let yaml = "apiVersion: metadata.networking.dubbo.io/v1\nkind: Metadata\nmetadata:\n  \
                name: after-restart\n  namespace: default\nspec:\n  application: app\n  \
                revision: '3'\n  metadataInfo: operator\n";
    cluster
        .kubectl_stdin(&["apply", "-f", "-"], Some(yaml))
        .await;
    recv_until(&mut ads, |r| holds(r, "app", "3", "operator")).await;
    eventually(Duration::from_secs(20), "writes succeed again", || {
        let mut md = md.clone();
        async move { md.publish(publish_md("app", "2", "after")).await.is_ok() }
    })
    .await;
    recv_until(&mut ads, |r| {
        holds(r, "app", "2", "after") && holds(r, "app", "1", "before")
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_rbac_is_enough_for_the_server() {
    let cluster = KubeApiserver::start().await;
    // Everything in deploy/, as an operator applies it (no kubelet runs the Deployment here).
    cluster
        .kubectl(&[
            "apply",
            "-f",
            &Path::new(DEPLOY)
                .join("namespace.yaml")
                .display()
                .to_string(),
        ])
        .await;
    cluster.kubectl(&["apply", "-f", DEPLOY]).await;
    cluster
        .kubectl(&[
            "wait",
            "--for=condition=established",
            "--timeout=30s",
            "crd",
            "--all",
        ])
        .await;
    cluster.forget_discovery();
    cluster.create_namespaces(&["team-a"]).await;
    // A token of the ServiceAccount, through the TokenRequest API.
    let request = "{\"apiVersion\":\"authentication.k8s.io/v1\",\"kind\":\"TokenRequest\",\
                   \"spec\":{\"expirationSeconds\":3600}}";
    let response = cluster
        .kubectl_stdin(
            &[
                "create",
                "--raw",
                "/api/v1/namespaces/pixiu-system/serviceaccounts/pixiu-metadata/token",
                "-f",
                "-",
            ],
            Some(request),
        )
        .await;
    let token: serde_json::Value = serde_json::from_str(&response).unwrap();
    let token = token["status"]["token"].as_str().unwrap();
    let kubeconfig = cluster.write_kubeconfig("pixiu-metadata", token, "pixiu-system");

    // Least privilege: the service account may do nothing else.
    for (verb, resource) in [
        ("list", "secrets"),
        ("create", "namespaces"),
        ("patch", "metadata.metadata.networking.dubbo.io"),
        ("list", "pods"),
    ] {
        let out = kubectl_with(&kubeconfig, &["auth", "can-i", verb, resource, "-A"], None).await;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "no",
            "may {verb} {resource}"
        );
    }

    let server = TestServer::start(kube_config(&kubeconfig, "pod-0")).await;
    let mut md = metadata_client(server.channel().await);
    let mut sd = definition_client(server.channel().await);
    let mut ads = AdsClient::open(
        server.channel().await,
        node("c", Some("team-a")),
        SERVICE_DEFINITION_TYPE_URL,
        &[],
    )
    .await;
    let first = ads.recv().await;
    ads.ack(&first, &[]).await;
    md.publish(with_namespace(publish_md("app", "1", "v"), "team-a"))
        .await
        .unwrap();
    md.publish(with_namespace(publish_md("app", "1", "v2"), "team-a"))
        .await
        .unwrap();
    sd.publish(with_namespace(
        PublishServiceDefinitionRequest {
            identifier: "org.example.Svc".into(),
            service_definition: "def".into(),
        },
        "team-a",
    ))
    .await
    .unwrap();
    recv_until(&mut ads, |r| {
        r.resources.iter().any(|any| {
            ServiceDefinition::decode(any.value.as_slice())
                .unwrap()
                .identifier
                == "org.example.Svc"
        })
    })
    .await;
    md.delete(with_namespace(
        DeleteMetadataRequest {
            application_name: "app".into(),
            revision: "1".into(),
        },
        "team-a",
    ))
    .await
    .unwrap();
    // The sweeper's election ran under the Role: this replica holds the Lease.
    eventually(Duration::from_secs(15), "the lease names pod-0", || async {
        let out = cluster
            .kubectl_output(
                &[
                    "get",
                    "lease",
                    "-n",
                    "pixiu-system",
                    "pixiu-metadata-sweeper",
                    "-o",
                    "jsonpath={.spec.holderIdentity}",
                ],
                None,
            )
            .await;
        String::from_utf8_lossy(&out.stdout) == "pod-0"
    })
    .await;
    server.stop().await;
}

async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_sweeps() {
    let cluster = cluster().await;
    // Another replica holds the sweeper's Lease (and does not sweep: it does not exist).
    let lease = "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  \
                 name: pixiu-metadata-sweeper\n  namespace: default\nspec:\n  \
                 holderIdentity: someone-else\n  leaseDurationSeconds: 3600\n";
    cluster
        .kubectl_stdin(&["apply", "-f", "-"], Some(lease))
        .await;
    let mut config = kube_config(&cluster.kubeconfig(), "sweeper");
    config.lease.ttl = Duration::from_secs(2);
    let server = TestServer::start(config).await;
    let mut md = metadata_client(server.channel().await);
    md.publish(publish_md("app", "1", "v")).await.unwrap();
    // Expired, but this replica does not lead: the record stays.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        md.get(get_md("app", "1"))
            .await
            .unwrap()
            .into_inner()
            .metadata_info,
        "v"
    );
    // The holder lets go: this replica takes the lease and sweeps.
    cluster
        .kubectl(&[
            "patch",
            "lease",
            "-n",
            "default",
            "pixiu-metadata-sweeper",
            "--type=merge",
            "-p",
            "{\"spec\":{\"holderIdentity\":null}}",
        ])
        .await;
    eventually(
        Duration::from_secs(15),
        "the expired record is swept",
        || {
            let mut md = md.clone();
            async move {
                md.get(get_md("app", "1"))
                    .await
                    .is_err_and(|s| s.code() == Code::NotFound)
            }
        },
    )
    .await;
    let holder = cluster
        .kubectl(&[
            "get",
            "lease",
            "-n",
            "default",
            "pixiu-metadata-sweeper",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .await;
    assert_eq!(holder, "sweeper");
    server.stop().await;
}
