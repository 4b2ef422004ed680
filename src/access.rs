//! After the response head: the body wrapper every response goes out in. It
//! counts the bytes sent, ends the request's in-flight mark on its
//! connection, releases the upstream slot the response held, and writes the
//! access log line when the body ends or is dropped (so the line has the
//! real byte count and total time). In the text log the request target is
//! escaped, so that one line is one request and no field can be forged.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use tokio::sync::OwnedSemaphorePermit;

use crate::connection::ConnInfo;
use crate::host::HostName;
use crate::upstream::UpstreamBody;

/// What the access log line says about a request, filled in as it is handled.
pub(crate) struct AccessRecord {
    pub(crate) method: Method,
    pub(crate) target: String,
    pub(crate) version: Version,
    /// The client's User-Agent, at most [`MAX_USER_AGENT`] bytes of it.
    pub(crate) user_agent: Option<String>,
    pub(crate) host: Option<HostName>,
    pub(crate) status: u16,
    pub(crate) upstream: Option<Duration>,
    pub(crate) error: Option<&'static str>,
}

/// How much of a User-Agent the access log keeps: enough for any browser's
/// or link scanner's (Safe Links, Mimecast, Proofpoint), not a client's
/// 8 KiB of padding on every line.
pub(crate) const MAX_USER_AGENT: usize = 256;

/// `value` as the access log keeps it: at most [`MAX_USER_AGENT`] bytes,
/// cut at a character boundary; bytes that are not UTF-8 become U+FFFD.
pub(crate) fn user_agent(value: &http::HeaderValue) -> String {
    let raw = value.as_bytes();
    let text = String::from_utf8_lossy(&raw[..raw.len().min(MAX_USER_AGENT)]);
    let mut end = text.len().min(MAX_USER_AGENT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// One request's access line, written exactly once: with the response when
/// its body ends or is dropped ([`ProxyBody`]), or, when the request is
/// dropped before any answer (the client went away, or the grace period
/// ended), by this guard's own drop, with `status=0` and `cut`.
pub(crate) struct AccessLine {
    record: AccessRecord,
    started: Instant,
    conn: Arc<ConnInfo>,
    /// Set when the server cuts what is left at the end of the grace period.
    grace_over: Arc<AtomicBool>,
    written: bool,
}

impl AccessLine {
    pub(crate) fn new(
        record: AccessRecord,
        started: Instant,
        conn: Arc<ConnInfo>,
        grace_over: Arc<AtomicBool>,
    ) -> Self {
        Self {
            record,
            started,
            conn,
            grace_over,
            written: false,
        }
    }

    pub(crate) fn record(&mut self) -> &mut AccessRecord {
        &mut self.record
    }

    /// Writes the line of a request answered without a body (or refused
    /// by resetting its stream).
    pub(crate) fn answered(mut self) {
        self.write(0, true);
    }

    /// Writes the line: `sent` body bytes; `complete` when the whole answer went out.
    fn write(&mut self, sent: u64, complete: bool) {
        self.written = true;
        let (r, conn) = (&self.record, &self.conn);
        let cut = if complete {
            None
        } else if self.grace_over.load(Ordering::Relaxed) {
            Some("shutdown")
        } else {
            Some("client")
        };
        tracing::info!(
            target: "linkgate::access",
            client = %conn.peer,
            host = r.host.as_ref().map_or("-", HostName::as_str),
            method = %r.method,
            path = %Escaped(&r.target),
            status = r.status,
            bytes = sent,
            upstream_ms = r.upstream.map_or(-1, |d| d.as_millis() as i64),
            total_ms = self.started.elapsed().as_millis() as u64,
            protocol = ?r.version,
            tls = conn.tls_version.unwrap_or("-"),
            resumed = match (conn.tls_version, conn.tls_resumed) {
                (Some(_), Some(true)) => "yes",
                (Some(_), Some(false)) => "no",
                _ => "-",
            },
            user_agent = %Quoted(r.user_agent.as_deref().unwrap_or("-")),
            refused = r.error,
            cut,
        );
    }
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        if !self.written {
            self.record.status = 0;
            self.write(0, false);
        }
    }
}

/// The body of every response linkgate sends: the upstream's, streamed, or a
/// short one of its own. Counts the bytes sent and writes the access log
/// line when the body ends or is dropped.
pub struct ProxyBody {
    inner: Either<UpstreamBody, Full<Bytes>>,
    sent: u64,
    /// The body's last frame has been handed to the client connection.
    ended: bool,
    log: Option<AccessLine>,
    conn: Arc<ConnInfo>,
    /// The connection's upstream slot this response holds (HTTP/2), freed with it.
    _slot: Option<OwnedSemaphorePermit>,
    /// What the transport said reached the client ([`ProxyBody::delivered`]).
    delivered: Option<(u64, bool)>,
}

impl ProxyBody {
    /// Wraps `inner`; `log` is the request's access line (`None`: no access log).
    pub(crate) fn new(
        inner: Either<UpstreamBody, Full<Bytes>>,
        log: Option<AccessLine>,
        conn: Arc<ConnInfo>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Self {
        Self {
            inner,
            sent: 0,
            ended: false,
            log,
            conn,
            _slot: slot,
            delivered: None,
        }
    }

    /// What the transport knows reached the client, for the access line in
    /// place of what was handed out: `bytes` of the body, and whether the
    /// answer went out whole. HTTP/3 tells (the bytes QUIC took within the
    /// client's flow control, and whether the stream was finished); hyper
    /// does not, so over HTTP/1.1 and HTTP/2 the line counts what was
    /// handed to hyper.
    pub fn delivered(&mut self, bytes: u64, whole: bool) {
        self.delivered = Some((bytes, whole));
    }
}

/// False when the log is JSON, whose encoder escapes every value itself.
static ESCAPE_TEXT: AtomicBool = AtomicBool::new(true);

/// Tells the access log whether it is written as text (values escaped here)
/// or as JSON (escaped by the encoder; escaping here too would double it).
pub fn set_text_log(text: bool) {
    ESCAPE_TEXT.store(text, Ordering::Relaxed);
}

/// A value from the client as the text log shows it: printable ASCII as it
/// is, except `"`, `\` and space; everything else (control characters,
/// ESC, line and paragraph separators, any non-ASCII character) as a `\x..`
/// or `\u{..}` escape. What a client sends can then neither end the line
/// nor look like another field.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !ESCAPE_TEXT.load(Ordering::Relaxed) {
            return f.write_str(self.0);
        }
        let mut rest = self.0;
        while let Some(i) = rest.find(|c: char| !c.is_ascii_graphic() || c == '"' || c == '\\') {
            f.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or_default();
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                c if c.is_ascii() => write!(f, "\\x{:02x}", c as u32)?,
                c => write!(f, "\\u{{{:04x}}}", c as u32)?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
                crate::connection::progressed();
            }
            Poll::Ready(None) => self.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        self.conn.activity.end();
        if let Some(mut line) = self.log.take() {
            let (sent, complete) = self.delivered.unwrap_or_else(|| {
                // hyper stops polling once the body says it is at its end.
                (self.sent, self.ended || self.inner.is_end_stream())
            });
            line.write(sent, complete);
        }
    }
}

