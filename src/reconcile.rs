//! The reconcile decision: desired sessions + leases + observed processes -> actions.
//!
//! [`plan`] is a pure function. It reads plain data and returns plain data, so every
//! rule of convergence is unit-tested and property-tested here without processes,
//! files or clocks. The controller runs it in a loop: observe, plan, persist, act,
//! report. It never needs to know where the desired state came from or where the
//! leases are kept.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::Phase;
use crate::lease::{Expiry, Lease, ProcRef};
use crate::pool::{Pool, PortRange};
use crate::session::{Desired, Endpoint};

/// What the supervisor saw of a lease's proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyState {
    /// A live process carrying this lease's marker leads its process group.
    Running {
        process: ProcRef,
        /// Its port has a listening socket owned by the process group.
        listening: bool,
        /// How long the process has been alive.
        age_ms: u64,
    },
    /// No live process for this lease.
    Absent,
}

/// Restart bookkeeping for one session, kept by the controller across passes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestartState {
    /// Starts since the proxy was last stably ready.
    pub starts: u32,
    pub last_start_ms: u64,
    /// Why the last attempt ended, if it did.
    pub last_error: Option<String>,
}

impl RestartState {
    /// How long to wait after the last start before starting again.
    pub fn backoff_ms(&self) -> u64 {
        match self.starts {
            0 => 0,
            n => (500u64 << (n - 1).min(16)).min(MAX_BACKOFF_MS),
        }
    }

    /// When the next start may happen.
    pub fn next_start_ms(&self) -> u64 {
        self.last_start_ms.saturating_add(self.backoff_ms())
    }
}

/// The longest pause between two restarts of a failing proxy.
pub const MAX_BACKOFF_MS: u64 = 30_000;
/// A proxy that has been ready this long is considered healthy; its backoff resets.
pub const STABLE_MS: u64 = 10_000;

/// Limits that shape decisions.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub range: PortRange,
    pub max_sessions: usize,
    /// How long a new proxy may take to listen before it is declared failed.
    pub start_timeout_ms: u64,
    /// Most proxies starting (spawned, not yet listening) at once. Starting hundreds of
    /// proxies together on a small host makes every one of them miss its start timeout;
    /// a bounded herd keeps the timeout meaningful.
    pub max_starting: usize,
}

/// Everything [`plan`] looks at.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub desired: &'a BTreeMap<String, Desired>,
    /// Sessions whose source is unreadable right now (a manifest that stopped parsing).
    /// Their leases and proxies are left exactly as they are.
    pub protected: &'a BTreeSet<String>,
    pub leases: &'a BTreeMap<String, Lease>,
    /// Observed proxies by session; a missing entry means [`ProxyState::Absent`].
    pub proxies: &'a BTreeMap<String, ProxyState>,
    /// Processes that carry our marker but belong to no lease.
    pub orphans: &'a [ProcRef],
    /// Ports another program holds (bind failed and no process of ours owns them).
    pub busy: &'a BTreeSet<u16>,
    pub restarts: &'a BTreeMap<String, RestartState>,
    /// Sessions that expired (tombstones kept by the store).
    pub expired: &'a BTreeMap<String, Expiry>,
    /// How long each session's port has had no client, for sessions with a live proxy.
    pub idle_ms: &'a BTreeMap<String, u64>,
    /// What the data plane knows of each serving session's target: `None` reachable,
    /// `Some(why)` unreachable; a missing entry is unknown (a backend that does not probe).
    /// An unreachable target keeps its port and listener but is not Ready: Ready means a
    /// console can open.
    pub targets: &'a BTreeMap<String, Option<String>>,
    /// Open consoles (connected clients) per session with a live proxy. A lease outside the
    /// pool moves in only while this is zero, so no open console is cut for a repack.
    pub clients: &'a BTreeMap<String, usize>,
    /// Sessions whose live proxy runs with other security-relevant settings than vncd has
    /// now (TLS files, origins, web dir, listen address, proxy user): replaced one at a
    /// time, each only once no other proxy is starting.
    pub stale: &'a BTreeSet<String>,
    pub limits: Limits,
    /// A monotonic clock, for backoff.
    pub now_ms: u64,
    /// The wall clock, for lease ages across a reboot.
    pub wall_now: jiff::Timestamp,
    /// The boot clock, for lease ages within one boot (see [`crate::clock`]): stepping the
    /// wall clock back does not extend `maxLifetimeSeconds`.
    pub boot_now: Option<crate::clock::BootInstant>,
}

