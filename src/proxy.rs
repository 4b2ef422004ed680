//! The request path: decide whether a request may be forwarded, rewrite its
//! head for the upstream, stream it there and stream the answer back, then
//! log and count it.
//!
//! Every refusal and upstream failure is a [`ProxyError`]; [`ProxyError::status`]
//! is the one place that maps them to HTTP status codes.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::access::{self as access_log, AccessLine, AccessRecord, ProxyBody};
use crate::acme;
use crate::config::{Host, HttpMode};
use crate::connection::{ClientBody, ConnInfo};
use crate::error_page::{self, ErrorPage};
use crate::host::HostName;
use crate::metrics::{KindLabels, Metrics};
use crate::reload::Active;
use crate::response::Local;
use crate::upstream::{RequestBody, Upstream, UpstreamBody, UpstreamError};

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Other headers that claim a client address. Providers read the client's
/// address (SendGrid's Apple Mail Privacy detection, for one), so from
/// anyone but a trusted proxy these are dropped, never passed on.
pub(crate) static CLIENT_ADDRESS_CLAIMS: [HeaderName; 5] = [
    header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("x-client-ip"),
];

/// An upstream answer whose Content-Length is at most this is read whole
/// before its head goes to the client, and its upstream connection released
/// at once (as nginx's proxy buffering does): a client that reads slowly,
/// or an HTTP/2 client that grants no flow-control window, then holds no
/// upstream connection for the pixels and redirects that are most answers.
pub const BUFFER_RESPONSES_UP_TO: u64 = 64 * 1024;

/// Headers that describe one hop and are never passed on (RFC 9110 §7.6.1),
/// in addition to the names a `Connection` header lists.
pub(crate) static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Why a request was not forwarded, or not answered by the upstream.
#[derive(Debug)]
pub enum ProxyError {
    /// The request cannot be understood unambiguously.
    BadRequest(&'static str),
    /// The request names a host this connection does not serve.
    Misdirected,
    /// CONNECT: linkgate never tunnels.
    MethodNotAllowed,
    /// The request body is larger than `limits.max_request_body`.
    BodyTooLarge,
    /// The request body did not start arriving within `limits.header_read_timeout`.
    BodyTimeout,
    /// The request head is larger than the host's provider accepts.
    HeadTooLarge,
    Upstream(UpstreamError),
}

/// The body of linkgate's own 502: `doctor` tells it from a provider's by it.
pub const UPSTREAM_UNAVAILABLE: &str = "upstream unavailable\n";
/// The body of linkgate's own 504.
pub const UPSTREAM_TIMED_OUT: &str = "upstream timed out\n";

impl ProxyError {
    /// The status code the client receives for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Upstream(UpstreamError::Timeout(_)) => StatusCode::GATEWAY_TIMEOUT,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The short plain-text body sent with [`ProxyError::status`].
    fn body(&self) -> &'static str {
        match self {
            Self::BadRequest(why) => why,
            Self::Misdirected => "misdirected request: this connection does not serve that host\n",
            Self::MethodNotAllowed => "method not allowed\n",
            Self::BodyTooLarge => "request body too large\n",
            Self::BodyTimeout => "request body timed out\n",
            Self::HeadTooLarge => "request headers too large for the upstream\n",
            Self::Upstream(UpstreamError::Timeout(_)) => UPSTREAM_TIMED_OUT,
            Self::Upstream(_) => UPSTREAM_UNAVAILABLE,
        }
    }

