//! A connection wrapper that closes connections which are too slow to start or go silent.
//!
//! A slow-loris client opens a TCP connection and sends nothing, or a byte now and then, to
//! hold a socket and a task. [`Guarded`] fails the connection's reads with `TimedOut` when
//! the first [`PREFACE_BYTES`] have not arrived within the handshake timeout (that covers a
//! TLS ClientHello and the HTTP/2 client preface), and afterwards when nothing at all was
//! read for the idle timeout. A healthy HTTP/2 client is never silent that long: it answers
//! the server's keepalive pings.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes a client must send within the handshake timeout: the length of the HTTP/2 client
/// preface, also less than any TLS ClientHello.
pub const PREFACE_BYTES: u64 = 24;

/// An IO object with a deadline on reads.
#[derive(Debug)]
pub struct Guarded<IO> {
    io: IO,
    idle_timeout: Duration,
    n_read: u64,
    deadline: Pin<Box<Sleep>>,
}

impl<IO> Guarded<IO> {
    /// Wraps `io`: `handshake_timeout` for the first [`PREFACE_BYTES`], then
    /// `idle_timeout` between reads.
    pub fn new(io: IO, handshake_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            io,
            idle_timeout,
            n_read: 0,
            deadline: Box::pin(tokio::time::sleep(handshake_timeout)),
        }
    }

    /// The wrapped IO object.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = (buf.filled().len() - before) as u64;
                this.n_read = this.n_read.saturating_add(n);
                if n > 0 && this.n_read >= PREFACE_BYTES {
                    let next = Instant::now() + this.idle_timeout;
                    this.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    if this.n_read < PREFACE_BYTES {
                        "connection too slow to start"
                    } else {
                        "connection idle"
                    },
                ))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connected for Guarded<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn silent_and_slow_connections_time_out() {
        // Silent from the start.
        let (client, server) = tokio::io::duplex(64);
        let mut guarded = Guarded::new(server, Duration::from_secs(1), Duration::from_secs(10));
        let mut buf = [0; 8];
        let error = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        drop(client);

        // A byte now and then does not extend the handshake deadline.
        let (mut client, server) = tokio::io::duplex(64);
        let mut guarded = Guarded::new(server, Duration::from_secs(1), Duration::from_secs(10));
        let start = Instant::now();
        let reader = tokio::spawn(async move {
            let mut buf = [0; 1];
            loop {
                if let Err(error) = guarded.read_exact(&mut buf).await {
                    return error.kind();
                }
            }
        });
        for _ in 0..5 {
            if client.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert_eq!(reader.await.unwrap(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(2));

        // After the preface, the idle timeout applies and activity extends it.
        let (mut client, server) = tokio::io::duplex(64);
        let mut guarded = Guarded::new(server, Duration::from_secs(1), Duration::from_secs(10));
        client.write_all(&[0; 24]).await.unwrap();
        let mut buf = [0; 24];
        guarded.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        client.write_all(b"y").await.unwrap();
        guarded.read_exact(&mut buf[..1]).await.unwrap();
        let start = Instant::now();
        let error = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= Duration::from_secs(10));
    }
}
