//! The fan-out's HTTP/2 floor: the echo's Aggregated Discovery Service served over `h2`
//! directly, as an event-loop server runs it (Envoy, gRPC-Go's writer per connection): one
//! task per connection accepts its streams and drives all of them, instead of hyper's task
//! per stream that tonic's server runs. A publish encodes the response once; the connection's
//! task hands the same bytes to each of its streams and reads every request (the ACKs),
//! decoding each in full and dropping it. No subscriptions, versions, nonces or status, like
//! the tonic echo's: what the `h2` crate alone costs per pushed response, the floor under
//! any server built on it (`bench echo-server --ads h2`).

use std::{pin::Pin, sync::Arc};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use futures::{Stream, StreamExt, stream::SelectAll};
use h2::{RecvStream, server::SendResponse};
use http::{HeaderMap, HeaderValue, Response};
use prost::Message;
use tokio::{net::TcpListener, sync::watch};

use super::{echo, h2streams};
use crate::pb::metadata as proto;

const ADS: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const PUBLISH: &str = "/pixiu.pkg.metadata.MetadataService/Publish";

/// The latest response as a gRPC frame, and its version.
#[derive(Debug, Clone)]
struct Latest {
    version: u64,
    frame: Bytes,
}

impl Latest {
    fn new(version: u64, value: String) -> Self {
        Self {
            version,
            frame: h2streams::frame(&echo::response(version, value)),
        }
    }
}

/// Serves on `listener` until the process is killed: every connection a task of its own.
pub async fn serve(listener: TcpListener, payload: String) -> anyhow::Result<()> {
    let (latest, _) = watch::channel(Latest::new(0, payload));
    let latest = Arc::new(latest);
    loop {
        let (socket, _) = listener.accept().await.context("accepting")?;
        socket.set_nodelay(true)?;
        let latest = latest.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(socket, latest).await {
                tracing::debug!(error = %e, "h2 ADS connection ended");
            }
        });
    }
}

type Requests = Pin<Box<dyn Stream<Item = ()> + Send>>;

/// Drives one connection: accepts its streams, pushes each new response to every ADS stream
/// of it, reads their requests.
async fn connection(
    socket: tokio::net::TcpStream,
    publisher: Arc<watch::Sender<Latest>>,
) -> anyhow::Result<()> {
    let mut conn = h2::server::Builder::new()
        // hyper's server windows, as tonic's server has them.
        .initial_window_size(1024 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .handshake::<_, Bytes>(socket)
        .await?;
    let mut latest = publisher.subscribe();
    let mut streams = Vec::new();
    let mut requests: SelectAll<Requests> = SelectAll::new();
    loop {
        tokio::select! {
            accepted = conn.accept() => {
                let Some(accepted) = accepted else { return Ok(()) };
                let (request, mut respond) = accepted?;
                let (parts, body) = request.into_parts();
                match parts.uri.path() {
                    ADS => {
                        let mut send = respond.send_response(grpc_response(), false)?;
                        send.send_data(latest.borrow_and_update().frame.clone(), false)?;
                        streams.push(send);
                        requests.push(Box::pin(ads_requests(body)));
                    }
                    PUBLISH => {
                        tokio::spawn(publish(body, respond, publisher.clone()));
                    }
                    _ => {
                        let mut response = grpc_response();
                        response.headers_mut().insert("grpc-status", HeaderValue::from_static("12"));
                        respond.send_response(response, true)?;
                    }
                }
            }
            changed = latest.changed() => {
                changed?;
                let frame = latest.borrow_and_update().frame.clone();
                streams.retain_mut(|send| send.send_data(frame.clone(), false).is_ok());
            }
            Some(()) = requests.next(), if !requests.is_empty() => {}
        }
    }
}

fn grpc_response() -> Response<()> {
    let mut response = Response::new(());
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    response
}

/// Reads a stream's requests, each decoded in full; one item per chunk of its body.
fn ads_requests(body: RecvStream) -> impl Stream<Item = ()> + Send {
    futures::stream::unfold(
        (body, BytesMut::new(), Vec::new()),
        |(mut body, mut partial, mut messages)| async move {
            let chunk = h2streams::next_chunk(&mut body).await?.ok()?;
            h2streams::split_messages(&mut partial, chunk, &mut messages).ok()?;
            for message in messages.drain(..) {
                DiscoveryRequest::decode(message).ok()?;
            }
            Some(((), (body, partial, messages)))
        },
    )
}

/// A unary `Publish`: the value becomes the next response of every ADS stream.
async fn publish(
    mut body: RecvStream,
    mut respond: SendResponse<Bytes>,
    publisher: Arc<watch::Sender<Latest>>,
) -> anyhow::Result<()> {
    let (mut partial, mut messages) = (BytesMut::new(), Vec::new());
    while let Some(chunk) = h2streams::next_chunk(&mut body).await {
        h2streams::split_messages(&mut partial, chunk?, &mut messages)?;
    }
    let request = proto::PublishMetadataRequest::decode(
        messages.pop().context("a Publish without a message")?,
    )?;
    let value = request.metadata_info;
    publisher.send_modify(|latest| *latest = Latest::new(latest.version + 1, value));
    let mut send = respond.send_response(grpc_response(), false)?;
    send.send_data(h2streams::frame(&proto::PublishMetadataResponse {}), false)?;
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    send.send_trailers(trailers)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;

    use super::*;

    #[test]
    fn the_response_frame_decodes_as_the_echo_s_response() {
        let latest = Latest::new(3, "value".into());
        let message = latest.frame.slice(5..);
        assert_eq!(
            DiscoveryResponse::decode(message).unwrap(),
            echo::response(3, "value".into())
        );
    }
}
