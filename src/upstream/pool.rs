//! The idle list of one worker's upstream pool: checkout, checkin, the
//! sweep that closes expired connections, and idle shedding after a burst.
//!
//! Each worker has its own [`Upstream`](super::Upstream) (its connections are served on one
//! thread), so the pool is a plain list behind an uncontended lock: the most
//! recently used connection is taken first, connections idle longer than
//! `pool_idle_timeout` are closed, and after a burst the connections it no
//! longer needs are closed within seconds (see [`PURGE_EVERY`]). It is built on hyper's connection API
//! rather than hyper-util's general client because a proxy with one upstream
//! needs none of that client's keying, connector layers or per-request
//! boxing, and those were a measurable part of each request's CPU.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hyper::client::conn::http1;

use super::{Pool, RequestBody};

/// Every this often, half of the idle connections that have not been used
/// since the last time are closed (keeping one): a burst of clicks can open
/// hundreds of upstream connections (about 30 KiB each), and once it has
/// passed they are closed within seconds instead of `pool_idle_timeout`,
/// while a pool in steady use keeps the connections it uses. (HAProxy's
/// `pool-purge-delay` works the same way.)
pub const PURGE_EVERY: Duration = Duration::from_secs(2);

/// One upstream connection as the pool holds it.
pub(super) struct Conn {
    pub(super) sender: http1::SendRequest<RequestBody>,
    /// Bytes read from the connection so far: unchanged after a failed
    /// request means the upstream sent no byte of an answer.
    pub(super) read: Arc<AtomicU64>,
}

pub(super) struct Idle {
    conn: Conn,
    since: Instant,
}

impl Idle {
    fn expired(&self, now: Instant, idle_timeout: Duration) -> bool {
        now.saturating_duration_since(self.since) >= idle_timeout
    }
}

impl Pool {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        // Uncontended: one worker's connections run on one thread.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used idle connection that is ready for a request.
    /// One still finishing its previous exchange is skipped (and kept); one
    /// that has closed is dropped.
    pub(super) fn checkout(&self) -> Option<Conn> {
        self.checkout_at(Instant::now())
    }

    fn checkout_at(&self, now: Instant) -> Option<Conn> {
        let mut idle = self.lock();
        let mut cx = Context::from_waker(Waker::noop());
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if idle[i].expired(now, self.idle_timeout) {
                // This one is too old, so are all before it.
                idle.drain(..=i);
                return None;
            }
            match idle[i].conn.sender.poll_ready(&mut cx) {
                Poll::Ready(Ok(())) => return idle.remove(i).map(|i| i.conn),
                Poll::Ready(Err(_)) => {
                    idle.remove(i);
                }
                Poll::Pending => {}
            }
        }
        None
    }

    pub(super) fn checkin(self: Arc<Self>, conn: Conn) {
        self.checkin_at(conn, Instant::now());
    }

    fn checkin_at(self: Arc<Self>, conn: Conn, now: Instant) {
        if conn.sender.is_closed() {
            return;
        }
        {
            let mut idle = self.lock();
            self.expire(&mut idle, now);
            idle.push_back(Idle { conn, since: now });
        }
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(sweep(Arc::downgrade(&self)));
        }
    }

    /// Drops connections idle longer than `idle_timeout` (their tasks then close them).
    fn expire(&self, idle: &mut VecDeque<Idle>, now: Instant) {
        while idle
            .front()
            .is_some_and(|i| i.conn.sender.is_closed() || i.expired(now, self.idle_timeout))
        {
            idle.pop_front();
        }
    }

    /// The sweep's look at the idle list at `now`: closes the expired
    /// connections, the surplus (see [`purge`]), and all of them while a
    /// request waits for a permit. Returns when to look again, or `None`
    /// (the sweep then ends) when nothing is left idle.
    fn tidy(&self, now: Instant) -> Option<Instant> {
        let mut idle = self.lock();
        self.expire(&mut idle, now);
        purge(&mut idle, now);
        if self.shared.waiting.load(Ordering::Acquire) > 0 {
            idle.clear();
        }
        let Some(oldest) = idle.front() else {
            self.sweeping.store(false, Ordering::Release);
            return None;
        };
        // Every PURGE_EVERY, also while only one is idle: more may
        // be checked in before the next wake-up, and nothing else wakes it.
        Some((oldest.since + self.idle_timeout).min(now + PURGE_EVERY))
    }
}

