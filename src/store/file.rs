//! The standalone lease store: one JSON state file in the state directory.
//!
//! Every commit takes `leases.lock`, re-reads the file, checks the revision, applies the
//! changes and replaces the file atomically (temp + fsync + rename + directory fsync).
//! A missing file means "no leases yet". A file that exists but cannot be read as a
//! lease set is never treated as empty: that would hand out live ports twice.

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::lock::LockGuard;
use super::{LeaseChange, LeaseSet, LeaseStore, StoreError, apply_changes};
use crate::fsutil::{UntrustedDir, check_trusted_dir, open_nofollow, write_atomic};
use crate::lease::{Expiry, Lease};
use crate::session::is_valid_name;

/// The on-disk format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Largest state file we will read (800 leases take about 200 KiB).
const MAX_STATE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OnDisk {
    version: u32,
    revision: u64,
    leases: Vec<Lease>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    expired: BTreeMap<String, Expiry>,
}

/// Paths inside a state directory, so every command agrees on them.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    /// Creates the directory and its `logs/` (mode 0700) if needed, then refuses to use
    /// it unless only vncd can write in it (see [`StateDir::check`]).
    ///
    /// `--state-dir /tmp/vncd-state` is safe this way: vncd creates it 0700; a directory
    /// someone else created there first (owned by them, or world-writable) is refused.
    pub fn create(&self) -> Result<(), StateDirError> {
        let logs = self.root.join("logs");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&logs)
            .map_err(|source| StateDirError::Create { path: logs, source })?;
        self.check()
    }

    /// Refuses a state directory (or its `keys/`, `nonces/` and `logs/`) that anyone but vncd could
    /// write in: owned by another user, writable by group or others, a symlinked
    /// subdirectory, or under a parent that others can write (and is not sticky). Such a
    /// directory lets that user plant symlinks or swap files that vncd, often root, then
    /// writes through or trusts. The error says how to fix it.
    pub fn check(&self) -> Result<(), StateDirError> {
        check_trusted_dir("state directory", &self.root, true, true)?;
        for (what, sub) in [
            ("keys directory", "keys"),
            ("nonces directory", "nonces"),
            ("logs directory", "logs"),
        ] {
            let dir = self.root.join(sub);
            if dir.exists() {
                check_trusted_dir(what, &dir, false, false)?;
            }
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn leases(&self) -> PathBuf {
        self.root.join("leases.json")
    }
    pub fn leases_lock(&self) -> PathBuf {
        self.root.join("leases.lock")
    }
    /// The control socket of the relay `vncd run --relay` starts (in `relay/`, the relay's
    /// own directory).
    pub fn relay_socket(&self) -> PathBuf {
        self.root.join("relay").join("relay.sock")
    }
    pub fn controller_lock(&self) -> PathBuf {
        self.root.join("vncd.lock")
    }
    pub fn sessions(&self) -> PathBuf {
        self.root.join("sessions.json")
    }
    pub fn log_of(&self, session: &str) -> PathBuf {
        self.root.join("logs").join(format!("{session}.log"))
    }
}

/// Why a state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("cannot create state directory {}: {source}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Untrusted(#[from] UntrustedDir),
}

/// Reads the state file without locking: the atomic rename guarantees a whole file.
pub fn read_state(path: &Path) -> Result<LeaseSet, StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_owned(),
        source,
    };
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.to_owned(),
        detail,
    };
    // O_NOFOLLOW: a symlink planted as leases.json is an error naming the file, never
    // read through.
    let file = match open_nofollow(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(LeaseSet::default()),
        Err(e) => return Err(io(e)),
    };
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(corrupt("it is not a regular file".into()));
    }
    if meta.len() > MAX_STATE_BYTES {
        return Err(corrupt(format!(
            "it is {} bytes, more than a state file can be",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    {
        use std::io::Read;
        file.take(MAX_STATE_BYTES)
            .read_to_end(&mut bytes)
            .map_err(io)?;
    }
    let disk: OnDisk = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if disk.version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {} is not {FORMAT_VERSION}, the one this vncd understands",
            disk.version
        )));
    }
    let mut leases = BTreeMap::new();
    let mut ports = BTreeSet::new();
    for lease in disk.leases {
        if !is_valid_name(&lease.session) {
            return Err(corrupt(format!(
                "lease for invalid session name {:?}",
                lease.session
            )));
        }
        if !ports.insert(lease.port) {
            return Err(corrupt(format!("port {} is leased twice", lease.port)));
        }
        if leases.contains_key(&lease.session) {
            return Err(corrupt(format!(
                "session {:?} holds two leases",
                lease.session
            )));
        }
        leases.insert(lease.session.clone(), lease);
    }
    Ok(LeaseSet {
        revision: disk.revision,
        leases,
        expired: disk.expired,
    })
}

