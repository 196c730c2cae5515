//! The gRPC port's HTTP/2 server: every connection is one task that drives all of its
//! streams, as an event-loop server (Envoy, gRPC-Go's per-connection writer) does.
//!
//! hyper's server, under tonic's, spawns a task for every HTTP/2 stream. When a snapshot
//! changes, each subscribed stream's task is woken through the scheduler, hands its response to
//! the connection (taking the connection's lock and waking its task), and when the ACK arrives
//! the connection's task wakes the stream's task again: two trips through the scheduler per
//! stream and update, and the cores pass the connection's state back and forth. Here a
//! stream is a future inside its connection's task ([`FuturesUnordered`]): a wake-up marks it
//! ready and the connection's task polls it in the same turn as the connection itself, so one
//! change costs one wake-up per connection. The bench's bare `h2` ADS measured this model at
//! 0.40–0.46× the CPU per update of hyper's (docs/benchmarks.md).
//!
//! Each stream calls the same tower service tonic's router is (`tonic::service::Routes` under
//! the router-wide layers) with the connection's [`Connected::ConnectInfo`] in the request's
//! extensions, as tonic's server does; a service error that is a `Status` becomes a
//! trailers-only response, any other resets the stream. What the connection enforces besides
//! the HTTP/2 settings ([`Http2`]): keepalive pings, whose unanswered one closes the connection;
//! a maximum age, after which the connection is sent GOAWAY and closed once its grace is over;
//! and a graceful shutdown, GOAWAY to every connection, the server returning when all of them
//! ended. The timing of those is the pure [`Deadlines`].
//!
//! A stream's work runs on its connection's task, so one connection uses one core at a time,
//! handlers included; a client that wants more opens more connections, as it must for the
//! HTTP/2 framing of one connection anyway.

use std::{
    future::{Future, poll_fn},
    pin::pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use futures::{Stream, StreamExt, stream::FuturesUnordered};
use h2::{Reason, RecvStream, SendStream, server::SendResponse};
use http::{Request, Response};
use http_body::{Body, Frame};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tower::{Service, ServiceExt};
use tracing::{Instrument, debug};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The HTTP/2 settings and deadlines of every connection. The defaults are hyper's server's,
/// which tonic's server used.
#[derive(Debug, Clone)]
pub struct Http2 {
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE: a larger request is answered HTTP 431 by `h2`.
    pub max_header_list_size: u32,
    /// Each stream's receive window.
    pub initial_stream_window: u32,
    /// The connection's receive window.
    pub initial_connection_window: u32,
    /// SETTINGS_MAX_FRAME_SIZE.
    pub max_frame_size: u32,
    /// Bytes a stream may queue for sending beyond what flow control lets out.
    pub max_send_buffer: usize,
    /// Keepalive pings: how often, and how long one may go unanswered.
    pub keepalive: Option<KeepAlive>,
    /// Age after which a connection is sent GOAWAY.
    pub max_connection_age: Option<Duration>,
    /// How long a connection sent GOAWAY for its age may keep its streams.
    pub max_connection_age_grace: Duration,
}

impl Default for Http2 {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 200,
            max_header_list_size: 16 * 1024,
            initial_stream_window: 1024 * 1024,
            initial_connection_window: 1024 * 1024,
            max_frame_size: 16 * 1024,
            max_send_buffer: 400 * 1024,
            keepalive: None,
            max_connection_age: None,
            max_connection_age_grace: Duration::from_secs(10),
        }
    }
}

/// The keepalive of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// Time between a pong (or the start) and the next ping.
    pub interval: Duration,
    /// How long a ping may go unanswered.
    pub timeout: Duration,
}

impl Http2 {
    fn builder(&self) -> h2::server::Builder {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(self.initial_stream_window)
            .initial_connection_window_size(self.initial_connection_window)
            .max_frame_size(self.max_frame_size)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(self.max_header_list_size)
            .max_send_buffer_size(self.max_send_buffer)
            .max_local_error_reset_streams(Some(1024));
        builder
    }
}

/// What a connection does when a deadline of [`Deadlines`] passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Send a keepalive ping.
    Ping,
    /// Send GOAWAY: the connection reached its maximum age.
    Drain,
    /// Close the connection now: a ping went unanswered, or the grace after GOAWAY is over.
    Close(&'static str),
}

/// When a connection pings, drains and closes: pure, driven by the connection's clock.
#[derive(Debug, Clone)]
pub struct Deadlines {
    keepalive: Option<KeepAlive>,
    /// The next ping, or, while one is unanswered, when it times out.
    ping: Option<Instant>,
    awaiting_pong: bool,
    /// GOAWAY for the connection's age, until it is sent.
    drain: Option<Instant>,
    grace: Duration,
    /// The end of the grace after GOAWAY for age.
    close: Option<Instant>,
}

