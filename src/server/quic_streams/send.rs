//! A request stream's sending half, counting the response body bytes QUIC
//! took. quinn takes a write only within the client's flow-control credit
//! (stream and connection), so what it took is what the client allowed:
//! for a response cut because the client stopped granting credit, the
//! access log counts that, not the part of a chunk that was still waiting
//! (quinn does not say what the client acknowledged). Frame heads and the
//! response's HEADERS are not counted.
//!
//! The count is kept per thread while a request's task polls its writes
//! ([`counted`]): h3 writes a request stream only from the task that holds
//! it, synchronously within its polls.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h3::quic::{self, ConnectionErrorIncoming, SendStreamUnframed as _, StreamErrorIncoming, StreamId, WriteBuf};

thread_local! {
    /// DATA payload bytes written on this thread since [`counted`] last looked.
    static WRITTEN: Cell<u64> = const { Cell::new(0) };
}

/// Runs `write` (a request stream's send, finish or response), adding to
/// `written` the body bytes QUIC took while it ran.
pub async fn counted<F: Future>(written: &mut u64, write: F) -> F::Output {
    let mut write = pin!(write);
    poll_fn(|cx| {
        WRITTEN.with(|w| w.set(0));
        let polled = write.as_mut().poll(cx);
        *written += WRITTEN.with(|w| w.replace(0));
        polled
    })
    .await
}

/// quinn's sending half as h3-quinn adapts it, written through here.
pub struct SendStream {
    inner: h3_quinn::SendStream<Bytes>,
    /// The frame being written.
    writing: Option<WriteBuf<Bytes>>,
    /// What is left of its head (type and length).
    head_left: usize,
    /// It is a DATA frame, whose payload is counted.
    data: bool,
}

impl SendStream {
    pub(super) fn new(inner: h3_quinn::SendStream<Bytes>) -> Self {
        Self {
            inner,
            writing: None,
            head_left: 0,
            data: false,
        }
    }
}

impl quic::SendStream<Bytes> for SendStream {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        if let Some(frame) = &mut self.writing {
            while frame.has_remaining() {
                let n = ready!(self.inner.poll_send(cx, frame))?;
                let head = n.min(self.head_left);
                self.head_left -= head;
                if self.data {
                    WRITTEN.with(|w| w.set(w.get() + (n - head) as u64));
                }
            }
        }
        self.writing = None;
        Poll::Ready(Ok(()))
    }

    fn send_data<T: Into<WriteBuf<Bytes>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        if self.writing.is_some() {
            // h3 sends a frame only once the one before is written (as h3-quinn, an internal error).
            return Err(StreamErrorIncoming::ConnectionErrorIncoming {
                connection_error: ConnectionErrorIncoming::InternalError(
                    "a frame sent before the last was written".into(),
                ),
            });
        }
        let frame: WriteBuf<Bytes> = data.into();
        // A frame's first chunk is its head, whose first byte is its type:
        // a one-byte 0 is DATA (RFC 9114 §7.2.1; any other type is not 0).
        let head = frame.chunk();
        self.head_left = head.len();
        self.data = head.first() == Some(&0x00);
        self.writing = Some(frame);
        Ok(())
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.inner.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.inner.reset(reset_code);
    }

    fn send_id(&self) -> StreamId {
        self.inner.send_id()
    }
}
