//! What is known about one client connection: its client address, the host
//! its TLS handshake named, whether its forwarding headers are trusted, and
//! the requests in flight on it (for the idle timeout and parking); whether
//! an HTTP/1 connection is between messages and may be resumed after
//! parking; the client's request body; and whether an HTTP/2 stream's
//! response is still making progress. (The I/O wrappers, the bound on a
//! client that stops reading and the stream a parked connection resumes on,
//! are `server/io.rs`.)

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Sleep;

use crate::host::HostName;
use crate::inbound::Inbound;

/// What the server knows about the connection a request came in on.
#[derive(Debug)]
pub struct ConnInfo {
    /// The client's address: the peer, or what its PROXY header said.
    pub peer: SocketAddr,
    /// The configured host the TLS handshake named; `None` on plain http.
    pub sni: Option<HostName>,
    /// Keep and append to the incoming X-Forwarded-For/-Proto: the peer is a
    /// trusted proxy speaking HTTP (not a PROXY-protocol balancer relaying a client).
    pub keep_forwarded: bool,
    /// Negotiated TLS version, for the access log.
    pub tls_version: Option<&'static str>,
    /// The TLS handshake resumed an earlier session, for the access log.
    /// `None` where it is not known (HTTP/3: quinn does not say).
    pub tls_resumed: Option<bool>,
    /// Requests in flight, for the idle timeout.
    pub activity: Activity,
    /// HTTP/2: a permit per upstream connection its streams hold, so one
    /// client connection holds `limits.upstream_per_connection` at most.
    /// (An HTTP/1 connection has one request at a time.)
    upstream_slots: Option<Arc<Semaphore>>,
}

impl ConnInfo {
    pub fn new(
        peer: SocketAddr,
        sni: Option<HostName>,
        keep_forwarded: bool,
        tls_version: Option<&'static str>,
    ) -> Self {
        Self {
            peer,
            sni,
            keep_forwarded,
            tls_version,
            tls_resumed: None,
            activity: Activity::new(),
            upstream_slots: None,
        }
    }

    /// Records that the TLS handshake resumed an earlier session.
    pub fn with_tls_resumed(mut self, resumed: bool) -> Self {
        self.tls_resumed = Some(resumed);
        self
    }

    /// Lets this connection hold at most `n` upstream connections at a time.
    pub fn with_upstream_slots(mut self, n: u32) -> Self {
        self.upstream_slots = Some(Arc::new(Semaphore::new(n as usize)));
        self
    }

    /// HTTP/2 or HTTP/3: many requests share the connection, each held to
    /// a flow-control window its client may never open.
    pub(crate) fn multiplexed(&self) -> bool {
        self.upstream_slots.is_some()
    }

    /// A turn to use an upstream connection, if one is free now: `Some(None)`
    /// on HTTP/1 (no bound), `None` when every slot is in use (then wait with
    /// [`ConnInfo::upstream_slot`]). Most requests find one, and need no timer.
    pub(crate) fn free_upstream_slot(&self) -> Option<Option<OwnedSemaphorePermit>> {
        let Some(slots) = &self.upstream_slots else {
            return Some(None);
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => Some(Some(permit)),
            Err(TryAcquireError::NoPermits) => None,
            Err(TryAcquireError::Closed) => Some(None),
        }
    }

    /// Waits for a turn to use an upstream connection (at once on HTTP/1).
    pub(crate) async fn upstream_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.upstream_slots.clone()?.acquire_owned().await.ok()
    }

    pub(crate) fn proto(&self) -> &'static str {
        if self.sni.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// Counts the requests in flight on a connection (from request head to the
