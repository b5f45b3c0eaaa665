//! Stage 1, observe: what the pass sees before it decides, as plain data for `plan()`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use jiff::Timestamp;

use super::Controller;
use super::memory::Memory;
use crate::lease::Expiry;
use crate::net::can_bind;
use crate::reconcile::{Inputs, Limits, ProxyState};
use crate::source::{Snapshot, Source};
use crate::status::StatusSink;
use crate::store::{LeaseSet, LeaseStore};
use crate::supervisor::Observation;

/// What one pass saw.
#[derive(Debug)]
pub(super) struct Seen {
    pub obs: Observation,
    /// How long each serving session has had no client.
    pub idle_ms: BTreeMap<String, u64>,
    /// Ports another program holds: recently failed probes, libvirt's reservations, and
    /// leased ports whose proxy is down and which no longer bind.
    pub busy: BTreeSet<u16>,
    /// Expiries as `plan()` sees them: the persisted ones and those the store has not
    /// taken yet (see `Memory::pending_expiries`).
    pub expired: BTreeMap<String, Expiry>,
    pub now_ms: u64,
    pub took_ms: u64,
}

impl Seen {
    /// The inputs of `plan()`: what was seen, with the persisted leases and the memory.
    pub fn inputs<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        leases: &'a LeaseSet,
        memory: &'a Memory,
        limits: Limits,
    ) -> Inputs<'a> {
        Inputs {
            desired: &snapshot.desired,
            protected: &snapshot.protected,
            leases: &leases.leases,
            proxies: &self.obs.proxies,
            orphans: &self.obs.orphans,
            busy: &self.busy,
            restarts: &memory.restarts,
            expired: &self.expired,
            idle_ms: &self.idle_ms,
            clients: &self.obs.clients,
            targets: &self.obs.targets,
            stale: &self.obs.stale,
            limits,
            now_ms: self.now_ms,
            wall_now: Timestamp::now(),
            boot_now: crate::clock::BootInstant::now(),
        }
    }
}

/// Connected clients of sessions whose proxy serves its port. Idle time counts only once
/// a proxy listens: a slow start is not idleness.
fn serving_clients(obs: &Observation) -> BTreeMap<String, usize> {
    obs.clients
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
        .collect()
}

impl<S: Source, L: LeaseStore, R: StatusSink> Controller<S, L, R> {
    pub(super) fn observe(&mut self, snapshot: &Snapshot) -> Seen {
        let started = Instant::now();
        let obs = self.supervisor.observe(&self.leases.leases);
        let took_ms = started.elapsed().as_millis() as u64;
        self.memory
            .begin_pass(snapshot, &self.leases.leases, &obs.proxies);
        let idle_ms = self.memory.idle_times(&serving_clients(&obs));
        let listen = self.supervisor.listen_address();
        let mut busy = self.memory.busy();
        busy.extend(snapshot.reserved_ports.iter().copied());
        for lease in self.leases.leases.values() {
            let absent = !obs.proxies.contains_key(&lease.session);
            if absent && !obs.held_by_us.contains(&lease.port) && !can_bind(listen, lease.port) {
                busy.insert(lease.port);
            }
        }
        let mut expired = self.leases.expired.clone();
        for (s, e) in &self.memory.pending_expiries {
            expired.entry(s.clone()).or_insert_with(|| e.clone());
        }
        Seen {
            obs,
            idle_ms,
            busy,
            expired,
            now_ms: self.memory.now_ms(),
            took_ms,
        }
    }
}
