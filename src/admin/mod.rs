//! Admin HTTP: health, Prometheus metrics, sync status, a dump of the xDS cache, and a page
//! for mesh operators, on their own port (default `127.0.0.1:15014`).
//!
//! | route                 | what                                                        |
//! |-----------------------|-------------------------------------------------------------|
//! | `/healthz`            | 200 while the process runs                                  |
//! | `/readyz`             | 200 when the store answers and the cache is warmed, else 503 |
//! | `/metrics`            | Prometheus text exposition                                  |
//! | `/debug/syncz`        | per stream and type: sent, ACKed, NACKed ([`views::SyncStatus`]) |
//! | `/debug/config_dump`  | what the cache holds, filtered by `type`, `namespace`, `application` |
//! | `/api/overview`       | everything the page shows, in one JSON document             |
//! | `/`                   | the page (static HTML and JS, polling `/api/overview`)       |
//!
//! Everything here reads shared state (the store, the cache, the stream registry, the
//! metrics) and writes nothing, so the admin port can never change what clients see.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;
use tracing::{debug, warn};

use crate::{metrics::Metrics, store::Store};

mod pushes;
pub mod views;

pub use pushes::{PushLog, observer};

/// The content type of `/metrics`: prometheus-client writes OpenMetrics text (counters
/// named without `_total` in `# TYPE`, a final `# EOF`), and Prometheus picks its parser by
/// this header, so it must say OpenMetrics (the crate's own examples serve the same).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The page for mesh operators: one static file, no build step.
const PAGE: &str = include_str!("page.html");

/// What the admin routes read. Cheap to clone.
#[derive(Clone)]
pub struct AdminState {
    store: Arc<dyn Store>,
    cache: pixiu_xds::Cache,
    registry: pixiu_xds::Registry,
    metrics: Metrics,
    warmed: watch::Receiver<bool>,
    pushes: PushLog,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("store", &self.store.backend())
            .finish_non_exhaustive()
    }
}

impl AdminState {
    /// State over the server's parts. `warmed` turns true once the cache holds the store's
    /// full state.
    pub fn new(
        store: Arc<dyn Store>,
        cache: pixiu_xds::Cache,
        registry: pixiu_xds::Registry,
        metrics: Metrics,
        warmed: watch::Receiver<bool>,
        pushes: PushLog,
    ) -> Self {
        Self {
            store,
            cache,
            registry,
            metrics,
            warmed,
            pushes,
        }
    }
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/debug/syncz", get(syncz))
        .route("/debug/config_dump", get(config_dump))
        .route("/api/overview", get(overview))
        // One span per request, named by the matched route (STYLE 4).
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &http::Request<_>| {
                let route = request
                    .extensions()
                    .get::<axum::extract::MatchedPath>()
                    .map_or("", |p| p.as_str());
                tracing::debug_span!("admin_request", http.method = %request.method(), http.route = route)
            }),
        )
        .with_state(state)
}

/// The admin router while the store opens: the process is alive (`/healthz` 200), not ready,
/// and has nothing else to show yet (503 on every other path, saying why).
pub fn opening_router(backend: &str) -> Router {
    let not_ready: Arc<str> = format!("not ready\nstore ({backend}): opening\n").into();
    Router::new()
        .route("/healthz", get(healthz))
        .fallback(move || {
            let body = not_ready.to_string();
            async move { (StatusCode::SERVICE_UNAVAILABLE, body) }
        })
}

/// Most admin connections open at once; further ones are closed as they are accepted. An
/// operator's browser, `status` and a Prometheus scraper need a handful.
pub const MAX_CONNECTIONS: usize = 256;

/// Most admin connections open at once from one IP address, so one client holding
/// connections cannot take the port from the kubelet's probes and the scraper.
pub const MAX_CONNECTIONS_PER_PEER: usize = 32;

