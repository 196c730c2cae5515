//! The bare tonic unary echo: the seed's `MetadataService` answered from memory with a fixed
//! payload, no store, no validation. What tonic and HTTP/2 cost on this machine, the ceiling
//! for `get`.

use std::net::SocketAddr;

use anyhow::Context;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

use crate::pb::metadata::{
    self as proto,
    metadata_service_server::{MetadataService, MetadataServiceServer},
};

/// What the echo server prints on standard output once bound, before the address.
pub const LISTENING: &str = "echo listening on ";

/// Answers every `Get` with the same payload and every `Publish` with an empty response.
#[derive(Debug, Clone)]
struct Echo {
    payload: String,
}

#[tonic::async_trait]
impl MetadataService for Echo {
    async fn publish(
        &self,
        _request: Request<proto::PublishMetadataRequest>,
    ) -> Result<Response<proto::PublishMetadataResponse>, Status> {
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

/// Serves the echo on `addr` until the process is killed, printing [`LISTENING`] and the
/// bound address first.
pub async fn serve(addr: SocketAddr, payload_bytes: usize) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{LISTENING}{}", listener.local_addr()?)?;
        stdout.flush()?;
    }
    let echo = Echo {
        payload: super::payload(payload_bytes, 0),
    };
    tonic::transport::Server::builder()
        .add_service(MetadataServiceServer::new(echo))
        // Like a tuned server: no Nagle delay on small responses.
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await
        .context("serving the echo")
}
