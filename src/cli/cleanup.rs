//! `vncd cleanup`: the seed's cleanup daemon, made safe.
//!
//! It runs the same [`plan`] as the controller and keeps only two kinds of action:
//! releasing leases whose session is gone and whose proxy is dead, and ending marked
//! processes that no lease accounts for. It never touches a lease of a session that
//! is still wanted, never treats an unreadable sessions directory as "nothing wanted",
//! and commits with compare-and-swap, so it is safe beside a running `vncd run`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use jiff::Timestamp;
use tracing::{info, warn};

use super::{StateArgs, runtime};
use crate::lease::Lease;
use crate::pool::PortRange;
use crate::reconcile::ProxyState;
use crate::reconcile::{self, Inputs, LeaseOp, Limits, StopOp, StopReason};
use crate::runconfig::{PoolFlags, Recorded, SessionsFlag};
use crate::source::Source;
use crate::source::dir::DirSource;
use crate::source::merge::Merged;
use crate::store::file::{FileStore, StateDir, read_state, write_state};
use crate::store::lock::LockGuard;
use crate::store::{LeaseChange, LeaseSet, StoreError};
use crate::supervisor::relay::RelayView;
use crate::supervisor::websockify::Websockify;
use crate::supervisor::{Supervisor, classify, scan};

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("mode").required(true).args(["once", "interval"]))]
pub struct CleanupArgs {
    #[command(flatten)]
    pub sessions: SessionsFlag,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub pool: PoolFlags,
    /// Sessions of libvirt domains are wanted too: give the URI `vncd run` uses, or a
    /// domain session whose proxy is restarting looks stale and loses its lease.
    #[command(flatten)]
    pub libvirt: super::libvirt::LibvirtArgs,
    /// One pass, then exit.
    #[arg(long)]
    pub once: bool,
    /// Repeat every SECS seconds until SIGTERM.
    #[arg(long, value_name = "SECS")]
    pub interval: Option<u64>,
    /// If the state file is corrupt, move it aside and rebuild it from the proxies that
    /// carry this state directory's marker, and from what the relay of this state
    /// directory serves.
    #[arg(long)]
    pub rebuild_state: bool,
    /// Move every lease outside the pool (left by an earlier `--port-range`) into it now,
    /// even with a console open on it: its proxy is stopped and its lease released, and
    /// `vncd run` leases it a port in the pool (its URL changes). Without this, such a
    /// lease moves by itself once no console is open on it.
    #[arg(long)]
    pub repack: bool,
    /// Seconds between SIGTERM and SIGKILL for orphans.
    #[arg(long, value_name = "SECONDS", value_parser = super::serve::seconds, default_value = "2")]
    pub stop_grace: Duration,
}

/// The sessions directory and pool cleanup judges by: those of the `vncd run` that owns
/// the state directory (see [`crate::runconfig`]). Reading another directory than the
/// controller's would make every session look gone.
#[derive(Debug)]
struct Effective {
    sessions_dir: std::path::PathBuf,
    range: PortRange,
    max_sessions: usize,
}

/// Cleanup rewrites `leases.json` (mode 0600) by renaming a new file over it, so the file
/// then belongs to whoever ran cleanup. Root cleaning up the state directory of a service
/// that runs as another user (the Debian package's `vncd`) would lock that service out of
/// its own leases, so this refuses and says how to run it instead.
fn refuse_foreign_state_dir(root: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(root)
        .with_context(|| format!("cannot read {}", root.display()))?
        .uid();
    if nix::unistd::geteuid().is_root() && owner != 0 {
        let name = nix::unistd::User::from_uid(owner.into())
            .ok()
            .flatten()
            .map_or_else(|| owner.to_string(), |u| u.name);
        anyhow::bail!(
            "state directory {} belongs to {name}, the user vncd runs as; run cleanup as that user (`runuser -u {name} -- vncd cleanup ...`), or the rewritten leases.json would belong to root and vncd could not read it",
            root.display()
        );
    }
    Ok(())
}

/// What one pass did.
#[derive(Debug, Default)]
struct Stats {
    released: usize,
    orphans: usize,
    awaiting_restart: usize,
    stopping: usize,
    /// Leases outside the pool moved in (`--repack`): stopped and released here, leased
    /// again in the pool by `vncd run`.
    repacked: usize,
}

