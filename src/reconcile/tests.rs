use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use proptest::prelude::*;

use super::*;

fn range() -> PortRange {
    PortRange::new(6100, 6105).expect("range")
}

fn limits(max: usize) -> Limits {
    Limits {
        range: range(),
        max_sessions: max,
        start_timeout_ms: 5_000,
        max_starting: 3,
    }
}

fn desired(name: &str, port: u16, requested: Option<u16>) -> Desired {
    Desired {
        name: name.into(),
        target: Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        requested_port: requested,
        generation: 1,
        idle_timeout_ms: None,
        max_lifetime_ms: None,
        instance: None,
    }
}

/// A simulated host: it executes actions the way the controller and the kernel would,
/// and panics the moment an action would break an invariant.
#[derive(Debug)]
struct Sim {
    desired: BTreeMap<String, Desired>,
    leases: BTreeMap<String, Lease>,
    /// Running proxies by session: (identity, listening, born_ms).
    procs: BTreeMap<String, (ProcRef, bool, u64)>,
    orphans: Vec<ProcRef>,
    /// Ports held by other programs.
    foreign: BTreeSet<u16>,
    /// Busy ports the controller learnt about from failed bind probes.
    known_busy: BTreeSet<u16>,
    restarts: BTreeMap<String, RestartState>,
    expired: BTreeMap<String, crate::lease::Expiry>,
    /// Idle time per session, as the controller would measure it.
    idle: BTreeMap<String, u64>,
    /// Sessions whose running proxy was started under other settings.
    stale: BTreeSet<String>,
    /// Open consoles per session.
    clients: BTreeMap<String, usize>,
    /// Targets the data plane reports unreachable (`Some(why)`) or reachable (`None`).
    targets: BTreeMap<String, Option<String>>,
    now: u64,
    /// How far the simulated wall clock is stepped from the boot clock (`now`).
    wall_step_ms: i64,
    next_pid: i32,
    limits: Limits,
}

/// The simulated boot clock at `ms`.
fn boot_at(ms: u64) -> crate::clock::BootInstant {
    crate::clock::BootInstant {
        boot_id: "sim".into(),
        uptime_ms: ms,
    }
}

impl Sim {
    fn new(max: usize) -> Self {
        Sim {
            desired: BTreeMap::new(),
            leases: BTreeMap::new(),
            procs: BTreeMap::new(),
            orphans: Vec::new(),
            foreign: BTreeSet::new(),
            known_busy: BTreeSet::new(),
            restarts: BTreeMap::new(),
            expired: BTreeMap::new(),
            idle: BTreeMap::new(),
            stale: BTreeSet::new(),
            now: 1_000_000,
            targets: BTreeMap::new(),
            clients: BTreeMap::new(),
            wall_step_ms: 0,
            next_pid: 100,
            limits: limits(max),
        }
    }

    fn spawn(&mut self) -> ProcRef {
        self.next_pid += 1;
        ProcRef {
            pid: self.next_pid,
            start_time: self.now,
        }
    }

    fn plan(&self) -> Plan {
        let proxies: BTreeMap<String, ProxyState> = self
            .procs
            .iter()
            .map(|(s, (p, listening, born))| {
                let state = ProxyState::Running {
                    process: *p,
                    listening: *listening,
                    age_ms: self.now - born,
                };
                (s.clone(), state)
            })
            .collect();
        // The controller probes the ports of leases whose proxy is absent.
        let mut busy = self.known_busy.clone();
        for l in self.leases.values() {
            if !self.procs.contains_key(&l.session) && self.foreign.contains(&l.port) {
                busy.insert(l.port);
            }
        }
        plan(&Inputs {
            desired: &self.desired,
            protected: &BTreeSet::new(),
            leases: &self.leases,
            proxies: &proxies,
            orphans: &self.orphans,
            busy: &busy,
            restarts: &self.restarts,
            expired: &self.expired,
            idle_ms: &self.idle,
            clients: &self.clients,
            targets: &self.targets,
            stale: &self.stale,
            limits: self.limits,
            now_ms: self.now,
            wall_now: self.wall(),
            boot_now: Some(boot_at(self.now)),
        })
    }

