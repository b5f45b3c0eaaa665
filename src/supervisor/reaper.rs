//! vncd as a child subreaper, and the reaper of the orphans that brings it.
//!
//! In a container vncd is often PID 1, which inherits every orphaned process; and
//! everywhere, a proxy that dies leaves its per-connection children (websockify forks one
//! per client) orphaned. As a child subreaper (prctl PR_SET_CHILD_SUBREAPER) vncd gets
//! those orphans instead of the host's init, so it sees them and they stay in its
//! cgroup and process tree; and it must then reap them, or each one that exits stays a
//! zombie for as long as vncd runs.
//!
//! Reaping must not steal an exit status somebody waits for: the supervisor waits for
//! each proxy it spawned (tokio's `Child::wait`, which reports why a proxy ended). So on
//! every SIGCHLD (and every [`SWEEP_EVERY`] in case signals coalesced) this reaps only
//! zombie children that the supervisor does not track and that are not in vncd's own
//! process group (a child spawned by a library inside vncd, e.g. libvirt's ssh, stays
//! in vncd's group and is waited for by its spawner). Proxies lead process groups of
//! their own, so their orphaned children are never in vncd's group. The supervisor
//! registers each proxy under the same lock it holds while spawning, so a proxy that
//! exits at once is never mistaken for an orphan.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::{Pid, getpgrp, getpid};
use tokio::signal::unix::{SignalKind, signal};

use super::procfs;

/// A sweep without a signal, in case SIGCHLDs were merged or missed.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The pids the supervisor waits for itself.
pub type Tracked = Arc<Mutex<BTreeMap<i32, bool>>>;

/// Makes this process a child subreaper and reaps untracked zombie children in the
/// background. Must be called inside a tokio runtime. A failing prctl is logged, not
/// fatal: vncd works without it, orphans then go to init as before.
pub fn start(tracked: Tracked) {
    match nix::sys::prctl::set_child_subreaper(true) {
        Ok(()) => tracing::debug!("vncd is a child subreaper: orphaned proxy children come to it"),
        Err(e) => tracing::warn!(error = %e, "cannot become a child subreaper"),
    }
    let sigchld = signal(SignalKind::child());
    crate::task::spawn(tracing::info_span!("reaper"), async move {
        let mut sigchld = match sigchld {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGCHLD; reaping orphans every 30 s");
                None
            }
        };
        loop {
            let reaped = reap(&tracked);
            if reaped > 0 {
                tracing::debug!(reaped, "reaped orphaned children");
            }
            tokio::select! {
                Some(()) = async { sigchld.as_mut()?.recv().await } => {}
                () = tokio::time::sleep(SWEEP_EVERY) => {}
            }
        }
    });
}

/// Reaps every zombie child that nobody in vncd waits for; returns how many.
pub fn reap(tracked: &Tracked) -> usize {
    let me = getpid().as_raw();
    let my_group = getpgrp().as_raw();
    // Held while reaping: the supervisor spawns and registers a proxy under this lock.
    let Ok(tracked) = tracked.lock() else {
        return 0;
    };
    let mut reaped = 0;
    for pid in procfs::pids() {
        let Some(st) = procfs::stat(pid) else {
            continue;
        };
        if st.ppid != me || st.is_alive() || st.pgid == my_group || tracked.contains_key(&pid) {
            continue;
        }
        if waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)).is_ok() {
            reaped += 1;
        }
    }
    reaped
}
