//! Text that came from outside (a CA's error detail, a certificate's names,
//! a provider's page, a DNS answer), made safe to print on an operator's
//! terminal or write to a log line.
//!
//! Printable characters, spaces and non-ASCII letters stay as they are.
//! Everything a terminal or a log reader acts on is shown escaped instead:
//! control characters (C0, DEL, C1: ESC starts the sequences that clear a
//! screen, set a window title or colour a fake "all pass"), line and
//! paragraph separators (a forged second line), and the bidirectional
//! controls that reorder what is shown (U+202A–U+202E, U+2066–U+2069,
//! U+200E, U+200F, U+061C).

use std::borrow::Cow;
use std::fmt;

/// True for a character that is shown escaped.
pub(crate) fn acts_on_display(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// `s` as it may be printed: see the module documentation.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(acts_on_display) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(Printable(s).to_string())
}

/// Displays its text as [`printable`] returns it, without allocating.
pub struct Printable<'a>(pub &'a str);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(acts_on_display) {
            f.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or_default();
            if c.is_ascii() {
                write!(f, "\\x{:02x}", c as u32)?;
            } else {
                write!(f, "\\u{{{:04x}}}", c as u32)?;
            }
            rest = &rest[i + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn terminal_controls_are_shown_escaped_and_the_rest_kept() {
        let hostile =
            "\x1b[2J\x1b]0;owned\x07\x1b[32mall 5 link brandings pass both checks\r\nnext\u{2028}\u{202e}txt.exe\u{9b}";
        assert_eq!(
            printable(hostile),
            "\\x1b[2J\\x1b]0;owned\\x07\\x1b[32mall 5 link brandings pass both checks\\x0d\\x0anext\\u{2028}\\u{202e}txt.exe\\u{009b}"
        );
        let plain = "order refused: API error: café \"x\" \\ 100% ok";
        assert!(matches!(printable(plain), std::borrow::Cow::Borrowed(_)));
        assert_eq!(printable(plain), plain);
    }
}
