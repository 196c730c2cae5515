//! Admin routes through `Router::oneshot`: no socket.

use std::time::SystemTime;

use axum::{
    body::Body,
    http::{Request, StatusCode},
};
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;
use crate::store::{Key, memory::MemoryStore};

const METADATA_INFO: &str = r#"{"app":"greeter","revision":"r1","services":{"org.apache.dubbo.Greeter:tri":{"name":"org.apache.dubbo.Greeter","protocol":"tri","path":"org.apache.dubbo.Greeter","params":{}}}}"#;

struct Fixture {
    state: AdminState,
    warmed_tx: watch::Sender<bool>,
    _writer: pixiu_xds::CacheWriter,
}

/// A store with one metadata record per namespace and a definition, mirrored into a cache.
async fn fixture() -> Fixture {
    let store = Arc::new(MemoryStore::default());
    let now = SystemTime::now();
    store
        .put(
            &Key::metadata("default", "greeter", "r1"),
            METADATA_INFO,
            now,
        )
        .await
        .unwrap();
    store
        .put(&Key::metadata("team-b", "orders", "r9"), "not json", now)
        .await
        .unwrap();
    store
        .put(
            &Key::definition("default", "org.apache.dubbo.Greeter::provider:greeter"),
            r#"{"canonicalName":"org.apache.dubbo.Greeter","methods":[]}"#,
            now,
        )
        .await
        .unwrap();
    let (cache, writer) = pixiu_xds::cache();
    let records = store
        .list(&crate::store::ListQuery::all(crate::model::Kind::Metadata))
        .await
        .unwrap()
        .into_iter()
        .chain(
            store
                .list(&crate::store::ListQuery::all(
                    crate::model::Kind::Definition,
                ))
                .await
                .unwrap(),
        );
    writer.apply(records.map(|record| {
        let (name, body) = crate::push::resource(&record);
        pixiu_xds::Update::Put {
            partition: pixiu_xds::Partition::new(&record.key.namespace),
            type_url: pixiu_xds::TypeUrl::new(crate::push::type_url(record.key.kind)),
            name,
            body,
        }
    }));
    let (warmed_tx, warmed) = watch::channel(false);
    Fixture {
        state: AdminState::new(
            store,
            cache,
            pixiu_xds::Registry::new(),
            Metrics::new(),
            warmed,
            PushLog::new(),
        ),
        warmed_tx,
        _writer: writer,
    }
}

async fn get(state: &AdminState, uri: &str) -> (StatusCode, String, String) {
    let response = router(state.clone())
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

async fn get_json<T: serde::de::DeserializeOwned>(state: &AdminState, uri: &str) -> T {
    let (status, content_type, body) = get(state, uri).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(content_type, "application/json");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn healthz_is_ok_and_readyz_waits_for_the_cache() {
    let f = fixture().await;
    assert_eq!(get(&f.state, "/healthz").await.0, StatusCode::OK);
    let (status, _, body) = get(&f.state, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("cache not warmed"), "{body}");
    f.warmed_tx.send_replace(true);
    let (status, _, body) = get(&f.state, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn metrics_are_openmetrics_with_records_per_namespace() {
    let f = fixture().await;
    let (status, content_type, body) = get(&f.state, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, METRICS_CONTENT_TYPE);
    for line in [
        r#"pixiu_metadata_records{namespace="default",kind="metadata"} 1"#,
        r#"pixiu_metadata_records{namespace="default",kind="definition"} 1"#,
        r#"pixiu_metadata_records{namespace="team-b",kind="metadata"} 1"#,
        "pixiu_metadata_xds_clients 0",
        "# EOF",
    ] {
        assert!(body.contains(line), "missing {line:?} in\n{body}");
    }
}

#[tokio::test]
async fn config_dump_decodes_and_filters() {
    let f = fixture().await;
    let all: views::ConfigDump = get_json(&f.state, "/debug/config_dump").await;
    assert_eq!(all.resources.len(), 3);
    let greeter = &all.resources[0];
    assert_eq!(greeter.namespace, "default");
    assert_eq!(greeter.application.as_deref(), Some("greeter"));
    assert_eq!(greeter.revision.as_deref(), Some("r1"));
    assert_eq!(greeter.value.as_deref(), Some(METADATA_INFO));

    let by_ns: views::ConfigDump = get_json(&f.state, "/debug/config_dump?namespace=team-b").await;
    assert_eq!(by_ns.resources.len(), 1);
    assert_eq!(by_ns.resources[0].name, "orders/r9");

    for type_ in [
        "definition",
        "ServiceDefinition",
        crate::pb::SERVICE_DEFINITION_TYPE_URL,
    ] {
        let dump: views::ConfigDump =
            get_json(&f.state, &format!("/debug/config_dump?type={type_}")).await;
        assert_eq!(dump.resources.len(), 1, "type={type_}");
        assert_eq!(dump.resources[0].kind.as_deref(), Some("definition"));
    }

    // A type the server serves but holds none of is an empty dump; a typo is a 400.
    let none: views::ConfigDump = get_json(&f.state, "/debug/config_dump?type=Listener").await;
    assert!(none.resources.is_empty());
    let (status, _, body) = get(&f.state, "/debug/config_dump?type=metdata").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("unknown type \"metdata\""), "{body}");
    assert!(body.contains(crate::pb::METADATA_TYPE_URL), "{body}");
    // Pixiu's listeners and clusters are never resources of their own: the 400 names ECDS.
    for inner in [
        "PixiuExtensionListeners",
        crate::push::pixiu::CLUSTERS_TYPE_URL,
    ] {
        let (status, _, body) = get(&f.state, &format!("/debug/config_dump?type={inner}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("not a resource of its own"), "{body}");
        assert!(body.contains(crate::push::pixiu::ECDS_TYPE_URL), "{body}");
    }

    let by_app: views::ConfigDump =
        get_json(&f.state, "/debug/config_dump?application=greeter").await;
    let names: Vec<_> = by_app.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["greeter/r1", "org.apache.dubbo.Greeter::provider:greeter"],
        "its metadata and the definitions it provides"
    );
}

#[tokio::test]
async fn overview_groups_applications_and_revisions_by_namespace() {
    let f = fixture().await;
    let overview: views::Overview = get_json(&f.state, "/api/overview").await;
    let names: Vec<_> = overview
        .namespaces
        .iter()
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(names, ["default", "team-b"]);
    let default = &overview.namespaces[0];
    assert_eq!(default.applications.len(), 1);
    assert_eq!(default.applications[0].name, "greeter");
    assert_eq!(default.applications[0].revisions[0].revision, "r1");
    let r1 = &default.applications[0].revisions[0];
    assert_eq!(r1.value_bytes, r1.metadata_info.len());
    assert!(!r1.truncated);
    assert_eq!(default.definitions.len(), 1);
    assert!(overview.clients.is_empty());
    assert_eq!(overview.store, "memory");
}

#[tokio::test]
async fn syncz_with_no_clients_is_empty() {
    let f = fixture().await;
    let syncz: views::SyncStatus = get_json(&f.state, "/debug/syncz").await;
    assert!(syncz.streams.is_empty());
}

#[tokio::test]
async fn the_page_is_served() {
    let f = fixture().await;
    let (status, content_type, body) = get(&f.state, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(body.contains("<title>pixiu-metadata</title>"));
    assert!(body.contains("/api/overview"));
}

/// [`serve`] on a loopback port, with a drain timeout of 200 ms.
struct Serving {
    _fixture: Fixture,
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Serving {
    async fn start() -> Self {
        let f = fixture().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            tokio::sync::watch::channel(router(f.state.clone())).1,
            shutdown.clone(),
            Duration::from_millis(200),
        ));
        Self {
            _fixture: f,
            addr,
            shutdown,
            task,
        }
    }

    /// Shuts it down and waits, failing after 5 s.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("admin HTTP stopped in time")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn serve_stops_within_the_drain_timeout() {
    let serving = Serving::start().await;
    let addr = serving.addr;
    // A client that opens a connection and never sends a complete request.
    let _idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    serving.stop().await;
}

/// A connection to `addr` from the loopback address `127.0.0.<from>`.
async fn connect_from(from: u8, addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, from], 0)))
        .unwrap();
    socket.connect(addr).await.unwrap()
}

