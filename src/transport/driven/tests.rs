use std::time::Duration;

use proptest::prelude::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::*;

fn with(keepalive: Option<(u64, u64)>, age: Option<(u64, u64)>) -> Http2 {
    Http2 {
        keepalive: keepalive.map(|(interval, timeout)| KeepAlive {
            interval: Duration::from_millis(interval),
            timeout: Duration::from_millis(timeout),
        }),
        max_connection_age: age.map(|(age, _)| Duration::from_millis(age)),
        max_connection_age_grace: Duration::from_millis(age.map_or(0, |(_, grace)| grace)),
        ..Http2::default()
    }
}

fn ms(start: Instant, n: u64) -> Instant {
    start + Duration::from_millis(n)
}

#[test]
fn nothing_is_due_without_keepalive_or_age() {
    let start = Instant::now();
    let mut deadlines = Deadlines::new(&with(None, None), start);
    assert_eq!(deadlines.next(), None);
    assert_eq!(deadlines.due(ms(start, 1_000_000)), None);
}

#[test]
fn a_ping_follows_the_interval_and_its_pong_the_next_interval() {
    let start = Instant::now();
    let mut deadlines = Deadlines::new(&with(Some((100, 20)), None), start);
    assert_eq!(deadlines.next(), Some(ms(start, 100)));
    assert_eq!(deadlines.due(ms(start, 99)), None);
    assert_eq!(deadlines.due(ms(start, 100)), Some(Due::Ping));
    assert!(deadlines.awaiting_pong());
    // The ping's deadline replaces the interval's.
    assert_eq!(deadlines.next(), Some(ms(start, 120)));
    assert_eq!(deadlines.due(ms(start, 110)), None);
    deadlines.pong(ms(start, 110));
    assert!(!deadlines.awaiting_pong());
    assert_eq!(deadlines.next(), Some(ms(start, 210)));
    assert_eq!(deadlines.due(ms(start, 150)), None);
}

#[test]
fn an_unanswered_ping_closes_the_connection() {
    let start = Instant::now();
    let mut deadlines = Deadlines::new(&with(Some((100, 20)), None), start);
    assert_eq!(deadlines.due(ms(start, 100)), Some(Due::Ping));
    assert!(matches!(deadlines.due(ms(start, 120)), Some(Due::Close(_))));
    // A pong too late changes nothing.
    deadlines.pong(ms(start, 130));
    assert_eq!(deadlines.next(), None);
}

#[test]
fn age_drains_then_the_grace_closes() {
    let start = Instant::now();
    let mut deadlines = Deadlines::new(&with(None, Some((500, 200))), start);
    assert_eq!(deadlines.next(), Some(ms(start, 500)));
    assert_eq!(deadlines.due(ms(start, 500)), Some(Due::Drain));
    assert_eq!(deadlines.due(ms(start, 500)), None);
    assert_eq!(deadlines.next(), Some(ms(start, 700)));
    assert_eq!(deadlines.due(ms(start, 699)), None);
    assert!(matches!(deadlines.due(ms(start, 700)), Some(Due::Close(_))));
}

#[test]
fn a_late_timer_gets_everything_due_in_turn() {
    let start = Instant::now();
    let mut deadlines = Deadlines::new(&with(Some((100, 50)), Some((100, 1_000))), start);
    let late = ms(start, 100);
    assert_eq!(deadlines.due(late), Some(Due::Ping));
    assert_eq!(deadlines.due(late), Some(Due::Drain));
    assert_eq!(deadlines.due(late), None);
}

proptest! {
    /// A peer that always answers within the timeout is never closed by the keepalive, and
    /// pings never come closer together than the interval.
    #[test]
    fn answered_pings_never_close(
        interval in 1u64..1_000,
        timeout in 1u64..1_000,
        delays in prop::collection::vec(0u64..1_000, 1..50),
    ) {
        let start = Instant::now();
        let mut deadlines = Deadlines::new(&with(Some((interval, timeout)), None), start);
        let mut now = start;
        let mut last_ping: Option<Instant> = None;
        for delay in delays {
            let at = deadlines.next().unwrap();
            prop_assert!(at >= now);
            now = at;
            prop_assert_eq!(deadlines.due(now), Some(Due::Ping));
            if let Some(last) = last_ping {
                prop_assert!(now - last >= Duration::from_millis(interval));
            }
            last_ping = Some(now);
            // The pong, within the timeout.
            let answered = now + Duration::from_millis(delay % timeout);
            prop_assert_eq!(deadlines.due(answered), None);
            deadlines.pong(answered);
            now = answered;
        }
    }
}

