//! Listeners and connections: accept on the https and http listeners, run
//! the TLS handshake (refusing unknown SNI before any certificate is sent),
//! serve HTTP/1.1 and HTTP/2 on each connection, and drain on shutdown.

use std::future::{pending, Future};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper::server::conn::{http1, http2};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::LazyConfigAcceptor;

use crate::config::{Config, Listen};
use crate::proxy::{ConnInfo, Proxy};
use crate::tls::{self, SniResolver};
use crate::upstream::Upstream;

/// Time allowed for a whole TLS handshake, from accept to the last handshake message.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to receive a complete HTTP/1 request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time in-flight requests get to finish after shutdown begins.
const GRACE_PERIOD: Duration = Duration::from_secs(30);
/// Pause after a failed accept (e.g. EMFILE) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The bound listening sockets.
pub struct Listeners {
    https: std::net::TcpListener,
    http: Option<std::net::TcpListener>,
}

impl Listeners {
    /// Binds the configured addresses. The error names the address.
    pub async fn bind(listen: &Listen) -> anyhow::Result<Self> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .and_then(TcpListener::into_std)
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
        };
        let https = bind(listen.https).await?;
        let http = match listen.http {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        Ok(Self { https, http })
    }

    /// The address the https listener is bound to (useful after binding port 0).
    pub fn https_addr(&self) -> io::Result<SocketAddr> {
        self.https.local_addr()
    }

    /// The address the plain-http listener is bound to, if there is one.
    pub fn http_addr(&self) -> Option<io::Result<SocketAddr>> {
        self.http.as_ref().map(std::net::TcpListener::local_addr)
    }

    fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            https: self.https.try_clone()?,
            http: self.http.as_ref().map(std::net::TcpListener::try_clone).transpose()?,
        })
    }
}

/// State shared by every connection of one worker.
struct Shared {
    tls: Arc<ServerConfig>,
    sni: Arc<SniResolver>,
    proxy: Arc<Proxy>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

/// The HTTP version a connection speaks: chosen by ALPN on TLS, HTTP/1 on plain http.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// Serves `config` on `listeners` until `shutdown` completes, then stops
/// accepting and waits up to the grace period for open requests to finish.
///
/// Connections are served by one worker thread per core, each with its own
/// single-threaded Tokio runtime and its own upstream connection pool, all
/// accepting on the same sockets: a connection and everything it causes
/// stays on one thread, with no cross-thread wake-ups on the request path.
pub async fn run(config: Config, listeners: Listeners, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let sni = Arc::new(SniResolver::new(
        config.hosts.iter().map(|h| (h.name.clone(), h.certified_key.clone())),
    ));
    let tls = tls::server_config(sni.clone())?;
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);

    tracing::info!(
        https = %listeners.https_addr()?,
        http = %listeners.http_addr().transpose()?.map_or("-".into(), |a| a.to_string()),
        hosts = config.hosts.len(),
        upstream = %format!("{}://{}", config.upstream.scheme, config.upstream.authority),
        workers,
        "linkgate listening"
    );

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut done = Vec::with_capacity(workers);
    for id in 0..workers {
        let shared = Shared {
            tls: tls.clone(),
            sni: sni.clone(),
            proxy: Arc::new(Proxy::new(
                config.hosts.iter().map(|h| h.name.clone()),
                Upstream::new(&config.upstream)?,
            )),
            h1: http1_builder(),
            h2: http2_builder(),
        };
        let listeners = listeners.try_clone()?;
        let stopped = stopped.clone();
        let (finished, on_finish) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("linkgate-{id}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start worker runtime");
                        return;
                    }
                };
                runtime.block_on(worker(Arc::new(shared), listeners, stopped));
                let _ = finished.send(());
            })?;
        done.push(on_finish);
    }
    drop(listeners);

    shutdown.await;
    tracing::info!("shutting down: listeners closed, draining open connections");
    let _ = stop.send(true);
    for worker in done {
        let _ = worker.await;
    }
    tracing::info!("shut down");
    Ok(())
}

/// One worker: accepts on both listeners until `stopped`, then drains.
async fn worker(shared: Arc<Shared>, listeners: Listeners, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let (https, http) = match (
        TcpListener::from_std(listeners.https),
        listeners.http.map(TcpListener::from_std).transpose(),
    ) {
        (Ok(https), Ok(http)) => (https, http),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot register listener");
            return;
        }
    };
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => break,
            accepted = https.accept() => match accepted {
                Ok((stream, peer)) => {
                    let shared = shared.clone();
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        let Some((tls, host)) = handshake(&shared, stream, peer).await else { return };
                        let protocol = if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                            Protocol::Http2
                        } else {
                            Protocol::Http1
                        };
                        let info = Arc::new(ConnInfo { peer, sni: Some(host) });
                        serve(&shared, tls, info, protocol, watcher).await;
                    });
                }
                Err(e) => accept_failed(e).await,
            },
            accepted = accept_optional(http.as_ref()) => match accepted {
                Ok((stream, peer)) => {
                    let shared = shared.clone();
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        let _ = stream.set_nodelay(true);
                        let info = Arc::new(ConnInfo { peer, sni: None });
                        serve(&shared, stream, info, Protocol::Http1, watcher).await;
                    });
                }
                Err(e) => accept_failed(e).await,
            },
        }
    }

    drop(https);
    drop(http);
    tracing::debug!("worker draining open connections");
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!("worker: all connections closed"),
        () = tokio::time::sleep(GRACE_PERIOD) => tracing::warn!("grace period over, closing remaining connections"),
    }
}

fn http1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024);
    builder
}

fn http2_builder() -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(128)
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

async fn accept_optional(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => pending().await,
    }
}

async fn accept_failed(e: io::Error) {
    tracing::warn!(error = %e, "accept failed; retrying shortly");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// Runs the TLS handshake. A ClientHello without SNI or naming a host we do
/// not serve gets an `unrecognized_name` alert and the connection is closed.
async fn handshake(
    shared: &Shared,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, crate::host::HostName)> {
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let start = match timeout_at(
        deadline,
        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream),
    )
    .await
    {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            tracing::debug!(client = %peer, error = %e, "TLS handshake failed before ClientHello");
            return None;
        }
        Err(_) => {
            tracing::debug!(client = %peer, "TLS handshake timed out");
            return None;
        }
    };
    let host = start
        .client_hello()
        .server_name()
        .and_then(|sni| shared.sni.host_for(sni).cloned());
    let Some(host) = host else {
        tracing::debug!(
            client = %peer,
            sni = start.client_hello().server_name().unwrap_or("<none>"),
            "TLS handshake refused: unknown or missing SNI"
        );
        refuse(start.io).await;
        return None;
    };
    match timeout_at(deadline, start.into_stream(shared.tls.clone())).await {
        Ok(Ok(tls)) => Some((tls, host)),
        Ok(Err(e)) => {
            tracing::debug!(client = %peer, sni = %host, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(client = %peer, sni = %host, "TLS handshake timed out");
            None
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

/// Serves HTTP on one established connection until it closes.
async fn serve<IO>(shared: &Shared, io: IO, info: Arc<ConnInfo>, protocol: Protocol, watcher: Watcher)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let proxy = shared.proxy.clone();
    let service = service_fn(move |req| proxy.clone().handle(info.clone(), req));
    let io = TokioIo::new(io);
    let result = match protocol {
        Protocol::Http1 => watcher.watch(shared.h1.serve_connection(io, service)).await,
        Protocol::Http2 => watcher.watch(shared.h2.serve_connection(io, service)).await,
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
