//! New upstream connections: a permit of the process-wide cap, the dial
//! (each address of the upstream's name in turn, those that failed lately
//! last), upstream TLS, and the HTTP/1.1 handshake on I/O that counts the
//! bytes read.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, TryAcquireError};

use super::pool::Conn;
use super::{Pool, UpstreamError};

/// An address that refused a connection or did not answer is tried after
/// the others for this long (nginx's `fail_timeout`, with `max_fails=1`).
pub const ADDRESS_PENALTY: Duration = Duration::from_secs(10);

impl Pool {
    pub(super) async fn connect(&self) -> Result<Conn, UpstreamError> {
        // Waits its turn when the process holds as many upstream connections
        // as it may (the caller's response timeout bounds the wait).
        let shutting_down = |_| UpstreamError::Connect("shutting down".into());
        let permit = match self.shared.connections.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(shutting_down(())),
            Err(TryAcquireError::NoPermits) => {
                let _waiting = Waiting::new(&self.shared.waiting);
                self.shared.wanted.notify_waiters();
                self.shared
                    .connections
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| shutting_down(()))?
            }
        };
        let tcp = tokio::time::timeout(self.connect_timeout, self.dial())
            .await
            .map_err(|_| UpstreamError::Connect(format!("no connection within {:?}", self.connect_timeout).into()))??;
        // Request heads and small bodies go out at once.
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(tcp, permit).await,
            Some((connector, name)) => {
                let stream = connector.connect(name.clone(), tcp).await.map_err(|e| {
                    if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                        UpstreamError::Tls(Box::new(e))
                    } else {
                        UpstreamError::Connect(Box::new(e))
                    }
                })?;
                handshake(stream, permit).await
            }
        }
    }

    /// A TCP connection to `connect_to`, or to the first address of the
    /// upstream's name that accepts one. Each address gets an equal share
    /// of `connect_timeout`, so one that does not answer (an unreachable
    /// IPv6 route, say) leaves time for the next.
    async fn dial(&self) -> Result<TcpStream, UpstreamError> {
        let connect_error = |e: std::io::Error| UpstreamError::Connect(Box::new(e));
        if let Some(addr) = self.connect_to {
            return TcpStream::connect(addr).await.map_err(connect_error);
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| UpstreamError::Connect(format!("cannot resolve {}: {e}", self.host).into()))?
            .collect();
        self.dial_any(addrs).await
    }

    /// The first of `addrs` that accepts a connection, those that failed
    /// lately tried last.
    async fn dial_any(&self, mut addrs: Vec<SocketAddr>) -> Result<TcpStream, UpstreamError> {
        let connect_error = |e: std::io::Error| UpstreamError::Connect(Box::new(e));
        // Those that failed lately last, in the resolver's order otherwise.
        let now = Instant::now();
        {
            let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
            failed.retain(|_, until| *until > now);
            addrs.sort_by_key(|a| failed.contains_key(a));
        }
        let share = self.connect_timeout / u32::try_from(addrs.len().max(1)).unwrap_or(u32::MAX);
        let mut last = None;
        for addr in addrs {
            let error = match tokio::time::timeout(share, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    self.failed.lock().unwrap_or_else(PoisonError::into_inner).remove(&addr);
                    return Ok(tcp);
                }
                Ok(Err(e)) => connect_error(e),
                Err(_) => UpstreamError::Connect(format!("{addr}: no answer within {share:?}").into()),
            };
            self.shared.address_failures.inc();
            let newly = self
                .failed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(addr, Instant::now() + ADDRESS_PENALTY)
                .is_none();
            if newly {
                tracing::warn!(upstream = %self.host, address = %addr, error = %error, "upstream address failed; trying the others first for {ADDRESS_PENALTY:?}");
            }
            last = Some(error);
        }
        Err(last.unwrap_or_else(|| UpstreamError::Connect(format!("{} has no address", self.host).into())))
    }
}

/// A connection's I/O that counts the bytes read from it.
struct Counted<IO> {
    io: IO,
    read: Arc<AtomicU64>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Starts HTTP/1.1 on a new connection; its task runs until the connection
/// closes, holding the connection's permit of the process-wide cap.
async fn handshake<IO>(io: IO, permit: OwnedSemaphorePermit) -> Result<Conn, UpstreamError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let read = Arc::new(AtomicU64::new(0));
    let io = Counted { io, read: read.clone() };
    let (sender, conn) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| UpstreamError::Broken(Box::new(e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
        drop(permit);
    });
    Ok(Conn { sender, read })
}

/// Counts a request waiting for a permit while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use http::uri::Scheme;

    use super::*;
    use crate::config;
    use crate::upstream::{Shared, Upstream};

    #[tokio::test]
    async fn a_failed_address_is_tried_last() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let metrics = crate::metrics::Metrics::new();
        let shared = Shared::new(16, &metrics);
        let cfg = config::Upstream {
            scheme: Scheme::HTTP,
            authority: http::uri::Authority::from_static("upstream.test"),
            connect_to: None,
            ca_certs: None,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(2),
            provider: None,
            max_header_bytes: None,
        };
        let upstream = Upstream::new(&cfg, &shared).expect("upstream");
        let addrs = vec![dead, live.local_addr().expect("addr")];
        for _ in 0..3 {
            upstream.pool.dial_any(addrs.clone()).await.expect("the live address");
        }
        // Refused once, then tried after the live one.
        assert_eq!(shared.address_failures.get(), 1);
        // A dead address alone is still tried (and fails) rather than skipped.
        assert!(upstream.pool.dial_any(vec![dead]).await.is_err());
        assert_eq!(shared.address_failures.get(), 2);
    }
}
