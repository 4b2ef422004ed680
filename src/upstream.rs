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
//!
//! What keeps one exchange from spoiling the next:
//! - a connection goes back to the pool only once its response has been read
//!   to the end *and* its request body has been sent to its end; an upstream
//!   that answers before the body is complete (legal, and common for errors)
//!   gets the connection closed instead, since the rest of that body can no
//!   longer be sent anywhere (see [`Exchange`]);
//! - checkout takes only a connection whose task says it is ready for the
//!   next request, and skips one that is not;
//! - a request that a reused connection lost before any byte of an answer
//!   came back (the upstream's keep-alive timeout closing it as the request
//!   went out) is sent once more on a new connection, when its method is
//!   idempotent and its body can be sent again;
//! - every connection holds a permit of the process-wide cap on upstream
//!   connections, so they can never use up the descriptors clients need;
//! - an address of the upstream's name that refused or timed out is tried
//!   last for [`ADDRESS_PENALTY`].

use std::collections::{HashMap, VecDeque};
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Scheme;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio_rustls::TlsConnector;

use crate::config;
use crate::connection::ClientBody;
use crate::error::chain;

type BoxError = Box<dyn StdError + Send + Sync>;

/// Every this often, half of the idle connections that have not been used
/// since the last time are closed (keeping one): a burst of clicks can open
/// hundreds of upstream connections (about 30 KiB each), and once it has
/// passed they are closed within seconds instead of `pool_idle_timeout`,
/// while a pool in steady use keeps the connections it uses. (HAProxy's
/// `pool-purge-delay` works the same way.)
pub const PURGE_EVERY: Duration = Duration::from_secs(2);

/// An address that refused a connection or did not answer is tried after
/// the others for this long (nginx's `fail_timeout`, with `max_fails=1`).
pub const ADDRESS_PENALTY: Duration = Duration::from_secs(10);

/// What every worker's pools share: the cap on upstream connections
/// across the process, and the counters the pools keep.
#[derive(Clone)]
pub struct Shared {
    /// One permit per open upstream connection.
    pub connections: Arc<Semaphore>,
    /// Requests waiting for a permit, in any worker.
    waiting: Arc<AtomicUsize>,
    /// Told when a request starts waiting for a permit: every worker's pool
    /// then closes its idle connections, whose permits another worker needs
    /// (each worker keeps its own pool, and would otherwise keep an idle
    /// connection until `pool_idle_timeout` while another's requests time out).
    wanted: Arc<Notify>,
    /// Requests sent again on a new connection after a reused one was lost.
    pub retries: Counter,
    /// Connection attempts an address of the upstream's name refused or let time out.
    pub address_failures: Counter,
}

impl Shared {
    /// `max_connections` upstream connections at most, across the process;
    /// the counters are `metrics`'.
    pub fn new(max_connections: usize, metrics: &crate::metrics::Metrics) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(max_connections)),
            waiting: Arc::new(AtomicUsize::new(0)),
            wanted: Arc::new(Notify::new()),
            retries: metrics.upstream_retries.clone(),
            address_failures: metrics.upstream_address_failures.clone(),
        }
    }
}

/// One exchange's request body as its upstream connection sees it, shared
/// between the body being written and the response coming back.
#[derive(Default)]
struct Exchange {
    /// The body has been sent to its end.
    sent: AtomicBool,
    /// The response ended first: the body is to stop, failing the connection.
    abandoned: AtomicBool,
    /// The connection task waiting for more of the body.
    waker: Mutex<Option<Waker>>,
}

impl Exchange {
    fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
        if let Some(w) = self.waker.lock().unwrap_or_else(PoisonError::into_inner).take() {
            w.wake();
        }
    }
}

/// The request body sent upstream: the client's, streamed, capped at `limits.max_request_body`.
pub struct RequestBody {
    first: Option<Frame<Bytes>>,
    /// `None` in a copy made to send again.
    rest: Option<Limited<ClientBody>>,
    /// `None` for a body with nothing left to send after `first`.
    exchange: Option<Arc<Exchange>>,
}

impl RequestBody {
    /// A body whose first frame the proxy has already read (to refuse a
    /// malformed body before anything reaches the upstream), then the rest.
    pub fn new(first: Option<Frame<Bytes>>, rest: Limited<ClientBody>) -> Self {
        let exchange = (!rest.is_end_stream()).then(Arc::default);
        Self {
            first,
            rest: Some(rest),
            exchange,
        }
    }

