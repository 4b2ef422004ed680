//! One task per ACME host, supervised: it keeps the host's certificate slot
//! in step with storage, and when the certificate is missing or due it
//! takes the host's lock, has the CA client order one, checks what came
//! back and stores it, or records the failure and backs off.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use super::client::obtain;
use super::storage::write_private;
use super::{fmt_unix, owner_id, parse_stored, unix_now, Certificates, Status, Storage, Stored};
use crate::config::{Acme, Challenge};
use crate::host::HostName;
use crate::metrics::{AcmeLabels, HostLabels, Metrics};
use crate::tls::Slot;

/// How often a host's task looks at storage when it has nothing to do:
/// how soon a replica serves a certificate another replica stored.
const POLL: Duration = Duration::from_secs(5);
/// One issuance attempt (order, validation, finalization) gives up after this.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(300);
/// Back-off after the first failure; doubles with each further one.
const BACKOFF_FIRST: Duration = Duration::from_secs(120);
const BACKOFF_MAX: Duration = Duration::from_secs(6 * 3600);
/// How far the CA's clock may be ahead of ours: a certificate that starts
/// at most this far in the future is taken.
const CLOCK_SKEW: i64 = 300;
/// A certificate that arrives with less life left than this (or than
/// `renew_before`, if shorter: a test CA's 30-second certificates with
/// `renew_before = "25s"`) is a failed attempt: it would be renewed within
/// seconds, and again. (Longer-lived ones are renewed no sooner than a
/// third of their life on, see `Stored::renew_at`: an hour's certificate
/// from a test CA every 20 minutes at most.)
const MIN_LIFE_LEFT: i64 = 600;

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
    let mut task = HostTask {
        slot,
        metrics,
        host,
        owner,
        labels,
        seen_stamp: None,
        stored: None,
        told_missing: false,
    };
    while let Some(settings) = source.settings() {
        let storage = Storage::new(&settings.storage);
        if task.sync(&storage).await.is_none() {
            return;
        }
        task.tell_if_missing(&settings);
        let (lock, status) = match task.turn(&storage, &settings).await {
            Turn::Wait(wait) => {
                tokio::time::sleep(wait).await;
                continue;
            }
            Turn::Again => continue,
            Turn::Stop => return,
            Turn::Order(lock, status) => (lock, status),
        };
        let retry_after = Arc::new(Mutex::new(None));
        let renewing = task.stored.is_some();
        match task.order(&settings, &storage, retry_after.clone()).await {
            Ok(fresh) => task.succeeded(fresh, &settings, &storage, renewing),
            Err(error) => task.failed(&error, &status, &retry_after, &settings, &storage),
        }
        drop(lock);
    }
}

/// One host's task and what it knows between its steps.
struct HostTask {
    slot: Slot,
    metrics: Arc<Metrics>,
    host: HostName,
    owner: Arc<str>,
    labels: HostLabels,
    /// The stored certificate file as last seen (modified time, size).
    seen_stamp: Option<(i64, i64, u64)>,
    /// The certificate in storage, if usable.
    stored: Option<Arc<Stored>>,
    told_missing: bool,
}

/// What a host's task does next.
enum Turn {
    /// Nothing is due yet (or another replica is at it): look again later.
    Wait(Duration),
    /// Storage changed meanwhile: start over at once.
    Again,
    /// The runtime is shutting down.
    Stop,
    /// Order a certificate, holding the host's lock; the status read under it.
    Order(super::storage::Lock, Status),
}

impl HostTask {
    /// Storage → slot: serves what this or another replica stored. `None`
    /// when the runtime is shutting down.
    async fn sync(&mut self, storage: &Storage) -> Option<()> {
        let stamp = on_storage(storage, &self.host, Storage::certificate_stamp).await?;
        if stamp == self.seen_stamp {
            return Some(());
        }
        self.seen_stamp = stamp;
        let host = &self.host;
        match on_storage(storage, host, Storage::load_certificate).await? {
            Ok(Some(fresh)) => {
                let current = self.slot.load();
                if current.as_ref().is_none_or(|c| c.cert != fresh.key.cert) {
                    tracing::info!(host = %host, not_after = %fresh.not_after_text(), "ACME: serving the stored certificate");
                    self.slot.store(Some(fresh.key.clone()));
                }
                self.metrics
                    .cert_expiry
                    .get_or_create(&self.labels)
                    .set(fresh.not_after);
                self.metrics.acme_ready.get_or_create(&self.labels).set(1);
                self.stored = Some(Arc::new(fresh));
            }
            Ok(None) => self.stored = None,
            Err(e) => {
                tracing::warn!(host = %host, error = %e, "ACME: stored certificate unusable; ordering a new one");
                self.stored = None;
            }
        }
        Some(())
    }