/// Writes a lease set as the state file, durably.
pub fn write_state(path: &Path, set: &LeaseSet) -> Result<(), StoreError> {
    let disk = OnDisk {
        version: FORMAT_VERSION,
        revision: set.revision,
        leases: set.leases.values().cloned().collect(),
        expired: set.expired.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&disk).map_err(|e| StoreError::Invalid(e.to_string()))?;
    write_atomic(path, &bytes, 0o600).map_err(|source| StoreError::Io {
        path: path.to_owned(),
        source,
    })
}

/// The locked state-file store.
#[derive(Clone, Debug)]
pub struct FileStore {
    dir: StateDir,
    lock_timeout: Duration,
    /// `leases.json`'s inode, modification time and length when last read by
    /// [`LeaseStore::changed_since`], so an unchanged file is not parsed every pass (every
    /// write renames a new file over it: a new inode).
    seen: std::sync::Arc<std::sync::Mutex<Option<(u64, std::time::SystemTime, u64)>>>,
}

impl FileStore {
    pub fn new(dir: StateDir, lock_timeout: Duration) -> Self {
        FileStore {
            dir,
            lock_timeout,
            seen: std::sync::Arc::default(),
        }
    }

    /// [`LeaseStore::changed_since`], blocking.
    fn changed_since_blocking(&self, revision: u64) -> Option<LeaseSet> {
        let path = self.dir.leases();
        let meta = std::fs::metadata(&path).ok()?;
        let stamp = (
            std::os::unix::fs::MetadataExt::ino(&meta),
            meta.modified().ok()?,
            meta.len(),
        );
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == Some(stamp) {
            return None;
        }
        // Unreadable or corrupt: the next commit says so; nothing changes here.
        let set = read_state(&path).ok()?;
        *seen = Some(stamp);
        (set.revision != revision).then_some(set)
    }

    /// The blocking commit, run under `leases.lock`.
    pub fn commit_blocking(
        &self,
        base: u64,
        changes: Vec<LeaseChange>,
    ) -> Result<LeaseSet, StoreError> {
        let _guard = LockGuard::acquire(&self.dir.leases_lock(), self.lock_timeout)?;
        let mut set = read_state(&self.dir.leases())?;
        if set.revision != base {
            return Err(StoreError::Conflict {
                expected: base,
                found: set.revision,
            });
        }
        apply_changes(&mut set, changes)?;
        write_state(&self.dir.leases(), &set)?;
        Ok(set)
    }
}

impl LeaseStore for FileStore {
    async fn load(&mut self) -> Result<LeaseSet, StoreError> {
        let path = self.dir.leases();
        tokio::task::spawn_blocking(move || read_state(&path))
            .await
            .unwrap_or_else(|e| Err(StoreError::Invalid(format!("state reader panicked: {e}"))))
    }

