//! linkgate's own short answers, built one way: refusals and errors
//! (`proxy`; upstream failures, with their HTML page, in `error_page`),
//! redirects to https, a host's local files (`files`), ACME HTTP-01 answers
//! (`acme/challenge.rs`) and the admin endpoints (`admin`). Headers go out
//! in the order they are added.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};

/// One local answer being built: a status, then headers, then the body.
pub(crate) struct Local(Response<Bytes>);

impl Local {
    pub(crate) fn new(status: StatusCode) -> Self {
        let mut resp = Response::new(Bytes::new());
        *resp.status_mut() = status;
        Self(resp)
    }

    /// Adds (or replaces) one header.
    pub(crate) fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.0.headers_mut().insert(name, value);
        self
    }

    /// A `308 Permanent Redirect` to `location`, with no body; `None` when
    /// `location` cannot be a header value.
    pub(crate) fn redirect(location: &str) -> Option<Response<Bytes>> {
        let location = HeaderValue::try_from(location).ok()?;
        Some(
            Self::new(StatusCode::PERMANENT_REDIRECT)
                .header(header::LOCATION, location)
                .empty(),
        )
    }

    /// Ends with a plain-text body (`text/plain; charset=utf-8`).
    pub(crate) fn text(self, body: impl Into<Bytes>) -> Response<Bytes> {
        self.header(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )
        .body(body)
    }

    /// Ends with `body`, its headers as added.
    pub(crate) fn body(mut self, body: impl Into<Bytes>) -> Response<Bytes> {
        *self.0.body_mut() = body.into();
        self.0
    }

    /// Ends with no body.
    pub(crate) fn empty(self) -> Response<Bytes> {
        self.0
    }
}