pub fn cleanup(args: CleanupArgs) -> anyhow::Result<ExitCode> {
    let dir = args.state.dir();
    let owner = std::fs::canonicalize(dir.root())
        .with_context(|| format!("state directory {} does not exist", dir.root().display()))?
        .display()
        .to_string();
    refuse_foreign_state_dir(dir.root())?;
    // Cleanup rewrites leases.json and signals processes: the same trust checks as
    // `vncd run` (not writable by others, no symlinks).
    dir.check()?;
    let recorded = Recorded::load(dir.root())?;
    let eff = Effective {
        sessions_dir: recorded.sessions_dir(args.sessions.sessions_dir.clone())?,
        range: recorded.port_range(args.pool.port_range)?,
        max_sessions: recorded.max_sessions(args.pool.max_sessions)?,
    };
    let mut libvirt = args.libvirt.clone();
    libvirt.libvirt_uri = recorded.libvirt(libvirt.libvirt_uri)?;
    if args.rebuild_state {
        rebuild(&dir, &owner)?;
    }
    let grace = args.stop_grace;
    let supervisor = Supervisor::new(
        owner.clone(),
        // Cleanup never starts proxies; the backend only satisfies the type.
        Box::new(Websockify {
            program: "websockify".into(),
            tls: None,
            plugin_dir: None,
        }),
        "127.0.0.1".parse()?,
        None,
        dir.root().join("logs"),
        grace,
    );
    let rt = runtime()?;
    rt.block_on(async {
        let dir_source = DirSource::once(&eff.sessions_dir, eff.range);
        let mut source = libvirt.source_unchecked(dir_source).await?;
        loop {
            match pass(&eff, &mut source, &dir, &owner, &supervisor, args.repack).await {
                Ok(s) => info!(
                    released = s.released,
                    repacked = s.repacked,
                    orphans_ended = s.orphans,
                    awaiting_restart = s.awaiting_restart,
                    left_to_vncd_run = s.stopping,
                    "cleanup pass done"
                ),
                Err(e) if args.once => return Err(e),
                Err(e) => warn!(error = %format!("{e:#}"), "cleanup pass failed; changing nothing"),
            }
            let Some(secs) = args.interval else { break };
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(secs.max(1))) => {}
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn pass(
    eff: &Effective,
    source: &mut Merged<DirSource>,
    dir: &StateDir,
    owner: &str,
    sup: &Supervisor,
    repack: bool,
) -> anyhow::Result<Stats> {
    let store = FileStore::new(dir.clone(), Duration::from_secs(10));
    for _attempt in 0..5 {
        // Leases first, then the desired sessions: a session created in between is then
        // desired without a lease here, never a lease without a desire (which would read
        // as "session gone" and be released under the controller that just leased it).
        let set = read_state(&dir.leases())?;
        let snapshot = source.snapshot().await?;
        let marked = scan(owner);
        let mut obs = classify(marked, &set.leases);
        // Sessions of the relay (`vncd run --relay`) are live too, with the relay as their
        // process: they have none of their own for the scan to find.
        let relay = RelayView::ask(&dir.relay_socket(), &set.leases);
        if let Some(process) = relay.relay {
            for (session, (listening, clients)) in &relay.sessions {
                obs.proxies.insert(
                    session.clone(),
                    ProxyState::Running {
                        process,
                        listening: *listening,
                        age_ms: u64::MAX,
                    },
                );
                obs.clients.insert(session.clone(), *clients);
            }
        }
        let no_clients = BTreeMap::new();
        let plan = reconcile::plan(&Inputs {
            desired: &snapshot.desired,
            protected: &snapshot.protected,
            leases: &set.leases,
            proxies: &obs.proxies,
            orphans: &obs.orphans,
            busy: &BTreeSet::new(),
            restarts: &BTreeMap::new(),
            expired: &set.expired,
            idle_ms: &BTreeMap::new(),
            // With --repack, as if no console were open: leases outside the pool move now.
            clients: if repack { &no_clients } else { &obs.clients },
            targets: &obs.targets,
            // Cleanup replaces nothing: `vncd run` judges its own settings.
            stale: &BTreeSet::new(),
            wall_now: Timestamp::now(),
            boot_now: crate::clock::BootInstant::now(),
            limits: Limits {
                range: eff.range,
                max_sessions: eff.max_sessions,
                start_timeout_ms: u64::MAX,
                max_starting: usize::MAX,
            },
            now_ms: 0,
        });
        let mut stats = Stats::default();
        let mut releases = Vec::new();
        // Only the safe actions: releases of gone sessions whose proxy is dead, and ending
        // orphans. Every other kind is counted or left to `vncd run`, by name, so a new
        // kind of action must be placed here before this compiles.
        let staged = plan.staged();
        for op in &staged.lease_ops {
            match op {
                LeaseOp::Release { session, port } if !snapshot.desired.contains_key(session) => {
                    info!(session = %session, port, "releasing stale lease (session gone, proxy dead)");
                    releases.push(LeaseChange::Remove(session.clone()));
                }
                LeaseOp::Release { session, port } if repack && !eff.range.contains(*port) => {
                    info!(session = %session, port, "releasing lease outside the pool (--repack)");
                    releases.push(LeaseChange::Remove(session.clone()));
                    stats.repacked += 1;
                }
                LeaseOp::Release { .. }
                | LeaseOp::Lease { .. }
                | LeaseOp::Retarget { .. }
                | LeaseOp::Record { .. }
                | LeaseOp::Expire { .. }
                | LeaseOp::Unexpire { .. } => {}
            }
        }
        for op in &staged.stops {
            match op {
                StopOp::Orphan { process } => {
                    if sup.stop(*process).await {
                        warn!(pid = process.pid, "ended orphaned proxy");
                        stats.orphans += 1;
                    }
                }
                StopOp::Session {
                    session,
                    process,
                    why: StopReason::OutsidePool,
                } if repack && relay.relay == Some(*process) => {
                    // The relay serves every session: it is never stopped for one. The
                    // release alone moves the session: `vncd run` sees leases.json change,
                    // takes the session off the relay and leases it a port in the pool.
                    info!(session = %session, "releasing relay session outside the pool (--repack)");
                    releases.push(LeaseChange::Remove(session.clone()));
                    stats.repacked += 1;
                }
                StopOp::Session {
                    session,
                    process,
                    why: StopReason::OutsidePool,
                } if repack => {
                    // Stopped now, released with this commit: its proxy is provably gone.
                    if sup.stop(*process).await {
                        info!(session = %session, pid = process.pid, "stopped proxy outside the pool (--repack)");
                        releases.push(LeaseChange::Remove(session.clone()));
                        stats.repacked += 1;
                    }
                }
                StopOp::Session { .. } => stats.stopping += 1,
            }
        }
        stats.awaiting_restart += staged.starts.len();
        if releases.is_empty() {
            return Ok(stats);
        }
        stats.released = releases.len();
        let gone: Vec<String> = releases
            .iter()
            .filter_map(|c| match c {
                LeaseChange::Remove(session) => Some(session.clone()),
                _ => None,
            })
            .collect();
        let store = store.clone();
        let base = set.revision;
        match tokio::task::spawn_blocking(move || store.commit_blocking(base, releases)).await? {
            Ok(_) => {
                // As `vncd run` does at release: the session's key, used-ticket records,
                // counters and log go with its lease.
                for session in &gone {
                    sup.forget(session);
                }
                return Ok(stats);
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("the leases kept changing underneath cleanup; try again")
}

/// The revision a rebuilt state file starts at: one past the corrupt file's, if its
/// `"revision"` can still be read; otherwise the current Unix time in seconds, which is
/// past any revision a state file reaches by counting commits.
fn next_revision(corrupt: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(corrupt);
    let found = text.find("\"revision\"").and_then(|at| {
        let rest = text[at + "\"revision\"".len()..].trim_start();
        let digits: String = rest
            .strip_prefix(':')?
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse::<u64>().ok()
    });
    let clock = u64::try_from(Timestamp::now().as_second()).unwrap_or(u64::MAX);
    found.map_or(clock, |r| r.saturating_add(1))
}

/// Rebuilds a corrupt state file from the proxies that prove they are ours, and from the
/// relay on the state directory's socket.
fn rebuild(dir: &StateDir, owner: &str) -> anyhow::Result<()> {
    let _guard = LockGuard::acquire(&dir.leases_lock(), Duration::from_secs(10))?;
    match read_state(&dir.leases()) {
        Ok(_) => {
            info!("state file is readable; nothing to rebuild");
            return Ok(());
        }
        Err(StoreError::Corrupt { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let aside = dir.root().join(format!(
        "leases.json.corrupt-{}",
        Timestamp::now().as_second()
    ));
    std::fs::rename(dir.leases(), &aside)
        .with_context(|| format!("cannot move {} aside", dir.leases().display()))?;
    warn!(kept_as = %aside.display(), "moved the corrupt state file aside");
    let mut set = LeaseSet::default();
    let mut ports = BTreeSet::new();
    for m in scan(owner).into_iter().filter(|m| m.process.pid == m.pgid) {
        let (Some(port), Some(target)) = (m.port, m.target.as_deref().and_then(|t| t.parse().ok()))
        else {
            continue;
        };
        if set.leases.contains_key(&m.session) || !ports.insert(port) {
            continue; // a second claimant becomes an orphan on the next pass
        }
        let lease = Lease {
            session: m.session.clone(),
            port,
            target,
            uid: m.lease.clone(),
            process: Some(m.process),
            allocated_at: Timestamp::now(),
            allocated_boot: crate::clock::BootInstant::now(),
        };
        info!(session = %m.session, port, pid = m.process.pid, "rebuilt lease from running proxy");
        set.leases.insert(m.session, lease);
    }
    // Sessions of the relay (`vncd run --relay`) have no process of their own: the relay
    // says what it serves.
    for lease in crate::supervisor::relay::served_leases(&dir.relay_socket()) {
        if set.leases.contains_key(&lease.session) || !ports.insert(lease.port) {
            continue;
        }
        info!(session = %lease.session, port = lease.port, "rebuilt lease from the relay");
        set.leases.insert(lease.session.clone(), lease);
    }
    // Continue the revision, so a commit planned against any earlier state is refused
    // (compare-and-swap) rather than accepted against a reset counter.
    set.revision = next_revision(&std::fs::read(&aside).unwrap_or_default());
    write_state(&dir.leases(), &set)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::next_revision;

    #[test]
    fn a_rebuilt_state_file_continues_the_revision() {
        assert_eq!(
            next_revision(br#"{"version":1,"revision":41,"leases":[{"sess"#),
            42
        );
        assert_eq!(next_revision(br#"{"revision" : 7 }garbage"#), 8);
        // Unreadable: the clock, far past any counted revision.
        assert!(next_revision(b"\x00\x01 not json") > 1_000_000_000);
    }
}