    /// Says once that the host has no certificate, and keeps the ready gauge at 0.
    fn tell_if_missing(&mut self, settings: &Acme) {
        if self.slot.load().is_some() {
            return;
        }
        self.metrics.acme_ready.get_or_create(&self.labels).set(0);
        if !self.told_missing {
            self.told_missing = true;
            tracing::warn!(host = %self.host, challenge = settings.challenge.as_str(), "ACME: no certificate yet; TLS handshakes for this host fail, as for an unknown host, until one is issued");
        }
    }

    /// Whether a certificate is due, not backed off, and the lock ours.
    async fn turn(&self, storage: &Storage, settings: &Acme) -> Turn {
        let host = &self.host;
        let now = unix_now();
        if let Some(s) = &self.stored {
            let due = s.renew_at(settings.renew_before);
            if due > now {
                return Turn::Wait(wait_secs(due - now));
            }
        }
        let Some(status) = on_storage(storage, host, Storage::status).await else {
            return Turn::Stop;
        };
        if let Some(next) = status.next_attempt.filter(|&t| t > now) {
            return Turn::Wait(wait_secs(next - now));
        }
        let owner = self.owner.clone();
        let Some(lock) = on_storage(storage, host, move |storage, host| {
            storage.try_lock(host.as_str(), &owner)
        })
        .await
        else {
            return Turn::Stop;
        };
        let lock = match lock {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                tracing::debug!(host = %host, "ACME: another replica is obtaining this certificate");
                return Turn::Wait(POLL);
            }
            Err(e) if out_of_descriptors(&e) => {
                tracing::error!(host = %host, error = %e, "ACME: cannot open a lock file: linkgate has run out of file descriptors (raise its open-files limit, `ulimit -n` or the container's nofile, or lower limits.max_connections)");
                return Turn::Wait(POLL * 6);
            }
            Err(e) => {
                tracing::error!(host = %host, error = %e, storage = %settings.storage.display(), "ACME: cannot write a lock file in storage; check the volume is mounted read-write");
                return Turn::Wait(POLL * 6);
            }
        };
        // Another replica may have finished, or failed and set a back-off,
        // between our look at storage and taking the lock.
        let status = storage.status(host);
        if storage.certificate_stamp(host) != self.seen_stamp || status.next_attempt.is_some_and(|t| t > unix_now()) {
            return Turn::Again;
        }
        Turn::Order(lock, status)
    }

    /// One attempt: order, check what the CA returned, store it.
    async fn order(
        &self,
        settings: &Acme,
        storage: &Storage,
        retry_after: Arc<Mutex<Option<SystemTime>>>,
    ) -> Result<Stored, String> {
        let host = &self.host;
        let renewing = self.stored.is_some();
        tracing::info!(host = %host, directory = %settings.directory, challenge = settings.challenge.as_str(), "ACME: {}", if renewing { "renewing the certificate" } else { "ordering a certificate" });
        let pem = tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            obtain(settings, storage, host, &self.owner, retry_after),
        )
        .await
        .unwrap_or_else(|_| Err(format!("gave up after {}s", ATTEMPT_TIMEOUT.as_secs())))?;
        let fresh = parse_stored(pem.as_bytes(), host, Some(unix_now()))
            .and_then(|fresh| fit_to_serve(&fresh, settings.renew_before, unix_now()).map(|()| fresh))
            .map_err(|e| format!("the CA returned an unusable certificate: {e}"))?;
        on_storage(storage, host, move |storage, host| {
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
        .map_err(|e| format!("cannot store the certificate in {}: {e}", settings.storage.display()))?;
        Ok(fresh)
    }

    /// Serves a certificate just obtained and stored.
    fn succeeded(&mut self, fresh: Stored, settings: &Acme, storage: &Storage, renewing: bool) {
        let result = if renewing { "renewed" } else { "issued" };
        self.metrics
            .acme_certificates
            .get_or_create(&AcmeLabels {
                host: self.host.to_string(),
                result,
            })
            .inc();
        self.metrics
            .cert_expiry
            .get_or_create(&self.labels)
            .set(fresh.not_after);
        self.metrics.acme_ready.get_or_create(&self.labels).set(1);
        tracing::info!(host = %self.host, not_after = %fresh.not_after_text(), renew_at = %fmt_unix(fresh.renew_at(settings.renew_before)), "ACME: certificate {result}; serving it now");
        self.slot.store(Some(fresh.key.clone()));
        self.seen_stamp = storage.certificate_stamp(&self.host);
        self.stored = Some(Arc::new(fresh));
    }

    /// Records a failed attempt in storage (shared by replicas), with the
    /// back-off: exponential, and at least what the CA asked for.
    fn failed(
        &self,
        error: &str,
        status: &Status,
        retry_after: &Mutex<Option<SystemTime>>,
        settings: &Acme,
        storage: &Storage,
    ) {
        let host = &self.host;
        // The CA's words end up in storage, the log, `check` and `doctor`:
        // never with a terminal's control sequences.
        let error = crate::text::printable(error).into_owned();
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
        if let Err(e) = storage.write_status(host, &record) {
            tracing::warn!(host = %host, error = %e, "ACME: cannot record the failure in storage");
        }
        self.metrics
            .acme_certificates
            .get_or_create(&AcmeLabels {
                host: host.to_string(),
                result: "failed",
            })
            .inc();
        tracing::error!(host = %host, %error, retry_in_seconds = wait.as_secs(), failures, hint = hint(&error, settings.challenge), "ACME: could not obtain a certificate");
    }
}