    /// A copy to send again, when the body is already complete in memory
    /// (none, or a first frame that was the whole of it).
    fn replayable(&self) -> Option<Self> {
        if self.exchange.is_some() {
            return None;
        }
        let first = match &self.first {
            None => None,
            Some(frame) => Some(Frame::data(frame.data_ref()?.clone())),
        };
        Some(Self {
            first,
            rest: None,
            exchange: None,
        })
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
        let (Some(exchange), Some(rest)) = (&this.exchange, &mut this.rest) else {
            return Poll::Ready(None);
        };
        if exchange.abandoned.load(Ordering::Acquire) {
            return Poll::Ready(Some(Err(
                "the upstream answered before the request body was complete".into()
            )));
        }
        let polled = Pin::new(&mut *rest).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => exchange.sent.store(true, Ordering::Release),
            Poll::Ready(Some(Ok(_))) if rest.is_end_stream() => exchange.sent.store(true, Ordering::Release),
            Poll::Pending => {
                *exchange.waker.lock().unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && (self.exchange.is_none() || self.rest.as_ref().is_none_or(Limited::is_end_stream))
    }

    fn size_hint(&self) -> SizeHint {
        // The upstream gets a Content-Length whenever the client sent one.
        let first = self
            .first
            .as_ref()
            .and_then(Frame::data_ref)
            .map_or(0, |d| d.len() as u64);
        let rest = match (&self.exchange, &self.rest) {
            (Some(_), Some(rest)) => rest.size_hint(),
            _ => SizeHint::with_exact(0),
        };
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
    shared: Shared,
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
    /// Addresses that failed lately, and until when they are tried last.
    failed: Mutex<HashMap<SocketAddr, Instant>>,
}

/// One upstream connection as the pool holds it.
struct Conn {
    sender: http1::SendRequest<RequestBody>,
    /// Bytes read from the connection so far: unchanged after a failed
    /// request means the upstream sent no byte of an answer.
    read: Arc<AtomicU64>,
}

struct Idle {
    conn: Conn,
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
    conn: Option<(Conn, Arc<Pool>)>,
    exchange: Option<Arc<Exchange>>,
}

impl UpstreamBody {
    fn release(&mut self) {
        let Some((conn, pool)) = self.conn.take() else {
            return;
        };
        match self.exchange.take() {
            // Answered before the request body was all sent: that connection
            // is midway through a request, and is closed, never reused.
            Some(exchange) if !exchange.sent.load(Ordering::Acquire) => exchange.abandon(),
            _ => pool.checkin(conn),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Dropped early: the connection goes down with it; a body still
        // being sent on it stops now rather than when the client's does.
        if let Some(exchange) = self.exchange.take() {
            if self.conn.is_some() && !exchange.sent.load(Ordering::Acquire) {
                exchange.abandon();
            }
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
    /// The upstream answered `101 Switching Protocols`: linkgate never tunnels.
    Upgrade,
}

impl UpstreamError {
    /// Its metric label (`linkgate_upstream_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Tls(_) => "tls",
            Self::Timeout(_) => "timeout",
            Self::Broken(_) => "reset",
            Self::Upgrade => "upgrade",
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "upstream connect failed: {}", chain(e.as_ref())),
            Self::Tls(e) => write!(f, "upstream TLS failed: {}", chain(e.as_ref())),
            Self::Timeout(d) => write!(f, "upstream sent no response within {d:?}"),
            Self::Broken(e) => write!(f, "upstream connection failed: {}", chain(e.as_ref())),
            Self::Upgrade => write!(f, "upstream switched protocols (101); linkgate does not tunnel"),
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

impl Upstream {
    pub fn new(cfg: &config::Upstream, shared: &Shared) -> Result<Self, rustls::Error> {
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
                shared: shared.clone(),
                port: cfg.authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
                host,
                connect_to: cfg.connect_to,
                tls,
                connect_timeout: cfg.connect_timeout,
                response_timeout: cfg.response_timeout,
                idle_timeout: cfg.pool_idle_timeout,
                idle: Mutex::new(VecDeque::new()),
                sweeping: AtomicBool::new(false),
                failed: Mutex::new(HashMap::new()),
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
        // After a reused connection lost the request, it goes on a new one.
        let mut fresh = false;
        loop {
            let pooled = if fresh { None } else { self.checkout() };
            let (mut conn, reused) = match pooled {
                Some(conn) => (conn, true),
                // Boxed: connecting (TLS included) is rare, and inline its
                // state would size every request's future for it.
                None => (Box::pin(self.connect()).await?, false),
            };
            if !reused {
                conn.sender
                    .ready()
                    .await
                    .map_err(|e| UpstreamError::Broken(Box::new(e)))?;
            }
            // A copy to send again if the upstream closes this reused
            // connection as the request goes out (its keep-alive timeout).
            let again = if reused && idempotent(req.method()) {
                req.body().replayable().map(|body| {
                    let mut copy = Request::new(body);
                    *copy.method_mut() = req.method().clone();
                    *copy.uri_mut() = req.uri().clone();
                    *copy.version_mut() = req.version();
                    *copy.headers_mut() = req.headers().clone();
                    copy
                })
            } else {
                None
            };
            let read_before = conn.read.load(Ordering::Relaxed);
            let exchange = req.body().exchange.clone();
            match conn.sender.try_send_request(req).await {
                Ok(resp) => {
                    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                        return Err(UpstreamError::Upgrade);
                    }
                    let (parts, inner) = resp.into_parts();
                    let mut body = UpstreamBody {
                        inner,
                        conn: Some((conn, self.clone())),
                        exchange,
                    };
                    if body.inner.is_end_stream() {
                        body.release();
                    }
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut e) => match (e.take_message(), again) {
                    // Never written: a pooled connection closed under us. Another one, or a new one, gets it.
                    (Some(unsent), _) if reused => req = unsent,
                    // Written, and lost before any byte of an answer: once more, on a new connection.
                    (_, Some(again)) if conn.read.load(Ordering::Relaxed) == read_before => {
                        tracing::debug!(error = %e.into_error(), "upstream closed a reused connection under a request; sending it again on a new one");
                        self.shared.retries.inc();
                        req = again;
                        fresh = true;
                    }
                    _ => return Err(UpstreamError::Broken(Box::new(e.into_error()))),
                },
            }
        }
    }

    /// The most recently used idle connection that is ready for a request.
    /// One still finishing its previous exchange is skipped (and kept); one
    /// that has closed is dropped.
    fn checkout(&self) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.lock();
        let mut cx = Context::from_waker(Waker::noop());
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if idle[i].expired(now, self.idle_timeout) {
                // This one is too old, so are all before it.
                idle.drain(..=i);
                return None;
            }
            match idle[i].conn.sender.poll_ready(&mut cx) {
                Poll::Ready(Ok(())) => return idle.remove(i).map(|i| i.conn),
                Poll::Ready(Err(_)) => {
                    idle.remove(i);
                }
                Poll::Pending => {}
            }
        }
        None
    }

    fn checkin(self: Arc<Self>, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let now = Instant::now();
        {
            let mut idle = self.lock();
            self.expire(&mut idle, now);
            idle.push_back(Idle { conn, since: now });
        }
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(sweep(Arc::downgrade(&self)));
        }
    }

    /// Drops connections idle longer than `idle_timeout` (their tasks then close them).
    fn expire(&self, idle: &mut VecDeque<Idle>, now: Instant) {
        while idle
            .front()
            .is_some_and(|i| i.conn.sender.is_closed() || i.expired(now, self.idle_timeout))
        {
            idle.pop_front();
        }
    }

    async fn connect(&self) -> Result<Conn, UpstreamError> {
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

/// Methods a request may be sent twice with (RFC 9110 §9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
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

/// Closes each idle connection when it has idled `pool_idle_timeout`, and
/// the surplus every [`PURGE_EVERY`], for as long as there are idle
/// connections; and all of them while a request anywhere waits for an
/// upstream connection permit.
async fn sweep(pool: Weak<Pool>) {
    loop {
        let (next, wanted) = {
            let Some(pool) = pool.upgrade() else {
                return;
            };
            let now = Instant::now();
            let mut idle = pool.lock();
            pool.expire(&mut idle, now);
            purge(&mut idle, now);
            if pool.shared.waiting.load(Ordering::Acquire) > 0 {
                idle.clear();
            }
            let Some(oldest) = idle.front() else {
                pool.sweeping.store(false, Ordering::Release);
                return;
            };
            // Every PURGE_EVERY, also while only one is idle: more may
            // be checked in before the next wake-up, and nothing else wakes it.
            (
                (oldest.since + pool.idle_timeout).min(now + PURGE_EVERY),
                pool.shared.wanted.clone(),
            )
        };
        let notified = wanted.notified();
        tokio::pin!(notified);
        // Registered before the last look at `waiting` below: a request
        // that starts waiting from here on wakes this sweep.
        notified.as_mut().enable();
        let someone_waits = pool
            .upgrade()
            .is_some_and(|p| p.shared.waiting.load(Ordering::Acquire) > 0 && !p.lock().is_empty());
        if someone_waits {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep_until(next.into()) => {}
            () = notified => {}
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
