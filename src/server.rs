//! Listeners and connections: accept on the https and http listeners (and
//! serve the admin endpoints), read an optional PROXY header, run the TLS
//! handshake (refusing unknown SNI before any certificate is sent), serve
//! HTTP/1.1 or HTTP/2 on each connection within the configured limits
//! (parking idle HTTP/1.1 connections without their buffers), and drain on
//! shutdown.
//!
//! Connections are served by one worker thread per core, each with its own
//! single-threaded Tokio runtime and its own upstream connection pool, all
//! accepting on the same sockets: a connection and everything it causes
//! stays on one thread, with no cross-thread wake-ups on the request path.

use std::future::{pending, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::{timeout_at, Instant};

use crate::admission::{AcceptFailures, Handshake, Handshakes, Refusal};
use crate::config::{Config, Limits};
use crate::connection::{ConnInfo, Quiet, Resumable, StreamExecutor, WriteDeadline};
use crate::host::HostName;
use crate::metrics::ChallengeLabels;
use crate::proxy::Proxy;
use crate::reload::{Active, Live};
use crate::tls_stream::{Hello, TlsStream};
use crate::upstream::{self, Upstream};
use crate::{acme, admin, proxy_protocol, tls};

/// The bound listening sockets.
pub struct Listeners {
    https: std::net::TcpListener,
    http: Option<std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
}

impl Listeners {
    /// Binds the configured addresses. The error names the address.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        async fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
            TcpListener::bind(addr)
                .await
                .and_then(TcpListener::into_std)
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
        }
        let https = bind(config.listen.https).await?;
        let http = match config.listen.http {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let admin = match config.admin {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        Ok(Self { https, http, admin })
    }

    /// The address the https listener is bound to (useful after binding port 0).
    pub fn https_addr(&self) -> io::Result<SocketAddr> {
        self.https.local_addr()
    }

    /// The address the plain-http listener is bound to, if there is one.
    pub fn http_addr(&self) -> Option<io::Result<SocketAddr>> {
        self.http.as_ref().map(std::net::TcpListener::local_addr)
    }

    /// The address the admin listener is bound to, if there is one.
    pub fn admin_addr(&self) -> Option<io::Result<SocketAddr>> {
        self.admin.as_ref().map(std::net::TcpListener::local_addr)
    }
}

/// What every worker shares.
struct Shared {
    live: Arc<Live>,
    /// The upstream connection cap and counters, across all workers.
    upstream: upstream::Shared,
    /// `limits.max_connections`, across all workers; a permit per open connection.
    connections: Arc<Semaphore>,
    /// Connections not yet through their handshake, in total and per address.
    handshakes: Arc<Handshakes>,
    /// Becomes true when the workers must stop accepting and drain.
    stopping: watch::Receiver<bool>,
}

/// Serves the live configuration on `listeners` until `shutdown` completes,
/// then drains: /readyz turns 503 at once, accepting goes on for
/// `shutdown.drain_delay`, then the listeners close, HTTP/1 connections get
/// `Connection: close` and HTTP/2 connections GOAWAY, and in-flight requests
/// get `shutdown.grace_period` to finish.
pub async fn run(live: Arc<Live>, listeners: Listeners, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let config = live.load().config.clone();
    // Fail now, not on the first connection, if an upstream client cannot be built.
    let upstream_shared = upstream::Shared::new(config.limits.upstream_connections(), &live.metrics);
    for upstream in &config.upstreams {
        Upstream::new(upstream, &upstream_shared)?;
    }
    warn_if_descriptors_fall_short(&config.limits);
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    // Everything that needs a file descriptor is set up before any worker
    // accepts: once one does, a flood of connections can use them all up.
    let mut prepared = Vec::with_capacity(workers);
    for _ in 0..workers {
        let https = listeners.https.try_clone()?;
        let http = listeners
            .http
            .as_ref()
            .map(std::net::TcpListener::try_clone)
            .transpose()?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        prepared.push((runtime, https, http));
    }
    let admin_listener = listeners
        .admin
        .as_ref()
        .map(|l| l.try_clone().and_then(TcpListener::from_std))
        .transpose()?;
    let https_addr = listeners.https_addr()?;
    let http_addr = listeners.http_addr().transpose()?;
    let admin_addr = listeners.admin_addr().transpose()?;

    let (stop, stopping) = watch::channel(false);
    let shared = Arc::new(Shared {
        live: live.clone(),
        upstream: upstream_shared,
        connections: Arc::new(Semaphore::new(config.limits.max_connections as usize)),
        handshakes: Handshakes::new(),
        stopping,
    });
    // Certificates for `acme = true` hosts; stops with this function.
    let acme = AbortOnDrop(acme::spawn(live.clone(), live.acme.clone(), live.metrics.clone()));
    let admin = admin_listener.map(|l| tokio::spawn(admin::serve(l, live.clone())));

    let mut done = Vec::with_capacity(workers);
    for (id, (runtime, https, http)) in prepared.into_iter().enumerate() {
        let shared = shared.clone();
        let (finished, on_finish) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("linkgate-{id}"))
            .spawn(move || {
                runtime.block_on(worker(shared, https, http));
                let _ = finished.send(());
            })?;
        done.push(on_finish);
    }
    drop(listeners);
    tracing::info!(
        https = %https_addr,
        http = %http_addr.map_or("-".into(), |a| a.to_string()),
        admin = %admin_addr.map_or("-".into(), |a| a.to_string()),
        hosts = config.hosts.len(),
        upstream = %config
            .upstreams
            .iter()
            .map(|u| format!("{}://{}", u.scheme, u.authority))
            .collect::<Vec<_>>()
            .join(" "),
        workers,
        "linkgate listening"
    );
    live.ready.store(true, Ordering::SeqCst);

    shutdown.await;
    live.ready.store(false, Ordering::SeqCst);
    let drain = live.load().config.shutdown.clone();
    tracing::info!(drain_delay = ?drain.drain_delay, grace_period = ?drain.grace_period, "shutting down: /readyz now answers 503");
    tokio::time::sleep(drain.drain_delay).await;
    tracing::info!("listeners closed, draining open connections");
    let _ = stop.send(true);
    for worker in done {
        let _ = worker.await;
    }
    if let Some(admin) = admin {
        admin.abort();
    }
    drop(acme);
    tracing::info!("shut down");
    Ok(())
}

