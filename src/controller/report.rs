//! Stage 5, report: statuses from persisted leases only, then metrics and the HTTP view.

use std::collections::{BTreeMap, BTreeSet};

use super::Controller;
use super::act::Acted;
use crate::api::VncSession;
use crate::metrics;
use crate::reconcile::{ProxyState, Report};
use crate::source::{Snapshot, Source};
use crate::status::{ActiveSession, StatusSink, SystemStatus};
use crate::store::LeaseStore;
use crate::supervisor::Observation;

impl<S: Source, L: LeaseStore, R: StatusSink> Controller<S, L, R> {
    pub(super) async fn report(
        &mut self,
        snapshot: &Snapshot,
        obs: &Observation,
        reports: &BTreeMap<String, Report>,
        acted: &Acted,
    ) {
        let items = self.statuses.build(snapshot, reports, &self.leases.leases);
        self.sink.publish(&items).await;
        self.record(snapshot, obs, &items, acted);
    }

    /// Feeds the metrics and the HTTP view from this pass's facts; decides nothing.
    fn record(&self, snapshot: &Snapshot, obs: &Observation, items: &[VncSession], acted: &Acted) {
        let range = self.config.limits.range;
        let leases = &self.leases.leases;
        let leased_ports: BTreeSet<u16> = leases
            .values()
            .map(|l| l.port)
            .filter(|p| range.contains(*p))
            .collect();
        let quarantined = self
            .memory
            .busy_ports
            .keys()
            .chain(snapshot.reserved_ports.iter())
            .filter(|p| range.contains(**p) && !leased_ports.contains(p))
            .collect::<BTreeSet<_>>()
            .len();
        self.metrics.set_pool(metrics::Pool {
            total: range.len(),
            leased: leased_ports.len(),
            outside: leases.len().saturating_sub(leased_ports.len()),
            quarantined,
            max_sessions: self.config.limits.max_sessions,
        });
        self.metrics
            .set_phases(items.iter().filter_map(|i| i.status.as_ref()?.phase));
        // Alive now: observed running at the start of the pass and not stopped since, or
        // started during it.
        let alive = |session: &str| {
            acted.started.contains(session)
                || (matches!(obs.proxies.get(session), Some(ProxyState::Running { .. }))
                    && !acted.stopped.contains(session))
        };
        let live = leases.keys().filter(|s| alive(s)).count();
        // Consoles can be opened (tickets minted) for exactly the proxies alive now.
        self.consoles
            .publish(leases.values().filter(|l| alive(&l.session)));
        self.metrics.set_proxy_stats(
            leases
                .values()
                .filter(|l| alive(&l.session))
                .filter_map(|l| {
                    let pid = u32::try_from(l.process?.pid).ok()?;
                    let source = self.supervisor.stats_source(&l.session, pid)?;
                    Some((l.session.clone(), source))
                })
                .collect(),
        );
        self.metrics.set_view(metrics::View {
            synced: true,
            status: SystemStatus::new(
                range,
                leases,
                live,
                obs.orphans.len().saturating_sub(acted.orphans_reaped),
                true,
            ),
            sessions: leases
                .iter()
                .map(|(name, l)| (name.clone(), ActiveSession::of(l)))
                .collect(),
        });
    }
}
