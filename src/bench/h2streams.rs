//! The generator's gRPC client, spoken directly over `h2`: unary calls, and the fan-out's
//! subscribers as an event-loop client runs them, every stream of a connection driven by
//! that connection's one task. Each message is decoded in full and answered as its protocol
//! says (an ADS ACK); what is saved against tonic's client is its machinery per call and per
//! stream (a buffer task in front of each connection, a task piping a request channel into
//! each stream, a task reading each stream's responses), which on two cores shared with the
//! servers weighed on every server alike.

use std::pin::Pin;

use anyhow::{Context, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt, stream::SelectAll};
use h2::{RecvStream, SendStream, client::SendRequest};
use http::{Method, Request, Uri, uri::PathAndQuery};
use tokio::{net::TcpStream, task::JoinHandle};

/// The client's side of a gRPC stream's conversation.
pub trait Protocol: Send + 'static {
    /// The method's path (`/package.Service/Method`).
    const PATH: &'static str;
    /// The stream's first request (a [`frame`]).
    fn first(&self) -> Bytes;
    /// The server's first message: the reply to send, or why the stream is unusable.
    fn on_first(&mut self, message: Bytes) -> anyhow::Result<Option<Bytes>>;
    /// What a later message from the server did to this stream.
    fn on_message(&mut self, message: Bytes) -> anyhow::Result<Step>;
}

/// What a message from the server did to a stream.
#[derive(Debug, Default)]
pub struct Step {
    /// It carried an update: a delivery to report.
    pub delivered: bool,
    /// The message to send back (encoded), if any.
    pub reply: Option<Bytes>,
}

/// A message as a gRPC frame: not compressed, its length, the message.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut out = BytesMut::with_capacity(5 + len);
    out.put_u8(0);
    out.put_u32(u32::try_from(len).expect("a bench message is small"));
    message
        .encode(&mut out)
        .expect("the buffer has the message's length");
    out.freeze()
}

/// Takes every whole gRPC message out of `data` into `out`, and keeps the rest in `partial`.
pub(super) fn split_messages(
    partial: &mut BytesMut,
    chunk: Bytes,
    out: &mut Vec<Bytes>,
) -> anyhow::Result<()> {
    let mut data = if partial.is_empty() {
        chunk
    } else {
        partial.extend_from_slice(&chunk);
        partial.split().freeze()
    };
    while data.len() >= 5 {
        if data[0] != 0 {
            bail!("a compressed message, which was not asked for");
        }
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        if data.len() < 5 + len {
            break;
        }
        data.advance(5);
        out.push(data.split_to(len));
    }
    partial.extend_from_slice(&data);
    Ok(())
}

/// An HTTP/2 connection to a gRPC server, with the task that runs its IO.
pub struct Connection {
    uri: Uri,
    requests: SendRequest<Bytes>,
    io: JoinHandle<()>,
}

impl Connection {
    /// Connects to `url` (`http://host:port`).
    pub async fn open(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("parsing {url}"))?;
        let authority = uri.authority().context("the URL names no host")?.as_str();
        let tcp = TcpStream::connect(authority)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        tcp.set_nodelay(true)?;
        let (requests, connection) = h2::client::Builder::new()
            // tonic's client windows (hyper's defaults), so flow control is the same.
            .initial_window_size(2 * 1024 * 1024)
            .initial_connection_window_size(5 * 1024 * 1024)
            .handshake(tcp)
            .await
            .with_context(|| format!("HTTP/2 handshake with {url}"))?;
        let io = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self { uri, requests, io })
    }

    /// The headers of a call of the method at `path`.
    fn request(&self, path: &'static str) -> anyhow::Result<Request<()>> {
        let uri = Uri::builder()
            .scheme("http")
            .authority(self.uri.authority().context("no authority")?.clone())
            .path_and_query(PathAndQuery::from_static(path))
            .build()?;
        Ok(Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(())?)
    }

    /// Sends the headers of a call of `path` and `message`, the last if `end`; waits for the
    /// response's headers.
    async fn start(
        &self,
        path: &'static str,
        message: Bytes,
        end: bool,
    ) -> anyhow::Result<(SendStream<Bytes>, RecvStream)> {
        let mut requests = self.requests.clone().ready().await?;
        let (response, mut send) = requests.send_request(self.request(path)?, false)?;
        send.send_data(message, end)?;
        let response = response.await?;
        if response.status() != http::StatusCode::OK {
            bail!("{path} answered HTTP {}", response.status());
        }
        if let Some(status) = response.headers().get("grpc-status") {
            bail!(
                "{path} ended at once with grpc-status {status:?}: {:?}",
                response.headers().get("grpc-message")
            );
        }
        Ok((send, response.into_body()))
    }

    /// A unary call of the method at `path` with `request` (a [`frame`]): the answer's
    /// message, once the call ended with status OK.
    pub async fn unary(&self, path: &'static str, request: Bytes) -> anyhow::Result<Bytes> {
        let (_send, mut recv) = self.start(path, request, true).await?;
        let (mut partial, mut messages) = (BytesMut::new(), Vec::with_capacity(1));
        while let Some(chunk) = next_chunk(&mut recv).await {
            split_messages(&mut partial, chunk?, &mut messages)?;
        }
        let trailers = recv
            .trailers()
            .await?
            .context("the answer had no trailers")?;
        let status = trailers.get("grpc-status").map(|s| s.as_bytes());
        if status != Some(b"0") {
            bail!(
                "{path} failed with grpc-status {status:?}: {:?}",
                trailers.get("grpc-message")
            );
        }
        match (messages.pop(), messages.is_empty(), partial.is_empty()) {
            (Some(message), true, true) => Ok(message),
            _ => bail!("{path} answered other than one whole message"),
        }
    }

    /// Opens a stream of the method at `path`, sends `first`, and waits for the server's
    /// first message, which it returns with the stream.
    pub async fn call(&self, path: &'static str, first: Bytes) -> anyhow::Result<(Opened, Bytes)> {
        let (send, mut recv) = self.start(path, first, false).await?;
        let mut partial = BytesMut::new();
        let mut messages = Vec::new();
        while messages.is_empty() {
            let chunk = next_chunk(&mut recv)
                .await
                .context("the stream ended before its first message")??;
            split_messages(&mut partial, chunk, &mut messages)?;
        }
        if messages.len() > 1 {
            bail!("{path} sent more than one message before the first reply");
        }
        let first = messages.pop().expect("one message");
        Ok((
            Opened {
                send,
                recv,
                partial,
            },
            first,
        ))
    }

    /// Hands the `streams` opened on this connection to one task that runs them: each
    /// message goes to its stream's protocol, a delivery is reported with `deliver(id)`,
    /// a reply is sent; `ended(id)` when a stream ends or fails.
    pub fn drive<P: Protocol>(
        self,
        streams: Vec<(usize, Opened, P)>,
        deliver: impl Fn(usize) + Send + 'static,
        ended: impl Fn(usize) + Send + 'static,
    ) -> Driven {
        let mut incoming = SelectAll::new();
        let mut states = Vec::with_capacity(streams.len());
        for (k, (id, opened, protocol)) in streams.into_iter().enumerate() {
            incoming.push(chunks(k, opened.recv));
            states.push((id, opened.send, opened.partial, protocol));
        }
        let task = tokio::spawn(async move {
            let mut messages = Vec::new();
            while let Some((k, chunk)) = incoming.next().await {
                let (id, send, partial, protocol) = &mut states[k];
                let Some(chunk) = chunk else {
                    // The stream ended, failed, or was reset below: its last item.
                    ended(*id);
                    continue;
                };
                let mut fail = split_messages(partial, chunk, &mut messages).is_err();
                for message in messages.drain(..) {
                    match protocol.on_message(message) {
                        Ok(step) if !fail => {
                            if step.delivered {
                                deliver(*id);
                            }
                            if let Some(reply) = step.reply {
                                fail |= send.send_data(reply, false).is_err();
                            }
                        }
                        _ => fail = true,
                    }
                }
                if fail {
                    // Its receiving side then ends with an error: reported once, above.
                    send.send_reset(h2::Reason::CANCEL);
                }
            }
        });
        Driven { task, io: self.io }
    }
}