    async fn commit(
        &mut self,
        base: u64,
        changes: Vec<LeaseChange>,
    ) -> Result<LeaseSet, StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.commit_blocking(base, changes))
            .await
            .unwrap_or_else(|e| Err(StoreError::Invalid(format!("state writer panicked: {e}"))))
    }

    async fn changed_since(&mut self, revision: u64) -> Option<LeaseSet> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.changed_since_blocking(revision))
            .await
            .ok()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Endpoint;
    use jiff::Timestamp;
    use std::os::unix::fs::PermissionsExt;

    fn lease(s: &str, port: u16) -> Lease {
        let target = Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: 5901,
        };
        Lease::new(s, port, target, Timestamp::UNIX_EPOCH)
    }

    fn store() -> (tempfile::TempDir, FileStore) {
        let d = tempfile::tempdir().unwrap();
        let dir = StateDir::new(d.path());
        dir.create().unwrap();
        (d, FileStore::new(dir, Duration::from_secs(30)))
    }

    #[test]
    fn another_writers_commit_is_seen_once_and_a_corrupt_file_is_left_to_the_commit() {
        let (_d, mine) = store();
        let set = mine
            .commit_blocking(0, vec![LeaseChange::Put(lease("a", 6100))])
            .unwrap();
        // Its own commit: nothing new.
        assert_eq!(mine.changed_since_blocking(set.revision), None);
        // `vncd cleanup` (another store on the same directory) releases the lease.
        let cleanup = FileStore::new(mine.dir.clone(), Duration::from_secs(30));
        let after = cleanup
            .commit_blocking(set.revision, vec![LeaseChange::Remove("a".into())])
            .unwrap();
        assert_eq!(
            mine.changed_since_blocking(set.revision),
            Some(after.clone())
        );
        assert_eq!(mine.changed_since_blocking(after.revision), None);
        // A corrupt file is not "no leases": it is for the next commit to refuse.
        std::fs::write(mine.dir.leases(), b"{\"version\":1,\"rev").unwrap();
        assert_eq!(mine.changed_since_blocking(after.revision), None);
        assert_eq!(mine.changed_since_blocking(0), None);
    }

    #[test]
    fn a_missing_file_is_empty_and_commits_persist_with_mode_0600() {
        let (_d, s) = store();
        assert_eq!(read_state(&s.dir.leases()).unwrap(), LeaseSet::default());
        let set = s
            .commit_blocking(0, vec![LeaseChange::Put(lease("a", 6100))])
            .unwrap();
        assert_eq!(set.revision, 1);
        let back = read_state(&s.dir.leases()).unwrap();
        assert_eq!(back, set);
        let mode = std::fs::metadata(s.dir.leases())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_stale_revision_is_a_conflict_and_changes_nothing() {
        let (_d, s) = store();
        s.commit_blocking(0, vec![LeaseChange::Put(lease("a", 6100))])
            .unwrap();
        let err = s
            .commit_blocking(0, vec![LeaseChange::Put(lease("b", 6101))])
            .unwrap_err();
        assert!(matches!(
            err,
            StoreError::Conflict {
                expected: 0,
                found: 1
            }
        ));
        assert_eq!(read_state(&s.dir.leases()).unwrap().leases.len(), 1);
    }

    #[test]
    fn a_port_cannot_be_leased_twice() {
        let (_d, s) = store();
        s.commit_blocking(0, vec![LeaseChange::Put(lease("a", 6100))])
            .unwrap();
        let err = s
            .commit_blocking(1, vec![LeaseChange::Put(lease("b", 6100))])
            .unwrap_err();
        assert!(
            err.to_string().contains("port 6100 is already leased"),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_file_is_refused_never_reset() {
        let (_d, s) = store();
        s.commit_blocking(0, vec![LeaseChange::Put(lease("a", 6100))])
            .unwrap();
        let full = std::fs::read(s.dir.leases()).unwrap();
        std::fs::write(s.dir.leases(), &full[..full.len() / 2]).unwrap();
        let err = read_state(&s.dir.leases()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("leases.json") && msg.contains("corrupt"),
            "{msg}"
        );
        // A commit refuses too, and leaves the evidence untouched.
        assert!(
            s.commit_blocking(1, vec![LeaseChange::Remove("a".into())])
                .is_err()
        );
        assert_eq!(
            std::fs::read(s.dir.leases()).unwrap(),
            &full[..full.len() / 2]
        );
        std::fs::write(s.dir.leases(), b"").unwrap();
        assert!(
            read_state(&s.dir.leases()).is_err(),
            "an empty file is not 'no leases'"
        );
    }

    #[test]
    fn duplicate_ports_on_disk_are_refused() {
        let (_d, s) = store();
        let disk = OnDisk {
            version: 1,
            revision: 3,
            leases: vec![lease("a", 6100), lease("b", 6100)],
            expired: BTreeMap::new(),
        };
        std::fs::write(s.dir.leases(), serde_json::to_vec(&disk).unwrap()).unwrap();
        assert!(
            read_state(&s.dir.leases())
                .unwrap_err()
                .to_string()
                .contains("leased twice")
        );
    }

    #[test]
    fn concurrent_writers_never_lease_one_port_twice() {
        let (_d, s) = store();
        let mut handles = Vec::new();
        for w in 0..4 {
            let s = s.clone();
            handles.push(std::thread::spawn(move || {
                let mut won = 0;
                for i in 0..25 {
                    loop {
                        let set = read_state(&s.dir.leases()).unwrap();
                        let port = (6100..7000)
                            .find(|p| set.leases.values().all(|l| l.port != *p))
                            .unwrap();
                        let l = lease(&format!("w{w}-{i}"), port);
                        match s.commit_blocking(set.revision, vec![LeaseChange::Put(l)]) {
                            Ok(_) => {
                                won += 1;
                                break;
                            }
                            Err(StoreError::Conflict { .. }) => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                won
            }));
        }
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        let set = read_state(&s.dir.leases()).unwrap();
        assert_eq!(total, 100);
        assert_eq!(set.leases.len(), 100);
        assert_eq!(set.revision, 100);
    }
}