    /// The simulated wall clock: the boot clock plus any step.
    fn wall(&self) -> Timestamp {
        Timestamp::from_millisecond(i64::try_from(self.now).unwrap() + self.wall_step_ms).unwrap()
    }

    /// One pass: plan, apply, advance time. Returns the number of actions.
    fn step(&mut self) -> Plan {
        let plan = self.plan();
        for action in &plan.actions {
            self.apply(action);
            self.check_invariants();
        }
        for (s, (p, listening, born)) in self.procs.iter_mut() {
            if *born < self.now {
                *listening = true;
            }
            let r = self.restarts.entry(s.clone()).or_default();
            if *listening && self.now.saturating_sub(p.start_time) >= STABLE_MS {
                r.starts = 0;
            }
        }
        self.now += 1_000;
        plan
    }

    fn apply(&mut self, action: &Action) {
        match action {
            Action::Lease(LeaseOp::Lease { session, port }) => {
                assert!(
                    !self.leases.contains_key(session),
                    "double lease for {session}"
                );
                assert!(
                    self.leases.values().all(|l| l.port != *port),
                    "port {port} leased twice"
                );
                assert!(self.limits.range.contains(*port));
                if self.foreign.contains(port) {
                    // The controller's bind probe fails: no lease, remember the port.
                    self.known_busy.insert(*port);
                    return;
                }
                let target = self.desired[session].target.clone();
                let instance = self.desired[session].instance.as_deref();
                let lease = Lease::at(session, *port, target, self.wall(), Some(boot_at(self.now)))
                    .for_instance(instance);
                self.leases.insert(session.clone(), lease);
            }
            Action::Lease(LeaseOp::Release { session, port }) => {
                assert!(
                    !self.procs.contains_key(session),
                    "released {session} with a live proxy"
                );
                let l = self
                    .leases
                    .remove(session)
                    .expect("release of a missing lease");
                assert_eq!(l.port, *port);
            }
            Action::Lease(LeaseOp::Retarget { session, target }) => {
                assert!(!self.procs.contains_key(session));
                let instance = self.desired[session].instance.as_deref();
                let l = self.leases.get_mut(session).expect("lease");
                // As the controller does: a new uid (for the instance) on the same port.
                *l = Lease {
                    allocated_at: l.allocated_at,
                    allocated_boot: l.allocated_boot.clone(),
                    ..Lease::at(session, l.port, target.clone(), l.allocated_at, None)
                        .for_instance(instance)
                };
            }
            Action::Lease(LeaseOp::Record { session, process }) => {
                assert_eq!(self.procs[session].0, *process);
                self.leases.get_mut(session).expect("lease").process = Some(*process);
            }
            Action::Start { session } => {
                let lease = self
                    .leases
                    .get(session)
                    .expect("start without a persisted lease")
                    .clone();
                assert!(
                    !self.procs.contains_key(session),
                    "second proxy for {session}"
                );
                let r = self.restarts.entry(session.clone()).or_default();
                r.starts += 1;
                r.last_start_ms = self.now;
                if self.foreign.contains(&lease.port) {
                    r.last_error = Some("Address already in use".into());
                    return;
                }
                let p = self.spawn();
                // A new proxy is started with the current settings.
                self.stale.remove(session);
                self.procs.insert(session.clone(), (p, false, self.now));
                self.leases.get_mut(session).expect("lease").process = Some(p);
            }
            Action::Stop(StopOp::Session {
                session, process, ..
            }) => {
                let (p, ..) = self.procs.remove(session).expect("stop of a missing proxy");
                assert_eq!(p, *process, "stopped a process that is not the session's");
            }
            Action::Lease(LeaseOp::Expire {
                session,
                generation,
                reason,
                message,
            }) => {
                let expiry = crate::lease::Expiry {
                    generation: *generation,
                    reason: reason.as_str().to_owned(),
                    message: message.clone(),
                    at: Timestamp::UNIX_EPOCH,
                };
                self.expired.insert(session.clone(), expiry);
            }
            Action::Lease(LeaseOp::Unexpire { session }) => {
                assert!(
                    self.expired.remove(session).is_some(),
                    "unexpire of {session} that never expired"
                );
            }
            Action::Stop(StopOp::Orphan { process }) => {
                let before = self.orphans.len();
                self.orphans.retain(|o| o != process);
                assert_eq!(
                    before,
                    self.orphans.len() + 1,
                    "killed a process that is not an orphan"
                );
            }
        }
    }

