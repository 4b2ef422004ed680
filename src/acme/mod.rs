//! Automatic certificates over ACME (RFC 8555) for hosts with `acme = true`.
//!
//! One task per ACME host: it keeps the host's certificate slot (read by the
//! SNI resolver on every handshake) in step with `[acme] storage`, and when
//! the stored certificate is missing or due for renewal it takes the host's
//! lock in storage, orders a certificate, answers the challenge, stores the
//! result and swaps it in. The protocol is `instant-acme`'s; keys, CSRs and
//! the TLS-ALPN-01 certificate are `rcgen`'s.
//!
//! Guard rails:
//! - only configured hosts are ever ordered: the set of tasks comes from the
//!   configuration, never from an SNI or a Host header;
//! - each host backs off on its own (exponential, and at least the CA's
//!   Retry-After), recorded in storage so that every replica respects it;
//! - storage may be shared by replicas (a network volume): issuance for a
//!   host is done under a lock file with an expiry (a crashed holder blocks
//!   nobody for long, and exactly one replica takes its lock over), the
//!   challenge answers are written to storage and answered by every replica,
//!   and every replica picks up what another stored. Files are only ever
//!   renamed into place, linked or created exclusively, which NFS does
//!   atomically.
//!
//! Storage layout (files 0600, folders 0700):
//! - `accounts/<hash of directory URL>.json`: the account key and URL;
//! - `certificates/<host>.pem`: chain then private key, replaced atomically
//!   (as every file is: written to `.<name>.<process>.<n>.tmp`, renamed);
//! - `certificates/<host>.json`: the last failure and the next attempt;
//! - `locks/<host>.lock`, `locks/account.lock`: owner and expiry, and for a
//!   moment `<lock>.takeover-<hash>-<n>` while a replica takes over an
//!   expired lock (see `try_lock`);
//! - `challenges/http-01/<token>`, `challenges/tls-alpn-01/<host>.pem`.
//!
//! Files, one job each: `storage` (layout, locks, atomic writes),
//! `challenge` (the answers on the request path), `task` (one supervised
//! task per host: when to order, and what to keep), `client` (talking to
//! the CA: bounded answers, the order itself).

mod challenge;
mod client;
mod storage;
mod task;

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use serde::Serialize;

pub use challenge::{alpn01_config, answer_http01, ACME_TLS_ALPN, HTTP01_PREFIX};
pub use storage::{Status, Storage};
pub use task::{spawn, Source};

use crate::config::Config;
use crate::host::HostName;
use crate::tls::{self, Slot};

/// The certificates obtained over ACME, one slot per host. Lives as long as
/// the process, so a reload keeps serving what was issued.
#[derive(Default)]
pub struct Certificates {
    slots: Mutex<HashMap<HostName, Slot>>,
}

impl Certificates {
    /// The slot of `host`, created empty on first use.
    pub fn slot(&self, host: &HostName) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.entry(host.clone()).or_default().clone()
    }
}

/// Fills the empty slots of `config`'s ACME hosts from storage (blocking;
/// at start-up, so a restart serves stored certificates from the first
/// handshake and never orders one it already has).
pub fn preload(config: &Config, certificates: &Certificates) {
    let Some(acme) = &config.acme else { return };
    let storage = Storage::new(&acme.storage);
    for host in config.hosts.iter().filter(|h| h.is_acme()) {
        let slot = certificates.slot(&host.name);
        if slot.load().is_some() {
            continue;
        }
        match storage.load_certificate(&host.name) {
            Ok(Some(stored)) => {
                tracing::info!(host = %host.name, not_after = %stored.not_after_text(), "ACME: serving the stored certificate");
                slot.store(Some(stored.key));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(host = %host.name, error = %e, "ACME: stored certificate unusable; a new one will be ordered")
            }
        }
    }
}

/// A certificate read from storage.
pub struct Stored {
    pub key: Arc<CertifiedKey>,
    pub not_before: i64,
    pub not_after: i64,
    /// When linkgate received it (Unix time; `not_before` if unknown).
    pub arrived: i64,
}

impl Stored {
    fn not_after_text(&self) -> String {
        fmt_unix(self.not_after)
    }

    /// When to renew: `renew_before` ahead of expiry, or when a third of the
    /// lifetime is left if `renew_before` is longer than the lifetime (short-
    /// lived certificates: renewing at once would renew forever). The
    /// lifetime counts from when linkgate received it, and it is never
    /// renewed before a third of that has passed: a certificate backdated so
    /// that it is due seconds after it arrives (a broken or hostile CA)
    /// would otherwise be renewed every few seconds, each time a success.
    pub fn renew_at(&self, renew_before: Duration) -> i64 {
        let start = self.not_before.max(self.arrived.min(self.not_after));
        let lifetime = (self.not_after - start).max(0);
        let before = i64::try_from(renew_before.as_secs()).unwrap_or(i64::MAX);
        let asked = if before < lifetime {
            self.not_after - before
        } else {
            self.not_after - lifetime / 3
        };
        asked.max(start + lifetime / 3)
    }
}

