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

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::future::Future;
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Response, StatusCode};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType, HttpClient,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use serde::{Deserialize, Serialize};

use crate::config::{Acme, Challenge, Config};
use crate::error::chain;
use crate::hash::fnv1a;
use crate::host::HostName;
use crate::metrics::{AcmeLabels, ChallengeLabels, HostLabels, Metrics};
use crate::tls::{self, Slot};

/// The ALPN protocol a TLS-ALPN-01 validation offers (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Where HTTP-01 challenge tokens are fetched (RFC 8555 §8.3).
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// How often a host's task looks at storage when it has nothing to do:
/// how soon a replica serves a certificate another replica stored.
const POLL: Duration = Duration::from_secs(5);
/// A lock older than this belongs to a holder that died; it is taken over.
const LOCK_TTL: Duration = Duration::from_secs(600);
/// One issuance attempt (order, validation, finalization) gives up after this.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(300);
/// Back-off after the first failure; doubles with each further one.
const BACKOFF_FIRST: Duration = Duration::from_secs(120);
const BACKOFF_MAX: Duration = Duration::from_secs(6 * 3600);
/// The longest a CA's `Retry-After` is obeyed: a week (Let's Encrypt's
/// longest rate-limit window). Longer, and a host would never renew.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(7 * 86400);
/// Each answer from the CA, head and whole body, within this.
const CA_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read from the CA. A directory, an order or a
/// certificate chain is a few kilobytes.
const MAX_CA_BODY: usize = 256 * 1024;
/// How far the CA's clock may be ahead of ours: a certificate that starts
/// at most this far in the future is taken.
const CLOCK_SKEW: i64 = 300;
/// A certificate due for renewal sooner than this after it arrives is a
/// failed attempt: storing it would order again at once, in a loop. (Short:
/// a test CA's 30-second certificates with `renew_before = "25s"` are
/// renewed 5 s on, as asked.)
const MIN_TIME_TO_RENEWAL: i64 = 1;

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
}

impl Stored {
    fn not_after_text(&self) -> String {
        fmt_unix(self.not_after)
    }

    /// When to renew: `renew_before` ahead of expiry, or when a third of the
    /// lifetime is left if `renew_before` is longer than the lifetime (short-
    /// lived certificates: renewing at once would renew forever).
    pub fn renew_at(&self, renew_before: Duration) -> i64 {
        let lifetime = (self.not_after - self.not_before).max(0);
        let before = i64::try_from(renew_before.as_secs()).unwrap_or(i64::MAX);
        if before < lifetime {
            self.not_after - before
        } else {
            self.not_after - lifetime / 3
        }
    }
}

/// What storage says about one host's last attempt, shared by replicas.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Unix time of the last certificate obtained.
    pub issued_at: Option<i64>,
    pub last_error: Option<String>,
    pub failed_at: Option<i64>,
    /// Failures since the last success.
    #[serde(default)]
    pub failures: u32,
    /// No replica tries again before this (Unix time).
    pub next_attempt: Option<i64>,
}

/// The files in `[acme] storage`.
#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
}

impl Storage {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    fn certificate_path(&self, host: &HostName) -> PathBuf {
        self.root.join("certificates").join(format!("{host}.pem"))
    }

    fn status_path(&self, host: &HostName) -> PathBuf {
        self.root.join("certificates").join(format!("{host}.json"))
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        self.root.join("locks").join(format!("{name}.lock"))
    }

    fn http01_path(&self, token: &str) -> PathBuf {
        self.root.join("challenges").join("http-01").join(token)
    }

    fn alpn01_path(&self, host: &HostName) -> PathBuf {
        self.root
            .join("challenges")
            .join("tls-alpn-01")
            .join(format!("{host}.pem"))
    }

    fn account_path(&self, directory: &str) -> PathBuf {
        self.root
            .join("accounts")
            .join(format!("{:016x}.json", fnv1a(directory.as_bytes())))
    }

    /// Creates the folders (0700) and proves storage is writable. Called by
    /// `serve` before listening, so a wrong path or mount fails at start-up.
    pub fn prepare(&self) -> Result<(), String> {
        for sub in [
            "accounts",
            "certificates",
            "locks",
            "challenges/http-01",
            "challenges/tls-alpn-01",
        ] {
            let dir = self.root.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| format!("acme.storage: cannot create {}: {e}", dir.display()))?;
        }
        // The probe's name is unique: replicas may start at the same time,
        // and may all be pid 1.
        let probe = write_temporary(&self.root.join("locks").join("probe"), b"")
            .map_err(|e| format!("acme.storage: {} is not writable: {e}", self.root.display()))?;
        let link = probe.with_extension("link");
        let linked = fs::hard_link(&probe, &link);
        let _ = fs::remove_file(&link);
        let _ = fs::remove_file(&probe);
        linked.map_err(|e| {
            format!(
                "acme.storage: {} does not support hard links, which the lock files need (Azure Files: use an NFS share, not SMB): {e}",
                self.root.display()
            )
        })
    }

    /// The stored certificate of `host`, checked: key matches, covers the host.
    pub fn load_certificate(&self, host: &HostName) -> Result<Option<Stored>, String> {
        let path = self.certificate_path(host);
        let pem = match fs::read(&path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
        };
        parse_stored(&pem, host)
            .map(Some)
            .map_err(|m| format!("{}: {m}", path.display()))
    }

    fn certificate_stamp(&self, host: &HostName) -> Option<(i64, i64, u64)> {
        let meta = fs::metadata(self.certificate_path(host)).ok()?;
        Some((meta.mtime(), meta.mtime_nsec(), meta.size()))
    }

    pub fn status(&self, host: &HostName) -> Status {
        fs::read(self.status_path(host))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn write_status(&self, host: &HostName, status: &Status) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(status).map_err(io::Error::other)?;
        write_private(&self.status_path(host), &json)
    }

    /// Takes the lock `name` unless a live holder has it. A lock past its
    /// expiry belongs to a holder that died; of the replicas that see it
    /// expired, exactly one takes it over.
    ///
    /// Storage may be a network volume shared by replicas, so this relies
    /// only on what NFS does atomically: the new lock is written in full to a
    /// temporary file, then linked to the lock's name (fails if the name
    /// exists) or, for a take-over, renamed over it. Removing an expired lock
    /// and creating a new one is not enough: two replicas that both saw it
    /// expire could each remove it and create their own, the second removing
    /// the first's fresh lock, and both would go on as the holder.
    fn try_lock(&self, name: &str, owner: &str) -> io::Result<Option<Lock>> {
        let path = self.lock_path(name);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path.parent().unwrap_or(&self.root))?;
        let expires = unix_now() + LOCK_TTL.as_secs() as i64;
        let content = format!("{owner} {expires}\n");
        let tmp = write_temporary(&path, content.as_bytes())?;
        let taken = take_lock(&path, &tmp);
        // Whatever happened: after a link the lock is this file's other
        // name, after a rename it is gone already, after a refusal it is
        // left over.
        let _ = fs::remove_file(&tmp);
        if !taken? {
            return Ok(None);
        }
        remove_markers(&path, fnv1a(content.as_bytes()));
        Ok(Some(Lock {
            path,
            owner: owner.to_owned(),
        }))
    }
}

