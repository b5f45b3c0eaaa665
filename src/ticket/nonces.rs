//! Used-ticket stores: what makes a ticket single-use, in memory (one process) or as one
//! `O_EXCL` file per ticket (processes that fork per connection, and restarts).

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nix::fcntl::OFlag;

use super::format::{NONCE_B64_LEN, parse_decimal};
use super::{NONCE_LEN, PRUNE_GRACE_SECS, TicketError, Verified};

/// Unix seconds now; 0 if the clock is before 1970 (tickets minted then expire at once
/// on any sane clock, which fails closed).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where a nonce store reads the time: the system clock, or a test's.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock as a [`Clock`].
pub fn system_clock() -> Clock {
    Arc::new(unix_now)
}

/// Remembers which tickets were used, so each is accepted once.
pub trait NonceStore: Send + Sync {
    /// Records the use of a verified ticket. `Ok` the first time; [`TicketError::Replayed`]
    /// after that; [`TicketError::Expired`] if the ticket expired by the time it was recorded
    /// (this store's clock, read after recording); [`TicketError::NonceStore`] if the record
    /// cannot be written (the ticket is then refused).
    fn consume(&self, ticket: &Verified) -> Result<(), TicketError>;
}

/// An in-process nonce store, for a proxy that is a single process (the builtin proxy).
/// It forgets a nonce [`PRUNE_GRACE_SECS`] after its ticket expired, so it holds at most
/// the tickets used in one TTL plus the grace.
pub struct MemoryNonces {
    used: Mutex<BTreeSet<(u64, [u8; NONCE_LEN])>>,
    clock: Clock,
}

impl fmt::Debug for MemoryNonces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryNonces")
            .field("remembered", &self.len())
            .finish()
    }
}

impl Default for MemoryNonces {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryNonces {
    pub fn new() -> Self {
        Self::with_clock(system_clock())
    }

    pub fn with_clock(clock: Clock) -> Self {
        MemoryNonces {
            used: Mutex::new(BTreeSet::new()),
            clock,
        }
    }

    /// How many used tickets are remembered.
    pub fn len(&self) -> usize {
        self.used.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl NonceStore for MemoryNonces {
    fn consume(&self, ticket: &Verified) -> Result<(), TicketError> {
        // A poisoned lock still holds a consistent set (every operation on it is one call).
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        // Read under the lock: nothing can prune between this check and the insert.
        let now = (self.clock)();
        if now >= ticket.expires_at {
            return Err(TicketError::Expired);
        }
        if let Some(limit) = now.checked_sub(PRUNE_GRACE_SECS) {
            // Keep entries whose expiry is after `limit`; ordered by expiry, so one split.
            *used = used.split_off(&(limit + 1, [0u8; NONCE_LEN]));
        }
        if used.insert((ticket.expires_at, ticket.nonce)) {
            Ok(())
        } else {
            Err(TicketError::Replayed)
        }
    }
}

/// A nonce store of one file per used ticket in a directory, for proxies that fork per
/// connection (websockify with contrib/websockify/vncd_ticket.py, which uses the same
/// names). The file `EXPIRY.NONCE` (NONCE in base64url, as in the ticket) is created with
/// `O_CREAT|O_EXCL`, which the kernel makes atomic: of two connections with one ticket,
/// exactly one creates it. Files are not synced: single use across a power loss within
/// one TTL is not worth a disk flush per connection.
#[derive(Clone)]
pub struct DirNonces {
    dir: PathBuf,
    clock: Clock,
}

impl fmt::Debug for DirNonces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirNonces").field("dir", &self.dir).finish()
    }
}

impl DirNonces {
    /// A store in `dir`, which must exist (vncd creates it 0700 beside the key file).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self::with_clock(dir, system_clock())
    }

    pub fn with_clock(dir: impl Into<PathBuf>, clock: Clock) -> Self {
        DirNonces {
            dir: dir.into(),
            clock,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file name recording the use of `ticket`.
    pub fn file_name(ticket: &Verified) -> String {
        format!(
            "{}.{}",
            ticket.expires_at,
            URL_SAFE_NO_PAD.encode(ticket.nonce)
        )
    }

    /// Removes the records of tickets that expired at least [`PRUNE_GRACE_SECS`] ago;
    /// returns how many. Files of other names are left alone.
    pub fn prune(&self) -> io::Result<usize> {
        let now = (self.clock)();
        let Some(limit) = now.checked_sub(PRUNE_GRACE_SECS) else {
            return Ok(0);
        };
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some((expiry, nonce)) = name.to_str().and_then(|n| n.split_once('.')) else {
                continue;
            };
            let ours = nonce.len() == NONCE_B64_LEN && URL_SAFE_NO_PAD.decode(nonce).is_ok();
            match parse_decimal(expiry) {
                Some(e) if ours && e <= limit => match fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    // A concurrent pruner got it first.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                },
                _ => {}
            }
        }
        Ok(removed)
    }
}

impl NonceStore for DirNonces {
    fn consume(&self, ticket: &Verified) -> Result<(), TicketError> {
        let path = self.dir.join(Self::file_name(ticket));
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
            .open(&path);
        match created {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(TicketError::Replayed);
            }
            Err(source) => {
                return Err(TicketError::NonceStore {
                    path: self.dir.clone(),
                    source,
                });
            }
        }
        // After recording: if a pruner could have removed an earlier record of this ticket,
        // the ticket has expired by now, so a replay that raced the pruner is refused here.
        if (self.clock)() >= ticket.expires_at {
            return Err(TicketError::Expired);
        }
        // Pruning is housekeeping: a failure must not refuse a good ticket, and the next
        // consume tries again.
        let _ = self.prune();
        Ok(())
    }
}