/// Serves tonic's health service over the driven transport on a loopback port.
async fn health_server(
    http2: Http2,
) -> (
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("x", tonic_health::ServingStatus::Serving)
        .await;
    let routes = tonic::service::Routes::new(health).prepare();
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(serve(
        TcpListenerStream::new(listener),
        routes,
        http2,
        shutdown.clone(),
    ));
    // The reporter must outlive the test's calls.
    std::mem::forget(reporter);
    (addr, shutdown, served)
}

async fn client(addr: std::net::SocketAddr) -> HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

#[tokio::test]
async fn unary_streaming_and_status_answers_are_served_and_shutdown_drains() {
    let (addr, shutdown, served) = health_server(Http2::default()).await;
    let mut health = client(addr).await;
    let answer = health.check(check("x")).await.unwrap().into_inner();
    assert_eq!(answer.status(), ServingStatus::Serving);
    // A service's error status travels as a trailers-only response.
    let unknown = health.check(check("nobody")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    // Many unary calls at once on the one connection.
    let calls = (0..200).map(|_| {
        let mut health = health.clone();
        async move {
            health
                .check(check("x"))
                .await
                .map(|r| r.into_inner().status())
        }
    });
    for answer in futures::future::join_all(calls).await {
        assert_eq!(answer.unwrap(), ServingStatus::Serving);
    }
    // A server stream.
    let mut watch = health.watch(check("x")).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    // Shutdown sends GOAWAY; the health watch ends when the reporter's stream does not, so
    // the server waits for the connection: dropping the client ends it.
    shutdown.cancel();
    drop(watch);
    drop(health);
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("the server did not return after shutdown")
        .unwrap();
    // The listener is gone.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn an_unknown_method_is_unimplemented() {
    let (addr, shutdown, served) = health_server(Http2::default()).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let answer: Result<tonic::Response<()>, _> = grpc
        .unary(
            tonic::Request::new(()),
            http::uri::PathAndQuery::from_static("/no.Such/Method"),
            tonic_prost::ProstCodec::<(), ()>::default(),
        )
        .await;
    assert_eq!(answer.unwrap_err().code(), tonic::Code::Unimplemented);
    shutdown.cancel();
    drop(grpc);
    served.await.unwrap();
}

/// The client connection preface and an empty SETTINGS frame: HTTP/2 opened by a peer that
/// then never answers anything (its pings included).
async fn silent_http2_peer(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    stream
}

/// Reads until the server closes the connection; how long that took.
async fn closed_after(stream: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the connection stayed open");
    start.elapsed()
}

#[tokio::test]
async fn a_peer_that_never_answers_a_ping_is_closed() {
    let http2 = Http2 {
        keepalive: Some(KeepAlive {
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(200),
        }),
        ..Http2::default()
    };
    let (addr, shutdown, _served) = health_server(http2).await;
    let mut silent = silent_http2_peer(addr).await;
    let took = closed_after(&mut silent, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(350), "{took:?}");
    // A client that answers its pings keeps its connection past many intervals.
    let mut health = client(addr).await;
    health.check(check("x")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let mut watch = health.watch(check("x")).await.unwrap().into_inner();
    watch.message().await.unwrap().unwrap();
    shutdown.cancel();
}

#[tokio::test]
async fn a_connection_past_its_age_is_drained_then_closed() {
    let http2 = Http2 {
        max_connection_age: Some(Duration::from_millis(200)),
        max_connection_age_grace: Duration::from_millis(300),
        ..Http2::default()
    };
    let (addr, shutdown, _served) = health_server(http2).await;
    let mut silent = silent_http2_peer(addr).await;
    // GOAWAY at 200 ms; with no stream left the connection ends there, or at the latest
    // when the grace is over.
    let took = closed_after(&mut silent, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(150), "{took:?}");
    assert!(took < Duration::from_millis(2_000), "{took:?}");
    // A stream open across the age is cut at the end of the grace.
    let mut health = client(addr).await;
    let mut watch = health.watch(check("x")).await.unwrap().into_inner();
    watch.message().await.unwrap().unwrap();
    let start = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived the age and the grace");
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    shutdown.cancel();
}