    fn check_invariants(&self) {
        let ports: BTreeSet<u16> = self.leases.values().map(|l| l.port).collect();
        assert_eq!(
            ports.len(),
            self.leases.len(),
            "a port is leased twice: {:?}",
            self.leases
        );
        for s in self.procs.keys() {
            assert!(
                self.leases.contains_key(s),
                "proxy of {s} runs without a lease"
            );
        }
        assert!(self.leases.len() <= self.limits.max_sessions);
    }

    fn converge(&mut self) -> Plan {
        let mut last = Plan::default();
        for _ in 0..200 {
            last = self.step();
            if last.actions.is_empty() && !last.busy {
                return last;
            }
        }
        panic!("did not converge: {last:?}\n{self:?}");
    }
}

#[test]
fn a_new_session_is_leased_then_started_then_ready() {
    let mut sim = Sim::new(5);
    sim.desired.insert("a".into(), desired("a", 5901, None));
    let p = sim.step();
    assert_eq!(
        p.actions,
        vec![Action::Lease(LeaseOp::Lease {
            session: "a".into(),
            port: 6100
        })]
    );
    assert_eq!(p.reports["a"].phase, Phase::Pending);
    let p = sim.step();
    assert_eq!(
        p.actions,
        vec![Action::Start {
            session: "a".into()
        }]
    );
    let p = sim.step();
    assert!(p.actions.is_empty());
    assert_eq!(p.reports["a"].reason, Reason::Starting);
    let p = sim.step();
    assert_eq!(p.reports["a"].phase, Phase::Ready);
    assert!(!p.busy);
}

#[test]
fn removal_stops_the_proxy_before_releasing_the_port() {
    let mut sim = Sim::new(5);
    sim.desired.insert("a".into(), desired("a", 5901, None));
    sim.converge();
    sim.desired.clear();
    let p = sim.step();
    assert!(matches!(
        p.actions[..],
        [Action::Stop(StopOp::Session {
            why: StopReason::Removed,
            ..
        })]
    ));
    assert_eq!(p.reports["a"].phase, Phase::Terminating);
    let p = sim.step();
    assert_eq!(
        p.actions,
        vec![Action::Lease(LeaseOp::Release {
            session: "a".into(),
            port: 6100
        })]
    );
    assert!(sim.leases.is_empty());
}

#[test]
fn exhaustion_is_reported_and_heals_when_a_port_frees() {
    let mut sim = Sim::new(2);
    for n in ["a", "b", "c"] {
        sim.desired.insert(n.into(), desired(n, 5901, None));
    }
    let p = sim.converge();
    assert_eq!(p.reports["c"].reason, Reason::PoolExhausted);
    assert_eq!(p.reports["a"].phase, Phase::Ready);
    sim.desired.remove("a");
    let p = sim.converge();
    assert_eq!(p.reports["c"].phase, Phase::Ready);
}

#[test]
fn a_crashed_proxy_restarts_on_the_same_port_with_backoff() {
    let mut sim = Sim::new(5);
    sim.desired.insert("a".into(), desired("a", 5901, None));
    sim.converge();
    for _ in 0..12 {
        sim.step(); // long enough to count as stable
    }
    assert_eq!(sim.restarts["a"].starts, 0);
    let port = sim.leases["a"].port;
    sim.procs.clear();
    let p = sim.plan();
    assert_eq!(
        p.actions,
        vec![Action::Start {
            session: "a".into()
        }]
    );
    sim.apply(&p.actions[0]);
    // Dies again at once: the next start waits.
    sim.procs.clear();
    let p = sim.plan();
    assert!(p.actions.is_empty(), "{p:?}");
    assert_eq!(p.reports["a"].reason, Reason::Restarting);
    sim.converge();
    assert_eq!(sim.leases["a"].port, port);
}

