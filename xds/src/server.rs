//! The tonic ADS service: one driver per stream feeding a protocol state machine.
//!
//! This is the only module of the crate that awaits or touches the transport. Each stream's
//! driver selects over two inputs (a client request, a wake-up of its cache interest, which
//! the server's shutdown raises too),
//! feeds the state machine and leaves its responses, one at a time, in the stream's
//! [`Mailbox`]. The driver is no task of its own: it runs inside the response stream
//! ([`Driven`]), polled by the HTTP/2 stream task that sends the responses. While the client
//! is slow that task stops polling it; cache changes meanwhile coalesce in the snapshot watch,
//! so a slow stream costs one snapshot reference, never a queue.
//!
//! State of the World and Incremental streams share that driver: both state machines
//! implement one private trait (`Machine`), and only the message types differ.

use std::{
    collections::BTreeMap,
    future::{Future, poll_fn},
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::SystemTime,
};

use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    },
};
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming, metadata::MetadataMap};
use tracing::{Level, Span, field::Empty, info_span};

mod service;

pub use service::AdsService;

use crate::{
    cache::{Cache, Snapshot, View},
    delta::DeltaStream,
    protocol::{Limits, ProtocolError, Quirks, Step},
    registry::{Registry, TypeStatuses},
    response::{DeltaResponse, Encode, SotwResponse},
    sotw::SotwStream,
    status::{Notice, Protocol, StreamStatus, TypeStatus},
    types::{Partition, ResourceName, TypeUrl},
};

/// What the server knows about a stream when it asks for its [`View`].
#[derive(Debug)]
pub struct StreamContext {
    /// The request headers of the stream.
    pub metadata: MetadataMap,
    /// The request extensions (TLS peer certificates, when the transport sets them).
    pub extensions: tonic::Extensions,
    /// The peer address, when known.
    pub peer: Option<SocketAddr>,
}

/// Decides which cache partitions a stream reads, from its node and request context.
///
/// This is where an embedding server maps a node to a tenant or namespace and refuses
/// clients it does not accept (the `Status` is sent to the client and ends the stream).
pub trait ViewResolver: Send + Sync + 'static {
    /// The view for a stream whose first request carried `node`.
    fn view(&self, node: Option<&Node>, context: &StreamContext) -> Result<View, Status>;

    /// How a stream whose first request carried `node` deviates from the protocol's
    /// general rules; none by default. Key it on what identifies a client that needs it
    /// (e.g. `node.user_agent_name`), never apply it to everyone.
    fn quirks(&self, _node: Option<&Node>) -> Quirks {
        Quirks::default()
    }
}

/// Receives what streams do, for metrics and logs. Every method has a no-op default.
pub trait StreamObserver: Send + Sync + 'static {
    /// A stream opened.
    fn stream_opened(&self, _protocol: Protocol) {}
    /// A stream closed.
    fn stream_closed(&self, _protocol: Protocol) {}
    /// A response is handed to the stream's transport (called just before).
    fn response_sent(&self, _type_url: &TypeUrl, _n_resources: usize, _snapshot_seq: u64) {}
    /// The state machine noticed an ACK, NACK or stale nonce.
    fn notice(&self, _notice: &Notice) {}
    /// A response is handed to the stream's transport (called after
    /// [`response_sent`](Self::response_sent), with more detail).
    fn pushed(&self, _push: &Pushed<'_>) {}
}

/// A response written to a stream, as [`StreamObserver::pushed`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct Pushed<'a> {
    /// The stream.
    pub stream_id: u64,
    /// The client's `node.id`.
    pub node_id: &'a str,
    /// The response's type URL.
    pub type_url: &'a TypeUrl,
    /// SotW `version_info`, Delta `system_version_info`.
    pub version: &'a str,
    /// The response nonce.
    pub nonce: &'a str,
    /// Resources carried (Delta: changed ones, not `removed_resources`).
    pub n_resources: usize,
    /// The sequence number of the snapshot the response reflects.
    pub snapshot_seq: u64,
    /// When a cache change caused this response, when that snapshot was published (see
    /// [`Snapshot::published_at`]); `None` when a request caused it.
    pub changed_at: Option<std::time::Instant>,
}

/// An observer that does nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl StreamObserver for NoObserver {}