    /// The answer: an upstream failure as [`error_page::upstream_failure`]
    /// shows it (HTML when the client asked for it, with its host's `page`);
    /// a refusal as short text, closing an HTTP/1 connection. A HEAD gets
    /// the head alone, with the length the body would have.
    fn into_response(self, asked: &Asked, page: Option<&ErrorPage>) -> Response<Either<UpstreamBody, Full<Bytes>>> {
        let mut resp = if matches!(self, Self::Upstream(_)) {
            error_page::upstream_failure(self.status(), self.body(), asked.html, page)
        } else {
            let mut resp = Local::new(self.status()).text(Bytes::from_static(self.body().as_bytes()));
            if asked.version < Version::HTTP_2 {
                // After a request we refused, do not read another from the same stream.
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        };
        if asked.head {
            // hyper leaves out a HEAD answer's body over HTTP/1 only; over HTTP/2 it would be sent.
            let length = HeaderValue::from(resp.body().len());
            resp.headers_mut().insert(header::CONTENT_LENGTH, length);
            *resp.body_mut() = Bytes::new();
        }
        local(resp)
    }
}

/// What the answer to a failed request depends on, read from the request
/// before it is forwarded (it is gone by the time the upstream fails).
struct Asked {
    version: Version,
    head: bool,
    /// The Accept header prefers HTML ([`error_page::prefers_html`]).
    html: bool,
}

impl Asked {
    fn of<B>(req: &Request<B>) -> Self {
        Self {
            version: req.version(),
            head: req.method() == Method::HEAD,
            html: error_page::prefers_html(req.headers()),
        }
    }
}

/// The proxy as one worker runs it for one configuration generation: the
/// active configuration, this worker's upstream pool, and the metrics.
pub struct Proxy {
    pub active: Arc<Active>,
    /// One pooled client per entry of `active.config.upstreams`, same order.
    pub upstreams: Vec<Upstream>,
    pub metrics: Arc<Metrics>,
    /// Set when the end of the grace period cuts what is still open (for the access log).
    pub grace_over: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    /// Handles one request end to end. Never fails: every error becomes a
    /// response. The access log line and metrics are written when the
    /// response body has been sent (or abandoned).
    pub async fn handle(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<Incoming>,
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
        crate::connection::responding();
        Ok(Response::from_parts(parts, ProxyBody::new(body, record, conn, slot)))
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
        let slot = tokio::time::timeout_at(deadline, conn.upstream_slot())
            .await
            .map_err(|_| timed_out())?;
        let resp = tokio::time::timeout_at(deadline, upstream.send(Request::from_parts(parts, body)))
            .await
            .unwrap_or(Err(UpstreamError::Timeout(timeout)))
            .map_err(|e| {
                if e.is_body_limit() {
                    ProxyError::BodyTooLarge
                } else {
                    ProxyError::Upstream(e)
                }
            })?;
        let upstream_time = sent.elapsed();

        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let small = body.size_hint().exact().is_some_and(|n| n <= BUFFER_RESPONSES_UP_TO);
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

/// Why an HTTP/1 request ends its connection after its answer.
enum Closes {
    /// The client asked (HTTP/1.0, `Connection: close`): this request is its last.
    ClientDone,
    /// Transfer-Encoding: hyper may have dropped a Content-Length beside it
    /// and then closes; what the client sends next is unknown.
    Unsettled,
}

/// `None` when an HTTP/1 request leaves the connection open for the next
/// one: HTTP/1.1, no `Connection: close`, and no Transfer-Encoding. Anything
/// else must not be resumed after parking.
fn close_asked<B>(req: &Request<B>) -> Option<Closes> {
    let headers = req.headers();
    if headers.contains_key(header::TRANSFER_ENCODING) {
        Some(Closes::Unsettled)
    } else if req.version() != Version::HTTP_11
        || headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, "close"))
    {
        Some(Closes::ClientDone)
    } else {
        None
    }
}

/// True when a comma-separated header value lists `token` (case-insensitive).
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// HTTP/2 may split the cookie header into several fields; an HTTP/1.1
/// upstream gets them as one, joined with `; ` (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let joined = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// The size of a request head as sent upstream in HTTP/1.1: request line,
/// header lines, blank line.
fn head_size(parts: &http::request::Parts) -> usize {
    let target = parts.uri.path_and_query().map_or(1, |pq| pq.as_str().len());
    let line = parts.method.as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let headers: usize = parts
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + 2 + v.len() + 2)
        .sum();
    line + headers + 2
}

