//! The admin port end to end: `pixiu-metadata status` against a running server with real ADS
//! clients, `/metrics` after a push, `serve --print-config`.

mod common;

use std::{process::Command, time::Duration};

use axum::body::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use pixiu_metadata::pb::{
    METADATA_TYPE_URL, SERVICE_DEFINITION_TYPE_URL,
    metadata::{PublishMetadataRequest, PublishServiceDefinitionRequest},
};

const BIN: &str = env!("CARGO_BIN_EXE_pixiu-metadata");

/// Runs the binary with `args`, returning (success, stdout, stderr).
async fn cli(args: Vec<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let output = Command::new(BIN)
            .args(&args)
            .env_remove("RUST_LOG")
            .output()
            .expect("run pixiu-metadata");
        (
            output.status.success(),
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(output.stderr).unwrap(),
        )
    })
    .await
    .unwrap()
}

async fn status_json(server: &TestServer) -> Vec<serde_json::Value> {
    let (ok, stdout, stderr) = cli(vec![
        "status".into(),
        "--admin".into(),
        server.admin_url(),
        "-o".into(),
        "json".into(),
    ])
    .await;
    assert!(ok, "status failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Polls `status -o json` until `done` holds for its rows, failing after 10 s.
async fn wait_for_status(
    server: &TestServer,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows = status_json(server).await;
        if done(&rows) {
            return rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status never matched: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn http_get(url: &str) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = client.get(url.parse().unwrap()).await.unwrap();
    let code = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (code, String::from_utf8(body.to_vec()).unwrap())
}

fn row<'a>(rows: &'a [serde_json::Value], node: &str, type_url: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["node_id"] == node && r["type_url"] == type_url)
        .unwrap_or_else(|| panic!("no row for {node} {type_url} in {rows:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_one_row_per_client_and_type() {
    let server = TestServer::memory().await;
    let mut md = metadata_client(server.channel().await);
    let mut sd = definition_client(server.channel().await);
    md.publish(PublishMetadataRequest {
        application_name: "greeter".into(),
        revision: "r1".into(),
        metadata_info: "{}".into(),
    })
    .await
    .unwrap();
    sd.publish(PublishServiceDefinitionRequest {
        identifier: "org.apache.dubbo.Greeter::provider:greeter".into(),
        service_definition: "{}".into(),
    })
    .await
    .unwrap();

    // consumer-a ACKs metadata; consumer-b NACKs definitions and leaves metadata un-ACKed.
    let mut a = AdsClient::open(
        server.channel().await,
        node("consumer-a", None),
        METADATA_TYPE_URL,
        &[],
    )
    .await;
    let response = a.recv().await;
    a.ack(&response, &[]).await;
    let mut b = AdsClient::open(
        server.channel().await,
        node("consumer-b", Some("default")),
        SERVICE_DEFINITION_TYPE_URL,
        &[],
    )
    .await;
    let response = b.recv().await;
    b.nack(&response, "", &[]).await;
    b.send(
        envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {
            type_url: METADATA_TYPE_URL.into(),
            resource_names: vec!["greeter/r1".into()],
            ..Default::default()
        },
    )
    .await;
    let _stale = b.recv().await;

    let rows = wait_for_status(&server, |rows| {
        rows.len() == 3
            && rows.iter().any(|r| r["state"] == "SYNCED")
            && rows.iter().any(|r| r["state"] == "NACKED")
    })
    .await;
    let synced = row(&rows, "consumer-a", METADATA_TYPE_URL);
    assert_eq!(synced["state"], "SYNCED");
    assert_eq!(synced["namespace"], "default");
    assert_eq!(synced["protocol"], "sotw");
    assert_eq!(synced["sent_version"], synced["acked_version"]);
    let nacked = row(&rows, "consumer-b", SERVICE_DEFINITION_TYPE_URL);
    assert_eq!(nacked["state"], "NACKED");
    assert_eq!(nacked["error"], "rejected by test client");
    let stale = row(&rows, "consumer-b", METADATA_TYPE_URL);
    assert_eq!(stale["state"], "STALE");
    assert!(stale["acked_version"].is_null());

    // The table a person reads, and YAML.
    let (ok, table, stderr) =
        cli(vec!["status".into(), "--admin".into(), server.admin_url()]).await;
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NODE"), "{table}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("consumer-a") && l.contains("Metadata") && l.contains("SYNCED")),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("NACKED") && l.ends_with("rejected by test client")),
        "{table}"
    );
    let (ok, yaml, stderr) = cli(vec![
        "status".into(),
        "--admin".into(),
        server.admin_url(),
        "-o".into(),
        "yaml".into(),
    ])
    .await;
    assert!(ok, "{stderr}");
    assert!(yaml.contains("node_id: consumer-a"), "{yaml}");
    drop((a, b));
    server.stop().await;
}

