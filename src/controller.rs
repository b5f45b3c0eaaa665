//! The control loop: observe -> plan -> persist -> act -> report.
//!
//! Generic over where desired state comes from ([`Source`]), where leases live
//! ([`LeaseStore`]) and where statuses go ([`StatusSink`]), so standalone and
//! Kubernetes modes run this very loop. The decision itself is [`reconcile::plan`].

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use futures::future::join_all;
use jiff::Timestamp;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::lease::{Expiry, Lease};
use crate::net::can_bind;
use crate::reconcile::{self, Action, Inputs, Limits, ProxyState, RestartState, StopReason};
use crate::source::{Snapshot, Source};
use crate::status::{StatusBuilder, StatusSink};
use crate::store::{LeaseChange, LeaseSet, LeaseStore, StoreError};
use crate::supervisor::{Exit, Supervisor};

/// How long a port that failed a bind probe is skipped before it is tried again.
const BUSY_FOR: Duration = Duration::from_secs(10);
/// Pause between passes while something is in motion.
const BUSY_POLL: Duration = Duration::from_millis(100);

/// Settings of the loop itself.
#[derive(Clone, Debug)]
pub struct LoopConfig {
    pub limits: Limits,
    /// Pass this often even without events, to repair what no event reports.
    pub resync: Duration,
    /// Stop every proxy and release every lease when the loop ends.
    pub stop_on_exit: bool,
}