/// Why a proxy is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Its session is gone.
    Removed,
    /// Its session now wants another target or port.
    SpecChanged,
    /// It did not listen within the start timeout.
    NotListening,
    /// Its session reached its idle timeout or maximum lifetime.
    Expired,
    /// vncd's proxy settings changed since it was started (see [`Inputs::stale`]).
    ConfigChanged,
    /// Its port lies outside the pool (an earlier `--port-range`), no console is open on
    /// it, and a port in the pool is free: it moves there.
    OutsidePool,
}

/// One step towards the desired state, tagged with the stage that carries it out: the
/// lease store first, then stops, then starts ([`Plan::staged`] only partitions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A change to the lease store, persisted before anything acts on it.
    Lease(LeaseOp),
    /// A process of ours to end.
    Stop(StopOp),
    /// Start the proxy of a persisted lease.
    Start { session: String },
}

/// A change to the lease store, carried out (and persisted) before anything acts on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseOp {
    /// Lease `port` for `session`.
    Lease { session: String, port: u16 },
    /// Give back `session`'s port; its proxy is confirmed gone.
    Release { session: String, port: u16 },
    /// Point the lease at a new target (a new lease identity); its proxy is confirmed gone.
    Retarget { session: String, target: Endpoint },
    /// Persist the identity of the process found serving the lease (adoption).
    Record { session: String, process: ProcRef },
    /// Record that a session expired (its proxy is stopped and its port released next).
    Expire {
        session: String,
        generation: i64,
        reason: Reason,
        message: String,
    },
    /// Forget an expiry: the spec changed or the session is gone.
    Unexpire { session: String },
}

/// A process to end: a session's proxy, or an orphan of ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopOp {
    /// Stop a session's proxy.
    Session {
        session: String,
        process: ProcRef,
        why: StopReason,
    },
    /// End a process of ours that no lease accounts for.
    Orphan { process: ProcRef },
}

/// A plan's actions by the stage that carries them out: persist the lease changes, then
/// stop, then start. [`Plan::staged`] is one exhaustive match over [`Action`]'s three
/// stages, so a new stage cannot be dropped silently: it does not compile until handled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Staged {
    pub lease_ops: Vec<LeaseOp>,
    pub stops: Vec<StopOp>,
    /// Sessions whose persisted lease needs its proxy started.
    pub starts: Vec<String>,
}

impl Plan {
    /// The actions grouped by stage, in plan order within each.
    pub fn staged(&self) -> Staged {
        let mut out = Staged::default();
        for action in self.actions.iter().cloned() {
            match action {
                Action::Lease(op) => out.lease_ops.push(op),
                Action::Stop(op) => out.stops.push(op),
                Action::Start { session } => out.starts.push(session),
            }
        }
        out
    }
}

/// Why a session is in its phase: the `reason` of statuses, conditions, events and metrics.
/// An enum inside vncd, so a misspelt reason does not compile; turned into its stable text
/// ([`Reason::as_str`]) only where statuses and metrics are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Allocating,
    Starting,
    Queued,
    /// The proxy serves its port: the one reason of `Ready`.
    Ready,
    Restarting,
    ProxyFailed,
    PoolExhausted,
    PortConflict,
    PortInUse,
    SpecChanged,
    Terminating,
    IdleTimeout,
    MaxLifetime,
    ConfigChanged,
    /// The lease's port lies outside the pool (an earlier `--port-range`).
    OutsidePool,
    /// The proxy listens, but the VNC server behind it does not answer (the relay's probe).
    TargetUnreachable,
}

impl Reason {
    /// Every reason, for parsing and for metrics that list them.
    pub const ALL: [Reason; 16] = [
        Reason::Allocating,
        Reason::Starting,
        Reason::Queued,
        Reason::Ready,
        Reason::Restarting,
        Reason::ProxyFailed,
        Reason::PoolExhausted,
        Reason::PortConflict,
        Reason::PortInUse,
        Reason::SpecChanged,
        Reason::Terminating,
        Reason::IdleTimeout,
        Reason::MaxLifetime,
        Reason::ConfigChanged,
        Reason::OutsidePool,
        Reason::TargetUnreachable,
    ];

