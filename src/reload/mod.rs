//! The live configuration and how it changes while linkgate runs.
//!
//! [`Live`] holds the active configuration behind an `ArcSwap`: every new
//! connection loads it once, so a reload takes effect for the next
//! handshake while open connections carry on with what they started with.
//! A reload re-reads and re-validates everything off the request path; on
//! failure the running configuration stays and the failure is logged and
//! counted. One session ticketer and one session cache live for the whole
//! process, so resumption keeps working across reloads.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ProducesTickets, StoresServerSessions};
use rustls::ServerConfig;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::host::HostName;
use crate::metrics::{HostCounters, HostLabels, Metrics, OTHER_HOST};
use crate::tls::{self, SniResolver};

mod sni;
mod watch;

pub use sni::LiveSni;
use watch::FileWatcher;

/// One validated configuration, ready to serve.
pub struct Active {
    pub config: Config,
    pub tls: Arc<ServerConfig>,
    pub sni: Arc<SniResolver>,
    /// Each configured host and its index in `config.hosts`.
    pub hosts: HashMap<HostName, usize>,
    /// Request counters per configured host, and for everything else.
    counters: HashMap<HostName, HostCounters>,
    other: HostCounters,
    /// Increases with every successful reload.
    pub generation: u64,
}

impl Active {
    /// The configuration of `host`, if it is configured.
    pub fn host(&self, host: &HostName) -> Option<&crate::config::Host> {
        self.hosts.get(host).map(|&i| &self.config.hosts[i])
    }

    /// The request counters for `host` (`other` when it is not configured).
    pub fn counters(&self, host: Option<&HostName>) -> &HostCounters {
        host.and_then(|h| self.counters.get(h)).unwrap_or(&self.other)
    }
}

/// The configuration in force, and what is needed to replace it.
pub struct Live {
    current: ArcSwap<Active>,
    generation: AtomicU64,
    ticketer: Arc<dyn ProducesTickets>,
    sessions: Arc<dyn StoresServerSessions + Send + Sync>,
    pub metrics: Arc<Metrics>,
    /// What /readyz says: set once the listeners are up, cleared when draining.
    pub ready: AtomicBool,
    /// Set when the grace period is over and what is still open is cut.
    pub grace_over: Arc<AtomicBool>,
    /// Certificates obtained over ACME, kept across reloads.
    pub acme: Arc<crate::acme::Certificates>,
    /// What the process applied at start and cannot change until a restart.
    started: StartOnly,
}

/// The settings that apply only at start: the listeners bound, the logger
/// set up, the connection caps sized. A reload that changes one logs that
/// it needs a restart (and applies the rest); one that changes it back to
/// what the process started with logs nothing.
#[derive(Debug, Clone, PartialEq)]
struct StartOnly {
    https: std::net::SocketAddr,
    http: Option<std::net::SocketAddr>,
    http3: Option<crate::config::Http3>,
    admin: Option<std::net::SocketAddr>,
    log_format: crate::config::LogFormat,
    max_connections: u32,
    upstream_connections: usize,
}

impl StartOnly {
    fn of(config: &Config) -> Self {
        Self {
            https: config.listen.https,
            http: config.listen.http,
            http3: config.listen.http3.clone(),
            admin: config.admin,
            log_format: config.log.format,
            max_connections: config.limits.max_connections,
            upstream_connections: config.limits.upstream_connections(),
        }
    }

    /// The keys whose value in `config` differs from what the process started with.
    fn changed_in(&self, config: &Config) -> Vec<&'static str> {
        let now = Self::of(config);
        [
            ("listen.https", self.https != now.https),
            ("listen.http", self.http != now.http),
            (
                "listen.http3",
                self.http3.as_ref().map(|h| h.addr) != now.http3.as_ref().map(|h| h.addr),
            ),
            (
                "listen.http3_advertise_port",
                self.http3.as_ref().map(|h| h.advertise_port) != now.http3.as_ref().map(|h| h.advertise_port),
            ),
            ("admin.listen", self.admin != now.admin),
            ("log.format", self.log_format != now.log_format),
            ("limits.max_connections", self.max_connections != now.max_connections),
            (
                "limits.max_upstream_connections",
                self.upstream_connections != now.upstream_connections,
            ),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }
}

