//! The QUIC streams h3 serves requests over: quinn's as `h3_quinn` adapts
//! them, with what h3 lacks added as the bytes pass.
//!
//! - Request heads are bounded before h3 buffers them (`frames.rs`): h3
//!   buffers a frame other than DATA whole, whatever length it announces,
//!   and checks `max_header_bytes` only on the complete head, so a client
//!   announcing a HEADERS frame of 1 GiB and feeding it would have all of
//!   it buffered, on as many streams as it may open. A frame other than
//!   DATA announcing more than [`Connection::new`]'s limit stops the
//!   stream (`H3_EXCESSIVE_LOAD`) before h3 has buffered any of it.
//! - A request head whose pseudo-header fields h3 would take although
//!   they make it malformed, repeated or after a regular field
//!   (`head.rs`), resets the stream with `H3_MESSAGE_ERROR`, as h2 refuses
//!   such a head for HTTP/2.
//! - The client's unidirectional streams are typed and checked here
//!   (`uni.rs`, `qpack.rs`): QPACK and control-stream errors close the
//!   connection with their code, streams of other types are stopped at once.
//! - A response's body bytes that QUIC took are counted (`send.rs`), for
//!   the access log of a response cut short.

use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};

mod frames;
mod head;
mod qpack;
mod send;
mod uni;

pub use frames::FrameTooLong;
pub use head::Malformed;
pub use send::{counted, SendStream};
pub use uni::ControlStream;

use frames::{Event, Frames};

/// RFC 9114 §8.1: the peer is generating excessive load.
const H3_EXCESSIVE_LOAD: u64 = 0x107;
/// RFC 9114 §8.1: a malformed message.
const H3_MESSAGE_ERROR: u64 = 0x10e;

/// Why a request stream was refused while its frames passed.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    TooLong(#[from] FrameTooLong),
    #[error("malformed HTTP/3 request head: {0}")]
    Head(#[from] Malformed),
}

/// An h3 connection over quinn with the additions of the module doc.
pub(super) struct Connection {
    inner: h3_quinn::Connection,
    limit: u64,
    uni: uni::UniStreams,
}

impl Connection {
    /// `limit`: the longest frame other than DATA a client may announce.
    pub(super) fn new(conn: quinn::Connection, limit: u64) -> Self {
        Self {
            inner: h3_quinn::Connection::new(conn.clone()),
            limit,
            uni: uni::UniStreams::new(conn, limit),
        }
    }
}

impl quic::Connection<Bytes> for Connection {
    type RecvStream = ControlStream;
    type OpenStreams = OpenStreams;

    fn poll_accept_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::RecvStream, ConnectionErrorIncoming>> {
        self.uni.poll_accept(&mut self.inner, cx)
    }

    fn poll_accept_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        let limit = self.limit;
        quic::Connection::<Bytes>::poll_accept_bidi(&mut self.inner, cx).map_ok(|s| BidiStream::new(s, limit))
    }

    fn opener(&self) -> Self::OpenStreams {
        OpenStreams {
            inner: quic::Connection::<Bytes>::opener(&self.inner),
            limit: self.limit,
        }
    }
}

impl quic::OpenStreams<Bytes> for Connection {
    type BidiStream = BidiStream;
    type SendStream = h3_quinn::SendStream<Bytes>;

    fn poll_open_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        let limit = self.limit;
        quic::OpenStreams::<Bytes>::poll_open_bidi(&mut self.inner, cx).map_ok(|s| BidiStream::new(s, limit))
    }

    fn poll_open_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::<Bytes>::poll_open_send(&mut self.inner, cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<Bytes>::close(&mut self.inner, code, reason);
    }
}

/// What opens streams from this side (h3's control and QPACK streams).
pub(super) struct OpenStreams {
    inner: h3_quinn::OpenStreams,
    limit: u64,
}

impl quic::OpenStreams<Bytes> for OpenStreams {
    type BidiStream = BidiStream;
    type SendStream = h3_quinn::SendStream<Bytes>;

    fn poll_open_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        let limit = self.limit;
        quic::OpenStreams::<Bytes>::poll_open_bidi(&mut self.inner, cx).map_ok(|s| BidiStream::new(s, limit))
    }

    fn poll_open_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::<Bytes>::poll_open_send(&mut self.inner, cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<Bytes>::close(&mut self.inner, code, reason);
    }
}

/// A request stream: the sending half counted, the receiving half followed.
pub struct BidiStream {
    send: SendStream,
    recv: RecvStream,
}

impl BidiStream {
    fn new(stream: h3_quinn::BidiStream<Bytes>, limit: u64) -> Self {
        let (send, inner) = quic::BidiStream::split(stream);
        Self {
            send: SendStream::new(send),
            recv: RecvStream {
                inner,
                // The request's head: the first HEADERS frame.
                frames: Frames::new(limit, |kind, headers_before| {
                    kind == frames::HEADERS && headers_before == 0
                }),
            },
        }
    }
}

impl quic::BidiStream<Bytes> for BidiStream {
    type SendStream = SendStream;
    type RecvStream = RecvStream;

    fn split(self) -> (Self::SendStream, Self::RecvStream) {
        (self.send, self.recv)
    }
}

impl quic::SendStream<Bytes> for BidiStream {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<Bytes>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.send.reset(reset_code);
    }

    fn send_id(&self) -> StreamId {
        self.send.send_id()
    }
}

impl quic::RecvStream for BidiStream {
    type Buf = Bytes;

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        // The head is read before the stream is split: a malformed one is
        // refused in both directions here.
        self.recv.poll_followed(cx).map_err(|e| match e {
            Followed::Quic(e) => e,
            Followed::Refused(refused) => {
                if matches!(refused, Refused::Head(_)) {
                    quic::SendStream::<Bytes>::reset(&mut self.send, H3_MESSAGE_ERROR);
                }
                StreamErrorIncoming::Unknown(Box::new(refused))
            }
        })
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.recv.recv_id()
    }
}

/// A request stream's receiving half, its frames followed as they pass.
pub struct RecvStream {
    inner: h3_quinn::RecvStream,
    frames: Frames,
}

/// What reading a request stream can end in.
enum Followed {
    Quic(StreamErrorIncoming),
    Refused(Refused),
}

impl RecvStream {
    /// The stream's next bytes, once their frames have been followed; a
    /// refused stream is stopped (STOP_SENDING with the refusal's code).
    fn poll_followed(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, Followed>> {
        let data = ready!(quic::RecvStream::poll_data(&mut self.inner, cx)).map_err(Followed::Quic)?;
        if let Some(chunk) = &data {
            let followed = self.frames.pass(chunk, &mut |event| match event {
                Event::Whole { payload, .. } => head::check(payload).map_err(Refused::from),
                Event::Head { .. } => Ok(()),
            });
            if let Err(refused) = followed {
                let code = match refused {
                    Refused::TooLong(_) => H3_EXCESSIVE_LOAD,
                    Refused::Head(_) => H3_MESSAGE_ERROR,
                };
                quic::RecvStream::stop_sending(&mut self.inner, code);
                return Poll::Ready(Err(Followed::Refused(refused)));
            }
        }
        Poll::Ready(Ok(data))
    }
}

impl quic::RecvStream for RecvStream {
    type Buf = Bytes;

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        self.poll_followed(cx).map_err(|e| match e {
            Followed::Quic(e) => e,
            Followed::Refused(refused) => StreamErrorIncoming::Unknown(Box::new(refused)),
        })
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.inner.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.inner.recv_id()
    }
}
