//! The client's QPACK encoder and decoder streams, read and checked
//! against the dynamic table h3 announces: a capacity of 0, so nothing is
//! ever inserted and no field section refers to the table (RFC 9204 §4.3,
//! §4.4). What is allowed is discarded as it is read.

use std::task::{Context, Poll};

use h3::quic::{self, StreamErrorIncoming};

use super::uni::Violation;

const H3_CLOSED_CRITICAL_STREAM: u32 = 0x104;
const QPACK_ENCODER_STREAM_ERROR: u32 = 0x201;
const QPACK_DECODER_STREAM_ERROR: u32 = 0x202;

/// A QPACK instruction stream's check: `continuing` carries an integer
/// split across chunks (how many of its bytes have been read).
pub(super) type Check = fn(continuing: &mut Option<u8>, bytes: &[u8]) -> Result<(), Violation>;

/// The client's QPACK encoder stream: the only instruction a table of
/// capacity 0 allows is Set Dynamic Table Capacity 0, the byte 0x20
/// (RFC 9204 §4.3.1; inserts need room, duplicates an entry).
pub(super) fn encoder_instructions(_: &mut Option<u8>, bytes: &[u8]) -> Result<(), Violation> {
    if bytes.iter().all(|&b| b == 0x20) {
        return Ok(());
    }
    Err(Violation {
        code: QPACK_ENCODER_STREAM_ERROR,
        what: "a QPACK encoder instruction other than a dynamic table capacity of 0",
    })
}

/// The client's QPACK decoder stream: Stream Cancellation (01, a 6-bit
/// prefixed stream ID) is always allowed; Section Acknowledgment (1) and
/// Insert Count Increment (00) are errors here, as no field section linkgate
/// sends refers to the dynamic table and it never inserts (RFC 9204 §4.4).
pub(super) fn decoder_instructions(continuing: &mut Option<u8>, bytes: &[u8]) -> Result<(), Violation> {
    let error = |what| Violation {
        code: QPACK_DECODER_STREAM_ERROR,
        what,
    };
    for &b in bytes {
        if let Some(read) = continuing {
            // A stream ID is at most 62 bits: nine continuation bytes.
            if *read >= 9 {
                return Err(error("a QPACK decoder instruction with an integer too long"));
            }
            *read += 1;
            if b & 0x80 == 0 {
                *continuing = None;
            }
        } else if b & 0xc0 == 0x40 {
            if b & 0x3f == 0x3f {
                *continuing = Some(0);
            }
        } else if b & 0x80 != 0 {
            return Err(error(
                "a QPACK Section Acknowledgment, though no field section used the table",
            ));
        } else {
            return Err(error("a QPACK Insert Count Increment, though nothing was inserted"));
        }
    }
    Ok(())
}

/// An open QPACK encoder or decoder stream of the client's.
pub(super) struct Instructions {
    stream: h3_quinn::RecvStream,
    continuing: Option<u8>,
}

impl Instructions {
    /// The stream, its first bytes (after its type) checked.
    pub(super) fn new(stream: h3_quinn::RecvStream, check: Check, first: &[u8]) -> Result<Self, Violation> {
        let mut continuing = None;
        check(&mut continuing, first)?;
        Ok(Self { stream, continuing })
    }

    /// Reads what has arrived; ready when the connection has gone.
    pub(super) fn poll_read(&mut self, cx: &mut Context<'_>, check: Check) -> Result<Poll<()>, Violation> {
        let closed = Violation {
            code: H3_CLOSED_CRITICAL_STREAM,
            what: "a QPACK stream was closed",
        };
        loop {
            match quic::RecvStream::poll_data(&mut self.stream, cx) {
                Poll::Ready(Ok(Some(chunk))) => check(&mut self.continuing, &chunk)?,
                Poll::Ready(Ok(None) | Err(StreamErrorIncoming::StreamTerminated { .. })) => return Err(closed),
                Poll::Ready(Err(_)) => return Ok(Poll::Ready(())),
                Poll::Pending => return Ok(Poll::Pending),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoder_stream_may_only_set_a_capacity_of_0() {
        let mut c = None;
        assert!(encoder_instructions(&mut c, &[0x20, 0x20]).is_ok());
        // Capacity 4096 (0x3f 0xe1 0x1f), an insert with a literal name, a duplicate.
        for bad in [&[0x3f, 0xe1, 0x1f][..], &[0x43, b'a', b'b', b'c', 0x01, b'x'], &[0x00]] {
            let err = encoder_instructions(&mut c, bad).expect_err("refused");
            assert_eq!(err.code, QPACK_ENCODER_STREAM_ERROR, "{bad:?}");
        }
    }

    #[test]
    fn the_decoder_stream_may_only_cancel_streams() {
        // Stream Cancellation of stream 4, then of stream 400 split across chunks.
        let mut c = None;
        decoder_instructions(&mut c, &[0x44, 0x7f]).expect("cancellations");
        decoder_instructions(&mut c, &[0xd1]).expect("continued");
        decoder_instructions(&mut c, &[0x02]).expect("ended");
        assert_eq!(c, None);
        for bad in [&[0x84][..], &[0x00], &[0x01]] {
            let err = decoder_instructions(&mut None, bad).expect_err("refused");
            assert_eq!(err.code, QPACK_DECODER_STREAM_ERROR, "{bad:?}");
        }
        // An integer that never ends.
        let endless = [&[0x7f][..], &[0x80; 10]].concat();
        assert!(decoder_instructions(&mut None, &endless).is_err());
    }
}
