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
    /// Sessions whose live proxy runs with other security-relevant settings than vncd has
    /// now (TLS files, origins, web dir, listen address, proxy user): replaced one at a
    /// time, each only once no other proxy is starting.
    pub stale: &'a BTreeSet<String>,
    pub limits: Limits,
    /// A monotonic clock, for backoff.
    pub now_ms: u64,
    /// The wall clock, for lease ages.
    pub wall_now: jiff::Timestamp,
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
}

/// One step towards the desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Lease `port` for `session` (persisted before anything else happens).
    Lease { session: String, port: u16 },
    /// Give back `session`'s port; its proxy is confirmed gone.
    Release { session: String, port: u16 },
    /// Point the lease at a new target; its proxy is confirmed gone.
    Retarget { session: String, target: Endpoint },
    /// Persist the identity of the process found serving the lease (adoption).
    Record { session: String, process: ProcRef },
    /// Start the proxy of a persisted lease.
    Start { session: String },
    /// Stop a proxy of ours.
    Stop {
        session: String,
        process: ProcRef,
        why: StopReason,
    },
    /// End a process of ours that no lease accounts for.
    KillOrphan { process: ProcRef },
    /// Record that a session expired (its proxy is stopped and its port released next).
    Expire {
        session: String,
        generation: i64,
        reason: &'static str,
        message: String,
    },
    /// Forget an expiry: the spec changed or the session is gone.
    Unexpire { session: String },
}

/// A change to the lease store, carried out (and persisted) before anything acts on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseOp {
    Lease {
        session: String,
        port: u16,
    },
    Release {
        session: String,
        port: u16,
    },
    Retarget {
        session: String,
        target: Endpoint,
    },
    Record {
        session: String,
        process: ProcRef,
    },
    Expire {
        session: String,
        generation: i64,
        reason: &'static str,
        message: String,
    },
    Unexpire {
        session: String,
    },
}

/// A process to end: a session's proxy, or an orphan of ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopOp {
    Session {
        session: String,
        process: ProcRef,
        why: StopReason,
    },
    Orphan {
        process: ProcRef,
    },
}

/// A plan's actions by the stage that carries them out: persist the lease changes, then
/// stop, then start. Built by one exhaustive match ([`Plan::staged`]), so a new kind of
/// [`Action`] cannot be dropped by a stage that forgot it: it does not compile until it
/// is given a stage.
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
                Action::Lease { session, port } => {
                    out.lease_ops.push(LeaseOp::Lease { session, port });
                }
                Action::Release { session, port } => {
                    out.lease_ops.push(LeaseOp::Release { session, port });
                }
                Action::Retarget { session, target } => {
                    out.lease_ops.push(LeaseOp::Retarget { session, target });
                }
                Action::Record { session, process } => {
                    out.lease_ops.push(LeaseOp::Record { session, process });
                }
                Action::Expire {
                    session,
                    generation,
                    reason,
                    message,
                } => out.lease_ops.push(LeaseOp::Expire {
                    session,
                    generation,
                    reason,
                    message,
                }),
                Action::Unexpire { session } => {
                    out.lease_ops.push(LeaseOp::Unexpire { session });
                }
                Action::Stop {
                    session,
                    process,
                    why,
                } => out.stops.push(StopOp::Session {
                    session,
                    process,
                    why,
                }),
                Action::KillOrphan { process } => out.stops.push(StopOp::Orphan { process }),
                Action::Start { session } => out.starts.push(session),
            }
        }
        out
    }
}

/// Reasons reported in status, stable for machines to match on.
pub mod reason {
    pub const ALLOCATING: &str = "Allocating";
    pub const STARTING: &str = "Starting";
    pub const QUEUED: &str = "Queued";
    pub const READY: &str = "ProxyReady";
    pub const RESTARTING: &str = "Restarting";
    pub const PROXY_FAILED: &str = "ProxyFailed";
    pub const POOL_EXHAUSTED: &str = "PoolExhausted";
    pub const PORT_CONFLICT: &str = "PortConflict";
    pub const PORT_IN_USE: &str = "PortInUse";
    pub const SPEC_CHANGED: &str = "SpecChanged";
    pub const TERMINATING: &str = "Terminating";
    pub const IDLE_TIMEOUT: &str = "IdleTimeout";
    pub const MAX_LIFETIME: &str = "MaxLifetime";
    pub const CONFIG_CHANGED: &str = "ConfigChanged";