    /// The reports of a session that waits for a port: each start of such a wait counts
    /// as an allocation failure (the one list the controller and the metrics share).
    pub const WAITING_FOR_PORT: [Reason; 3] = [
        Reason::PoolExhausted,
        Reason::PortConflict,
        Reason::PortInUse,
    ];

    /// The stable text machines match on (statuses, `kubectl get`, metric labels).
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Allocating => "Allocating",
            Reason::Starting => "Starting",
            Reason::Queued => "Queued",
            Reason::Ready => "ProxyReady",
            Reason::Restarting => "Restarting",
            Reason::ProxyFailed => "ProxyFailed",
            Reason::PoolExhausted => "PoolExhausted",
            Reason::PortConflict => "PortConflict",
            Reason::PortInUse => "PortInUse",
            Reason::SpecChanged => "SpecChanged",
            Reason::Terminating => "Terminating",
            Reason::IdleTimeout => "IdleTimeout",
            Reason::MaxLifetime => "MaxLifetime",
            Reason::ConfigChanged => "ConfigChanged",
            Reason::OutsidePool => "OutsidePool",
            Reason::TargetUnreachable => "TargetUnreachable",
        }
    }

    /// The reason a text names (a status read back, a persisted expiry), if any.
    pub fn parse(text: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to tell the world about one desired session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub phase: Phase,
    pub reason: Reason,
    pub message: String,
    /// The target as the data plane last saw it, for the `TargetReachable` condition:
    /// `None` unknown, `Some(None)` reachable, `Some(Some(why))` unreachable.
    pub target: Option<Option<String>>,
}

impl Report {
    fn new(phase: Phase, reason: Reason, message: impl Into<String>) -> Self {
        Report {
            phase,
            reason,
            message: message.into(),
            target: None,
        }
    }
}

/// The outcome of one planning pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// A report for every desired session and every session still terminating.
    pub reports: BTreeMap<String, Report>,
    /// Something is in motion (starting, backing off); plan again soon even without events.
    pub busy: bool,
}

/// Proxies in motion during one plan: how many are starting (bounded by
/// [`Limits::max_starting`]), and whether a stale proxy may be replaced (one at a time,
/// and only while none is starting, so a settings change never takes every console down
/// at once).
#[derive(Debug)]
struct Slots {
    starting: usize,
    replace: bool,
}

/// Decides what to do. See the module docs.
pub fn plan(input: &Inputs<'_>) -> Plan {
    let mut out = Plan::default();
    let mut ports = Allocator::new(input);
    let starting = input
        .proxies
        .values()
        .filter(|p| {
            matches!(
                p,
                ProxyState::Running {
                    listening: false,
                    ..
                }
            )
        })
        .count();
    let mut slots = Slots {
        starting,
        replace: starting == 0,
    };
    for (name, want) in input.desired {
        let report = plan_desired(input, want, &mut ports, &mut slots, &mut out);
        out.reports.insert(name.clone(), report);
    }
    release_undesired(input, &mut out);
    for name in input.expired.keys() {
        if !input.desired.contains_key(name) && !input.protected.contains(name) {
            out.actions.push(Action::Lease(LeaseOp::Unexpire {
                session: name.clone(),
            }));
        }
    }
    for process in input.orphans {
        out.actions
            .push(Action::Stop(StopOp::Orphan { process: *process }));
    }
    out
}

/// What a proxy looks like in `input`; a missing entry is [`ProxyState::Absent`].
fn proxy_of(input: &Inputs<'_>, name: &str) -> ProxyState {
    input
        .proxies
        .get(name)
        .copied()
        .unwrap_or(ProxyState::Absent)
}