#[test]
fn backoff_grows_and_is_capped() {
    let mut r = RestartState::default();
    assert_eq!(r.backoff_ms(), 0);
    r.starts = 1;
    assert_eq!(r.backoff_ms(), 500);
    r.starts = 3;
    assert_eq!(r.backoff_ms(), 2_000);
    r.starts = 40;
    assert_eq!(r.backoff_ms(), MAX_BACKOFF_MS);
}

#[test]
fn a_port_taken_by_another_program_is_skipped_not_dropped() {
    let mut sim = Sim::new(5);
    sim.foreign.insert(6100);
    sim.desired.insert("a".into(), desired("a", 5901, None));
    sim.converge();
    assert_eq!(sim.leases["a"].port, 6101);
    // The port comes back into use once the other program leaves.
    sim.foreign.clear();
    sim.known_busy.clear();
    sim.desired.insert("b".into(), desired("b", 5902, None));
    sim.converge();
    assert_eq!(sim.leases["b"].port, 6100);
}

#[test]
fn a_lease_whose_port_was_taken_while_down_moves() {
    let mut sim = Sim::new(5);
    sim.desired.insert("a".into(), desired("a", 5901, None));
    sim.converge();
    sim.procs.clear();
    sim.foreign.insert(6100);
    let p = sim.step();
    assert_eq!(
        p.actions,
        vec![Action::Lease(LeaseOp::Release {
            session: "a".into(),
            port: 6100
        })]
    );
    assert_eq!(p.reports["a"].reason, Reason::PortInUse);
    sim.converge();
    assert_eq!(sim.leases["a"].port, 6101);
}

#[test]
fn requested_ports_are_honoured_and_conflicts_reported() {
    let mut sim = Sim::new(5);
    sim.desired
        .insert("a".into(), desired("a", 5901, Some(6103)));
    sim.desired
        .insert("b".into(), desired("b", 5902, Some(6103)));
    sim.desired.insert("c".into(), desired("c", 5903, None));
    let p = sim.converge();
    assert_eq!(sim.leases["a"].port, 6103);
    assert_eq!(p.reports["b"].reason, Reason::PortConflict);
    assert_ne!(sim.leases["c"].port, 6103);
}

#[test]
fn a_target_change_restarts_on_the_same_port() {
    let mut sim = Sim::new(5);
    sim.desired.insert("a".into(), desired("a", 5901, None));
    sim.converge();
    let old = sim.procs["a"].0;
    sim.desired.insert("a".into(), desired("a", 5999, None));
    let p = sim.step();
    assert!(matches!(
        p.actions[..],
        [Action::Stop(StopOp::Session {
            why: StopReason::SpecChanged,
            ..
        })]
    ));
    sim.converge();
    assert_eq!(sim.leases["a"].port, 6100);
    assert_eq!(
        sim.leases["a"].target,
        Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: 5999
        }
    );
    assert_ne!(sim.procs["a"].0, old);
}

#[test]
fn another_instance_at_the_same_address_gets_a_new_lease_uid() {
    let mut sim = Sim::new(5);
    let mut a = desired("a", 5901, None);
    a.instance = Some("uuid-old".into());
    sim.desired.insert("a".into(), a.clone());
    sim.converge();
    let (old_uid, old_proc) = (sim.leases["a"].uid.clone(), sim.procs["a"].0);
    // Same name, same target, another domain UUID: the old proxy stops first.
    a.instance = Some("uuid-new".into());
    sim.desired.insert("a".into(), a);
    let p = sim.step();
    assert!(
        matches!(
            p.actions[..],
            [Action::Stop(StopOp::Session {
                why: StopReason::SpecChanged,
                ..
            })]
        ),
        "{:?}",
        p.actions
    );
    sim.converge();
    let l = &sim.leases["a"];
    assert_eq!(l.port, 6100, "same port");
    assert_ne!(l.uid, old_uid, "a new lease uid: old tickets are dead");
    assert!(l.made_for(Some("uuid-new")));
    assert_ne!(sim.procs["a"].0, old_proc);
}

