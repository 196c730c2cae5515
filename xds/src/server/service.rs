//! The tonic service routing the two ADS methods to [`AdsServer`], with lean per-stream buffers.
//!
//! tonic's generated server gives every stream an 8 KiB decode buffer and an 8 KiB encode
//! buffer, held for the stream's life. An idle xDS stream reads ACKs of a few hundred bytes and
//! writes a response now and then, so those 16 KiB were most of what an idle stream cost. Here
//! requests are decoded by tonic's prost decoder with a [`DECODE_BUFFER`] that grows to what a
//! message needs, and responses are framed one by one into buffers of their exact size
//! ([`Encode`]), so an idle stream holds no encode buffer.

use std::{
    convert::Infallible,
    future::{Ready, ready},
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;
use http_body::Frame;
use tonic::{
    Request, Status, Streaming,
    body::Body as TonicBody,
    codec::BufferSettings,
    codegen::{Body, Service, StdError, http, http::HeaderMap},
    metadata::MetadataValue,
    server::NamedService,
};
use tonic_prost::ProstDecoder;

use super::{AdsServer, Driven, Machine};
use crate::{delta::DeltaStream, sotw::SotwStream};

/// Initial decode buffer of a stream: an ACK fits; larger requests grow it.
const DECODE_BUFFER: usize = 256;
/// tonic's default: how much a decoder buffers before yielding (unused by a server's decoder).
const YIELD_THRESHOLD: usize = 32 * 1024;
/// A gRPC message's prefix: the compressed flag and the length.
const HEADER_SIZE: usize = 5;
const GRPC_CONTENT_TYPE: http::HeaderValue = http::HeaderValue::from_static("application/grpc");
const ENCODING_HEADER: &str = "grpc-encoding";
const ACCEPT_ENCODING_HEADER: &str = "grpc-accept-encoding";

const SERVICE_NAME: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// The Aggregated Discovery Service as a tonic service, for a router's `add_service`. Made by
/// [`AdsServer::into_service`].
#[derive(Debug, Clone)]
pub struct AdsService {
    server: AdsServer,
}

impl AdsService {
    pub(super) fn new(server: AdsServer) -> Self {
        Self { server }
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for AdsService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<TonicBody>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = match request.uri().path() {
            SOTW_PATH => open::<SotwStream, B>(&self.server, request),
            DELTA_PATH => open::<DeltaStream, B>(&self.server, request),
            _ => Status::unimplemented("").into_http(),
        };
        ready(Ok(response))
    }
}

/// Opens one stream of the state machine `M`: the request body decoded by tonic's prost
/// decoder, the responses encoded by [`Encode`].
fn open<M: Machine, B>(server: &AdsServer, request: http::Request<B>) -> http::Response<TonicBody>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    // No compression is offered: a compressed request is refused as tonic refuses it.
    if let Some(encoding) = request.headers().get(ENCODING_HEADER)
        && encoding != "identity"
    {
        let mut status = Status::unimplemented(format!(
            "Content is compressed with `{}` which isn't supported",
            String::from_utf8_lossy(encoding.as_bytes())
        ));
        status.metadata_mut().insert(
            ACCEPT_ENCODING_HEADER,
            MetadataValue::from_static("identity"),
        );
        return status.into_http();
    }
    let decoder =
        ProstDecoder::<M::Request>::new(BufferSettings::new(DECODE_BUFFER, YIELD_THRESHOLD));
    let request =
        Request::from_http(request.map(|body| Streaming::new_request(decoder, body, None, None)));
    match server.open::<M>(request) {
        Ok(outbound) => {
            let mut response = http::Response::new(TonicBody::new(Encode {
                outbound: Some(outbound),
            }));
            response
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
            response
        }
        Err(status) => status.into_http(),
    }
}

/// A stream's response body: each message of the driven stream framed on its own, in a
/// buffer of exactly its size, then the status as trailers.
///
/// tonic's encoder keeps a buffer for the stream's life (the unused part of its last
/// allocation); this one keeps nothing between messages, so an idle stream holds no encode
/// buffer at all.
struct Encode<T> {
    /// `None` once the trailers are sent.
    outbound: Option<Driven<T>>,
}

impl<T: crate::response::Encode> Body for Encode<T> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let Some(outbound) = &mut this.outbound else {
            return Poll::Ready(None);
        };
        let status = match ready!(Pin::new(outbound).poll_next(cx)) {
            Some(item) => match item {
                Ok(message) => match frame(&message) {
                    Ok(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Err(status) => status,
                },
                Err(status) => status,
            },
            // The driver ended the stream without an error.
            None => Status::ok(""),
        };
        this.outbound = None;
        let mut trailers = HeaderMap::with_capacity(3);
        if let Err(unsendable) = status.add_header(&mut trailers) {
            trailers.clear();
            let _ = unsendable.add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.outbound.is_none()
    }
}

