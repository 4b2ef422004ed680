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
    pub(crate) host: Option<HostName>,
    pub(crate) status: u16,
    pub(crate) upstream: Option<Duration>,
    pub(crate) error: Option<&'static str>,
}

/// The body of every response linkgate sends: the upstream's, streamed, or a
/// short one of its own. Counts the bytes sent and writes the access log
/// line when the body ends or is dropped.
pub struct ProxyBody {
    inner: Either<UpstreamBody, Full<Bytes>>,
    sent: u64,
    log: Option<(AccessRecord, Instant)>,
    conn: Arc<ConnInfo>,
    /// The connection's upstream slot this response holds (HTTP/2), freed with it.
    _slot: Option<OwnedSemaphorePermit>,
}

impl ProxyBody {
    /// Wraps `inner`; `log` is the access record and when the request started (`None`: no access line).
    pub(crate) fn new(
        inner: Either<UpstreamBody, Full<Bytes>>,
        log: Option<(AccessRecord, Instant)>,
        conn: Arc<ConnInfo>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Self {
        Self {
            inner,
            sent: 0,
            log,
            conn,
            _slot: slot,
        }
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
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.sent += data.len() as u64;
            }
            crate::connection::progressed();
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
        let conn = &self.conn;
        conn.activity.end();
        let Some((r, started)) = self.log.take() else { return };
        tracing::info!(
            target: "linkgate::access",
            client = %conn.peer,
            host = r.host.as_ref().map_or("-", HostName::as_str),
            method = %r.method,
            path = %Escaped(&r.target),
            status = r.status,
            bytes = self.sent,
            upstream_ms = r.upstream.map_or(-1, |d| d.as_millis() as i64),
            total_ms = started.elapsed().as_millis() as u64,
            protocol = ?r.version,
            tls = conn.tls_version.unwrap_or("-"),
            resumed = if conn.tls_version.is_none() { "-" } else if conn.tls_resumed { "yes" } else { "no" },
            refused = r.error.unwrap_or(""),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::Escaped;

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
}
