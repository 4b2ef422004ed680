//! One HTTP/3 connection: the QUIC handshake (within `handshake_timeout`;
//! the certificate was chosen by SNI, and an unknown or missing SNI has
//! already failed it), the h3 session, then each request stream handed to
//! the same `Proxy::handle` as HTTP/1.1 and HTTP/2, its answer streamed
//! back; a request refused before its head could be read (malformed, or
//! too large) is logged and counted as the proxy's own refusals are.
//! GOAWAY when the server drains or the connection is idle for
//! `idle_timeout`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h3::error::{Code, StreamError};
use http::header;
use http_body_util::BodyExt;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::accept::Admitted;
use super::quic_streams::{self, counted};
use super::{ProxyCache, Shared};
use crate::access::ProxyBody;
use crate::connection::ConnInfo;
use crate::inbound::{Http3Body, Inbound};
use crate::proxy::Proxy;

/// The h3 connection as linkgate serves it.
type H3Conn = h3::server::Connection<quic_streams::Connection, Bytes>;
/// A request stream's sending half.
type H3Send = h3::server::RequestStream<quic_streams::SendStream, Bytes>;

/// After GOAWAY and the last answer, how long the client gets to close the
/// connection itself: closing it from here at once could discard the end
/// of an answer the client has not acknowledged yet.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The longest frame other than DATA a request stream may announce: twice
/// `max_header_bytes`, as QPACK's encoding of a field section is about its
/// size (Huffman coding makes it smaller; the decoded size is held to
/// `max_header_bytes` by h3, 431 beyond it).
fn frame_limit(limits: &crate::config::Limits) -> u64 {
    u64::try_from(limits.max_header_bytes)
        .unwrap_or(u64::MAX)
        .saturating_mul(2)
}

/// One QUIC connection, from its handshake to its close.
pub(super) async fn connection(
    shared: &Shared,
    proxy: Arc<Proxy>,
    proxies: Arc<ProxyCache>,
    incoming: quinn::Incoming,
    admitted: Admitted,
) {
    let (handshake, _client) = admitted.into_parts();
    let config = &proxy.active.config;
    let limits = &config.limits;
    let peer = incoming.remote_address();
    let established = match incoming.accept() {
        Ok(connecting) => tokio::time::timeout(limits.handshake_timeout, connecting).await,
        Err(e) => Ok(Err(e)),
    };
    drop(handshake);
    let conn = match established {
        Ok(Ok(conn)) => conn,
        // Not counted in linkgate_tls_handshakes_total, which is TCP's (README).
        Ok(Err(e)) => {
            tracing::debug!(client = %peer, error = %e, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(client = %peer, "QUIC handshake timed out");
            return;
        }
    };
    // The name the certificate was chosen by (a handshake without one failed).
    let sni = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.server_name);
    let live = shared.live.load();
    let Some(host) = sni.as_deref().and_then(|s| live.sni.host_for(s)).cloned() else {
        conn.close(quinn::VarInt::from_u32(0x100), b"unknown server name");
        return;
    };
    drop(live);
    let keep_forwarded = config.listen.is_trusted(peer.ip()) && !config.listen.proxy_protocol;
    let info = Arc::new(
        ConnInfo::new(peer, Some(host), keep_forwarded, Some("TLSv1.3"))
            .with_upstream_slots(limits.upstream_per_connection),
    );
    let built = h3::server::builder()
        .max_field_section_size(u64::try_from(limits.max_header_bytes).unwrap_or(u64::MAX))
        .build(quic_streams::Connection::new(conn.clone(), frame_limit(limits)))
        .await;
    let mut h3: H3Conn = match built {
        Ok(h3) => h3,
        Err(e) => {
            tracing::debug!(client = %peer, error = %e, "HTTP/3 connection failed to start");
            return;
        }
    };
    let mut requests = JoinSet::new();
    let mut stopping = shared.stopping.clone();
    let mut draining = false;
    loop {
        let goaway = tokio::select! {
            accepted = h3.accept() => match accepted {
                Ok(Some(resolver)) => {
                    let (proxies, fallback, info) = (proxies.clone(), proxy.clone(), info.clone());
                    let header_timeout = limits.header_read_timeout;
                    requests.spawn(async move {
                        let resolved = tokio::time::timeout(header_timeout, resolver.resolve_request()).await;
                        let proxy = proxies.current().unwrap_or(fallback);
                        match resolved {
                            Ok(Ok((req, stream))) => request(proxy, info, req, stream).await,
                            Ok(Err(e)) => unread(&proxy, &info, &e),
                            // No head within header_read_timeout: the stream is dropped, as over HTTP/2.
                            Err(_) => {}
                        }
                    });
                    false
                }
                Ok(None) => break,
                Err(e) => {
                    if !e.is_h3_no_error() {
                        tracing::debug!(client = %peer, error = %e, "HTTP/3 connection ended with an error");
                    }
                    break;
                }
            },
            Some(_) = requests.join_next(), if !requests.is_empty() => {
                if draining && requests.is_empty() {
                    break;
                }
                false
            }
            _ = stopping.wait_for(|s| *s), if !draining => true,
            _ = info.activity.quiet(None, limits.idle_timeout), if !draining => true,
        };
        if goaway {
            // The requests accepted so far are answered; later ones are refused.
            draining = true;
            if h3.shutdown(1).await.is_err() || requests.is_empty() {
                break;
            }
        }
    }
    // Every answer is out: the client closes (it has GOAWAY), or is closed after a moment.
    let _ = tokio::time::timeout(CLOSE_GRACE, conn.closed()).await;
    drop(h3);
}

