//! Transport security and namespace authorization over real mTLS connections: a matrix of
//! identities × namespaces × operations with the expected outcome of each and no leak, a
//! wrong CA, a certificate without a SPIFFE ID, bearer tokens, certificate reload, and the
//! admin token.

mod common;

use std::{collections::BTreeSet, path::Path, sync::Arc, time::Duration};

use common::{
    TestServer,
    pki::{self, Ca, Pem},
};
use envoy_types::pb::envoy::service::{
    discovery::v3::{
        DeltaDiscoveryRequest, DiscoveryRequest,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
    status::v3::{
        ClientStatusRequest,
        client_status_discovery_service_client::ClientStatusDiscoveryServiceClient,
    },
};
use pixiu_metadata::{
    config::{Backend, Config},
    pb::{
        self,
        metadata::{
            DeleteMetadataRequest, GetMetadataRequest, ListMetadataRequest, Metadata,
            PublishMetadataRequest,
        },
    },
    security::tls::TlsPaths,
};
use prost::Message;
use tonic::{Code, transport::Channel};

const TEAM_A: &str = "team-a";
const TEAM_B: &str = "team-b";
const OPS: &str = "ops";

/// The TLS files, the CAs and the workloads of one test.
struct Pki {
    dir: tempfile::TempDir,
    server_ca: Ca,
    client_ca: Ca,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server_ca = Ca::new("server CA");
        let client_ca = Ca::new("client CA");
        pki::write_server_files(dir.path(), &server_ca.server(), &client_ca);
        std::fs::write(
            dir.path().join("policy.toml"),
            r#"
            # Operators read every namespace; they write only their own.
            [[grant]]
            identities = ["spiffe://cluster.local/ns/ops/sa/*"]
            namespaces = ["*"]
            operations = ["read"]
            "#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("tokens.toml"),
            "[[token]]\nname = \"deployer\"\nnamespace = \"team-b\"\ntoken = \"deployer-secret\"\n",
        )
        .unwrap();
        Self {
            dir,
            server_ca,
            client_ca,
        }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// A config serving mTLS with the policy; with the token file when `tokens`.
    fn config(&self, tokens: bool) -> Config {
        let mut config = Config::default();
        config.store.backend = Backend::Memory;
        config.security.tls = Some(TlsPaths {
            cert: self.path("server.crt"),
            key: self.path("server.key"),
            client_ca: Some(self.path("ca.crt")),
        });
        config.security.tls_reload_interval = Some(Duration::from_millis(100));
        config.security.policy_file = Some(self.path("policy.toml"));
        if tokens {
            config.security.token_file = Some(self.path("tokens.toml"));
        }
        config
    }

    fn server_ca_pem(&self) -> String {
        self.server_ca.pem()
    }
}

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// `spiffe://cluster.local/ns/team-a/sa/app`.
    A,
    /// `spiffe://cluster.local/ns/team-b/sa/app`.
    B,
    /// `spiffe://cluster.local/ns/ops/sa/operator`, granted cluster-wide read.
    Operator,
    /// The token `deployer` of namespace team-b, no certificate.
    Token,
    /// A certificate from the right CA without a SPIFFE ID.
    NoSpiffe,
    /// No certificate, no token.
    Anonymous,
}

impl Who {
    fn own(self) -> Option<&'static str> {
        match self {
            Who::A => Some(TEAM_A),
            Who::B | Who::Token => Some(TEAM_B),
            Who::Operator => Some(OPS),
            Who::NoSpiffe | Who::Anonymous => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Publish,
    Get,
    List,
    Delete,
    SotwByName,
    SotwWildcard,
    DeltaByName,
    DeltaWildcard,
}

const OPS_ALL: [Op; 8] = [
    Op::Publish,
    Op::Get,
    Op::List,
    Op::Delete,
    Op::SotwByName,
    Op::SotwWildcard,
    Op::DeltaByName,
    Op::DeltaWildcard,
];

impl Op {
    fn is_read(self) -> bool {
        !matches!(self, Op::Publish | Op::Delete)
    }
}

/// What the matrix expects: the rule of docs/security.md, written out independently of the
/// server's code.
fn expected(who: Who, op: Op, target: Option<&str>) -> Result<(), Code> {
    let Some(own) = who.own() else {
        return Err(Code::Unauthenticated);
    };
    let target = target.unwrap_or(own);
    if target == own || (who == Who::Operator && op.is_read()) {
        Ok(())
    } else {
        Err(Code::PermissionDenied)
    }
}

/// What a request saw: the `metadata_info` values it returned.
type Seen = BTreeSet<String>;

fn with_target<T>(message: T, target: Option<&str>, who: Who) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(target) = target {
        request
            .metadata_mut()
            .insert("x-pixiu-namespace", target.parse().unwrap());
    }
    if who == Who::Token {
        request
            .metadata_mut()
            .insert("authorization", "Bearer deployer-secret".parse().unwrap());
    }
    request
}