/// Closes each idle connection when it has idled `pool_idle_timeout`, and
/// the surplus every [`PURGE_EVERY`], for as long as there are idle
/// connections; and all of them while a request anywhere waits for an
/// upstream connection permit.
async fn sweep(pool: Weak<Pool>) {
    loop {
        let (next, wanted) = {
            let Some(pool) = pool.upgrade() else {
                return;
            };
            let Some(next) = pool.tidy(Instant::now()) else {
                return;
            };
            (next, pool.shared.wanted.clone())
        };
        let notified = wanted.notified();
        tokio::pin!(notified);
        // Registered before the last look at `waiting` below: a request
        // that starts waiting from here on wakes this sweep.
        notified.as_mut().enable();
        let someone_waits = pool
            .upgrade()
            .is_some_and(|p| p.shared.waiting.load(Ordering::Acquire) > 0 && !p.lock().is_empty());
        if someone_waits {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep_until(next.into()) => {}
            () = notified => {}
        }
    }
}

/// Closes half (rounded down) of the connections unused for [`PURGE_EVERY`]:
/// the oldest-idle ones, at the front. One unused connection is kept.
fn purge(idle: &mut VecDeque<Idle>, now: Instant) {
    let unused = idle
        .iter()
        .take_while(|i| now.saturating_duration_since(i.since) >= PURGE_EVERY)
        .count();
    idle.drain(..unused / 2);
}

#[cfg(test)]
mod tests {
    //! Pool policy on real loopback connections to a tiny HTTP/1.1 server,
    //! with the pool's clock handed in (`checkout_at`, `checkin_at`, `tidy`)
    //! instead of slept through: the pool reads `std::time::Instant`, which
    //! `tokio::time::pause()` does not move (and tokio's `test-util` is not
    //! enabled).

    use std::net::SocketAddr;

    use http::uri::Scheme;
    use http::Request;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::config;
    use crate::upstream::{Shared, Upstream};

    const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

    /// One connection the test server accepted: dropping `close` closes it
    /// from the server's side; `ended` resolves once the client closed it.
    struct Served {
        close: oneshot::Sender<()>,
        ended: oneshot::Receiver<()>,
    }

