//! A client connection's I/O wrappers: the bound on writes a client stops
//! reading ([`WriteDeadline`]), and the stream an idle HTTP/1 connection is
//! taken back from hyper with and resumed on ([`Resumable`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// A connection's I/O with a bound on stalled writes: when the client stops
/// reading (a slow reader, or HTTP/2 acknowledgements it never collects), a
/// write that makes no progress for `limit` fails and the connection ends,
/// instead of holding its buffers and its `max_connections` permit forever.
pub struct WriteDeadline<IO> {
    io: IO,
    limit: Duration,
    /// Allocated at the first stall, re-armed at each later one.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<IO> WriteDeadline<IO> {
    pub fn new(io: IO, limit: Duration) -> Self {
        Self {
            io,
            limit,
            timer: None,
            armed: false,
        }
    }

    /// Called with the inner write's outcome: progress disarms the timer, a
    /// stall arms it (once) and fails once it has run out.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.armed = false;
            return poll;
        }
        let deadline = tokio::time::Instant::now() + self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client stopped reading: no write progress",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteDeadline<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_shutdown(cx);
        this.watch(cx, poll)
    }
}

/// A connection's I/O that outlives the hyper connection serving it, so
/// that an idle HTTP/1 connection can be taken back from hyper (which then
/// frees its buffers) and handed to a new one at the next request:
///
/// - bytes read but not yet used (what hyper had buffered, or the first byte
///   of the next request) are replayed before reading on;
/// - `poll_shutdown` only flushes: closing the connection is left to its
///   owner, after the hyper connection has ended (see [`Resumable::into_inner`]).
pub struct Resumable<IO> {
    io: IO,
    replay: Bytes,
}

impl<IO> Resumable<IO> {
    pub fn new(io: IO) -> Self {
        Self {
            io,
            replay: Bytes::new(),
        }
    }

    /// Bytes to be read before anything more from the connection.
    pub fn replay(&mut self, bytes: Bytes) {
        debug_assert!(self.replay.is_empty(), "replayed bytes would be reordered");
        self.replay = bytes;
    }

    /// The connection itself, to be shut down for real.
    pub fn into_inner(self) -> IO {
        self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Resumable<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replay.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.replay.len().min(buf.remaining());
        buf.put_slice(&this.replay[..n]);
        this.replay.advance(n);
        if this.replay.is_empty() {
            // Emptied, it would still keep the buffer it was cut from alive
            // (hyper's previous read buffer) while the connection is parked.
            this.replay = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Resumable<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
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

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn replayed_bytes_come_first_and_are_not_kept_once_read() {
        let (client, server) = tokio::io::duplex(64);
        let mut io = Resumable::new(server);
        // What hyper hands back is a slice of its whole read buffer.
        let buffer = Bytes::from(b"GET / HTTP/1.1\r\nHo....unused capacity....".to_vec());
        io.replay(buffer.slice(..18));
        assert!(!buffer.is_unique());
        let mut client = client;
        client.write_all(b"st: a.test\r\n\r\n").await.expect("write");
        let mut got = [0u8; 32];
        let mut n = 0;
        while n < 32 {
            n += io.read(&mut got[n..]).await.expect("read");
        }
        assert_eq!(&got[..], b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n");
        assert!(
            buffer.is_unique(),
            "the replayed slice still holds the buffer it came from"
        );
    }
}
