//! What the controller remembers between passes.
//!
//! Everything else a pass needs is either an adapter (source, store, sink, supervisor),
//! configuration, or the persisted lease set. This is the rest: short-lived facts the
//! next pass needs and no store keeps, all of which a restart may lose without harm
//! (backoff starts over, a busy port is probed again, idle time counts from the restart).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tracing::{debug, error, info};

use crate::reconcile::{self, ProxyState, RestartState};
use crate::source::Snapshot;
use crate::store::StoreError;

/// How long a port that failed a bind probe is skipped before it is tried again.
pub(super) const BUSY_FOR: Duration = Duration::from_secs(10);

/// While the same store error repeats, it is logged as an ERROR at most this often (every
/// pass at debug level), so an unwritable state directory does not flood the log.
const STORE_ERROR_EVERY: Duration = Duration::from_secs(60);

/// See the module docs.
#[derive(Debug)]
pub(super) struct Memory {
    /// Origin of the monotonic clock `plan()` reads (`now_ms`).
    epoch: Instant,
    /// Restart bookkeeping (starts since stable, last error) per session.
    pub restarts: BTreeMap<String, RestartState>,
    /// Ports that failed a bind probe, and when.
    pub busy_ports: BTreeMap<u16, Instant>,
    /// When each session last had a client (or its proxy was first seen serving).
    last_active: BTreeMap<String, Instant>,
    /// The allocation-failure reason each waiting session was last counted under, so a
    /// session waiting for many passes counts once.
    pub alloc_waiting: BTreeMap<String, reconcile::Reason>,
    /// The lease store has been refusing commits (unwritable, corrupt): since when, how
    /// often, and when that was last logged as an error.
    store_failing: Option<StoreFailing>,
    /// Expiries decided while the store refused commits: the proxy is stopped at once, and
    /// `plan()` sees the session as expired (so it is not started again) until the store
    /// takes the record.
    pub pending_expiries: BTreeMap<String, crate::lease::Expiry>,
}

#[derive(Debug)]
struct StoreFailing {
    error: String,
    since: Instant,
    passes: u64,
    logged: Instant,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            epoch: Instant::now(),
            restarts: BTreeMap::new(),
            busy_ports: BTreeMap::new(),
            last_active: BTreeMap::new(),
            alloc_waiting: BTreeMap::new(),
            store_failing: None,
            pending_expiries: BTreeMap::new(),
        }
    }
}