/// Refuses what an upstream (or anything between) could frame differently
/// from us, and protocol switches: linkgate forwards requests, never tunnels.
/// HTTP/2 framing is checked by the h2 codec (which also rejects
/// connection-specific headers).
fn check_framing<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let headers = req.headers();
    if headers.contains_key(header::UPGRADE) {
        return Err(ProxyError::BadRequest("protocol upgrades are not supported\n"));
    }
    // hyper's HTTP/1 parser already refuses Transfer-Encoding in HTTP/1.0 and
    // codings not ending in chunked, and frames a request carrying both
    // Content-Length and Transfer-Encoding by the latter alone, closing the
    // connection after it (RFC 9112 §6.1). What it lets through and we do
    // not: any coding besides chunked, which the upstream would have to undo.
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(coding) = codings.next() {
        if codings.next().is_some() || !coding.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Err(ProxyError::BadRequest("Transfer-Encoding other than chunked\n"));
        }
    }
    Ok(())
}

/// The host a request names, from its target's authority (absolute-form or
/// HTTP/2 `:authority`) and its Host header. Both present and disagreeing,
/// several Host headers, or neither present: refused.
pub(crate) fn request_host<B>(req: &Request<B>) -> Result<HostName, ProxyError> {
    let mut values = req.headers().get_all(header::HOST).iter();
    let header_value = values.next();
    if values.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header\n"));
    }
    let from_header = header_value
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| HostName::from_authority(s).ok())
                .ok_or(ProxyError::BadRequest("invalid Host header\n"))
        })
        .transpose()?;
    let from_target = req
        .uri()
        .authority()
        .map(|a| HostName::from_authority(a.as_str()).map_err(|_| ProxyError::BadRequest("invalid request target\n")))
        .transpose()?;
    match (from_target, from_header) {
        (Some(t), Some(h)) if t != h => Err(ProxyError::BadRequest("Host header and request target disagree\n")),
        (Some(t), _) => Ok(t),
        (None, Some(h)) => Ok(h),
        (None, None) => Err(ProxyError::BadRequest("missing Host header\n")),
    }
}

/// Prepares request headers for the upstream: hop-by-hop headers removed,
/// Host set to the branded name, X-Forwarded-For appended to (trusted peers)
/// or replaced (anyone else), other client-address claims kept from a
/// trusted peer only, X-Forwarded-Proto kept from a trusted peer or set,
/// X-Forwarded-Host set.
pub(crate) fn rewrite_request_headers(headers: &mut HeaderMap, host: &HostName, conn: &ConnInfo) {
    strip_hop_by_hop(headers);
    // A HostName is a valid header value by construction (letters, digits, '-', '_', '.').
    if let Ok(value) = HeaderValue::from_str(host.as_str()) {
        headers.insert(header::HOST, value.clone());
        headers.insert(X_FORWARDED_HOST.clone(), value);
    }
    let client_ip = conn.peer.ip().to_string();
    let forwarded_for = {
        let mut previous = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .peekable();
        if conn.keep_forwarded && previous.peek().is_some() {
            let mut list = previous.collect::<Vec<_>>().join(", ");
            list.push_str(", ");
            list.push_str(&client_ip);
            list
        } else {
            client_ip
        }
    };
    headers.remove(&X_FORWARDED_FOR);
    if !conn.keep_forwarded {
        for name in &CLIENT_ADDRESS_CLAIMS {
            headers.remove(name);
        }
    }
    drop_underscore_twins(headers);
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    // Kept from a trusted proxy only when it sent exactly one: several could be read either way.
    if !(conn.keep_forwarded && headers.get_all(&X_FORWARDED_PROTO).iter().count() == 1) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(conn.proto()));
    }
}

/// Removes headers that spell one of the forwarding headers linkgate sets or
/// checks with `_` for `-` (`X_Forwarded_For`, `X_Real_IP`): backends that
/// map names CGI-style (`HTTP_X_REAL_IP`) read them as the real thing, so
/// they would carry a client's claim past the checks above. From anyone.
fn drop_underscore_twins(headers: &mut HeaderMap) {
    let twins: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().contains('_'))
        .filter(|name| {
            let folded = name.as_str().replace('_', "-");
            [&X_FORWARDED_FOR, &X_FORWARDED_PROTO, &X_FORWARDED_HOST]
                .into_iter()
                .chain(&CLIENT_ADDRESS_CLAIMS)
                .any(|known| known.as_str() == folded)
        })
        .cloned()
        .collect();
    for name in twins {
        headers.remove(name);
    }
}

