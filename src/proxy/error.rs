//! What a refused or failed request gets: [`ProxyError`], with
//! [`ProxyError::status`] the one place that maps each to its status code,
//! and the answer linkgate sends for it (the short text, or the error page
//! for a browser).

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};

use super::local;
use crate::error_page::{self, ErrorPage};
use crate::response::Local;
use crate::upstream::{UpstreamBody, UpstreamError};

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
    pub(super) fn body(&self) -> &'static str {
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
    pub(super) fn into_response(
        self,
        asked: &Asked,
        page: Option<&ErrorPage>,
    ) -> Response<Either<UpstreamBody, Full<Bytes>>> {
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
pub(super) struct Asked {
    pub(super) version: Version,
    head: bool,
    /// The Accept header prefers HTML ([`error_page::prefers_html`]).
    html: bool,
}

impl Asked {
    pub(super) fn of<B>(req: &Request<B>) -> Self {
        Self {
            version: req.version(),
            head: req.method() == Method::HEAD,
            html: error_page::prefers_html(req.headers()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

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
}
