//! The upstream side: a pool of HTTP/1.1 connections to the configured
//! upstream (plain or TLS), and the classification of what can go wrong on it.
//!
//! The connection, TLS SNI and certificate verification use the upstream's
//! name, while the Host header the proxy sets carries the branded name.
//! HTTP/1.1 only: an HTTP/2 upstream would receive `:authority` and `host`
//! disagreeing, which is exactly the ambiguity a proxy must not create.
//!
//! Each worker has its own [`Upstream`] (its connections are served on one
//! thread), so the pool is a plain list behind an uncontended lock: the most
//! recently used connection is taken first, connections idle longer than
//! `pool_idle_timeout` are closed, and after a burst the connections it no
//! longer needs are closed within seconds (see [`PURGE_EVERY`]). It is built on hyper's connection API
//! rather than hyper-util's general client because a proxy with one upstream
//! needs none of that client's keying, connector layers or per-request
//! boxing, and those were a measurable part of each request's CPU.

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Scheme;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config;

type BoxError = Box<dyn StdError + Send + Sync>;

/// Every this often, half of the idle connections that have not been used
/// since the last time are closed (keeping one): a burst of clicks can open
/// hundreds of upstream connections (about 30 KiB each), and once it has
/// passed they are closed within seconds instead of `pool_idle_timeout`,
/// while a pool in steady use keeps the connections it uses. (HAProxy's
/// `pool-purge-delay` works the same way.)
pub const PURGE_EVERY: Duration = Duration::from_secs(2);

/// The request body sent upstream: the client's, streamed, capped at `limits.max_request_body`.
pub struct RequestBody {
    first: Option<Frame<Bytes>>,
    rest: Limited<Incoming>,
}

impl RequestBody {
    /// A body whose first frame the proxy has already read (to refuse a
    /// malformed body before anything reaches the upstream), then the rest.
    pub fn new(first: Option<Frame<Bytes>>, rest: Limited<Incoming>) -> Self {
        Self { first, rest }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = this.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut this.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // The upstream gets a Content-Length whenever the client sent one.
        let first = self
            .first
            .as_ref()
            .and_then(Frame::data_ref)
            .map_or(0, |d| d.len() as u64);
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + first);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + first);
        }
        hint
    }
}

/// The pooled client for one upstream. Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct Upstream {
    pool: Arc<Pool>,
}

struct Pool {
    /// Host (without IPv6 brackets) and port to resolve and dial.
    host: String,
    port: u16,
    connect_to: Option<SocketAddr>,
    /// Set for an https upstream: the connector and the name it verifies.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    response_timeout: Duration,
    idle_timeout: Duration,
    /// Idle connections, the most recently used at the back.
    idle: Mutex<VecDeque<Idle>>,
    /// True while a task is closing connections that idle too long.
    sweeping: AtomicBool,
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

impl Idle {
    fn expired(&self, now: Instant, idle_timeout: Duration) -> bool {
        now.saturating_duration_since(self.since) >= idle_timeout
    }
}

/// A response body from the upstream. Its connection goes back to the pool
/// once the body has been read to the end; a body dropped before that (the
/// client went away) takes its connection down with it.
pub struct UpstreamBody {
    inner: Incoming,
    conn: Option<(http1::SendRequest<RequestBody>, Arc<Pool>)>,
}

impl UpstreamBody {
    fn release(&mut self) {
        if let Some((sender, pool)) = self.conn.take() {
            pool.checkin(sender);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.conn = None,
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

/// What went wrong talking to the upstream.
#[derive(Debug)]
pub enum UpstreamError {
    /// No TCP connection could be made (refused, unreachable, connect timeout, DNS).
    Connect(BoxError),
    /// The TLS handshake with the upstream failed (certificate, protocol).
    Tls(BoxError),
    /// No response head within `response_timeout`.
    Timeout(Duration),
    /// The connection broke or the upstream answered something that is not HTTP.
    Broken(BoxError),
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "upstream connect failed: {}", chain(e.as_ref())),
            Self::Tls(e) => write!(f, "upstream TLS failed: {}", chain(e.as_ref())),
            Self::Timeout(d) => write!(f, "upstream sent no response within {d:?}"),
            Self::Broken(e) => write!(f, "upstream connection failed: {}", chain(e.as_ref())),
        }
    }
}

impl StdError for UpstreamError {}

impl UpstreamError {
    /// True when the request failed because the client's body passed the size cap.
    pub fn is_body_limit(&self) -> bool {
        let (Self::Connect(e) | Self::Tls(e) | Self::Broken(e)) = self else {
            return false;
        };
        let mut source: Option<&(dyn StdError + 'static)> = Some(e.as_ref());
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return true;
            }
            source = s.source();
        }
        false
    }
}

/// Formats an error with all its sources on one line.
pub(crate) fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

impl Upstream {
    pub fn new(cfg: &config::Upstream) -> Result<Self, rustls::Error> {
        let mut tls = crate::tls::client_config(cfg.ca_certs.as_deref())?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let host = cfg
            .authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let https = cfg.scheme == Scheme::HTTPS;
        let tls = if https {
            let name = ServerName::try_from(host.clone())
                .map_err(|_| rustls::Error::General(format!("{host}: not a valid TLS server name")))?;
            Some((TlsConnector::from(Arc::new(tls)), name))
        } else {
            None
        };
        Ok(Self {
            pool: Arc::new(Pool {
                port: cfg.authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
                host,
                connect_to: cfg.connect_to,
                tls,
                connect_timeout: cfg.connect_timeout,
                response_timeout: cfg.response_timeout,
                idle_timeout: cfg.pool_idle_timeout,
                idle: Mutex::new(VecDeque::new()),
                sweeping: AtomicBool::new(false),
            }),
        })
    }

