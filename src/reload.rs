//! The live configuration and how it changes while linkgate runs.
//!
//! [`Live`] holds the active configuration behind an `ArcSwap`: every new
//! connection loads it once, so a reload takes effect for the next
//! handshake while open connections carry on with what they started with.
//! A reload re-reads and re-validates everything off the request path; on
//! failure the running configuration stays and the failure is logged and
//! counted. One session ticketer and one session cache live for the whole
//! process, so resumption keeps working across reloads.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ProducesTickets, StoresServerSessions};
use rustls::ServerConfig;
use tokio::sync::mpsc;

use crate::config::{CertSource, Config};
use crate::host::HostName;
use crate::metrics::{HostCounters, HostLabels, Metrics, OTHER_HOST};
use crate::tls::{self, SniResolver};

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

/// Watches the folders of the config file and of every file it names, and
/// asks for a reload when one of those files changes, or when a Kubernetes
/// volume swaps its `..data` link (names starting with `..`). Other files in
/// the same folders (logs, editors' swap files) are ignored.
///
/// Only a finished write asks for a reload: written and closed
/// (`IN_CLOSE_WRITE`) or renamed into place (`IN_MOVED_TO`, also how editors
/// and Kubernetes replace a file). A file being created, written to or
/// truncated, deleted or renamed away only holds back a pending reload
/// ([`Trigger::FileBusy`]): a file deleted and then written slowly is read
/// once it is closed, never half-written. A lost event (the queue
/// overflowed) asks for a reload.
///
/// inotify is used directly, asking only for the events that can change a
/// file's content. Writes (`IN_MODIFY`) are watched on the watched files
/// themselves, not on their folders: a folder watch reports every write to
/// every file in it, and a log written beside the config (the benchmark's
/// load generator writes one) then wakes this thread at every line. A
/// generic watcher also subscribes to every open, which costs the same for
/// a folder whose files are opened often.
struct FileWatcher {
    watches: Option<inotify::Watches>,
    /// Watched folders, and their watch descriptors.
    dirs: HashMap<PathBuf, inotify::WatchDescriptor>,
    state: Arc<Mutex<WatchState>>,
}

/// What the watcher thread and [`FileWatcher`] share.
#[derive(Default)]
struct WatchState {
    /// The folder each folder watch stands for.
    dirs: HashMap<i32, PathBuf>,
    /// The file each file watch (writes only) stands for.
    files_by_wd: HashMap<i32, (PathBuf, inotify::WatchDescriptor)>,
    /// The files a change to which asks for a reload.
    files: HashSet<PathBuf>,
    /// Watched files created or written to and not closed since, not
    /// deleted or renamed away: being written.
    writing: HashSet<PathBuf>,
    /// Batches of events read so far: how often the thread woke up.
    wakes: u64,
}

/// On a watched file's folder: whatever ends, begins or replaces a file.
const FOLDER_MASK: inotify::WatchMask = inotify::WatchMask::CLOSE_WRITE
    .union(inotify::WatchMask::MOVED_TO)
    .union(inotify::WatchMask::MOVED_FROM)
    .union(inotify::WatchMask::CREATE)
    .union(inotify::WatchMask::DELETE);

/// On a watched file itself: a write or truncation in place.
const FILE_MASK: inotify::WatchMask = inotify::WatchMask::MODIFY;

