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

/// Decides what to do. See the module docs.
pub fn plan(input: &Inputs<'_>) -> Plan {
    let mut out = Plan::default();
    let state = |name: &str| {
        input
            .proxies
            .get(name)
            .copied()
            .unwrap_or(ProxyState::Absent)
    };

    // Ports that automatic allocation must not take: leased, busy, or requested by
    // a desired session (so a requested port stays free for the one who asked).
    let mut taken: BTreeSet<u16> = input.leases.values().map(|l| l.port).collect();
    taken.extend(input.busy.iter().copied());
    taken.extend(input.desired.values().filter_map(|d| d.requested_port));
    let mut pool = Pool::new(input.limits.range, taken);
    let port_holder: BTreeMap<u16, &str> = input
        .leases
        .values()
        .map(|l| (l.port, l.session.as_str()))
        .collect();
    let mut lease_count = input.leases.len();
    let mut granted_requests: BTreeSet<u16> = BTreeSet::new();
    let mut starting = input
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

    for (name, want) in input.desired {
        if let Some(exp) = input.expired.get(name) {
            if exp.generation == want.generation {
                let report = stay_expired(name, exp, input, state(name), &mut out);
                out.reports.insert(name.clone(), report);
                continue;
            }
            out.actions.push(Action::Unexpire {
                session: name.clone(),
            });
            out.busy = true;
        }
        let report = match input.leases.get(name) {
            None => {
                let (report, lease) = allocate(
                    input,
                    want,
                    &mut pool,
                    &port_holder,
                    &mut granted_requests,
                    lease_count,
                );
                if let Some(port) = lease {
                    lease_count += 1;
                    out.actions.push(Action::Lease {
                        session: name.clone(),
                        port,
                    });
                    out.busy = true;
                }
                report
            }
            Some(lease) => {
                converge_leased(input, want, lease, state(name), &mut starting, &mut out)
            }
        };
        out.reports.insert(name.clone(), report);
    }

    for (name, lease) in input.leases {
        if input.desired.contains_key(name) || input.protected.contains(name) {
            continue;
        }
        match state(name) {
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

/// A desired session without a lease: try to lease a port.
fn allocate(
    input: &Inputs<'_>,
    want: &Desired,
    pool: &mut Pool,
    port_holder: &BTreeMap<u16, &str>,
    granted_requests: &mut BTreeSet<u16>,
    lease_count: usize,
) -> (Report, Option<u16>) {
    let pending = |reason, msg: String| (Report::new(Phase::Pending, reason, msg), None);
    if lease_count >= input.limits.max_sessions {
        return pending(
            reason::POOL_EXHAUSTED,
            format!(
                "all {} sessions allowed by --max-sessions are in use; waiting for a port",
                input.limits.max_sessions
            ),
        );
    }
    let port = match want.requested_port {
        Some(p) => {
            if let Some(holder) = port_holder.get(&p) {
                return pending(
                    reason::PORT_CONFLICT,
                    format!("requested port {p} is leased to session {holder:?}"),
                );
            }
            if !granted_requests.insert(p) {
                return pending(
                    reason::PORT_CONFLICT,
                    format!("requested port {p} is also requested by another session"),
                );
            }
            if input.busy.contains(&p) {
                return pending(
                    reason::PORT_IN_USE,
                    format!("requested port {p} is in use by another program; retrying"),
                );
            }
            p
        }
        None => match pool.pick() {
            Some(p) => p,
            None => {
                return pending(
                    reason::POOL_EXHAUSTED,
                    format!("no free port in {}; waiting for one", input.limits.range),
                );
            }
        },
    };
    pool.take(port);
    (
        Report::new(
            Phase::Pending,
            reason::ALLOCATING,
            format!("leasing port {port}"),
        ),
        Some(port),
    )
}

/// A desired session that holds a lease: make its proxy match.
fn converge_leased(
    input: &Inputs<'_>,
    want: &Desired,
    lease: &Lease,
    proxy: ProxyState,
    starting: &mut usize,
    out: &mut Plan,
) -> Report {
    let name = &want.name;
    let wrong_port = want.requested_port.is_some_and(|p| p != lease.port);
    let wrong_target = want.target != lease.target;
    let restart = input.restarts.get(name).cloned().unwrap_or_default();

    if let Some((why, message)) = expiry_due(input, want, lease) {
        out.actions.push(Action::Expire {
            session: name.clone(),
            generation: want.generation,
            reason: why,
            message: message.clone(),
        });
        match proxy {
            ProxyState::Running { process, .. } => out.actions.push(Action::Stop {
                session: name.clone(),
                process,
                why: StopReason::Expired,
            }),
            ProxyState::Absent => out.actions.push(Action::Release {
                session: name.clone(),
                port: lease.port,
            }),
        }
        out.busy = true;
        // Expired is reported once the port is released; until then it is going away.
        return Report::new(Phase::Terminating, why, message);
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
            listening,
            age_ms,
        } => {
            if lease.process != Some(process) {
                out.actions.push(Action::Record {
                    session: name.clone(),
                    process,
                });
            }
            if listening {
                Report::new(
                    Phase::Ready,
                    reason::READY,
                    format!("proxy pid {} serves port {}", process.pid, lease.port),
                )
            } else if age_ms > input.limits.start_timeout_ms {
                out.actions.push(Action::Stop {
                    session: name.clone(),
                    process,
                    why: StopReason::NotListening,
                });
                out.busy = true;
                Report::new(
                    Phase::Failed,
                    reason::PROXY_FAILED,
                    format!(
                        "proxy pid {} did not listen on port {} within {} ms",
                        process.pid, lease.port, input.limits.start_timeout_ms
                    ),
                )
            } else {
                out.busy = true;
                Report::new(
                    Phase::Pending,
                    reason::STARTING,
                    format!(
                        "waiting for proxy pid {} to listen on port {}",
                        process.pid, lease.port
                    ),
                )
            }
        }
        ProxyState::Absent if wrong_port => {
            out.actions.push(Action::Release {
                session: name.clone(),
                port: lease.port,
            });
            out.busy = true;
            Report::new(
                Phase::Pending,
                reason::SPEC_CHANGED,
                "moving to the requested port",
            )
        }
        ProxyState::Absent if wrong_target => {
            out.actions.push(Action::Retarget {
                session: name.clone(),
                target: want.target.clone(),
            });
            out.busy = true;
            Report::new(
                Phase::Pending,
                reason::SPEC_CHANGED,
                "restarting the proxy for the new target",
            )
        }
        ProxyState::Absent if input.busy.contains(&lease.port) => {
            out.busy = true;
            if want.requested_port.is_some() {
                Report::new(
                    Phase::Pending,
                    reason::PORT_IN_USE,
                    format!("port {} is in use by another program; retrying", lease.port),
                )
            } else {
                out.actions.push(Action::Release {
                    session: name.clone(),
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
        }
        ProxyState::Absent => {
            out.busy = true;
            if input.now_ms >= restart.next_start_ms() && *starting >= input.limits.max_starting {
                Report::new(
                    Phase::Pending,
                    reason::QUEUED,
                    format!(
                        "waiting for a start slot ({} proxies are starting)",
                        *starting
                    ),
                )
            } else if input.now_ms >= restart.next_start_ms() {
                *starting += 1;
                out.actions.push(Action::Start {
                    session: name.clone(),
                });
                let verb = if restart.starts == 0 {
                    "starting"
                } else {
                    "restarting"
                };
                Report::new(
                    Phase::Pending,
                    if restart.starts == 0 {
                        reason::STARTING
                    } else {
                        reason::RESTARTING
                    },
                    format!("{verb} the proxy on port {}", lease.port),
                )
            } else {
                let wait = restart.next_start_ms() - input.now_ms;
                let why = restart.last_error.as_deref().unwrap_or("the proxy exited");
                let phase = if restart.starts >= 2 {
                    Phase::Failed
                } else {
                    Phase::Pending
                };
                let reason = if restart.starts >= 2 {
                    reason::PROXY_FAILED
                } else {
                    reason::RESTARTING
                };
                Report::new(phase, reason, format!("{why}; restarting in {wait} ms"))
            }
        }
    }
}

#[cfg(test)]
mod tests;