/// `pem` (the stored form) checked for `host`; `arrived` is when linkgate
/// received it (`None`: its `notBefore`).
fn parse_stored(pem: &[u8], host: &HostName, arrived: Option<i64>) -> Result<Stored, String> {
    let certified = pem_key(pem)?;
    certified
        .keys_match()
        .map_err(|e| format!("key does not match the certificate ({e})"))?;
    tls::check_covers(&certified, host)?;
    let leaf = certified.end_entity_cert().map_err(|e| e.to_string())?;
    let summary = tls::summarize(leaf).ok_or("leaf certificate cannot be parsed")?;
    Ok(Stored {
        key: Arc::new(certified),
        not_before: summary.not_before,
        not_after: summary.not_after,
        arrived: arrived.unwrap_or(summary.not_before),
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A name for this process in lock files: host name, pid and start time.
fn owner_id() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{}-{nanos:08x}", host.trim(), std::process::id())
}
/// A chain and its private key from one PEM (the stored form). Not checked
/// here: the TLS-ALPN-01 certificate carries a critical extension webpki
/// refuses (which is also why it does not go through `with_single_cert`).
fn pem_key(pem: &[u8]) -> Result<CertifiedKey, String> {
    let chain = tls::parse_certs(pem)?;
    let key = tls::parse_key(pem)?;
    let signing_key = tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unusable private key: {e}"))?;
    Ok(CertifiedKey::new(chain, signing_key))
}

/// What storage says about one host, for `check` and `doctor`.
#[derive(Debug, Clone, Serialize)]
pub struct HostState {
    /// Unix time the stored certificate expires, if there is one.
    pub not_after: Option<i64>,
    /// Why the stored certificate cannot be used, if it cannot.
    pub unusable: Option<String>,
    pub status: Status,
}

impl HostState {
    pub fn read(storage: &Storage, host: &HostName) -> Self {
        let (not_after, unusable) = match storage.load_certificate(host) {
            Ok(Some(stored)) => (Some(stored.not_after), None),
            Ok(None) => (None, None),
            Err(e) => (None, Some(e)),
        };
        Self {
            not_after,
            unusable,
            status: storage.status(host),
        }
    }

    /// One line for an operator.
    pub fn describe(&self) -> String {
        let mut out = match (self.not_after, &self.unusable) {
            (Some(t), _) => format!("ACME certificate valid until {}", fmt_unix(t)),
            (None, Some(e)) => format!("stored ACME certificate unusable: {}", crate::text::Printable(e)),
            (None, None) => "no ACME certificate issued yet".to_owned(),
        };
        if let Some(error) = &self.status.last_error {
            // Written by any replica, of any version: shown escaped.
            let error = crate::text::Printable(error);
            out.push_str(&format!(
                "; last attempt failed{}: {error}",
                self.status
                    .failed_at
                    .map(|t| format!(" at {}", fmt_unix(t)))
                    .unwrap_or_default()
            ));
            if let Some(next) = self.status.next_attempt {
                out.push_str(&format!("; next attempt at {}", fmt_unix(next)));
            }
        }
        out
    }
}

/// What storage says about each of `hosts` (name → one line), for `doctor`.
pub fn describe(storage: &Path, hosts: &[HostName]) -> HashMap<String, String> {
    let storage = Storage::new(storage);
    hosts
        .iter()
        .map(|host| (host.to_string(), HostState::read(&storage, host).describe()))
        .collect()
}

fn fmt_unix(t: i64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(t.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_renew_before_ahead_or_a_third_of_short_lifetimes() {
        let ck = |nb: i64, na: i64, arrived: i64| Stored {
            key: Arc::new(CertifiedKey::new(Vec::new(), test_key())),
            not_before: nb,
            not_after: na,
            arrived,
        };
        let month = Duration::from_secs(30 * 86400);
        let day = 86400;
        assert_eq!(ck(0, 90 * day, 0).renew_at(month), 60 * day);
        assert_eq!(ck(0, 6 * day, 0).renew_at(month), 4 * day);
        // Received a day after it started: the same.
        assert_eq!(ck(0, 90 * day, day).renew_at(month), 60 * day);
        // Backdated 60 days, 30 days and 2 s left on arrival: not due 2 s
        // later, but once a third of what was left has passed.
        let now = 60 * day;
        assert_eq!(ck(0, 90 * day + 2, now).renew_at(month), now + (30 * day + 2) / 3);
        // Pebble's 30-second certificates with renew_before = 25 s: 10 s on.
        assert_eq!(ck(0, 30, 0).renew_at(Duration::from_secs(25)), 10);
    }

    pub(super) fn test_key() -> Arc<dyn rustls::sign::SigningKey> {
        let key = rcgen::KeyPair::generate().expect("key");
        let der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("der");
        tls::provider().key_provider.load_private_key(der).expect("signing key")
    }
}