/// Server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// What one stream may subscribe to.
    pub limits: Limits,
    /// Most streams open at once across all connections (default 100,000); further streams
    /// are refused with `RESOURCE_EXHAUSTED`. Request-level concurrency limits do not cover
    /// stream bodies, so this permit is held by the stream's driver itself.
    pub max_streams: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_streams: 100_000,
        }
    }
}

/// The Aggregated Discovery Service over a [`Cache`].
pub struct AdsServer {
    inner: Arc<Inner>,
}

struct Inner {
    cache: Cache,
    resolver: Arc<dyn ViewResolver>,
    observer: Arc<dyn StreamObserver>,
    registry: Registry,
    config: ServerConfig,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    /// The shutdown as the streams' loops read it; shared like `n_streams`.
    closing: Arc<Closing>,
    /// Shared with every server made by [`AdsServer::with_resolver`], so stream ids stay
    /// unique in the shared registry.
    n_streams: Arc<AtomicU64>,
}

impl std::fmt::Debug for AdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdsServer")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Clone for AdsServer {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl AdsServer {
    /// A server reading `cache`, asking `resolver` for each stream's view, recording stream
    /// status in `registry`. Streams end when `shutdown` is cancelled.
    pub fn new(
        cache: Cache,
        resolver: Arc<dyn ViewResolver>,
        registry: Registry,
        config: ServerConfig,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                cache,
                resolver,
                observer: Arc::new(NoObserver),
                registry,
                permits: Arc::new(Semaphore::new(config.max_streams)),
                config,
                shutdown,
                closing: Arc::new(Closing::default()),
                n_streams: Arc::new(AtomicU64::new(0)),
            }),
        }
    }

    /// A server over the same cache, registry, observer, limits, stream permits and
    /// stream ids, asking `resolver` for views: for serving the same protocol under another
    /// discovery service (e.g. ECDS) to another audience. Call after
    /// [`with_observer`](Self::with_observer).
    pub fn with_resolver(&self, resolver: Arc<dyn ViewResolver>) -> Self {
        let inner = &self.inner;
        Self {
            inner: Arc::new(Inner {
                cache: inner.cache.clone(),
                resolver,
                observer: inner.observer.clone(),
                registry: inner.registry.clone(),
                config: inner.config.clone(),
                permits: inner.permits.clone(),
                shutdown: inner.shutdown.clone(),
                closing: inner.closing.clone(),
                n_streams: inner.n_streams.clone(),
            }),
        }
    }

    /// Serves one State-of-the-World stream. Any discovery service whose stream method
    /// carries `DiscoveryRequest` / `DiscoveryResponse` (ADS, and per-type services such as
    /// ECDS's `StreamExtensionConfigs`) can delegate its method to this.
    pub fn serve_sotw(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream<DiscoveryResponse>>, Status> {
        self.open::<SotwStream>(request)
            .map(|driven| response_stream(driven, |response| response.to_message()))
    }

    /// Serves one Incremental stream. Any discovery service whose delta method carries
    /// `DeltaDiscoveryRequest` / `DeltaDiscoveryResponse` (ADS, and per-type services such
    /// as ECDS's `DeltaExtensionConfigs`) can delegate its method to this.
    pub fn serve_delta(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream<DeltaDiscoveryResponse>>, Status> {
        self.open::<DeltaStream>(request)
            .map(|driven| response_stream(driven, |response| response.to_message()))
    }

    /// Replaces the observer. Call before serving.
    #[must_use]
    pub fn with_observer(mut self, observer: Arc<dyn StreamObserver>) -> Self {
        let inner = Arc::get_mut(&mut self.inner)
            .expect("with_observer is called before the server is cloned or served");
        inner.observer = observer;
        self
    }

    /// The tonic service to add to a router: the generated
    /// `AggregatedDiscoveryServiceServer`'s routing with lean per-stream buffers (see
    /// [`AdsService`]).
    pub fn into_service(self) -> AdsService {
        AdsService::new(self)
    }

    fn admit(&self) -> Result<(OwnedSemaphorePermit, u64), Status> {
        let permit = self
            .inner
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "stream limit reached ({} open streams)",
                    self.inner.config.max_streams
                ))
            })?;
        let stream_id = self.inner.n_streams.fetch_add(1, Ordering::Relaxed) + 1;
        Ok((permit, stream_id))
    }
}