impl FileWatcher {
    fn new(triggers: mpsc::UnboundedSender<Trigger>) -> Self {
        let state: Arc<Mutex<WatchState>> = Arc::default();
        let inotify = match inotify::Inotify::init() {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch files; reload with SIGHUP");
                return Self {
                    watches: None,
                    dirs: HashMap::new(),
                    state,
                };
            }
        };
        let watches = inotify.watches();
        let (shared, thread_watches) = (state.clone(), watches.clone());
        let spawned = std::thread::Builder::new()
            .name("linkgate-watch".into())
            .spawn(move || watch_thread(inotify, thread_watches, &shared, &triggers));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the file watcher; reload with SIGHUP");
        }
        Self {
            watches: Some(watches),
            dirs: HashMap::new(),
            state,
        }
    }

    /// A watched file being written (written to and not closed yet), if any.
    fn mid_write(&self) -> Option<PathBuf> {
        lock(&self.state).writing.iter().next().cloned()
    }

    fn watch(&mut self, config: &Config) {
        let Some(watches) = self.watches.as_mut() else { return };
        let files: HashSet<PathBuf> = std::iter::once(config.path.as_path())
            .chain(config.hosts.iter().flat_map(|h| {
                let cert_files = match &h.certificate {
                    CertSource::Files { cert, key, ocsp, .. } => {
                        [Some(cert.as_path()), Some(key.as_path()), ocsp.as_deref()]
                    }
                    CertSource::Acme => [None, None, None],
                };
                cert_files
                    .into_iter()
                    .flatten()
                    .chain(h.files.values().map(|f| f.path.as_path()))
            }))
            .map(absolute)
            .collect();
        // certs_dir itself too: a Kubernetes projected volume swaps its
        // `..data` link there, above the hosts' folders.
        let wanted: BTreeSet<PathBuf> = files
            .iter()
            .map(|f| folder_of(f))
            .chain(config.certs_dir.as_deref().map(absolute))
            .collect();
        let mut state = lock(&self.state);
        self.dirs.retain(|dir, wd| {
            let keep = wanted.contains(dir);
            if !keep {
                state.dirs.remove(&wd.get_watch_descriptor_id());
                let _ = watches.remove(wd.clone());
            }
            keep
        });
        for dir in wanted {
            if self.dirs.contains_key(&dir) {
                continue;
            }
            match watches.add(&dir, FOLDER_MASK) {
                Ok(wd) => {
                    state.dirs.insert(wd.get_watch_descriptor_id(), dir.clone());
                    self.dirs.insert(dir, wd);
                }
                Err(e) => {
                    tracing::warn!(folder = %dir.display(), error = %e, "cannot watch folder; reload with SIGHUP")
                }
            }
        }
        // Write watches: one per file as it is now (a replaced file's old
        // watch ends by itself, with IN_IGNORED).
        state.files_by_wd.retain(|_, (file, wd)| {
            let keep = files.contains(file);
            if !keep {
                let _ = watches.remove(wd.clone());
            }
            keep
        });
        for file in &files {
            watch_writes(watches, &mut state, file);
        }
        state.files = files;
    }
}

/// Watches `file` itself for writes in place, when it is a regular file
/// (a folder watch would report its children's writes, and a Kubernetes
/// `..` folder is never written in place); a missing file is not an error
/// (it is watched once it is created).
fn watch_writes(watches: &mut inotify::Watches, state: &mut WatchState, file: &Path) {
    if !std::fs::metadata(file).is_ok_and(|m| m.is_file()) {
        return;
    }
    if let Ok(wd) = watches.add(file, FILE_MASK) {
        state
            .files_by_wd
            .insert(wd.get_watch_descriptor_id(), (file.to_path_buf(), wd));
    }
}

fn lock(state: &Mutex<WatchState>) -> std::sync::MutexGuard<'_, WatchState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The watcher thread: reads events until the inotify instance fails or
/// the reload task has gone, and sends one trigger per batch of events.
fn watch_thread(
    mut inotify: inotify::Inotify,
    mut watches: inotify::Watches,
    state: &Mutex<WatchState>,
    triggers: &mpsc::UnboundedSender<Trigger>,
) {
    let mut buffer = [0u8; 4096];
    loop {
        let events = match inotify.read_events_blocking(&mut buffer) {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(error = %e, "file watcher stopped; reload with SIGHUP");
                return;
            }
        };
        let mut seen = None;
        let mut state = lock(state);
        state.wakes += 1;
        for event in events {
            if event.mask.contains(inotify::EventMask::Q_OVERFLOW) {
                seen = Some(Trigger::FileChange);
                continue;
            }
            let id = event.wd.get_watch_descriptor_id();
            if event.mask.contains(inotify::EventMask::IGNORED) {
                // A file watch's inode is gone (deleted, or replaced by a rename).
                state.files_by_wd.remove(&id);
                continue;
            }
            let path = if let Some((file, _)) = state.files_by_wd.get(&id) {
                file.clone()
            } else if let (Some(dir), Some(name)) = (state.dirs.get(&id), event.name) {
                dir.join(name)
            } else {
                continue;
            };
            if !is_relevant(&path, &state.files) {
                continue;
            }
            let mask = event.mask;
            if mask.contains(inotify::EventMask::MODIFY) {
                state.writing.insert(path);
            } else if mask.contains(inotify::EventMask::CREATE) {
                // Created, and written until it is closed; a new inode
                // whose later writes in place are watched too. (Links and
                // folders are never closed after writing: not waited for.)
                if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
                    state.writing.insert(path.clone());
                }
                if state.files.contains(&path) {
                    watch_writes(&mut watches, &mut state, &path);
                }
            } else {
                // Closed after writing, renamed into place, deleted or
                // renamed away: done with.
                state.writing.remove(&path);
                if mask.contains(inotify::EventMask::MOVED_TO) && state.files.contains(&path) {
                    watch_writes(&mut watches, &mut state, &path);
                }
            }
            if finishes_a_write(mask) {
                seen = Some(Trigger::FileChange);
            } else if seen.is_none() {
                seen = Some(Trigger::FileBusy);
            }
        }
        drop(state);
        if let Some(trigger) = seen {
            if triggers.send(trigger).is_err() {
                return;
            }
        }
    }
}

