//! Admission of connections that have not finished their handshake: a
//! budget of their own across the process (`limits.max_handshakes`, smaller
//! than `max_connections`) and a cap per client address
//! (`limits.handshakes_per_address`), so that one address holding silent
//! sockets, or many holding a few each, cannot take the slots that
//! established clients and new honest ones need.
//!
//! A connection takes a [`Handshake`] as soon as it is accepted, before its
//! PROXY header is read (the balancer's own connections count toward the
//! budget), and claims its client address once that is known (the PROXY
//! header's, when there is one). It gives both back when the handshake is
//! over, whatever the outcome, or when it is dropped. The table of
//! addresses holds only addresses with a handshake in progress.
//!
//! Also here: what a listener does when `accept` itself fails (out of
//! descriptors): pause, and log about it at a bounded rate.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Pause after a failed accept (e.g. EMFILE) before trying again: the
/// connection that could not be taken is still queued, so trying at once
/// would fail at once, again and again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// At most one log line per listener loop this often about failed accepts.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// One listener loop's failed accepts: each is followed by a pause of
/// [`ACCEPT_BACKOFF`], and logged only if none was logged in the last
/// [`ACCEPT_LOG_EVERY`] (the line says how many went unlogged since).
#[derive(Debug, Default)]
pub struct AcceptFailures {
    logged_at: Option<Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    /// Records a failed accept, logs `message` if it is time to, and pauses.
    pub async fn failed(&mut self, error: &io::Error, message: &'static str) {
        let now = Instant::now();
        if self
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= ACCEPT_LOG_EVERY)
        {
            tracing::warn!(error = %error, unlogged_since_last = self.unlogged, "{message}");
            self.logged_at = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    }
}

/// A warning that may repeat for every connection, logged at most once
/// every [`ACCEPT_LOG_EVERY`] with the count of those not logged since.
#[derive(Debug, Default)]
pub struct Occasional {
    last: std::sync::Mutex<Option<Instant>>,
    unlogged: std::sync::atomic::AtomicU64,
}

impl Occasional {
    /// `Some(unlogged since the last line)` when it is time to log again.
    pub fn due(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|at| now.duration_since(at) < ACCEPT_LOG_EVERY) {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.unlogged.swap(0, Ordering::Relaxed))
    }
}

/// The handshakes in progress across the process, in total and per address.
#[derive(Debug, Default)]
pub struct Handshakes {
    total: AtomicUsize,
    /// Addresses with at least one handshake in progress, and how many.
    by_address: PerAddress,
}

/// Why a connection was refused before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `limits.max_handshakes` handshakes were already in progress.
    Budget,
    /// Its client address already had `limits.handshakes_per_address` in progress.
    Address,
    /// Its client address already had `limits.connections_per_address` open.
    Connections,
}

impl Refusal {
    /// The `reason` label of `linkgate_connections_refused_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Budget => "max_handshakes",
            Refusal::Address => "handshakes_per_address",
            Refusal::Connections => "connections_per_address",
        }
    }
}

impl Handshakes {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A slot for one more handshake, if fewer than `max` are in progress.
    pub fn begin(self: &Arc<Self>, max: u32) -> Result<Handshake, Refusal> {
        let max = max as usize;
        if self.total.fetch_add(1, Ordering::AcqRel) >= max {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Budget);
        }
        Ok(Handshake {
            handshakes: self.clone(),
            address: Mutex::new(None),
            done: AtomicBool::new(false),
        })
    }

    /// Handshakes in progress now.
    pub fn in_progress(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Addresses with a handshake in progress now (the size of the table).
    pub fn addresses(&self) -> usize {
        self.by_address.len()
    }
}

/// A count per client address (under its [`address_key`]), holding only
/// the addresses whose count is above zero: the handshakes in progress, or
/// the connections open, from each.
#[derive(Debug, Default)]
struct PerAddress(Mutex<HashMap<IpAddr, u32>>);

impl PerAddress {
    /// Counts one more for `client` if it has fewer than `max`: the key it
    /// is counted under, to [`PerAddress::release`] later.
    fn claim(&self, client: IpAddr, max: u32) -> Option<IpAddr> {
        let key = address_key(client);
        let mut table = self.table();
        let n = table.entry(key).or_insert(0);
        if *n >= max {
            if *n == 0 {
                table.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(key)
    }

    /// Gives back one count of `key`, dropping its entry at zero.
    fn release(&self, key: IpAddr) {
        let mut table = self.table();
        if let Some(n) = table.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                table.remove(&key);
            }
        }
    }

