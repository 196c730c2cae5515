//! The Rust client over mTLS: it publishes and subscribes on a server that requires client
//! certificates, acting in the namespace of its SPIFFE ID; without the server's CA it cannot
//! connect at all.

mod common;

use std::time::Duration;

use common::{
    TestServer,
    pki::{self, Ca},
};
use futures::StreamExt;
use pixiu_metadata::{
    client::{Client, ClientConfig, Update},
    config::{Backend, Config},
    pb::metadata::Metadata,
    security::tls::TlsPaths,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_publishes_and_subscribes_over_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    pki::write_server_files(dir.path(), &server_ca.server(), &client_ca);
    let mut config = Config::default();
    config.store.backend = Backend::Memory;
    config.security.tls = Some(TlsPaths {
        cert: dir.path().join("server.crt"),
        key: dir.path().join("server.key"),
        client_ca: Some(dir.path().join("ca.crt")),
    });
    let server = TestServer::start(config).await;
    let url = format!("https://{}", server.addr);
    let workload = client_ca.workload("team-a", "greeter");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca.pem()))
        .domain_name("localhost")
        .identity(Identity::from_pem(&workload.cert, &workload.key));

    let client = within(
        "connect",
        Client::connect(ClientConfig::new(url.clone()).tls(tls.clone())),
    )
    .await
    .expect("connects over mTLS");
    let mut updates = client.subscribe::<Metadata>(["greeter/r1"]);
    within(
        "publish",
        client.publish_metadata("greeter", "r1", "{\"revision\":\"r1\"}"),
    )
    .await
    .unwrap();
    let update = within("push", updates.next())
        .await
        .expect("the subscription is open");
    match update {
        Update::Added { name, resource, .. } => {
            assert_eq!(name, "greeter/r1");
            assert_eq!(resource.metadata_info, "{\"revision\":\"r1\"}");
            // The namespace is the certificate's, not one the client named.
            assert_eq!(resource.namespace, "team-a");
        }
        other => panic!("expected the published revision, got {other:?}"),
    }
    assert_eq!(
        within("get", client.get_metadata("greeter", "r1"))
            .await
            .unwrap(),
        "{\"revision\":\"r1\"}"
    );

    // A client that does not trust the server's CA, or speaks plaintext, gets nowhere.
    let wrong_ca = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(client_ca.pem()))
        .domain_name("localhost")
        .identity(Identity::from_pem(&workload.cert, &workload.key));
    assert!(
        within(
            "connect with the wrong CA",
            Client::connect(ClientConfig::new(url).tls(wrong_ca))
        )
        .await
        .is_err()
    );
    let plaintext = within(
        "connect in plaintext",
        Client::connect(ClientConfig::new(server.url())),
    )
    .await;
    if let Ok(plaintext) = plaintext {
        // The transport may connect lazily; the first call fails then.
        let get = within("get in plaintext", plaintext.get_metadata("greeter", "r1")).await;
        assert!(get.is_err());
    }
    drop(client);
    server.stop().await;
}

/// `step`, which must end within 15 s (longer than the client's own connect timeout).
async fn within<T>(step: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(15), future)
        .await
        .unwrap_or_else(|_| panic!("{step} did not end within 15 s"))
}