impl Memory {
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Start-of-pass housekeeping: busy ports are retried after [`BUSY_FOR`], a proxy that
    /// has served stably for [`reconcile::STABLE_MS`] loses its backoff, and a session that
    /// is neither desired nor leased is forgotten (so one created again under the same
    /// name starts with a clean restart count and no stale error).
    pub fn begin_pass(
        &mut self,
        snapshot: &Snapshot,
        leased: &BTreeMap<String, crate::lease::Lease>,
        proxies: &BTreeMap<String, ProxyState>,
    ) {
        self.busy_ports.retain(|_, at| at.elapsed() < BUSY_FOR);
        self.pending_expiries.retain(|s, _| {
            snapshot.desired.contains_key(s)
                || snapshot.protected.contains(s)
                || leased.contains_key(s)
        });
        self.restarts.retain(|s, _| {
            snapshot.desired.contains_key(s)
                || snapshot.protected.contains(s)
                || leased.contains_key(s)
        });
        for (session, state) in proxies {
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
    }

    /// The ports skipped this pass because another program held them recently.
    pub fn busy(&self) -> BTreeSet<u16> {
        self.busy_ports.keys().copied().collect()
    }

    /// Idle time per session with a live proxy, from its connected-client count.
    pub fn idle_times(&mut self, clients: &BTreeMap<String, usize>) -> BTreeMap<String, u64> {
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

    /// Records which sessions wait for a port; returns the waits that are new this pass
    /// (each counts once as an allocation failure, not once per pass).
    pub fn count_waiting(
        &mut self,
        reports: &BTreeMap<String, reconcile::Report>,
    ) -> Vec<reconcile::Reason> {
        let (waiting, new) = waiting_for_ports(&self.alloc_waiting, reports);
        self.alloc_waiting = waiting;
        new
    }

    /// The store accepted a commit: say so once if it had been failing.
    pub fn store_healed(&mut self) {
        if let Some(f) = self.store_failing.take() {
            info!(
                failed_passes = f.passes,
                failing_for_ms = f.since.elapsed().as_millis() as u64,
                "lease changes persist again"
            );
        }
    }

    /// The store refused a commit: an ERROR the first time and once a minute while the same
    /// error repeats, debug otherwise.
    pub fn store_failed(&mut self, e: &StoreError) {
        let text = e.to_string();
        let now = Instant::now();
        match &mut self.store_failing {
            Some(f) if f.error == text && f.logged.elapsed() < STORE_ERROR_EVERY => {
                f.passes += 1;
                debug!(error = %e, failed_passes = f.passes, "cannot persist lease changes; nothing was started or released, proxies of deleted or expired sessions were stopped");
            }
            failing => {
                let (since, passes) = failing
                    .as_ref()
                    .map_or((now, 1), |f| (f.since, f.passes + 1));
                error!(
                    error = %e,
                    failed_passes = passes,
                    "cannot persist lease changes; nothing was started or released, proxies of deleted or expired sessions were stopped and their release is retried (while this repeats it is logged at debug level, as an error once a minute)"
                );
                *failing = Some(StoreFailing {
                    error: text,
                    since,
                    passes,
                    logged: now,
                });
            }
        }
    }
}

/// The sessions whose report is an allocation failure, and the failures that are new
/// since `before` (a session that starts waiting, or waits for another reason now).
fn waiting_for_ports(
    before: &BTreeMap<String, reconcile::Reason>,
    reports: &BTreeMap<String, reconcile::Report>,
) -> (BTreeMap<String, reconcile::Reason>, Vec<reconcile::Reason>) {
    let mut waiting = BTreeMap::new();
    let mut new = Vec::new();
    for (name, r) in reports {
        let Some(reason) = reconcile::Reason::WAITING_FOR_PORT
            .iter()
            .find(|f| **f == r.reason)
        else {
            continue;
        };
        if before.get(name) != Some(reason) {
            new.push(*reason);
        }
        waiting.insert(name.clone(), *reason);
    }
    (waiting, new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Phase;
    use crate::reconcile::{Reason, Report};
    use crate::session::{Desired, Endpoint};

    fn reports(of: &[(&str, Reason)]) -> BTreeMap<String, Report> {
        of.iter()
            .map(|(name, reason)| {
                (
                    (*name).to_owned(),
                    Report {
                        phase: Phase::Pending,
                        reason: *reason,
                        message: String::new(),
                        target: None,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_wait_for_a_port_counts_once_not_once_per_pass() {
        let pass1 = reports(&[
            ("a", Reason::PoolExhausted),
            ("b", Reason::Allocating),
            ("c", Reason::Ready),
        ]);
        let (w, new) = waiting_for_ports(&BTreeMap::new(), &pass1);
        assert_eq!(new, [Reason::PoolExhausted]);
        // Still waiting, for the same reason: nothing new.
        let (w, new) = waiting_for_ports(&w, &pass1);
        assert!(new.is_empty());
        // Another reason counts; so does a second session starting to wait.
        let pass3 = reports(&[("a", Reason::PortInUse), ("b", Reason::PoolExhausted)]);
        let (w, mut new) = waiting_for_ports(&w, &pass3);
        new.sort_unstable();
        assert_eq!(new, [Reason::PoolExhausted, Reason::PortInUse]);
        // Served, then waiting again: a new wait.
        let (w, new) = waiting_for_ports(&w, &reports(&[("a", Reason::Starting)]));
        assert!(new.is_empty() && w.is_empty());
        let (_, new) = waiting_for_ports(&w, &reports(&[("a", Reason::PortConflict)]));
        assert_eq!(new, [Reason::PortConflict]);
    }

    #[test]
    fn a_session_that_goes_takes_its_restart_history_with_it() {
        let mut m = Memory::default();
        for s in ["kept", "leased", "gone"] {
            m.restarts.insert(
                s.into(),
                RestartState {
                    starts: 3,
                    last_start_ms: 0,
                    last_error: Some("proxy exited".into()),
                },
            );
        }
        let mut snapshot = Snapshot::default();
        let spec = crate::api::VncSessionSpec {
            target: crate::api::Target::tcp("127.0.0.1", 5901),
            ..crate::api::VncSessionSpec::default()
        };
        let want = Desired::from_spec("kept", &spec, crate::pool::PortRange::default())
            .expect("a valid spec");
        snapshot.desired.insert("kept".into(), want);
        let leased = BTreeMap::from([(
            "leased".to_owned(),
            crate::lease::Lease::new(
                "leased",
                6100,
                Endpoint::Tcp {
                    host: "127.0.0.1".into(),
                    port: 5901,
                },
                jiff::Timestamp::now(),
            ),
        )]);
        m.begin_pass(&snapshot, &leased, &BTreeMap::new());
        let left: Vec<&str> = m.restarts.keys().map(String::as_str).collect();
        assert_eq!(left, ["kept", "leased"]);
    }
}
