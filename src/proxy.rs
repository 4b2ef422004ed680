//! The request path: decide whether a request may be forwarded, rewrite its
//! head for the upstream, stream it there and stream the answer back.
//!
//! Every refusal and upstream failure is a [`ProxyError`]; [`ProxyError::status`]
//! is the one place that maps them to HTTP status codes.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::host::HostName;
use crate::upstream::{Upstream, UpstreamError};

/// The body of every response linkgate sends: the upstream's, streamed, or
/// a short one of its own.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one hop and are never passed on (RFC 9110 §7.6.1),
/// in addition to the names a `Connection` header lists.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// What the server knows about the connection a request came in on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// The configured host the TLS handshake named; `None` on plain http.
    pub sni: Option<HostName>,
}

impl ConnInfo {
    fn proto(&self) -> &'static str {
        if self.sni.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// Why a request was not forwarded, or not answered by the upstream.
#[derive(Debug)]
pub enum ProxyError {
    /// The request cannot be understood unambiguously.
    BadRequest(&'static str),
    /// The request names a host this connection does not serve.
    Misdirected,
    /// CONNECT: linkgate never tunnels.
    MethodNotAllowed,
    Upstream(UpstreamError),
}

impl ProxyError {
    /// The status code the client receives for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
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
            Self::Upstream(UpstreamError::Timeout(_)) => "upstream timed out\n",
            Self::Upstream(_) => "upstream unavailable\n",
        }
    }

    fn into_response(self, version: Version) -> Response<ProxyBody> {
        let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(self.body().as_bytes()))));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if matches!(self, Self::BadRequest(_) | Self::MethodNotAllowed) && version < Version::HTTP_2 {
            // After a request we could not parse safely, do not read another from the same stream.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// The proxy: the hosts it serves and where it sends their traffic.
pub struct Proxy {
    hosts: HashSet<HostName>,
    upstream: Upstream,
}

impl Proxy {
    pub fn new(hosts: impl IntoIterator<Item = HostName>, upstream: Upstream) -> Self {
        Self {
            hosts: hosts.into_iter().collect(),
            upstream,
        }
    }

    /// Handles one request end to end and logs it. Never fails: every error
    /// becomes a response.
    pub async fn handle(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        let method = req.method().clone();
        let version = req.version();
        let path = req.uri().path().to_owned();
        let mut host = None;
        let result = self.forward(&conn, req, &mut host).await;
        let host = host.as_ref().map_or("-", HostName::as_str);
        let resp = match result {
            Ok((resp, upstream_time)) => {
                tracing::info!(
                    client = %conn.peer, host, method = %method, path, status = resp.status().as_u16(),
                    upstream_ms = upstream_time.as_millis() as u64,
                    "request"
                );
                resp
            }
            Err(e) => {
                let status = e.status().as_u16();
                match &e {
                    ProxyError::Upstream(err) => tracing::warn!(
                        client = %conn.peer, host, method = %method, path, status,
                        upstream_ms = started.elapsed().as_millis() as u64, error = %err,
                        "request"
                    ),
                    other => tracing::info!(
                        client = %conn.peer, host, method = %method, path, status,
                        refused = other.body().trim_end(),
                        "request"
                    ),
                }
                e.into_response(version)
            }
        };
        Ok(resp)
    }

    async fn forward(
        &self,
        conn: &ConnInfo,
        req: Request<Incoming>,
        host_out: &mut Option<HostName>,
    ) -> Result<(Response<ProxyBody>, Duration), ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed);
        }
        let host = request_host(&req)?;
        *host_out = Some(host.clone());
        let allowed = match &conn.sni {
            Some(sni) => *sni == host,
            None => self.hosts.contains(&host),
        };
        if !allowed {
            return Err(ProxyError::Misdirected);
        }
        let path_and_query = match req.uri().path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') => pq.clone(),
            _ if req.uri().path_and_query().is_none() && req.uri().authority().is_some() => {
                PathAndQuery::from_static("/")
            }
            _ => return Err(ProxyError::BadRequest("request target must be an absolute path\n")),
        };

        let (mut parts, body) = req.into_parts();
        parts.uri = self
            .upstream
            .uri_for(path_and_query)
            .map_err(|_| ProxyError::BadRequest("invalid request target\n"))?;
        parts.version = Version::HTTP_11;
        parts.extensions = http::Extensions::new();
        rewrite_request_headers(&mut parts.headers, &host, conn);

        let sent = Instant::now();
        let resp = self
            .upstream
            .send(Request::from_parts(parts, body))
            .await
            .map_err(ProxyError::Upstream)?;
        let upstream_time = sent.elapsed();

        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok((Response::from_parts(parts, Either::Left(body)), upstream_time))
    }
}

/// The host a request names, from its target's authority (absolute-form or
/// HTTP/2 `:authority`) and its Host header. Both present and disagreeing,
/// several Host headers, or neither present: refused.
fn request_host<B>(req: &Request<B>) -> Result<HostName, ProxyError> {
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
/// Host set to the branded name, X-Forwarded-For appended, X-Forwarded-Proto
/// and X-Forwarded-Host set.
fn rewrite_request_headers(headers: &mut HeaderMap, host: &HostName, conn: &ConnInfo) {
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
        if previous.peek().is_some() {
            let mut list = previous.collect::<Vec<_>>().join(", ");
            list.push_str(", ");
            list.push_str(&client_ip);
            list
        } else {
            client_ip
        }
    };
    headers.remove(&X_FORWARDED_FOR);
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(conn.proto()));
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
        let conn = ConnInfo {
            peer: "203.0.113.7:5555".parse().expect("addr"),
            sni: Some(host.clone()),
        };
        rewrite_request_headers(&mut h, &host, &conn);
        assert_eq!(h["host"], "url1.example.com");
        assert_eq!(h["x-forwarded-host"], "url1.example.com");
        assert_eq!(h["x-forwarded-proto"], "https");
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
    }
}
