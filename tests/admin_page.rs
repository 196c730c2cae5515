//! The operators' page in a real browser: headless Chromium loads it from a running server
//! with published Dubbo metadata and a connected client, and we assert on what a person sees.
//! A screenshot is saved to `target/tmp/admin_page.png`.
//!
//! Needs Debian's `chromium`; `./scripts/test` installs it. Fails (never skips) without it.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use common::*;
use pixiu_metadata::pb::{
    METADATA_TYPE_URL,
    metadata::{PublishMetadataRequest, PublishServiceDefinitionRequest},
};

const REVISION: &str = "5f2c1d0e9a8b7c6d";

const METADATA_INFO: &str = r#"{"app":"greeter-app","revision":"5f2c1d0e9a8b7c6d","services":{"org.apache.dubbo.samples.GreeterService:tri":{"name":"org.apache.dubbo.samples.GreeterService","group":"","version":"1.0.0","protocol":"tri","port":50052,"path":"org.apache.dubbo.samples.GreeterService","params":{"side":"provider","release":"3.3.0","serialization":"hessian2"}},"org.apache.dubbo.samples.HealthService:tri":{"name":"org.apache.dubbo.samples.HealthService","protocol":"tri","port":50052,"path":"org.apache.dubbo.samples.HealthService","params":{"side":"provider"}}}}"#;

const DEFINITION: &str = r#"{"canonicalName":"org.apache.dubbo.samples.GreeterService","codeSource":"file:/app/greeter.jar","methods":[{"name":"sayHello","parameterTypes":["java.lang.String"],"returnType":"java.lang.String"},{"name":"sayHelloAsync","parameterTypes":["java.lang.String","int"],"returnType":"java.util.concurrent.CompletableFuture"}],"types":[{"type":"java.lang.String"},{"type":"org.apache.dubbo.samples.HelloReply","properties":{"message":"java.lang.String"}}]}"#;

/// The Chromium binary, or a failure that says how to get it.
fn chromium() -> PathBuf {
    let found = ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|path| path.is_file())
        })
    });
    found.unwrap_or_else(|| {
        panic!(
            "chromium is not installed, and this test needs it to load the admin page; run \
             ./scripts/test (it installs Debian's chromium) or `apt-get install -y chromium`"
        )
    })
}

/// Runs headless Chromium on `url` with `extra` flags, returning its standard output.
fn run_chromium(browser: &Path, profile: &Path, url: &str, extra: &[String]) -> String {
    let output = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_applications_definitions_and_clients() {
    let browser = chromium();
    let server = TestServer::memory().await;
    let mut md = metadata_client(server.channel().await);
    md.publish(PublishMetadataRequest {
        application_name: "greeter-app".into(),
        revision: REVISION.into(),
        metadata_info: METADATA_INFO.into(),
    })
    .await
    .unwrap();
    let mut sd = definition_client(server.channel().await);
    sd.publish(PublishServiceDefinitionRequest {
        identifier: "org.apache.dubbo.samples.GreeterService:1.0.0::provider:greeter-app".into(),
        service_definition: DEFINITION.into(),
    })
    .await
    .unwrap();
    let mut consumer = AdsClient::open(
        server.channel().await,
        node("consumer-node-1", Some("default")),
        METADATA_TYPE_URL,
        &[],
    )
    .await;
    let response = consumer.recv().await;
    consumer.ack(&response, &[]).await;
    // The ACK is processed asynchronously; wait until the admin API reports it.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let status = pixiu_metadata::cli::status::fetch(&server.admin_url(), None)
            .await
            .unwrap();
        if status
            .streams
            .iter()
            .flat_map(|s| &s.types)
            .any(|t| t.state == "SYNCED")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never SYNCED: {status:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let profile = tempfile::tempdir().unwrap();
    let url = format!("{}/", server.admin_url());
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("admin_page.png");
    let (dom, shot) = {
        let (browser, profile, url, screenshot) = (
            browser.clone(),
            profile.path().to_path_buf(),
            url.clone(),
            screenshot.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let dom = run_chromium(&browser, &profile, &url, &["--dump-dom".into()]);
            run_chromium(
                &browser,
                &profile,
                &url,
                &[
                    format!("--screenshot={}", screenshot.display()),
                    "--window-size=1280,900".into(),
                    "--hide-scrollbars".into(),
                ],
            );
            (dom, std::fs::metadata(&screenshot).map(|m| m.len()))
        })
        .await
        .unwrap()
    };

    for (what, text) in [
        ("the application", "greeter-app"),
        ("its revision", REVISION),
        (
            "a service from the metadata table",
            "org.apache.dubbo.samples.HealthService",
        ),
        ("a service parameter", "serialization=hessian2"),
        ("a method of the definition", "sayHelloAsync"),
        ("a method's parameter types", "java.lang.String, int"),
        (
            "a type of the definition",
            "org.apache.dubbo.samples.HelloReply",
        ),
        ("the connected client", "consumer-node-1"),
        ("its sync state", "SYNCED"),
        ("a push", "Recent pushes"),
    ] {
        assert!(
            dom.contains(text),
            "the page does not show {what} ({text:?}):\n{dom}"
        );
    }
    assert!(
        !dom.contains("Retrying…</div>"),
        "the page could not load its data:\n{dom}"
    );
    let size = shot.expect("chromium wrote the screenshot");
    assert!(size > 10_000, "screenshot of {size} bytes looks empty");
    eprintln!("screenshot: {}", screenshot.display());
    drop(consumer);
    server.stop().await;
}
