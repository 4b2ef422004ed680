//! `[acme] storage`: the layout of its files, the locks that let replicas
//! share it, and writes that a reader never sees half done (see the
//! layout in the parent module's documentation).

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{owner_id, parse_stored, unix_now, Stored};
use crate::hash::fnv1a;
use crate::host::HostName;

/// A lock older than this belongs to a holder that died; it is taken over.
const LOCK_TTL: Duration = Duration::from_secs(600);

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

    pub(super) fn certificate_path(&self, host: &HostName) -> PathBuf {
        self.root.join("certificates").join(format!("{host}.pem"))
    }

    pub(super) fn status_path(&self, host: &HostName) -> PathBuf {
        self.root.join("certificates").join(format!("{host}.json"))
    }

    pub(super) fn lock_path(&self, name: &str) -> PathBuf {
        self.root.join("locks").join(format!("{name}.lock"))
    }

    pub(super) fn http01_path(&self, token: &str) -> PathBuf {
        self.root.join("challenges").join("http-01").join(token)
    }

    pub(super) fn alpn01_path(&self, host: &HostName) -> PathBuf {
        self.root
            .join("challenges")
            .join("tls-alpn-01")
            .join(format!("{host}.pem"))
    }

    pub(super) fn account_path(&self, directory: &str) -> PathBuf {
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
        parse_stored(&pem, host, self.status(host).issued_at)
            .map(Some)
            .map_err(|m| format!("{}: {m}", path.display()))
    }

    pub(super) fn certificate_stamp(&self, host: &HostName) -> Option<(i64, i64, u64)> {
        let meta = fs::metadata(self.certificate_path(host)).ok()?;
        Some((meta.mtime(), meta.mtime_nsec(), meta.size()))
    }

    pub fn status(&self, host: &HostName) -> Status {
        fs::read(self.status_path(host))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub(super) fn write_status(&self, host: &HostName, status: &Status) -> io::Result<()> {
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
    pub(super) fn try_lock(&self, name: &str, owner: &str) -> io::Result<Option<Lock>> {
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
pub(super) struct Lock {
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

/// Writes `bytes` to `path` readable by the owner only, atomically (a
/// temporary file renamed over it), creating the folder if needed.
pub(super) fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
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

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

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