/// Warns when `max_connections`, the upstream cap and the reserve together
/// need more descriptors than the process may open: a flood would then run
/// it out of descriptors (EMFILE) before any cap is reached. Only a warning:
/// the defaults assume a raised limit, and a small test machine still runs.
fn warn_if_descriptors_fall_short(limits: &Limits) {
    let Some(available) = crate::config::descriptor_limit() else {
        return;
    };
    let needed = limits.descriptors_needed();
    if needed > available {
        tracing::warn!(
            descriptor_limit = available,
            needed,
            max_connections = limits.max_connections,
            upstream_connections = limits.upstream_connections(),
            "limits.max_connections plus the upstream connections and the descriptors kept in reserve exceed the open-file limit: raise it (ulimit -n, systemd LimitNOFILE) or lower limits.max_connections"
        );
    }
}

/// Aborts a background task when dropped (also when `run` is cancelled).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One worker: accepts on both listeners until told to stop, then waits for
/// its connections to finish (at most the grace period).
async fn worker(shared: Arc<Shared>, https: std::net::TcpListener, http: Option<std::net::TcpListener>) {
    let (https, http) = match (
        TcpListener::from_std(https),
        http.map(TcpListener::from_std).transpose(),
    ) {
        (Ok(https), Ok(http)) => (https, http),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot register listener");
            return;
        }
    };
    // Every connection task holds a sender; when all are dropped, the worker is drained.
    let (open, mut drained) = mpsc::channel::<()>(1);
    let proxies = Arc::new(ProxyCache::new(shared.live.clone(), shared.upstream.clone()));
    let mut stopping = shared.stopping.clone();
    let mut failures = AcceptFailures::default();
    loop {
        let permit = tokio::select! {
            _ = stopping.wait_for(|s| *s) => break,
            permit = shared.connections.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (accepted, is_tls) = tokio::select! {
            _ = stopping.wait_for(|s| *s) => break,
            accepted = https.accept() => (accepted, true),
            accepted = accept_optional(http.as_ref()) => (accepted, false),
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                failures.failed(&e, "accept failed; retrying shortly").await;
                continue;
            }
        };
        let Some(current) = proxies.current() else {
            continue;
        };
        // Closed at once (no TLS alert) when the handshake budget is spent.
        let handshake = match admit(&shared.handshakes, &current.active.config, peer) {
            Ok(h) => h,
            Err(refusal) => {
                shared.live.metrics.refused(refusal.reason());
                tracing::debug!(peer = %peer, reason = refusal.reason(), "connection refused before its handshake");
                continue;
            }
        };
        let (open, shared, proxies) = (open.clone(), shared.clone(), proxies.clone());
        tokio::spawn(async move {
            let metrics = &shared.live.metrics;
            metrics.open_connections.inc();
            connection(&shared, current, proxies, stream, peer, is_tls, handshake).await;
            metrics.open_connections.dec();
            drop(permit);
            drop(open);
        });
    }
    drop((https, http, open));
    let grace = shared.live.load().config.shutdown.grace_period;
    if tokio::time::timeout(grace, drained.recv()).await.is_err() {
        tracing::warn!("grace period over, closing remaining connections");
    }
}