#[test]
fn adoption_records_the_running_process_without_restarting_it() {
    let mut sim = Sim::new(5);
    sim.desired.insert("a".into(), desired("a", 5901, None));
    sim.converge();
    let proc_before = sim.procs["a"].0;
    // A controller restart that lost the pid (crash between spawn and record).
    sim.leases.get_mut("a").expect("lease").process = None;
    sim.restarts.clear();
    let p = sim.step();
    assert_eq!(
        p.actions,
        vec![Action::Lease(LeaseOp::Record {
            session: "a".into(),
            process: proc_before
        })]
    );
    assert_eq!(p.reports["a"].phase, Phase::Ready);
}

#[test]
fn a_proxy_that_never_listens_is_stopped_after_the_timeout() {
    let mut sim = Sim::new(5);
    sim.desired.insert("a".into(), desired("a", 5901, None));
    sim.converge();
    let p = sim.procs["a"].0;
    sim.procs.insert("a".into(), (p, false, sim.now - 6_000));
    let plan = sim.plan();
    assert!(matches!(
        plan.actions[..],
        [Action::Stop(StopOp::Session {
            why: StopReason::NotListening,
            ..
        })]
    ));
    assert_eq!(plan.reports["a"].phase, Phase::Failed);
}

#[test]
fn protected_sessions_keep_their_lease_and_proxy() {
    let mut sim = Sim::new(5);
    sim.desired.insert("a".into(), desired("a", 5901, None));
    sim.converge();
    sim.desired.clear();
    let protected = BTreeSet::from(["a".to_string()]);
    let proxies = BTreeMap::new();
    let p = plan(&Inputs {
        desired: &sim.desired,
        protected: &protected,
        leases: &sim.leases,
        proxies: &proxies,
        orphans: &[],
        busy: &BTreeSet::new(),
        restarts: &BTreeMap::new(),
        expired: &BTreeMap::new(),
        idle_ms: &BTreeMap::new(),
        clients: &BTreeMap::new(),
        targets: &BTreeMap::new(),
        stale: &BTreeSet::new(),
        limits: sim.limits,
        now_ms: 0,
        wall_now: Timestamp::UNIX_EPOCH,
        boot_now: None,
    });
    assert!(p.actions.is_empty(), "{p:?}");
}

#[test]
fn starts_are_bounded_and_the_rest_queue() {
    let mut sim = Sim::new(5);
    for n in ["a", "b", "c", "d", "e"] {
        sim.desired.insert(n.into(), desired(n, 5901, None));
    }
    sim.step(); // leases
    let p = sim.step();
    let starts = p
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Start { .. }))
        .count();
    assert_eq!(starts, 3);
    assert_eq!(p.reports["e"].reason, Reason::Queued);
    let p = sim.step(); // the first three are still starting: no slot
    assert!(!p.actions.iter().any(|a| matches!(a, Action::Start { .. })));
    assert_eq!(p.reports["d"].reason, Reason::Queued);
    let p = sim.step(); // they listen now; the other two may start
    let starts = p
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Start { .. }))
        .count();
    assert_eq!(starts, 2);
    sim.converge();
}

#[test]
fn max_lifetime_expires_the_session_until_its_spec_changes() {
    let mut sim = Sim::new(5);
    let mut d = desired("a", 5901, None);
    d.max_lifetime_ms = Some(20_000);
    sim.desired.insert("a".into(), d.clone());
    sim.converge();
    for _ in 0..20 {
        sim.step();
    }
    assert!(sim.leases.is_empty(), "the port is released");
    assert!(sim.procs.is_empty(), "the proxy is gone");
    let p = sim.converge();
    assert_eq!(p.reports["a"].phase, Phase::Expired);
    assert_eq!(p.reports["a"].reason, Reason::MaxLifetime);
    // Still present, same spec: stays expired. A new spec starts it again.
    d.generation = 2;
    sim.desired.insert("a".into(), d);
    let p = sim.step();
    assert!(p.actions.contains(&Action::Lease(LeaseOp::Unexpire {
        session: "a".into()
    })));
    let p = sim.converge();
    assert_eq!(p.reports["a"].phase, Phase::Ready);
}

