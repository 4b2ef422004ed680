//! After the response head: the body wrapper every response goes out in. It
//! counts the bytes sent, ends the request's in-flight mark on its
//! connection, and writes the access log line when the body ends or is
//! dropped (so the line has the real byte count and total time).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};

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
}

impl ProxyBody {
    /// Wraps `inner`; `log` is the access record and when the request started (`None`: no access line).
    pub(crate) fn new(
        inner: Either<UpstreamBody, Full<Bytes>>,
        log: Option<(AccessRecord, Instant)>,
        conn: Arc<ConnInfo>,
    ) -> Self {
        Self {
            inner,
            sent: 0,
            log,
            conn,
        }
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
            path = %r.target,
            status = r.status,
            bytes = self.sent,
            upstream_ms = r.upstream.map_or(-1, |d| d.as_millis() as i64),
            total_ms = started.elapsed().as_millis() as u64,
            protocol = ?r.version,
            tls = conn.tls_version.unwrap_or("-"),
            refused = r.error.unwrap_or(""),
        );
    }
}