/// How long a client may take to send a request's headers (and, between requests of a
/// kept-alive connection, to start the next): a connection that sends half a request and
/// stops is closed then, so idle sockets cannot use up the process's file descriptors.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the router `routes` holds (the latest, for each request) on `listener` until
/// `shutdown`, then gives in-flight requests `drain_timeout` to finish before returning anyway.
///
/// HTTP/1.1 with [`HEADER_READ_TIMEOUT`], at most [`MAX_CONNECTIONS`] connections and
/// [`MAX_CONNECTIONS_PER_PEER`] from one address: the port may face a network (behind
/// `--admin-token-file`), and a client that holds sockets open must take neither the file
/// descriptors the gRPC port needs nor the port from other clients.
pub async fn serve(
    listener: TcpListener,
    routes: tokio::sync::watch::Receiver<Router>,
    shutdown: CancellationToken,
    drain_timeout: Duration,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let peers = Arc::new(parking_lot::Mutex::new(HashMap::new()));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, most likely: wait for some to be released.
                warn!(%error, "admin HTTP: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(
                max = MAX_CONNECTIONS,
                "admin HTTP: too many connections; closing a new one"
            );
            continue;
        };
        let Some(slot) = PeerSlot::take(&peers, peer.ip()) else {
            debug!(%peer, max = MAX_CONNECTIONS_PER_PEER, "admin HTTP: too many connections from one address; closing a new one");
            continue;
        };
        // Each request goes to the router of the moment (the opening one, then the full one),
        // so a connection accepted while the store opened is served after it too.
        let routes = routes.clone();
        let service = hyper::service::service_fn(move |request| {
            let router = routes.borrow().clone();
            tower::ServiceExt::oneshot(router, request)
        });
        let connection =
            graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "admin HTTP connection ended with an error");
            }
            drop((permit, slot));
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(drain_timeout) => {
            warn!(timeout = ?drain_timeout, "admin HTTP requests still open at shutdown; dropping them");
        }
    }
    Ok(())
}

/// One of an address's [`MAX_CONNECTIONS_PER_PEER`] connections, given back on drop.
struct PeerSlot {
    peers: Arc<parking_lot::Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PeerSlot {
    fn take(peers: &Arc<parking_lot::Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Self> {
        let mut open = peers.lock();
        let n = open.entry(ip).or_default();
        if *n >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(Self {
            peers: peers.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let mut problems = Vec::new();
    if !*state.warmed.borrow() {
        problems.push("cache not warmed: the first full read of the store has not finished".into());
    }
    match tokio::time::timeout(Duration::from_secs(2), state.store.ready()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => problems.push(format!("store ({}): {error}", state.store.backend())),
        Err(_) => problems.push(format!(
            "store ({}): no answer within 2s",
            state.store.backend()
        )),
    }
    if problems.is_empty() {
        "ok\n".into_response()
    } else {
        let mut body = String::from("not ready\n");
        for problem in problems {
            body.push_str(&problem);
            body.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    views::refresh_gauges(&state.metrics, &state.cache.snapshot(), &state.registry);
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        state.metrics.encode(),
    )
        .into_response()
}

async fn syncz(State(state): State<AdminState>) -> Json<views::SyncStatus> {
    Json(views::sync_status(&state.registry))
}

async fn config_dump(
    State(state): State<AdminState>,
    Query(filter): Query<views::DumpFilter>,
) -> Response {
    let snapshot = state.cache.snapshot();
    if let Some(why) = views::unknown_type(&snapshot, &filter) {
        return (StatusCode::BAD_REQUEST, why).into_response();
    }
    Json(views::config_dump(&snapshot, &filter)).into_response()
}

async fn overview(State(state): State<AdminState>) -> Json<views::Overview> {
    Json(views::overview(
        &state.cache.snapshot(),
        &state.registry,
        &state.pushes,
        *state.warmed.borrow(),
        state.store.backend(),
    ))
}

#[cfg(test)]
mod tests;