/// One gRPC length-prefixed message: the uncompressed flag, the length, the bytes.
fn frame(message: &impl crate::response::Encode) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    let prefix = u32::try_from(len)
        .map_err(|_| Status::resource_exhausted(format!("response of {len} bytes")))?;
    let mut buf = BytesMut::with_capacity(HEADER_SIZE + len);
    buf.put_u8(0);
    buf.put_u32(prefix);
    message.encode(&mut buf);
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use envoy_types::pb::envoy::{
        config::core::v3::Node, service::discovery::v3::DiscoveryResponse,
    };
    use http_body_util::BodyExt;
    use prost::Message;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::{Registry, ServerConfig, SotwResponse, StreamContext, View, ViewResolver};

    struct NoPartitions;

    impl ViewResolver for NoPartitions {
        fn view(&self, _: Option<&Node>, _: &StreamContext) -> Result<View, Status> {
            Ok(View::new([]))
        }
    }

    fn service() -> AdsService {
        let (cache, _writer) = crate::cache::cache();
        AdsServer::new(
            cache,
            Arc::new(NoPartitions),
            Registry::new(),
            ServerConfig::default(),
            CancellationToken::new(),
        )
        .into_service()
    }

    fn sotw_response(version: &str, type_url: &str, nonce: &str) -> SotwResponse {
        SotwResponse {
            version: version.into(),
            resources: Vec::new(),
            type_url: type_url.into(),
            nonce: nonce.into(),
        }
    }

    fn grpc_status(headers: &HeaderMap) -> Option<&str> {
        headers.get("grpc-status").and_then(|v| v.to_str().ok())
    }

    #[test]
    fn a_frame_is_the_prefix_then_the_message() {
        let response = sotw_response("v1", "type.test/T", "n");
        let data = frame(&response).unwrap();
        assert_eq!(data[0], 0, "not compressed");
        let len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, data.len() - HEADER_SIZE);
        assert_eq!(
            DiscoveryResponse::decode(&data[5..]).unwrap(),
            response.to_message()
        );
    }

    #[tokio::test]
    async fn a_compressed_request_is_unimplemented() {
        let request = http::Request::builder()
            .uri(SOTW_PATH)
            .header(ENCODING_HEADER, "gzip")
            .body(TonicBody::empty())
            .unwrap();
        let response = service().call(request).await.unwrap();
        assert_eq!(grpc_status(response.headers()), Some("12"));
        assert_eq!(
            response.headers().get(ACCEPT_ENCODING_HEADER).unwrap(),
            "identity"
        );
    }

    #[tokio::test]
    async fn an_unknown_method_is_unimplemented() {
        let request = http::Request::builder()
            .uri("/envoy.service.discovery.v3.AggregatedDiscoveryService/Other")
            .body(TonicBody::empty())
            .unwrap();
        let response = service().call(request).await.unwrap();
        assert_eq!(grpc_status(response.headers()), Some("12"));
    }

    /// A client that half-closes without a request: the body ends with an OK status in its
    /// trailers, after no data.
    #[tokio::test]
    async fn a_stream_ends_with_its_status_as_trailers() {
        let request = http::Request::builder()
            .uri(DELTA_PATH)
            .body(TonicBody::empty())
            .unwrap();
        let response = service().call(request).await.unwrap();
        assert_eq!(
            response.headers().get(http::header::CONTENT_TYPE).unwrap(),
            "application/grpc"
        );
        let mut body = response.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        let trailers = frame.into_trailers().expect("trailers, no data");
        assert_eq!(grpc_status(&trailers), Some("0"));
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }

    /// The status a driver sends ends the body as trailers.
    #[tokio::test]
    async fn a_failed_stream_sends_its_status() {
        let mailbox = super::super::Mailbox::new();
        let out = mailbox.clone();
        let driver = async move {
            out.put(Ok(sotw_response("", "", ""))).await;
            out.put(Err(Status::invalid_argument("bad nonce"))).await;
        };
        let mut body = Encode {
            outbound: Some(Driven {
                driver: Some(Box::pin(driver)),
                mailbox,
            }),
        };
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&data[..], &[0, 0, 0, 0, 0]);
        let trailers = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(grpc_status(&trailers), Some("3"));
        assert_eq!(trailers.get("grpc-message").unwrap(), "bad%20nonce");
        assert!(body.frame().await.is_none());
    }
}
