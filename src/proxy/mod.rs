//! The request path: decide whether a request may be forwarded, rewrite its
//! head for the upstream, stream it there and stream the answer back, then
//! log and count it.
//!
//! Every refusal and upstream failure is a [`ProxyError`]; [`ProxyError::status`]
//! is the one place that maps them to HTTP status codes (`error.rs`). What
//! is refused before forwarding and how the head is rewritten is
//! `request.rs`; this file routes, answers locally or forwards, and logs.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};

use crate::access::{self as access_log, AccessLine, AccessRecord, ProxyBody};
use crate::acme;
use crate::config::{Host, HttpMode};
use crate::connection::{ClientBody, ConnInfo};
use crate::host::HostName;
use crate::inbound::Inbound;
use crate::metrics::{KindLabels, Metrics};
use crate::reload::Active;
use crate::response::Local;
use crate::upstream::{RequestBody, Upstream, UpstreamBody, UpstreamError};

mod error;
mod request;

use error::Asked;
pub use error::{ProxyError, UPSTREAM_TIMED_OUT, UPSTREAM_UNAVAILABLE};
use request::{check_framing, close_asked, has_token, head_size, join_cookies, strip_hop_by_hop, Closes};
pub(crate) use request::{
    request_host, rewrite_request_headers, CLIENT_ADDRESS_CLAIMS, HOP_BY_HOP, X_FORWARDED_FOR, X_FORWARDED_HOST,
    X_FORWARDED_PROTO,
};

/// An upstream answer to an HTTP/2 or HTTP/3 request whose Content-Length
/// is at most this is read whole before its head goes to the client, and
/// its upstream connection released at once (as nginx's proxy buffering
/// does): a client that grants no flow-control window then holds no
/// upstream connection for the pixels and redirects that are most answers.
/// (HTTP/1.1 answers are streamed: reading the body first cost (a) 13% of
/// its requests/s and a quarter more p99, and an HTTP/1 connection holds
/// one upstream connection at most, its writes bounded by idle_timeout.)
pub const BUFFER_RESPONSES_UP_TO: u64 = 64 * 1024;

/// The proxy as one worker runs it for one configuration generation: the
/// active configuration, this worker's upstream pool, and the metrics.
pub struct Proxy {
    pub active: Arc<Active>,
    /// One pooled client per entry of `active.config.upstreams`, same order.
    pub upstreams: Vec<Upstream>,
    pub metrics: Arc<Metrics>,
    /// Set when the end of the grace period cuts what is still open (for the access log).
    pub grace_over: Arc<std::sync::atomic::AtomicBool>,
    /// `Alt-Svc` for every https answer, while HTTP/3 is on.
    pub alt_svc: Option<http::HeaderValue>,
}