#[tokio::test]
async fn status_says_what_to_do_when_the_admin_port_is_unreachable() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (ok, _, stderr) = cli(vec![
        "status".into(),
        "--admin".into(),
        format!("http://127.0.0.1:{port}"),
    ])
    .await;
    assert!(!ok);
    assert!(
        stderr.contains("is `pixiu-metadata serve` running"),
        "{stderr}"
    );
    let (ok, _, stderr) = cli(vec![
        "status".into(),
        "--admin".into(),
        "127.0.0.1:15014".into(),
    ])
    .await;
    assert!(!ok);
    assert!(stderr.contains("give an http:// URL"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_pushes_with_their_latency() {
    let server = TestServer::memory().await;
    // Ready once the cache is warmed from the store, which a loaded machine may delay a
    // little after the port opens.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = http_get(&format!("{}/readyz", server.admin_url())).await;
        if code == 200 {
            assert_eq!(body, "ok\n");
            break;
        }
        assert!(
            body.contains("not warmed") || body.contains("store (memory): opening"),
            "{code} {body}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready in 10 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = AdsClient::open(
        server.channel().await,
        node("watcher", None),
        METADATA_TYPE_URL,
        &[],
    )
    .await;
    let first = client.recv().await;
    client.ack(&first, &[]).await;
    let mut md = metadata_client(server.channel().await);
    md.publish(PublishMetadataRequest {
        application_name: "greeter".into(),
        revision: "r1".into(),
        metadata_info: "{}".into(),
    })
    .await
    .unwrap();
    let pushed = client.recv().await;
    client.ack(&pushed, &[]).await;

    let url = format!("{}/metrics", server.admin_url());
    let (code, text) = http_get(&url).await;
    assert_eq!(code, 200);
    for line in [
        format!(
            r#"pixiu_metadata_xds_push_latency_seconds_count{{type_url="{METADATA_TYPE_URL}"}} 1"#
        ),
        r#"pixiu_metadata_records{namespace="default",kind="metadata"} 1"#.to_string(),
        "pixiu_metadata_xds_clients 1".to_string(),
        format!(r#"pixiu_metadata_xds_subscriptions{{type_url="{METADATA_TYPE_URL}"}} 1"#),
    ] {
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
    let (code, dump) = http_get(&format!(
        "{}/debug/config_dump?application=greeter",
        server.admin_url()
    ))
    .await;
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["resources"][0]["revision"], "r1");
    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn print_config_shows_each_value_and_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pixiu-metadata.toml");
    std::fs::write(&file, "store = \"memory\"\nmetadata-ttl = \"2h\"\n").unwrap();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["serve", "--print-config", "--config"])
            .arg(&file)
            .args(["--metadata-ttl", "3h"])
            .env("PIXIU_METADATA_ADMIN_ADDR", "127.0.0.1:25014")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let from_file = format!(
        "store = \"memory\"  # config file {}",
        dir.path().join("pixiu-metadata.toml").display()
    );
    for line in [
        r#"grpc-addr = "127.0.0.1:15010"  # default"#,
        r#"admin-addr = "127.0.0.1:25014"  # environment PIXIU_METADATA_ADMIN_ADDR"#,
        &from_file,
        r#"metadata-ttl = "3h"  # flag"#,
    ] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
}
