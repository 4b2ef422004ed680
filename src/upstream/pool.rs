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
        let now = Instant::now();
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
        if conn.sender.is_closed() {
            return;
        }
        let now = Instant::now();
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
            let now = Instant::now();
            let mut idle = pool.lock();
            pool.expire(&mut idle, now);
            purge(&mut idle, now);
            if pool.shared.waiting.load(Ordering::Acquire) > 0 {
                idle.clear();
            }
            let Some(oldest) = idle.front() else {
                pool.sweeping.store(false, Ordering::Release);
                return;
            };
            // Every PURGE_EVERY, also while only one is idle: more may
            // be checked in before the next wake-up, and nothing else wakes it.
            (
                (oldest.since + pool.idle_timeout).min(now + PURGE_EVERY),
                pool.shared.wanted.clone(),
            )
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