/// Makes `tmp` (a complete lock file) the lock at `path` if the lock is free
/// or expired. True if it did.
fn take_lock(path: &Path, tmp: &Path) -> io::Result<bool> {
    // Twice at most: a lock released between the link and the read is free.
    for _ in 0..2 {
        if link_new(tmp, path)? {
            return Ok(true);
        }
        let held = match fs::read(path) {
            Ok(held) => held,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let text = String::from_utf8_lossy(&held);
        let expires = text.split_whitespace().nth(1).and_then(|t| t.parse::<i64>().ok());
        // Not in the "<owner> <expires>" form (not written by linkgate, or by
        // a version that wrote lock files in place): judge by its age.
        let expires = match expires {
            Some(t) => t,
            None => match fs::metadata(path) {
                Ok(meta) => meta.mtime() + LOCK_TTL.as_secs() as i64,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            },
        };
        if expires > unix_now() {
            return Ok(false);
        }
        let taken = take_over(path, tmp, &held)?;
        if taken {
            tracing::warn!(lock = %path.display(), holder = text.trim(), "ACME: took over an expired lock (its holder stopped)");
        }
        return Ok(taken);
    }
    Ok(false)
}

/// Links `tmp` to `path` unless `path` exists. True if it did.
fn link_new(tmp: &Path, path: &Path) -> io::Result<bool> {
    match fs::hard_link(tmp, path) {
        Ok(()) => Ok(true),
        // Over NFS, a LINK that succeeded but whose reply was lost is sent
        // again and fails; the link count of `tmp` tells (open(2), O_EXCL).
        Err(_) if fs::metadata(tmp).is_ok_and(|m| m.nlink() == 2) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Generations of take-over markers tried for one expired lock (each one
/// needs a contender that died during a take-over, then `LOCK_TTL`).
const TAKEOVER_GENERATIONS: u32 = 64;

/// Replaces the expired lock at `path`, whose content is `held`, by `tmp`,
/// if this call is the one that claims the take-over. True if it did.
///
/// Contenders claim the take-over by creating a marker named after `held`
/// (exclusive create: one of them succeeds); the one that did checks that
/// the lock still holds `held` and renames `tmp` over it. A lock's content
/// never comes back once replaced (the owner differs, or it is the same
/// process and the new lock expires later), so a contender that claims a
/// marker late, for a lock already taken over, sees another content and
/// backs off.
///
/// A marker left by a contender that died before renaming blocks the
/// take-over for `LOCK_TTL`, then the next generation of marker is claimed.
/// Old markers are never removed to be claimed again: two contenders could
/// both see one old, one remove it and create it anew, the other remove
/// that, and both go on.
fn take_over(path: &Path, tmp: &Path, held: &[u8]) -> io::Result<bool> {
    let hash = fnv1a(held);
    for generation in 0..TAKEOVER_GENERATIONS {
        let marker = marker_path(path, hash, generation);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&marker)
        {
            Ok(_) => {
                let result = match fs::read(path) {
                    Ok(now) if now == held => fs::rename(tmp, path).map(|()| true),
                    Ok(_) => Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(e),
                };
                if matches!(result, Ok(false)) {
                    // Taken over or released meanwhile, and `held` cannot
                    // come back: its markers are of no more use.
                    for g in 0..=generation {
                        let _ = fs::remove_file(marker_path(path, hash, g));
                    }
                } else if result.is_err() {
                    // The lock may still hold `held`: older generations must
                    // stay (see above); this one is free to claim again.
                    let _ = fs::remove_file(&marker);
                }
                return result;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match fs::metadata(&marker) {
                Ok(meta) if meta.mtime() + LOCK_TTL.as_secs() as i64 > unix_now() => return Ok(false),
                Ok(_) => {}
                // Removed: the take-over it claimed is done.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// The marker that claims generation `generation` of the take-over of the
/// lock at `path` while its content hashes to `hash`.
fn marker_path(path: &Path, hash: u64, generation: u32) -> PathBuf {
    let lock = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!("{lock}.takeover-{hash:016x}-{generation}"))
}

/// Removes the take-over markers of the lock at `path`, except those for a
/// content hashing to `keep` (the lock's current content, whose take-over
/// may be under way). The others name contents the lock will never hold
/// again: leftovers of contenders that stopped mid-way.
fn remove_markers(path: &Path, keep: u64) {
    let (Some(dir), Some(lock)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let Ok(entries) = fs::read_dir(dir) else { return };
    let prefix = format!("{lock}.takeover-");
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        // Exactly "<16 hex digits>-<generation>": another lock's name may
        // start with this one's prefix.
        let Some((hex, generation)) = rest.split_once('-') else {
            continue;
        };
        let is_marker = hex.len() == 16
            && hex.bytes().all(|b| b.is_ascii_hexdigit())
            && !generation.is_empty()
            && generation.bytes().all(|b| b.is_ascii_digit());
        if is_marker && u64::from_str_radix(hex, 16).ok() != Some(keep) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// A held lock file; removed when dropped (if it is still ours).
struct Lock {
    path: PathBuf,
    owner: String,
}

impl Drop for Lock {
    fn drop(&mut self) {
        let ours = fs::read_to_string(&self.path)
            .is_ok_and(|held| held.split_whitespace().next() == Some(self.owner.as_str()));
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Challenge files written for one attempt; removed when dropped.
#[derive(Default)]
struct ChallengeFiles(Vec<PathBuf>);

impl Drop for ChallengeFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = fs::remove_file(path);
        }
    }
}

fn parse_stored(pem: &[u8], host: &HostName) -> Result<Stored, String> {
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
    })
}

/// Writes `bytes` to `path` readable by the owner only, atomically (a
/// temporary file renamed over it), creating the folder if needed.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let tmp = write_temporary(path, bytes)?;
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Writes `bytes` to a new temporary file (0600, synced) next to `path`
/// and returns its name; removes it if writing fails.
fn write_temporary(path: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    let tmp = temporary_path(path);
    // Exclusive: the name is unique, and if it ever were not, failing beats
    // writing into another writer's file.
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    match written {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// A new name for a temporary file next to `path`, unique to this process
/// and this call. Replicas in containers are all pid 1, and one process
/// writes from several threads: with the pid alone, two writers of one file
/// would share a temporary file, truncating and overwriting each other's
/// bytes, and the rename would publish the mix.
fn temporary_path(path: &Path) -> PathBuf {
    static PROCESS: OnceLock<String> = OnceLock::new();
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let process = PROCESS.get_or_init(owner_id);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    // The file's name is there for whoever lists the folder; cut, so that a
    // long host name does not take the temporary name past 255 bytes.
    let name: String = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().chars().take(64).collect());
    path.with_file_name(format!(".{name}.{process}.{call}.tmp"))
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

/// True for an HTTP-01 token: base64url characters only (RFC 8555 §8.3).
fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Answers `GET /.well-known/acme-challenge/<token>` for an ACME host on the
/// plain-http listener, from storage (whichever replica wrote it).
pub async fn answer_http01(
    acme: Option<&Acme>,
    metrics: &Metrics,
    host: &HostName,
    token: &str,
    method: &Method,
) -> Response<Bytes> {
    let respond = |status: StatusCode, body: Bytes| {
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
        resp
    };
    if method != Method::GET && method != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"method not allowed\n"),
        );
    }
    let Some(acme) = acme.filter(|_| valid_token(token)) else {
        return respond(StatusCode::NOT_FOUND, Bytes::from_static(b"no such challenge\n"));
    };
    match tokio::fs::read(Storage::new(&acme.storage).http01_path(token)).await {
        Ok(answer) => {
            metrics
                .acme_challenges
                .get_or_create(&ChallengeLabels {
                    host: host.to_string(),
                    challenge: "http-01",
                })
                .inc();
            tracing::info!(host = %host, "ACME: answered an http-01 challenge");
            respond(StatusCode::OK, Bytes::from(answer))
        }
        Err(_) => respond(StatusCode::NOT_FOUND, Bytes::from_static(b"no such challenge\n")),
    }
}

/// The TLS configuration that answers a TLS-ALPN-01 validation for `host`,
/// if a challenge for it is pending in storage (written by any replica).
pub async fn alpn01_config(acme: &Acme, host: &HostName) -> Option<Arc<ServerConfig>> {
    let pem = tokio::fs::read(Storage::new(&acme.storage).alpn01_path(host))
        .await
        .ok()?;
    let certified = Arc::new(pem_key(&pem).ok()?);
    let mut config = ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .ok()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ChallengeCert(certified)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Some(Arc::new(config))
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

/// Serves the one TLS-ALPN-01 certificate, whatever the ClientHello says.
#[derive(Debug)]
struct ChallengeCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for ChallengeCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
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

/// Runs the ACME work for as long as the returned handle lives: one task
/// per configured ACME host, added and removed as reloads change the hosts,
/// and restarted with back-off if one ends while its host is configured (a
/// host whose task is gone would silently stop renewing).
pub fn spawn(
    source: Arc<dyn Source>,
    certificates: Arc<Certificates>,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let owner: Arc<str> = owner_id().into();
        let mut tasks = Tasks::default();
        let mut generation = None;
        let mut wanted: Vec<HostName> = Vec::new();
        loop {
            let now = source.generation();
            if generation != Some(now) {
                generation = Some(now);
                wanted = if source.settings().is_some() {
                    source.hosts()
                } else {
                    Vec::new()
                };
                tasks.0.retain(|host, _| wanted.contains(host));
            }
            for host in &wanted {
                let supervised = tasks.0.entry(host.clone()).or_default();
                let ended = supervised.tend(|| {
                    let slot = certificates.slot(host);
                    tokio::spawn(host_task(
                        source.clone(),
                        slot,
                        metrics.clone(),
                        host.clone(),
                        owner.clone(),
                    ))
                });
                if let Some(ended) = ended {
                    metrics
                        .acme_task_restarts
                        .get_or_create(&HostLabels { host: host.to_string() })
                        .inc();
                    tracing::error!(host = %host, reason = %ended.reason, restart_in_seconds = ended.restart_in.as_secs(), restarts = supervised.restarts, "ACME: the task that keeps this host's certificate ended unexpectedly; restarting it (please report this)");
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// The first wait before restarting a task that ended; doubles with each
/// further end, up to [`RESTART_MAX`].
const RESTART_FIRST: Duration = Duration::from_secs(5);
const RESTART_MAX: Duration = Duration::from_secs(600);

/// The per-host tasks; aborted when the manager stops or the host goes.
#[derive(Default)]
struct Tasks(HashMap<HostName, Supervised>);

/// A task kept running: restarted with back-off whenever it ends.
#[derive(Default)]
struct Supervised {
    task: Option<tokio::task::JoinHandle<()>>,
    /// Unexpected ends so far.
    restarts: u32,
    /// No restart before this, after an end.
    restart_at: Option<tokio::time::Instant>,
}

/// How a supervised task ended, and when it starts again.
struct Ended {
    reason: String,
    restart_in: Duration,
}

impl Supervised {
    /// Starts the task if it is not running and its back-off is over. If it
    /// is found ended, says why.
    fn tend(&mut self, start: impl FnOnce() -> tokio::task::JoinHandle<()>) -> Option<Ended> {
        let now = tokio::time::Instant::now();
        let mut ended = None;
        if let Some(task) = self.task.take_if(|t| t.is_finished()) {
            self.restarts = self.restarts.saturating_add(1);
            let restart_in = RESTART_FIRST
                .saturating_mul(1 << (self.restarts - 1).min(16))
                .min(RESTART_MAX);
            self.restart_at = Some(now + restart_in);
            ended = Some(Ended {
                reason: end_reason(task),
                restart_in,
            });
        }
        if self.task.is_none() && self.restart_at.is_none_or(|t| t <= now) {
            self.restart_at = None;
            self.task = Some(start());
        }
        ended
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Why a finished task ended: its panic message, or that it returned.
fn end_reason(mut task: tokio::task::JoinHandle<()>) -> String {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match Pin::new(&mut task).poll(&mut cx) {
        std::task::Poll::Ready(Err(e)) if e.is_panic() => {
            let payload = e.into_panic();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            format!("panicked: {}", crate::text::printable(&message))
        }
        std::task::Poll::Ready(Err(_)) => "cancelled".to_owned(),
        _ => "returned".to_owned(),
    }
}

/// Where the ACME tasks read the configuration in force (the live
/// configuration, which reloads replace); looked at every second.
pub trait Source: Send + Sync + 'static {
    /// Increases whenever the configuration is replaced.
    fn generation(&self) -> u64;
    /// The `[acme]` section in force, if any.
    fn settings(&self) -> Option<Acme>;
    /// The `acme = true` hosts in force.
    fn hosts(&self) -> Vec<HostName>;
}

/// Keeps one host's certificate present and fresh in `slot`.
async fn host_task(source: Arc<dyn Source>, slot: Slot, metrics: Arc<Metrics>, host: HostName, owner: Arc<str>) {
    let labels = HostLabels { host: host.to_string() };
    let mut seen_stamp = None;
    let mut stored: Option<Arc<Stored>> = None;
    let mut told_missing = false;
    loop {
        let Some(settings) = source.settings() else {
            return;
        };
        let storage = Storage::new(&settings.storage);

        // Storage → slot: what this or another replica stored.
        let Some(stamp) = on_storage(&storage, &host, Storage::certificate_stamp).await else {
            return;
        };
        if stamp != seen_stamp {
            seen_stamp = stamp;
            let Some(loaded) = on_storage(&storage, &host, Storage::load_certificate).await else {
                return;
            };
            match loaded {
                Ok(Some(fresh)) => {
                    let current = slot.load();
                    if current.as_ref().is_none_or(|c| c.cert != fresh.key.cert) {
                        tracing::info!(host = %host, not_after = %fresh.not_after_text(), "ACME: serving the stored certificate");
                        slot.store(Some(fresh.key.clone()));
                    }
                    metrics.cert_expiry.get_or_create(&labels).set(fresh.not_after);
                    metrics.acme_ready.get_or_create(&labels).set(1);
                    stored = Some(Arc::new(fresh));
                }
                Ok(None) => stored = None,
                Err(e) => {
                    tracing::warn!(host = %host, error = %e, "ACME: stored certificate unusable; ordering a new one");
                    stored = None;
                }
            }
        }
        if slot.load().is_none() {
            metrics.acme_ready.get_or_create(&labels).set(0);
            if !told_missing {
                told_missing = true;
                tracing::warn!(host = %host, challenge = settings.challenge.as_str(), "ACME: no certificate yet; TLS handshakes for this host fail, as for an unknown host, until one is issued");
            }
        }

        let now = unix_now();
        if let Some(s) = &stored {
            let due = s.renew_at(settings.renew_before);
            if due > now {
                sleep_secs(due - now).await;
                continue;
            }
        }
        let Some(status) = on_storage(&storage, &host, Storage::status).await else {
            return;
        };
        if let Some(next) = status.next_attempt.filter(|&t| t > now) {
            sleep_secs(next - now).await;
            continue;
        }
        let Some(lock) = on_storage(&storage, &host, {
            let owner = owner.clone();
            move |storage, host| storage.try_lock(host.as_str(), &owner)
        })
        .await
        else {
            return;
        };
        let lock = match lock {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                tracing::debug!(host = %host, "ACME: another replica is obtaining this certificate");
                tokio::time::sleep(POLL).await;
                continue;
            }
            Err(e) if out_of_descriptors(&e) => {
                tracing::error!(host = %host, error = %e, "ACME: cannot open a lock file: linkgate has run out of file descriptors (raise its open-files limit, `ulimit -n` or the container's nofile, or lower limits.max_connections)");
                tokio::time::sleep(POLL * 6).await;
                continue;
            }
            Err(e) => {
                tracing::error!(host = %host, error = %e, storage = %settings.storage.display(), "ACME: cannot write a lock file in storage; check the volume is mounted read-write");
                tokio::time::sleep(POLL * 6).await;
                continue;
            }
        };
        // Another replica may have finished, or failed and set a back-off,
        // between our look at storage and taking the lock.
        let status = storage.status(&host);
        if storage.certificate_stamp(&host) != seen_stamp || status.next_attempt.is_some_and(|t| t > unix_now()) {
            drop(lock);
            continue;
        }

        let renewing = stored.is_some();
        tracing::info!(host = %host, directory = %settings.directory, challenge = settings.challenge.as_str(), "ACME: {}", if renewing { "renewing the certificate" } else { "ordering a certificate" });
        let retry_after = Arc::new(Mutex::new(None));
        let attempt = tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            obtain(&settings, &storage, &host, &owner, retry_after.clone()),
        )
        .await
        .unwrap_or_else(|_| Err(format!("gave up after {}s", ATTEMPT_TIMEOUT.as_secs())));
        let settle = |fresh: Stored| fit_to_serve(&fresh, settings.renew_before, unix_now()).map(|()| fresh);
        let outcome = match attempt {
            Ok(pem) => match parse_stored(pem.as_bytes(), &host).and_then(settle) {
                Ok(fresh) => on_storage(&storage, &host, move |storage, host| {
                    write_private(&storage.certificate_path(host), pem.as_bytes())?;
                    storage.write_status(
                        host,
                        &Status {
                            issued_at: Some(unix_now()),
                            ..Status::default()
                        },
                    )
                })
                .await
                .unwrap_or_else(|| Err(io::Error::other("shutting down")))
                .map(|()| fresh)
                .map_err(|e| format!("cannot store the certificate in {}: {e}", settings.storage.display())),
                Err(e) => Err(format!("the CA returned an unusable certificate: {e}")),
            },
            Err(e) => Err(e),
        };
        match outcome {
            Ok(fresh) => {
                let result = if renewing { "renewed" } else { "issued" };
                metrics
                    .acme_certificates
                    .get_or_create(&AcmeLabels {
                        host: host.to_string(),
                        result,
                    })
                    .inc();
                metrics.cert_expiry.get_or_create(&labels).set(fresh.not_after);
                metrics.acme_ready.get_or_create(&labels).set(1);
                tracing::info!(host = %host, not_after = %fresh.not_after_text(), renew_at = %fmt_unix(fresh.renew_at(settings.renew_before)), "ACME: certificate {result}; serving it now");
                slot.store(Some(fresh.key.clone()));
                seen_stamp = storage.certificate_stamp(&host);
                stored = Some(Arc::new(fresh));
            }
            Err(error) => {
                // The CA's words end up in storage, the log, `check` and
                // `doctor`: never with a terminal's control sequences.
                let error = crate::text::printable(&error).into_owned();
                let failures = status.failures.saturating_add(1);
                let exponential = BACKOFF_FIRST
                    .saturating_mul(1 << failures.saturating_sub(1).min(16))
                    .min(BACKOFF_MAX);
                let server_says = retry_after
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .and_then(|t: SystemTime| t.duration_since(SystemTime::now()).ok())
                    .unwrap_or_default();
                let wait = exponential.max(server_says);
                let next = unix_now() + wait.as_secs() as i64;
                let record = Status {
                    issued_at: status.issued_at,
                    last_error: Some(error.clone()),
                    failed_at: Some(unix_now()),
                    failures,
                    next_attempt: Some(next),
                };
                if let Err(e) = storage.write_status(&host, &record) {
                    tracing::warn!(host = %host, error = %e, "ACME: cannot record the failure in storage");
                }
                metrics
                    .acme_certificates
                    .get_or_create(&AcmeLabels {
                        host: host.to_string(),
                        result: "failed",
                    })
                    .inc();
                tracing::error!(host = %host, %error, retry_in_seconds = wait.as_secs(), failures, hint = hint(&error, settings.challenge), "ACME: could not obtain a certificate");
            }
        }
        drop(lock);
    }
}

/// Why a certificate the CA has just returned must not be stored or
/// served, if it must not: it is not valid now (give or take
/// [`CLOCK_SKEW`] at its start), or it is due for renewal on arrival, which
/// would order another at once, and again, until the CA's limits are hit.
fn fit_to_serve(cert: &Stored, renew_before: Duration, now: i64) -> Result<(), String> {
    if cert.not_after <= now {
        return Err(format!(
            "it expired at {} (before it arrived: is the CA's clock, or this machine's, wrong?)",
            fmt_unix(cert.not_after)
        ));
    }
    if cert.not_before > now + CLOCK_SKEW {
        return Err(format!(
            "it is not valid before {} (is the CA's clock, or this machine's, wrong?)",
            fmt_unix(cert.not_before)
        ));
    }
    let renew_at = cert.renew_at(renew_before);
    if renew_at < now + MIN_TIME_TO_RENEWAL {
        return Err(format!(
            "it is valid until {} only, so it is due for renewal on arrival (at {}, acme.renew_before = {}s): storing it would order again at once",
            fmt_unix(cert.not_after),
            fmt_unix(renew_at),
            renew_before.as_secs()
        ));
    }
    Ok(())
}

/// True for EMFILE or ENFILE: the process, or the system, has no file
/// descriptor left (not a storage problem).
fn out_of_descriptors(e: &io::Error) -> bool {
    // Linux's numbers: EMFILE 24, ENFILE 23.
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// Sleeps until `secs` from now, but at most [`POLL`], so the task notices
/// what other replicas store and configuration changes.
async fn sleep_secs(secs: i64) {
    let secs = u64::try_from(secs.max(1)).unwrap_or(u64::MAX);
    tokio::time::sleep(Duration::from_secs(secs).min(POLL)).await;
}

/// Runs `f` on `host`'s files off the async threads (storage may be a
/// network volume). `None` only when the runtime is shutting down.
async fn on_storage<T: Send + 'static>(
    storage: &Storage,
    host: &HostName,
    f: impl FnOnce(&Storage, &HostName) -> T + Send + 'static,
) -> Option<T> {
    let (storage, host) = (storage.clone(), host.clone());
    tokio::task::spawn_blocking(move || f(&storage, &host)).await.ok()
}

/// What an operator can do about `error`.
fn hint(error: &str, challenge: Challenge) -> &'static str {
    if error.contains("rateLimited") {
        "the CA's rate limit was hit; linkgate waits as long as the CA asks before trying again"
    } else if error.contains("rejectedIdentifier") || error.contains("caa") {
        "the CA refuses to issue for this name (its policy, or a CAA record): check the name and its CAA records"
    } else if error.contains("cannot reach the ACME directory") || error.contains("account") {
        "check acme.directory, outbound https from linkgate to the CA, and acme.ca_file for a private CA"
    } else {
        match challenge {
            Challenge::TlsAlpn01 => {
                "the CA must reach this host on port 443 and land on linkgate with TLS intact: point its CNAME at linkgate, and pass TLS through the load balancer (TCP mode)"
            }
            Challenge::Http01 => {
                "the CA must reach http://<host>/.well-known/acme-challenge/ on port 80 and land on linkgate: point its CNAME at linkgate and route port 80 to listen.http"
            }
        }
    }
}

/// The HTTP client linkgate talks to the CA with. It notes the last
/// Retry-After the CA sent, so a rate-limited host backs off as asked.
#[derive(Clone)]
struct CaClient {
    inner: HyperClient<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        BodyWrapper<Bytes>,
    >,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl CaClient {
    fn new(acme: &Acme, retry_after: Arc<Mutex<Option<SystemTime>>>) -> Result<Self, String> {
        let tls = tls::client_config(acme.ca_certs.as_deref()).map_err(|e| format!("acme.ca_file: {e}"))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        Ok(Self {
            inner: HyperClient::builder(TokioExecutor::new()).build(connector),
            retry_after,
        })
    }
}

impl HttpClient for CaClient {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let is_get = req.method() == Method::GET;
        let fut = self.inner.request(req);
        let retry_after = self.retry_after.clone();
        let whole = async move {
            let resp = fut.await.map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
            let (mut parts, body) = resp.into_parts();
            // instant-acme reads Retry-After itself when it polls an order
            // (and adds it to the clock unchecked): it only ever sees the
            // bounded value.
            let after = parts
                .headers
                .remove(header::RETRY_AFTER)
                .and_then(|v| retry_after_delay(&v));
            if let Some(delay) = after {
                parts.headers.insert(header::RETRY_AFTER, delay.as_secs().into());
                if !parts.status.is_success() {
                    *retry_after.lock().unwrap_or_else(PoisonError::into_inner) = Some(SystemTime::now() + delay);
                }
            }
            let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, MAX_CA_BODY))
                .await
                .map_err(|e| {
                    let message = if e.is::<http_body_util::LengthLimitError>() {
                        format!("the ACME server's answer is larger than {} KiB", MAX_CA_BODY / 1024)
                    } else {
                        format!("the ACME server's answer broke off: {}", chain(&*e))
                    };
                    instant_acme::Error::Other(message.into())
                })?
                .to_bytes();
            // The directory GET (the only GET) is parsed whatever its
            // status: say what the server answered instead.
            if is_get && !parts.status.is_success() {
                let problem = serde_json::from_slice::<instant_acme::Problem>(&body)
                    .map(|p| p.to_string())
                    .unwrap_or_else(|_| String::from_utf8_lossy(&body).chars().take(200).collect());
                return Err(instant_acme::Error::Other(
                    format!("the ACME directory answered {}: {problem}", parts.status).into(),
                ));
            }
            Ok(BytesResponse::from(Response::from_parts(
                parts,
                http_body_util::Full::new(body),
            )))
        };
        Box::pin(async move {
            tokio::time::timeout(CA_ANSWER_TIMEOUT, whole).await.map_err(|_| {
                instant_acme::Error::Other(
                    format!(
                        "the ACME server did not send its whole answer within {}s",
                        CA_ANSWER_TIMEOUT.as_secs()
                    )
                    .into(),
                )
            })?
        })
    }
}

/// How long a `Retry-After` value asks to wait, at most [`MAX_RETRY_AFTER`]
/// (a CA's figure is never added to the clock unchecked: 2^64-1 seconds
/// overflows it). `None` if it is neither delay-seconds nor an HTTP-date.
fn retry_after_delay(value: &header::HeaderValue) -> Option<Duration> {
    let value = value.to_str().ok()?.trim();
    let delay = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// The account for `acme.directory`: from storage, or created (once, under
/// the account lock, by whichever replica gets there first).
async fn account(acme: &Acme, storage: &Storage, owner: &str, client: &CaClient) -> Result<Account, String> {
    let path = storage.account_path(&acme.directory);
    let unreachable =
        |e: instant_acme::Error| format!("cannot reach the ACME directory {}: {}", acme.directory, chain(&e));
    for _ in 0..60 {
        if let Ok(json) = tokio::fs::read(&path).await {
            let credentials: AccountCredentials = serde_json::from_slice(&json)
                .map_err(|e| format!("{}: not an ACME account file: {e}", path.display()))?;
            return Account::builder_with_http(Box::new(client.clone()))
                .from_credentials(credentials)
                .await
                .map_err(unreachable);
        }
        let lock = {
            let (storage, owner) = (storage.clone(), owner.to_owned());
            tokio::task::spawn_blocking(move || storage.try_lock("account", &owner)).await
        };
        match lock.unwrap_or_else(|_| Err(io::Error::other("shutting down"))) {
            Ok(Some(_lock)) => {
                if tokio::fs::metadata(&path).await.is_ok() {
                    continue;
                }
                let contact: Vec<&str> = acme.contact.iter().map(String::as_str).collect();
                let eab = acme
                    .eab
                    .as_ref()
                    .map(|e| instant_acme::ExternalAccountKey::new(e.kid.clone(), &e.hmac_key));
                let (account, credentials) = Account::builder_with_http(Box::new(client.clone()))
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        acme.directory.clone(),
                        eab.as_ref(),
                    )
                    .await
                    .map_err(|e| format!("cannot create the ACME account: {}", chain(&e)))?;
                let json = serde_json::to_vec(&credentials).map_err(|e| e.to_string())?;
                write_private(&path, &json).map_err(|e| format!("cannot store the ACME account: {e}"))?;
                tracing::info!(directory = %acme.directory, account = account.id(), "ACME: account created");
                return Ok(account);
            }
            Ok(None) => tokio::time::sleep(Duration::from_secs(1)).await,
            Err(e) if out_of_descriptors(&e) => {
                return Err(format!(
                    "cannot open the account lock file: linkgate has run out of file descriptors ({e})"
                ))
            }
            Err(e) => return Err(format!("cannot write a lock file in storage: {e}")),
        }
    }
    Err("another replica holds the account lock but no account appeared".into())
}

/// One issuance: order, challenge, finalize. Returns the chain and the new
/// private key as one PEM (the stored form).
async fn obtain(
    acme: &Acme,
    storage: &Storage,
    host: &HostName,
    owner: &str,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
) -> Result<String, String> {
    let client = CaClient::new(acme, retry_after)?;
    let account = account(acme, storage, owner, &client).await?;
    let identifiers = [Identifier::Dns(host.to_string())];
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(|e| format!("order refused: {}", chain(&e)))?;
    let kind = match acme.challenge {
        Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        Challenge::Http01 => ChallengeType::Http01,
    };
    let mut written = ChallengeFiles::default();
    {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| format!("cannot fetch the authorization: {}", chain(&e)))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(format!("authorization is {other:?}")),
            }
            let mut challenge = authz
                .challenge(kind.clone())
                .ok_or_else(|| format!("the CA offers no {} challenge", acme.challenge.as_str()))?;
            let key_authorization = challenge.key_authorization();
            let (path, contents) = match acme.challenge {
                Challenge::Http01 => {
                    if !valid_token(&challenge.token) {
                        return Err("the CA sent an invalid challenge token".into());
                    }
                    (
                        storage.http01_path(&challenge.token),
                        key_authorization.as_str().as_bytes().to_vec(),
                    )
                }
                Challenge::TlsAlpn01 => (
                    storage.alpn01_path(host),
                    alpn01_certificate(host, key_authorization.digest().as_ref())?.into_bytes(),
                ),
            };
            write_private(&path, &contents).map_err(|e| format!("cannot write the challenge to storage: {e}"))?;
            written.0.push(path);
            challenge
                .set_ready()
                .await
                .map_err(|e| format!("cannot start the validation: {}", chain(&e)))?;
        }
    }
    let polling = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(Duration::from_secs(120));
    let status = order
        .poll_ready(&polling)
        .await
        .map_err(|e| format!("validation did not finish: {}", chain(&e)))?;
    if status != OrderStatus::Ready {
        return Err(validation_error(&mut order, acme.challenge).await);
    }
    drop(written);
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).map_err(|e| e.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
    order
        .finalize_csr(csr.der())
        .await
        .map_err(|e| format!("finalization refused: {}", chain(&e)))?;
    let chain = order
        .poll_certificate(&polling)
        .await
        .map_err(|e| format!("certificate not delivered: {}", chain(&e)))?;
    Ok(format!("{chain}{}", key.serialize_pem()))
}

/// Why validation failed, from the challenge's error.
async fn validation_error(order: &mut instant_acme::Order, challenge: Challenge) -> String {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        if let Ok(state) = authz.refresh().await {
            for c in &state.challenges {
                if let Some(problem) = &c.error {
                    return format!("{} validation failed: {problem}", challenge.as_str());
                }
            }
        }
    }
    format!("{} validation failed (the CA gave no reason)", challenge.as_str())
}

/// The self-signed certificate that answers a TLS-ALPN-01 challenge (RFC
/// 8737): the host's name and the key authorization's digest in the
/// acmeIdentifier extension; with its key, as PEM.
fn alpn01_certificate(host: &HostName, digest: &[u8]) -> Result<String, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok(format!("{}{}", cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_renew_before_ahead_or_a_third_of_short_lifetimes() {
        let ck = |nb: i64, na: i64| Stored {
            key: Arc::new(CertifiedKey::new(Vec::new(), test_key())),
            not_before: nb,
            not_after: na,
        };
        let ninety_days = ck(0, 90 * 86400);
        assert_eq!(ninety_days.renew_at(Duration::from_secs(30 * 86400)), 60 * 86400);
        let six_days = ck(0, 6 * 86400);
        assert_eq!(six_days.renew_at(Duration::from_secs(30 * 86400)), 4 * 86400);
    }

    fn test_key() -> Arc<dyn rustls::sign::SigningKey> {
        let key = rcgen::KeyPair::generate().expect("key");
        let der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("der");
        tls::provider().key_provider.load_private_key(der).expect("signing key")
    }

    #[test]
    fn challenge_certificate_is_usable_despite_its_critical_extension() {
        let host = HostName::parse("a.example.test").expect("host");
        let pem = alpn01_certificate(&host, &[7u8; 32]).expect("certificate");
        let key = pem_key(pem.as_bytes()).expect("usable");
        let der = key.cert[0].as_ref();
        // id-pe-acmeIdentifier, 1.3.6.1.5.5.7.1.31 (RFC 8737 §6.1)
        let oid = [0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f];
        assert!(
            der.windows(oid.len()).any(|w| w == oid),
            "acmeIdentifier extension present"
        );
        assert!(der.windows(14).any(|w| w == b"a.example.test"), "host name present");
    }

    #[tokio::test]
    async fn a_task_that_ends_is_restarted_after_a_growing_back_off() {
        let starts = Arc::new(AtomicU64::new(0));
        let start = || {
            let n = starts.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if n < 2 {
                    panic!("boom {n}");
                }
                std::future::pending::<()>().await
            })
        };
        let mut supervised = Supervised::default();
        assert!(supervised.tend(start).is_none(), "started, nothing ended yet");
        let mut backoffs = Vec::new();
        for n in 0..2 {
            while !supervised.task.as_ref().is_some_and(|t| t.is_finished()) {
                tokio::task::yield_now().await;
            }
            let ended = supervised.tend(start).expect("the end is noticed");
            assert_eq!(ended.reason, format!("panicked: boom {n}"));
            backoffs.push(ended.restart_in);
            assert!(supervised.task.is_none(), "not restarted before its back-off");
            assert!(supervised.tend(start).is_none());
            assert_eq!(starts.load(Ordering::SeqCst), n + 1, "still not restarted");
            // The back-off is over.
            supervised.restart_at = Some(tokio::time::Instant::now());
            assert!(supervised.tend(start).is_none());
            assert_eq!(starts.load(Ordering::SeqCst), n + 2, "restarted");
        }
        assert_eq!(backoffs, [RESTART_FIRST, RESTART_FIRST * 2]);
        assert_eq!(supervised.restarts, 2);
        tokio::task::yield_now().await;
        assert!(supervised.tend(start).is_none(), "the third one runs");
    }

    #[test]
    fn received_certificates_must_be_valid_now_and_not_due_at_once() {
        let ck = |nb: i64, na: i64| Stored {
            key: Arc::new(CertifiedKey::new(Vec::new(), test_key())),
            not_before: nb,
            not_after: na,
        };
        let month = Duration::from_secs(30 * 86400);
        let now = 1_000_000_000;
        assert!(fit_to_serve(&ck(now - 3600, now + 90 * 86400), month, now).is_ok());
        // Pebble's 30-second certificates: renewal 20 s on.
        assert!(fit_to_serve(&ck(now, now + 30), month, now).is_ok());
        // A CA clock a minute ahead.
        assert!(fit_to_serve(&ck(now + 60, now + 90 * 86400), month, now).is_ok());
        let refused = |nb, na| fit_to_serve(&ck(nb, na), month, now).expect_err("refused");
        assert!(refused(now - 7200, now - 3600).contains("expired at"));
        assert!(refused(now - 7200, now).contains("expired at"));
        assert!(refused(now + 3600, now + 90 * 86400).contains("not valid before"));
        assert!(refused(now - 89 * 86400, now + 86400).contains("due for renewal on arrival"));
        assert!(refused(now - 10, now + 1).contains("due for renewal on arrival"));
    }

    #[test]
    fn retry_after_is_capped_whatever_the_ca_sends() {
        let delay = |v: &str| retry_after_delay(&header::HeaderValue::from_str(v).expect("value"));
        assert_eq!(delay("120"), Some(Duration::from_secs(120)));
        assert_eq!(delay(" 7200 "), Some(Duration::from_secs(7200)));
        assert_eq!(delay("18446744073709551615"), Some(MAX_RETRY_AFTER));
        assert_eq!(delay("Fri, 31 Dec 9999 23:59:59 GMT"), Some(MAX_RETRY_AFTER));
        assert_eq!(delay("Thu, 01 Jan 1970 00:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(delay("-5"), None);
        assert_eq!(delay("soon"), None);
    }

    #[test]
    fn tokens_are_base64url_only() {
        assert!(valid_token("LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"));
        assert!(!valid_token("../../etc/passwd"));
        assert!(!valid_token(""));
        assert!(!valid_token("a.b"));
    }

    /// The names in `dir`, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn concurrent_writers_of_one_file_leave_one_whole_content_and_no_temporary_file() {
        // Threads of one process share its pid, as replicas that are each
        // pid 1 in their container do.
        const WRITERS: usize = 8;
        const ROUNDS: usize = 100;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("certificates").join("a.test.pem");
        // Each writer its own byte and length: a mix shows.
        let contents: Vec<Vec<u8>> = (0..WRITERS).map(|i| vec![b'a' + i as u8; 1000 + 7919 * i]).collect();
        write_private(&path, b"first").expect("first write");
        let whole = |bytes: &[u8]| bytes == b"first" || contents.iter().any(|c| c == bytes);
        let describe = |bytes: &[u8]| {
            let kinds: std::collections::BTreeSet<char> = bytes.iter().map(|&b| char::from(b)).collect();
            format!("{} bytes of {kinds:?}", bytes.len())
        };
        for round in 0..ROUNDS {
            let start = std::sync::Barrier::new(WRITERS + 1);
            let writing = std::sync::atomic::AtomicBool::new(true);
            let (written, seen) = std::thread::scope(|s| {
                let reader = s.spawn(|| {
                    start.wait();
                    let mut seen = Vec::new();
                    while writing.load(Ordering::Relaxed) {
                        let now = fs::read(&path).expect("the file is always there");
                        if !whole(&now) && seen.len() < 5 {
                            seen.push(describe(&now));
                        }
                    }
                    seen
                });
                let writers: Vec<_> = contents
                    .iter()
                    .map(|content| {
                        let (start, path) = (&start, &path);
                        s.spawn(move || {
                            start.wait();
                            write_private(path, content)
                        })
                    })
                    .collect();
                let written: Vec<io::Result<()>> = writers.into_iter().map(|w| w.join().expect("writer")).collect();
                writing.store(false, Ordering::Relaxed);
                (written, reader.join().expect("reader"))
            });
            let last = fs::read(&path).expect("read");
            assert!(
                contents.contains(&last),
                "round {round}: the file is {}, not one writer's content",
                describe(&last)
            );
            assert!(seen.is_empty(), "round {round}: a reader saw {seen:?}");
            for result in written {
                result.unwrap_or_else(|e| panic!("round {round}: write_private failed: {e}"));
            }
        }
        assert_eq!(
            listing(&dir.path().join("certificates")),
            ["a.test.pem"],
            "no temporary file left"
        );
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A folder where the file should be: the rename fails.
        let path = dir.path().join("a.test.pem");
        fs::create_dir_all(path.join("in-the-way")).expect("mkdir");
        assert!(write_private(&path, b"pem").is_err());
        assert_eq!(listing(dir.path()), ["a.test.pem"]);
    }

    #[test]
    fn of_many_contenders_for_an_expired_lock_exactly_one_takes_it() {
        const CONTENDERS: usize = 8;
        const ROUNDS: usize = 100;
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::new(dir.path());
        storage.prepare().expect("prepare");
        let path = storage.lock_path("a.test");
        for round in 0..ROUNDS {
            // As a replica that died an hour ago left it.
            fs::write(&path, format!("dead-{round} {}\n", unix_now() - 3600)).expect("write");
            let start = std::sync::Barrier::new(CONTENDERS);
            let locks: Vec<Option<Lock>> = std::thread::scope(|s| {
                let contenders: Vec<_> = (0..CONTENDERS)
                    .map(|i| {
                        let (start, storage) = (&start, &storage);
                        s.spawn(move || {
                            start.wait();
                            storage.try_lock("a.test", &format!("r{round}-c{i}")).expect("io")
                        })
                    })
                    .collect();
                contenders.into_iter().map(|c| c.join().expect("contender")).collect()
            });
            let winners: Vec<&str> = locks.iter().flatten().map(|l| l.owner.as_str()).collect();
            assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
            let held = fs::read_to_string(&path).expect("lock");
            assert!(
                held.starts_with(&format!("{} ", winners[0])),
                "round {round}: the lock is {held:?}, the winner {}",
                winners[0]
            );
            drop(locks);
            assert_eq!(
                listing(&dir.path().join("locks")),
                Vec::<String>::new(),
                "round {round}: released, and no marker or temporary file left"
            );
        }
    }

    #[test]
    fn a_live_lock_is_refused_and_an_expired_one_taken_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::new(dir.path());
        storage.prepare().expect("prepare");
        let locks = dir.path().join("locks");
        let first = storage.try_lock("a.test", "one").expect("io").expect("free lock taken");
        assert!(
            storage.try_lock("a.test", "two").expect("io").is_none(),
            "held lock refused"
        );
        assert_eq!(listing(&locks), ["a.test.lock"], "the refused one leaves nothing");
        drop(first);
        assert_eq!(listing(&locks), Vec::<String>::new(), "released");
        let second = storage
            .try_lock("a.test", "two")
            .expect("io")
            .expect("released lock taken");
        // A holder that died an hour ago.
        fs::write(&second.path, format!("dead {}\n", unix_now() - 3600)).expect("write");
        drop(second); // not ours any more: left in place
        assert!(storage.lock_path("a.test").exists());
        let third = storage
            .try_lock("a.test", "three")
            .expect("io")
            .expect("expired lock taken over");
        assert!(
            storage.try_lock("a.test", "four").expect("io").is_none(),
            "taken over, so held"
        );
        assert_eq!(listing(&locks), ["a.test.lock"], "no marker left once taken over");
        drop(third);
        assert_eq!(listing(&locks), Vec::<String>::new(), "a taken-over lock is released");
        let fourth = storage.try_lock("a.test", "four").expect("io");
        assert!(fourth.is_some(), "and taken again");
    }

    #[test]
    fn a_take_over_that_stopped_halfway_blocks_only_until_its_marker_expires() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::new(dir.path());
        storage.prepare().expect("prepare");
        let path = storage.lock_path("a.test");
        let dead = format!("dead {}\n", unix_now() - 3600);
        fs::write(&path, &dead).expect("write");
        // A contender claimed the take-over, then died before renaming.
        let marker = marker_path(&path, fnv1a(dead.as_bytes()), 0);
        let file = fs::File::create(&marker).expect("marker");
        assert!(
            storage.try_lock("a.test", "two").expect("io").is_none(),
            "a take-over under way is left alone"
        );
        file.set_modified(SystemTime::now() - 2 * LOCK_TTL).expect("mtime");
        let taken = storage
            .try_lock("a.test", "two")
            .expect("io")
            .expect("taken over once the marker is old");
        assert_eq!(
            listing(&dir.path().join("locks")),
            ["a.test.lock"],
            "the markers of the old lock are removed"
        );
        drop(taken);
        assert!(
            storage.try_lock("a.test", "three").expect("io").is_some(),
            "taken again"
        );
    }

    #[test]
    fn markers_of_other_locks_are_not_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::new(dir.path());
        storage.prepare().expect("prepare");
        // A host whose lock name starts with a.test's marker prefix.
        let other = storage.lock_path("a.test.lock.takeover-0123456789abcdef-0");
        let other_marker = marker_path(&other, 7, 0);
        fs::write(&other, "x").expect("write");
        fs::write(&other_marker, "").expect("write");
        let stale = marker_path(&storage.lock_path("a.test"), 7, 0);
        fs::write(&stale, "").expect("write");
        let lock = storage.try_lock("a.test", "one").expect("io").expect("taken");
        assert!(!stale.exists(), "a.test's own leftover marker is removed");
        assert!(other.exists() && other_marker.exists(), "another lock's files are kept");
        drop(lock);
    }
}
