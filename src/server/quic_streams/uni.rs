//! The client's unidirectional streams (RFC 9114 §6.2), typed here before
//! h3 sees any of them. h3 0.0.8 keeps the client's QPACK encoder and
//! decoder streams without ever reading them, passes over CANCEL_PUSH and
//! MAX_PUSH_ID, drops a client's push stream without a word, and buffers a
//! reserved frame on the control stream whole, whatever its length. So:
//!
//! - the control stream goes to h3 (its type replayed), its frames followed
//!   on the way: a frame other than DATA longer than the limit is
//!   `H3_EXCESSIVE_LOAD`; CANCEL_PUSH is `H3_ID_ERROR`, as linkgate never
//!   promises a push (§7.2.3); so is a MAX_PUSH_ID below an earlier one (§7.2.7);
//! - the QPACK encoder and decoder streams are read here (`qpack.rs`), each
//!   instruction checked against a dynamic table of capacity 0, which is
//!   what h3 announces (RFC 9204 §4.3, §4.4): the encoder may only set the
//!   capacity to 0, the decoder only cancel streams; anything else is
//!   `QPACK_ENCODER_STREAM_ERROR` or `QPACK_DECODER_STREAM_ERROR`, and the
//!   stream's end `H3_CLOSED_CRITICAL_STREAM` (RFC 9204 §4.2);
//! - a push stream from the client, or a second control, encoder or
//!   decoder stream, is `H3_STREAM_CREATION_ERROR` (§6.2.1, §6.2.2);
//! - any other type (reserved, GREASE, WebTransport) is stopped at once
//!   (STOP_SENDING `H3_STREAM_CREATION_ERROR`, §6.2.3) and nothing of it kept.
//!
//! Each of these connection errors closes the QUIC connection with its
//! code. How many streams a client may have open at once is quinn's
//! `max_concurrent_uni_streams` (`quic.rs`).

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId};

use super::frames::{self, Event, FrameTooLong, Frames};
use super::qpack::{decoder_instructions, encoder_instructions, Check, Instructions};

const H3_STREAM_CREATION_ERROR: u32 = 0x103;
const H3_FRAME_ERROR: u32 = 0x106;
const H3_EXCESSIVE_LOAD: u32 = 0x107;
const H3_ID_ERROR: u32 = 0x108;

const CONTROL: u64 = 0x00;
const PUSH: u64 = 0x01;
const ENCODER: u64 = 0x02;
const DECODER: u64 = 0x03;

const CANCEL_PUSH: u64 = 0x03;
const MAX_PUSH_ID: u64 = 0x0d;

/// A protocol error of the client's that ends its connection.
#[derive(Debug, thiserror::Error)]
#[error("{what} (connection closed with {code:#x})")]
pub struct Violation {
    pub code: u32,
    pub what: &'static str,
}

impl From<FrameTooLong> for Violation {
    fn from(_: FrameTooLong) -> Self {
        Self {
            code: H3_EXCESSIVE_LOAD,
            what: "a control stream frame longer than the limit",
        }
    }
}

/// Closes `conn` for `violation`; the error h3 is given for it.
fn close(conn: &quinn::Connection, violation: Violation) -> ConnectionErrorIncoming {
    conn.close(quinn::VarInt::from_u32(violation.code), violation.what.as_bytes());
    ConnectionErrorIncoming::Undefined(Arc::new(violation))
}

/// The client's unidirectional streams of one connection.
pub(super) struct UniStreams {
    conn: quinn::Connection,
    /// The longest frame other than DATA on the control stream.
    limit: u64,
    /// Streams whose type has not arrived yet.
    typing: Vec<Typing>,
    /// The control stream, once typed, until h3 takes it.
    control: Option<ControlStream>,
    seen: Seen,
    encoder: Option<Instructions>,
    decoder: Option<Instructions>,
}

/// Which of the streams there may be only one of have been opened.
#[derive(Default)]
struct Seen {
    control: bool,
    encoder: bool,
    decoder: bool,
}

impl UniStreams {
    pub(super) fn new(conn: quinn::Connection, limit: u64) -> Self {
        Self {
            conn,
            limit,
            typing: Vec::new(),
            control: None,
            seen: Seen::default(),
            encoder: None,
            decoder: None,
        }
    }