    /// Addresses counted now.
    fn len(&self) -> usize {
        self.table().len()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        // Never held across an await; a panic while held leaves counts that are still right.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The key one client is counted under: its IPv4 address (also when it
/// arrives IPv4-mapped on a dual-stack listener), or its IPv6 /64, the
/// smallest block an IPv6 client is usually given.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// One connection's handshake in progress; given back by [`Handshake::finish`]
/// or when dropped.
#[derive(Debug)]
pub struct Handshake {
    handshakes: Arc<Handshakes>,
    address: Mutex<Option<IpAddr>>,
    done: AtomicBool,
}

impl Handshake {
    /// Counts this handshake against `client`'s address, if that address has
    /// fewer than `per_address` in progress.
    pub fn claim_address(&self, client: IpAddr, per_address: u32) -> Result<(), Refusal> {
        let mut slot = self.address.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_some() {
            return Ok(());
        }
        let key = self
            .handshakes
            .by_address
            .claim(client, per_address)
            .ok_or(Refusal::Address)?;
        *slot = Some(key);
        Ok(())
    }

    /// The handshake is over (done or failed): its slots are free for others.
    /// Cheap after the first call (one atomic swap).
    pub fn finish(&self) {
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        let key = self.address.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(key) = key {
            self.handshakes.by_address.release(key);
        }
        self.handshakes.total.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Connections open from each client address, whatever their phase: one
/// address holding finished but idle connections cannot take every slot of
/// `max_connections` either. Holds only addresses with a connection open.
#[derive(Debug, Default)]
pub struct Clients {
    by_address: PerAddress,
}

impl Clients {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A slot for one more connection from `client` (counted like
    /// handshakes: IPv4, or the IPv6 /64), if it has fewer than `max` open.
    pub fn claim(self: &Arc<Self>, client: IpAddr, max: u32) -> Result<ClientSlot, Refusal> {
        let key = self.by_address.claim(client, max).ok_or(Refusal::Connections)?;
        Ok(ClientSlot {
            clients: self.clone(),
            key,
        })
    }

    /// Addresses with a connection open now (the size of the table).
    pub fn addresses(&self) -> usize {
        self.by_address.len()
    }
}

/// One open connection counted against its client address; given back when dropped.
#[derive(Debug)]
pub struct ClientSlot {
    clients: Arc<Clients>,
    key: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.clients.by_address.release(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn the_budget_and_the_per_address_cap_hold_and_are_given_back() {
        let h = Handshakes::new();
        let a: Vec<_> = (0..3).map(|_| h.begin(4).expect("within budget")).collect();
        for slot in &a[..2] {
            slot.claim_address(ip("192.0.2.1"), 2).expect("within the address cap");
        }
        assert_eq!(a[2].claim_address(ip("192.0.2.1"), 2), Err(Refusal::Address));
        a[2].claim_address(ip("192.0.2.2"), 2).expect("another address");
        let last = h.begin(4).expect("the fourth");
        assert_eq!(h.begin(4).map(|_| ()), Err(Refusal::Budget));
        assert_eq!(h.in_progress(), 4);
        drop(last);
        a[0].finish();
        a[0].finish();
        assert_eq!(h.in_progress(), 2, "finishing twice gives back once");
        a[1].claim_address(ip("192.0.2.1"), 2)
            .expect("already counted: no second claim");
        let again = h.begin(4).expect("a slot given back");
        again
            .claim_address(ip("192.0.2.1"), 2)
            .expect("the address has one left");
        drop((a, again));
        assert_eq!(h.in_progress(), 0);
        assert_eq!(h.addresses(), 0, "no entry outlives its last handshake");
    }

    #[test]
    fn open_connections_per_address_are_capped_and_given_back() {
        let c = Clients::new();
        let held: Vec<_> = (0..3)
            .map(|_| c.claim(ip("192.0.2.1"), 3).expect("within the cap"))
            .collect();
        assert_eq!(c.claim(ip("192.0.2.1"), 3).map(|_| ()), Err(Refusal::Connections));
        let other = c.claim(ip("192.0.2.2"), 3).expect("another address");
        assert_eq!(c.claim(ip("2001:db8::1"), 0).map(|_| ()), Err(Refusal::Connections));
        assert_eq!(c.addresses(), 2, "a refused claim leaves no entry");
        drop(held);
        c.claim(ip("192.0.2.1"), 3).expect("given back");
        drop(other);
        assert_eq!(c.addresses(), 0, "no entry outlives its last connection");
    }

    #[test]
    fn a_refused_claim_leaves_no_entry_and_ipv6_counts_per_64() {
        let h = Handshakes::new();
        let one = h.begin(10).expect("slot");
        assert_eq!(one.claim_address(ip("192.0.2.9"), 0), Err(Refusal::Address));
        assert_eq!(h.addresses(), 0);
        one.claim_address(ip("2001:db8:1:2::1"), 1).expect("first of the /64");
        let two = h.begin(10).expect("slot");
        assert_eq!(two.claim_address(ip("2001:db8:1:2:ffff::9"), 1), Err(Refusal::Address));
        two.claim_address(ip("2001:db8:1:3::1"), 1).expect("another /64");
        let three = h.begin(10).expect("slot");
        three.claim_address(ip("::ffff:192.0.2.9"), 1).expect("mapped IPv4");
        let four = h.begin(10).expect("slot");
        assert_eq!(
            four.claim_address(ip("192.0.2.9"), 1),
            Err(Refusal::Address),
            "the mapped form is the same client"
        );
        drop((one, two, three, four));
        assert_eq!(h.addresses(), 0);
    }
}