impl Live {
    pub fn new(config: Config, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Self>> {
        let ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
        let sessions: Arc<dyn StoresServerSessions + Send + Sync> = rustls::server::ServerSessionMemoryCache::new(8192);
        let acme = Arc::new(crate::acme::Certificates::default());
        crate::acme::preload(&config, &acme);
        let started = StartOnly::of(&config);
        let active = build(config, 0, &ticketer, &sessions, &metrics, &acme)?;
        record_expiry(&metrics, &active);
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(active),
            generation: AtomicU64::new(0),
            ticketer,
            sessions,
            metrics,
            ready: AtomicBool::new(false),
            grace_over: Arc::new(AtomicBool::new(false)),
            acme,
            started,
        }))
    }

    /// The configuration in force now.
    pub fn load(&self) -> Arc<Active> {
        self.current.load_full()
    }

    /// Re-reads the config file and every file it names; swaps it in if valid.
    pub async fn reload(self: &Arc<Self>) -> Result<(), String> {
        let old = self.load();
        let path = old.config.path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
        let config = match loaded {
            Ok(Ok(config)) => config,
            Ok(Err(e)) => return Err(self.failed(e.to_string())),
            Err(e) => return Err(self.failed(format!("reload task failed: {e}"))),
        };
        // Against what the process started with, not the last reload: a
        // value changed back to the one in force logs nothing.
        for key in self.started.changed_in(&config) {
            tracing::warn!(
                key,
                "applies at start only: restart linkgate to apply the new value; the rest of the reload applies now"
            );
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let active = build(
            config,
            generation,
            &self.ticketer,
            &self.sessions,
            &self.metrics,
            &self.acme,
        )
        .map_err(|e| self.failed(e.to_string()))?;
        record_expiry(&self.metrics, &active);
        let hosts = active.hosts.len();
        let (added, removed) = host_changes(&old, &active);
        self.current.store(Arc::new(active));
        self.metrics.reload("success");
        if removed.is_empty() {
            tracing::info!(generation, hosts, ?added, ?removed, "configuration reloaded");
        } else {
            // Handshakes for a removed host now fail: make a surprising drop stand out.
            tracing::warn!(generation, hosts, ?added, ?removed, "configuration reloaded");
        }
        Ok(())
    }

    fn failed(&self, message: String) -> String {
        self.metrics.reload("failure");
        tracing::error!(error = %message, "reload failed; the running configuration stays in force");
        message
    }
}

impl crate::acme::Source for Live {
    fn generation(&self) -> u64 {
        self.load().generation
    }

    fn settings(&self) -> Option<crate::config::Acme> {
        self.load().config.acme.clone()
    }

    fn hosts(&self) -> Vec<HostName> {
        let active = self.load();
        active
            .config
            .hosts
            .iter()
            .filter(|h| h.is_acme())
            .map(|h| h.name.clone())
            .collect()
    }
}

/// The host names in `new` and not in `old`, and those in `old` and not in `new`, sorted.
fn host_changes(old: &Active, new: &Active) -> (Vec<String>, Vec<String>) {
    let names = |a: &Active| -> BTreeSet<String> { a.hosts.keys().map(|h| h.as_str().to_owned()).collect() };
    let (before, after) = (names(old), names(new));
    (
        after.difference(&before).cloned().collect(),
        before.difference(&after).cloned().collect(),
    )
}

fn build(
    config: Config,
    generation: u64,
    ticketer: &Arc<dyn ProducesTickets>,
    sessions: &Arc<dyn StoresServerSessions + Send + Sync>,
    metrics: &Metrics,
    acme: &crate::acme::Certificates,
) -> anyhow::Result<Active> {
    let sni = Arc::new(SniResolver::new(
        config
            .hosts
            .iter()
            .filter_map(|h| Some((h.name.clone(), h.file_certificate()?.clone()))),
        config
            .hosts
            .iter()
            .filter(|h| h.is_acme())
            .map(|h| (h.name.clone(), acme.slot(&h.name))),
    ));
    let tls = tls::server_config(sni.clone(), ticketer.clone(), sessions.clone())?;
    let hosts = config
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.name.clone(), i))
        .collect();
    let counters = config
        .hosts
        .iter()
        .map(|h| (h.name.clone(), metrics.host_counters(h.name.as_str())))
        .collect();
    Ok(Active {
        config,
        tls,
        sni,
        hosts,
        counters,
        other: metrics.host_counters(OTHER_HOST),
        generation,
    })
}

fn record_expiry(metrics: &Metrics, active: &Active) {
    metrics.cert_expiry.clear();
    metrics.acme_ready.clear();
    for host in &active.config.hosts {
        let labels = HostLabels {
            host: host.name.to_string(),
        };
        let served = active.sni.certificate(&host.name);
        if let Some(not_after) = served
            .as_ref()
            .and_then(|ck| tls::not_after(ck.end_entity_cert().ok()?))
        {
            metrics.cert_expiry.get_or_create(&labels).set(not_after);
        }
        if host.is_acme() {
            metrics
                .acme_ready
                .get_or_create(&labels)
                .set(i64::from(served.is_some()));
        }
    }
}

/// How long the watched files must be quiet (no further event for any of
/// them) after a change before linkgate reads them: a writer that pauses
/// for less than this between its writes and closes is read once, whole.
pub const SETTLE: Duration = Duration::from_millis(500);

/// A pending reload waits at most this long for quiet, so that a file that
/// is written all the time cannot postpone reloads for ever.
const SETTLE_AT_MOST: Duration = Duration::from_secs(10);

