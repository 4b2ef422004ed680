//! The upstream side: one pooled HTTP/1.1 client to the configured upstream
//! (plain or TLS), and the classification of what can go wrong on it.
//!
//! The request URI names the upstream (`https://sendgrid.net/...`), so the
//! pool key, TLS SNI and certificate verification all use the upstream's
//! name, while the Host header the proxy sets carries the branded name.
//! HTTP/1.1 only: an HTTP/2 upstream would receive `:authority` and `host`
//! disagreeing, which is exactly the ambiguity a proxy must not create.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The request body sent upstream: the client's, streamed, capped at `limits.max_request_body`.
pub struct RequestBody {
    first: Option<Frame<Bytes>>,
    rest: Limited<Incoming>,
}

impl RequestBody {
    /// A body whose first frame the proxy has already read (to refuse a
    /// malformed body before anything reaches the upstream), then the rest.
    pub fn new(first: Option<Frame<Bytes>>, rest: Limited<Incoming>) -> Self {
        Self { first, rest }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = this.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut this.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // The upstream gets a Content-Length whenever the client sent one.
        let first = self
            .first
            .as_ref()
            .and_then(Frame::data_ref)
            .map_or(0, |d| d.len() as u64);
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + first);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + first);
        }
        hint
    }
}

/// A pooled client bound to one upstream.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<Dialer>, RequestBody>,
    scheme: Scheme,
    authority: Authority,
    response_timeout: Duration,
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
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "upstream connect failed: {}", chain(e.as_ref())),
            Self::Tls(e) => write!(f, "upstream TLS failed: {}", chain(e.as_ref())),
            Self::Timeout(d) => write!(f, "upstream sent no response within {d:?}"),
            Self::Broken(e) => write!(f, "upstream connection failed: {}", chain(e.as_ref())),
        }
    }
}

impl StdError for UpstreamError {}

impl UpstreamError {
    /// True when the request failed because the client's body passed the size cap.
    pub fn is_body_limit(&self) -> bool {
        let (Self::Connect(e) | Self::Tls(e) | Self::Broken(e)) = self else {
            return false;
        };
        let mut source: Option<&(dyn StdError + 'static)> = Some(e.as_ref());
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return true;
            }
            source = s.source();
        }
        false
    }
}

/// Formats an error with all its sources on one line.
pub(crate) fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

impl Upstream {
    pub fn new(cfg: &config::Upstream) -> Result<Self, rustls::Error> {
        let tls = crate::tls::client_config(cfg.ca_certs.as_deref())?;

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        let dialer = Dialer {
            http,
            connect_to: cfg.connect_to,
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(dialer);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .build(connector);
        Ok(Self {
            client,
            scheme: cfg.scheme.clone(),
            authority: cfg.authority.clone(),
            response_timeout: cfg.response_timeout,
        })
    }

    /// The absolute URI for `path_and_query` on this upstream.
    pub fn uri_for(&self, path_and_query: PathAndQuery) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }

    /// Sends a request (its URI made by [`Upstream::uri_for`]) and waits for
    /// the response head. The body is streamed by the caller.
    pub async fn send(&self, req: Request<RequestBody>) -> Result<Response<Incoming>, UpstreamError> {
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Err(_) => Err(UpstreamError::Timeout(self.response_timeout)),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(e)),
        }
    }
}

fn classify(e: hyper_util::client::legacy::Error) -> UpstreamError {
    let is_tls = {
        let mut source = e.source();
        let mut found = false;
        while let Some(s) = source {
            if s.downcast_ref::<rustls::Error>().is_some() {
                found = true;
                break;
            }
            source = s.source();
        }
        found
    };
    if is_tls {
        UpstreamError::Tls(Box::new(e))
    } else if e.is_connect() {
        UpstreamError::Connect(Box::new(e))
    } else {
        UpstreamError::Broken(Box::new(e))
    }
}

/// Opens the TCP connection for the upstream: to `connect_to` when set,
/// otherwise to the URI's host. TLS on top (hyper-rustls) always uses the
/// URI's host for SNI and verification.
#[derive(Clone)]
pub struct Dialer {
    http: HttpConnector,
    connect_to: Option<SocketAddr>,
}

impl tower_service::Service<Uri> for Dialer {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.http, cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let target = match self.connect_to {
            Some(addr) => match Uri::builder()
                .scheme("http")
                .authority(addr.to_string())
                .path_and_query("/")
                .build()
            {
                Ok(uri) => uri,
                Err(e) => return Box::pin(async move { Err(e.into()) }),
            },
            None => dst,
        };
        let fut = self.http.call(target);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}