/// A stream past its first message.
pub struct Opened {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// What arrived after the first message.
    partial: BytesMut,
}

impl Opened {
    /// Sends `message` (a [`frame`]) on the stream.
    pub fn send(&mut self, message: Bytes) -> anyhow::Result<()> {
        Ok(self.send.send_data(message, false)?)
    }
}

/// The next chunk of `recv`'s body, the flow-control capacity it took given back; `None` at
/// the body's end.
pub(super) async fn next_chunk(recv: &mut RecvStream) -> Option<Result<Bytes, h2::Error>> {
    let chunk = recv.data().await?;
    if let Ok(chunk) = &chunk {
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    Some(chunk)
}

/// The chunks of stream `k`'s body (see [`next_chunk`]); `None` once, when the stream ends
/// or fails.
fn chunks(
    k: usize,
    recv: RecvStream,
) -> Pin<Box<dyn Stream<Item = (usize, Option<Bytes>)> + Send>> {
    Box::pin(futures::stream::unfold(
        Some(recv),
        move |recv| async move {
            let mut recv = recv?;
            match next_chunk(&mut recv).await {
                Some(Ok(chunk)) => Some(((k, Some(chunk)), Some(recv))),
                Some(Err(_)) | None => Some(((k, None), None)),
            }
        },
    ))
}

/// The tasks of a driven connection; dropping it stops them.
#[derive(Debug)]
pub struct Driven {
    task: JoinHandle<()>,
    io: JoinHandle<()>,
}

impl Drop for Driven {
    fn drop(&mut self) {
        self.task.abort();
        self.io.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Messages split anywhere across chunks come out whole and in order, whatever the
    /// cuts; a compressed message is refused.
    #[test]
    fn messages_come_out_whole_across_any_cut() {
        let bodies: Vec<Vec<u8>> = vec![b"a".to_vec(), vec![], vec![7; 300], b"last".to_vec()];
        let wire: Vec<u8> = bodies.iter().flat_map(|b| message(b)).collect();
        for cut in 0..=wire.len() {
            for second in cut..=wire.len() {
                let mut partial = BytesMut::new();
                let mut out = Vec::new();
                for piece in [&wire[..cut], &wire[cut..second], &wire[second..]] {
                    split_messages(&mut partial, Bytes::copy_from_slice(piece), &mut out).unwrap();
                }
                assert_eq!(out, bodies, "cuts at {cut} and {second}");
                assert!(partial.is_empty());
            }
        }
        let mut compressed = message(b"x");
        compressed[0] = 1;
        assert!(split_messages(&mut BytesMut::new(), compressed.into(), &mut Vec::new()).is_err());
    }

    /// A frame is the message behind its five-byte prefix.
    #[test]
    fn a_frame_is_the_prefix_and_the_message() {
        let request = envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {
            type_url: "t".into(),
            ..Default::default()
        };
        let framed = frame(&request);
        assert_eq!(
            framed[..],
            message(&prost::Message::encode_to_vec(&request))[..]
        );
    }
}
