//! The admin listener: `/healthz` (the process runs), `/readyz` (listeners
//! up and configuration loaded; 503 while draining) and `/metrics`
//! (Prometheus text format). Keep it on a private address.
//!
//! A connection may start with a PROXY protocol header (v1 or v2), which is
//! read and ignored: a balancer that sends one on every connection to a
//! target (an AWS NLB with PROXY protocol on does, on its health checks
//! too) can health-check `/readyz` here.
//!
//! At most [`ADMIN_CONNECTIONS`] admin connections are open at once; more are
//! closed as soon as they are accepted, so a flood of admin connections
//! cannot take the descriptors the proxy's own listeners need.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::admission::AcceptFailures;
use crate::reload::Live;
use crate::response::Local;

/// Admin connections open at once, at most: a prober, a scraper and an
/// operator need a few; the descriptor reserve of the data path is counted
/// with this many.
pub const ADMIN_CONNECTIONS: usize = 16;

/// Serves the admin endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, live: Arc<Live>) {
    let slots = Arc::new(Semaphore::new(ADMIN_CONNECTIONS));
    let mut failures = AcceptFailures::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                failures.failed(&e, "admin accept failed").await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            live.metrics.refused("admin_connections");
            tracing::debug!(peer = %peer, "admin connection refused: {ADMIN_CONNECTIONS} already open");
            continue;
        };
        let live = live.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut stream = stream;
            match tokio::time::timeout(Duration::from_secs(5), skip_proxy_header(&mut stream)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer, error = %e, "admin connection closed: bad PROXY header");
                    return;
                }
                Err(_) => return,
            }
            let service = service_fn(move |req| {
                let live = live.clone();
                async move { Ok::<_, Infallible>(answer(&live, &req)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Reads and drops a PROXY protocol header if the connection starts with
/// one; anything else is left for HTTP. Only peeks until it can tell.
async fn skip_proxy_header(stream: &mut tokio::net::TcpStream) -> std::io::Result<()> {
    use crate::server::proxy_protocol;
    let mut start = [0u8; 5];
    loop {
        let n = stream.peek(&mut start).await?;
        let seen = &start[..n];
        let v1 = b"PROXY".starts_with(seen);
        let v2 = proxy_protocol::V2_SIGNATURE.starts_with(seen);
        if n == 0 || !(v1 || v2) {
            return Ok(());
        }
        if n == start.len() {
            break;
        }
        // A prefix of a header so far: wait for the rest.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy_protocol::read_header(stream)
        .await
        .map(drop)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

/// `linkgate health`: asks the running linkgate whose `[admin] listen` is
/// in `config` for `/healthz` (or `/readyz` with `ready`). Exit status: 0
/// healthy, 1 not, 2 unusable arguments (no `[admin] listen`).
pub fn health(config: &std::path::Path, ready: bool, timeout: Duration) -> std::process::ExitCode {
    use std::process::ExitCode;
    let path = if ready { "/readyz" } else { "/healthz" };
    let addr = match crate::config::Outline::read(config).and_then(|o| o.admin_address()) {
        Ok(Some(addr)) => addr,
        Ok(None) => {
            eprintln!("linkgate: error: {}: no [admin] listen to probe", config.display());
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("linkgate: error: {e}");
            return ExitCode::from(2);
        }
    };
    match probe(addr, path, timeout) {
        Ok(200) => {
            println!("{path}: 200");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            println!("{path}: {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("{path}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn answer(live: &Live, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        Local::new(status)
            .text(Bytes::from_static(body.as_bytes()))
            .map(Full::new)
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if live.ready.load(Ordering::SeqCst) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => {
            // OpenMetrics for a scraper that asks for it (Prometheus does), the
            // classic text format otherwise; each with TYPE and HELP named as
            // its series are.
            let openmetrics = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| v.contains("application/openmetrics-text")));
            let (body, content_type) = if openmetrics {
                (
                    live.metrics.encode(),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
            } else {
                (
                    live.metrics.encode_classic(),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            };
            Local::new(StatusCode::OK)
                .header(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type))
                .body(body)
                .map(Full::new)
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /healthz, /readyz or /metrics\n"),
    }
}

/// One GET of `path` on the admin listener at `addr` (an unspecified address
/// such as 0.0.0.0 is probed on loopback), bounded by `timeout`; the status
/// code. Blocking and dependency-free: it is what `linkgate health` runs.
pub fn probe(addr: std::net::SocketAddr, path: &str, timeout: std::time::Duration) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < 12 {
        match stream.read(&mut head[len..])? {
            0 => break,
            n => len += n,
        }
    }
    std::str::from_utf8(&head[..len])
        .ok()
        .and_then(|s| s.strip_prefix("HTTP/1.1 ").or_else(|| s.strip_prefix("HTTP/1.0 ")))
        .and_then(|s| s.get(..3)?.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer"))
}