/// One desired session: keep it expired, lease it a port, or converge its lease.
fn plan_desired(
    input: &Inputs<'_>,
    want: &Desired,
    ports: &mut Allocator<'_>,
    slots: &mut Slots,
    out: &mut Plan,
) -> Report {
    let name = &want.name;
    if let Some(exp) = input.expired.get(name) {
        if exp.generation == want.generation {
            return stay_expired(name, exp, input, proxy_of(input, name), out);
        }
        out.actions.push(Action::Lease(LeaseOp::Unexpire {
            session: name.clone(),
        }));
        out.busy = true;
    }
    match input.leases.get(name) {
        None => {
            let (report, port) = ports.allocate(input, want);
            if let Some(port) = port {
                out.actions.push(Action::Lease(LeaseOp::Lease {
                    session: name.clone(),
                    port,
                }));
                out.busy = true;
            }
            report
        }
        Some(lease) => converge_leased(input, want, lease, ports, slots, out),
    }
}

/// Leases of sessions no longer desired (and not protected): stop the proxy, then release.
fn release_undesired(input: &Inputs<'_>, out: &mut Plan) {
    for (name, lease) in input.leases {
        if input.desired.contains_key(name) || input.protected.contains(name) {
            continue;
        }
        match proxy_of(input, name) {
            ProxyState::Running { process, .. } => {
                out.actions.push(Action::Stop(StopOp::Session {
                    session: name.clone(),
                    process,
                    why: StopReason::Removed,
                }));
                out.reports.insert(
                    name.clone(),
                    Report::new(
                        Phase::Terminating,
                        Reason::Terminating,
                        "stopping the proxy",
                    ),
                );
                out.busy = true;
            }
            ProxyState::Absent => out.actions.push(Action::Lease(LeaseOp::Release {
                session: name.clone(),
                port: lease.port,
            })),
        }
    }
}

/// An expired session whose spec has not changed: keep it down.
fn stay_expired(
    name: &str,
    exp: &Expiry,
    input: &Inputs<'_>,
    proxy: ProxyState,
    out: &mut Plan,
) -> Report {
    match (input.leases.get(name), proxy) {
        (Some(_), ProxyState::Running { process, .. }) => {
            out.actions.push(Action::Stop(StopOp::Session {
                session: name.to_owned(),
                process,
                why: StopReason::Expired,
            }));
            out.busy = true;
        }
        (Some(lease), ProxyState::Absent) => out.actions.push(Action::Lease(LeaseOp::Release {
            session: name.to_owned(),
            port: lease.port,
        })),
        (None, _) => {}
    }
    let reason = if Reason::parse(&exp.reason) == Some(Reason::MaxLifetime) {
        Reason::MaxLifetime
    } else {
        Reason::IdleTimeout
    };
    let phase = if input.leases.contains_key(name) {
        Phase::Terminating
    } else {
        Phase::Expired
    };
    Report::new(
        phase,
        reason,
        format!(
            "{}; change the session's spec to start it again",
            exp.message
        ),
    )
}

/// Whether a leased session has reached its maximum lifetime or idle timeout.
fn expiry_due(input: &Inputs<'_>, want: &Desired, lease: &Lease) -> Option<(Reason, String)> {
    if let Some(max) = want.max_lifetime_ms {
        let age_ms = crate::clock::lease_age_ms(
            lease.allocated_at,
            lease.allocated_boot.as_ref(),
            input.wall_now,
            input.boot_now.as_ref(),
        );
        if age_ms >= max {
            return Some((
                Reason::MaxLifetime,
                format!("expired: reached its maximum lifetime of {} s", max / 1000),
            ));
        }
    }
    if let (Some(limit), Some(idle)) = (want.idle_timeout_ms, input.idle_ms.get(&want.name))
        && *idle >= limit
    {
        return Some((
            Reason::IdleTimeout,
            format!(
                "expired: no client for {} s (idleTimeoutSeconds {})",
                idle / 1000,
                limit / 1000
            ),
        ));
    }
    None
}

/// Hands out ports during one plan: each port at most once, requested ports only to the
/// session that asked, and never past `--max-sessions`.
struct Allocator<'a> {
    pool: Pool,
    /// Who holds each leased port, to name the holder in a conflict.
    holder: BTreeMap<u16, &'a str>,
    /// Requested ports granted this plan (a second request for one is a conflict).
    granted: BTreeSet<u16>,
    leases: usize,
}