/// end of the response body), the requests completed, and when the last one
/// ended; and whether the connection is at a message boundary that a new
/// HTTP/1 parser may start from (see [`Activity::resumable`]).
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicU32,
    completed: AtomicU32,
    /// Milliseconds after `epoch` when the connection last became idle.
    idle_since_ms: AtomicU64,
    epoch: tokio::time::Instant,
    /// Request bodies that have begun and not yet been read to their end.
    open_bodies: AtomicU32,
    /// Set once anything has happened after which the bytes that follow on
    /// the connection must not be read as a request: see [`Activity::must_close`].
    must_close: AtomicBool,
    /// Set with `must_close` unless only the client's own close asked for
    /// it ([`Activity::client_closes`]): the client may still be sending.
    unsettled: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            completed: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            open_bodies: AtomicU32::new(0),
            must_close: AtomicBool::new(false),
            unsettled: AtomicBool::new(false),
        }
    }

    /// Marks the connection as one that must not be resumed after parking:
    /// a request or answer said `Connection: close` (every refusal does), the
    /// request was not plain HTTP/1.1 keep-alive, its framing carried
    /// Transfer-Encoding (hyper may have dropped a Content-Length beside it
    /// and decided to close), or its body was abandoned before its end.
    /// hyper then ends the connection itself when it has finished; parking
    /// must not hand what follows to a new parser.
    pub(crate) fn must_close(&self) {
        self.must_close.store(true, Ordering::Relaxed);
        self.unsettled.store(true, Ordering::Relaxed);
    }

    /// Marks the connection as one the client itself is closing: its plain
    /// request (HTTP/1.0, or `Connection: close`) is its last, and nothing
    /// follows it (RFC 9112 §9.6). Not resumable either; but once that
    /// request's body has been read, closing needs no lingering.
    pub(crate) fn client_closes(&self) {
        self.must_close.store(true, Ordering::Relaxed);
    }

    /// True when the client may still be sending after the last answer: a
    /// refusal, an ambiguous request or an unread body (see
    /// [`Activity::must_close`]); false when the connection is between
    /// messages or the client closes it after a request read to its end.
    pub fn client_may_send(&self) -> bool {
        self.unsettled.load(Ordering::Relaxed) || self.open_bodies.load(Ordering::Relaxed) > 0
    }

    /// True when every request has been answered, every request body read
    /// to its end and nothing asked for the connection to close: the
    /// connection is between two messages, and bytes that follow are the
    /// start of the next request.
    pub fn resumable(&self) -> bool {
        !self.must_close.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.open_bodies.load(Ordering::Relaxed) == 0
    }

    pub(crate) fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn end(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.idle_since_ms.store(ms, Ordering::Relaxed);
        self.completed.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// How many requests have completed so far (wrapping).
    pub fn completed(&self) -> u32 {
        self.completed.load(Ordering::Relaxed)
    }

    fn idle_since(&self) -> tokio::time::Instant {
        self.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed))
    }

    /// Completes once no request has been in flight for `idle`
    /// ([`Quiet::Idle`]) or, with `park` given as `(after, since)`, once a
    /// request has completed since [`completed`](Self::completed) returned
    /// `since` and none has been in flight for `after` after it
    /// ([`Quiet::Park`]), whichever comes first. One timer serves both, so a
    /// connection's task holds one timer, not two.
    ///
    /// Not an `async fn`: that would keep a second copy of the arguments in
    /// the state of every connection waiting on it.
    #[allow(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice")]
    pub fn quiet(&self, park: Option<(Duration, u32)>, idle: Duration) -> impl Future<Output = Quiet> + '_ {
        async move {
            loop {
                let now = tokio::time::Instant::now();
                let busy = self.in_flight.load(Ordering::Relaxed) > 0;
                let idle_since = self.idle_since();
                if !busy && idle_since + idle <= now {
                    return Quiet::Idle;
                }
                let mut wake = if busy { now + idle } else { idle_since + idle };
                if let Some((after, since)) = park {
                    let waiting = busy || self.completed() == since;
                    let settles = idle_since + after;
                    if !waiting && settles <= now {
                        return Quiet::Park;
                    }
                    wake = wake.min(if waiting { now + after } else { settles });
                }
                tokio::time::sleep_until(wake).await;
            }
        }
    }
}

/// A client's request body, as the proxy reads it: counted as open on its
/// connection's [`Activity`] until it has been read to its end. Dropped
/// before that (refused, answered early, the upstream went away), it marks
/// the connection [`Activity::must_close`]: hyper is then midway through
/// the body, and what follows on the connection is not a request.
pub struct ClientBody {
    inner: Inbound,
    /// Set while the body is open; taken when it ends.
    conn: Option<Arc<ConnInfo>>,
}