    /// Accepts and reads the client's unidirectional streams; the control
    /// stream, when it is there, for h3.
    pub(super) fn poll_accept(
        &mut self,
        inner: &mut h3_quinn::Connection,
        cx: &mut Context<'_>,
    ) -> Poll<Result<ControlStream, ConnectionErrorIncoming>> {
        loop {
            match quic::Connection::<Bytes>::poll_accept_recv(inner, cx) {
                Poll::Ready(Ok(stream)) => self.typing.push(Typing {
                    stream,
                    read: BytesMut::new(),
                }),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if let Err(violation) = self.poll_streams(cx) {
            return Poll::Ready(Err(close(&self.conn, violation)));
        }
        match self.control.take() {
            Some(control) => Poll::Ready(Ok(control)),
            None => Poll::Pending,
        }
    }

    fn poll_streams(&mut self, cx: &mut Context<'_>) -> Result<(), Violation> {
        let mut i = 0;
        while i < self.typing.len() {
            match self.typing[i].poll_type(cx) {
                Poll::Pending => i += 1,
                // Closed or reset before its type: tolerated (§6.2).
                Poll::Ready(None) => drop(self.typing.swap_remove(i)),
                Poll::Ready(Some((kind, type_len))) => {
                    let typed = self.typing.swap_remove(i);
                    self.place(typed, kind, type_len)?;
                }
            }
        }
        for (qpack, check) in [
            (&mut self.encoder, encoder_instructions as Check),
            (&mut self.decoder, decoder_instructions as Check),
        ] {
            if let Some(stream) = qpack {
                if stream.poll_read(cx, check)?.is_ready() {
                    // The connection is gone: its error comes from h3's other streams.
                    *qpack = None;
                }
            }
        }
        Ok(())
    }

    /// Puts a typed stream where it belongs (see the module doc).
    fn place(&mut self, typed: Typing, kind: u64, type_len: usize) -> Result<(), Violation> {
        let Typing { mut stream, read } = typed;
        let creation = |what| Violation {
            code: H3_STREAM_CREATION_ERROR,
            what,
        };
        match kind {
            CONTROL => {
                if std::mem::replace(&mut self.seen.control, true) {
                    return Err(creation("a second control stream"));
                }
                let mut control = ControlStream {
                    inner: stream,
                    replay: None,
                    frames: Frames::new(self.limit, |kind, _| kind == MAX_PUSH_ID),
                    max_push_id: None,
                    conn: self.conn.clone(),
                };
                let read = read.freeze();
                control.follow(&read[type_len..])?;
                control.replay = Some(read);
                self.control = Some(control);
            }
            PUSH => return Err(creation("a push stream from the client")),
            ENCODER | DECODER => {
                let (seen, slot, check, what) = if kind == ENCODER {
                    let check: Check = encoder_instructions;
                    (
                        &mut self.seen.encoder,
                        &mut self.encoder,
                        check,
                        "a second QPACK encoder stream",
                    )
                } else {
                    let check: Check = decoder_instructions;
                    (
                        &mut self.seen.decoder,
                        &mut self.decoder,
                        check,
                        "a second QPACK decoder stream",
                    )
                };
                if std::mem::replace(seen, true) {
                    return Err(creation(what));
                }
                *slot = Some(Instructions::new(stream, check, &read[type_len..])?);
            }
            _ => quic::RecvStream::stop_sending(&mut stream, u64::from(H3_STREAM_CREATION_ERROR)),
        }
        Ok(())
    }
}

/// A stream whose type (a variable-length integer) is still arriving.
struct Typing {
    stream: h3_quinn::RecvStream,
    read: BytesMut,
}

impl Typing {
    /// The stream's type and its length in bytes, once read; `None` if the
    /// stream ended (or was reset) first.
    fn poll_type(&mut self, cx: &mut Context<'_>) -> Poll<Option<(u64, usize)>> {
        loop {
            match quic::RecvStream::poll_data(&mut self.stream, cx) {
                Poll::Ready(Ok(Some(chunk))) => {
                    self.read.extend_from_slice(&chunk);
                    if let Some(typed) = frames::leading_varint(&self.read) {
                        return Poll::Ready(Some(typed));
                    }
                }
                Poll::Ready(Ok(None) | Err(_)) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The client's control stream as h3 reads it: its first bytes (the type
/// and what came with it) replayed, its frames followed (module doc).
pub struct ControlStream {
    inner: h3_quinn::RecvStream,
    replay: Option<Bytes>,
    frames: Frames,
    max_push_id: Option<u64>,
    conn: quinn::Connection,
}

impl ControlStream {
    fn follow(&mut self, bytes: &[u8]) -> Result<(), Violation> {
        let max_push_id = &mut self.max_push_id;
        self.frames.pass(bytes, &mut |event| match event {
            Event::Head { kind: CANCEL_PUSH, .. } => Err(Violation {
                code: H3_ID_ERROR,
                what: "CANCEL_PUSH for a push never promised",
            }),
            Event::Whole {
                kind: MAX_PUSH_ID,
                payload,
            } => {
                let id = match frames::leading_varint(payload) {
                    Some((id, len)) if len == payload.len() => id,
                    _ => {
                        return Err(Violation {
                            code: H3_FRAME_ERROR,
                            what: "a malformed MAX_PUSH_ID frame",
                        })
                    }
                };
                if max_push_id.is_some_and(|max| id < max) {
                    return Err(Violation {
                        code: H3_ID_ERROR,
                        what: "MAX_PUSH_ID below an earlier one",
                    });
                }
                *max_push_id = Some(id);
                Ok(())
            }
            _ => Ok(()),
        })
    }
}

impl quic::RecvStream for ControlStream {
    type Buf = Bytes;

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        if let Some(first) = self.replay.take() {
            return Poll::Ready(Ok(Some(first)));
        }
        let data = std::task::ready!(self.inner.poll_data(cx))?;
        if let Some(chunk) = &data {
            if let Err(violation) = self.follow(chunk) {
                return Poll::Ready(Err(StreamErrorIncoming::ConnectionErrorIncoming {
                    connection_error: close(&self.conn, violation),
                }));
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