#[test]
fn a_wall_clock_stepped_back_does_not_extend_the_lifetime() {
    // The same session twice: once with a steady wall clock, once with the wall clock
    // stepped back a day right after its lease. Both expire on the same pass.
    let mut passes = Vec::new();
    for step_back in [false, true] {
        let mut sim = Sim::new(5);
        sim.now = 1_000_000_000;
        let mut d = desired("a", 5901, None);
        d.max_lifetime_ms = Some(20_000);
        sim.desired.insert("a".into(), d);
        sim.converge();
        if step_back {
            sim.wall_step_ms = -86_400_000;
        }
        let mut n = 0;
        while !sim.expired.contains_key("a") {
            sim.step();
            n += 1;
            assert!(
                n < 100,
                "never expired (wall clock stepped back: {step_back})"
            );
        }
        passes.push(n);
    }
    assert_eq!(
        passes[0], passes[1],
        "a stepped wall clock changed the lifetime"
    );
}

#[test]
fn idle_timeout_expires_only_an_idle_session() {
    let mut sim = Sim::new(5);
    let mut d = desired("a", 5901, None);
    d.idle_timeout_ms = Some(30_000);
    sim.desired.insert("a".into(), d);
    sim.converge();
    sim.idle.insert("a".into(), 29_999);
    assert!(sim.plan().actions.is_empty());
    sim.idle.insert("a".into(), 30_000);
    let p = sim.step();
    assert!(
        matches!(&p.actions[0], Action::Lease(LeaseOp::Expire { reason: r, .. }) if *r == Reason::IdleTimeout)
    );
    assert!(matches!(
        p.actions[1],
        Action::Stop(StopOp::Session {
            why: StopReason::Expired,
            ..
        })
    ));
    sim.idle.clear();
    sim.converge();
    assert!(sim.leases.is_empty());
    // Deleting an expired session forgets the expiry.
    sim.desired.clear();
    sim.converge();
    assert!(sim.expired.is_empty());
}

#[test]
fn orphans_are_killed() {
    let mut sim = Sim::new(5);
    let o = sim.spawn();
    sim.orphans.push(o);
    let p = sim.step();
    assert_eq!(p.actions, vec![Action::Stop(StopOp::Orphan { process: o })]);
}

#[derive(Clone, Debug)]
enum Event {
    Create(usize, Option<u16>),
    Delete(usize),
    Retarget(usize, u16),
    Crash(usize, bool),
    ControllerRestart,
    ForeignTake(u16),
    ForeignFree(u16),
    Steps(u8),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => (0..8usize, prop::option::weighted(0.2, 6100..=6105u16)).prop_map(|(i, p)| Event::Create(i, p)),
        2 => (0..8usize).prop_map(Event::Delete),
        1 => (0..8usize, 5900..5905u16).prop_map(|(i, p)| Event::Retarget(i, p)),
        2 => (0..8usize, any::<bool>()).prop_map(|(i, c)| Event::Crash(i, c)),
        1 => Just(Event::ControllerRestart),
        1 => (6100..=6105u16).prop_map(Event::ForeignTake),
        1 => (6100..=6105u16).prop_map(Event::ForeignFree),
        3 => (0..4u8).prop_map(Event::Steps),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// No sequence of create, delete, crash, restart and foreign-port events ever leases
    /// a port twice or runs a proxy without a lease; once faults stop, everything
    /// converges with no orphan and no stray lease.
    #[test]
    fn never_double_leases_and_always_converges(events in prop::collection::vec(event(), 1..40)) {
        let mut sim = Sim::new(5);
        let name = |i: usize| format!("s{i}");
        for ev in events {
            match ev {
                Event::Create(i, req) => {
                    sim.desired.insert(name(i), desired(&name(i), 5901, req));
                }
                Event::Delete(i) => {
                    sim.desired.remove(&name(i));
                }
                Event::Retarget(i, port) => {
                    if let Some(d) = sim.desired.get_mut(&name(i)) {
                        d.target = Endpoint::Tcp { host: "127.0.0.1".into(), port };
                    }
                }
                Event::Crash(i, leave_child) => {
                    if sim.procs.remove(&name(i)).is_some() && leave_child {
                        let child = sim.spawn();
                        sim.orphans.push(child);
                    }
                }
                Event::ControllerRestart => {
                    sim.restarts.clear();
                    sim.known_busy.clear();
                }
                Event::ForeignTake(p) => {
                    // Another program can only bind a port nobody listens on.
                    let ours = sim.leases.values().any(|l| l.port == p && sim.procs.contains_key(&l.session));
                    if !ours {
                        sim.foreign.insert(p);
                    }
                }
                Event::ForeignFree(p) => {
                    sim.foreign.remove(&p);
                }
                Event::Steps(n) => {
                    for _ in 0..n {
                        sim.step();
                    }
                }
            }
            sim.check_invariants();
        }
        // Faults stop: foreign programs leave, and converge.
        sim.foreign.clear();
        sim.known_busy.clear();
        let last = sim.converge();
        prop_assert!(sim.orphans.is_empty());
        for s in sim.leases.keys() {
            prop_assert!(sim.desired.contains_key(s), "stray lease {}", s);
        }
        let leased = sim.leases.len();
        for (n, d) in &sim.desired {
            let r = &last.reports[n];
            if sim.leases.contains_key(n) {
                prop_assert_eq!(r.phase, Phase::Ready, "{} not ready: {:?}", n, r);
                prop_assert!(sim.procs.contains_key(n));
                prop_assert_eq!(sim.leases[n].target.clone(), d.target.clone());
                if let Some(p) = d.requested_port {
                    prop_assert_eq!(sim.leases[n].port, p);
                }
            } else {
                let ok = r.reason == Reason::PoolExhausted || r.reason == Reason::PortConflict;
                prop_assert!(ok, "{} unleased for {:?}", n, r);
                if r.reason == Reason::PoolExhausted && d.requested_port.is_none() {
                    prop_assert!(leased == sim.limits.max_sessions || leased == sim.limits.range.len());
                }
            }
        }
    }
}