/// One worker's proxy for the configuration in force, looked up per request
/// so that a reload applies to requests on connections that are already
/// open (files, upstreams, hosts), not only to new connections.
struct ProxyCache {
    live: Arc<Live>,
    upstream: upstream::Shared,
    cached: std::sync::Mutex<Option<Arc<Proxy>>>,
}

impl ProxyCache {
    fn new(live: Arc<Live>, upstream: upstream::Shared) -> Self {
        Self {
            live,
            upstream,
            cached: std::sync::Mutex::new(None),
        }
    }

    /// The proxy for the configuration in force (the previous one if the new
    /// one cannot be built).
    fn current(&self) -> Option<Arc<Proxy>> {
        // Uncontended: one worker's connections run on one thread.
        let mut cached = self.cached.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        current_proxy(&self.live, &self.upstream, &mut cached)
    }
}

/// This worker's proxy for the configuration in force: rebuilt after a
/// reload, keeping the pool of every upstream whose settings did not change.
fn current_proxy(live: &Live, shared: &upstream::Shared, cached: &mut Option<Arc<Proxy>>) -> Option<Arc<Proxy>> {
    let active = live.load();
    if let Some(p) = cached.as_ref().filter(|p| p.active.generation == active.generation) {
        return Some(p.clone());
    }
    let mut upstreams = Vec::with_capacity(active.config.upstreams.len());
    for settings in &active.config.upstreams {
        let kept = cached.as_ref().and_then(|p| {
            let i = p.active.config.upstreams.iter().position(|u| u == settings)?;
            p.upstreams.get(i).cloned()
        });
        match kept.map_or_else(|| Upstream::new(settings, shared), Ok) {
            Ok(u) => upstreams.push(u),
            Err(e) => {
                // The roots were checked at start-up and on reload; keep what works if this still fails.
                tracing::error!(error = %e, "cannot build an upstream client for the new configuration");
                return cached.clone();
            }
        }
    }
    let p = Arc::new(Proxy {
        active,
        upstreams,
        metrics: live.metrics.clone(),
    });
    *cached = Some(p.clone());
    Some(p)
}

async fn accept_optional(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => pending().await,
    }
}

/// A slot in the handshake budget for a connection just accepted from
/// `peer`, counted against its address too when that is the client's (no
/// PROXY protocol; not a trusted proxy relaying many clients). Taken in the
/// accept loop, without a pause between the two, so that connections about
/// to be refused for their address never hold the budget meanwhile.
fn admit(handshakes: &Arc<Handshakes>, config: &Config, peer: SocketAddr) -> Result<Handshake, Refusal> {
    let handshake = handshakes.begin(config.limits.max_handshakes)?;
    if !config.listen.proxy_protocol && !config.listen.is_trusted(peer.ip()) {
        handshake.claim_address(peer.ip(), config.limits.handshakes_per_address)?;
    }
    Ok(handshake)
}