impl<'a> Allocator<'a> {
    fn new(input: &Inputs<'a>) -> Self {
        // Ports that automatic allocation must not take: leased, busy, or requested by a
        // desired session (so a requested port stays free for the one who asked).
        let mut taken: BTreeSet<u16> = input.leases.values().map(|l| l.port).collect();
        taken.extend(input.busy.iter().copied());
        taken.extend(input.desired.values().filter_map(|d| d.requested_port));
        Allocator {
            pool: Pool::new(input.limits.range, taken),
            holder: input
                .leases
                .values()
                .map(|l| (l.port, l.session.as_str()))
                .collect(),
            granted: BTreeSet::new(),
            leases: input.leases.len(),
        }
    }

    /// A desired session without a lease: try to lease a port.
    fn allocate(&mut self, input: &Inputs<'_>, want: &Desired) -> (Report, Option<u16>) {
        let pending = |reason, msg: String| (Report::new(Phase::Pending, reason, msg), None);
        if self.leases >= input.limits.max_sessions {
            return pending(
                Reason::PoolExhausted,
                format!(
                    "all {} sessions allowed by --max-sessions are in use; waiting for a port",
                    input.limits.max_sessions
                ),
            );
        }
        let port = match want.requested_port {
            Some(p) => match self.requested(input, p) {
                Ok(p) => p,
                Err((reason, msg)) => return pending(reason, msg),
            },
            None => match self.pool.pick() {
                Some(p) => p,
                None => {
                    return pending(
                        Reason::PoolExhausted,
                        format!("no free port in {}; waiting for one", input.limits.range),
                    );
                }
            },
        };
        self.pool.take(port);
        self.leases += 1;
        (
            Report::new(
                Phase::Pending,
                Reason::Allocating,
                format!("leasing port {port}"),
            ),
            Some(port),
        )
    }

    /// Holds back one free port of the pool for a lease that moves in from outside it, so
    /// that no more leases move in during one plan than there are free ports. `false` if
    /// none is free.
    fn reserve(&mut self) -> bool {
        match self.pool.pick() {
            Some(p) => {
                self.pool.take(p);
                true
            }
            None => false,
        }
    }

    /// A requested port, if it can be granted now; else why not.
    fn requested(&mut self, input: &Inputs<'_>, p: u16) -> Result<u16, (Reason, String)> {
        if let Some(holder) = self.holder.get(&p) {
            return Err((
                Reason::PortConflict,
                format!("requested port {p} is leased to session {holder:?}"),
            ));
        }
        if !self.granted.insert(p) {
            return Err((
                Reason::PortConflict,
                format!("requested port {p} is also requested by another session"),
            ));
        }
        if input.busy.contains(&p) {
            return Err((
                Reason::PortInUse,
                format!("requested port {p} is in use by another program; retrying"),
            ));
        }
        Ok(p)
    }
}

/// A desired session that holds a lease: make its proxy match.
fn converge_leased(
    input: &Inputs<'_>,
    want: &Desired,
    lease: &Lease,
    ports: &mut Allocator<'_>,
    slots: &mut Slots,
    out: &mut Plan,
) -> Report {
    let name = &want.name;
    let proxy = proxy_of(input, name);
    let wrong_port = want.requested_port.is_some_and(|p| p != lease.port);
    // Another instance at the same address (a libvirt domain recreated under its name)
    // is a new target too: a retarget gives it a new lease uid, so old tickets die.
    let wrong_target = want.target != lease.target || !lease.made_for(want.instance.as_deref());
    if let Some((why, message)) = expiry_due(input, want, lease) {
        return expire(name, want.generation, lease, proxy, why, message, out);
    }
    match proxy {
        ProxyState::Running { process, .. } if wrong_port || wrong_target => {
            out.actions.push(Action::Stop(StopOp::Session {
                session: name.clone(),
                process,
                why: StopReason::SpecChanged,
            }));
            out.busy = true;
            Report::new(
                Phase::Pending,
                Reason::SpecChanged,
                "restarting the proxy for the new spec",
            )
        }
        ProxyState::Running {
            process,
            listening: true,
            ..
        } if input.stale.contains(name.as_str()) && slots.replace => {
            slots.replace = false;
            out.actions.push(Action::Stop(StopOp::Session {
                session: name.clone(),
                process,
                why: StopReason::ConfigChanged,
            }));
            out.busy = true;
            Report::new(
                Phase::Pending,
                Reason::ConfigChanged,
                "replacing the proxy: vncd's proxy settings changed (TLS files, origins, web directory, listen address or proxy user)",
            )
        }
        ProxyState::Running {
            process,
            listening: true,
            ..
        } if !input.limits.range.contains(lease.port) => {
            outside_pool(input, name, lease, process, ports, out)
        }
        ProxyState::Running {
            process,
            listening,
            age_ms,
        } => running(input, name, lease, process, listening, age_ms, out),
        ProxyState::Absent if wrong_port || wrong_target => {
            move_lease(want, lease, wrong_port, out)
        }
        ProxyState::Absent if !input.limits.range.contains(lease.port) && ports.reserve() => {
            out.busy = true;
            out.actions.push(Action::Lease(LeaseOp::Release {
                session: name.clone(),
                port: lease.port,
            }));
            Report::new(
                Phase::Pending,
                Reason::OutsidePool,
                format!(
                    "moving from port {}, outside the pool {}, into the pool: the console URL changes",
                    lease.port, input.limits.range
                ),
            )
        }
        ProxyState::Absent if input.busy.contains(&lease.port) => port_taken(want, lease, out),
        ProxyState::Absent => start_or_wait(input, name, lease, slots, out),
    }
}

