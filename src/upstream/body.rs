//! The bodies of one upstream exchange: the request body sent upstream
//! ([`RequestBody`]), the response body coming back ([`UpstreamBody`]), and
//! the `Exchange` they share, which decides whether the connection may go
//! back to the pool once both are done.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Limited;
use hyper::body::Incoming;

use super::pool::Conn;
use super::Pool;
use crate::connection::ClientBody;

type BoxError = Box<dyn StdError + Send + Sync>;

/// One exchange's request body as its upstream connection sees it, shared
/// between the body being written and the response coming back.
#[derive(Default)]
pub(super) struct Exchange {
    /// The body has been sent to its end.
    sent: AtomicBool,
    /// The response ended first: the body is to stop, failing the connection.
    abandoned: AtomicBool,
    /// The connection task waiting for more of the body.
    waker: Mutex<Option<Waker>>,
}

impl Exchange {
    fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
        if let Some(w) = self.waker.lock().unwrap_or_else(PoisonError::into_inner).take() {
            w.wake();
        }
    }
}

/// The request body sent upstream: the client's, streamed, capped at `limits.max_request_body`.
pub struct RequestBody {
    first: Option<Frame<Bytes>>,
    /// `None` in a copy made to send again.
    rest: Option<Limited<ClientBody>>,
    /// `None` for a body with nothing left to send after `first`.
    pub(super) exchange: Option<Arc<Exchange>>,
}

impl RequestBody {
    /// A body whose first frame the proxy has already read (to refuse a
    /// malformed body before anything reaches the upstream), then the rest.
    pub fn new(first: Option<Frame<Bytes>>, rest: Limited<ClientBody>) -> Self {
        let exchange = (!rest.is_end_stream()).then(Arc::default);
        Self {
            first,
            rest: Some(rest),
            exchange,
        }
    }

    /// No body at all (tests).
    #[cfg(test)]
    pub(super) fn empty() -> Self {
        Self {
            first: None,
            rest: None,
            exchange: None,
        }
    }

    /// A copy to send again, when the body is already complete in memory
    /// (none, or a first frame that was the whole of it).
    pub(super) fn replayable(&self) -> Option<Self> {
        if self.exchange.is_some() {
            return None;
        }
        let first = match &self.first {
            None => None,
            Some(frame) => Some(Frame::data(frame.data_ref()?.clone())),
        };
        Some(Self {
            first,
            rest: None,
            exchange: None,
        })
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
        let (Some(exchange), Some(rest)) = (&this.exchange, &mut this.rest) else {
            return Poll::Ready(None);
        };
        if exchange.abandoned.load(Ordering::Acquire) {
            return Poll::Ready(Some(Err(
                "the upstream answered before the request body was complete".into()
            )));
        }
        let polled = Pin::new(&mut *rest).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => exchange.sent.store(true, Ordering::Release),
            Poll::Ready(Some(Ok(_))) if rest.is_end_stream() => exchange.sent.store(true, Ordering::Release),
            Poll::Pending => {
                *exchange.waker.lock().unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && (self.exchange.is_none() || self.rest.as_ref().is_none_or(Limited::is_end_stream))
    }

    fn size_hint(&self) -> SizeHint {
        // The upstream gets a Content-Length whenever the client sent one.
        let first = self
            .first
            .as_ref()
            .and_then(Frame::data_ref)
            .map_or(0, |d| d.len() as u64);
        let rest = match (&self.exchange, &self.rest) {
            (Some(_), Some(rest)) => rest.size_hint(),
            _ => SizeHint::with_exact(0),
        };
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + first);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + first);
        }
        hint
    }
}

/// A response body from the upstream. Its connection goes back to the pool
/// once the body has been read to the end; a body dropped before that (the
/// client went away) takes its connection down with it.
pub struct UpstreamBody {
    pub(super) inner: Incoming,
    pub(super) conn: Option<(Conn, Arc<Pool>)>,
    pub(super) exchange: Option<Arc<Exchange>>,
}

impl UpstreamBody {
    pub(super) fn release(&mut self) {
        let Some((conn, pool)) = self.conn.take() else {
            return;
        };
        match self.exchange.take() {
            // Answered before the request body was all sent: that connection
            // is midway through a request, and is closed, never reused.
            Some(exchange) if !exchange.sent.load(Ordering::Acquire) => exchange.abandon(),
            _ => pool.checkin(conn),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Dropped early: the connection goes down with it; a body still
        // being sent on it stops now rather than when the client's does.
        if let Some(exchange) = self.exchange.take() {
            if self.conn.is_some() && !exchange.sent.load(Ordering::Acquire) {
                exchange.abandon();
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