fn ads_request<T>(who: Who, message: T) -> tonic::Request<T> {
    with_target(message, None, who)
}

fn node(target: Option<&str>) -> envoy_types::pb::envoy::config::core::v3::Node {
    common::node("matrix", target)
}

async fn run_op(channel: &Channel, who: Who, op: Op, target: Option<&str>) -> Result<Seen, Code> {
    let mut metadata = common::metadata_client(channel.clone());
    let mut ads = AggregatedDiscoveryServiceClient::new(channel.clone());
    let mut seen = Seen::new();
    match op {
        Op::Publish => {
            metadata
                .publish(with_target(
                    PublishMetadataRequest {
                        application_name: "written".into(),
                        revision: format!("{who:?}"),
                        metadata_info: "new".into(),
                    },
                    target,
                    who,
                ))
                .await
                .map_err(|s| s.code())?;
        }
        Op::Get => {
            let response = metadata
                .get(with_target(
                    GetMetadataRequest {
                        application_name: "app".into(),
                        revision: "r1".into(),
                    },
                    target,
                    who,
                ))
                .await
                .map_err(|s| s.code())?;
            seen.insert(response.into_inner().metadata_info);
        }
        Op::List => {
            let response = metadata
                .list(with_target(ListMetadataRequest::default(), target, who))
                .await
                .map_err(|s| s.code())?;
            seen.extend(
                response
                    .into_inner()
                    .records
                    .into_iter()
                    .map(|r| r.metadata_info),
            );
        }
        Op::Delete => {
            // Deletes a record that exists in every namespace, so success is Ok, not
            // NOT_FOUND.
            metadata
                .delete(with_target(
                    DeleteMetadataRequest {
                        application_name: "doomed".into(),
                        revision: "r1".into(),
                    },
                    target,
                    who,
                ))
                .await
                .map_err(|s| s.code())?;
        }
        Op::SotwByName | Op::SotwWildcard => {
            let names = if op == Op::SotwByName {
                vec!["app/r1".to_string()]
            } else {
                vec![]
            };
            let first = DiscoveryRequest {
                node: Some(node(target)),
                type_url: pb::METADATA_TYPE_URL.into(),
                resource_names: names,
                ..Default::default()
            };
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(first).await.unwrap();
            let mut stream = ads
                .stream_aggregated_resources(ads_request(
                    who,
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                ))
                .await
                .map_err(|s| s.code())?
                .into_inner();
            let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("an answer within 10 s")
                .map_err(|s| s.code())?
                .expect("a response");
            for any in response.resources {
                seen.insert(
                    Metadata::decode(any.value.as_slice())
                        .unwrap()
                        .metadata_info,
                );
            }
            drop(tx);
        }
        Op::DeltaByName | Op::DeltaWildcard => {
            let names = if op == Op::DeltaByName {
                vec!["app/r1".to_string()]
            } else {
                vec![]
            };
            let first = DeltaDiscoveryRequest {
                node: Some(node(target)),
                type_url: pb::METADATA_TYPE_URL.into(),
                resource_names_subscribe: names,
                ..Default::default()
            };
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(first).await.unwrap();
            let mut stream = ads
                .delta_aggregated_resources(ads_request(
                    who,
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                ))
                .await
                .map_err(|s| s.code())?
                .into_inner();
            let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("an answer within 10 s")
                .map_err(|s| s.code())?
                .expect("a response");
            for resource in response.resources {
                let body = resource.resource.unwrap();
                seen.insert(
                    Metadata::decode(body.value.as_slice())
                        .unwrap()
                        .metadata_info,
                );
            }
            drop(tx);
        }
    }
    Ok(seen)
}

/// The secret each namespace's `app/r1` holds.
fn secret(namespace: &str) -> String {
    format!("secret of {namespace}")
}