impl Deadlines {
    /// The deadlines of a connection opened at `now`.
    pub fn new(http2: &Http2, now: Instant) -> Self {
        Self {
            keepalive: http2.keepalive,
            ping: http2.keepalive.map(|k| now + k.interval),
            awaiting_pong: false,
            drain: http2.max_connection_age.map(|age| now + age),
            grace: http2.max_connection_age_grace,
            close: None,
        }
    }

    /// The earliest deadline, if any.
    pub fn next(&self) -> Option<Instant> {
        [self.ping, self.drain, self.close]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether a ping is waiting for its pong.
    pub fn awaiting_pong(&self) -> bool {
        self.awaiting_pong
    }

    /// What is due at `now`, at most one thing per call (the most severe first); `None` when
    /// nothing is.
    pub fn due(&mut self, now: Instant) -> Option<Due> {
        if self.close.is_some_and(|at| at <= now) {
            return Some(Due::Close("the grace after its maximum age is over"));
        }
        if let (Some(at), Some(keepalive)) = (self.ping, self.keepalive)
            && at <= now
        {
            if self.awaiting_pong {
                // The connection closes: no more pings, and a late pong changes nothing.
                self.ping = None;
                self.keepalive = None;
                self.awaiting_pong = false;
                return Some(Due::Close("a keepalive ping went unanswered"));
            }
            self.awaiting_pong = true;
            self.ping = Some(now + keepalive.timeout);
            return Some(Due::Ping);
        }
        if self.drain.is_some_and(|at| at <= now) {
            self.drain = None;
            self.close = Some(now + self.grace);
            return Some(Due::Drain);
        }
        None
    }

    /// The pong of the ping in flight arrived at `now`.
    pub fn pong(&mut self, now: Instant) {
        if let Some(keepalive) = self.keepalive.filter(|_| self.awaiting_pong) {
            self.awaiting_pong = false;
            self.ping = Some(now + keepalive.interval);
        }
    }
}

/// Serves `service` on every connection of `incoming` until `shutdown` (or the end of
/// `incoming`), then sends every connection GOAWAY and returns when all of them ended.
pub async fn serve<I, IO, IE, S, B>(
    incoming: I,
    service: S,
    http2: Http2,
    shutdown: CancellationToken,
) where
    I: Stream<Item = Result<IO, IE>>,
    IE: std::fmt::Display,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    S: Service<Request<tonic::body::Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    let http2 = Arc::new(http2);
    // Every connection holds a sender; `recv` answers `None` once all of them are gone.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    {
        let mut incoming = pin!(incoming);
        loop {
            let io = tokio::select! {
                () = shutdown.cancelled() => break,
                io = incoming.next() => match io {
                    Some(Ok(io)) => io,
                    Some(Err(error)) => {
                        debug!(%error, "accepting a connection failed");
                        continue;
                    }
                    None => break,
                },
            };
            let connection = connection(
                io,
                service.clone(),
                http2.clone(),
                shutdown.clone(),
                open.clone(),
            );
            tokio::spawn(connection.in_current_span());
        }
    }
    drop(open);
    let _ = all_closed.recv().await;
}

/// Drives one connection and all its streams.
async fn connection<IO, S, B>(
    io: IO,
    service: S,
    http2: Arc<Http2>,
    shutdown: CancellationToken,
    _open: mpsc::Sender<()>,
) where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    S: Service<Request<tonic::body::Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    let info = io.connect_info();
    let mut conn = match http2.builder().handshake::<_, Bytes>(io).await {
        Ok(conn) => conn,
        Err(error) => {
            debug!(%error, "HTTP/2 handshake failed");
            return;
        }
    };
    let mut ping_pong = conn.ping_pong();
    let mut deadlines = Deadlines::new(&http2, Instant::now());
    let far = || Instant::now() + Duration::from_secs(86_400 * 365);
    let timer = tokio::time::sleep_until(deadlines.next().unwrap_or_else(far));
    let mut timer = pin!(timer);
    let mut cancelled = pin!(shutdown.cancelled());
    let mut draining = false;
    let mut streams = FuturesUnordered::new();
    loop {
        tokio::select! {
            // The streams first: what they send, the connection writes when polled below.
            biased;
            Some(()) = streams.next(), if !streams.is_empty() => {}
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    streams.push(stream(service.clone(), request, respond, info.clone()));
                }
                Some(Err(error)) => {
                    debug!(%error, "HTTP/2 connection failed");
                    return;
                }
                None => return,
            },
            pong = poll_fn(|cx| poll_pong(ping_pong.as_mut(), cx)), if deadlines.awaiting_pong() => {
                if let Err(error) = pong {
                    debug!(%error, "keepalive ping failed");
                    return;
                }
                deadlines.pong(Instant::now());
                timer.as_mut().reset(deadlines.next().unwrap_or_else(far));
            }
            () = &mut timer => {
                while let Some(due) = deadlines.due(Instant::now()) {
                    match due {
                        Due::Ping => {
                            let sent = ping_pong.as_mut().map(|p| p.send_ping(h2::Ping::opaque()));
                            if let Some(Err(error)) = sent {
                                debug!(%error, "sending a keepalive ping failed");
                                return;
                            }
                        }
                        Due::Drain => {
                            debug!("connection reached its maximum age; draining");
                            conn.graceful_shutdown();
                            draining = true;
                        }
                        Due::Close(why) => {
                            debug!(why, "closing the connection");
                            return;
                        }
                    }
                }
                timer.as_mut().reset(deadlines.next().unwrap_or_else(far));
            }
            () = &mut cancelled, if !draining => {
                conn.graceful_shutdown();
                draining = true;
            }
        }
    }
}

