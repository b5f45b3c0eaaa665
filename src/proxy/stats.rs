//! Per-session counters of `vncd proxy`, published as a tiny JSON file for the controller.
//!
//! The data path only does relaxed atomic adds (one per frame or read); a writer task
//! rewrites the stats file (temp file + rename, mode 0600, no fsync: these are metrics,
//! not state) when a websocket session opens, closes or is refused (at most every
//! [`MIN_GAP`]), and every [`WRITE_EVERY`] while a session is open and bytes move. A proxy
//! without clients has no timer at all. `vncd run`'s `/metrics` reads the files at scrape
//! time, so a scrape costs the proxies nothing.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tracing::warn;

/// How often changed counters are written without an open or close to trigger it.
pub const WRITE_EVERY: Duration = Duration::from_secs(2);
/// The least time between two writes, so a burst of connections costs one write.
const MIN_GAP: Duration = Duration::from_millis(200);
/// A stats file larger than this is not ours (the reader's bound).
pub const MAX_BYTES: u64 = 4096;

/// The live counters, shared by every connection of the process.
#[derive(Debug, Default)]
pub struct Counters {
    /// Websocket sessions bridged to the VNC target (after token and Origin checks).
    connections: AtomicU64,
    /// Websocket sessions open now. Only sessions that passed the token and Origin checks
    /// (and reached the target) count: a client that merely holds a TCP connection open,
    /// or keeps failing the token check, is not activity (see [`authenticated_clients`]).
    active: AtomicU64,
    /// Websocket upgrades refused (bad ticket, Origin, malformed upgrade).
    refused: AtomicU64,
    /// Of those, refused for their ticket: missing, malformed or forged; expired; used.
    ticket_invalid: AtomicU64,
    ticket_expired: AtomicU64,
    ticket_replayed: AtomicU64,
    to_target: AtomicU64,
    to_client: AtomicU64,
    /// Unix seconds of the last activity: client input (bytes to the target) or a new
    /// websocket session; 0 before any. The relay reports it and ends idle sessions by it.
    last_activity: AtomicU64,
    changed: Notify,
}

