//! What h3 lets through in a request head and HTTP/2 refuses: a
//! pseudo-header field given twice (h3 keeps the last `:path`) or after a
//! regular field (RFC 9114 §4.3: either makes the request malformed).
//! h3's QPACK decoder is not public, so the head's field lines (RFC 9204
//! §4.5) are walked here for their names alone: values are skipped by
//! their length, never decoded. Names come from the static table by index,
//! or as literals, plain or Huffman-coded (RFC 7541 Appendix B); a
//! Huffman-coded pseudo-header name is known by its encoding, which is
//! unique. Anything this walk cannot follow (a dynamic table reference, a
//! truncated block, an unknown index) is left to h3, which refuses it.

/// A request head's pseudo-header fields out of order or repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("pseudo-header field {0} given more than once")]
    Repeated(&'static str),
    #[error("pseudo-header field {0} after a regular field")]
    AfterRegular(&'static str),
    /// A name starting with `:` that is none of [`PSEUDO`] as its one
    /// canonical coding: an undefined pseudo-header field (RFC 9114 §4.3),
    /// or a known one Huffman-coded with padding RFC 7541 §5.2 forbids.
    /// h3 decodes the latter as the name it pads and keeps its value, so
    /// letting it through would let a second `:path` or `:method` win.
    #[error("an unknown pseudo-header field, or one not coded canonically")]
    Unknown,
}

impl Malformed {
    /// The access log's `refused` for it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Repeated(_) => "malformed HTTP/3 request: a pseudo-header field given twice",
            Self::AfterRegular(_) => "malformed HTTP/3 request: a pseudo-header field after a regular field",
            Self::Unknown => "malformed HTTP/3 request: an unknown or non-canonically coded pseudo-header field",
        }
    }
}

/// Request pseudo-header names, each with its Huffman coding.
const PSEUDO: [(&str, &[u8]); 6] = [
    (":authority", &[0xb8, 0x3b, 0x53, 0x39, 0xec, 0x32, 0x7d, 0x7f]),
    (":path", &[0xb9, 0x58, 0xd3, 0x3f]),
    (":method", &[0xb9, 0x49, 0x53, 0x39, 0xe4]),
    (":scheme", &[0xb8, 0x82, 0x4e, 0x5a, 0x4b]),
    (":protocol", &[0xb9, 0x5d, 0x87, 0x49, 0xc8, 0x7a, 0x3f]),
    (":status", &[0xb8, 0x84, 0x8d, 0x36, 0xa3]),
];

/// A field line's name, as far as ordering is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    /// One of [`PSEUDO`], by its index there.
    Pseudo(usize),
    /// Starts with `:` but is none of them as coded: refused (h3 would
    /// refuse an unknown name, but take a padded coding of a known one).
    OtherPseudo,
    Regular,
}

/// Checks the encoded field section `block` (a HEADERS frame's payload).
pub fn check(block: &[u8]) -> Result<(), Malformed> {
    let mut walk = Walk { rest: block };
    // The field section prefix (RFC 9204 §4.5.1): Required Insert Count,
    // then the Base. A section that needs the dynamic table is h3's to refuse.
    if walk.int(8) != Some(0) || walk.int(7).is_none() {
        return Ok(());
    }
    let (mut seen, mut regular) = ([false; PSEUDO.len()], false);
    while !walk.rest.is_empty() {
        let Some(name) = walk.field_line() else {
            return Ok(());
        };
        match name {
            Name::Regular => regular = true,
            Name::OtherPseudo => return Err(Malformed::Unknown),
            Name::Pseudo(i) => {
                let named = PSEUDO[i].0;
                if regular {
                    return Err(Malformed::AfterRegular(named));
                }
                if std::mem::replace(&mut seen[i], true) {
                    return Err(Malformed::Repeated(named));
                }
            }
        }
    }
    Ok(())
}

/// The unread part of a field section.
struct Walk<'a> {
    rest: &'a [u8],
}

impl<'a> Walk<'a> {
    /// One field line's name (RFC 9204 §4.5.2 to §4.5.6); `None` where the
    /// walk stops (h3 decides).
    fn field_line(&mut self) -> Option<Name> {
        let first = *self.rest.first()?;
        if first & 0x80 != 0 {
            // Indexed field line: 1 T index(6).
            let is_static = first & 0x40 != 0;
            let index = self.int(6)?;
            return is_static.then(|| static_name(index)).flatten();
        }
        if first & 0x40 != 0 {
            // Literal field line with name reference: 01 N T index(4), value.
            let is_static = first & 0x10 != 0;
            let index = self.int(4)?;
            self.string(7)?;
            return is_static.then(|| static_name(index)).flatten();
        }
        if first & 0x20 != 0 {
            // Literal field line with literal name: 001 N H length(3), name, value.
            let (huffman, name) = self.string(3)?;
            self.string(7)?;
            return Some(literal_name(huffman, name));
        }
        // Post-base references (0001 ..., 0000 ...) name dynamic table entries.
        None
    }

