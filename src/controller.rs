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

use crate::api::VncSession;
use crate::lease::{Expiry, Lease};
use crate::metrics::{self, Metrics, StatsSource};
use crate::net::can_bind;
use crate::reconcile::{self, Action, Inputs, Limits, ProxyState, RestartState, StopReason};
use crate::source::{Snapshot, Source};
use crate::status::kube::Synced;
use crate::status::{ActiveSession, StatusBuilder, StatusSink, SystemStatus};
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
    metrics: Metrics,
    /// Set after the first full pass, for a readiness probe.
    synced: Option<Synced>,
    /// The allocation-failure reason each waiting session was last counted under, so a
    /// session waiting for many passes counts once.
    alloc_waiting: BTreeMap<String, &'static str>,
    /// The lease store has been refusing commits (unwritable, corrupt): since when, how
    /// often, and when that was last logged as an error.
    store_failing: Option<StoreFailing>,
}

/// See [`Controller::store_failing`].
#[derive(Debug)]
struct StoreFailing {
    error: String,
    since: Instant,
    passes: u64,
    logged: Instant,
}

/// While the same store error repeats, it is logged as an ERROR at most this often (every
/// pass at debug level), so an unwritable state directory does not flood the log.
const STORE_ERROR_EVERY: Duration = Duration::from_secs(60);

/// The allocation failures a plan reports (besides those the controller sees itself).
const ALLOCATION_FAILURES: [&str; 3] = [
    reconcile::reason::POOL_EXHAUSTED,
    reconcile::reason::PORT_CONFLICT,
    reconcile::reason::PORT_IN_USE,
];

/// How a commit went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Commit {
    Done,
    /// Someone else changed the store; reloaded, plan again.
    Conflict,
    Failed,
}