impl Proxy {
    /// Handles one request end to end. Never fails: every error becomes a
    /// response. The access log line and metrics are written when the
    /// response body has been sent (or abandoned).
    pub async fn handle(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<Inbound>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        conn.activity.begin();
        let log_cfg = &self.active.config.log;
        let mut record = if log_cfg.access && tracing::enabled!(target: "linkgate::access", tracing::Level::INFO) {
            Some(AccessRecord {
                method: req.method().clone(),
                target: if log_cfg.query {
                    req.uri()
                        .path_and_query()
                        .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned())
                } else {
                    req.uri().path().to_owned()
                },
                version: req.version(),
                user_agent: req.headers().get(header::USER_AGENT).map(access_log::user_agent),
                host: None,
                status: 0,
                upstream: None,
                error: None,
            })
            .map(|r| AccessLine::new(r, started, conn.clone(), self.grace_over.clone()))
        } else {
            None
        };
        let asked = Asked::of(&req);
        if asked.version < Version::HTTP_2 {
            match close_asked(&req) {
                None => {}
                Some(Closes::ClientDone) => conn.activity.client_closes(),
                Some(Closes::Unsettled) => conn.activity.must_close(),
            }
        }
        let req = req.map(|body| ClientBody::new(body, &conn));
        let (host, route) = self.route(&conn, &req);
        // When the request went upstream: a failed one logs how long it waited.
        let mut sent_upstream = None;
        let result = match route {
            Ok((host_cfg, target)) => self.forward(&conn, req, host_cfg, target, &mut sent_upstream).await,
            Err(e) => Err(e),
        };
        let (resp, upstream_time, slot, error) = match result {
            Ok((resp, t, slot)) => (resp, t, slot, None),
            Err(e) => {
                if let ProxyError::Upstream(err) = &e {
                    let kind = err.kind();
                    self.metrics.upstream_errors.get_or_create(&KindLabels { kind }).inc();
                    let upstream = host
                        .as_ref()
                        .and_then(|h| self.active.config.upstreams.get(self.active.host(h)?.upstream))
                        .map_or_else(|| "-".to_owned(), |u| format!("{}://{}", u.scheme, u.authority));
                    tracing::warn!(client = %conn.peer, host = host.as_ref().map_or("-", HostName::as_str), upstream, error = %err, "upstream request failed");
                }
                let message = e.body().trim_end();
                let message = if matches!(e, ProxyError::Upstream(_)) {
                    None
                } else {
                    Some(message)
                };
                let page = host.as_ref().and_then(|h| self.active.host(h)?.error_page.as_deref());
                (e.into_response(&asked, page), None, None, message)
            }
        };
        if resp
            .headers()
            .get(header::CONNECTION)
            .is_some_and(|v| has_token(v, "close"))
        {
            conn.activity.must_close();
        }
        let status = resp.status().as_u16();
        if let Some(t) = upstream_time {
            self.metrics.upstream_duration.observe(t.as_secs_f64());
        }
        self.metrics.request_duration.observe(started.elapsed().as_secs_f64());
        // Metrics count a host linkgate does not serve as `other`; the log
        // names it (a normalised host name), so a missing branding shows.
        let known = host.as_ref().filter(|h| self.active.hosts.contains_key(*h));
        self.active.counters(known).count(status);
        if let Some(r) = record.as_mut().map(AccessLine::record) {
            r.host = host;
            r.status = status;
            // A failed upstream request logs how long it waited.
            r.upstream = upstream_time.or_else(|| sent_upstream.map(|t: Instant| t.elapsed()));
            r.error = error;
        }
        let (mut parts, body) = resp.into_parts();
        // HSTS only over https (RFC 6797 §7.2), on every answer for the host.
        if let Some(hsts) = conn.sni.as_ref().and_then(|h| self.active.host(h)?.hsts.clone()) {
            parts.headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts);
        }
        // Alt-Svc describes linkgate's own listeners, never the upstream's:
        // ours over https while HTTP/3 is on, none otherwise.
        match &self.alt_svc {
            Some(alt_svc) if conn.sni.is_some() => {
                parts.headers.insert(header::ALT_SVC, alt_svc.clone());
            }
            _ => {
                parts.headers.remove(header::ALT_SVC);
            }
        }
        crate::connection::responding();
        Ok(Response::from_parts(parts, ProxyBody::new(body, record, conn, slot)))
    }

    /// Logs and counts a request the protocol layer refused before it
    /// could be read (HTTP/3: h3 or the stream's bounds found its head
    /// malformed or too large, and reset its stream or answered 431), as a
    /// refusal of linkgate's own is logged and counted: `status`,
    /// `refused` = `reason`, the host the handshake named, and `-` for the
    /// method and path that were never read.
    pub fn refused_unread(&self, conn: &Arc<ConnInfo>, version: Version, status: u16, reason: &'static str) {
        let host = conn.sni.clone();
        let known = host.as_ref().filter(|h| self.active.hosts.contains_key(*h));
        self.active.counters(known).count(status);
        let log_cfg = &self.active.config.log;
        if !log_cfg.access || !tracing::enabled!(target: "linkgate::access", tracing::Level::INFO) {
            return;
        }
        let Ok(method) = Method::from_bytes(b"-") else {
            return;
        };
        let record = AccessRecord {
            method,
            target: "-".to_owned(),
            version,
            user_agent: None,
            host,
            status,
            upstream: None,
            error: Some(reason),
        };
        AccessLine::new(record, Instant::now(), conn.clone(), self.grace_over.clone()).answered();
    }

    /// Which configured host `req` is for, and its target in origin form,
    /// or why it is refused. The host is returned whenever the request
    /// named one, refused or not (for the metrics and the log).
    fn route<B>(
        &self,
        conn: &ConnInfo,
        req: &Request<B>,
    ) -> (Option<HostName>, Result<(&Host, PathAndQuery), ProxyError>) {
        if req.method() == Method::CONNECT {
            return (None, Err(ProxyError::MethodNotAllowed));
        }
        if let Err(e) = check_framing(req) {
            return (None, Err(e));
        }
        let host = match request_host(req) {
            Ok(host) => host,
            Err(e) => return (None, Err(e)),
        };
        let allowed = match &conn.sni {
            Some(sni) => *sni == host,
            None => self.active.hosts.contains_key(&host),
        };
        let Some(host_cfg) = self.active.host(&host).filter(|_| allowed) else {
            return (Some(host), Err(ProxyError::Misdirected));
        };
        let target = match req.uri().path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') => pq.clone(),
            // Absolute-form without a path (`GET https://host HTTP/1.1`); authority-form has no scheme.
            None if req.uri().scheme().is_some() => PathAndQuery::from_static("/"),
            _ => {
                return (
                    Some(host),
                    Err(ProxyError::BadRequest("request target must be an absolute path\n")),
                )
            }
        };
        (Some(host), Ok((host_cfg, target)))
    }

    /// Answers a routed request: locally (the host's files, ACME HTTP-01,
    /// redirects to https) or from the upstream.
    async fn forward(
        &self,
        conn: &Arc<ConnInfo>,
        req: Request<ClientBody>,
        host_cfg: &Host,
        path_and_query: PathAndQuery,
        sent_upstream: &mut Option<Instant>,
    ) -> Result<Forwarded, ProxyError> {
        let host = &host_cfg.name;
        // Answered here, never forwarded: the host's own files (never redirected:
        // Apple and Google fetch them without following redirects), ACME
        // HTTP-01 challenges on plain http, then plain http redirected to https.
        if let Some(file) = host_cfg.files.get(path_and_query.path()) {
            return Ok((local(file.respond(req.method(), req.headers())), None, None));
        }
        if conn.sni.is_none() && host_cfg.is_acme() {
            if let Some(token) = path_and_query.path().strip_prefix(acme::HTTP01_PREFIX) {
                let acme = self.active.config.acme.as_ref();
                let answer = acme::answer_http01(acme, &self.metrics, host, token, req.method()).await;
                return Ok((local(answer), None, None));
            }
        }
        if conn.sni.is_none() && host_cfg.http == HttpMode::Redirect {
            let location = format!("https://{host}{path_and_query}");
            let resp = Local::redirect(&location).ok_or(ProxyError::BadRequest("invalid request target\n"))?;
            return Ok((local(resp), None, None));
        }
        self.send(conn, req, host_cfg, path_and_query, sent_upstream).await
    }

    /// Sends a routed request to its host's upstream: the size caps, the
    /// rewritten head, the first body frame, then the answer.
    async fn send(
        &self,
        conn: &Arc<ConnInfo>,
        req: Request<ClientBody>,
        host_cfg: &Host,
        path_and_query: PathAndQuery,
        sent_upstream: &mut Option<Instant>,
    ) -> Result<Forwarded, ProxyError> {
        let host = &host_cfg.name;
        let upstream = &self.upstreams[host_cfg.upstream];
        let head_cap = self.active.config.upstreams[host_cfg.upstream].max_header_bytes;
        let max_body = self.active.config.limits.max_request_body;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max_body) {
            return Err(ProxyError::BodyTooLarge);
        }

        let (mut parts, body) = req.into_parts();
        // Origin form: the connection is to the upstream already.
        parts.uri = Uri::from(path_and_query);
        if parts.version >= Version::HTTP_2 {
            join_cookies(&mut parts.headers);
        }
        parts.version = Version::HTTP_11;
        parts.extensions = http::Extensions::new();
        rewrite_request_headers(&mut parts.headers, host, conn);
        if head_cap.is_some_and(|cap| head_size(&parts) > cap) {
            return Err(ProxyError::HeadTooLarge);
        }

        // Read the first body frame before anything is sent upstream, so that a
        // malformed or oversized body start is refused without the upstream
        // ever seeing the request. Later frames are streamed; a body that
        // breaks after that aborts the upstream request before it completes.
        let mut body = Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX));
        let first = if body.is_end_stream() {
            None
        } else {
            match tokio::time::timeout(self.active.config.limits.header_read_timeout, body.frame()).await {
                Err(_) => return Err(ProxyError::BodyTimeout),
                Ok(None) => None,
                Ok(Some(Ok(frame))) => Some(frame),
                Ok(Some(Err(e))) if e.is::<LengthLimitError>() => return Err(ProxyError::BodyTooLarge),
                Ok(Some(Err(_))) => return Err(ProxyError::BadRequest("malformed request body\n")),
            }
        };
        let body = RequestBody::new(first, body);

        let sent = Instant::now();
        *sent_upstream = Some(sent);
        let timeout = upstream.response_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || ProxyError::Upstream(UpstreamError::Timeout(timeout));
        // HTTP/2: one of this connection's upstream slots, waiting for a turn if all are in use.
        let slot = match conn.free_upstream_slot() {
            Some(slot) => slot,
            None => tokio::time::timeout_at(deadline, conn.upstream_slot())
                .await
                .map_err(|_| timed_out())?,
        };
        let resp = tokio::time::timeout_at(deadline, upstream.send(Request::from_parts(parts, body)))
            .await
            .unwrap_or(Err(UpstreamError::Timeout(timeout)))
            .map_err(|e| {
                if e.is_body_limit() {
                    ProxyError::BodyTooLarge
                } else if e.is_client_body() {
                    // The client's fault, not the upstream's (nor counted as its error).
                    ProxyError::BadRequest("request body broke off or did not match its Content-Length\n")
                } else {
                    ProxyError::Upstream(e)
                }
            })?;
        let upstream_time = sent.elapsed();

        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // Only where a client can hold a stream without reading it: an
        // HTTP/1 connection holds one upstream connection at most, its
        // writes are bounded by idle_timeout, and reading the body first
        // would add a wake-up to every keep-alive request.
        let small = conn.multiplexed() && body.size_hint().exact().is_some_and(|n| n <= BUFFER_RESPONSES_UP_TO);
        if small && !body.is_end_stream() {
            // Read whole, so the upstream connection is free before the client reads a byte.
            let whole = tokio::time::timeout_at(deadline, body.collect())
                .await
                .map_err(|_| timed_out())?
                .map_err(|e| ProxyError::Upstream(UpstreamError::Broken(Box::new(e))))?;
            let body = Either::Right(Full::new(whole.to_bytes()));
            return Ok((Response::from_parts(parts, body), Some(upstream_time), None));
        }
        Ok((
            Response::from_parts(parts, Either::Left(body)),
            Some(upstream_time),
            slot,
        ))
    }
}

/// What [`Proxy::forward`] and [`Proxy::send`] answer with: the response, how long the
/// upstream took to send its head, and the upstream slot its body holds.
type Forwarded = (
    Response<Either<UpstreamBody, Full<Bytes>>>,
    Option<Duration>,
    Option<tokio::sync::OwnedSemaphorePermit>,
);

/// A local answer ([`Local`]) as the proxy sends it.
fn local(resp: Response<Bytes>) -> Response<Either<UpstreamBody, Full<Bytes>>> {
    resp.map(|body| Either::Right(Full::new(body)))
}