impl Counters {
    pub fn opened(&self) {
        self.touch();
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    pub fn closed(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// A refusal for the ticket (counted in [`Counters::refused`] as well).
    pub fn ticket_refused(&self, reason: TicketRefusal) {
        let c = match reason {
            TicketRefusal::Invalid => &self.ticket_invalid,
            TicketRefusal::Expired => &self.ticket_expired,
            TicketRefusal::Replayed => &self.ticket_replayed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn to_target(&self, n: usize) {
        self.to_target.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    fn touch(&self) {
        self.last_activity
            .store(crate::ticket::unix_now(), Ordering::Relaxed);
    }

    /// Unix seconds of the last client input or new session, 0 before any.
    pub fn last_activity(&self) -> u64 {
        self.last_activity.load(Ordering::Relaxed)
    }

    pub fn to_client(&self, n: usize) {
        self.to_client.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            pid: std::process::id(),
            connections: self.connections.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            ticket_invalid: self.ticket_invalid.load(Ordering::Relaxed),
            ticket_expired: self.ticket_expired.load(Ordering::Relaxed),
            ticket_replayed: self.ticket_replayed.load(Ordering::Relaxed),
            bytes_to_target: self.to_target.load(Ordering::Relaxed),
            bytes_to_client: self.to_client.load(Ordering::Relaxed),
        }
    }
}

/// The stats file's content. Counters start at zero with each proxy process; `pid` lets
/// a reader ignore a file left by an earlier process of the same session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub pid: u32,
    pub connections: u64,
    pub active: u64,
    pub refused: u64,
    #[serde(default)]
    pub ticket_invalid: u64,
    #[serde(default)]
    pub ticket_expired: u64,
    #[serde(default)]
    pub ticket_replayed: u64,
    pub bytes_to_target: u64,
    pub bytes_to_client: u64,
}

/// Why a ticket was refused, as counted: the label of `vncd_proxy_ticket_refusals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketRefusal {
    /// Missing, malformed, or its signature does not verify (forged, or for another lease).
    Invalid,
    Expired,
    /// Used before.
    Replayed,
}

impl TicketRefusal {
    pub fn label(self) -> &'static str {
        match self {
            TicketRefusal::Invalid => "invalid",
            TicketRefusal::Expired => "expired",
            TicketRefusal::Replayed => "replayed",
        }
    }
}

impl Snapshot {
    /// Reads a stats file; `None` if it is missing, too large or not a stats file.
    ///
    /// The stats directory may be writable by the proxies' user (`--proxy-user`), which is
    /// less trusted than vncd: a symlink (O_NOFOLLOW), a FIFO (O_NONBLOCK, which would
    /// otherwise block the reader forever) or a device is refused, never followed.
    pub fn read(path: &Path) -> Option<Snapshot> {
        use std::io::Read;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(path)
            .ok()?;
        if !f.metadata().ok()?.is_file() {
            return None;
        }
        let mut buf = Vec::new();
        f.take(MAX_BYTES).read_to_end(&mut buf).ok()?;
        serde_json::from_slice(&buf).ok()
    }
}

/// Websocket sessions that passed the token check and are open now, as the proxy `pid`
/// last published them in its stats file; `None` if the file is missing, unreadable or
/// left by another process (then the caller must fall back to another measure).
///
/// This is what idle expiry should count: an established TCP connection alone (what
/// `/proc/net/tcp` shows) can be anyone's, e.g. an unauthenticated client keeping a
/// session from ever expiring.
pub fn authenticated_clients(path: &Path, pid: u32) -> Option<u64> {
    Snapshot::read(path)
        .filter(|s| s.pid == pid)
        .map(|s| s.active)
}

/// Replaces `path` with `snap` (temp file + rename, mode 0600).
pub fn write(path: &Path, snap: &Snapshot) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(snap).map_err(std::io::Error::other)?;
    let tmp = tmp_path(path);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// Writes the stats file at start, on opens, closes and refusals (at most every
/// [`MIN_GAP`]) and every [`WRITE_EVERY`] while a session is open, until `stop` turns true.
pub async fn writer(path: PathBuf, counters: Arc<Counters>, mut stop: watch::Receiver<bool>) {
    let mut last = None;
    let mut warned = false;
    let mut flush = |last: &mut Option<Snapshot>| {
        let snap = counters.snapshot();
        if *last == Some(snap) {
            return;
        }
        match write(&path, &snap) {
            Ok(()) => *last = Some(snap),
            Err(e) if !warned => {
                warned = true;
                warn!(path = %path.display(), error = %e, "cannot write stats file");
            }
            Err(_) => {}
        }
    };
    let mut wrote;
    loop {
        flush(&mut last);
        wrote = tokio::time::Instant::now();
        // Bytes move only while a session is open; otherwise wait for an event.
        let open = last.is_none_or(|s| s.active > 0);
        let tick = async {
            if open {
                tokio::time::sleep(WRITE_EVERY).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = counters.changed.notified() => {}
            () = tick => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        // Coalesce bursts, but publish the first event after a quiet spell at once: the
        // controller reads "no console open" from this file before it moves a lease (a
        // pool change), so a fresh console must not stay invisible for MIN_GAP.
        let since = wrote.elapsed();
        if since < MIN_GAP {
            tokio::select! {
                () = tokio::time::sleep(MIN_GAP - since) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
    }
}

/// The final write, after every connection has ended.
pub fn write_final(path: &Path, counters: &Counters) {
    let _ = write(path, &counters.snapshot());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm1.json");
        let c = Counters::default();
        c.opened();
        c.to_client(12);
        c.to_target(3);
        c.refused();
        c.opened();
        c.closed();
        write(&path, &c.snapshot()).unwrap();
        let s = Snapshot::read(&path).unwrap();
        assert_eq!(
            s,
            Snapshot {
                pid: std::process::id(),
                connections: 2,
                active: 1,
                refused: 1,
                ticket_invalid: 0,
                ticket_expired: 0,
                ticket_replayed: 0,
                bytes_to_target: 3,
                bytes_to_client: 12,
            }
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // No temp file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        std::fs::write(&path, b"not json").unwrap();
        assert_eq!(Snapshot::read(&path), None);
        assert_eq!(Snapshot::read(&dir.path().join("missing.json")), None);
    }

    /// An open after a quiet spell is published without waiting out MIN_GAP: on paused
    /// time the clock stands still unless every task sleeps, so the file must show the
    /// open after a few yields, with no time passing.
    #[tokio::test(start_paused = true)]
    async fn an_open_after_a_quiet_spell_is_published_without_delay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm1.json");
        let c = Arc::new(Counters::default());
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(writer(path.clone(), c.clone(), rx));
        tokio::time::sleep(MIN_GAP * 2).await;
        assert_eq!(Snapshot::read(&path).map(|s| s.connections), Some(0));
        let before = tokio::time::Instant::now();
        c.opened();
        let mut seen = false;
        for _ in 0..100 {
            tokio::task::yield_now().await;
            if Snapshot::read(&path).is_some_and(|s| s.connections == 1) {
                seen = true;
                break;
            }
        }
        assert!(seen, "the open was not written before MIN_GAP passed");
        assert_eq!(tokio::time::Instant::now(), before, "time passed");
        tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn the_writer_publishes_opens_at_once_and_a_final_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm1.json");
        let c = Arc::new(Counters::default());
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(writer(path.clone(), c.clone(), rx));
        let read = |want: u64| {
            let path = path.clone();
            async move {
                for _ in 0..100 {
                    if Snapshot::read(&path).is_some_and(|s| s.connections == want) {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                false
            }
        };
        assert!(read(0).await, "written at start");
        c.opened();
        assert!(read(1).await, "written on open, well before WRITE_EVERY");
        c.to_client(5);
        // An open session's bytes are written within WRITE_EVERY without any event.
        let mut written = false;
        for _ in 0..150 {
            if Snapshot::read(&path).is_some_and(|s| s.bytes_to_client == 5) {
                written = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(written, "bytes of an open session written by the timer");
        c.closed();
        c.refused();
        let mut written = false;
        for _ in 0..100 {
            if Snapshot::read(&path).is_some_and(|s| s.refused == 1 && s.active == 0) {
                written = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(written, "a close and a refusal written at once");
        c.to_target(7);
        tx.send(true).unwrap();
        task.await.unwrap();
        write_final(&path, &c);
        assert_eq!(Snapshot::read(&path).unwrap().bytes_to_target, 7);
    }
}
