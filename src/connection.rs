//! What is known about one client connection: its client address, the host
//! its TLS handshake named, whether its forwarding headers are trusted, and
//! the requests in flight on it (for the idle timeout).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::host::HostName;

/// What the server knows about the connection a request came in on.
#[derive(Debug)]
pub struct ConnInfo {
    /// The client's address: the peer, or what its PROXY header said.
    pub peer: SocketAddr,
    /// The configured host the TLS handshake named; `None` on plain http.
    pub sni: Option<HostName>,
    /// Keep and append to the incoming X-Forwarded-For/-Proto: the peer is a
    /// trusted proxy speaking HTTP (not a PROXY-protocol balancer relaying a client).
    pub keep_forwarded: bool,
    /// Negotiated TLS version, for the access log.
    pub tls_version: Option<&'static str>,
    /// Requests in flight, for the idle timeout.
    pub activity: Activity,
}

impl ConnInfo {
    pub fn new(
        peer: SocketAddr,
        sni: Option<HostName>,
        keep_forwarded: bool,
        tls_version: Option<&'static str>,
    ) -> Self {
        Self {
            peer,
            sni,
            keep_forwarded,
            tls_version,
            activity: Activity::new(),
        }
    }

    pub(crate) fn proto(&self) -> &'static str {
        if self.sni.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// Counts the requests in flight on a connection (from request head to the
/// end of the response body) and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicU32,
    /// Milliseconds after `epoch` when the connection last became idle.
    idle_since_ms: AtomicU64,
    epoch: tokio::time::Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
        }
    }

    pub(crate) fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn end(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.idle_since_ms.store(ms, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Completes once no request has been in flight for `limit`.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let idle_since = self.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
            let busy = self.in_flight.load(Ordering::Relaxed) > 0;
            if !busy && idle_since + limit <= tokio::time::Instant::now() {
                return;
            }
            let next = if busy {
                tokio::time::Instant::now() + limit
            } else {
                idle_since + limit
            };
            tokio::time::sleep_until(next).await;
        }
    }
}