/// The response stream type of both ADS methods.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// What the stream driver needs from a protocol state machine; both variants implement it,
/// so one driver serves both.
trait Machine: Send + Sized + 'static {
    type Request: prost::Message + Default + Send + 'static;
    type Response: Encode + Send + 'static;
    const PROTOCOL: Protocol;

    fn start(view: View, nonce_prefix: String, limits: Limits, quirks: Quirks) -> Self;
    fn node(request: &Self::Request) -> Option<&Node>;
    /// A request handled without a snapshot (see [`SotwStream::on_repeat`]), or `None`.
    fn on_repeat(&mut self, request: &Self::Request) -> Option<Step<Self::Response>>;
    fn on_request(
        &mut self,
        request: &Self::Request,
        snapshot: &Snapshot,
    ) -> Result<Step<Self::Response>, ProtocolError>;
    fn on_snapshot(&mut self, snapshot: &Snapshot) -> Step<Self::Response>;
    fn status(&self) -> impl Iterator<Item = (&TypeUrl, &TypeStatus)>;
    fn view(&self) -> &View;
    fn describe(response: &Self::Response) -> Sent<'_>;
}

/// A response as logs and the observer see it.
struct Sent<'a> {
    type_url: &'a TypeUrl,
    /// Resources carried (Delta: changed ones, not `removed_resources`).
    n_resources: usize,
    /// SotW `version_info`, Delta `system_version_info`.
    version: &'a str,
    nonce: &'a str,
}

/// The registry reads a stream's status from its machine.
impl<M: Machine> TypeStatuses for M {
    fn type_statuses(&self) -> BTreeMap<TypeUrl, TypeStatus> {
        self.status()
            .map(|(type_url, status)| (type_url.clone(), status.clone()))
            .collect()
    }
}

impl Machine for SotwStream {
    type Request = DiscoveryRequest;
    type Response = SotwResponse;
    const PROTOCOL: Protocol = Protocol::Sotw;

    fn start(view: View, nonce_prefix: String, limits: Limits, quirks: Quirks) -> Self {
        SotwStream::new(view, nonce_prefix, limits).with_quirks(quirks)
    }

    fn view(&self) -> &View {
        SotwStream::view(self)
    }

    fn node(request: &DiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn on_repeat(&mut self, request: &DiscoveryRequest) -> Option<Step<SotwResponse>> {
        SotwStream::on_repeat(self, request)
    }

    fn on_request(
        &mut self,
        request: &DiscoveryRequest,
        snapshot: &Snapshot,
    ) -> Result<Step<SotwResponse>, ProtocolError> {
        SotwStream::on_request(self, request, snapshot)
    }

    fn on_snapshot(&mut self, snapshot: &Snapshot) -> Step<SotwResponse> {
        SotwStream::on_snapshot(self, snapshot)
    }

    fn status(&self) -> impl Iterator<Item = (&TypeUrl, &TypeStatus)> {
        SotwStream::status(self)
    }

    fn describe(response: &SotwResponse) -> Sent<'_> {
        Sent {
            type_url: &response.type_url,
            n_resources: response.resources.len(),
            version: response.version.as_str(),
            nonce: response.nonce.as_str(),
        }
    }
}

impl Machine for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaResponse;
    const PROTOCOL: Protocol = Protocol::Delta;

    fn start(view: View, nonce_prefix: String, limits: Limits, quirks: Quirks) -> Self {
        DeltaStream::new(view, nonce_prefix, limits).with_quirks(quirks)
    }

    fn view(&self) -> &View {
        DeltaStream::view(self)
    }

    fn node(request: &DeltaDiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    /// Every Delta request reads the snapshot: an ACK also compares the generation of its
    /// type with the one the stream last looked at.
    fn on_repeat(&mut self, _request: &DeltaDiscoveryRequest) -> Option<Step<DeltaResponse>> {
        None
    }

    fn on_request(
        &mut self,
        request: &DeltaDiscoveryRequest,
        snapshot: &Snapshot,
    ) -> Result<Step<DeltaResponse>, ProtocolError> {
        DeltaStream::on_request(self, request, snapshot)
    }

    fn on_snapshot(&mut self, snapshot: &Snapshot) -> Step<DeltaResponse> {
        DeltaStream::on_snapshot(self, snapshot)
    }

    fn status(&self) -> impl Iterator<Item = (&TypeUrl, &TypeStatus)> {
        DeltaStream::status(self)
    }

    fn describe(response: &DeltaResponse) -> Sent<'_> {
        Sent {
            type_url: &response.type_url,
            n_resources: response.resources.len(),
            version: response.system_version.as_str(),
            nonce: response.nonce.as_str(),
        }
    }
}

