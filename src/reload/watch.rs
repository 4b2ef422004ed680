//! The file watcher behind file-triggered reloads: inotify on the folders
//! of the config file and of every file it names (certificates, keys, OCSP
//! responses, host files, error pages; and `certs_dir`), writes
//! watched on the files themselves, and which events ask for a reload or
//! hold one back (see [`FileWatcher`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;

use super::Trigger;
use crate::config::{CertSource, Config};

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
pub(super) struct FileWatcher {
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
    pub(super) fn new(triggers: mpsc::UnboundedSender<Trigger>) -> Self {
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
    pub(super) fn mid_write(&self) -> Option<PathBuf> {
        lock(&self.state).writing.iter().next().cloned()
    }

    pub(super) fn watch(&mut self, config: &Config) {
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
                    .chain(h.error_page.as_deref().map(|p| p.path.as_path()))
            }))
            .chain(config.error_page.as_deref().map(|p| p.path.as_path()))
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
    use std::time::Duration;

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