/// A request stream that ended before a request could be read from it.
/// One h3 refused (malformed: the stream reset with `H3_MESSAGE_ERROR`, or
/// a head over `max_header_bytes`, answered 431 by h3), or the stream's
/// bounds did ([`quic_streams::Refused`]), is logged and counted as the
/// proxy's own refusals are; a stream the client gave up on, or one ended
/// by a connection error, was no request.
fn unread(proxy: &Proxy, info: &Arc<ConnInfo>, error: &StreamError) {
    tracing::debug!(client = %info.peer, error = %error, "HTTP/3 request stream ended before its head was read");
    if let Some((status, reason)) = refusal(error) {
        proxy.refused_unread(info, http::Version::HTTP_3, status, reason);
    }
}

/// The status and reason a refused request is logged with.
fn refusal(error: &StreamError) -> Option<(u16, &'static str)> {
    match error {
        StreamError::StreamError { code, .. } if *code == Code::H3_MESSAGE_ERROR => Some((
            400,
            "malformed HTTP/3 request (field names or pseudo-header fields): stream reset",
        )),
        StreamError::HeaderTooBig { .. } => Some((431, "request head larger than max_header_bytes")),
        StreamError::Undefined { 0: e, .. } => match e.downcast_ref::<quic_streams::Refused>()? {
            quic_streams::Refused::Head(malformed) => Some((400, malformed.reason())),
            quic_streams::Refused::TooLong(_) => Some((
                431,
                "request head announced over twice max_header_bytes: stream stopped",
            )),
        },
        _ => None,
    }
}

/// One request: the same `Proxy::handle` as every other protocol, then its
/// answer on the stream. A client that stops reading is cut after
/// `idle_timeout` without progress.
async fn request(
    proxy: Arc<Proxy>,
    info: Arc<ConnInfo>,
    req: http::Request<()>,
    stream: h3::server::RequestStream<quic_streams::BidiStream, Bytes>,
) {
    let stall = proxy.active.config.limits.idle_timeout;
    let (send, recv) = stream.split();
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let req = req.map(|()| Inbound::Http3(Box::new(Http3Body::new(recv, declared))));
    let Ok(resp) = proxy.handle(info, req).await;
    let (parts, body) = resp.into_parts();
    respond(send, http::Response::from_parts(parts, ()), body, stall).await;
}

/// Sends an answer: its head, then its body as it comes. The access line
/// counts what QUIC took within the client's flow control (not the part of
/// a chunk still waiting when the answer was cut), and says `cut` unless
/// the stream was finished.
async fn respond(mut send: H3Send, head: http::Response<()>, mut body: ProxyBody, stall: Duration) {
    let mut written = 0;
    let whole = send_answer(&mut send, head, &mut body, stall, &mut written).await;
    body.delivered(written, whole);
}

/// [`respond`]'s writes, each within `stall`; true when the stream was finished.
async fn send_answer(
    send: &mut H3Send,
    head: http::Response<()>,
    body: &mut ProxyBody,
    stall: Duration,
    written: &mut u64,
) -> bool {
    let deadline = || Instant::now() + stall;
    if !matches!(
        tokio::time::timeout_at(deadline(), counted(written, send.send_response(head))).await,
        Ok(Ok(()))
    ) {
        return false;
    }
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            // The upstream's answer broke midway: the client must not take it as whole.
            send.stop_stream(Code::H3_INTERNAL_ERROR);
            return false;
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if !matches!(
            tokio::time::timeout_at(deadline(), counted(written, send.send_data(data))).await,
            Ok(Ok(()))
        ) {
            send.stop_stream(Code::H3_REQUEST_CANCELLED);
            return false;
        }
    }
    matches!(
        tokio::time::timeout_at(deadline(), counted(written, send.finish())).await,
        Ok(Ok(()))
    )
}
