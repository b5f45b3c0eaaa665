//! Advisory file locks on the state directory.
//!
//! Two locks, two jobs: `vncd.lock` is held by `vncd run` for its whole life, so a second
//! controller on the same state directory waits or refuses; `leases.lock` is held only
//! for the length of one read-modify-write of the state file, so `vncd cleanup` and
//! `vncd run` can both change leases without ever interleaving.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another process{holder} holds the lock {}; gave up after {waited:?}. Is another `vncd run` using this state directory?",
        path.display()
    )]
    Timeout {
        path: PathBuf,
        holder: String,
        waited: Duration,
    },
    #[error("cannot open lock file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An exclusive lock, released on drop (or when the process dies, even by SIGKILL).
#[derive(Debug)]
pub struct LockGuard {
    file: File,
}

impl LockGuard {
    /// Takes the exclusive lock on `path`, waiting up to `timeout`.
    pub fn acquire(path: &Path, timeout: Duration) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // Never lock (or create) through a symlink planted in the state directory.
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
            .map_err(io)?;
        let start = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(LockGuard { file }),
                Err(TryLockError::WouldBlock) if start.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(LockError::Timeout {
                        path: path.to_owned(),
                        holder: holder_of(path)
                            .map(|p| format!(" (pid {p})"))
                            .unwrap_or_default(),
                        waited: timeout,
                    });
                }
                Err(TryLockError::Error(e)) => return Err(io(e)),
            }
        }
    }

    /// Writes our pid into the lock file so a refused second process can name the holder.
    pub fn record_pid(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        writeln!(self.file, "{}", std::process::id())
    }
}

/// The pid recorded in a lock file, if any.
pub fn holder_of(path: &Path) -> Option<u32> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// True if someone holds the lock on `path` right now.
pub fn is_held(path: &Path) -> bool {
    match File::open(path) {
        Ok(f) => matches!(f.try_lock(), Err(TryLockError::WouldBlock)),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_times_out_with_a_message_naming_the_file_and_pid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vncd.lock");
        let mut g = LockGuard::acquire(&p, Duration::ZERO).unwrap();
        g.record_pid().unwrap();
        assert!(is_held(&p));
        let err = LockGuard::acquire(&p, Duration::from_millis(30)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("vncd.lock"), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(g);
        assert!(!is_held(&p));
        LockGuard::acquire(&p, Duration::ZERO).unwrap();
    }
}