/// One client connection, from accept to close. `handshake` is its slot in
/// the handshake budget, given back once the TLS handshake is over (on plain
/// http, once its first request head has been read).
async fn connection(
    shared: &Shared,
    proxy: Arc<Proxy>,
    proxies: Arc<ProxyCache>,
    mut stream: TcpStream,
    peer: SocketAddr,
    is_tls: bool,
    handshake: Handshake,
) {
    let _ = stream.set_nodelay(true);
    let listen = &proxy.active.config.listen;
    let limits = &proxy.active.config.limits;
    let deadline = Instant::now() + limits.handshake_timeout;
    let trusted = listen.is_trusted(peer.ip());
    let mut client = peer;
    if listen.proxy_protocol {
        if !trusted {
            tracing::debug!(peer = %peer, "connection refused: PROXY protocol expected, peer not in trusted_proxies");
            return;
        }
        match timeout_at(deadline, proxy_protocol::read_header(&mut stream)).await {
            Ok(Ok(Some(addr))) => {
                client = addr;
                // Now the client's address is known: its handshakes are
                // counted together (never the balancer's own, which a
                // v2 LOCAL health check keeps).
                if let Err(refusal) = handshake.claim_address(addr.ip(), limits.handshakes_per_address) {
                    shared.live.metrics.refused(refusal.reason());
                    tracing::debug!(client = %client, reason = refusal.reason(), "connection refused before its handshake");
                    return;
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::debug!(peer = %peer, error = %e, "connection dropped: bad PROXY header");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %peer, "connection dropped: no PROXY header in time");
                return;
            }
        }
    }
    let keep_forwarded = trusted && !listen.proxy_protocol;
    let stopping = shared.stopping.clone();
    if !is_tls {
        let info = ConnInfo::new(client, None, keep_forwarded, None);
        let pending = Some(Arc::new(handshake));
        serve(proxy, proxies, stream, info, Protocol::Http1, stopping, pending).await;
        return;
    }
    let established = Box::pin(tls_handshake(&proxy.active, &shared.live, stream, client, deadline)).await;
    // Over, whatever the outcome: its slots are free for others (and it is
    // not kept in the state of a connection that may stay open for long).
    drop(handshake);
    let Some((tls, host)) = established else {
        return;
    };
    let protocol = if tls.alpn_protocol() == Some(b"h2") {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    let version = match tls.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => Some("TLSv1.3"),
        Some(rustls::ProtocolVersion::TLSv1_2) => Some("TLSv1.2"),
        _ => None,
    };
    let info = ConnInfo::new(client, Some(host), keep_forwarded, version);
    serve(proxy, proxies, tls, info, protocol, stopping, None).await;
}

