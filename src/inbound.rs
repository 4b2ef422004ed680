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
/// HTTP/2. As h2 does, a body found short with the data that ends it fails
/// with that data, not after it: when a frame leaves the body short of its
/// length, the stream is looked at once more, and if it has ended there
/// the body fails at once, so a body that arrives short in one piece is
/// refused before any of it is forwarded.
pub struct Http3Body {
    stream: Http3Stream,
    /// The request's Content-Length, when it gave one.
    declared: Option<u64>,
    received: u64,
    done: bool,
    /// What that look ahead found, to be handed out next.
    ahead: Option<Option<Result<Bytes, BoxError>>>,
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
            ahead: None,
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

    /// The stream's next data, its end (`None`), or its error.
    fn poll_stream(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        match self.stream.poll_recv_data(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(mut data))) => Poll::Ready(Some(Ok(data.copy_to_bytes(data.remaining())))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
        }
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
        let next = match this.ahead.take() {
            Some(next) => next,
            None => match this.poll_stream(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(next) => next,
            },
        };
        match next {
            Some(Ok(data)) => {
                this.received += data.len() as u64;
                match this.declared {
                    Some(declared) if this.received > declared => Poll::Ready(Some(Err(this.mismatch(declared)))),
                    Some(declared) if this.received < declared => match this.poll_stream(cx) {
                        Poll::Ready(None) => Poll::Ready(Some(Err(this.mismatch(declared)))),
                        Poll::Ready(later) => {
                            this.ahead = Some(later);
                            Poll::Ready(Some(Ok(Frame::data(data))))
                        }
                        Poll::Pending => Poll::Ready(Some(Ok(Frame::data(data)))),
                    },
                    _ => Poll::Ready(Some(Ok(Frame::data(data)))),
                }
            }
            None => {
                this.done = true;
                match this.declared {
                    Some(declared) if this.received != declared => Poll::Ready(Some(Err(this.mismatch(declared)))),
                    _ => Poll::Ready(None),
                }
            }
            Some(Err(e)) => {
                this.done = true;
                Poll::Ready(Some(Err(e)))
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
