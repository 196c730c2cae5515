//! The tonic ADS service: one task per stream driving a protocol state machine.
//!
//! This is the only module of the crate that awaits or touches the transport. Each stream
//! task selects over three inputs (a client request, a newer cache snapshot, shutdown),
//! feeds the state machine and writes its responses to a small bounded channel. While the
//! client is slow the task waits on that channel; cache changes meanwhile coalesce in the
//! snapshot watch, so a slow stream costs one snapshot reference, never a queue.
//!
//! State of the World and Incremental streams share that driver: both state machines
//! implement one private trait (`Machine`), and only the message types differ.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    },
};
use futures::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming, metadata::MetadataMap};
use tracing::{Instrument, debug, field::Empty, info_span, warn};

mod service;

pub use service::AdsService;

use crate::{
    cache::{Cache, Snapshot, View},
    delta::DeltaStream,
    protocol::{Limits, ProtocolError, Quirks, Step},
    registry::Registry,
    sotw::SotwStream,
    status::{Notice, Protocol, StreamStatus, TypeStatus},
    types::TypeUrl,
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
    /// A response was written to the stream's outbound channel.
    fn response_sent(&self, _type_url: &str, _n_resources: usize, _snapshot_seq: u64) {}
    /// The state machine noticed an ACK, NACK or stale nonce.
    fn notice(&self, _notice: &Notice) {}
    /// A response was written to the stream's outbound channel (called after
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
    pub type_url: &'a str,
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
    /// stream bodies, so this permit is held by the stream task itself.
    pub max_streams: usize,
    /// Responses buffered per stream before the stream task waits for the client
    /// (default 2). Small on purpose: pending changes coalesce in the cache instead.
    pub outbound_buffer: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_streams: 100_000,
            outbound_buffer: 2,
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
        self.open::<SotwStream>(request).map(response_stream)
    }

    /// Serves one Incremental stream. Any discovery service whose delta method carries
    /// `DeltaDiscoveryRequest` / `DeltaDiscoveryResponse` (ADS, and per-type services such
    /// as ECDS's `DeltaExtensionConfigs`) can delegate its method to this.
    pub fn serve_delta(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream<DeltaDiscoveryResponse>>, Status> {
        self.open::<DeltaStream>(request).map(response_stream)
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
    type Response: prost::Message + Send + 'static;
    const PROTOCOL: Protocol;

    fn start(view: View, nonce_prefix: String, limits: Limits, quirks: Quirks) -> Self;
    fn node(request: &Self::Request) -> Option<&Node>;
    fn on_request(
        &mut self,
        request: &Self::Request,
        snapshot: &Snapshot,
    ) -> Result<Step<Self::Response>, ProtocolError>;
    fn on_snapshot(&mut self, snapshot: &Snapshot) -> Step<Self::Response>;
    fn status(&self) -> impl Iterator<Item = (&TypeUrl, &TypeStatus)>;
    fn describe(response: &Self::Response) -> Sent<'_>;
}

/// A response as logs and the observer see it.
struct Sent<'a> {
    type_url: &'a str,
    /// Resources carried (Delta: changed ones, not `removed_resources`).
    n_resources: usize,
    /// SotW `version_info`, Delta `system_version_info`.
    version: &'a str,
    nonce: &'a str,
}

impl Machine for SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const PROTOCOL: Protocol = Protocol::Sotw;

    fn start(view: View, nonce_prefix: String, limits: Limits, quirks: Quirks) -> Self {
        SotwStream::new(view, nonce_prefix, limits).with_quirks(quirks)
    }

    fn node(request: &DiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn on_request(
        &mut self,
        request: &DiscoveryRequest,
        snapshot: &Snapshot,
    ) -> Result<Step<DiscoveryResponse>, ProtocolError> {
        SotwStream::on_request(self, request, snapshot)
    }

    fn on_snapshot(&mut self, snapshot: &Snapshot) -> Step<DiscoveryResponse> {
        SotwStream::on_snapshot(self, snapshot)
    }

    fn status(&self) -> impl Iterator<Item = (&TypeUrl, &TypeStatus)> {
        SotwStream::status(self)
    }

    fn describe(response: &DiscoveryResponse) -> Sent<'_> {
        Sent {
            type_url: &response.type_url,
            n_resources: response.resources.len(),
            version: &response.version_info,
            nonce: &response.nonce,
        }
    }
}