/// Whether an event ends a write (closed after writing, renamed into
/// place), so that the file may be read once it has settled.
fn finishes_a_write(mask: inotify::EventMask) -> bool {
    mask.intersects(inotify::EventMask::CLOSE_WRITE | inotify::EventMask::MOVED_TO)
}

/// A change to `path` matters when it is one of `files` or a `..`-named entry
/// (Kubernetes' `..data` link and its timestamped folders).
fn is_relevant(path: &Path, files: &HashSet<PathBuf>) -> bool {
    files.contains(path) || path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".."))
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn folder_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
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
    }

    #[test]
    fn only_named_files_and_kubernetes_links_trigger_a_reload() {
        let files: HashSet<PathBuf> = ["/etc/linkgate/linkgate.toml", "/etc/linkgate/certs/tls.crt"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert!(is_relevant(Path::new("/etc/linkgate/linkgate.toml"), &files));
        assert!(is_relevant(Path::new("/etc/linkgate/certs/tls.crt"), &files));
        assert!(is_relevant(Path::new("/etc/linkgate/certs/..data"), &files));
        assert!(is_relevant(
            Path::new("/etc/linkgate/certs/..2026_11_29_10_00_00.123"),
            &files
        ));
        assert!(!is_relevant(Path::new("/etc/linkgate/linkgate.log"), &files));
        assert!(!is_relevant(Path::new("/etc/linkgate/.linkgate.toml.swp"), &files));
    }

    /// A log written line by line beside the config (the benchmark's load
    /// generator wrote one) woke the watcher thread at every line, 16% of
    /// the process's context switches under HTTP/2 load; writes to the
    /// config itself are still seen as a write in progress.
    #[test]
    fn writes_to_other_files_in_the_folder_do_not_wake_the_watcher() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("linkgate.toml");
        let text = "[listen]\nhttps = \"127.0.0.1:1\"\n[acme]\ndirectory = \"https://acme.test/dir\"\nstorage = \"acme\"\n[[host]]\nname = \"a.test\"\nacme = true\n";
        std::fs::write(&path, text).expect("write config");
        let config = Config::from_toml(text, &path).expect("valid config");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut watcher = FileWatcher::new(tx);
        watcher.watch(&config);
        let wakes = || lock(&watcher.state).wakes;
        let settle = || std::thread::sleep(Duration::from_millis(200));

        let mut log = std::fs::File::create(dir.path().join("load.log")).expect("create log");
        settle();
        let before = wakes();
        for i in 0..100 {
            std::io::Write::write_all(&mut log, format!("line {i}\n").as_bytes()).expect("write log");
            std::thread::sleep(Duration::from_millis(2));
        }
        settle();
        assert_eq!(wakes(), before, "100 writes to a log beside the config");
        assert!(rx.try_recv().is_err(), "no trigger from the log");

        // Rewritten in place, slowly: being written until it is closed.
        let mut config_file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .expect("open config");
        std::io::Write::write_all(&mut config_file, b"[listen]\n").expect("write config");
        settle();
        let mut drain = || std::iter::from_fn(|| rx.try_recv().ok()).collect::<Vec<_>>();
        assert_eq!(
            watcher.mid_write(),
            Some(path.clone()),
            "a config half-written in place"
        );
        let busy = drain();
        assert!(
            !busy.is_empty() && busy.iter().all(|t| *t == Trigger::FileBusy),
            "{busy:?}"
        );
        drop(config_file);
        settle();
        assert_eq!(watcher.mid_write(), None, "closed");
        assert_eq!(drain(), [Trigger::FileChange]);
    }
}