/// Runs the TLS handshake. A ClientHello without SNI or naming a host we do
/// not serve gets an `unrecognized_name` alert and the connection is closed.
async fn tls_handshake(
    active: &Active,
    live: &Live,
    stream: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
) -> Option<(Box<TlsStream>, HostName)> {
    let metrics = &live.metrics;
    let hello = match timeout_at(deadline, Hello::read(stream)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => {
            metrics.handshake("error");
            tracing::debug!(client = %peer, error = %e, "TLS handshake failed before ClientHello");
            return None;
        }
        Err(_) => {
            metrics.handshake("error");
            tracing::debug!(client = %peer, "TLS handshake timed out");
            return None;
        }
    };
    let sni = hello.server_name().map(str::to_owned);
    if hello.offers_alpn(acme::ACME_TLS_ALPN) {
        // Boxed: a rare path must not grow every connection's task (its
        // state would otherwise be part of the future of each connection).
        Box::pin(answer_alpn01(active, live, hello, sni, peer, deadline)).await;
        return None;
    }
    let Some(host) = sni.as_deref().and_then(|sni| active.sni.host_for(sni).cloned()) else {
        let result = match sni.as_deref() {
            None => "no_sni",
            Some(name) if active.sni.acme_host(name).is_some() => "no_certificate",
            Some(_) => "unknown_sni",
        };
        metrics.handshake(result);
        tracing::debug!(client = %peer, sni = sni.as_deref().unwrap_or("<none>"), result, "TLS handshake refused: unknown or missing SNI, or no certificate yet");
        refuse(hello.into_io()).await;
        return None;
    };
    match timeout_at(deadline, hello.handshake(active.tls.clone())).await {
        Ok(Ok(tls)) => {
            metrics.handshake("ok");
            // Boxed: 1.2 KiB, moved into every future that serves the connection.
            Some((Box::new(tls), host))
        }
        Ok(Err(e)) => {
            metrics.handshake("error");
            tracing::debug!(client = %peer, sni = %host, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            metrics.handshake("error");
            tracing::debug!(client = %peer, sni = %host, "TLS handshake timed out");
            None
        }
    }
}

/// A TLS-ALPN-01 validation (ClientHello offering `acme-tls/1`): answered
/// with the challenge certificate when one is pending in storage for this
/// configured ACME host, then closed; refused like an unknown host otherwise.
async fn answer_alpn01(
    active: &Active,
    live: &Live,
    hello: Hello,
    sni: Option<String>,
    peer: SocketAddr,
    deadline: Instant,
) {
    let host = sni.as_deref().and_then(|s| active.sni.acme_host(s)).cloned();
    let config = match (&host, &active.config.acme) {
        (Some(host), Some(acme)) => acme::alpn01_config(acme, host).await,
        _ => None,
    };
    let (Some(host), Some(config)) = (host, config) else {
        live.metrics.handshake("unknown_sni");
        tracing::debug!(client = %peer, sni = sni.as_deref().unwrap_or("<none>"), "acme-tls/1 handshake refused: no challenge pending for this name");
        refuse(hello.into_io()).await;
        return;
    };
    match timeout_at(deadline, hello.handshake(config)).await {
        Ok(Ok(mut tls)) => {
            live.metrics.handshake("acme_challenge");
            live.metrics
                .acme_challenges
                .get_or_create(&ChallengeLabels {
                    host: host.to_string(),
                    challenge: "tls-alpn-01",
                })
                .inc();
            tracing::info!(client = %peer, host = %host, "ACME: answered a tls-alpn-01 challenge");
            let _ = timeout_at(deadline, tls.shutdown()).await;
        }
        _ => {
            live.metrics.handshake("error");
            tracing::debug!(client = %peer, host = %host, "acme-tls/1 handshake failed");
        }
    }
}

async fn refuse(mut io: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = io.write_all(&tls::UNRECOGNIZED_NAME_ALERT).await;
        let _ = io.shutdown().await;
    })
    .await;
}

/// How long an idle connection gets to close gracefully (HTTP/2 GOAWAY and
/// PING round trip, TLS close_notify) before it is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// An HTTP/1.1 keep-alive connection with no request for this long is
/// parked: hyper's connection, with its 16 KiB of buffers, is ended and only
/// the connection itself (socket and TLS state) is held until the next
/// request, which a new hyper connection serves. Long enough that a busy
/// connection never parks between requests.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// The HTTP version a connection speaks: chosen by ALPN on TLS, HTTP/1 on plain http.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// Serves HTTP on one established connection until it closes, is idle for
/// `limits.idle_timeout`, or the server drains. `pending`: a plain-http
/// connection's handshake slot, given back when its first request head has
/// been read.
async fn serve<IO>(
    proxy: Arc<Proxy>,
    proxies: Arc<ProxyCache>,
    io: IO,
    info: ConnInfo,
    protocol: Protocol,
    stopping: watch::Receiver<bool>,
    pending: Option<Arc<Handshake>>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = proxy.active.config.limits.clone();
    let info = Arc::new(match protocol {
        Protocol::Http2 => info.with_upstream_slots(limits.upstream_per_connection),
        Protocol::Http1 => info,
    });
    let service = {
        let (fallback, info) = (proxy.clone(), info.clone());
        service_fn(move |req| {
            if let Some(handshake) = &pending {
                handshake.finish();
            }
            let proxy = proxies.current().unwrap_or_else(|| fallback.clone());
            proxy.handle(info.clone(), req)
        })
    };
    // A client that stops reading is cut after idle_timeout without write progress.
    let io = WriteDeadline::new(io, limits.idle_timeout);
    match protocol {
        Protocol::Http1 => serve_http1(io, service, &info, &limits, stopping).await,
        // Boxed: its future is larger than HTTP/1's, and every connection's
        // task would otherwise be sized for it.
        Protocol::Http2 => Box::pin(serve_http2(io, service, &info, &limits, stopping)).await,
    }
}