impl Machine for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const PROTOCOL: Protocol = Protocol::Delta;

    fn start(view: View, nonce_prefix: String, limits: Limits, quirks: Quirks) -> Self {
        DeltaStream::new(view, nonce_prefix, limits).with_quirks(quirks)
    }

    fn node(request: &DeltaDiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn on_request(
        &mut self,
        request: &DeltaDiscoveryRequest,
        snapshot: &Snapshot,
    ) -> Result<Step<DeltaDiscoveryResponse>, ProtocolError> {
        DeltaStream::on_request(self, request, snapshot)
    }

    fn on_snapshot(&mut self, snapshot: &Snapshot) -> Step<DeltaDiscoveryResponse> {
        DeltaStream::on_snapshot(self, snapshot)
    }

    fn status(&self) -> impl Iterator<Item = (&TypeUrl, &TypeStatus)> {
        DeltaStream::status(self)
    }

    fn describe(response: &DeltaDiscoveryResponse) -> Sent<'_> {
        Sent {
            type_url: &response.type_url,
            n_resources: response.resources.len(),
            version: &response.system_version_info,
            nonce: &response.nonce,
        }
    }
}

impl AdsServer {
    /// Admits a stream and spawns its driver task; the receiver yields the stream's responses
    /// and then, when the stream fails, its status.
    fn open<M: Machine>(
        &self,
        request: Request<Streaming<M::Request>>,
    ) -> Result<mpsc::Receiver<Outbound<M::Response>>, Status> {
        let (permit, stream_id) = self.admit()?;
        let peer = request.remote_addr();
        let (metadata, extensions, requests) = request.into_parts();
        // Boxed: it is only needed until the first request is resolved to a view, and a
        // parameter of the stream's future would otherwise take its room for the stream's life.
        let context = Box::new(StreamContext {
            metadata,
            extensions,
            peer,
        });
        // Boxed items: tokio allocates a channel's slots 32 at a time, so an unboxed response
        // (with its `Status` alternative, about 200 bytes) would cost every idle stream 6 KiB.
        let (tx, rx) = mpsc::channel(self.inner.config.outbound_buffer.max(1));
        let span = info_span!(
            "ads_stream",
            stream.id = stream_id,
            protocol = M::PROTOCOL.as_str(),
            peer.addr = ?peer,
            node.id = Empty,
        );
        let inner = self.inner.clone();
        tokio::spawn(
            async move {
                inner.observer.stream_opened(M::PROTOCOL);
                run::<M>(&inner, stream_id, context, requests, tx).await;
                inner.observer.stream_closed(M::PROTOCOL);
                drop(permit);
            }
            .instrument(span),
        );
        Ok(rx)
    }
}

/// The outbound channel of a stream as a tonic response stream.
fn response_stream<T: Send + 'static>(
    outbound: mpsc::Receiver<Outbound<T>>,
) -> Response<ResponseStream<T>> {
    Response::new(Box::pin(
        ReceiverStream::new(outbound).map(|item: Outbound<T>| *item),
    ))
}

/// One item of a stream's outbound channel.
type Outbound<T> = Box<Result<T, Status>>;

/// What the stream loop handles next. A request is boxed: a `DiscoveryRequest` is over 500
/// bytes, and whatever the loop holds across its awaits is part of every idle stream's task.
enum Input<Req> {
    Request(Box<Req>),
    Snapshot(Arc<Snapshot>),
}