    /// A prefixed integer with a `bits`-bit prefix (RFC 7541 §5.1).
    fn int(&mut self, bits: u8) -> Option<u64> {
        let (&first, mut rest) = self.rest.split_first()?;
        let max = (1u64 << bits) - 1;
        let mut value = u64::from(first) & max;
        if value == max {
            let mut shift = 0;
            loop {
                let (&b, more) = rest.split_first()?;
                rest = more;
                value = value.checked_add(u64::from(b & 0x7f).checked_shl(shift)?)?;
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
                if shift > 56 {
                    return None;
                }
            }
        }
        self.rest = rest;
        Some(value)
    }

    /// A string literal whose length has a `bits`-bit prefix, the Huffman
    /// flag the bit above it: whether it is Huffman-coded, and its bytes.
    fn string(&mut self, bits: u8) -> Option<(bool, &'a [u8])> {
        let huffman = *self.rest.first()? & (1 << bits) != 0;
        let length = usize::try_from(self.int(bits)?).ok()?;
        let bytes = self.rest.get(..length)?;
        self.rest = &self.rest[length..];
        Some((huffman, bytes))
    }
}

/// The name of static table entry `index` (RFC 9204 Appendix A); `None`
/// past its end.
fn static_name(index: u64) -> Option<Name> {
    let pseudo = |name: &str| PSEUDO.iter().position(|(n, _)| *n == name).map(Name::Pseudo);
    match index {
        0 => pseudo(":authority"),
        1 => pseudo(":path"),
        15..=21 => pseudo(":method"),
        22 | 23 => pseudo(":scheme"),
        24..=28 | 63..=71 => pseudo(":status"),
        2..=14 | 29..=62 | 72..=98 => Some(Name::Regular),
        _ => None,
    }
}