#[test]
fn proxies_started_under_other_settings_are_replaced_one_at_a_time() {
    let mut sim = Sim::new(5);
    for n in ["a", "b", "c"] {
        sim.desired.insert(n.into(), desired(n, 5901, None));
    }
    sim.converge();
    let before: BTreeMap<String, ProcRef> = sim
        .procs
        .iter()
        .map(|(s, (p, _, _))| (s.clone(), *p))
        .collect();
    sim.stale = ["a", "b", "c"].iter().map(|s| (*s).to_owned()).collect();
    let mut replaced_per_pass = Vec::new();
    for _ in 0..40 {
        let p = sim.step();
        let replaced = p
            .actions
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::Stop(StopOp::Session {
                        why: StopReason::ConfigChanged,
                        ..
                    })
                )
            })
            .count();
        let starting = sim
            .procs
            .values()
            .filter(|(_, listening, _)| !listening)
            .count();
        assert!(replaced <= 1, "more than one replacement in a pass: {p:?}");
        assert!(
            replaced == 0
                || starting == 0
                || p.actions.iter().any(|a| matches!(a, Action::Start { .. })),
            "a replacement while another proxy was starting: {p:?}"
        );
        replaced_per_pass.push(replaced);
        if sim.stale.is_empty() && sim.procs.values().all(|(_, l, _)| *l) {
            break;
        }
    }
    assert!(sim.stale.is_empty(), "not every stale proxy was replaced");
    for (s, p) in &before {
        assert_ne!(sim.procs[s].0, *p, "{s} still runs its old proxy");
    }
    assert_eq!(replaced_per_pass.iter().sum::<usize>(), 3);
    // Never two replacements in consecutive passes: the next waits for the previous one
    // to be started and listening again.
    assert!(
        replaced_per_pass.windows(2).all(|w| w[0] + w[1] <= 1),
        "{replaced_per_pass:?}"
    );
}

/// A sim whose three sessions were leased on an earlier pool, now served by a new one.
fn moved_pool(new_size: u16) -> Sim {
    let mut sim = Sim::new(10);
    for n in ["a", "b", "c"] {
        sim.desired.insert(n.into(), desired(n, 5901, None));
    }
    sim.converge();
    sim.limits.range = PortRange::new(7100, 7100 + new_size - 1).unwrap();
    sim
}