/// Sends `GET /healthz` from `127.0.0.<from>` on a new connection to `addr`; the answer's
/// status line, or `None` when the connection is closed without one.
async fn healthz_from(from: u8, addr: std::net::SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = connect_from(from, addr).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
        .await
        .ok()?
        .ok()?;
    answer.lines().next().map(str::to_string)
}

#[tokio::test]
async fn idle_and_surplus_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let serving = Serving::start().await;
    let addr = serving.addr;
    // Connections that send half a request and stop.
    let stall = |from: u8| async move {
        let mut stream = connect_from(from, addr).await;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHo")
            .await
            .unwrap();
        stream
    };
    let ok = Some("HTTP/1.1 200 OK".to_string());

    // One address holds its share: its next connection is closed, another address is served.
    let mut stalled = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_PEER {
        stalled.push(stall(1).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(healthz_from(1, addr).await, None);
    assert_eq!(healthz_from(2, addr).await, ok);

    // Several addresses hold every connection the port takes: the next one is closed.
    let addresses = u8::try_from(MAX_CONNECTIONS / MAX_CONNECTIONS_PER_PEER).unwrap();
    for from in 2..=addresses {
        for _ in 0..MAX_CONNECTIONS_PER_PEER {
            stalled.push(stall(from).await);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(healthz_from(addresses + 1, addr).await, None);

    // The stalled ones are closed at the header timeout, and the port serves again.
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    // Closed (an end of stream, or a reset) rather than left open.
    let _closed = tokio::time::timeout(
        HEADER_READ_TIMEOUT + Duration::from_secs(5),
        stalled[0].read_to_end(&mut rest),
    )
    .await
    .expect("a stalled connection is closed");
    assert!(started.elapsed() >= HEADER_READ_TIMEOUT - Duration::from_secs(2));
    drop(stalled);
    let mut served = None;
    for _ in 0..50 {
        served = healthz_from(addresses + 1, addr).await;
        if served.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served, ok);

    serving.stop().await;
}

#[test]
fn overview_values_are_cut_on_a_character_boundary() {
    // 3-byte characters across the limit: the cut falls before the one it would split.
    let long = "\u{4e2d}".repeat(views::OVERVIEW_VALUE_BYTES / 3 + 10);
    let (shown, size, truncated) = views::overview_value(Some(long.clone()));
    assert!(truncated);
    assert_eq!(size, long.len());
    assert!(shown.len() <= views::OVERVIEW_VALUE_BYTES);
    assert!(shown.len() > views::OVERVIEW_VALUE_BYTES - 3);
    assert!(long.starts_with(&shown));
    let short = views::overview_value(Some("{}".into()));
    assert_eq!(short, ("{}".to_string(), 2, false));
}