    /// A tiny HTTP/1.1 upstream: answers every request `200 ok`, keep-alive,
    /// and reports each connection it accepts, in order.
    async fn server() -> (SocketAddr, mpsc::UnboundedReceiver<Served>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let (close, mut closed) = oneshot::channel::<()>();
                let (ended_tx, ended) = oneshot::channel();
                if tx.send(Served { close, ended }).is_err() {
                    return;
                }
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        tokio::select! {
                            _ = &mut closed => return,
                            read = tcp.read(&mut chunk) => match read {
                                Ok(0) | Err(_) => {
                                    let _ = ended_tx.send(());
                                    return;
                                }
                                Ok(n) => {
                                    head.extend_from_slice(&chunk[..n]);
                                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                                        head.drain(..end + 4);
                                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                                        if tcp.write_all(answer).await.is_err() {
                                            return;
                                        }
                                    }
                                }
                            },
                        }
                    }
                });
            }
        });
        (addr, rx)
    }

    fn pool(addr: SocketAddr) -> Arc<Pool> {
        let metrics = crate::metrics::Metrics::new();
        let shared = Shared::new(16, &metrics);
        let cfg = config::Upstream {
            scheme: Scheme::HTTP,
            authority: http::uri::Authority::from_static("upstream.test"),
            connect_to: Some(addr),
            ca_certs: None,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            pool_idle_timeout: IDLE_TIMEOUT,
            provider: None,
            max_header_bytes: None,
        };
        Upstream::new(&cfg, &shared).expect("upstream").pool
    }

    /// A new connection, ready for a request, and the server's side of it.
    async fn connect(pool: &Pool, served: &mut mpsc::UnboundedReceiver<Served>) -> (Conn, Served) {
        let mut conn = pool.connect().await.expect("connect");
        conn.sender.ready().await.expect("ready");
        (conn, served.recv().await.expect("accepted"))
    }

    /// Waits until the client side has noticed the server closed `conn`.
    async fn until_closed(conn: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !conn() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the client noticed the close");
    }

    async fn ended(served: Served) {
        tokio::time::timeout(Duration::from_secs(5), served.ended)
            .await
            .expect("the pool closed the connection")
            .expect("closed by the client, not the server");
    }

    #[tokio::test]
    async fn a_response_read_to_its_end_gives_its_connection_back() {
        let (addr, mut served) = server().await;
        let upstream = Upstream { pool: pool(addr) };
        for _ in 0..3 {
            let req = Request::get("/").body(RequestBody::empty()).expect("request");
            let resp = upstream.send(req).await.expect("answered");
            let body = http_body_util::BodyExt::collect(resp.into_body()).await.expect("body");
            assert_eq!(body.to_bytes(), "ok");
        }
        let _first = served.recv().await.expect("one connection");
        assert!(served.try_recv().is_err(), "one connection served all three");
        assert_eq!(upstream.pool.lock().len(), 1);
    }

    #[tokio::test]
    async fn the_newest_idle_connection_is_checked_out_first() {
        let (addr, mut served) = server().await;
        let pool = pool(addr);
        let (a, _sa) = connect(&pool, &mut served).await;
        let (b, _sb) = connect(&pool, &mut served).await;
        let (a_read, b_read) = (a.read.clone(), b.read.clone());
        let t0 = Instant::now();
        pool.clone().checkin_at(a, t0);
        pool.clone().checkin_at(b, t0 + Duration::from_millis(1));
        let first = pool.checkout_at(t0 + Duration::from_millis(2)).expect("one idle");
        assert!(Arc::ptr_eq(&first.read, &b_read), "the newest first");
        let second = pool.checkout_at(t0 + Duration::from_millis(2)).expect("one more idle");
        assert!(Arc::ptr_eq(&second.read, &a_read));
        assert!(pool.checkout_at(t0 + Duration::from_millis(2)).is_none());
        // A connection checked in again is the newest once more.
        pool.clone().checkin_at(second, t0 + Duration::from_millis(3));
        pool.clone().checkin_at(first, t0 + Duration::from_millis(4));
        let again = pool.checkout_at(t0 + Duration::from_millis(5)).expect("idle");
        assert!(Arc::ptr_eq(&again.read, &b_read));
    }

    #[tokio::test]
    async fn an_idle_connection_past_pool_idle_timeout_is_not_checked_out() {
        let (addr, mut served) = server().await;
        let pool = pool(addr);
        let (old, s_old) = connect(&pool, &mut served).await;
        let (new, _s_new) = connect(&pool, &mut served).await;
        let new_read = new.read.clone();
        let t0 = Instant::now();
        pool.clone().checkin_at(old, t0);
        pool.clone().checkin_at(new, t0 + Duration::from_secs(10));
        // Just inside the timeout, the old one would still do.
        let fresh = pool.checkout_at(t0 + IDLE_TIMEOUT).expect("the newer one");
        assert!(Arc::ptr_eq(&fresh.read, &new_read));
        // At its timeout the old one is not checked out, and is closed.
        assert!(pool.checkout_at(t0 + IDLE_TIMEOUT).is_none());
        assert!(pool.lock().is_empty(), "the expired connection left the pool");
        ended(s_old).await;
        // Checked in past the timeout of those already idle, they are closed too.
        pool.clone().checkin_at(fresh, t0 + Duration::from_secs(10));
        let (other, s_other) = connect(&pool, &mut served).await;
        let other_read = other.read.clone();
        pool.clone()
            .checkin_at(other, t0 + Duration::from_secs(10) + IDLE_TIMEOUT);
        assert_eq!(pool.lock().len(), 1);
        let left = pool
            .checkout_at(t0 + Duration::from_secs(10) + IDLE_TIMEOUT)
            .expect("idle");
        assert!(Arc::ptr_eq(&left.read, &other_read));
        drop(s_other);
    }

    #[tokio::test]
    async fn a_closed_connection_is_dropped_at_checkout_and_at_checkin() {
        let (addr, mut served) = server().await;
        let pool = pool(addr);
        let (a, _sa) = connect(&pool, &mut served).await;
        let (b, sb) = connect(&pool, &mut served).await;
        let a_read = a.read.clone();
        let t0 = Instant::now();
        pool.clone().checkin_at(a, t0);
        pool.clone().checkin_at(b, t0);
        // The server closes the newest while it idles.
        drop(sb.close);
        until_closed(|| pool.lock().back().is_some_and(|i| i.conn.sender.is_closed())).await;
        let out = pool.checkout_at(t0).expect("the open one");
        assert!(Arc::ptr_eq(&out.read, &a_read), "the closed one is skipped");
        assert!(pool.lock().is_empty(), "the closed one is dropped, not kept");
        // One closed before it comes back is not kept either.
        let (c, sc) = connect(&pool, &mut served).await;
        drop(sc.close);
        until_closed(|| c.sender.is_closed()).await;
        pool.clone().checkin_at(c, t0);
        assert!(pool.lock().is_empty());
        pool.clone().checkin_at(out, t0);
        assert_eq!(pool.lock().len(), 1);
    }

    #[tokio::test]
    async fn the_sweep_closes_expired_connections_and_the_surplus() {
        let (addr, mut served) = server().await;
        let pool = pool(addr);
        let t0 = Instant::now();
        let mut sides = Vec::new();
        for _ in 0..4 {
            let (conn, side) = connect(&pool, &mut served).await;
            pool.clone().checkin_at(conn, t0);
            sides.push(side);
        }
        // Before PURGE_EVERY nothing is closed; the next look is then.
        assert_eq!(
            pool.tidy(t0 + Duration::from_millis(1)),
            Some(t0 + Duration::from_millis(1) + PURGE_EVERY)
        );
        assert_eq!(pool.lock().len(), 4);
        // Unused for PURGE_EVERY: half are closed, the oldest-idle first.
        assert_eq!(pool.tidy(t0 + PURGE_EVERY), Some(t0 + PURGE_EVERY * 2));
        assert_eq!(pool.lock().len(), 2);
        let mut sides = sides.into_iter();
        ended(sides.next().expect("first")).await;
        ended(sides.next().expect("second")).await;
        // At pool_idle_timeout all are closed, and the sweep ends.
        assert_eq!(pool.tidy(t0 + IDLE_TIMEOUT), None);
        assert!(pool.lock().is_empty());
        assert!(!pool.sweeping.load(Ordering::Acquire));
        for side in sides {
            ended(side).await;
        }
    }

    #[tokio::test]
    async fn every_idle_connection_is_closed_while_a_request_waits_for_a_permit() {
        let (addr, mut served) = server().await;
        let pool = pool(addr);
        let (conn, side) = connect(&pool, &mut served).await;
        let t0 = Instant::now();
        pool.clone().checkin_at(conn, t0);
        assert!(pool.tidy(t0).is_some());
        assert_eq!(pool.lock().len(), 1);
        pool.shared.waiting.fetch_add(1, Ordering::AcqRel);
        assert_eq!(pool.tidy(t0), None);
        assert!(pool.lock().is_empty());
        ended(side).await;
    }
}
