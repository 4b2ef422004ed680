//! Listeners and connections: accept on the https and http listeners (and
//! serve the admin endpoints), read an optional PROXY header, run the TLS
//! handshake (refusing unknown SNI before any certificate is sent), serve
//! HTTP/1.1 or HTTP/2 on each connection within the configured limits
//! (parking idle HTTP/1.1 connections without their buffers), serve
//! HTTP/3 over QUIC on the UDP socket of `listen.http3`, and drain on
//! shutdown.
//!
//! Connections are served by one worker thread per core, each with its own
//! single-threaded Tokio runtime and its own upstream connection pool, all
//! accepting on the same sockets: a connection and everything it causes
//! stays on one thread, with no cross-thread wake-ups on the request path.
//! The QUIC endpoint has a thread and runtime of its own, run the same way.
//!
//! Files in request order: this one (binding, workers, drain), `accept`
//! (admission, plain or TLS), `proxy_protocol` (the PROXY header),
//! `handshake` (SNI refusal, TLS-ALPN-01), `http` (HTTP/1.1 with parking,
//! HTTP/2), `close` (closing, lingering where the client may still send),
//! `io` (the bound on stalled writes, the stream a parked connection
//! resumes on), `proxies` (the per-worker proxy for the
//! configuration in force, and Alt-Svc); `quic` (the QUIC endpoint, its
//! bounds and drain), `http3` (one HTTP/3 connection and its requests) and
//! `quic_streams` (what h3 lacks, added as the bytes pass: the bound on
//! frames h3 would buffer whole, malformed pseudo-header fields, the
//! client's unidirectional streams, the body bytes QUIC took).

mod accept;
mod close;
mod handshake;
mod http;
mod http3;
mod io;
mod proxies;
pub mod proxy_protocol;
mod quic;
pub(crate) mod quic_streams;

use std::future::{pending, Future};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ::http::HeaderValue;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::admission::{AcceptFailures, Clients, Handshakes, Occasional};
use crate::config::{Config, Limits};
use crate::reload::Live;
use crate::upstream::{self, Upstream};
use crate::{acme, admin};

use accept::{admit, establish};
use proxies::{alt_svc, ProxyCache};

/// The bound listening sockets.
pub struct Listeners {
    https: std::net::TcpListener,
    http: Option<std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
    /// `listen.http3`'s UDP socket.
    http3: Option<std::net::UdpSocket>,
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
        let http3 = match &config.listen.http3 {
            Some(h3) => Some(
                std::net::UdpSocket::bind(h3.addr)
                    .map_err(|e| anyhow::anyhow!("cannot listen on {} (UDP, listen.http3): {e}", h3.addr))?,
            ),
            None => None,
        };
        Ok(Self {
            https,
            http,
            admin,
            http3,
        })
    }

    /// The address the HTTP/3 (UDP) socket is bound to, if there is one.
    pub fn http3_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.http3.as_ref().map(std::net::UdpSocket::local_addr)
    }

    /// The address the https listener is bound to (useful after binding port 0).
    pub fn https_addr(&self) -> std::io::Result<SocketAddr> {
        self.https.local_addr()
    }

    /// The address the plain-http listener is bound to, if there is one.
    pub fn http_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.http.as_ref().map(std::net::TcpListener::local_addr)
    }

    /// The address the admin listener is bound to, if there is one.
    pub fn admin_addr(&self) -> Option<std::io::Result<SocketAddr>> {
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
    /// Connections open from each client address.
    clients: Arc<Clients>,
    /// `Alt-Svc` for every https answer while HTTP/3 is on.
    alt_svc: Option<HeaderValue>,
    /// Becomes true when the workers must stop accepting and drain.
    stopping: watch::Receiver<bool>,
    /// Connections dropped for their PROXY header (or the lack of one): a
    /// balancer that does not send one, or trusted_proxies that do not name it.
    proxy_refusals: Occasional,
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
    let http3_addr = listeners.http3_addr().transpose()?;
    // Before any thread starts: a QUIC setting quinn refuses stops start-up.
    let http3 = match &listeners.http3 {
        Some(socket) => Some((
            socket.try_clone()?,
            quic::server_config(&live, &config.limits)?,
            quic::runtime()?,
        )),
        None => None,
    };
    let alt_svc = http3_addr.map(|bound| {
        let port = config
            .listen
            .http3
            .as_ref()
            .and_then(|h| h.advertise_port)
            .unwrap_or(bound.port());
        alt_svc(port)
    });
    let admin_addr = listeners.admin_addr().transpose()?;

    let (stop, stopping) = watch::channel(false);
    let shared = Arc::new(Shared {
        live: live.clone(),
        upstream: upstream_shared,
        connections: Arc::new(Semaphore::new(config.limits.max_connections as usize)),
        handshakes: Handshakes::new(),
        clients: Clients::new(),
        proxy_refusals: Occasional::default(),
        alt_svc,
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
                // Dropping the runtime drops what is left on it (HTTP/2 streams
                // of connections cut at the end of the grace period), writing
                // their access lines before the server reports it has stopped.
                drop(runtime);
                let _ = finished.send(());
            })?;
        done.push(on_finish);
    }
    if let Some((socket, server_config, runtime)) = http3 {
        let shared = shared.clone();
        let (finished, on_finish) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("linkgate-quic".into())
            .spawn(move || {
                runtime.block_on(quic::serve(shared, socket, server_config));
                drop(runtime);
                let _ = finished.send(());
            })?;
        done.push(on_finish);
    }
    drop(listeners);
    tracing::info!(
        https = %https_addr,
        http = %http_addr.map_or("-".into(), |a| a.to_string()),
        http3 = %http3_addr.map_or("-".into(), |a| a.to_string()),
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
    let proxies = Arc::new(ProxyCache::new(
        shared.live.clone(),
        shared.upstream.clone(),
        shared.alt_svc.clone(),
    ));
    let mut stopping = shared.stopping.clone();
    let mut failures = AcceptFailures::default();
    // This worker's connection tasks: drained when it stops, cut when the grace period is over.
    let mut tasks = JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = stopping.wait_for(|s| *s) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            permit = shared.connections.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (accepted, is_tls) = tokio::select! {
            _ = stopping.wait_for(|s| *s) => break,
            accepted = https.accept() => (accepted, true),
            accepted = accept_optional(http.as_ref()) => (accepted, false),
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
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
        let admitted = match admit(&shared, &current.active.config, peer) {
            Ok(h) => h,
            Err(refusal) => {
                shared.live.metrics.refused(refusal.reason());
                tracing::debug!(peer = %peer, reason = refusal.reason(), "connection refused before its handshake");
                continue;
            }
        };
        shared.live.metrics.open_connections.inc();
        // Boxed, and done with before the connection is served: an open
        // connection's task then holds nothing of its handshake.
        let establishing = Box::pin(establish(
            shared.clone(),
            current,
            proxies.clone(),
            stream,
            peer,
            is_tls,
            admitted,
        ));
        let shared = shared.clone();
        tasks.spawn(async move {
            if let Some(ready) = establishing.await {
                ready.serve().await;
            }
            shared.live.metrics.open_connections.dec();
            drop(permit);
        });
    }
    drop((https, http));
    let grace = shared.live.load().config.shutdown.grace_period;
    let drained = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!("grace period over, closing remaining connections");
        // Cut, and wait until each is dropped: every request still open
        // writes its access line (`cut="shutdown"`) before the server stops.
        shared.live.grace_over.store(true, Ordering::SeqCst);
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

async fn accept_optional(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => pending().await,
    }
}
