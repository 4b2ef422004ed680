//! Whether a request's `Accept` header asks for HTML: content negotiation
//! (RFC 9110 §12.5.1) between the two forms of linkgate's error answers,
//! `text/html` and `text/plain`.

use http::header::{self, HeaderMap};

/// True when the request's Accept ranks `text/html` strictly above
/// `text/plain`: what a browser sends when it navigates
/// (`text/html,application/xhtml+xml,…,*/*;q=0.8`). Each type takes the
/// quality of the most specific range that matches it (`text/html`, then
/// `text/*`, then `*/*`); a tie, no Accept, `*/*` alone, `text/html;q=0`
/// or a header that is not text all keep the plain-text answer.
pub fn prefers_html(headers: &HeaderMap) -> bool {
    let values = || headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok());
    // Most requests (pixels, scripts, link scanners) never name HTML: no parsing for them.
    if !values().any(|v| contains_ignore_case(v, "html")) {
        return false;
    }
    let mut html = Match::NONE;
    let mut plain = Match::NONE;
    for range in values().flat_map(|v| v.split(',')) {
        let mut parts = range.split(';');
        let Some((kind, subtype)) = parts.next().and_then(|t| t.trim().split_once('/')) else {
            continue;
        };
        let (kind, subtype) = (kind.trim(), subtype.trim());
        let mut quality = Some(1000);
        for param in parts {
            if let Some((name, value)) = param.split_once('=') {
                if name.trim().eq_ignore_ascii_case("q") {
                    quality = parse_quality(value.trim());
                }
            }
        }
        // A range whose weight cannot be read says nothing.
        let Some(quality) = quality else { continue };
        html.offer(specificity(kind, subtype, "html"), quality);
        plain.offer(specificity(kind, subtype, "plain"), quality);
    }
    html.quality > plain.quality
}

/// The most specific range seen so far for one media type, and its quality.
#[derive(Clone, Copy)]
struct Match {
    specificity: u8,
    quality: u16,
}

impl Match {
    const NONE: Self = Self {
        specificity: 0,
        quality: 0,
    };

    fn offer(&mut self, specificity: u8, quality: u16) {
        if specificity > self.specificity {
            *self = Self { specificity, quality };
        } else if specificity == self.specificity && specificity > 0 {
            self.quality = self.quality.max(quality);
        }
    }
}

/// How specifically `kind/subtype` names `text/<text_subtype>`: 3 exactly,
/// 2 as `text/*`, 1 as `*/*`, 0 not at all.
fn specificity(kind: &str, subtype: &str, text_subtype: &str) -> u8 {
    match (kind, subtype) {
        ("*", "*") => 1,
        (k, "*") if k.eq_ignore_ascii_case("text") => 2,
        (k, s) if k.eq_ignore_ascii_case("text") && s.eq_ignore_ascii_case(text_subtype) => 3,
        _ => 0,
    }
}

/// A quality value (`0`, `0.8`, `1.000`) in thousandths; `None` when it is
/// not one (RFC 9110 §12.4.2: at most three decimals, at most 1).
fn parse_quality(value: &str) -> Option<u16> {
    let (whole, fraction) = value.split_once('.').unwrap_or((value, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = fraction.bytes().chain(std::iter::repeat(b'0')).take(3);
    let fraction = thousandths.fold(0u16, |n, b| n * 10 + u16::from(b - b'0'));
    match whole {
        "0" => Some(fraction),
        "1" if fraction == 0 => Some(1000),
        _ => None,
    }
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn html(accept: &[&str]) -> bool {
        let mut headers = HeaderMap::new();
        for value in accept {
            headers.append(header::ACCEPT, HeaderValue::from_str(value).expect("value"));
        }
        prefers_html(&headers)
    }

    #[test]
    fn browsers_navigating_get_html() {
        // Chrome, Firefox, Safari (also the in-app browsers of mail apps) on a link click.
        assert!(html(&["text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"]));
        assert!(html(&[
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        ]));
        assert!(html(&["text/html"]));
        assert!(html(&["TEXT/HTML ; Q=1"]));
        assert!(html(&["text/plain;q=0.5, text/html"]));
        assert!(html(&["text/*;q=0.5, text/html;q=0.6"]));
        // Several Accept fields are one list.
        assert!(html(&["application/xml;q=0.9", "text/html"]));
    }

    #[test]
    fn everything_else_keeps_the_text() {
        assert!(!html(&[]), "no Accept (doctor, most scripts)");
        assert!(!html(&["*/*"]), "curl, wget: */* alone is not HTML");
        assert!(!html(&[""]));
        assert!(!html(&["image/webp,image/*,*/*;q=0.8"]), "an open pixel");
        assert!(!html(&["application/json"]));
        assert!(!html(&["text/html;q=0"]), "q=0 is not acceptable");
        assert!(!html(&["text/html;q=0, */*"]));
        assert!(!html(&["text/html;q=0.000,*/*;q=0.1"]));
        assert!(!html(&["text/*"]), "a tie");
        assert!(!html(&["text/html, text/plain"]), "a tie");
        assert!(!html(&["text/plain, text/html;q=0.9"]));
        assert!(!html(&["text/html;q=0.5, text/plain;q=0.8"]));
        // The most specific range decides, not the highest weight.
        assert!(!html(&["text/html;q=0.1, */*;q=1"]), "text/plain from */*, 1 > 0.1");
        assert!(html(&["text/plain;q=0.1, */*;q=1, text/html;q=0.2"]));
        // A weight that cannot be read makes its range say nothing.
        assert!(!html(&["text/html;q=2"]));
        assert!(!html(&["text/html;q=high"]));
        assert!(!html(&["text/html;q=0.8888"]));
        assert!(!html(&["html"]));
        assert!(!html(&["application/xhtml+xml"]), "names html, but not text/html");
    }

    #[test]
    fn quality_values() {
        assert_eq!(parse_quality("1"), Some(1000));
        assert_eq!(parse_quality("1.000"), Some(1000));
        assert_eq!(parse_quality("1."), Some(1000));
        assert_eq!(parse_quality("0"), Some(0));
        assert_eq!(parse_quality("0.8"), Some(800));
        assert_eq!(parse_quality("0.85"), Some(850));
        assert_eq!(parse_quality("0.001"), Some(1));
        for bad in ["1.001", "2", "-0.5", ".5", "0.5.", "", "0x1", "0.+1"] {
            assert_eq!(parse_quality(bad), None, "{bad}");
        }
    }
}