impl ClientBody {
    pub fn new(inner: Inbound, conn: &Arc<ConnInfo>) -> Self {
        if inner.is_end_stream() {
            return Self { inner, conn: None };
        }
        conn.activity.open_bodies.fetch_add(1, Ordering::Relaxed);
        Self {
            inner,
            conn: Some(conn.clone()),
        }
    }

    fn ended(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.activity.open_bodies.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The client's request body failed: it broke off, or did not match its
/// Content-Length. Whatever upstream request it was being sent in fails
/// with it, and the failure is the client's, not the upstream's.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed: {0}")]
pub struct ClientBodyError(#[source] Box<dyn std::error::Error + Send + Sync>);

impl Body for ClientBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.ended(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.ended(),
            _ => {}
        }
        polled.map_err(|e| Box::new(ClientBodyError(e)) as Self::Error)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.activity.must_close();
            conn.activity.open_bodies.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

thread_local! {
    /// The stream being polled on this thread (see [`Watched`]): whether its
    /// response head is out, and whether its body moved since the poll began.
    static STREAM: Cell<(bool, bool)> = const { Cell::new((false, false)) };
}

/// Called when a response head is ready: from here on, the HTTP/2 stream
/// being polled is cut if its body stops moving (see [`Watched`]).
pub(crate) fn responding() {
    STREAM.with(|s| s.set((true, s.get().1)));
}

/// Called when a response body hands out a frame: the stream moved.
pub(crate) fn progressed() {
    STREAM.with(|s| s.set((s.get().0, true)));
}

/// The executor for HTTP/2 streams: hyper runs each stream in a task of its
/// own, and each is spawned wrapped in [`Watched`].
#[derive(Clone, Copy, Debug)]
pub struct StreamExecutor {
    /// `limits.idle_timeout`.
    pub stall: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Watched {
            inner: Box::pin(fut),
            stall: self.stall,
            responding: false,
            last: tokio::time::Instant::now(),
            timer: None,
        });
    }
}

/// One HTTP/2 stream's task, cut when its response has made no progress
/// toward the client for `stall`. A client that grants no flow-control
/// window (`SETTINGS_INITIAL_WINDOW_SIZE = 0`) while answering PINGs leaves
/// hyper waiting for capacity, with nothing to write, so neither the
/// stalled-write bound nor the idle timeout (a request is in flight) would
/// ever end it, and its upstream connection would be held for good.
/// Dropping the stream's future resets the stream (`RST_STREAM`), drops its
/// response body and with it the upstream connection.
///
/// The stream's future is boxed on purpose: hyper's is large, and tokio
/// copies a future by value on its way into a task; moved as a box it is
/// copied once. Held inline instead, (b) measured 1.10x the CPU per request
/// (4 alternating rounds: 1.13 1.01 1.07 1.32).
pub struct Watched<F> {
    inner: Pin<Box<F>>,
    stall: Duration,
    /// The response head is out: progress is watched from now on.
    responding: bool,
    /// When the body last moved (or the head went out).
    last: tokio::time::Instant,
    /// Armed the first time the stream waits while responding.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<F: Future> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let outer = STREAM.with(|s| s.replace((this.responding, false)));
        let polled = this.inner.as_mut().poll(cx);
        let (responding, moved) = STREAM.with(|s| s.replace(outer));
        if polled.is_ready() {
            return Poll::Ready(());
        }
        if responding && (moved || !this.responding) {
            this.last = tokio::time::Instant::now();
        }
        this.responding = responding;
        if !responding {
            return Poll::Pending;
        }
        // Re-armed only when it fires early, not at every frame.
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(this.last + this.stall)));
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = this.last + this.stall;
            if deadline <= tokio::time::Instant::now() {
                tracing::debug!(stall = ?this.stall, "HTTP/2 response made no progress; stream cut");
                return Poll::Ready(());
            }
            timer.as_mut().reset(deadline);
        }
    }
}

/// What [`Activity::quiet`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiet {
    /// Settled after a request: the connection may be parked.
    Park,
    /// Idle for the whole idle timeout: the connection should close.
    Idle,
}