/// What one pass did that the metrics and the HTTP view need.
#[derive(Debug, Default)]
struct PassFacts {
    /// Sessions whose proxy was started this pass.
    started: BTreeSet<String>,
    /// Sessions whose proxy was stopped this pass.
    stopped: BTreeSet<String>,
    orphans_reaped: usize,
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
            metrics: Metrics::default(),
            synced: None,
            alloc_waiting: BTreeMap::new(),
            store_failing: None,
        }
    }

    /// Feeds `metrics` (and the view `/v1/*` serves) after every pass.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Sets `synced` once the first full pass is done (standalone readiness).
    pub fn with_synced(mut self, synced: Synced) -> Self {
        self.synced = Some(synced);
        self
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
        if let Some(s) = &self.synced {
            s.set();
        }
        busy || snapshot.unsettled
    }

    /// One pass of observe -> plan -> persist -> act -> report, timed.
    async fn converge(&mut self, snapshot: &Snapshot) -> bool {
        let started = Instant::now();
        let busy = self.converge_inner(snapshot).await;
        self.metrics.observe_pass(started.elapsed());
        busy
    }

    async fn converge_inner(&mut self, snapshot: &Snapshot) -> bool {
        let started = Instant::now();
        let mut facts = PassFacts::default();
        let obs = self.supervisor.observe(&self.leases.leases);
        let observed_ms = started.elapsed().as_millis() as u64;
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
        self.count_waiting(&plan.reports);

        // 1. Persist lease changes before anything acts on them.
        let mut changes = Vec::new();
        let mut again = false;
        for action in plan.actions.iter().filter(|a| a.changes_leases()) {
            match action {
                Action::Lease { session, port } => {
                    if !can_bind(listen, *port) {
                        info!(port, session = %session, "port is in use by another program; skipping it for now");
                        self.busy_ports.insert(*port, Instant::now());
                        self.metrics
                            .allocation_failed(reconcile::reason::PORT_IN_USE);
                        self.alloc_waiting
                            .insert(session.clone(), reconcile::reason::PORT_IN_USE);
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
            let new_leases = changes
                .iter()
                .filter(|c| matches!(c, LeaseChange::Put(l) if !before.contains_key(&l.session)))
                .count();
            match self.commit(changes).await {
                Commit::Done => {}
                Commit::Conflict => return true,
                Commit::Failed => {
                    for _ in 0..new_leases {
                        self.metrics.allocation_failed(metrics::STORE_ERROR);
                    }
                    return true;
                }
            }
            let (allocated, released) = log_lease_changes(&before, &self.leases.leases);
            self.metrics.allocated(allocated);
            self.metrics.released(released);
            for session in before.keys() {
                if !self.leases.leases.contains_key(session) {
                    self.supervisor.forget(session);
                }
            }
            again = true;
        }

        // 2. Act: end orphans and unwanted proxies, then start what is missing.
        let mut stops = Vec::new();
        let mut orphan_stop = Vec::new();
        for action in &plan.actions {
            match action {
                Action::KillOrphan { process } => {
                    warn!(pid = process.pid, "ending orphaned proxy of ours");
                    stops.push(self.supervisor.stop(*process));
                    orphan_stop.push(true);
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
                    orphan_stop.push(false);
                    facts.stopped.insert(session.clone());
                }
                _ => {}
            }
        }
        again |= !stops.is_empty();
        for (ended, orphan) in join_all(stops).await.into_iter().zip(orphan_stop) {
            if ended && orphan {
                facts.orphans_reaped += 1;
                self.metrics.orphan_reaped();
            }
        }
        let mut records = Vec::new();
        let to_start: Vec<Lease> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Start { session } => self.leases.leases.get(session).cloned(),
                _ => None,
            })
            .collect();
        let spawn_started = Instant::now();
        let spawned: Vec<_> = to_start.iter().map(|l| self.supervisor.spawn(l)).collect();
        let spawn_ms = spawn_started.elapsed().as_millis() as u64;
        for (lease, result) in to_start.into_iter().zip(spawned) {
            let session = lease.session.clone();
            let r = self.restarts.entry(session.clone()).or_default();
            r.starts += 1;
            r.last_start_ms = now;
            match result {
                Ok(process) => {
                    info!(session = %session, port = lease.port, pid = process.pid, target = %lease.target, "started proxy");
                    self.metrics.proxy_started(lease.process.is_some());
                    facts.started.insert(session.clone());
                    let mut l = lease;
                    l.process = Some(process);
                    records.push(LeaseChange::Put(l));
                }
                Err(e) => {
                    error!(session = %session, error = %e, "cannot start proxy");
                    self.metrics.proxy_start_failed();
                    r.last_error = Some(e.to_string());
                }
            }
        }
        if !records.is_empty() {
            self.commit(records).await;
            again = true;
        }

        // 3. Report, from persisted leases only.
        let report_started = Instant::now();
        let items = self
            .statuses
            .build(snapshot, &plan.reports, &self.leases.leases);
        self.sink.publish(&items).await;
        self.record(snapshot, &obs, &items, &facts);
        debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            observe_ms = observed_ms,
            spawn_ms,
            started = facts.started.len(),
            report_ms = report_started.elapsed().as_millis() as u64,
            actions = plan.actions.len(),
            "pass done"
        );
        plan.busy || again
    }

    /// Counts sessions that start waiting for a port (once per wait, not per pass).
    fn count_waiting(&mut self, reports: &BTreeMap<String, reconcile::Report>) {
        let (waiting, new) = waiting_for_ports(&self.alloc_waiting, reports);
        for reason in new {
            self.metrics.allocation_failed(reason);
        }
        self.alloc_waiting = waiting;
    }

    /// Feeds the metrics and the HTTP view from this pass's facts; decides nothing.
    fn record(
        &self,
        snapshot: &Snapshot,
        obs: &crate::supervisor::Observation,
        items: &[VncSession],
        facts: &PassFacts,
    ) {
        let range = self.config.limits.range;
        let leases = &self.leases.leases;
        let leased_ports: BTreeSet<u16> = leases
            .values()
            .map(|l| l.port)
            .filter(|p| range.contains(*p))
            .collect();
        let quarantined = self
            .busy_ports
            .keys()
            .chain(snapshot.reserved_ports.iter())
            .filter(|p| range.contains(**p) && !leased_ports.contains(p))
            .collect::<BTreeSet<_>>()
            .len();
        self.metrics.set_pool(metrics::Pool {
            total: range.len(),
            leased: leased_ports.len(),
            quarantined,
            max_sessions: self.config.limits.max_sessions,
        });
        self.metrics
            .set_phases(items.iter().filter_map(|i| i.status.as_ref()?.phase));
        // Alive now: observed running at the start of the pass and not stopped since, or
        // started during it.
        let alive = |session: &str| {
            facts.started.contains(session)
                || (matches!(obs.proxies.get(session), Some(ProxyState::Running { .. }))
                    && !facts.stopped.contains(session))
        };
        let live = leases.keys().filter(|s| alive(s)).count();
        self.metrics.set_proxy_stats(
            leases
                .values()
                .filter(|l| alive(&l.session))
                .filter_map(|l| {
                    let pid = u32::try_from(l.process?.pid).ok()?;
                    let path = self.supervisor.stats_file(&l.session)?;
                    Some((l.session.clone(), StatsSource { path, pid }))
                })
                .collect(),
        );
        self.metrics.set_view(metrics::View {
            synced: true,
            status: SystemStatus::new(
                range,
                leases,
                live,
                obs.orphans.len().saturating_sub(facts.orphans_reaped),
                true,
            ),
            sessions: leases
                .iter()
                .map(|(name, l)| (name.clone(), ActiveSession::of(l)))
                .collect(),
        });
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
    async fn commit(&mut self, changes: Vec<LeaseChange>) -> Commit {
        match self.store.commit(self.leases.revision, changes).await {
            Ok(set) => {
                self.leases = set;
                if let Some(f) = self.store_failing.take() {
                    info!(
                        failed_passes = f.passes,
                        failing_for_ms = f.since.elapsed().as_millis() as u64,
                        "lease changes persist again"
                    );
                }
                Commit::Done
            }
            Err(StoreError::Conflict { .. }) => {
                debug!("lease store changed underneath; reloading and planning again");
                match self.store.load().await {
                    Ok(set) => self.leases = set,
                    Err(e) => error!(error = %e, "cannot reload leases"),
                }
                Commit::Conflict
            }
            Err(e) => {
                let text = e.to_string();
                let now = Instant::now();
                match &mut self.store_failing {
                    Some(f) if f.error == text && f.logged.elapsed() < STORE_ERROR_EVERY => {
                        f.passes += 1;
                        debug!(error = %e, failed_passes = f.passes, "cannot persist lease changes; nothing was started or released");
                    }
                    failing => {
                        let (since, passes) = failing
                            .as_ref()
                            .map_or((now, 1), |f| (f.since, f.passes + 1));
                        error!(
                            error = %e,
                            failed_passes = passes,
                            "cannot persist lease changes; nothing was started or released (while this repeats it is logged at debug level, as an error once a minute)"
                        );
                        *failing = Some(StoreFailing {
                            error: text,
                            since,
                            passes,
                            logged: now,
                        });
                    }
                }
                Commit::Failed
            }
        }
    }
}