impl AdsServer {
    /// Admits a stream: its responses, then (when it fails) its status, come from the
    /// returned stream, which runs the stream's driver as it is polled.
    fn open<M: Machine>(
        &self,
        request: Request<Streaming<M::Request>>,
    ) -> Result<Driven<M::Response>, Status> {
        let (permit, stream_id) = self.admit()?;
        self.inner
            .closing
            .watch(&self.inner.shutdown, &self.inner.cache);
        let peer = request.remote_addr();
        let (metadata, extensions, requests) = request.into_parts();
        // Boxed: it is only needed until the first request is resolved to a view, and a
        // parameter of the stream's future would otherwise take its room for the stream's life.
        let context = Box::new(StreamContext {
            metadata,
            extensions,
            peer,
        });
        let mailbox = Mailbox::new();
        let span = info_span!(
            "ads_stream",
            stream.id = stream_id,
            protocol = M::PROTOCOL.as_str(),
            peer.addr = ?peer,
            node.id = Empty,
        );
        let inner = self.inner.clone();
        let out = mailbox.clone();
        let driver = async move {
            let _open = OpenStream::new(inner.clone(), M::PROTOCOL, permit);
            run::<M>(&inner, stream_id, context, requests, out, &span).await;
        };
        Ok(Driven {
            driver: Some(Box::pin(driver)),
            mailbox,
        })
    }
}

/// A stream's responses as a tonic response stream of generated messages (each built from
/// the shared response as tonic's encoder takes it).
fn response_stream<T: Send + 'static, M: Send + 'static>(
    driven: Driven<T>,
    to_message: fn(&T) -> M,
) -> Response<ResponseStream<M>> {
    Response::new(Box::pin(
        driven.map(move |item| item.map(|response| to_message(&response))),
    ))
}

/// The server's shutdown as its streams' loops see it: a flag read with one atomic load,
/// set, and every stream's cache interest woken, by one task that waits for the token for
/// the whole server. A loop that selected over the token itself took two locks shared by
/// every stream (the token's state and its `Notify`'s waiters) each time it was polled:
/// 3.4 % of the server's samples in a fan-out to 10,000 streams (docs/benchmarks.md).
#[derive(Default)]
struct Closing {
    closed: AtomicBool,
    watcher: OnceLock<()>,
}

impl Closing {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Starts the task that waits for `shutdown`, once per server, from its first stream
    /// (inside the runtime that serves it).
    fn watch(self: &Arc<Self>, shutdown: &CancellationToken, cache: &Cache) {
        self.watcher.get_or_init(|| {
            let (closing, shutdown, cache) = (self.clone(), shutdown.clone(), cache.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                closing.closed.store(true, Ordering::Release);
                // After the flag: a stream woken now, or registered later, reads it set.
                cache.wake_every_interest();
            });
        });
    }
}

/// Holds a stream's permit while its driver lives and tells the observer when it opens and
/// closes, however the driver ends (returned, or dropped with the stream when the client
/// went away).
struct OpenStream {
    inner: Arc<Inner>,
    protocol: Protocol,
    _permit: OwnedSemaphorePermit,
}