/// Why a certificate the CA has just returned must not be stored or
/// served, if it must not: it is not valid now (give or take
/// [`CLOCK_SKEW`] at its start), it has too little life left to be worth
/// storing ([`MIN_LIFE_LEFT`]), or it is due for renewal on arrival: each
/// would order another within seconds, and again, until the CA's limits
/// are hit.
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
    let floor = MIN_LIFE_LEFT.min(i64::try_from(renew_before.as_secs()).unwrap_or(i64::MAX));
    if cert.not_after - now < floor {
        return Err(format!(
            "it is valid until {} only, {}s from now, less than the {floor}s a certificate must have left to be stored (is the CA's clock, or this machine's, wrong?)",
            fmt_unix(cert.not_after),
            cert.not_after - now
        ));
    }
    let renew_at = cert.renew_at(renew_before);
    if renew_at <= now {
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
pub(super) fn out_of_descriptors(e: &io::Error) -> bool {
    // Linux's numbers: EMFILE 24, ENFILE 23.
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// How long to wait for something `secs` from now: at most [`POLL`], so
/// the task notices what other replicas store and configuration changes.
fn wait_secs(secs: i64) -> Duration {
    let secs = u64::try_from(secs.max(1)).unwrap_or(u64::MAX);
    Duration::from_secs(secs).min(POLL)
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::acme::tests::test_key;
    use rustls::sign::CertifiedKey;

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
    fn running_out_of_descriptors_is_told_from_a_storage_problem() {
        // EMFILE and ENFILE (Linux): said as what they are, not "check the
        // volume is mounted read-write".
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(24)));
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(23)));
        // EROFS, EACCES: storage problems.
        assert!(!out_of_descriptors(&io::Error::from_raw_os_error(30)));
        assert!(!out_of_descriptors(&io::Error::from_raw_os_error(13)));
    }

    #[test]
    fn received_certificates_must_be_valid_now_and_not_due_at_once() {
        let now = 1_000_000_000;
        let ck = |nb: i64, na: i64| Stored {
            key: Arc::new(CertifiedKey::new(Vec::new(), test_key())),
            not_before: nb,
            not_after: na,
            arrived: now,
        };
        let month = Duration::from_secs(30 * 86400);
        assert!(fit_to_serve(&ck(now - 3600, now + 90 * 86400), month, now).is_ok());
        // Pebble's 30-second certificates, with renew_before = 25 s.
        assert!(fit_to_serve(&ck(now, now + 30), Duration::from_secs(25), now).is_ok());
        // Backdated so that renew_before is reached 2 s after arrival: taken,
        // and renewed when a third of its remaining life is left.
        assert!(fit_to_serve(&ck(now - 60 * 86400, now + 30 * 86400 + 2), month, now).is_ok());
        // A CA clock a minute ahead.
        assert!(fit_to_serve(&ck(now + 60, now + 90 * 86400), month, now).is_ok());
        let refused = |nb, na| fit_to_serve(&ck(nb, na), month, now).expect_err("refused");
        assert!(refused(now - 7200, now - 3600).contains("expired at"));
        assert!(refused(now - 7200, now).contains("expired at"));
        assert!(refused(now + 3600, now + 90 * 86400).contains("not valid before"));
        assert!(refused(now - 89 * 86400, now + 300).contains("less than the 600s"));
        assert!(
            fit_to_serve(&ck(now - 89 * 86400, now + 3600), month, now).is_ok(),
            "a test CA's hour"
        );
        assert!(refused(now - 10, now + 1).contains("less than the 600s"));
        assert!(fit_to_serve(&ck(now, now + 20), Duration::from_secs(25), now)
            .expect_err("refused")
            .contains("less than the 25s"));
    }
}
