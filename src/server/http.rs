//! HTTP on an established connection: HTTP/1.1 alternating between a
//! hyper connection and parked (no buffers held), HTTP/2 with its stream
//! executor, the limits of both, and when a connection closes (how is
//! `close.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::watch;

use super::close::{close, Linger};
use super::io::{Resumable, WriteDeadline};
use crate::admission::{ClientSlot, Handshake};
use crate::config::Limits;
use crate::connection::{ConnInfo, Quiet, StreamExecutor};
use crate::inbound::Inbound;
use crate::proxy::Proxy;

use super::ProxyCache;
/// How long an idle connection gets to close gracefully (HTTP/2 GOAWAY and
/// PING round trip, TLS close_notify) before it is dropped.
pub(super) const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// An HTTP/1.1 keep-alive connection with no request for this long is
/// parked: hyper's connection, with its 16 KiB of buffers, is ended and only
/// the connection itself (socket and TLS state) is held until the next
/// request, which a new hyper connection serves. Long enough that a busy
/// connection never parks between requests.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// The HTTP version a connection speaks: chosen by ALPN on TLS, HTTP/1 on plain http.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Http1,
    Http2,
}

/// A connection through its handshake, as HTTP is served on it.
pub(super) struct Established<IO> {
    /// The proxy of the configuration it was accepted under (its limits
    /// apply to it for its life; each request uses the current one).
    pub proxy: Arc<Proxy>,
    pub proxies: Arc<ProxyCache>,
    pub io: IO,
    pub info: Arc<ConnInfo>,
    pub protocol: Protocol,
    pub stopping: watch::Receiver<bool>,
    /// A plain-http connection's handshake slot, given back when its first
    /// request head has been read.
    pub pending: Option<Arc<Handshake>>,
    /// Its place among its address's open connections, given back when it closes.
    pub slot: Option<ClientSlot>,
}

/// Serves HTTP on one established connection until it closes, is idle for
/// `limits.idle_timeout`, or the server drains.
///
/// A function returning a future, rather than an `async fn`, as are the
/// other long-lived ones here: an `async fn` keeps a second copy of its
/// arguments for its whole life, and this state is every open connection's.
#[allow(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice")]
pub(super) fn serve<IO>(conn: Established<IO>) -> impl Future<Output = ()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Established {
        proxy,
        proxies,
        io,
        info,
        protocol,
        stopping,
        pending,
        slot,
    } = conn;
    // A client that stops reading is cut after idle_timeout without write progress.
    let io = WriteDeadline::new(io, proxy.active.config.limits.idle_timeout);
    let service = {
        let (fallback, info) = (proxy.clone(), info.clone());
        service_fn(move |req| {
            if let Some(handshake) = &pending {
                handshake.finish();
            }
            let proxy = proxies.current().unwrap_or_else(|| fallback.clone());
            proxy.handle(info.clone(), req.map(Inbound::Hyper))
        })
    };
    async move {
        // Borrowed from the proxy this connection keeps for its life (a copy
        // would be one more thing in every connection's state).
        let limits = &proxy.active.config.limits;
        match protocol {
            Protocol::Http1 => serve_http1(Resumable::new(io), service, &info, limits, stopping).await,
            // Boxed: its future is larger than HTTP/1's, and every connection's
            // task would otherwise be sized for it.
            Protocol::Http2 => Box::pin(serve_http2(io, service, &info, limits, stopping)).await,
        }
        // Its address's count goes down when it has closed.
        drop(slot);
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
#[allow(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice")]
fn serve_http1<'a, IO, S>(
    mut io: Resumable<IO>,
    service: S,
    info: &'a ConnInfo,
    limits: &'a Limits,
    mut stopping: watch::Receiver<bool>,
) -> impl Future<Output = ()> + 'a
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<crate::access::ProxyBody>,
            Error = std::convert::Infallible,
        > + Clone
        + Unpin
        + 'a,
{
    async move {
        // Parking restarts hyper's head timer, so park well within it.
        let park_after = PARK_AFTER.min(limits.header_read_timeout / 2).min(limits.idle_timeout);
        let activity = &info.activity;
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
            // Boxed: set once at most, while every connection's state would be
            // sized for a timer inline.
            let mut close_by: Option<Pin<Box<tokio::time::Sleep>>> = None;
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
                            close_by = Some(Box::pin(tokio::time::sleep(IDLE_CLOSE_GRACE)));
                            conn.as_mut().graceful_shutdown();
                        }
                    },
                    () = async { if let Some(t) = close_by.as_mut() { t.as_mut().await } }, if close_by.is_some() => {
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
                // while hyper finished. Lingering is for a client that may still
                // be sending into the close: after a refusal, an ambiguous
                // request or an unread body, or with bytes hyper had read and
                // not parsed. At a message boundary there is nothing to linger
                // for (and a drain must not wait), nor after a last request the
                // client announced and sent whole (as nginx's `lingering_close on`).
                let settled = activity.resumable() || (!activity.client_may_send() && read_buf.is_empty());
                let linger = if settled { Linger::No } else { Linger::Yes };
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

    use std::net::SocketAddr;

    use std::sync::Mutex;
    use tokio::io::AsyncWriteExt;

    use tokio::net::TcpListener;

    use super::*;
    use crate::config::Config;
    use crate::reload::Live;
    use crate::upstream;

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
        let proxies = Arc::new(ProxyCache::new(live.clone(), upstream, None));
        let (_stop, stopping) = watch::channel(false);
        let case = |n: usize| {
            let (proxies, stopping) = (proxies.clone(), stopping.clone());
            async move {
                let proxy = proxies.current().expect("proxy");
                let (mut client, server) = tokio::io::duplex(4096);
                let info = Arc::new(ConnInfo::new(
                    "127.0.0.1:40000".parse().expect("addr"),
                    None,
                    false,
                    None,
                ));
                let served = tokio::spawn(serve(Established {
                    proxy,
                    proxies,
                    io: server,
                    info,
                    protocol: Protocol::Http1,
                    stopping,
                    pending: None,
                    slot: None,
                }));
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
