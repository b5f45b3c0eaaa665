//! Stage 3, persist: lease changes are committed before anything acts on them.

use std::collections::BTreeMap;
use std::time::Instant;

use jiff::Timestamp;
use tracing::{debug, error, info};

use super::Controller;
use crate::lease::{Expiry, Lease};
use crate::metrics;
use crate::net::can_bind;
use crate::reconcile::{LeaseOp, Reason};
use crate::source::{Snapshot, Source};
use crate::status::StatusSink;
use crate::store::{LeaseChange, LeaseStore, StoreError};

/// How the persist stage went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Persisted {
    /// Committed (or nothing to commit). `changed`: the lease set moved or a port probe
    /// failed, so the next pass should come soon.
    Done { changed: bool },
    /// Someone else changed the store (the leases were reloaded): plan again.
    Retry,
    /// The store cannot be written: nothing may be started or released; proxies that must
    /// not keep running (deleted or expired sessions) may still be stopped.
    Failed,
}

/// How a commit went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Commit {
    Done,
    /// Someone else changed the store; reloaded, plan again.
    Conflict,
    Failed,
}

/// What one lease operation asks of the store.
#[derive(Debug)]
enum Change {
    Write(LeaseChange),
    /// Nothing: the session or lease it names is gone since the plan.
    Nothing,
    /// A new lease's port failed its bind probe: skipped for a while, the session waits.
    PortBusy,
}

impl From<Option<LeaseChange>> for Change {
    fn from(c: Option<LeaseChange>) -> Self {
        c.map_or(Change::Nothing, Change::Write)
    }
}

impl<S: Source, L: LeaseStore, R: StatusSink> Controller<S, L, R> {
    pub(super) async fn persist(&mut self, snapshot: &Snapshot, ops: &[LeaseOp]) -> Persisted {
        let mut probe_failed = false;
        let mut changes: Vec<LeaseChange> = ops
            .iter()
            .filter_map(|op| match self.change_for(snapshot, op) {
                Change::Write(c) => Some(c),
                Change::Nothing => None,
                Change::PortBusy => {
                    probe_failed = true;
                    None
                }
            })
            .collect();
        changes.extend(self.unpersisted_expiries(&changes));
        if changes.is_empty() {
            return Persisted::Done {
                changed: probe_failed,
            };
        }
        let before = self.leases.leases.clone();
        let new_leases = changes
            .iter()
            .filter(|c| matches!(c, LeaseChange::Put(l) if !before.contains_key(&l.session)))
            .count();
        match self.commit(changes).await {
            Commit::Done => {}
            Commit::Conflict => return Persisted::Retry,
            Commit::Failed => {
                for _ in 0..new_leases {
                    self.metrics.allocation_failed(metrics::STORE_ERROR);
                }
                return Persisted::Failed;
            }
        }
        let persisted = &self.leases.expired;
        self.memory
            .pending_expiries
            .retain(|s, _| !persisted.contains_key(s));
        let (allocated, released) = log_lease_changes(&before, &self.leases.leases);
        self.metrics.allocated(allocated);
        self.metrics.released(released);
        for session in before.keys() {
            if !self.leases.leases.contains_key(session) {
                self.supervisor.forget(session);
            }
        }
        Persisted::Done { changed: true }
    }