/// Removes hop-by-hop headers and every header the Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).expect("test request")
    }

    fn host_of(r: &Request<()>) -> Result<String, u16> {
        request_host(r).map(|h| h.to_string()).map_err(|e| e.status().as_u16())
    }

    #[test]
    fn request_host_rules() {
        assert_eq!(
            host_of(&req("/x", &["Click.Example.Test:8443"])),
            Ok("click.example.test".into())
        );
        assert_eq!(host_of(&req("https://a.test/x", &[])), Ok("a.test".into()));
        assert_eq!(host_of(&req("https://a.test/x", &["a.test"])), Ok("a.test".into()));
        assert_eq!(host_of(&req("https://a.test/x", &["b.test"])), Err(400));
        assert_eq!(host_of(&req("/x", &["a.test", "a.test"])), Err(400));
        assert_eq!(host_of(&req("/x", &[])), Err(400));
        assert_eq!(host_of(&req("/x", &[""])), Err(400));
        assert_eq!(host_of(&req("/x", &["a.test/evil"])), Err(400));
    }

    #[test]
    fn status_mapping() {
        let boxed = || -> Box<dyn std::error::Error + Send + Sync> { "x".into() };
        assert_eq!(ProxyError::BadRequest("x").status(), 400);
        assert_eq!(ProxyError::Misdirected.status(), 421);
        assert_eq!(ProxyError::MethodNotAllowed.status(), 405);
        assert_eq!(ProxyError::BodyTooLarge.status(), 413);
        assert_eq!(ProxyError::Upstream(UpstreamError::Connect(boxed())).status(), 502);
        assert_eq!(ProxyError::Upstream(UpstreamError::Tls(boxed())).status(), 502);
        assert_eq!(ProxyError::Upstream(UpstreamError::Broken(boxed())).status(), 502);
        assert_eq!(
            ProxyError::Upstream(UpstreamError::Timeout(Duration::from_secs(1))).status(),
            504
        );
    }

    #[test]
    fn header_rewrite() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("wrong.test"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::TRAILER, HeaderValue::from_static("x"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.2"));
        h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("ftp"));
        h.insert(header::USER_AGENT, HeaderValue::from_static("ua"));
        h.insert(header::COOKIE, HeaderValue::from_static("a=b"));
        let host = HostName::parse("url1.example.com").expect("valid");
        let conn = ConnInfo::new(
            "203.0.113.7:5555".parse().expect("addr"),
            Some(host.clone()),
            true,
            None,
        );
        let mut untrusted = h.clone();
        rewrite_request_headers(&mut h, &host, &conn);
        assert_eq!(h["host"], "url1.example.com");
        assert_eq!(h["x-forwarded-host"], "url1.example.com");
        assert_eq!(h["x-forwarded-proto"], "ftp", "kept from a trusted peer");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 198.51.100.2, 203.0.113.7");
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "te",
            "upgrade",
            "proxy-connection",
            "trailer",
        ] {
            assert!(!h.contains_key(gone), "{gone} kept");
        }
        assert_eq!(h["user-agent"], "ua");
        assert_eq!(h["cookie"], "a=b");

        // From an untrusted peer the client's claims are replaced, not extended.
        for twin in ["x_forwarded_for", "x_real_ip", "cf_connecting_ip", "x_forwarded_host"] {
            untrusted.insert(HeaderName::from_static(twin), HeaderValue::from_static("6.6.6.6"));
        }
        untrusted.insert("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        untrusted.insert("x_kept_with_underscore", HeaderValue::from_static("1"));
        let conn = ConnInfo::new(conn.peer, conn.sni.clone(), false, None);
        rewrite_request_headers(&mut untrusted, &host, &conn);
        assert_eq!(untrusted["x-forwarded-for"], "203.0.113.7");
        for gone in [
            "x_forwarded_for",
            "x_real_ip",
            "cf_connecting_ip",
            "x_forwarded_host",
            "x-real-ip",
        ] {
            assert!(!untrusted.contains_key(gone), "{gone} passed through");
        }
        assert_eq!(untrusted["x_kept_with_underscore"], "1");
        assert_eq!(untrusted["x-forwarded-proto"], "https");
    }
}