/// Records `process` as the one serving `lease`, unless the lease already names it (an
/// adopted or restarted proxy, or the relay).
fn record_process(name: &str, lease: &Lease, process: ProcRef, out: &mut Plan) {
    if lease.process != Some(process) {
        out.actions.push(Action::Lease(LeaseOp::Record {
            session: name.to_owned(),
            process,
        }));
    }
}

/// A serving lease whose port lies outside the pool (the pool changed since it was leased).
/// It stays Ready while a console is open on it, or while the pool has no free port; once
/// neither holds it moves into the pool (stop, release, lease again), and its URL changes.
fn outside_pool(
    input: &Inputs<'_>,
    name: &str,
    lease: &Lease,
    process: ProcRef,
    ports: &mut Allocator<'_>,
    out: &mut Plan,
) -> Report {
    record_process(name, lease, process, out);
    let range = input.limits.range;
    let open = input.clients.get(name).copied().unwrap_or(0);
    if open == 0 && ports.reserve() {
        out.busy = true;
        out.actions.push(Action::Stop(StopOp::Session {
            session: name.to_owned(),
            process,
            why: StopReason::OutsidePool,
        }));
        return Report::new(
            Phase::Pending,
            Reason::OutsidePool,
            format!(
                "moving from port {}, outside the pool {range}, into the pool: the console URL changes",
                lease.port
            ),
        );
    }
    let until = if open > 0 {
        format!("{open} console(s) are open; it moves into the pool once none is")
    } else {
        "no port in the pool is free; it moves in once one is".to_owned()
    };
    Report::new(
        Phase::Ready,
        Reason::OutsidePool,
        format!(
            "proxy pid {} serves port {}, outside the pool {range}: {until}",
            process.pid, lease.port
        ),
    )
}

/// The session reached its idle timeout or maximum lifetime: record it, stop or release.
fn expire(
    name: &str,
    generation: i64,
    lease: &Lease,
    proxy: ProxyState,
    why: Reason,
    message: String,
    out: &mut Plan,
) -> Report {
    out.actions.push(Action::Lease(LeaseOp::Expire {
        session: name.to_owned(),
        generation,
        reason: why,
        message: message.clone(),
    }));
    match proxy {
        ProxyState::Running { process, .. } => out.actions.push(Action::Stop(StopOp::Session {
            session: name.to_owned(),
            process,
            why: StopReason::Expired,
        })),
        ProxyState::Absent => out.actions.push(Action::Lease(LeaseOp::Release {
            session: name.to_owned(),
            port: lease.port,
        })),
    }
    out.busy = true;
    // Expired is reported once the port is released; until then it is going away.
    Report::new(Phase::Terminating, why, message)
}