/// Drives one stream: the only code that awaits on its behalf.
async fn run<M: Machine>(
    inner: &Inner,
    stream_id: u64,
    context: Box<StreamContext>,
    mut requests: Streaming<M::Request>,
    tx: mpsc::Sender<Outbound<M::Response>>,
) {
    let first = tokio::select! {
        () = inner.shutdown.cancelled() => return,
        first = requests.message() => match first {
            Ok(Some(first)) => Box::new(first),
            Ok(None) => return,
            Err(error) => {
                debug!(%error, "stream failed before its first request");
                let _ = tx.try_send(Box::new(Err(request_error(error))));
                return;
            }
        },
    };
    // Only what the stream needs later is kept: the node's id and cluster, not the whole node
    // (its metadata can be large), and no request headers past the view decision.
    let (node_id, node_cluster) = M::node(&first)
        .map(|node| (node.id.clone(), node.cluster.clone()))
        .unwrap_or_default();
    tracing::Span::current().record("node.id", node_id.as_str());
    let view = match inner.resolver.view(M::node(&first), &context) {
        Ok(view) => view,
        Err(status) => {
            debug!(code = ?status.code(), "stream refused");
            let _ = tx.send(Box::new(Err(status))).await;
            return;
        }
    };
    let peer = context.peer;
    drop(context);
    // Listed until this task ends (the cell's drop removes it).
    let cell = inner.registry.insert(StreamStatus {
        stream_id,
        node_id: node_id.clone(),
        node_cluster,
        partitions: view.partitions().iter().map(|p| p.to_string()).collect(),
        peer,
        protocol: M::PROTOCOL,
        connected_since: SystemTime::now(),
        types: Default::default(),
    });
    let quirks = inner.resolver.quirks(M::node(&first));
    if quirks != Quirks::default() {
        debug!(
            ?quirks,
            "stream deviates from the protocol's general rules for this client"
        );
    }
    let mut machine = M::start(view, format!("{stream_id:x}"), inner.config.limits, quirks);
    // Subscribe before reading the snapshot, so no change slips between the two.
    let mut changes = inner.cache.changes();
    let mut input = Input::Request(first);
    loop {
        let (step, seq, changed_at) = match input {
            Input::Request(request) => {
                let snapshot = inner.cache.snapshot();
                match machine.on_request(&request, &snapshot) {
                    Ok(step) => (step, snapshot.seq(), None),
                    Err(error) => {
                        debug!(%error, "protocol violation");
                        let _ = tx
                            .send(Box::new(Err(Status::invalid_argument(error.to_string()))))
                            .await;
                        return;
                    }
                }
            }
            Input::Snapshot(snapshot) => (
                machine.on_snapshot(&snapshot),
                snapshot.seq(),
                Some(snapshot.published_at()),
            ),
        };
        for notice in &step.notices {
            log_notice(notice);
            inner.observer.notice(notice);
        }
        // A snapshot that changed nothing this stream holds leaves its status as it was.
        if !(changed_at.is_some() && step.responses.is_empty() && step.notices.is_empty()) {
            cell.sync_types(machine.status());
        }
        for response in step.responses {
            let sent = M::describe(&response);
            let (type_url, n_resources) = (sent.type_url.to_owned(), sent.n_resources);
            let (version, nonce) = (sent.version.to_owned(), sent.nonce.to_owned());
            debug!(
                type_url,
                version = sent.version,
                nonce = sent.nonce,
                n_resources,
                "send"
            );
            tokio::select! {
                () = inner.shutdown.cancelled() => return,
                sent = tx.send(Box::new(Ok(response))) => if sent.is_err() { return },
            }
            inner.observer.response_sent(&type_url, n_resources, seq);
            inner.observer.pushed(&Pushed {
                stream_id,
                node_id: &node_id,
                type_url: &type_url,
                version: &version,
                nonce: &nonce,
                n_resources,
                snapshot_seq: seq,
                changed_at,
            });
        }
        input = tokio::select! {
            biased;
            () = inner.shutdown.cancelled() => return,
            request = requests.message() => match request {
                Ok(Some(request)) => Input::Request(Box::new(request)),
                Ok(None) => return,
                Err(error) => {
                    debug!(%error, "stream ended by the client");
                    // When the stream is still up (a request that does not decode or is
                    // too large), tell the client why; a reset stream ignores this.
                    let _ = tx.try_send(Box::new(Err(request_error(error))));
                    return;
                }
            },
            snapshot = changes.next() => match snapshot {
                Some(snapshot) => Input::Snapshot(snapshot),
                None => return,
            },
        };
    }
}

/// The status a stream ends with when its next request could not be read: tonic reports a
/// request that does not decode as `INTERNAL` and one over the size limit as `OUT_OF_RANGE`;
/// both are the client's doing.
fn request_error(error: Status) -> Status {
    match error.code() {
        tonic::Code::Internal if error.message().starts_with("failed to decode") => {
            Status::invalid_argument(error.message().to_string())
        }
        tonic::Code::OutOfRange => Status::resource_exhausted(error.message().to_string()),
        _ => error,
    }
}

fn log_notice(notice: &Notice) {
    match notice {
        Notice::Ack { type_url, version } => {
            debug!(%type_url, %version, "ack");
        }
        Notice::Nack { type_url, nack } => {
            warn!(%type_url, version = %nack.version, nonce = %nack.nonce, error = nack.message, "nack");
        }
        Notice::StaleNonce { type_url, nonce } => {
            debug!(%type_url, %nonce, "stale nonce");
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

    /// Every idle stream's task holds its whole future: what the driver keeps across its
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
        let requests = Streaming::<DiscoveryRequest>::new_request(
            tonic_prost::ProstDecoder::<DiscoveryRequest>::default(),
            tonic::body::Body::empty(),
            None,
            None,
        );
        let (tx, _rx) = mpsc::channel(2);
        let context = Box::new(StreamContext {
            metadata: MetadataMap::new(),
            extensions: tonic::Extensions::new(),
            peer: None,
        });
        let sotw = run::<SotwStream>(&server.inner, 1, context, requests, tx);
        let size = std::mem::size_of_val(&sotw);
        assert!(size <= 2048, "the SotW stream future grew to {size} bytes");
    }
}