#[test]
fn a_lease_outside_the_pool_with_an_open_console_stays_ready() {
    let mut sim = moved_pool(10);
    for n in ["a", "b", "c"] {
        sim.clients.insert(n.into(), 1);
    }
    let p = sim.plan();
    assert!(p.actions.is_empty(), "an open console was disturbed: {p:?}");
    for n in ["a", "b", "c"] {
        assert_eq!(p.reports[n].phase, Phase::Ready);
        assert_eq!(p.reports[n].reason, Reason::OutsidePool);
        assert!(
            p.reports[n].message.contains("outside the pool 7100-7109"),
            "{}",
            p.reports[n].message
        );
    }
}

#[test]
fn a_lease_outside_the_pool_moves_in_once_no_console_is_open() {
    let mut sim = moved_pool(10);
    sim.clients.insert("a".into(), 1);
    let p = sim.plan();
    // b and c have no console: they move; a keeps serving.
    let stops: Vec<&str> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Stop(StopOp::Session {
                session,
                why: StopReason::OutsidePool,
                ..
            }) => Some(session.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(stops, ["b", "c"]);
    assert_eq!(p.reports["b"].phase, Phase::Pending);
    assert!(p.reports["b"].message.contains("URL changes"));
    sim.converge();
    assert!(sim.limits.range.contains(sim.leases["b"].port));
    assert!(sim.limits.range.contains(sim.leases["c"].port));
    assert!(!sim.limits.range.contains(sim.leases["a"].port));
    // a's console closes: it moves too.
    sim.clients.clear();
    let p = sim.converge();
    assert!(
        sim.leases
            .values()
            .all(|l| sim.limits.range.contains(l.port))
    );
    assert!(
        p.reports
            .values()
            .all(|r| r.phase == Phase::Ready && r.reason == Reason::Ready),
        "{p:?}"
    );
}

#[test]
fn leases_outside_a_full_pool_keep_serving_and_pool_exhausted_is_for_the_unleased() {
    // A new pool of one port: one lease moves in, the other two stay where they are, Ready.
    let mut sim = moved_pool(1);
    let p = sim.converge();
    let inside: Vec<_> = sim
        .leases
        .values()
        .filter(|l| sim.limits.range.contains(l.port))
        .collect();
    assert_eq!(inside.len(), 1);
    assert_eq!(sim.leases.len(), 3, "a lease was dropped");
    let outside: Vec<_> = p
        .reports
        .values()
        .filter(|r| r.reason == Reason::OutsidePool)
        .collect();
    assert_eq!(outside.len(), 2, "{p:?}");
    assert!(
        outside
            .iter()
            .all(|r| r.phase == Phase::Ready && r.message.contains("no port in the pool is free"))
    );
    // A fourth session holds no lease: it, and only it, is PoolExhausted.
    sim.desired.insert("d".into(), desired("d", 5901, None));
    let p = sim.converge();
    assert_eq!(p.reports["d"].reason, Reason::PoolExhausted);
    assert_eq!(
        p.reports
            .values()
            .filter(|r| r.reason == Reason::PoolExhausted)
            .count(),
        1
    );
}

#[test]
fn an_unreachable_target_keeps_its_port_but_is_not_ready() {
    let mut sim = Sim::new(5);
    sim.desired.insert("a".into(), desired("a", 5901, None));
    sim.converge();
    let port = sim.leases["a"].port;
    sim.targets
        .insert("a".into(), Some("connection refused".into()));
    let p = sim.plan();
    assert!(p.actions.is_empty(), "the listener must stay: {p:?}");
    assert_eq!(p.reports["a"].phase, Phase::Pending);
    assert_eq!(p.reports["a"].reason, Reason::TargetUnreachable);
    assert!(p.reports["a"].message.contains("connection refused"));
    assert_eq!(
        p.reports["a"].target,
        Some(Some("connection refused".into()))
    );
    // The VNC server comes up: Ready, on the same port.
    sim.targets.insert("a".into(), None);
    let p = sim.converge();
    assert_eq!(p.reports["a"].phase, Phase::Ready);
    assert_eq!(p.reports["a"].target, Some(None));
    assert_eq!(sim.leases["a"].port, port);
}
