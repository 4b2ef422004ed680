//! An HTTP/3 stream's frames followed as they pass (RFC 9114 §7.1: a type
//! and a length, both variable-length integers, then the payload): only
//! frame heads are read, payloads are handed on untouched, except the few
//! a caller asks to see whole (a request's head, a control stream's
//! MAX_PUSH_ID), which are small because no frame other than DATA may be
//! longer than the limit.

/// The DATA frame type (RFC 9114 §7.2.1): its payload is streamed, never buffered.
pub(super) const DATA: u64 = 0x0;
/// The HEADERS frame type.
pub(super) const HEADERS: u64 = 0x1;

/// Where a stream is in its frames.
#[derive(Debug)]
pub(super) struct Frames {
    limit: u64,
    state: State,
    /// Which frames' payloads the caller sees whole.
    keep: fn(kind: u64, headers_before: u64) -> bool,
    /// HEADERS frames whose head has been read so far.
    headers: u64,
}

#[derive(Debug)]
enum State {
    /// Reading a frame's type and length (at most 8 bytes each).
    Head { bytes: [u8; 16], len: usize },
    /// Inside a frame's payload, this many bytes of it still to come, and
    /// the part read so far of a payload that is kept.
    Payload {
        kind: u64,
        left: u64,
        kept: Option<Vec<u8>>,
    },
}

/// A frame other than DATA announced longer than the limit.
#[derive(Debug, thiserror::Error)]
#[error("an HTTP/3 frame of type {kind:#x} announced {length} bytes, more than the {limit} allowed")]
pub struct FrameTooLong {
    pub(super) kind: u64,
    pub(super) length: u64,
    pub(super) limit: u64,
}

/// What one step of [`Frames::pass`] found.
pub(super) enum Event<'a> {
    /// A frame's head (its type).
    Head { kind: u64 },
    /// The whole payload of a frame the caller asked to keep.
    Whole { kind: u64, payload: &'a [u8] },
}

impl Frames {
    /// `limit`: the longest frame other than DATA; `keep`: whether the
    /// payload of a frame of type `kind`, after `headers_before` HEADERS
    /// frames, is seen whole.
    pub(super) fn new(limit: u64, keep: fn(kind: u64, headers_before: u64) -> bool) -> Self {
        Self {
            limit,
            state: State::Head { bytes: [0; 16], len: 0 },
            keep,
            headers: 0,
        }
    }

    /// Follows `chunk`, the stream's next bytes, telling `seen` each frame
    /// head and each kept payload as it completes; the first error (a
    /// frame too long, or one of `seen`'s) ends it.
    pub(super) fn pass<E: From<FrameTooLong>>(
        &mut self,
        mut chunk: &[u8],
        seen: &mut dyn FnMut(Event<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        while let Some((&first, rest)) = chunk.split_first() {
            match &mut self.state {
                State::Payload { kind, left, kept } => {
                    let n = usize::try_from(*left).map_or(chunk.len(), |left| left.min(chunk.len()));
                    if let Some(kept) = kept {
                        kept.extend_from_slice(&chunk[..n]);
                    }
                    *left -= n as u64;
                    chunk = &chunk[n..];
                    if *left == 0 {
                        if let Some(payload) = kept {
                            seen(Event::Whole { kind: *kind, payload })?;
                        }
                        self.state = State::Head { bytes: [0; 16], len: 0 };
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
                        }
                        .into());
                    }
                    seen(Event::Head { kind })?;
                    let keep = kind != DATA && (self.keep)(kind, self.headers);
                    if kind == HEADERS {
                        self.headers += 1;
                    }
                    // Within the limit, so it fits in memory.
                    let kept = keep.then(|| Vec::with_capacity(usize::try_from(length).unwrap_or(0)));
                    if length == 0 {
                        if let Some(payload) = &kept {
                            seen(Event::Whole { kind, payload })?;
                        }
                        self.state = State::Head { bytes: [0; 16], len: 0 };
                    } else {
                        self.state = State::Payload {
                            kind,
                            left: length,
                            kept,
                        };
                    }
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
pub(super) fn varint_len(first: u8) -> usize {
    1 << (first >> 6)
}

/// The value of a whole variable-length integer (`bytes` not empty).
pub(super) fn varint(bytes: &[u8]) -> u64 {
    let Some((&first, rest)) = bytes.split_first() else {
        return 0;
    };
    rest.iter()
        .fold(u64::from(first & 0x3f), |v, &b| (v << 8) | u64::from(b))
}

/// The variable-length integer at the start of `bytes`, and its length.
pub(super) fn leading_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let len = varint_len(*bytes.first()?);
    Some((varint(bytes.get(..len)?), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: u64, _: u64) -> bool {
        false
    }

    fn first_headers(kind: u64, headers_before: u64) -> bool {
        kind == HEADERS && headers_before == 0
    }

    fn follow(frames: &mut Frames, chunk: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, FrameTooLong> {
        let mut whole = Vec::new();
        frames.pass(chunk, &mut |e| {
            if let Event::Whole { kind, payload } = e {
                whole.push((kind, payload.to_vec()));
            }
            Ok::<(), FrameTooLong>(())
        })?;
        Ok(whole)
    }

    #[test]
    fn frame_heads_are_followed_across_chunks_and_a_kept_payload_is_seen_whole() {
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
            let mut f = Frames::new(100, first_headers);
            let mut whole = follow(&mut f, &stream[..split]).expect("first part");
            whole.extend(follow(&mut f, &stream[split..]).expect("second part"));
            assert!(
                matches!(f.state, State::Head { len: 0, .. }),
                "split at {split}: {:?}",
                f.state
            );
            assert_eq!(
                whole,
                [(HEADERS, b"abc".to_vec())],
                "split at {split}: only the first HEADERS"
            );
        }
        let mut f = Frames::new(100, none);
        assert!(follow(&mut f, &stream).expect("whole").is_empty());
    }

    #[test]
    fn a_frame_other_than_data_announced_too_long_is_refused_from_its_head() {
        // HEADERS announcing 4 MiB (a four-byte length), no payload yet.
        let mut frames = Frames::new(4096, first_headers);
        let err = follow(&mut frames, &[0x01, 0x80, 0x40, 0x00, 0x00]).expect_err("refused");
        assert_eq!((err.kind, err.length), (0x01, 4 << 20));
        // A reserved frame type (0x21) is held to the same bound.
        let mut frames = Frames::new(4096, none);
        follow(&mut frames, &[0x21, 0x50]).expect("4 KiB + 0x10 not yet whole");
        assert!(follow(&mut frames, &[0x10]).is_err());
        // DATA may be as long as it likes.
        let mut frames = Frames::new(4096, none);
        follow(&mut frames, &[0x00, 0x80, 0x40, 0x00, 0x00, b'x']).expect("data");
    }

    #[test]
    fn varints_are_read_whole_or_not_at_all() {
        assert_eq!(leading_varint(&[0x25]), Some((0x25, 1)));
        assert_eq!(leading_varint(&[0x7b, 0xbd, 0xff]), Some((15293, 2)));
        assert_eq!(leading_varint(&[0x80, 0x00]), None);
        assert_eq!(leading_varint(&[]), None);
    }
}