    /// Sends a request (its URI in origin form, its Host header set) and
    /// waits for the response head. The body is streamed by the caller. The
    /// caller bounds it with [`Upstream::response_timeout`]: an `async fn`
    /// wrapping the timeout here would keep a second copy of the request in
    /// its future, and every request's future (on HTTP/2, moved into a task
    /// of its own) would be larger for it.
    pub fn send(
        &self,
        req: Request<RequestBody>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, UpstreamError>> + Send + 'static {
        self.pool.clone().request(req)
    }

    /// How long to wait for a response head (connecting included).
    pub fn response_timeout(&self) -> Duration {
        self.pool.response_timeout
    }
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        // Uncontended: one worker's connections run on one thread.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn request(self: Arc<Self>, mut req: Request<RequestBody>) -> Result<Response<UpstreamBody>, UpstreamError> {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                // Boxed: connecting (TLS included) is rare, and inline its
                // state would size every request's future for it.
                None => (Box::pin(self.connect()).await?, false),
            };
            // A pooled connection is ready once its task has finished the previous exchange.
            if let Err(e) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(UpstreamError::Broken(Box::new(e)));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, inner) = resp.into_parts();
                    let mut body = UpstreamBody {
                        inner,
                        conn: Some((sender, self.clone())),
                    };
                    if body.inner.is_end_stream() {
                        body.release();
                    }
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: a pooled connection closed under us. Another one, or a new one, gets it.
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(UpstreamError::Broken(Box::new(e.into_error()))),
                },
            }
        }
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<http1::SendRequest<RequestBody>> {
        let now = Instant::now();
        let mut idle = self.lock();
        while let Some(i) = idle.pop_back() {
            if i.expired(now, self.idle_timeout) {
                // The newest is too old, so are all the others.
                idle.clear();
                return None;
            }
            if !i.sender.is_closed() {
                return Some(i.sender);
            }
        }
        None
    }

    fn checkin(self: Arc<Self>, sender: http1::SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        {
            let mut idle = self.lock();
            self.expire(&mut idle, now);
            idle.push_back(Idle { sender, since: now });
        }
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(sweep(Arc::downgrade(&self)));
        }
    }

    /// Drops connections idle longer than `idle_timeout` (their tasks then close them).
    fn expire(&self, idle: &mut VecDeque<Idle>, now: Instant) {
        while idle
            .front()
            .is_some_and(|i| i.sender.is_closed() || i.expired(now, self.idle_timeout))
        {
            idle.pop_front();
        }
    }

    async fn connect(&self) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let tcp = tokio::time::timeout(self.connect_timeout, self.dial())
            .await
            .map_err(|_| UpstreamError::Connect(format!("no connection within {:?}", self.connect_timeout).into()))??;
        // Request heads and small bodies go out at once.
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(tcp).await,
            Some((connector, name)) => {
                let stream = connector.connect(name.clone(), tcp).await.map_err(|e| {
                    if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                        UpstreamError::Tls(Box::new(e))
                    } else {
                        UpstreamError::Connect(Box::new(e))
                    }
                })?;
                handshake(stream).await
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
        let share = self.connect_timeout / u32::try_from(addrs.len().max(1)).unwrap_or(u32::MAX);
        let mut last = None;
        for addr in addrs {
            match tokio::time::timeout(share, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => return Ok(tcp),
                Ok(Err(e)) => last = Some(connect_error(e)),
                Err(_) => {
                    last = Some(UpstreamError::Connect(
                        format!("{addr}: no answer within {share:?}").into(),
                    ))
                }
            }
        }
        Err(last.unwrap_or_else(|| UpstreamError::Connect(format!("{} has no address", self.host).into())))
    }
}

/// Starts HTTP/1.1 on a new connection; its task runs until the connection closes.
async fn handshake<IO>(io: IO) -> Result<http1::SendRequest<RequestBody>, UpstreamError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| UpstreamError::Broken(Box::new(e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// Closes each idle connection when it has idled `pool_idle_timeout`, and
/// the surplus every [`PURGE_EVERY`], for as long as there are idle
/// connections.
async fn sweep(pool: Weak<Pool>) {
    loop {
        let next = {
            let Some(pool) = pool.upgrade() else {
                return;
            };
            let now = Instant::now();
            let mut idle = pool.lock();
            pool.expire(&mut idle, now);
            purge(&mut idle, now);
            let Some(oldest) = idle.front() else {
                pool.sweeping.store(false, Ordering::Release);
                return;
            };
            // Every PURGE_EVERY, also while only one is idle: more may
            // be checked in before the next wake-up, and nothing else wakes it.
            (oldest.since + pool.idle_timeout).min(now + PURGE_EVERY)
        };
        tokio::time::sleep_until(next.into()).await;
    }
}

/// Closes half (rounded down) of the connections unused for [`PURGE_EVERY`]:
/// the oldest-idle ones, at the front. One unused connection is kept.
fn purge(idle: &mut VecDeque<Idle>, now: Instant) {
    let unused = idle
        .iter()
        .take_while(|i| now.saturating_duration_since(i.since) >= PURGE_EVERY)
        .count();
    idle.drain(..unused / 2);
}
