//! The bare tonic echo: what tonic and HTTP/2 cost on this machine, with no logic of ours.
//!
//! - The seed's `MetadataService` answers every `Get` from memory with a fixed payload, no
//!   store, no validation: the ceiling for `get`.
//! - The Aggregated Discovery Service (State of the World only) sends every stream the latest
//!   published value, as tonic does it out of the box: one `watch` channel, each stream a
//!   `WatchStream` of the latest `DiscoveryResponse`, cloned and encoded by tonic for each
//!   stream; requests (the ACKs) read by a task of the stream's own and dropped. No
//!   subscriptions, versions, nonces or ACK bookkeeping: the floor for `fanout`.

use std::{io::Write, net::SocketAddr, pin::Pin, sync::Arc};

use anyhow::Context;
use envoy_types::pb::{
    envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        aggregated_discovery_service_server::{
            AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
        },
    },
    google::protobuf::Any,
};
use futures::{Stream, StreamExt};
use tokio::{net::TcpListener, sync::watch};
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status, Streaming, transport::server::TcpIncoming};

use crate::pb::{
    self,
    metadata::{
        self as proto,
        metadata_service_server::{MetadataService, MetadataServiceServer},
    },
};

/// What the echo server prints on standard output once bound, before the address.
pub const LISTENING: &str = "echo listening on ";

/// How the echo serves its Aggregated Discovery Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ads {
    /// tonic's generated server, as every tonic service runs: hyper's task per stream.
    Tonic,
    /// `h2` directly, one task per connection driving all its streams (`h2ads.rs`);
    /// it answers `Publish` and the ADS, nothing else.
    H2,
}

/// Answers every `Get` with the same payload; a `Publish` becomes the response every ADS
/// stream is sent next.
#[derive(Debug, Clone)]
struct Echo {
    payload: String,
    latest: Arc<watch::Sender<Arc<DiscoveryResponse>>>,
}

/// The one response every stream is sent: `value` as the resource of the fan-out's type.
pub(super) fn response(version: u64, value: String) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.to_string(),
        nonce: version.to_string(),
        type_url: pb::METADATA_TYPE_URL.into(),
        resources: vec![Any {
            type_url: pb::METADATA_TYPE_URL.into(),
            value: value.into_bytes(),
        }],
        ..Default::default()
    }
}

#[tonic::async_trait]
impl MetadataService for Echo {
    async fn publish(
        &self,
        request: Request<proto::PublishMetadataRequest>,
    ) -> Result<Response<proto::PublishMetadataResponse>, Status> {
        let value = request.into_inner().metadata_info;
        self.latest.send_modify(|latest| {
            let version = latest.version_info.parse::<u64>().unwrap_or(0) + 1;
            *latest = Arc::new(response(version, value));
        });
        Ok(Response::new(proto::PublishMetadataResponse {}))
    }

    async fn get(
        &self,
        _request: Request<proto::GetMetadataRequest>,
    ) -> Result<Response<proto::GetMetadataResponse>, Status> {
        Ok(Response::new(proto::GetMetadataResponse {
            metadata_info: self.payload.clone(),
        }))
    }

    async fn list(
        &self,
        _request: Request<proto::ListMetadataRequest>,
    ) -> Result<Response<proto::ListMetadataResponse>, Status> {
        Err(Status::unimplemented(
            "the echo server only answers Get and Publish",
        ))
    }

    async fn delete(
        &self,
        _request: Request<proto::DeleteMetadataRequest>,
    ) -> Result<Response<proto::DeleteMetadataResponse>, Status> {
        Err(Status::unimplemented(
            "the echo server only answers Get and Publish",
        ))
    }

    type WatchStream = futures::stream::Empty<Result<proto::WatchMetadataResponse, Status>>;

    async fn watch(
        &self,
        _request: Request<proto::WatchMetadataRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented(
            "the echo server only answers Get and Publish",
        ))
    }
}

type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Echo {
    type StreamAggregatedResourcesStream = Responses<DiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut requests = request.into_inner();
        tokio::spawn(async move { while let Ok(Some(_)) = requests.message().await {} });
        let responses = WatchStream::new(self.latest.subscribe())
            .map(|latest| Ok(DiscoveryResponse::clone(&latest)));
        Ok(Response::new(Box::pin(responses)))
    }

    type DeltaAggregatedResourcesStream = Responses<DeltaDiscoveryResponse>;

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "the echo server's ADS speaks only the State of the World",
        ))
    }
}

/// Binds the echo's `addr` and prints [`LISTENING`] and the bound address.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{LISTENING}{}", listener.local_addr()?)?;
    stdout.flush()?;
    Ok(listener)
}

/// Serves the echo, its ADS through tonic, on `listener` until the process is killed.
pub async fn serve(listener: TcpListener, payload: String) -> anyhow::Result<()> {
    let (latest, _) = watch::channel(Arc::new(response(0, payload.clone())));
    let echo = Echo {
        payload,
        latest: Arc::new(latest),
    };
    tonic::transport::Server::builder()
        .add_service(MetadataServiceServer::new(echo.clone()))
        .add_service(AggregatedDiscoveryServiceServer::new(echo))
        // Like a tuned server: no Nagle delay on small responses.
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await
        .context("serving the echo")
}