/// A live proxy that matches its lease: record it if adopted, then Ready, Starting, or
/// replaced when it never listened.
fn running(
    input: &Inputs<'_>,
    name: &str,
    lease: &Lease,
    process: ProcRef,
    listening: bool,
    age_ms: u64,
    out: &mut Plan,
) -> Report {
    record_process(name, lease, process, out);
    if listening {
        let target = input.targets.get(name).cloned();
        if let Some(Some(why)) = &target {
            // The port stays leased and served; only Ready waits for the target.
            let message = format!(
                "port {} is served, but its VNC server {} does not answer: {why}",
                lease.port, lease.target
            );
            return Report {
                target,
                ..Report::new(Phase::Pending, Reason::TargetUnreachable, message)
            };
        }
        return Report {
            target,
            ..Report::new(
                Phase::Ready,
                Reason::Ready,
                format!("proxy pid {} serves port {}", process.pid, lease.port),
            )
        };
    }
    out.busy = true;
    if age_ms > input.limits.start_timeout_ms {
        out.actions.push(Action::Stop(StopOp::Session {
            session: name.to_owned(),
            process,
            why: StopReason::NotListening,
        }));
        return Report::new(
            Phase::Failed,
            Reason::ProxyFailed,
            format!(
                "proxy pid {} did not listen on port {} within {} ms",
                process.pid, lease.port, input.limits.start_timeout_ms
            ),
        );
    }
    Report::new(
        Phase::Pending,
        Reason::Starting,
        format!(
            "waiting for proxy pid {} to listen on port {}",
            process.pid, lease.port
        ),
    )
}

/// No proxy, and the spec wants another port (release, lease again) or target (retarget).
fn move_lease(want: &Desired, lease: &Lease, wrong_port: bool, out: &mut Plan) -> Report {
    out.busy = true;
    if wrong_port {
        out.actions.push(Action::Lease(LeaseOp::Release {
            session: want.name.clone(),
            port: lease.port,
        }));
        return Report::new(
            Phase::Pending,
            Reason::SpecChanged,
            "moving to the requested port",
        );
    }
    out.actions.push(Action::Lease(LeaseOp::Retarget {
        session: want.name.clone(),
        target: want.target.clone(),
    }));
    Report::new(
        Phase::Pending,
        Reason::SpecChanged,
        "restarting the proxy for the new target",
    )
}

/// No proxy, and another program took the leased port: a requested port waits for it,
/// an automatic one is released so the session leases another.
fn port_taken(want: &Desired, lease: &Lease, out: &mut Plan) -> Report {
    out.busy = true;
    if want.requested_port.is_some() {
        return Report::new(
            Phase::Pending,
            Reason::PortInUse,
            format!("port {} is in use by another program; retrying", lease.port),
        );
    }
    out.actions.push(Action::Lease(LeaseOp::Release {
        session: want.name.clone(),
        port: lease.port,
    }));
    Report::new(
        Phase::Pending,
        Reason::PortInUse,
        format!(
            "port {} was taken by another program; leasing another",
            lease.port
        ),
    )
}

/// No proxy for a good lease: start one if its backoff is over and a start slot is free.
fn start_or_wait(
    input: &Inputs<'_>,
    name: &str,
    lease: &Lease,
    slots: &mut Slots,
    out: &mut Plan,
) -> Report {
    let restart = input.restarts.get(name).cloned().unwrap_or_default();
    out.busy = true;
    if input.now_ms < restart.next_start_ms() {
        let wait = restart.next_start_ms() - input.now_ms;
        let why = restart.last_error.as_deref().unwrap_or("the proxy exited");
        let (phase, reason) = if restart.starts >= 2 {
            (Phase::Failed, Reason::ProxyFailed)
        } else {
            (Phase::Pending, Reason::Restarting)
        };
        return Report::new(phase, reason, format!("{why}; restarting in {wait} ms"));
    }
    if slots.starting >= input.limits.max_starting {
        return Report::new(
            Phase::Pending,
            Reason::Queued,
            format!(
                "waiting for a start slot ({} proxies are starting)",
                slots.starting
            ),
        );
    }
    slots.starting += 1;
    slots.replace = false;
    out.actions.push(Action::Start {
        session: name.to_owned(),
    });
    let (verb, reason) = if restart.starts == 0 {
        ("starting", Reason::Starting)
    } else {
        ("restarting", Reason::Restarting)
    };
    Report::new(
        Phase::Pending,
        reason,
        format!("{verb} the proxy on port {}", lease.port),
    )
}

#[cfg(test)]
mod tests;