/// Seeds `app/r1` and `doomed/r1` (one per operation that deletes) in every namespace, as
/// each namespace's own workload.
async fn seed(channel_of: &impl Fn(&str) -> Channel, n_deletes: usize) {
    for namespace in [TEAM_A, TEAM_B, OPS] {
        let mut client = common::metadata_client(channel_of(namespace));
        client
            .publish(PublishMetadataRequest {
                application_name: "app".into(),
                revision: "r1".into(),
                metadata_info: secret(namespace),
            })
            .await
            .unwrap();
        for _ in 0..n_deletes.max(1) {
            client
                .publish(PublishMetadataRequest {
                    application_name: "doomed".into(),
                    revision: "r1".into(),
                    metadata_info: "doomed".into(),
                })
                .await
                .unwrap();
        }
    }
}

async fn connect(pki: &Pki, server: &TestServer, cert: Option<&Pem>) -> Channel {
    pki::connect(server.addr, &pki.server_ca_pem(), cert)
        .await
        .unwrap()
}

#[tokio::test]
async fn identity_namespace_operation_matrix() {
    let pki = Pki::new();
    let server = TestServer::start(pki.config(true)).await;
    let certs = [
        (Who::A, Some(pki.client_ca.workload(TEAM_A, "app"))),
        (Who::B, Some(pki.client_ca.workload(TEAM_B, "app"))),
        (Who::Operator, Some(pki.client_ca.workload(OPS, "operator"))),
        (Who::Token, None),
        (
            Who::NoSpiffe,
            Some(pki.client_ca.client(&["https://example.com/x"])),
        ),
        (Who::Anonymous, None),
    ];
    let mut channels = Vec::new();
    for (who, cert) in &certs {
        channels.push((*who, connect(&pki, &server, cert.as_ref()).await));
    }
    let by_namespace = |namespace: &str| {
        let who = match namespace {
            TEAM_A => Who::A,
            TEAM_B => Who::B,
            _ => Who::Operator,
        };
        channels.iter().find(|(w, _)| *w == who).unwrap().1.clone()
    };
    seed(&by_namespace, 1).await;

    let targets = [None, Some(TEAM_A), Some(TEAM_B), Some(OPS)];
    let mut n_cases = 0;
    let mut failures = Vec::new();
    for (who, channel) in &channels {
        for op in OPS_ALL {
            for target in targets {
                let want = expected(*who, op, target);
                let got = run_op(channel, *who, op, target).await;
                n_cases += 1;
                match (&want, &got) {
                    (Ok(()), Ok(seen)) => {
                        // No leak: only the target namespace's secret is ever seen.
                        let acting_in = target.or(who.own()).unwrap();
                        for value in seen {
                            if value.starts_with("secret of ") && *value != secret(acting_in) {
                                failures
                                    .push(format!("{who:?} {op:?} {target:?}: leaked {value:?}"));
                            }
                        }
                        if matches!(op, Op::Get | Op::SotwByName | Op::DeltaByName)
                            && !seen.contains(&secret(acting_in))
                        {
                            failures.push(format!(
                                "{who:?} {op:?} {target:?}: did not see its own record: {seen:?}"
                            ));
                        }
                    }
                    (Err(code), Err(got_code)) if code == got_code => {}
                    _ => failures.push(format!(
                        "{who:?} {op:?} {target:?}: expected {want:?}, got {got:?}"
                    )),
                }
                // A deleted record is re-created, so every delete case finds one.
                if op == Op::Delete && got.is_ok() {
                    let namespace = target.or(who.own()).unwrap();
                    common::metadata_client(by_namespace(namespace))
                        .publish(PublishMetadataRequest {
                            application_name: "doomed".into(),
                            revision: "r1".into(),
                            metadata_info: "doomed".into(),
                        })
                        .await
                        .unwrap();
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n_cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(n_cases, 6 * 8 * 4);

    // Denials were counted.
    let metrics = reqwest_metrics(&server).await;
    assert!(
        metrics.contains(
            "pixiu_metadata_denials_total{operation=\"get\",reason=\"permission_denied\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("reason=\"unauthenticated\""));
    assert!(metrics.contains("reason=\"bad_credentials\""));
    server.stop().await;
}

/// `/metrics` over plain HTTP/1 on the admin port.
async fn reqwest_metrics(server: &TestServer) -> String {
    common::http_get(server.admin_addr, "/metrics", None)
        .await
        .1
}

#[tokio::test]
async fn csds_shows_only_permitted_namespaces() {
    let pki = Pki::new();
    let server = TestServer::start(pki.config(false)).await;
    let a = connect(&pki, &server, Some(&pki.client_ca.workload(TEAM_A, "app"))).await;
    let b = connect(&pki, &server, Some(&pki.client_ca.workload(TEAM_B, "app"))).await;
    let ops = connect(
        &pki,
        &server,
        Some(&pki.client_ca.workload(OPS, "operator")),
    )
    .await;
    // One wildcard stream per team, named after the team.
    let mut streams = Vec::new();
    for (channel, name) in [(&a, "node-of-team-a"), (&b, "node-of-team-b")] {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(DiscoveryRequest {
            node: Some(common::node(name, None)),
            type_url: pb::METADATA_TYPE_URL.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut responses = AggregatedDiscoveryServiceClient::new(channel.clone())
            .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        responses.message().await.unwrap().unwrap();
        streams.push((tx, responses));
    }
    let nodes = |channel: Channel| async move {
        let response = ClientStatusDiscoveryServiceClient::new(channel)
            .fetch_client_status(ClientStatusRequest::default())
            .await
            .map_err(|s| s.code())?;
        Ok::<_, Code>(
            response
                .into_inner()
                .config
                .into_iter()
                .map(|c| c.node.unwrap().id)
                .collect::<BTreeSet<_>>(),
        )
    };
    let set = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(nodes(a.clone()).await, Ok(set(&["node-of-team-a"])));
    assert_eq!(nodes(b.clone()).await, Ok(set(&["node-of-team-b"])));
    assert_eq!(
        nodes(ops.clone()).await,
        Ok(set(&["node-of-team-a", "node-of-team-b"]))
    );
    // A certificate without a SPIFFE ID sees nothing.
    let nobody = connect(&pki, &server, Some(&pki.client_ca.client(&[]))).await;
    assert_eq!(nodes(nobody).await, Err(Code::Unauthenticated));
    drop(streams);
    server.stop().await;
}

#[tokio::test]
async fn wrong_ca_and_missing_client_certificate_are_refused() {
    let pki = Pki::new();
    let server = TestServer::start(pki.config(false)).await;
    let good = connect(&pki, &server, Some(&pki.client_ca.workload(TEAM_A, "app"))).await;
    let get = |channel: Channel| async move {
        common::metadata_client(channel)
            .list(ListMetadataRequest::default())
            .await
            .map(|_| ())
            .map_err(|s| s.code())
    };
    assert_eq!(get(good.clone()).await, Ok(()));

    // The client does not trust the server's CA: no connection.
    let other_ca = Ca::new("someone else");
    let wrong_server_ca = pki::endpoint(server.addr, &other_ca.pem(), None)
        .connect()
        .await;
    assert!(wrong_server_ca.is_err());

    // A client certificate from another CA: the handshake fails (TLS 1.3 reports it on
    // first use).
    let stranger = other_ca.workload(TEAM_A, "app");
    let refused = match pki::endpoint(server.addr, &pki.server_ca_pem(), Some(&stranger))
        .connect()
        .await
    {
        Err(_) => true,
        Ok(channel) => get(channel).await.is_err(),
    };
    assert!(refused, "a certificate from another CA was accepted");

    // No client certificate while mTLS is mandatory.
    let anonymous = match pki::endpoint(server.addr, &pki.server_ca_pem(), None)
        .connect()
        .await
    {
        Err(_) => true,
        Ok(channel) => get(channel).await.is_err(),
    };
    assert!(anonymous, "a client without a certificate was accepted");

    // Plaintext to a TLS port.
    let plain = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await;
    let plain_refused = match plain {
        Err(_) => true,
        Ok(channel) => get(channel).await.is_err(),
    };
    assert!(plain_refused);

    // Meanwhile the good client is served.
    assert_eq!(get(good).await, Ok(()));
    let metrics = reqwest_metrics(&server).await;
    assert!(
        metrics.contains("pixiu_metadata_tls_handshake_failures_total{reason=\"handshake\"}"),
        "{metrics}"
    );
    server.stop().await;
}

fn leaf_serial(channel_cert_pem: &str) -> Vec<u8> {
    let der =
        rustls_pki_types::CertificateDer::from_pem_slice(channel_cert_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    cert.raw_serial().to_vec()
}

/// The serial of the certificate the server presents.
async fn served_serial(addr: std::net::SocketAddr, server_ca: &str) -> Vec<u8> {
    use std::sync::Arc;
    use tokio_rustls::rustls::{self, RootCertStore, pki_types::ServerName};
    let mut roots = RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(server_ca.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (_, connection) = tls.get_ref();
    let leaf = &connection.peer_certificates().unwrap()[0];
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    cert.raw_serial().to_vec()
}

use rustls_pki_types::pem::PemObject;

#[tokio::test]
async fn certificates_are_reloaded_without_restart() {
    let pki = Pki::new();
    let server = TestServer::start(pki.config(false)).await;
    let client = pki.client_ca.workload(TEAM_A, "app");
    let before = connect(&pki, &server, Some(&client)).await;
    let first_serial = served_serial(server.addr, &pki.server_ca_pem()).await;
    assert_eq!(
        first_serial,
        leaf_serial(&std::fs::read_to_string(pki.path("server.crt")).unwrap())
    );

    // Rotate the server certificate (same CA) and the client CA (a new one).
    let new_server = pki.server_ca.server();
    let new_client_ca = Ca::new("rotated client CA");
    write_pair(pki.dir.path(), &new_server);
    pki::write_atomically(&pki.path("ca.crt"), &new_client_ca.pem());
    let new_serial = leaf_serial(&new_server.cert);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if served_serial(server.addr, &pki.server_ca_pem()).await == new_serial {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new certificate not served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // New connections: a client of the new CA is accepted, one of the old CA refused.
    let rotated = connect(&pki, &server, Some(&new_client_ca.workload(TEAM_A, "app"))).await;
    common::metadata_client(rotated)
        .list(ListMetadataRequest::default())
        .await
        .unwrap();
    let old = match pki::endpoint(server.addr, &pki.server_ca_pem(), Some(&client))
        .connect()
        .await
    {
        Err(_) => true,
        Ok(channel) => common::metadata_client(channel)
            .list(ListMetadataRequest::default())
            .await
            .is_err(),
    };
    assert!(
        old,
        "a client of the replaced CA was accepted on a new connection"
    );
    // The connection made before the rotation keeps working.
    common::metadata_client(before)
        .list(ListMetadataRequest::default())
        .await
        .unwrap();

    // A broken file is not loaded; the current certificate stays in use.
    pki::write_atomically(&pki.path("server.crt"), "not a certificate");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        served_serial(server.addr, &pki.server_ca_pem()).await,
        new_serial
    );
    server.stop().await;
}

fn write_pair(dir: &Path, pem: &Pem) {
    // Key first, then certificate: a reload between the two sees a mismatch and keeps the
    // old pair, the next one sees both.
    pki::write_atomically(&dir.join("server.key"), &pem.key);
    pki::write_atomically(&dir.join("server.crt"), &pem.cert);
}

/// Publishes `app/r1` with `token` as bearer token and in `namespace`, when given.
async fn publish_as(
    channel: Channel,
    token: Option<&str>,
    namespace: Option<&str>,
) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(PublishMetadataRequest {
        application_name: "app".into(),
        revision: "r1".into(),
        metadata_info: "x".into(),
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    if let Some(namespace) = namespace {
        request
            .metadata_mut()
            .insert("x-pixiu-namespace", namespace.parse().unwrap());
    }
    common::metadata_client(channel)
        .publish(request)
        .await
        .map(|_| ())
}

#[tokio::test]
async fn bearer_tokens_without_tls_identify_clients() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokens.toml"),
        "[[token]]\nname = \"a\"\nnamespace = \"team-a\"\ntoken = \"token-a\"\n",
    )
    .unwrap();
    let mut config = Config::default();
    config.store.backend = Backend::Memory;
    config.security.token_file = Some(dir.path().join("tokens.toml"));
    let server = TestServer::start(config).await;
    let channel = server.channel().await;
    let call = |token: Option<&'static str>, namespace: Option<&'static str>| {
        let channel = channel.clone();
        async move {
            publish_as(channel, token, namespace)
                .await
                .map_err(|s| (s.code(), s.message().to_string()))
        }
    };
    assert_eq!(call(Some("token-a"), None).await, Ok(()));
    assert_eq!(call(Some("token-a"), Some("team-a")).await, Ok(()));
    let denied = call(Some("token-a"), Some("team-b")).await.unwrap_err();
    assert_eq!(denied.0, Code::PermissionDenied);
    assert!(
        !denied.1.contains("team-b"),
        "the denial names the namespace: {}",
        denied.1
    );
    let bad = call(Some("wrong"), None).await.unwrap_err();
    assert_eq!(bad.0, Code::Unauthenticated);
    assert!(!bad.1.contains("wrong"));
    assert_eq!(call(None, None).await.unwrap_err().0, Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test]
async fn token_and_policy_files_are_reloaded_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let policy = dir.path().join("policy.toml");
    pki::write_atomically(
        &tokens,
        "[[token]]\nname = \"a\"\nnamespace = \"team-a\"\ntoken = \"token-a\"\n",
    );
    pki::write_atomically(&policy, "");
    let mut config = Config::default();
    config.store.backend = Backend::Memory;
    config.security.token_file = Some(tokens.clone());
    config.security.policy_file = Some(policy.clone());
    config.security.tls_reload_interval = Some(Duration::from_millis(50));
    let server = TestServer::start(config).await;
    let channel = server.channel().await;
    let publish = |token: &'static str, namespace: &'static str| {
        let channel = channel.clone();
        async move {
            publish_as(channel, Some(token), Some(namespace))
                .await
                .map_err(|s| s.code())
        }
    };
    // Waits up to 5 s for `publish` to answer `expected`.
    let eventually = |token: &'static str, namespace: &'static str, expected: Result<(), Code>| {
        let publish = &publish;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                let got = publish(token, namespace).await;
                if got == expected || tokio::time::Instant::now() > deadline {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(
        publish("token-a", "team-b").await,
        Err(Code::PermissionDenied)
    );

    // A grant added to the policy file applies without a restart.
    pki::write_atomically(
        &policy,
        "[[grant]]\nidentities = [\"token:a\"]\nnamespaces = [\"team-b\"]\noperations = [\"write\"]\n",
    );
    assert_eq!(eventually("token-a", "team-b", Ok(())).await, Ok(()));

    // A policy file that does not parse leaves the last good one in use.
    pki::write_atomically(&policy, "[[grant]]\nidentities = 7\n");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(publish("token-a", "team-b").await, Ok(()));

    // A token rotated in the file: the new one works, the old one no longer does.
    pki::write_atomically(
        &tokens,
        "[[token]]\nname = \"a\"\nnamespace = \"team-a\"\ntoken = \"token-a2\"\n",
    );
    assert_eq!(eventually("token-a2", "team-a", Ok(())).await, Ok(()));
    assert_eq!(
        publish("token-a", "team-a").await,
        Err(Code::Unauthenticated)
    );
    server.stop().await;
}

#[tokio::test]
async fn publish_rate_limit_answers_resource_exhausted_with_retry_info() {
    use tonic_types::StatusExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokens.toml"),
        "[[token]]\nname = \"a\"\nnamespace = \"team-a\"\ntoken = \"token-a\"\n\
         [[token]]\nname = \"b\"\nnamespace = \"team-b\"\ntoken = \"token-b\"\n",
    )
    .unwrap();
    let mut config = Config::default();
    config.store.backend = Backend::Memory;
    config.security.token_file = Some(dir.path().join("tokens.toml"));
    config.security.limits.publish_rate = Some(pixiu_metadata::security::rate::Rate {
        per_second: 1.0,
        burst: 3,
    });
    let server = TestServer::start(config).await;
    let channel = server.channel().await;
    let publish = |token: &'static str, i: usize| {
        let channel = channel.clone();
        async move {
            let mut request = tonic::Request::new(PublishMetadataRequest {
                application_name: "app".into(),
                revision: format!("r{i}"),
                metadata_info: "x".into(),
            });
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            common::metadata_client(channel).publish(request).await
        }
    };
    for i in 0..3 {
        publish("token-a", i).await.unwrap();
    }
    let status = publish("token-a", 3).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let retry = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo with a delay");
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(1),
        "{retry:?}"
    );
    // Another identity has its own bucket.
    publish("token-b", 0).await.unwrap();
    // After the hint, the first identity publishes again.
    tokio::time::sleep(retry + Duration::from_millis(50)).await;
    publish("token-a", 4).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn admin_requires_a_token_when_asked_and_refuses_to_start_exposed_without_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin-token"), "admin-secret\n").unwrap();
    let mut config = Config::default();
    config.store.backend = Backend::Memory;
    config.security.admin_token_file = Some(dir.path().join("admin-token"));
    config.security.tls_reload_interval = Some(Duration::from_millis(50));
    let server = TestServer::start(config).await;
    // Wait until admin HTTP answers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while common::http_get(server.admin_addr, "/healthz", None)
        .await
        .0
        != 200
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = |token: Option<&'static str>| async move {
        common::http_get(server.admin_addr, "/metrics", token)
            .await
            .0
    };
    assert_eq!(metrics(None).await, 401);
    let (_, refused) = common::http_get(server.admin_addr, "/metrics", None).await;
    assert!(
        refused
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer realm=\"pixiu-metadata admin\""),
        "{refused}"
    );
    assert_eq!(
        common::http_get(server.admin_addr, "/debug/config_dump", Some("wrong"))
            .await
            .0,
        401
    );
    assert_eq!(metrics(Some("admin-secret")).await, 200);
    // A rotated token file: the new token works without a restart, the old one no longer.
    pki::write_atomically(&dir.path().join("admin-token"), "rotated-secret\n");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metrics(Some("rotated-secret")).await != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated token was not taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metrics(Some("admin-secret")).await, 401);
    // An empty file is refused; the rotated token stays.
    pki::write_atomically(&dir.path().join("admin-token"), "\n");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(metrics(Some("rotated-secret")).await, 200);
    server.stop().await;
}

/// A raw TLS client trusting the server's CA and presenting `client`: what its first read
/// gets, the bytes of the server's HTTP/2 preface or the error the refusal ends it with.
async fn first_read(pki: &Pki, server: &TestServer, client: Option<&Pem>) -> Result<usize, String> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    use tokio::io::AsyncReadExt;
    use tokio_rustls::rustls;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pki.server_ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some(client) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(client.cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(client.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let heard = tokio::time::timeout(Duration::from_secs(5), async {
        // TLS 1.3: the client's handshake ends before the server checked its certificate.
        let mut tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        let mut buf = [0; 64];
        tls.read(&mut buf).await
    })
    .await
    .expect("the server answers within 5 s");
    heard.map_err(|error| error.to_string())
}

#[tokio::test]
async fn refused_clients_hear_why_in_a_tls_alert() {
    let pki = Pki::new();
    let server = TestServer::start(pki.config(false)).await;
    // Without the alert a client sees only the connection close.
    let anonymous = first_read(&pki, &server, None).await.unwrap_err();
    assert!(
        anonymous.contains("received fatal alert: CertificateRequired"),
        "{anonymous}"
    );
    let stranger = Ca::new("someone else").workload(TEAM_A, "app");
    let stranger = first_read(&pki, &server, Some(&stranger))
        .await
        .unwrap_err();
    assert!(
        stranger.contains("received fatal alert: UnknownCA"),
        "{stranger}"
    );
    let workload = pki.client_ca.workload(TEAM_A, "app");
    let accepted = first_read(&pki, &server, Some(&workload)).await;
    assert!(matches!(accepted, Ok(n) if n > 0), "{accepted:?}");
    server.stop().await;
}

#[tokio::test]
async fn stalled_tls_handshakes_are_closed_and_others_served() {
    let pki = Pki::new();
    let mut config = pki.config(false);
    config.security.limits.handshake_timeout = Duration::from_millis(300);
    let server = TestServer::start(config).await;
    let good = connect(&pki, &server, Some(&pki.client_ca.workload(TEAM_A, "app"))).await;
    // 50 connections that never send a ClientHello, and one that stops half-way.
    let mut stalled = Vec::new();
    for _ in 0..50 {
        stalled.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    let mut half = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    {
        use tokio::io::AsyncWriteExt;
        half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
    }
    stalled.push(half);
    // Meanwhile the good client is served.
    common::metadata_client(good.clone())
        .list(ListMetadataRequest::default())
        .await
        .unwrap();
    for stream in &mut stalled {
        use tokio::io::AsyncReadExt;
        let mut buf = [0; 64];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a stalled handshake was kept open");
    }
    common::metadata_client(good)
        .list(ListMetadataRequest::default())
        .await
        .unwrap();
    let metrics = reqwest_metrics(&server).await;
    assert!(
        metrics.contains("pixiu_metadata_tls_handshake_failures_total{reason=\"timeout\"}"),
        "{metrics}"
    );
    server.stop().await;
}
