//! Stage 4, act: end orphans and unwanted proxies, then start what is missing.
//!
//! Only persisted leases are acted on: the persist stage ran first, and starts read the
//! committed lease set.

use std::collections::BTreeSet;
use std::time::Instant;

use futures::future::join_all;
use tracing::{error, info, info_span, warn};

use super::Controller;
use crate::lease::Lease;
use crate::reconcile::{Staged, StopOp, StopReason};
use crate::source::Source;
use crate::status::StatusSink;
use crate::store::{LeaseChange, LeaseStore};

/// What the act stage did, for the report stage and the metrics.
#[derive(Debug, Default)]
pub(super) struct Acted {
    /// Sessions whose proxy was started this pass.
    pub started: BTreeSet<String>,
    /// Sessions whose proxy was stopped this pass.
    pub stopped: BTreeSet<String>,
    pub orphans_reaped: usize,
    pub spawn_ms: u64,
    /// Something was stopped or started: pass again soon.
    pub changed: bool,
}

impl<S: Source, L: LeaseStore, R: StatusSink> Controller<S, L, R> {
    pub(super) async fn act(&mut self, staged: &Staged, now_ms: u64) -> Acted {
        let mut acted = Acted::default();
        self.stop_all(&staged.stops, &mut acted).await;
        self.start_all(&staged.starts, now_ms, &mut acted).await;
        acted
    }

    /// While the lease store cannot be written: start nothing and release nothing, but
    /// stop what must not keep serving (proxies of deleted or expired sessions, orphans),
    /// so a full or read-only state filesystem does not keep deleted consoles open or
    /// suspend `maxLifetimeSeconds`. Their releases are planned again every pass.
    pub(super) async fn act_while_store_fails(&mut self, staged: &Staged) {
        let safe: Vec<StopOp> = staged
            .stops
            .iter()
            .filter(|op| match op {
                StopOp::Orphan { .. } => true,
                StopOp::Session { why, .. } => {
                    matches!(why, StopReason::Removed | StopReason::Expired)
                }
            })
            .cloned()
            .collect();
        let mut acted = Acted::default();
        self.stop_all(&safe, &mut acted).await;
    }

    /// Stops proxies and orphans, all at once (each waits out its own grace period).
    async fn stop_all(&mut self, stops: &[StopOp], acted: &mut Acted) {
        let mut ending = Vec::with_capacity(stops.len());
        for op in stops {
            let (process, orphan, session) = match op {
                StopOp::Orphan { process } => {
                    warn!(pid = process.pid, "ending orphaned proxy of ours");
                    (*process, true, None)
                }
                StopOp::Session {
                    session,
                    process,
                    why,
                } => {
                    info!(session = %session, pid = process.pid, reason = ?why, "stopping proxy");
                    if *why == StopReason::NotListening {
                        self.note_start_timeout(session, process.pid);
                    }
                    acted.stopped.insert(session.clone());
                    (*process, false, Some(session.clone()))
                }
            };
            ending.push((process, orphan, session));
        }
        acted.changed |= !ending.is_empty();
        let supervisor = &self.supervisor;
        let ended = join_all(
            ending
                .into_iter()
                .map(|(process, orphan, session)| async move {
                    let ended = match &session {
                        Some(s) => supervisor.stop_session(s, process).await,
                        None => supervisor.stop(process).await,
                    };
                    (ended, orphan)
                }),
        )
        .await;
        for (ended, orphan) in ended {
            if ended && orphan {
                acted.orphans_reaped += 1;
                self.metrics.orphan_reaped();
            }
        }
    }

    /// Remembers why a proxy that never listened is being replaced, for its status.
    fn note_start_timeout(&mut self, session: &str, pid: i32) {
        let port = self.leases.leases.get(session).map_or(0, |l| l.port);
        let tail = self.supervisor.last_log_line(session).unwrap_or_default();
        self.memory
            .restarts
            .entry(session.to_owned())
            .or_default()
            .last_error = Some(format!(
            "proxy pid {pid} did not listen on port {port} within {} ms: {tail}",
            self.config.limits.start_timeout_ms
        ));
    }

    /// Starts the proxies of persisted leases, then records their pids in the store.
    async fn start_all(&mut self, sessions: &[String], now_ms: u64, acted: &mut Acted) {
        let leases: Vec<Lease> = sessions
            .iter()
            .filter_map(|s| self.leases.leases.get(s).cloned())
            .collect();
        let spawn_started = Instant::now();
        let spawned = self.supervisor.spawn_all(&leases);
        acted.spawn_ms = spawn_started.elapsed().as_millis() as u64;
        let mut records = Vec::new();
        for (lease, result) in leases.into_iter().zip(spawned) {
            let _span = info_span!("spawn", session = %lease.session).entered();
            let r = self
                .memory
                .restarts
                .entry(lease.session.clone())
                .or_default();
            r.starts += 1;
            r.last_start_ms = now_ms;
            match result {
                Ok(process) => {
                    info!(port = lease.port, pid = process.pid, target = %lease.target, "started proxy");
                    self.metrics.proxy_started(lease.process.is_some());
                    acted.started.insert(lease.session.clone());
                    records.push(LeaseChange::Put(Lease {
                        process: Some(process),
                        ..lease
                    }));
                }
                Err(e) => {
                    error!(error = %e, "cannot start proxy");
                    self.metrics.proxy_start_failed();
                    self.metrics.error("spawn", e.metric_label());
                    r.last_error = Some(e.to_string());
                }
            }
        }
        if !records.is_empty() {
            self.commit(records).await;
            acted.changed = true;
        }
    }
}
