//! A client's request body as it arrives, whatever the protocol: hyper's
//! (HTTP/1.1 and HTTP/2) or an HTTP/3 request stream's. One type, so that
//! every request goes through the same `Proxy::handle`; on the TCP path it
//! is hyper's body moved into an enum, nothing more.

use std::error::Error as StdError;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The receiving half of an HTTP/3 request stream.
pub type Http3Stream = h3::server::RequestStream<crate::server::quic_streams::RecvStream, Bytes>;

/// The body of one request, as received.
pub enum Inbound {
    /// HTTP/1.1 or HTTP/2, from hyper.
    Hyper(Incoming),
    /// HTTP/3: the DATA frames of a request stream.
    /// Boxed: HTTP/1.1 and HTTP/2 bodies, the many, are not sized for it.
    Http3(Box<Http3Body>),
}

impl From<Incoming> for Inbound {
    fn from(body: Incoming) -> Self {
        Self::Hyper(body)
    }
}

/// An HTTP/3 request's body: the stream's DATA frames until it ends.
/// (Trailers are not read: linkgate forwards none.) A body longer or
/// shorter than its Content-Length is an error (RFC 9114 §4.1.2: the
/// request is malformed), so that the upstream is never sent a length
/// that its body does not have; hyper and h2 do the same for HTTP/1.1 and
/// HTTP/2.
pub struct Http3Body {
    stream: Http3Stream,
    /// The request's Content-Length, when it gave one.
    declared: Option<u64>,
    received: u64,
    done: bool,
}

/// The body did not match its Content-Length.
#[derive(Debug, thiserror::Error)]
#[error("request body of {received} bytes or more where Content-Length said {declared}")]
pub struct LengthMismatch {
    declared: u64,
    received: u64,
}

impl Http3Body {
    pub fn new(stream: Http3Stream, declared: Option<u64>) -> Self {
        Self {
            stream,
            declared,
            received: 0,
            done: false,
        }
    }

    /// Ends the body with the error for a length that is not the declared one.
    fn mismatch(&mut self, declared: u64) -> BoxError {
        self.done = true;
        Box::new(LengthMismatch {
            declared,
            received: self.received,
        })
    }
}

impl Body for Http3Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match this.stream.poll_recv_data(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(mut data))) => {
                let data = data.copy_to_bytes(data.remaining());
                this.received += data.len() as u64;
                match this.declared {
                    Some(declared) if this.received > declared => Poll::Ready(Some(Err(this.mismatch(declared)))),
                    _ => Poll::Ready(Some(Ok(Frame::data(data)))),
                }
            }
            Poll::Ready(Ok(None)) => {
                this.done = true;
                match this.declared {
                    Some(declared) if this.received != declared => Poll::Ready(Some(Err(this.mismatch(declared)))),
                    _ => Poll::Ready(None),
                }
            }
            Poll::Ready(Err(e)) => {
                this.done = true;
                Poll::Ready(Some(Err(Box::new(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.declared == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.declared {
            Some(n) if !self.done => SizeHint::with_exact(n.saturating_sub(self.received)),
            _ if self.done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Body for Inbound {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::Http3(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper(body) => body.is_end_stream(),
            Self::Http3(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Hyper(body) => body.size_hint(),
            Self::Http3(body) => body.size_hint(),
        }
    }
}