/// HTTP/1.1: alternates between serving (a hyper connection) and, once the
/// connection has been idle for [`PARK_AFTER`], parked (no hyper connection,
/// waiting for the first byte of the next request). The wait for the next
/// request is bounded by `idle_timeout`; a request head, by
/// `header_read_timeout` from when hyper starts reading it.
///
/// A connection is parked, and later resumed by a new hyper connection,
/// only when it is between two messages ([`crate::connection::Activity::resumable`]):
/// every request answered, every request body read to its end, and nothing
/// said `Connection: close`. Anything else (a refusal, a body the upstream
/// did not wait for, ambiguous framing) is left to hyper, which closes the
/// connection when it is done: bytes after such a request are never read as
/// a request.
async fn serve_http1<IO, S>(io: IO, service: S, info: &ConnInfo, limits: &Limits, mut stopping: watch::Receiver<bool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<crate::access::ProxyBody>,
            Error = std::convert::Infallible,
        > + Clone
        + Unpin,
{
    // Parking restarts hyper's head timer, so park well within it.
    let park_after = PARK_AFTER.min(limits.header_read_timeout / 2).min(limits.idle_timeout);
    let activity = &info.activity;
    let mut io = Resumable::new(io);
    // Parking needs a request completed since the last time: a connection
    // that never sends one stays under hyper's head timer.
    let mut parked_at = activity.completed();
    loop {
        // Boxed: freed while parked, instead of sizing every connection's task for it.
        let mut conn = Box::pin(http1_builder(limits).serve_connection(TokioIo::new(io), service.clone()));
        let (mut draining, mut parking, mut may_park) = (false, false, true);
        // Set when the idle timeout starts a graceful close: a connection
        // hyper cannot end (midway through a body the client stopped
        // sending) is cut then.
        let mut close_by: Option<Instant> = None;
        let result = loop {
            let park = may_park.then_some((park_after, parked_at));
            tokio::select! {
                result = conn.as_mut() => break result,
                _ = stopping.wait_for(|s| *s), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                quiet = activity.quiet(park, limits.idle_timeout), if !draining && !parking => match quiet {
                    // Between messages: hyper ends the connection at once
                    // (or after the answer it is still writing), and the
                    // next hyper connection is handed what follows.
                    Quiet::Park if activity.resumable() => {
                        parking = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    // Not at a message boundary: hyper keeps it, to its end.
                    Quiet::Park => may_park = false,
                    Quiet::Idle => {
                        draining = true;
                        close_by = Some(Instant::now() + IDLE_CLOSE_GRACE);
                        conn.as_mut().graceful_shutdown();
                    }
                },
                () = tokio::time::sleep_until(close_by.unwrap_or_else(Instant::now)), if close_by.is_some() => {
                    tracing::debug!(client = %info.peer, "idle connection did not close gracefully; closed");
                    return;
                }
            }
        };
        let failed = result.is_err();
        if let Err(e) = result {
            tracing::debug!(client = %info.peer, error = %e, "connection ended with an error");
        }
        let http1::Parts {
            io: taken, read_buf, ..
        } = Pin::into_inner(conn).into_parts();
        io = taken.into_inner();
        if failed {
            close(io.into_inner(), Linger::Yes).await;
            return;
        }
        if draining || !parking || !activity.resumable() {
            // Drained, idle too long, hyper closed it (the client asked, or
            // a request left it midway), or it stopped being resumable
            // while hyper finished. Only the last two follow an answer the
            // client may still be sending into; at a message boundary there
            // is nothing to linger for (and a drain must not wait).
            let linger = if activity.resumable() { Linger::No } else { Linger::Yes };
            close(io.into_inner(), linger).await;
            return;
        }
        parked_at = activity.completed();
        if !read_buf.is_empty() {
            io.replay(read_buf);
            continue;
        }
        // Even empty, it holds on to hyper's read buffer.
        drop(read_buf);
        // Parked.
        tracing::trace!(client = %info.peer, "parked");
        let mut first = [0u8; 1];
        let resumed = tokio::select! {
            read = io.read(&mut first) => match read {
                Ok(1) => true,
                // The client closed or the connection broke.
                _ => return,
            },
            _ = stopping.wait_for(|s| *s) => false,
            _ = activity.quiet(None, limits.idle_timeout) => false,
        };
        if !resumed {
            // Parked: no answer is on its way to the client.
            close(io.into_inner(), Linger::No).await;
            return;
        }
        io.replay(Bytes::copy_from_slice(&first));
    }
}

/// A closing HTTP/1 connection goes on reading (and discarding) what the
/// client still sends until the client closes, with at most
/// [`LINGER_QUIET`] between two reads and [`LINGER`] in all, as nginx's
/// `lingering_timeout` and `lingering_time` (whose defaults these are).
const LINGER: Duration = Duration::from_secs(30);
const LINGER_QUIET: Duration = Duration::from_secs(5);

/// Closes a connection that hyper has finished with: TLS close_notify, then
/// FIN, then what the client is still sending (the rest of a body nobody
/// waited for, pipelined requests after a refusal) is read and discarded
/// (see [`LINGER`]). Closing a socket with unread input, or receiving more
/// after it closed, makes the kernel send a reset, and a reset throws away
/// what the client has not read yet: it would lose the very answers that
/// came before the close.
async fn close<IO: AsyncRead + AsyncWrite + Unpin>(io: IO, linger: Linger) {
    // Boxed: inline, the lingering state (its timers) would be part of
    // every connection's task, parked ones included.
    Box::pin(close_lingering(io, linger)).await;
}

/// Whether a close waits for the client's own (see [`close`]): after an
/// answer, yes; a parked or idle connection has none on its way, and a
/// drain must not wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Linger {
    Yes,
    No,
}

async fn close_lingering<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO, linger: Linger) {
    if tokio::time::timeout(IDLE_CLOSE_GRACE, io.shutdown()).await.is_err() || linger == Linger::No {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = vec![0u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout(LINGER_QUIET, io.read(&mut sink)).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

async fn serve_http2<IO, S>(io: IO, service: S, info: &ConnInfo, limits: &Limits, mut stopping: watch::Receiver<bool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = crate::access::ProxyBody> + Send + 'static,
    S::Future: Send + 'static,
{
    let conn = http2_builder(limits).serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut draining = false;
    // Set when the idle timeout starts a graceful close: a client that
    // never completes it (e.g. ignores HTTP/2's closing PING) is cut then.
    let mut close_by: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(client = %info.peer, error = %e, "connection ended with an error");
                }
                break;
            }
            _ = stopping.wait_for(|s| *s), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = info.activity.quiet(None, limits.idle_timeout), if !draining => {
                draining = true;
                close_by = Some(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(close_by.unwrap_or_else(tokio::time::Instant::now)), if close_by.is_some() => {
                tracing::debug!(client = %info.peer, "idle connection did not close gracefully; closed");
                break;
            }
        }
    }
}

fn http1_builder(limits: &Limits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper answers 431 when a request head does not fit; its buffer has a floor of 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
}

fn http2_builder(limits: &Limits) -> http2::Builder<StreamExecutor> {
    let mut builder = http2::Builder::new(StreamExecutor {
        stall: limits.idle_timeout,
    });
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(128)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Rapid-reset (CVE-2023-44487) and other reset floods: GOAWAY after this many.
        .max_pending_accept_reset_streams(Some(64))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

#[cfg(test)]
mod tests {
    //! `serve` driven over an in-memory client transport whose buffer is
    //! small and fixed, so that an answer stalls behind exactly what the
    //! client has not read: the socket buffers of a real connection are
    //! sized by the kernel, and the window below could not be hit
    //! reliably over TCP. The proxy, hyper and the upstream (raw TCP on
    //! loopback) are the real ones.

    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A raw keep-alive upstream: answers `/big?n=N` with N bytes, anything
    /// else with `ok`, and records every request line it reads.
    async fn upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                            buf.drain(..end + 4);
                            let line = head.lines().next().unwrap_or_default().to_owned();
                            record.lock().expect("lock").push(line.clone());
                            let n: usize = line
                                .split_once("/big?n=")
                                .and_then(|(_, rest)| rest.split(' ').next()?.parse().ok())
                                .unwrap_or(2);
                            let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").into_bytes();
                            answer.resize(answer.len() + n, b'x');
                            if conn.write_all(&answer).await.is_err() {
                                return;
                            }
                        }
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    /// Finding 1(a) of the first audit (#17): a client pipelines a request,
    /// then one that is refused, then `GET /SMUGGLED`, and does not read
    /// for a while. When the first answer just fits what the transport
    /// holds, hyper sends it, answers the refusal (`Connection: close`) and
    /// waits to flush that. A second of quiet later the connection was
    /// parked, and when the client read, hyper ended `Ok` and what it had
    /// not read yet (`GET /SMUGGLED`) was replayed into a new connection and
    /// forwarded. Over TCP the window is a few hundred bytes of answer size
    /// wherever the kernel's buffers happen to end; here the client's side
    /// holds exactly 4 KiB, and answer sizes sweep across its end.
    #[tokio::test]
    async fn a_request_pipelined_behind_a_refusal_is_never_forwarded() {
        let (up, seen) = upstream().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["a.example.test".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        std::fs::write(dir.path().join("a.pem"), cert.pem()).expect("write");
        std::fs::write(dir.path().join("a.key"), key.serialize_pem()).expect("write");
        let config = dir.path().join("linkgate.toml");
        std::fs::write(
            &config,
            format!(
                "[listen]\nhttps = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://sendgrid.net\"\nconnect_to = \"{up}\"\n\
                 [[host]]\nname = \"a.example.test\"\ncert = \"a.pem\"\nkey = \"a.key\"\n"
            ),
        )
        .expect("write");
        let config = Config::load(&config).expect("config");
        let metrics = crate::metrics::Metrics::new();
        let upstream = upstream::Shared::new(config.limits.upstream_connections(), &metrics);
        let live = Live::new(config, metrics).expect("live");
        let proxies = Arc::new(ProxyCache::new(live.clone(), upstream));
        let (_stop, stopping) = watch::channel(false);
        let case = |n: usize| {
            let (proxies, stopping) = (proxies.clone(), stopping.clone());
            async move {
                let proxy = proxies.current().expect("proxy");
                let (mut client, server) = tokio::io::duplex(4096);
                let info = ConnInfo::new("127.0.0.1:40000".parse().expect("addr"), None, false, None);
                let served = tokio::spawn(serve(proxy, proxies, server, info, Protocol::Http1, stopping, None));
                let requests = format!(
                    "GET /big?n={n} HTTP/1.1\r\nHost: a.example.test\r\n\r\n\
                     GET /refused HTTP/1.1\r\nHost: not-served.example.test\r\n\r\n\
                     GET /SMUGGLED-{n} HTTP/1.1\r\nHost: a.example.test\r\n\r\n"
                );
                client.write_all(requests.as_bytes()).await.expect("write");
                // Longer than the second of quiet after which a connection parks.
                tokio::time::sleep(PARK_AFTER + Duration::from_millis(600)).await;
                let mut answers = Vec::new();
                // The end of the connection, if it comes in time.
                let ended = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answers))
                    .await
                    .is_ok_and(|read| read.is_ok());
                drop(client);
                tokio::time::timeout(Duration::from_secs(10), served)
                    .await
                    .expect("the connection's task ends")
                    .expect("no panic");
                let answers = String::from_utf8_lossy(&answers);
                let statuses: Vec<String> = answers
                    .match_indices("HTTP/1.1 ")
                    .map(|(i, _)| answers[i + 9..i + 12].to_owned())
                    .collect();
                (n, statuses, ended)
            }
        };
        let sizes: Vec<usize> = (3000..4200).step_by(8).collect();
        let cases: Vec<_> = sizes.iter().map(|&n| tokio::spawn(case(n))).collect();
        let mut results = Vec::new();
        for case in cases {
            results.push(case.await.expect("case"));
        }
        let seen = seen.lock().expect("lock").clone();
        let smuggled: Vec<&String> = seen.iter().filter(|l| l.contains("SMUGGLED")).collect();
        assert!(smuggled.is_empty(), "forwarded: {smuggled:?}");
        for (n, statuses, ended) in &results {
            assert_eq!(statuses, &["200", "421"], "answer of {n} bytes: two answers");
            assert!(ended, "answer of {n} bytes: the connection is closed after the refusal");
        }
        assert_eq!(
            seen.len(),
            sizes.len(),
            "one request per case reached the upstream: {seen:?}"
        );
    }
}
