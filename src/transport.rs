//! Fewer, larger socket writes: a connection's flush waits for one turn of the scheduler.
//!
//! When a snapshot changes, every subscribed stream's task is woken at once, and each one
//! hands its response to its HTTP/2 connection, waking the connection's task. Tokio runs a
//! task woken by the running one next, and the HTTP/2 layer writes a DATA frame of more than
//! 256 bytes as a system call of its own; without help a connection writes one response per
//! system call: 10,000 streams over 100 connections cost 10,000 loopback writes, each paying
//! for the TCP stack and for waking the reader.
//!
//! [`Batched`] takes the connection's writes into a buffer of its own, and the first flush
//! after new bytes arrived waits for one turn: it asks to be polled again and answers
//! `Pending`, so the connection's task goes to the back of the run queue, behind the other
//! streams woken by the same change. When it runs again, it takes what those streams queued
//! in the meantime, and once a turn brought nothing new (or the buffer holds
//! [`HIGH_WATER`] bytes) it writes everything in one system call.
//!
//! The cost is a copy of every byte written and one more poll of the connection per turn
//! with new bytes; the latency of a write grows by the turns it waits (the tasks that were
//! ready anyway). Writes fail at the flush, not at the write, as with any buffered writer.
//! A peer that stops reading makes a connection hold at most [`HIGH_WATER`] bytes plus one
//! write of the HTTP/2 layer; then the writes wait for the socket, as they did before.
//! Bytes held when the object is dropped without a flush or a shutdown are lost: the TLS
//! acceptor shuts down a connection whose handshake failed, so that its alert still leaves.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Bytes held before a write goes out without waiting for another turn.
pub const HIGH_WATER: usize = 64 * 1024;

/// An IO object that gathers writes and flushes them once a turn of the scheduler brought
/// nothing more (see the module's documentation).
#[derive(Debug)]
pub struct Batched<IO> {
    io: IO,
    /// Bytes taken and not yet written; released when written, so an idle connection
    /// holds no buffer.
    buf: Vec<u8>,
    /// How much of `buf` the IO object has taken.
    written: usize,
    /// Whether bytes were taken since the last turn.
    fresh: bool,
}

impl<IO> Batched<IO> {
    /// Wraps `io`.
    pub fn new(io: IO) -> Self {
        Self {
            io,
            buf: Vec::new(),
            written: 0,
            fresh: false,
        }
    }

    /// The wrapped IO object.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    fn held(&self) -> usize {
        self.buf.len() - self.written
    }
}

impl<IO: AsyncWrite + Unpin> Batched<IO> {
    /// Writes every held byte.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Takes `bufs`, writing what is held first when that reached [`HIGH_WATER`].
    fn poll_take(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.held() >= HIGH_WATER {
            ready!(self.poll_drain(cx))?;
        }
        let n: usize = bufs.iter().map(|b| b.len()).sum();
        self.buf.reserve(n);
        for b in bufs {
            self.buf.extend_from_slice(b);
        }
        self.fresh |= n > 0;
        Poll::Ready(Ok(n))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Batched<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Batched<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_take(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_take(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Waits one turn while turns bring new bytes (below [`HIGH_WATER`]), then writes them.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.fresh && this.held() < HIGH_WATER {
            this.fresh = false;
            // Woken during its own poll, a task goes to the back of the run queue.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.fresh = false;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Batched<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::{Wake, Waker},
    };

    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An IO object that records each write it is given.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn write(batched: &mut Batched<Recorder>, cx: &mut Context<'_>, bytes: &[u8]) {
        let n = Pin::new(batched).poll_write(cx, bytes);
        assert!(matches!(n, Poll::Ready(Ok(n)) if n == bytes.len()));
    }

    fn flush(batched: &mut Batched<Recorder>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(batched).poll_flush(cx).map(|r| r.unwrap())
    }

    /// Writes of one turn and of the turns that follow while they bring more leave in one
    /// write, once a turn brought nothing new.
    #[test]
    fn writes_of_consecutive_turns_leave_together() {
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut batched = Batched::new(Recorder::default());

        write(&mut batched, &mut cx, b"one");
        assert!(flush(&mut batched, &mut cx).is_pending(), "waits a turn");
        assert_eq!(
            counter.0.load(Ordering::Relaxed),
            1,
            "and asks to be polled"
        );
        write(&mut batched, &mut cx, b"two");
        assert!(
            flush(&mut batched, &mut cx).is_pending(),
            "the turn brought more"
        );
        assert!(batched.io.writes.is_empty());
        assert!(
            flush(&mut batched, &mut cx).is_ready(),
            "nothing new: written"
        );
        assert_eq!(batched.io.writes, vec![b"onetwo".to_vec()]);
        assert_eq!(
            batched.buf.capacity(),
            0,
            "an idle connection holds no buffer"
        );
        assert!(flush(&mut batched, &mut cx).is_ready(), "nothing held");
        assert_eq!(counter.0.load(Ordering::Relaxed), 2);
    }

    /// Past the high-water mark a flush writes at once, and a write drains first.
    #[test]
    fn a_full_buffer_is_written_without_waiting() {
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        let mut cx = Context::from_waker(&waker);
        let mut batched = Batched::new(Recorder::default());
        let big = vec![7; HIGH_WATER];
        write(&mut batched, &mut cx, &big);
        assert!(flush(&mut batched, &mut cx).is_ready());
        assert_eq!(batched.io.writes.len(), 1);
        write(&mut batched, &mut cx, &big);
        write(&mut batched, &mut cx, b"x");
        assert_eq!(
            batched.io.writes.len(),
            2,
            "the write drained what was held"
        );
        assert_eq!(batched.held(), 1);
    }

    proptest! {
        /// Through a pipe that takes a few bytes at a time, whatever the writes, flushes and
        /// shutdown, the reader gets every byte in order.
        #[test]
        fn bytes_arrive_complete_and_in_order(
            chunks in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..3000), any::<bool>()), 0..40),
            pipe in 1usize..5000,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async {
                let (mut client, server) = tokio::io::duplex(pipe);
                let expected: Vec<u8> = chunks.iter().flat_map(|(c, _)| c.clone()).collect();
                let writer = tokio::spawn(async move {
                    let mut batched = Batched::new(server);
                    for (chunk, flush) in chunks {
                        batched.write_all(&chunk).await.unwrap();
                        if flush {
                            batched.flush().await.unwrap();
                        }
                    }
                    batched.shutdown().await.unwrap();
                });
                let mut read = Vec::new();
                client.read_to_end(&mut read).await.unwrap();
                writer.await.unwrap();
                prop_assert_eq!(read, expected);
                Ok(())
            })?;
        }
    }

    /// Reads pass through untouched.
    #[tokio::test]
    async fn reads_pass_through() {
        let (mut a, b) = tokio::io::duplex(16);
        let mut batched = Batched::new(b);
        a.write_all(b"ping").await.unwrap();
        let mut buf = [0; 4];
        batched.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }
}