/// A pending reload waits at most this long for a watched file that has
/// been written to and not closed yet (a writer that stopped midway for
/// longer than this is taken to be done, with a warning).
const MID_WRITE_AT_MOST: Duration = Duration::from_secs(60);

/// What can ask for a reload, or hold one back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// A watched file was written and closed, or renamed into place.
    FileChange,
    /// A watched file is being changed (written to, truncated, created,
    /// deleted or renamed away): not a reason to reload, but a pending
    /// reload waits until this has been quiet for [`SETTLE`].
    FileBusy,
}

/// Runs reloads for triggers from `triggers` (SIGHUP and file changes),
/// coalescing bursts: certbot and Kubernetes change several files at once,
/// and editors write a file in several steps. A reload starts once nothing
/// has happened to the watched files for [`SETTLE`]; it does not start when
/// the config file is missing or empty then (the running configuration
/// stays). Also watches the config file and every certificate and key it
/// names; folders are watched rather than files, so renames and `..data`
/// symlink swaps are seen (Linux, inotify; elsewhere reload with SIGHUP).
///
/// The files are watched from the moment `run` returns, before its future
/// is first polled: a change made once the server is up is never missed.
pub fn run(
    live: Arc<Live>,
    triggers: mpsc::UnboundedSender<Trigger>,
    rx: mpsc::UnboundedReceiver<Trigger>,
) -> impl std::future::Future<Output = ()> {
    let mut watcher = FileWatcher::new(triggers);
    watcher.watch(&live.load().config);
    reloads(live, watcher, rx)
}

async fn reloads(live: Arc<Live>, mut watcher: FileWatcher, mut rx: mpsc::UnboundedReceiver<Trigger>) {
    while let Some(first) = rx.recv().await {
        if first == Trigger::FileBusy {
            continue;
        }
        settle(&mut rx).await;
        // Another watched file's finished write (a certificate renewed)
        // must not read the config while it is itself being written.
        let waiting_since = tokio::time::Instant::now();
        while let Some(file) = watcher.mid_write() {
            if waiting_since.elapsed() >= MID_WRITE_AT_MOST {
                tracing::warn!(file = %file.display(), "a watched file has been written to and not closed for a minute: reading it anyway");
                break;
            }
            tracing::debug!(file = %file.display(), "waiting for a watched file to be closed before reloading");
            settle(&mut rx).await;
        }
        let path = live.load().config.path.clone();
        match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.len() > 0 => {}
            Ok(_) => {
                tracing::warn!(file = %path.display(), trigger = ?first, "the config file is empty: not reloading; the running configuration stays");
                continue;
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), trigger = ?first, error = %e, "the config file cannot be read: not reloading; the running configuration stays");
                continue;
            }
        }
        tracing::info!(trigger = ?first, "reloading configuration");
        if live.reload().await.is_ok() {
            watcher.watch(&live.load().config);
        }
    }
}

/// Waits until no trigger has arrived for [`SETTLE`] (at most
/// [`SETTLE_AT_MOST`] in all), consuming those that do.
async fn settle(rx: &mut mpsc::UnboundedReceiver<Trigger>) {
    let give_up = tokio::time::Instant::now() + SETTLE_AT_MOST;
    loop {
        let quiet_until = (tokio::time::Instant::now() + SETTLE).min(give_up);
        match tokio::time::timeout_at(quiet_until, rx.recv()).await {
            Ok(Some(_)) if tokio::time::Instant::now() < give_up => {}
            Ok(None) | Ok(Some(_)) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn start_only_keys_are_compared_with_what_the_process_started_with() {
        let config = |extra: &str| {
            let text = format!("[listen]\nhttps = \"127.0.0.1:8443\"\n{extra}[acme]\ndirectory = \"https://acme.test/dir\"\nstorage = \"acme\"\n[[host]]\nname = \"a.test\"\nacme = true\n");
            Config::from_toml(&text, Path::new("/etc/linkgate/linkgate.toml")).expect("valid")
        };
        let started = StartOnly::of(&config(""));
        assert!(started.changed_in(&config("")).is_empty());
        assert_eq!(
            started.changed_in(&config("[log]\nformat = \"json\"\n")),
            ["log.format"]
        );
        let mut other = config("[limits]\nmax_connections = 100\nmax_upstream_connections = 7\n");
        other.listen.https = "127.0.0.1:9443".parse().expect("addr");
        assert_eq!(
            started.changed_in(&other),
            [
                "listen.https",
                "limits.max_connections",
                "limits.max_upstream_connections"
            ]
        );
        let mut http3 = config("");
        http3.listen.http3 = Some(crate::config::Http3 {
            addr: "127.0.0.1:8443".parse().expect("addr"),
            advertise_port: Some(443),
        });
        assert_eq!(
            started.changed_in(&http3),
            ["listen.http3", "listen.http3_advertise_port"]
        );
    }
}