/// A value from the client shown in double quotes: as [`Escaped`], except
/// that spaces stay as they are (a User-Agent is words). In JSON, as it is.
pub struct Quoted<'a>(pub &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !ESCAPE_TEXT.load(Ordering::Relaxed) {
            return f.write_str(self.0);
        }
        f.write_str("\"")?;
        for (i, word) in self.0.split(' ').enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            Escaped(word).fmt(f)?;
        }
        f.write_str("\"")
    }
}

#[cfg(test)]
mod tests {
    use super::{user_agent, Escaped, Quoted, MAX_USER_AGENT};

    #[test]
    fn text_log_values_cannot_end_the_line_or_forge_a_field() {
        let forged = "/a\u{2028}client=1.2.3.4 status=200\u{85}\x1b[2J\"x\\y\r\n\u{e9}";
        let shown = Escaped(forged).to_string();
        assert_eq!(
            shown,
            "/a\\u{2028}client=1.2.3.4\\x20status=200\\u{0085}\\x1b[2J\\\"x\\\\y\\x0d\\x0a\\u{00e9}"
        );
        assert!(shown.chars().all(|c| c.is_ascii_graphic()), "{shown}");
        assert_eq!(Escaped("/c/abc?q=1&r=%20").to_string(), "/c/abc?q=1&r=%20");
    }

    #[test]
    fn a_user_agent_keeps_its_spaces_inside_quotes_and_nothing_else_unescaped() {
        let ua = "Mozilla/5.0 (Windows NT 10.0) \"x\"\nstatus=200 \u{202e}";
        assert_eq!(
            Quoted(ua).to_string(),
            "\"Mozilla/5.0 (Windows NT 10.0) \\\"x\\\"\\x0astatus=200 \\u{202e}\""
        );
    }

    #[test]
    fn a_user_agent_is_cut_at_a_character_boundary() {
        let long = format!("{}{}", "a".repeat(MAX_USER_AGENT - 1), "é".repeat(10));
        let kept = user_agent(&http::HeaderValue::from_str(&long).expect("value"));
        assert_eq!(kept, "a".repeat(MAX_USER_AGENT - 1));
        let raw = http::HeaderValue::from_bytes(b"curl/8 \xff").expect("obs-text");
        assert_eq!(user_agent(&raw), "curl/8 \u{fffd}");
    }
}