    /// The store change one lease operation makes.
    fn change_for(&mut self, snapshot: &Snapshot, op: &LeaseOp) -> Change {
        let leased = |s: &str| self.leases.leases.get(s).cloned();
        Change::from(match op {
            LeaseOp::Lease { session, port } => {
                if !can_bind(self.supervisor.listen_address(), *port) {
                    info!(port, session = %session, "port is in use by another program; skipping it for now");
                    self.memory.busy_ports.insert(*port, Instant::now());
                    self.metrics.allocation_failed(Reason::PortInUse.as_str());
                    self.memory
                        .alloc_waiting
                        .insert(session.clone(), Reason::PortInUse);
                    return Change::PortBusy;
                }
                snapshot.desired.get(session).map(|want| {
                    LeaseChange::Put(
                        Lease::new(session, *port, want.target.clone(), Timestamp::now())
                            .for_instance(want.instance.as_deref()),
                    )
                })
            }
            LeaseOp::Release { session, .. } => Some(LeaseChange::Remove(session.clone())),
            // A new target is a new lease identity with a new token, on the same port and
            // with the same lease age (a retarget does not extend maxLifetimeSeconds): a
            // console URL handed out for the old target must not open the new one.
            LeaseOp::Retarget { session, target } => leased(session).map(|l| {
                let instance = snapshot.desired.get(session).and_then(|w| w.instance.as_deref());
                LeaseChange::Put(Lease {
                    allocated_at: l.allocated_at,
                    allocated_boot: l.allocated_boot.clone(),
                    ..Lease::new(session, l.port, target.clone(), Timestamp::now())
                        .for_instance(instance)
                })
            }),
            LeaseOp::Expire {
                session,
                generation,
                reason,
                message,
            } => {
                info!(session = %session, reason = %reason, "session expired");
                Some(LeaseChange::Expire(
                    session.clone(),
                    Expiry {
                        generation: *generation,
                        reason: reason.as_str().to_owned(),
                        message: message.clone(),
                        at: Timestamp::now(),
                    },
                ))
            }
            LeaseOp::Unexpire { session } => {
                self.memory.pending_expiries.remove(session);
                Some(LeaseChange::Unexpire(session.clone()))
            }
            LeaseOp::Record { session, process } => leased(session).map(|mut l| {
                l.process = Some(*process);
                info!(session = %session, port = l.port, pid = process.pid, "adopted running proxy");
                LeaseChange::Put(l)
            }),
        })
    }

    /// Expiries the store has not taken yet, to write with this commit, and the expiries
    /// of this commit remembered in case it fails (see `Memory::pending_expiries`).
    fn unpersisted_expiries(&mut self, changes: &[LeaseChange]) -> Vec<LeaseChange> {
        for c in changes {
            if let LeaseChange::Expire(session, e) = c {
                self.memory
                    .pending_expiries
                    .insert(session.clone(), e.clone());
            }
        }
        let in_commit: Vec<&String> = changes
            .iter()
            .filter_map(|c| match c {
                LeaseChange::Expire(s, _) | LeaseChange::Unexpire(s) => Some(s),
                LeaseChange::Put(_) | LeaseChange::Remove(_) => None,
            })
            .collect();
        self.memory
            .pending_expiries
            .iter()
            .filter(|(s, _)| !self.leases.expired.contains_key(*s) && !in_commit.contains(s))
            .map(|(s, e)| LeaseChange::Expire(s.clone(), e.clone()))
            .collect()
    }

    /// Commits changes; on a conflict (someone else changed the store) reloads instead.
    pub(super) async fn commit(&mut self, changes: Vec<LeaseChange>) -> Commit {
        match self.store.commit(self.leases.revision, changes).await {
            Ok(set) => {
                self.leases = set;
                self.memory.store_healed();
                Commit::Done
            }
            Err(StoreError::Conflict { .. }) => {
                debug!("lease store changed underneath; reloading and planning again");
                match self.store.load().await {
                    Ok(set) => self.leases = set,
                    Err(e) => {
                        self.metrics.store_error(e.metric_label());
                        error!(error = %e, "cannot reload leases");
                    }
                }
                Commit::Conflict
            }
            Err(e) => {
                self.metrics.store_error(e.metric_label());
                self.memory.store_failed(&e);
                Commit::Failed
            }
        }
    }
}

/// Logs allocations, retargets and releases; returns how many were allocated and released.
fn log_lease_changes(
    before: &BTreeMap<String, Lease>,
    after: &BTreeMap<String, Lease>,
) -> (u64, u64) {
    let (mut allocated, mut released) = (0, 0);
    for (name, l) in after {
        match before.get(name) {
            None => {
                allocated += 1;
                info!(session = %name, port = l.port, target = %l.target, "lease allocated");
            }
            Some(b) if b.target != l.target => {
                info!(session = %name, port = l.port, target = %l.target, "lease retargeted");
            }
            _ => {}
        }
    }
    for (name, l) in before {
        if !after.contains_key(name) {
            released += 1;
            info!(session = %name, port = l.port, pid = l.process.map(|p| p.pid), "lease released");
        }
    }
    (allocated, released)
}