    /// The reports of a session that waits for a port: each start of such a wait counts
    /// as an allocation failure (the one list the controller and the metrics share).
    pub const WAITING_FOR_PORT: [&str; 3] = [POOL_EXHAUSTED, PORT_CONFLICT, PORT_IN_USE];
}

/// What to tell the world about one desired session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub phase: Phase,
    pub reason: &'static str,
    pub message: String,
}

impl Report {
    fn new(phase: Phase, reason: &'static str, message: impl Into<String>) -> Self {
        Report {
            phase,
            reason,
            message: message.into(),
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
            out.actions.push(Action::Unexpire {
                session: name.clone(),
            });
        }
    }
    for process in input.orphans {
        out.actions.push(Action::KillOrphan { process: *process });
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
        out.actions.push(Action::Unexpire {
            session: name.clone(),
        });
        out.busy = true;
    }
    match input.leases.get(name) {
        None => {
            let (report, port) = ports.allocate(input, want);
            if let Some(port) = port {
                out.actions.push(Action::Lease {
                    session: name.clone(),
                    port,
                });
                out.busy = true;
            }
            report
        }
        Some(lease) => converge_leased(input, want, lease, slots, out),
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
                out.actions.push(Action::Stop {
                    session: name.clone(),
                    process,
                    why: StopReason::Removed,
                });
                out.reports.insert(
                    name.clone(),
                    Report::new(
                        Phase::Terminating,
                        reason::TERMINATING,
                        "stopping the proxy",
                    ),
                );
                out.busy = true;
            }
            ProxyState::Absent => out.actions.push(Action::Release {
                session: name.clone(),
                port: lease.port,
            }),
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
            out.actions.push(Action::Stop {
                session: name.to_owned(),
                process,
                why: StopReason::Expired,
            });
            out.busy = true;
        }
        (Some(lease), ProxyState::Absent) => out.actions.push(Action::Release {
            session: name.to_owned(),
            port: lease.port,
        }),
        (None, _) => {}
    }
    let reason = if exp.reason == reason::MAX_LIFETIME {
        reason::MAX_LIFETIME
    } else {
        reason::IDLE_TIMEOUT
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
fn expiry_due(input: &Inputs<'_>, want: &Desired, lease: &Lease) -> Option<(&'static str, String)> {
    if let Some(max) = want.max_lifetime_ms {
        let age_ms = input
            .wall_now
            .duration_since(lease.allocated_at)
            .as_millis()
            .max(0);
        if u128::try_from(age_ms).unwrap_or(0) >= u128::from(max) {
            return Some((
                reason::MAX_LIFETIME,
                format!("expired: reached its maximum lifetime of {} s", max / 1000),
            ));
        }
    }
    if let (Some(limit), Some(idle)) = (want.idle_timeout_ms, input.idle_ms.get(&want.name))
        && *idle >= limit
    {
        return Some((
            reason::IDLE_TIMEOUT,
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
                reason::POOL_EXHAUSTED,
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
                        reason::POOL_EXHAUSTED,
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
                reason::ALLOCATING,
                format!("leasing port {port}"),
            ),
            Some(port),
        )
    }

    /// A requested port, if it can be granted now; else why not.
    fn requested(&mut self, input: &Inputs<'_>, p: u16) -> Result<u16, (&'static str, String)> {
        if let Some(holder) = self.holder.get(&p) {
            return Err((
                reason::PORT_CONFLICT,
                format!("requested port {p} is leased to session {holder:?}"),
            ));
        }
        if !self.granted.insert(p) {
            return Err((
                reason::PORT_CONFLICT,
                format!("requested port {p} is also requested by another session"),
            ));
        }
        if input.busy.contains(&p) {
            return Err((
                reason::PORT_IN_USE,
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
            out.actions.push(Action::Stop {
                session: name.clone(),
                process,
                why: StopReason::SpecChanged,
            });
            out.busy = true;
            Report::new(
                Phase::Pending,
                reason::SPEC_CHANGED,
                "restarting the proxy for the new spec",
            )
        }
        ProxyState::Running {
            process,
            listening: true,
            ..
        } if input.stale.contains(name.as_str()) && slots.replace => {
            slots.replace = false;
            out.actions.push(Action::Stop {
                session: name.clone(),
                process,
                why: StopReason::ConfigChanged,
            });
            out.busy = true;
            Report::new(
                Phase::Pending,
                reason::CONFIG_CHANGED,
                "replacing the proxy: vncd's proxy settings changed (TLS files, origins, web directory, listen address or proxy user)",
            )
        }
        ProxyState::Running {
            process,
            listening,
            age_ms,
        } => running(input, name, lease, process, listening, age_ms, out),
        ProxyState::Absent if wrong_port || wrong_target => {
            move_lease(want, lease, wrong_port, out)
        }
        ProxyState::Absent if input.busy.contains(&lease.port) => port_taken(want, lease, out),
        ProxyState::Absent => start_or_wait(input, name, lease, slots, out),
    }
}

/// The session reached its idle timeout or maximum lifetime: record it, stop or release.
fn expire(
    name: &str,
    generation: i64,
    lease: &Lease,
    proxy: ProxyState,
    why: &'static str,
    message: String,
    out: &mut Plan,
) -> Report {
    out.actions.push(Action::Expire {
        session: name.to_owned(),
        generation,
        reason: why,
        message: message.clone(),
    });
    match proxy {
        ProxyState::Running { process, .. } => out.actions.push(Action::Stop {
            session: name.to_owned(),
            process,
            why: StopReason::Expired,
        }),
        ProxyState::Absent => out.actions.push(Action::Release {
            session: name.to_owned(),
            port: lease.port,
        }),
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
    if lease.process != Some(process) {
        out.actions.push(Action::Record {
            session: name.to_owned(),
            process,
        });
    }
    if listening {
        return Report::new(
            Phase::Ready,
            reason::READY,
            format!("proxy pid {} serves port {}", process.pid, lease.port),
        );
    }
    out.busy = true;
    if age_ms > input.limits.start_timeout_ms {
        out.actions.push(Action::Stop {
            session: name.to_owned(),
            process,
            why: StopReason::NotListening,
        });
        return Report::new(
            Phase::Failed,
            reason::PROXY_FAILED,
            format!(
                "proxy pid {} did not listen on port {} within {} ms",
                process.pid, lease.port, input.limits.start_timeout_ms
            ),
        );
    }
    Report::new(
        Phase::Pending,
        reason::STARTING,
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
        out.actions.push(Action::Release {
            session: want.name.clone(),
            port: lease.port,
        });
        return Report::new(
            Phase::Pending,
            reason::SPEC_CHANGED,
            "moving to the requested port",
        );
    }
    out.actions.push(Action::Retarget {
        session: want.name.clone(),
        target: want.target.clone(),
    });
    Report::new(
        Phase::Pending,
        reason::SPEC_CHANGED,
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
            reason::PORT_IN_USE,
            format!("port {} is in use by another program; retrying", lease.port),
        );
    }
    out.actions.push(Action::Release {
        session: want.name.clone(),
        port: lease.port,
    });
    Report::new(
        Phase::Pending,
        reason::PORT_IN_USE,
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
            (Phase::Failed, reason::PROXY_FAILED)
        } else {
            (Phase::Pending, reason::RESTARTING)
        };
        return Report::new(phase, reason, format!("{why}; restarting in {wait} ms"));
    }
    if slots.starting >= input.limits.max_starting {
        return Report::new(
            Phase::Pending,
            reason::QUEUED,
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
        ("starting", reason::STARTING)
    } else {
        ("restarting", reason::RESTARTING)
    };
    Report::new(
        Phase::Pending,
        reason,
        format!("{verb} the proxy on port {}", lease.port),
    )
}

#[cfg(test)]
mod tests;