/// The controller. See the module docs.
#[derive(Debug)]
pub struct Controller<S, L, R> {
    source: S,
    store: L,
    sink: R,
    supervisor: Supervisor,
    statuses: StatusBuilder,
    config: LoopConfig,
    leases: LeaseSet,
    restarts: BTreeMap<String, RestartState>,
    busy_ports: BTreeMap<u16, Instant>,
    /// When each session last had a client (or its proxy was first seen).
    last_active: BTreeMap<String, Instant>,
    exits: mpsc::UnboundedReceiver<Exit>,
    epoch: Instant,
    ready_once: bool,
}

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl<S: Source, L: LeaseStore, R: StatusSink> Controller<S, L, R> {
    pub fn new(
        source: S,
        store: L,
        sink: R,
        mut supervisor: Supervisor,
        statuses: StatusBuilder,
        config: LoopConfig,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        supervisor.report_exits(tx);
        Controller {
            source,
            store,
            sink,
            supervisor,
            statuses,
            config,
            leases: LeaseSet::default(),
            restarts: BTreeMap::new(),
            busy_ports: BTreeMap::new(),
            last_active: BTreeMap::new(),
            exits: rx,
            epoch: Instant::now(),
            ready_once: false,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// True once a full pass has completed (for readiness probes).
    pub fn synced(&self) -> bool {
        self.ready_once
    }

    /// Runs until `shutdown` resolves. Leases are loaded first: a store that cannot be
    /// read stops vncd before it touches anything.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), ControllerError> {
        self.leases = self.store.load().await?;
        info!(
            leases = self.leases.leases.len(),
            backend = self.supervisor.backend_name(),
            "loaded leases; adopting running proxies"
        );
        tokio::pin!(shutdown);
        loop {
            let busy = self.pass().await;
            let wait = if busy { BUSY_POLL } else { self.config.resync };
            tokio::select! {
                () = &mut shutdown => break,
                () = self.source.changed() => debug!("source changed"),
                Some(exit) = self.exits.recv() => self.on_exit(exit),
                () = tokio::time::sleep(wait) => {}
            }
        }
        if self.config.stop_on_exit {
            info!("stopping every session before exit (--stop-on-exit)");
            self.drain().await;
        } else {
            info!(
                proxies = self.leases.leases.len(),
                "exiting; proxies keep running and will be adopted by the next vncd"
            );
        }
        Ok(())
    }

    fn on_exit(&mut self, exit: Exit) {
        let tail = self
            .supervisor
            .last_log_line(&exit.session)
            .unwrap_or_default();
        let msg = if tail.is_empty() {
            format!("proxy pid {} exited ({})", exit.pid, exit.status)
        } else {
            format!("proxy pid {} exited ({}): {tail}", exit.pid, exit.status)
        };
        warn!(session = %exit.session, pid = exit.pid, status = %exit.status, "proxy exited");
        self.restarts.entry(exit.session).or_default().last_error = Some(msg);
    }

    /// Stops everything: plan against an empty desired set until no lease remains.
    async fn drain(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.leases.leases.is_empty() && Instant::now() < deadline {
            let snapshot = Snapshot::default();
            self.converge(&snapshot).await;
        }
    }

    /// One pass. Returns true if something is still in motion.
    async fn pass(&mut self) -> bool {
        let snapshot = match self.source.snapshot().await {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot read desired sessions; changing nothing this pass");
                return false;
            }
        };
        let busy = self.converge(&snapshot).await;
        self.ready_once = true;
        busy || snapshot.unsettled
    }

    async fn converge(&mut self, snapshot: &Snapshot) -> bool {
        let started = Instant::now();
        let obs = self.supervisor.observe(&self.leases.leases);
        let now = self.now_ms();
        self.busy_ports.retain(|_, at| at.elapsed() < BUSY_FOR);
        for (session, state) in &obs.proxies {
            if let ProxyState::Running {
                listening: true,
                age_ms,
                ..
            } = state
                && *age_ms >= reconcile::STABLE_MS
                && let Some(r) = self.restarts.get_mut(session)
            {
                r.starts = 0;
            }
        }
        // Idle time counts only once a proxy serves its port: a slow start is not idleness.
        let serving: BTreeMap<String, usize> = obs
            .clients
            .iter()
            .filter(|(s, _)| {
                matches!(
                    obs.proxies.get(*s),
                    Some(ProxyState::Running {
                        listening: true,
                        ..
                    })
                )
            })
            .map(|(s, n)| (s.clone(), *n))
            .collect();
        let idle_ms = self.idle_times(&serving);
        let listen = self.supervisor.listen_address();
        let mut busy: BTreeSet<u16> = self.busy_ports.keys().copied().collect();
        busy.extend(snapshot.reserved_ports.iter().copied());
        for lease in self.leases.leases.values() {
            let absent = !obs.proxies.contains_key(&lease.session);
            if absent && !obs.held_by_us.contains(&lease.port) && !can_bind(listen, lease.port) {
                busy.insert(lease.port);
            }
        }
        let plan = reconcile::plan(&Inputs {
            desired: &snapshot.desired,
            protected: &snapshot.protected,
            leases: &self.leases.leases,
            proxies: &obs.proxies,
            orphans: &obs.orphans,
            busy: &busy,
            restarts: &self.restarts,
            expired: &self.leases.expired,
            idle_ms: &idle_ms,
            limits: self.config.limits,
            now_ms: now,
            wall_now: Timestamp::now(),
        });

        // 1. Persist lease changes before anything acts on them.
        let mut changes = Vec::new();
        let mut again = false;
        for action in plan.actions.iter().filter(|a| a.changes_leases()) {
            match action {
                Action::Lease { session, port } => {
                    if !can_bind(listen, *port) {
                        info!(port, session = %session, "port is in use by another program; skipping it for now");
                        self.busy_ports.insert(*port, Instant::now());
                        again = true;
                        continue;
                    }
                    let Some(want) = snapshot.desired.get(session) else {
                        continue;
                    };
                    changes.push(LeaseChange::Put(Lease::new(
                        session,
                        *port,
                        want.target.clone(),
                        Timestamp::now(),
                    )));
                }
                Action::Release { session, .. } => {
                    changes.push(LeaseChange::Remove(session.clone()))
                }
                Action::Retarget { session, target } => {
                    if let Some(l) = self.leases.leases.get(session) {
                        let mut l = l.clone();
                        l.target = target.clone();
                        l.process = None;
                        changes.push(LeaseChange::Put(l));
                    }
                }
                Action::Expire {
                    session,
                    generation,
                    reason,
                    message,
                } => {
                    info!(session = %session, reason, "session expired");
                    let expiry = Expiry {
                        generation: *generation,
                        reason: (*reason).to_owned(),
                        message: message.clone(),
                        at: Timestamp::now(),
                    };
                    changes.push(LeaseChange::Expire(session.clone(), expiry));
                }
                Action::Unexpire { session } => {
                    changes.push(LeaseChange::Unexpire(session.clone()))
                }
                Action::Record { session, process } => {
                    if let Some(l) = self.leases.leases.get(session) {
                        let mut l = l.clone();
                        l.process = Some(*process);
                        info!(session = %session, port = l.port, pid = process.pid, "adopted running proxy");
                        changes.push(LeaseChange::Put(l));
                    }
                }
                _ => {}
            }
        }
        if !changes.is_empty() {
            let before = self.leases.leases.clone();
            if !self.commit(changes).await {
                return true;
            }
            log_lease_changes(&before, &self.leases.leases);
            again = true;
        }

        // 2. Act: end orphans and unwanted proxies, then start what is missing.
        let mut stops = Vec::new();
        for action in &plan.actions {
            match action {
                Action::KillOrphan { process } => {
                    warn!(pid = process.pid, "ending orphaned proxy of ours");
                    stops.push(self.supervisor.stop(*process));
                }
                Action::Stop {
                    session,
                    process,
                    why,
                } => {
                    info!(session = %session, pid = process.pid, reason = ?why, "stopping proxy");
                    if *why == StopReason::NotListening {
                        let port = self.leases.leases.get(session).map_or(0, |l| l.port);
                        let tail = self.supervisor.last_log_line(session).unwrap_or_default();
                        self.restarts.entry(session.clone()).or_default().last_error =
                            Some(format!(
                                "proxy pid {} did not listen on port {port} within {} ms: {tail}",
                                process.pid, self.config.limits.start_timeout_ms
                            ));
                    }
                    stops.push(self.supervisor.stop(*process));
                }
                _ => {}
            }
        }
        again |= !stops.is_empty();
        join_all(stops).await;
        let mut records = Vec::new();
        for action in &plan.actions {
            let Action::Start { session } = action else {
                continue;
            };
            let Some(lease) = self.leases.leases.get(session).cloned() else {
                continue;
            };
            let r = self.restarts.entry(session.clone()).or_default();
            r.starts += 1;
            r.last_start_ms = now;
            match self.supervisor.spawn(&lease) {
                Ok(process) => {
                    info!(session = %session, port = lease.port, pid = process.pid, target = %lease.target, "started proxy");
                    let mut l = lease;
                    l.process = Some(process);
                    records.push(LeaseChange::Put(l));
                }
                Err(e) => {
                    error!(session = %session, error = %e, "cannot start proxy");
                    r.last_error = Some(e.to_string());
                }
            }
        }
        if !records.is_empty() {
            self.commit(records).await;
            again = true;
        }

        // 3. Report, from persisted leases only.
        let items = self
            .statuses
            .build(snapshot, &plan.reports, &self.leases.leases);
        self.sink.publish(&items).await;
        debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            actions = plan.actions.len(),
            "pass done"
        );
        plan.busy || again
    }

    /// Idle time per session with a live proxy, from its connected-client count.
    fn idle_times(&mut self, clients: &BTreeMap<String, usize>) -> BTreeMap<String, u64> {
        let now = Instant::now();
        self.last_active.retain(|s, _| clients.contains_key(s));
        clients
            .iter()
            .map(|(session, n)| {
                let last = self.last_active.entry(session.clone()).or_insert(now);
                if *n > 0 {
                    *last = now;
                }
                let idle = u64::try_from(now.duration_since(*last).as_millis()).unwrap_or(u64::MAX);
                (session.clone(), idle)
            })
            .collect()
    }

    /// Commits changes; on a conflict (someone else changed the store) reloads instead.
    async fn commit(&mut self, changes: Vec<LeaseChange>) -> bool {
        match self.store.commit(self.leases.revision, changes).await {
            Ok(set) => {
                self.leases = set;
                true
            }
            Err(StoreError::Conflict { .. }) => {
                debug!("lease store changed underneath; reloading and planning again");
                match self.store.load().await {
                    Ok(set) => self.leases = set,
                    Err(e) => error!(error = %e, "cannot reload leases"),
                }
                false
            }
            Err(e) => {
                error!(error = %e, "cannot persist lease changes; nothing was started or released");
                false
            }
        }
    }
}

fn log_lease_changes(before: &BTreeMap<String, Lease>, after: &BTreeMap<String, Lease>) {
    for (name, l) in after {
        match before.get(name) {
            None => info!(session = %name, port = l.port, target = %l.target, "lease allocated"),
            Some(b) if b.target != l.target => {
                info!(session = %name, port = l.port, target = %l.target, "lease retargeted");
            }
            _ => {}
        }
    }
    for (name, l) in before {
        if !after.contains_key(name) {
            info!(session = %name, port = l.port, pid = l.process.map(|p| p.pid), "lease released");
        }
    }
}