/// A literal name, plain or Huffman-coded (where `:` is the seven bits
/// `1011100`, and every pseudo-header name has one encoding).
fn literal_name(huffman: bool, name: &[u8]) -> Name {
    let known = if huffman {
        PSEUDO.iter().position(|(_, coded)| *coded == name)
    } else {
        PSEUDO.iter().position(|(plain, _)| plain.as_bytes() == name)
    };
    match known {
        Some(i) => Name::Pseudo(i),
        None if huffman && name.first().is_some_and(|b| b >> 1 == 0b101_1100) => Name::OtherPseudo,
        None if !huffman && name.first() == Some(&b':') => Name::OtherPseudo,
        None => Name::Regular,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A field line: a literal name (plain or Huffman-coded) with a value,
    /// a static table name with a value, or a whole static table entry.
    enum Line<'a> {
        Literal(&'a str, &'a str),
        Huffman(&'a [u8], &'a str),
        Static(u8, &'a str),
        Indexed(u8),
    }

    fn section(lines: &[Line<'_>]) -> Vec<u8> {
        let mut out = vec![0x00, 0x00];
        for line in lines {
            match line {
                Line::Literal(name, value) => {
                    assert!(name.len() < 7);
                    out.push(0x20 | name.len() as u8);
                    out.extend_from_slice(name.as_bytes());
                    out.push(value.len() as u8);
                    out.extend_from_slice(value.as_bytes());
                }
                Line::Huffman(coded, value) => {
                    // 001 N H length(3): the length continues past 6.
                    if coded.len() < 7 {
                        out.push(0x28 | coded.len() as u8);
                    } else {
                        out.extend_from_slice(&[0x2f, coded.len() as u8 - 7]);
                    }
                    out.extend_from_slice(coded);
                    out.push(value.len() as u8);
                    out.extend_from_slice(value.as_bytes());
                }
                Line::Static(index, value) => {
                    assert!(*index < 15);
                    out.push(0x50 | index);
                    out.push(value.len() as u8);
                    out.extend_from_slice(value.as_bytes());
                }
                Line::Indexed(index) => {
                    assert!(*index < 63);
                    out.push(0xc0 | index);
                }
            }
        }
        out
    }

    fn get() -> Vec<Line<'static>> {
        vec![
            Line::Indexed(17),
            Line::Indexed(23),
            Line::Static(0, "click.example.test"),
            Line::Static(1, "/ls/click?upn=x"),
        ]
    }

    #[test]
    fn a_well_formed_head_passes() {
        let mut lines = get();
        lines.push(Line::Literal("x-a", "1"));
        lines.push(Line::Indexed(31)); // accept-encoding: gzip, deflate, br
        assert_eq!(check(&section(&lines)), Ok(()));
    }

    #[test]
    fn a_second_path_is_refused_however_it_is_named() {
        for second in [
            Line::Static(1, "/second"),
            Line::Indexed(1),
            Line::Literal(":path", "/second"),
            Line::Huffman(PSEUDO[1].1, "/second"),
        ] {
            let mut lines = get();
            lines.push(second);
            assert_eq!(check(&section(&lines)), Err(Malformed::Repeated(":path")));
        }
        // Any pseudo-header field twice: a second :method.
        let mut lines = get();
        lines.insert(1, Line::Indexed(20));
        assert_eq!(check(&section(&lines)), Err(Malformed::Repeated(":method")));
    }

    #[test]
    fn a_pseudo_header_after_a_regular_field_is_refused() {
        let mut lines = get();
        lines.insert(2, Line::Literal("x-a", "1"));
        assert_eq!(check(&section(&lines)), Err(Malformed::AfterRegular(":authority")));
    }

    #[test]
    fn an_unknown_or_padded_pseudo_header_name_is_refused_wherever_it_is() {
        // A second :path Huffman-coded with padding past its last byte
        // (RFC 7541 §5.2 forbids it; h3 decodes it as :path all the same),
        // or with padding bits that are not EOS's: refused, as is an
        // undefined pseudo-header field, before or after a regular field.
        let padded: Vec<u8> = [PSEUDO[1].1, &[0xff]].concat();
        let bad_bits: Vec<u8> = [PSEUDO[1].1, &[0xfe]].concat();
        let method: Vec<u8> = [PSEUDO[2].1, &[0xff, 0xff]].concat();
        for second in [
            Line::Huffman(&padded, "/second"),
            Line::Huffman(&bad_bits, "/second"),
            Line::Huffman(&method, "DELETE"),
            Line::Literal(":foo", "x"),
        ] {
            let mut lines = get();
            lines.push(second);
            assert_eq!(check(&section(&lines)), Err(Malformed::Unknown));
        }
        let mut lines = get();
        lines.insert(0, Line::Huffman(&padded, "/first"));
        assert_eq!(check(&section(&lines)), Err(Malformed::Unknown));
        let mut lines = get();
        lines.push(Line::Indexed(31));
        lines.push(Line::Literal(":foo", "x"));
        assert_eq!(check(&section(&lines)), Err(Malformed::Unknown));
    }

    #[test]
    fn what_the_walk_cannot_follow_is_left_to_h3() {
        // A dynamic table reference (Required Insert Count 1), a truncated
        // block, an index past the static table.
        assert_eq!(check(&[0x02, 0x00, 0x80]), Ok(()));
        let mut truncated = section(&get());
        truncated.truncate(truncated.len() - 3);
        assert_eq!(check(&truncated), Ok(()));
        assert_eq!(check(&[0x00, 0x00, 0xff, 0x40]), Ok(()));
    }

    #[test]
    fn the_huffman_codings_are_rfc_7541s() {
        // RFC 7541 Appendix B, the codes of the characters these names use.
        let code = |c: char| match c {
            ':' => "1011100",
            'a' => "00011",
            'c' => "00100",
            'd' => "100100",
            'e' => "00101",
            'h' => "100111",
            'i' => "00110",
            'l' => "101000",
            'm' => "101001",
            'o' => "00111",
            'p' => "101011",
            'r' => "101100",
            's' => "01000",
            't' => "01001",
            'u' => "101101",
            'y' => "1111010",
            other => panic!("no code for {other:?}"),
        };
        for (name, coded) in PSEUDO {
            let mut bits: String = name.chars().map(code).collect();
            // Padded with the most significant bits of EOS (all ones).
            while !bits.len().is_multiple_of(8) {
                bits.push('1');
            }
            let bytes: Vec<u8> = (0..bits.len())
                .step_by(8)
                .map(|i| u8::from_str_radix(&bits[i..i + 8], 2).expect("bits"))
                .collect();
            assert_eq!(bytes, coded, "{name}");
        }
    }

    #[test]
    fn prefixed_integers_follow_rfc_7541() {
        // C.1.2: 1337 with a 5-bit prefix.
        let mut walk = Walk {
            rest: &[0x1f, 0x9a, 0x0a, 0xff],
        };
        assert_eq!(walk.int(5), Some(1337));
        assert_eq!(walk.rest, [0xff]);
        // An integer that never ends, or overflows, stops the walk.
        assert_eq!(Walk { rest: &[0x1f, 0x80] }.int(5), None);
        assert_eq!(Walk { rest: &[0x1f; 1] }.int(5), None);
        let huge = [&[0x1f][..], &[0xff; 12]].concat();
        assert_eq!(Walk { rest: &huge }.int(5), None);
    }
}
