//! The QUIC streams h3 reads requests from, with the one bound h3 lacks.
//!
//! h3 buffers a frame other than DATA whole before decoding it, whatever
//! length the frame announces, and checks a field section's size
//! (`max_header_bytes`) only once it is complete: a client announcing a
//! HEADERS frame of 1 GiB and feeding it would have all of it buffered, on
//! as many streams as it may open. Here the frames of each request stream
//! are followed as they pass (only their headers are read; payloads are
//! handed on untouched), and a frame other than DATA announcing more than
//! [`Connection::new`]'s limit stops the stream (`H3_EXCESSIVE_LOAD`)
//! before h3 has buffered any of it.
//!
//! Everything else is quinn's streams as `h3_quinn` adapts them.

use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};

/// RFC 9114 §8.1: the peer is generating excessive load.
const H3_EXCESSIVE_LOAD: u64 = 0x107;
/// The DATA frame type (RFC 9114 §7.2.1): its payload is streamed, not buffered.
const DATA: u64 = 0x0;

/// An h3 connection over quinn whose request streams are bounded as above.
pub(super) struct Connection {
    inner: h3_quinn::Connection,
    limit: u64,
}

impl Connection {
    /// `limit`: the longest frame other than DATA a request stream may announce.
    pub(super) fn new(conn: quinn::Connection, limit: u64) -> Self {
        Self {
            inner: h3_quinn::Connection::new(conn),
            limit,
        }
    }
}

impl quic::Connection<Bytes> for Connection {
    type RecvStream = h3_quinn::RecvStream;
    type OpenStreams = OpenStreams;

    fn poll_accept_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::RecvStream, ConnectionErrorIncoming>> {
        quic::Connection::<Bytes>::poll_accept_recv(&mut self.inner, cx)
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

/// A request stream: quinn's sending half, and the receiving half bounded.
pub struct BidiStream {
    send: h3_quinn::SendStream<Bytes>,
    recv: RecvStream,
}

impl BidiStream {
    fn new(stream: h3_quinn::BidiStream<Bytes>, limit: u64) -> Self {
        let (send, inner) = quic::BidiStream::split(stream);
        Self {
            send,
            recv: RecvStream {
                inner,
                frames: Frames::new(limit),
            },
        }
    }
}

impl quic::BidiStream<Bytes> for BidiStream {
    type SendStream = h3_quinn::SendStream<Bytes>;
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
        self.recv.poll_data(cx)
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

impl quic::RecvStream for RecvStream {
    type Buf = Bytes;

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        let data = ready!(self.inner.poll_data(cx))?;
        if let Some(chunk) = &data {
            if let Err(too_long) = self.frames.pass(chunk) {
                self.inner.stop_sending(H3_EXCESSIVE_LOAD);
                return Poll::Ready(Err(StreamErrorIncoming::Unknown(Box::new(too_long))));
            }
        }
        Poll::Ready(Ok(data))
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.inner.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.inner.recv_id()
    }
}

/// Where a stream is in its frames (RFC 9114 §7.1: a type and a length,
/// both variable-length integers, then the payload).
#[derive(Debug)]
struct Frames {
    limit: u64,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Reading a frame's type and length (at most 8 bytes each).
    Head { bytes: [u8; 16], len: usize },
    /// Inside a frame's payload, this many bytes of it still to come.
    Payload(u64),
}

/// A frame other than DATA announced longer than the limit.
#[derive(Debug, thiserror::Error)]
#[error("an HTTP/3 frame of type {kind:#x} announced {length} bytes, more than the {limit} a request head may take")]
pub struct FrameTooLong {
    kind: u64,
    length: u64,
    limit: u64,
}

impl Frames {
    fn new(limit: u64) -> Self {
        Self {
            limit,
            state: State::Head { bytes: [0; 16], len: 0 },
        }
    }

    /// Follows `chunk`, the stream's next bytes.
    fn pass(&mut self, mut chunk: &[u8]) -> Result<(), FrameTooLong> {
        while let Some((&first, rest)) = chunk.split_first() {
            match &mut self.state {
                State::Payload(left) => {
                    let n = usize::try_from(*left).map_or(chunk.len(), |left| left.min(chunk.len()));
                    *left -= n as u64;
                    chunk = &chunk[n..];
                    if *left == 0 {
                        *self = Self::new(self.limit);
                    }
                }
                State::Head { bytes, len } => {
                    bytes[*len] = first;
                    *len += 1;
                    chunk = rest;
                    let Some((kind, length)) = frame_head(&bytes[..*len]) else {
                        continue;
                    };
                    if kind != DATA && length > self.limit {
                        return Err(FrameTooLong {
                            kind,
                            length,
                            limit: self.limit,
                        });
                    }
                    self.state = if length == 0 {
                        Self::new(self.limit).state
                    } else {
                        State::Payload(length)
                    };
                }
            }
        }
        Ok(())
    }
}

/// A frame's type and length, once `bytes` holds both whole.
fn frame_head(bytes: &[u8]) -> Option<(u64, u64)> {
    let kind_len = varint_len(*bytes.first()?);
    let length_len = varint_len(*bytes.get(kind_len)?);
    let length = bytes.get(kind_len..kind_len + length_len)?;
    Some((varint(&bytes[..kind_len]), varint(length)))
}

/// A variable-length integer's length, from its first byte (RFC 9000 §16).
fn varint_len(first: u8) -> usize {
    1 << (first >> 6)
}

fn varint(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .skip(1)
        .fold(u64::from(bytes[0] & 0x3f), |v, &b| (v << 8) | u64::from(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_heads_are_followed_across_chunks_and_data_payloads_pass() {
        let mut frames = Frames::new(100);
        // HEADERS of 3 bytes, DATA of 300 (two-byte length), HEADERS of 2,
        // split at every awkward place.
        let stream = [
            &[0x01, 0x03, b'a', b'b', b'c'][..],
            &[0x00, 0x41, 0x2c],
            &[b'x'; 300],
            &[0x01, 0x02, b'y', b'z'],
        ]
        .concat();
        for split in 0..stream.len() {
            let mut f = Frames::new(100);
            f.pass(&stream[..split]).expect("first part");
            f.pass(&stream[split..]).expect("second part");
            assert!(
                matches!(f.state, State::Head { len: 0, .. }),
                "split at {split}: {:?}",
                f.state
            );
        }
        frames.pass(&stream).expect("whole");
    }

    #[test]
    fn a_frame_other_than_data_announced_too_long_is_refused_from_its_head() {
        // HEADERS announcing 4 MiB (a four-byte length), no payload yet.
        let mut frames = Frames::new(4096);
        let err = frames.pass(&[0x01, 0x80, 0x40, 0x00, 0x00]).expect_err("refused");
        assert_eq!((err.kind, err.length), (0x01, 4 << 20));
        // A reserved frame type (0x21) is held to the same bound.
        let mut frames = Frames::new(4096);
        frames.pass(&[0x21, 0x50]).expect("4 KiB + 0x10 not yet whole");
        assert!(frames.pass(&[0x10]).is_err());
        // DATA may be as long as it likes.
        let mut frames = Frames::new(4096);
        frames.pass(&[0x00, 0x80, 0x40, 0x00, 0x00, b'x']).expect("data");
    }
}