impl OpenStream {
    fn new(inner: Arc<Inner>, protocol: Protocol, permit: OwnedSemaphorePermit) -> Self {
        inner.observer.stream_opened(protocol);
        Self {
            inner,
            protocol,
            _permit: permit,
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.inner.observer.stream_closed(self.protocol);
    }
}

/// One response, or the status that ends the stream. Boxed, so the mailbox's slot is a word.
type Outbound<T> = Box<Result<T, Status>>;

/// Where a stream's driver leaves its next response, or its final status, for [`Driven`] to
/// take. One slot: the HTTP/2 stream's send buffer behind it is the real buffer, and changes
/// coalesce in the cache while the slot is full.
struct Mailbox<T>(Arc<Mutex<Option<Outbound<T>>>>);

impl<T> Clone for Mailbox<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Mailbox<T> {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(None)))
    }

    /// Leaves `item` once the slot is free.
    ///
    /// Waits without a waker: the only one who frees the slot is [`Driven::poll_next`],
    /// which polls the driver (and so this) again on its next call, right after.
    async fn put(&self, item: Result<T, Status>) {
        let mut item = Some(Box::new(item));
        poll_fn(|_| {
            let mut slot = self.0.lock();
            if slot.is_none() {
                *slot = item.take();
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    /// Leaves `item` unless the slot is taken (then drops it).
    fn try_put(&self, item: Result<T, Status>) {
        let mut slot = self.0.lock();
        if slot.is_none() {
            *slot = Some(Box::new(item));
        }
    }

    fn take(&self) -> Option<Outbound<T>> {
        self.0.lock().take()
    }
}

/// A stream's responses: polling it runs the stream's driver until the driver leaves a
/// response in the mailbox or ends. Dropping it (the client went away) drops the driver.
pub(crate) struct Driven<T> {
    /// `None` once the driver has returned.
    driver: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    mailbox: Mailbox<T>,
}

impl<T> Stream for Driven<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(item) = this.mailbox.take() {
            return Poll::Ready(Some(*item));
        }
        let Some(driver) = &mut this.driver else {
            return Poll::Ready(None);
        };
        if driver.as_mut().poll(cx).is_ready() {
            this.driver = None;
        }
        match this.mailbox.take() {
            Some(item) => Poll::Ready(Some(*item)),
            None if this.driver.is_none() => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

/// What the stream loop handles next. A request is boxed: a `DiscoveryRequest` is over 500
/// bytes, and whatever the loop holds across its awaits is part of every idle stream's task.
enum Input<Req> {
    Request(Box<Req>),
    Snapshot(Arc<Snapshot>),
}

/// Emits an event in the stream's span. The span is entered for an event that is enabled,
/// not around every poll of the driver: with 10,000 streams woken by one change, entering
/// and leaving it on each poll was 5.6 % of the server's samples in a profile (its removal
/// made no difference beyond the noise in alternating runs).
macro_rules! in_span {
    ($span:expr, $level:expr, $($event:tt)+) => {
        if tracing::enabled!($level) {
            let _entered = $span.enter();
            tracing::event!($level, $($event)+);
        }
    };
}

/// Drives one stream: the only code that awaits on its behalf.
async fn run<M: Machine>(
    inner: &Inner,
    stream_id: u64,
    context: Box<StreamContext>,
    mut requests: Streaming<M::Request>,
    out: Mailbox<M::Response>,
    span: &Span,
) {
    let first = tokio::select! {
        () = inner.shutdown.cancelled() => return,
        first = requests.message() => match first {
            Ok(Some(first)) => Box::new(first),
            Ok(None) => return,
            Err(error) => {
                in_span!(span, Level::DEBUG, %error, "stream failed before its first request");
                out.try_put(Err(request_error(error)));
                return;
            }
        },
    };
    // Only what the stream needs later is kept: the node's id and cluster, not the whole node
    // (its metadata can be large), and no request headers past the view decision.
    let (node_id, node_cluster) = M::node(&first)
        .map(|node| (node.id.clone(), node.cluster.clone()))
        .unwrap_or_default();
    let longest = node_id.len().max(node_cluster.len());
    if longest > crate::protocol::MAX_NODE_FIELD_BYTES {
        in_span!(
            span,
            Level::DEBUG,
            longest,
            "stream refused: node id or cluster too long"
        );
        out.put(Err(Status::invalid_argument(format!(
            "node.id or node.cluster is {longest} bytes, more than the {} allowed",
            crate::protocol::MAX_NODE_FIELD_BYTES
        ))))
        .await;
        return;
    }
    span.record("node.id", node_id.as_str());
    let view = match inner.resolver.view(M::node(&first), &context) {
        Ok(view) => view,
        Err(status) => {
            in_span!(span, Level::DEBUG, code = ?status.code(), "stream refused");
            out.put(Err(status)).await;
            return;
        }
    };
    let peer = context.peer;
    drop(context);
    let quirks = inner.resolver.quirks(M::node(&first));
    if quirks != Quirks::default() {
        in_span!(
            span,
            Level::DEBUG,
            ?quirks,
            "stream deviates from the protocol's general rules for this client"
        );
    }
    let partitions = view.partitions().iter().map(|p| p.to_string()).collect();
    let machine = M::start(view, format!("{stream_id:x}"), inner.config.limits, quirks);
    // Listed until the driver ends (the cell's drop removes it). The machine lives in the
    // cell, where readers of the registry find its status: a step copies nothing there.
    let cell = inner.registry.insert(
        StreamStatus {
            stream_id,
            node_id: node_id.clone(),
            node_cluster,
            partitions,
            peer,
            protocol: M::PROTOCOL,
            connected_since: SystemTime::now(),
            types: Default::default(),
        },
        machine,
    );
    // Registered for the resources the stream subscribes to, after each request that changes
    // them: a change to anything else does not wake the stream. The server's shutdown wakes
    // it too; the loop then finds `closing` set.
    let mut interest = inner.cache.interest();
    // Only for a hand-over that has to wait (the client reads no responses): one wait for
    // the stream's life, polled only then.
    let shutdown = inner.shutdown.cancelled();
    tokio::pin!(shutdown);
    let mut input = Input::Request(first);
    loop {
        // Before every step, after a wake-up (the shutdown's own) or a request alike: a client
        // that keeps sending does not hold the stream open.
        if inner.closing.is_closed() {
            return;
        }
        let stepped = {
            let mut machine = cell.machine();
            match input {
                // A repeated request (the usual ACK) reads no snapshot, so it touches none of
                // the cache's shared counters, and changes nothing to register.
                Input::Request(request) => match machine.on_repeat(&request) {
                    Some(step) => Ok((step, 0, None)),
                    None => {
                        let snapshot = inner.cache.snapshot();
                        let stepped = machine
                            .on_request(&request, &snapshot)
                            .map(|step| (step, snapshot.seq(), None));
                        interest.want(|| wanted(&*machine));
                        stepped
                    }
                },
                Input::Snapshot(snapshot) => Ok((
                    machine.on_snapshot(&snapshot),
                    snapshot.seq(),
                    Some(snapshot.published_at()),
                )),
            }
        };
        let (step, seq, changed_at) = match stepped {
            Ok(stepped) => stepped,
            Err(error) => {
                in_span!(span, Level::DEBUG, %error, "protocol violation");
                out.put(Err(Status::invalid_argument(error.to_string())))
                    .await;
                return;
            }
        };
        for notice in &step.notices {
            log_notice(notice, span);
            inner.observer.notice(notice);
        }
        for response in step.responses {
            let sent = M::describe(&response);
            in_span!(
                span,
                Level::DEBUG,
                type_url = sent.type_url.as_str(),
                version = sent.version,
                nonce = sent.nonce,
                n_resources = sent.n_resources,
                "send"
            );
            let type_url = sent.type_url;
            // Before the hand-over, while the response can still be borrowed: nothing is
            // copied for the observer.
            inner
                .observer
                .response_sent(type_url, sent.n_resources, seq);
            inner.observer.pushed(&Pushed {
                stream_id,
                node_id: &node_id,
                type_url,
                version: sent.version,
                nonce: sent.nonce,
                n_resources: sent.n_resources,
                snapshot_seq: seq,
                changed_at,
            });
            tokio::select! {
                biased;
                () = out.put(Ok(response)) => {}
                () = &mut shutdown => return,
            }
        }
        input = tokio::select! {
            biased;
            request = requests.message() => match request {
                Ok(Some(request)) => Input::Request(Box::new(request)),
                Ok(None) => return,
                Err(error) => {
                    in_span!(span, Level::DEBUG, %error, "stream ended by the client");
                    // When the stream is still up (a request that does not decode or is
                    // too large), tell the client why; a reset stream ignores this.
                    out.try_put(Err(request_error(error)));
                    return;
                }
            },
            () = interest.changed() => Input::Snapshot(inner.cache.snapshot()),
        };
    }
}

/// What a stream's machine subscribes to, as registrations: for each type, in each
/// partition of its view, every resource (`None`, a wildcard) or each subscribed name.
fn wanted<M: Machine>(
    machine: &M,
) -> impl Iterator<Item = (&Partition, &TypeUrl, Option<&ResourceName>)> {
    let partitions = machine.view().partitions();
    machine.status().flat_map(move |(type_url, status)| {
        let subscription = &status.subscription;
        let wildcard = subscription.is_wildcard();
        partitions.iter().flat_map(move |partition| {
            let all = wildcard.then_some(None);
            let names = (!wildcard)
                .then(|| subscription.names().iter().map(Some))
                .into_iter()
                .flatten();
            all.into_iter()
                .chain(names)
                .map(move |name| (partition, type_url, name))
        })
    })
}

/// The code a call should end with when tonic could not read its request, or `None` to keep
/// tonic's: a request that does not decode or is cut short in its gRPC framing is reported as
/// `INTERNAL` and one over the size limit as `OUT_OF_RANGE`, but both are the client's doing
/// (`INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED`). A compressed-flag without `grpc-encoding`
/// stays `INTERNAL`, as the gRPC compression spec requires.
pub fn request_error_code(code: tonic::Code, message: &str) -> Option<tonic::Code> {
    const MALFORMED: [&str; 4] = [
        "failed to decode Protobuf message",
        "Unexpected EOF decoding stream",
        "Missing request message",
        "protocol error: received message with invalid compression flag",
    ];
    match code {
        tonic::Code::Internal if MALFORMED.iter().any(|m| message.starts_with(m)) => {
            Some(tonic::Code::InvalidArgument)
        }
        tonic::Code::OutOfRange => Some(tonic::Code::ResourceExhausted),
        _ => None,
    }
}

/// The status a stream ends with when its next request could not be read (see
/// [`request_error_code`]).
pub(crate) fn request_error(error: Status) -> Status {
    match request_error_code(error.code(), error.message()) {
        Some(code) => Status::new(code, error.message().to_string()),
        None => error,
    }
}

fn log_notice(notice: &Notice, span: &Span) {
    match notice {
        Notice::Ack { type_url, version } => {
            in_span!(span, Level::DEBUG, %type_url, %version, "ack");
        }
        Notice::Nack { type_url, nack } => {
            in_span!(span, Level::WARN, %type_url, version = %nack.version, nonce = %nack.nonce, error = nack.message, "nack");
        }
        Notice::StaleNonce { type_url, nonce } => {
            in_span!(span, Level::DEBUG, %type_url, %nonce, "stale nonce");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoPartitions;

    impl ViewResolver for NoPartitions {
        fn view(&self, _: Option<&Node>, _: &StreamContext) -> Result<View, Status> {
            Ok(View::new([]))
        }
    }

    /// The sending end of a request body.
    type BodySender = futures::channel::mpsc::Sender<
        Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >;

    /// A request stream fed by the returned sender; it stays open while the sender lives.
    fn open_requests() -> (BodySender, Streaming<DiscoveryRequest>) {
        let (sender, body) = futures::channel::mpsc::channel(1);
        let requests = Streaming::<DiscoveryRequest>::new_request(
            tonic_prost::ProstDecoder::<DiscoveryRequest>::default(),
            http_body_util::StreamBody::new(body),
            None,
            None,
        );
        (sender, requests)
    }

    /// A request stream that ends at once.
    fn empty_requests() -> Streaming<DiscoveryRequest> {
        // Its sender dropped: the body ends before any request.
        open_requests().1
    }

    /// Every idle stream's HTTP/2 task holds the driver's whole future: what it keeps across its
    /// awaits is memory per stream. It was 3 KiB before requests and the context were boxed.
    #[test]
    fn the_stream_future_stays_small() {
        let (cache, _writer) = crate::cache::cache();
        let server = AdsServer::new(
            cache,
            Arc::new(NoPartitions),
            Registry::new(),
            ServerConfig::default(),
            CancellationToken::new(),
        );
        let requests = empty_requests();
        let context = Box::new(StreamContext {
            metadata: MetadataMap::new(),
            extensions: tonic::Extensions::new(),
            peer: None,
        });
        let span = Span::none();
        let sotw = run::<SotwStream>(&server.inner, 1, context, requests, Mailbox::new(), &span);
        let size = std::mem::size_of_val(&sotw);
        assert!(size <= 2048, "the SotW stream future grew to {size} bytes");
    }

    /// The mailbox holds one item; the response stream hands items out in order, then the
    /// driver's end.
    #[tokio::test]
    async fn a_driven_stream_yields_what_its_driver_puts_then_ends() {
        use futures::StreamExt;
        let mailbox = Mailbox::<u32>::new();
        let out = mailbox.clone();
        let driver = async move {
            for i in 0..3 {
                out.put(Ok(i)).await;
            }
            // Dropped: the slot still holds the last response.
            out.try_put(Ok(99));
            out.put(Err(Status::aborted("done"))).await;
        };
        let driven = Driven {
            driver: Some(Box::pin(driver)),
            mailbox,
        };
        let items: Vec<_> = driven.collect().await;
        let items: Vec<_> = items
            .into_iter()
            .map(|item| item.map_err(|status| status.code()))
            .collect();
        assert_eq!(
            items,
            [Ok(0), Ok(1), Ok(2), Err(tonic::Code::Aborted)],
            "in order, the dropped one left out, then the status"
        );
    }

    /// Shutdown ends a stream that waits in its loop, even one whose view holds nothing, so
    /// no change could ever wake it: the server wakes every stream's interest.
    #[tokio::test]
    async fn shutdown_ends_a_stream_that_no_change_would_wake() {
        use futures::{SinkExt, StreamExt};
        use prost::Message;
        let (cache, _writer) = crate::cache::cache();
        let shutdown = CancellationToken::new();
        let server = AdsServer::new(
            cache,
            Arc::new(NoPartitions),
            Registry::new(),
            ServerConfig::default(),
            shutdown.clone(),
        );
        let (mut sender, requests) = open_requests();
        let mut driven = server
            .open::<SotwStream>(Request::new(requests))
            .expect("admitted");
        let first = DiscoveryRequest {
            type_url: "t".into(),
            ..Default::default()
        };
        let mut frame = vec![0];
        frame.extend(u32::try_from(first.encoded_len()).unwrap().to_be_bytes());
        first.encode(&mut frame).unwrap();
        sender
            .send(Ok(http_body::Frame::data(frame.into())))
            .await
            .unwrap();
        let response = driven.next().await.expect("a first response");
        assert!(response.is_ok(), "{response:?}");
        // The driver now waits for a request or a wake-up; the client stays silent.
        assert!(futures::poll!(driven.next()).is_pending());

        shutdown.cancel();
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), driven.next()).await;
        assert!(matches!(end, Ok(None)), "the stream ends: {end:?}");
        drop(sender);
    }

    /// Dropping the response stream (the client went away) drops the driver with it: its
    /// permit is released and the observer hears the stream close.
    #[tokio::test]
    async fn dropping_the_stream_ends_its_driver() {
        #[derive(Default)]
        struct Counts(
            std::sync::atomic::AtomicUsize,
            std::sync::atomic::AtomicUsize,
        );
        impl StreamObserver for Counts {
            fn stream_opened(&self, _: Protocol) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
            fn stream_closed(&self, _: Protocol) {
                self.1.fetch_add(1, Ordering::SeqCst);
            }
        }
        use futures::StreamExt;
        let (cache, _writer) = crate::cache::cache();
        let counts = Arc::new(Counts::default());
        let server = AdsServer::new(
            cache,
            Arc::new(NoPartitions),
            Registry::new(),
            ServerConfig {
                max_streams: 1,
                ..ServerConfig::default()
            },
            CancellationToken::new(),
        )
        .with_observer(counts.clone());
        // A request body that never ends: the driver waits for the first request.
        let (_sender, requests) = open_requests();
        let mut driven = server
            .open::<SotwStream>(Request::new(requests))
            .expect("admitted");
        let polled = futures::poll!(driven.next());
        assert!(polled.is_pending(), "no request yet");
        assert_eq!(counts.0.load(Ordering::SeqCst), 1);
        let second = empty_requests();
        assert_eq!(
            server
                .open::<SotwStream>(Request::new(second))
                .err()
                .map(|status| status.code()),
            Some(tonic::Code::ResourceExhausted),
            "the first stream holds the only permit"
        );
        drop(driven);
        assert_eq!(counts.1.load(Ordering::SeqCst), 1, "closed once dropped");
        let third = empty_requests();
        assert!(
            server.open::<SotwStream>(Request::new(third)).is_ok(),
            "the permit came back"
        );
    }
}
