//! The tonic service routing the two ADS methods to [`AdsServer`], with lean codec buffers.
//!
//! tonic's generated server gives every stream an 8 KiB decode buffer and an 8 KiB encode
//! buffer, held for the stream's life. An idle xDS stream reads ACKs of a few hundred bytes and
//! writes a response now and then, so those 16 KiB were most of what an idle stream cost. This
//! service is the generated one with smaller initial buffers ([`DECODE_BUFFER`],
//! [`ENCODE_BUFFER`]); both still grow to whatever a message needs.

use std::{
    convert::Infallible,
    marker::PhantomData,
    task::{Context, Poll},
};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tonic::{
    Request, Response, Status, Streaming,
    body::Body as TonicBody,
    codec::{BufferSettings, Codec},
    codegen::{Body, BoxFuture, Service, StdError, http},
    server::{Grpc, NamedService, StreamingService},
};
use tonic_prost::{ProstDecoder, ProstEncoder};

use super::{AdsServer, Machine, ResponseStream};
use crate::{delta::DeltaStream, sotw::SotwStream};

/// Initial decode buffer of a stream: an ACK fits; larger requests grow it.
const DECODE_BUFFER: usize = 256;
/// Initial encode buffer of a stream: a small response fits; larger ones grow it.
const ENCODE_BUFFER: usize = 2048;
/// tonic's default: how much encoded data a stream writes before yielding.
const YIELD_THRESHOLD: usize = 32 * 1024;

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
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let server = self.server.clone();
        match request.uri().path() {
            SOTW_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(LeanCodec::<DiscoveryResponse, DiscoveryRequest>::new());
                Ok(grpc
                    .streaming(Open::<SotwStream>(server, PhantomData), request)
                    .await)
            }),
            DELTA_PATH => Box::pin(async move {
                let mut grpc =
                    Grpc::new(LeanCodec::<DeltaDiscoveryResponse, DeltaDiscoveryRequest>::new());
                Ok(grpc
                    .streaming(Open::<DeltaStream>(server, PhantomData), request)
                    .await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("").into_http()) }),
        }
    }
}

/// One ADS method: opens a stream of the state machine `M`.
struct Open<M>(AdsServer, PhantomData<fn() -> M>);

impl<M: Machine> StreamingService<M::Request> for Open<M> {
    type Response = M::Response;
    type ResponseStream = ResponseStream<M::Response>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<M::Request>>) -> Self::Future {
        let result = self.0.open::<M>(request);
        Box::pin(async move { result })
    }
}

/// tonic's prost codec with [`DECODE_BUFFER`] and [`ENCODE_BUFFER`] as initial buffers.
struct LeanCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> LeanCodec<T, U> {
    fn new() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(DECODE_BUFFER, YIELD_THRESHOLD))
    }
}