fn poll_pong(
    ping_pong: Option<&mut h2::PingPong>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), h2::Error>> {
    match ping_pong {
        Some(ping_pong) => ping_pong.poll_pong(cx).map_ok(|_| ()),
        None => Poll::Pending,
    }
}

/// Serves one stream: calls the service, sends its response, pipes its body.
async fn stream<S, B, Info>(
    service: S,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    info: Info,
) where
    S: Service<Request<tonic::body::Body>, Response = Response<B>>,
    S::Error: Into<BoxError> + Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
    Info: Clone + Send + Sync + 'static,
{
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(info);
    let request = Request::from_parts(parts, tonic::body::Body::new(RecvBody::new(body)));
    let response = {
        let mut call = pin!(service.oneshot(request));
        // A client that resets the stream while the call runs cancels the call.
        let called = poll_fn(|cx| {
            if respond.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            call.as_mut().poll(cx).map(Some)
        });
        match called.await {
            Some(response) => response,
            None => return,
        }
    };
    let response = match response {
        Ok(response) => response,
        Err(error) => {
            match tonic::Status::try_from_error(error.into()) {
                Ok(status) => {
                    let (parts, ()) = status.into_http::<()>().into_parts();
                    let _ = respond.send_response(Response::from_parts(parts, ()), true);
                }
                Err(error) => {
                    debug!(%error, "the service failed");
                    respond.send_reset(Reason::INTERNAL_ERROR);
                }
            }
            return;
        }
    };
    let (parts, body) = response.into_parts();
    let ended = body.is_end_stream();
    let Ok(send) = respond.send_response(Response::from_parts(parts, ()), ended) else {
        return;
    };
    if !ended {
        pipe(body, send).await;
    }
}

/// Sends `body` on `send` as `h2` lets it: a chunk waits for flow control to give the stream
/// some capacity (what `h2` cannot send yet, it keeps, up to [`Http2::max_send_buffer`]), and
/// a reset by the client ends it. hyper's `PipeToSendStream`, as an `async fn`.
async fn pipe<B>(body: B, mut send: SendStream<Bytes>)
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError> + Send,
{
    let mut body = pin!(body);
    loop {
        let frame = poll_fn(|cx| {
            if send.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            body.as_mut().poll_frame(cx).map(Some)
        })
        .await;
        let Some(frame) = frame else { return };
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(chunk) => {
                    let end = body.is_end_stream();
                    if !chunk.is_empty() && !wait_for_capacity(&mut send).await {
                        return;
                    }
                    if send.send_data(chunk, end).is_err() || end {
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        send.reserve_capacity(0);
                        let _ = send.send_trailers(trailers);
                        return;
                    }
                }
            },
            Some(Err(error)) => {
                let error: BoxError = error.into();
                debug!(%error, "a response body failed");
                send.send_reset(Reason::INTERNAL_ERROR);
                return;
            }
            None => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
        }
    }
}

/// Waits until the stream may send at least a byte; `false` when it never will (reset,
/// closed).
async fn wait_for_capacity(send: &mut SendStream<Bytes>) -> bool {
    // A claim of one byte, not the chunk's length: `send_data` raises it to what it buffers,
    // and a stream waiting for the peer's window update pins no more of the connection's.
    send.reserve_capacity(1);
    poll_fn(|cx| {
        loop {
            if send.capacity() > 0 {
                return Poll::Ready(true);
            }
            if send.poll_reset(cx).is_ready() {
                return Poll::Ready(false);
            }
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Poll::Ready(false),
            }
        }
    })
    .await
}

/// A request's body from `h2`: the flow-control window is given back as the service reads.
#[derive(Debug)]
struct RecvBody {
    stream: RecvStream,
    data_done: bool,
}

impl RecvBody {
    fn new(stream: RecvStream) -> Self {
        Self {
            stream,
            data_done: false,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => this.data_done = true,
            }
        }
        match ready!(this.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}

#[cfg(test)]
mod tests;
