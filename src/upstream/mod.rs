//! The upstream side: a pool of HTTP/1.1 connections to the configured
//! upstream (plain or TLS), and the classification of what can go wrong on it.
//!
//! The connection, TLS SNI and certificate verification use the upstream's
//! name, while the Host header the proxy sets carries the branded name.
//! HTTP/1.1 only: an HTTP/2 upstream would receive `:authority` and `host`
//! disagreeing, which is exactly the ambiguity a proxy must not create.
//!
//! One job per file: this one holds [`Upstream`] (the pooled client and its
//! send loop, with the one retry), [`Shared`] and [`UpstreamError`];
//! `pool.rs` the idle list (checkout, checkin, sweep, idle shedding, and why
//! the pool is written by hand); `body.rs` the request and response bodies and
//! the exchange they share; `connect.rs` dialling (the address
//! penalty), upstream TLS and the HTTP/1.1 handshake.
//!
//! What keeps one exchange from spoiling the next:
//! - a connection goes back to the pool only once its response has been read
//!   to the end *and* its request body has been sent to its end; an upstream
//!   that answers before the body is complete (legal, and common for errors)
//!   gets the connection closed instead, since the rest of that body can no
//!   longer be sent anywhere (`body.rs`'s `Exchange`);
//! - checkout takes only a connection whose task says it is ready for the
//!   next request, and skips one that is not (`pool.rs`);
//! - a request that a reused connection lost before any byte of an answer
//!   came back (the upstream's keep-alive timeout closing it as the request
//!   went out) is sent once more on a new connection, when its method is
//!   idempotent and its body can be sent again (here);
//! - every connection holds a permit of the process-wide cap on upstream
//!   connections, so they can never use up the descriptors clients need
//!   (`connect.rs`);
//! - an address of the upstream's name that refused or timed out is tried
//!   last for [`ADDRESS_PENALTY`] (`connect.rs`).

use std::collections::{HashMap, VecDeque};
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::Scheme;
use http::{Method, Request, Response};
use http_body::Body;
use prometheus_client::metrics::counter::Counter;
use rustls_pki_types::ServerName;
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsConnector;

use crate::config;
use crate::error::chain;

mod body;
mod connect;
mod pool;

pub use body::{RequestBody, UpstreamBody};
pub use connect::ADDRESS_PENALTY;
pub use pool::PURGE_EVERY;

use pool::Idle;

type BoxError = Box<dyn StdError + Send + Sync>;

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
        self.caused_by::<http_body_util::LengthLimitError>()
    }

    /// True when the request failed because the client's body did (it
    /// broke off, or did not match its Content-Length): the client's doing.
    pub fn is_client_body(&self) -> bool {
        self.caused_by::<crate::connection::ClientBodyError>()
    }

    fn caused_by<T: StdError + 'static>(&self) -> bool {
        let (Self::Connect(e) | Self::Tls(e) | Self::Broken(e)) = self else {
            return false;
        };
        let mut source: Option<&(dyn StdError + 'static)> = Some(e.as_ref());
        while let Some(s) = source {
            if s.is::<T>() {
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
}

/// Methods a request may be sent twice with (RFC 9110 §9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}