/// The sessions whose report is an allocation failure, and the failures that are new
/// since `before` (a session that starts waiting, or waits for another reason now).
fn waiting_for_ports(
    before: &BTreeMap<String, &'static str>,
    reports: &BTreeMap<String, reconcile::Report>,
) -> (BTreeMap<String, &'static str>, Vec<&'static str>) {
    let mut waiting = BTreeMap::new();
    let mut new = Vec::new();
    for (name, r) in reports {
        let Some(reason) = ALLOCATION_FAILURES.iter().find(|f| **f == r.reason) else {
            continue;
        };
        if before.get(name) != Some(reason) {
            new.push(*reason);
        }
        waiting.insert(name.clone(), *reason);
    }
    (waiting, new)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Phase;
    use crate::reconcile::{Report, reason};

    fn reports(of: &[(&str, &'static str)]) -> BTreeMap<String, Report> {
        of.iter()
            .map(|(name, reason)| {
                (
                    (*name).to_owned(),
                    Report {
                        phase: Phase::Pending,
                        reason,
                        message: String::new(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_wait_for_a_port_counts_once_not_once_per_pass() {
        let pass1 = reports(&[
            ("a", reason::POOL_EXHAUSTED),
            ("b", reason::ALLOCATING),
            ("c", reason::READY),
        ]);
        let (w, new) = waiting_for_ports(&BTreeMap::new(), &pass1);
        assert_eq!(new, [reason::POOL_EXHAUSTED]);
        // Still waiting, for the same reason: nothing new.
        let (w, new) = waiting_for_ports(&w, &pass1);
        assert!(new.is_empty());
        // Another reason counts; so does a second session starting to wait.
        let pass3 = reports(&[("a", reason::PORT_IN_USE), ("b", reason::POOL_EXHAUSTED)]);
        let (w, mut new) = waiting_for_ports(&w, &pass3);
        new.sort_unstable();
        assert_eq!(new, [reason::POOL_EXHAUSTED, reason::PORT_IN_USE]);
        // Served, then waiting again: a new wait.
        let (w, new) = waiting_for_ports(&w, &reports(&[("a", reason::STARTING)]));
        assert!(new.is_empty() && w.is_empty());
        let (_, new) = waiting_for_ports(&w, &reports(&[("a", reason::PORT_CONFLICT)]));
        assert_eq!(new, [reason::PORT_CONFLICT]);
    }
}
