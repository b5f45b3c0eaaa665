//! Prometheus metrics, and the controller's last view for the HTTP API.
//!
//! The controller feeds [`Metrics`] from what it already has after each pass: the plan's
//! reports and actions, the leases it committed and the proxies it observed. `plan()`
//! stays pure; nothing here is read by the decision. `/metrics` renders the registry in the
//! Prometheus text format; the builtin proxies' per-session counters are read from their
//! stats files at scrape time (see `proxy::stats`), for the sessions leased at that moment.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::api::Phase;
use crate::proxy::stats::Snapshot;
use crate::reconcile::Reason;
use crate::status::{ActiveSession, SystemStatus};

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every phase, so each one is exported (as 0 when no session is in it).
pub const PHASES: [Phase; 5] = [
    Phase::Pending,
    Phase::Ready,
    Phase::Failed,
    Phase::Terminating,
    Phase::Expired,
];

/// A new lease could not be persisted (an allocation failure reason).
pub const STORE_ERROR: &str = "StoreError";

/// The `reason` values of `vncd_allocation_failures_total`: the plan's waits for a port
/// ([`Reason::WAITING_FOR_PORT`]) and [`STORE_ERROR`].
pub fn allocation_failure_reasons() -> impl Iterator<Item = &'static str> {
    Reason::WAITING_FOR_PORT
        .into_iter()
        .map(Reason::as_str)
        .chain([STORE_ERROR])
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabel {
    session: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    session: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionReasonLabel {
    session: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabel {
    component: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiCallLabel {
    verb: &'static str,
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiVerbLabel {
    verb: &'static str,
    kind: &'static str,
}

/// Kubernetes API calls by verb, kind and outcome, and how long they took. A handle the
/// Kubernetes adapters hold (cheap to clone), so every call is counted where it is made.
#[derive(Clone, Debug)]
pub struct ApiMetrics {
    calls: Family<ApiCallLabel, Counter>,
    durations: Family<ApiVerbLabel, Histogram, fn() -> Histogram>,
}

fn api_duration_histogram() -> Histogram {
    // 1 ms to ~33 s: a healthy call takes milliseconds, a timed-out one its deadline.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 16,
    ))
}

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics {
            calls: Family::default(),
            durations: Family::new_with_constructor(api_duration_histogram),
        }
    }
}

impl ApiMetrics {
    /// Counts one call; `outcome` is `ok` or an error label ([`crate::k8s::error_label`]).
    pub fn observe(
        &self,
        verb: &'static str,
        kind: &'static str,
        outcome: &'static str,
        took: Duration,
    ) {
        self.calls
            .get_or_create(&ApiCallLabel {
                verb,
                kind,
                outcome,
            })
            .inc();
        self.durations
            .get_or_create(&ApiVerbLabel { verb, kind })
            .observe(took.as_secs_f64());
    }

    /// Calls counted so far with these labels (for tests and benchmarks).
    pub fn count(&self, verb: &'static str, kind: &'static str, outcome: &'static str) -> u64 {
        self.calls
            .get_or_create(&ApiCallLabel {
                verb,
                kind,
                outcome,
            })
            .get()
    }
}

/// The port pool after a pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pool {
    pub total: usize,
    pub leased: usize,
    /// Leases whose port lies outside the pool (an earlier `--port-range`).
    pub outside: usize,
    /// In the pool, not leased, skipped for now: another program holds it (failed bind
    /// probe) or a libvirt domain may take it.
    pub quarantined: usize,
    pub max_sessions: usize,
}

impl Pool {
    /// Ports that could be leased now.
    pub fn free(&self) -> usize {
        self.total
            .saturating_sub(self.leased)
            .saturating_sub(self.quarantined)
    }
}

/// What the controller saw at the end of its last pass, for `/v1/status` and `/v1/sessions`.
/// Holds no tokens.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// False until the first full pass.
    pub synced: bool,
    pub status: SystemStatus,
    pub sessions: BTreeMap<String, ActiveSession>,
}

/// Where a live builtin session's counters come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatsSource {
    /// The stats file of its proxy process, read at scrape time.
    File {
        path: PathBuf,
        /// Only a file written by this very process counts.
        pid: u32,
    },
    /// What the relay reported at the controller's last pass.
    Reported(Snapshot),
}

impl StatsSource {
    fn read(&self) -> Option<Snapshot> {
        match self {
            StatsSource::File { path, pid } => Snapshot::read(path).filter(|s| s.pid == *pid),
            StatsSource::Reported(s) => Some(*s),
        }
    }
}

/// Reads the proxies' stats files at scrape time.
#[derive(Debug, Default)]
struct ProxyStats {
    sources: Mutex<BTreeMap<String, StatsSource>>,
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for ProxyStats {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sources = self.sources.lock().map(|s| s.clone()).unwrap_or_default();
        let snaps: Vec<(String, Snapshot)> = sources
            .into_iter()
            .filter_map(|(session, src)| src.read().map(|s| (session, s)))
            .collect();
        let label = |s: &str| SessionLabel {
            session: s.to_owned(),
        };
        let counter = ConstCounter::new(0u64);
        let gauge = ConstGauge::new(0i64);

        let mut m = encoder.encode_descriptor(
            "vncd_proxy_connections",
            "Websocket sessions the builtin proxy bridged to the VNC server, per session (since the proxy started).",
            None,
            counter.metric_type(),
        )?;
        for (session, s) in &snaps {
            ConstCounter::new(s.connections).encode(m.encode_family(&label(session))?)?;
        }
        let mut m = encoder.encode_descriptor(
            "vncd_proxy_active_connections",
            "Websocket sessions open now on the builtin proxy, per session.",
            None,
            gauge.metric_type(),
        )?;
        for (session, s) in &snaps {
            ConstGauge::new(as_i64(s.active)).encode(m.encode_family(&label(session))?)?;
        }
        let mut m = encoder.encode_descriptor(
            "vncd_proxy_refused_connections",
            "Websocket upgrades the builtin proxy refused (bad ticket, Origin or upgrade), per session.",
            None,
            counter.metric_type(),
        )?;
        for (session, s) in &snaps {
            ConstCounter::new(s.refused).encode(m.encode_family(&label(session))?)?;
        }
        let mut m = encoder.encode_descriptor(
            "vncd_proxy_ticket_refusals",
            "Websocket upgrades the builtin proxy refused for their console ticket, per session and reason (invalid: missing, malformed or forged; expired; replayed: used before).",
            None,
            counter.metric_type(),
        )?;
        for (session, s) in &snaps {
            for (reason, v) in [
                ("invalid", s.ticket_invalid),
                ("expired", s.ticket_expired),
                ("replayed", s.ticket_replayed),
            ] {
                let l = SessionReasonLabel {
                    session: session.clone(),
                    reason,
                };
                ConstCounter::new(v).encode(m.encode_family(&l)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "vncd_proxy_bytes",
            "Bytes the builtin proxy carried, per session and direction (to_vnc: client to VNC server; to_client: VNC server to client).",
            None,
            counter.metric_type(),
        )?;
        for (session, s) in &snaps {
            for (direction, v) in [
                ("to_vnc", s.bytes_to_target),
                ("to_client", s.bytes_to_client),
            ] {
                let l = DirectionLabel {
                    session: session.clone(),
                    direction,
                };
                ConstCounter::new(v).encode(m.encode_family(&l)?)?;
            }
        }
        Ok(())
    }
}

struct Inner {
    registry: Registry,
    pool_ports: Gauge,
    pool_leased: Gauge,
    pool_free: Gauge,
    pool_quarantined: Gauge,
    pool_outside: Gauge,
    max_sessions: Gauge,
    sessions: Family<PhaseLabel, Gauge>,
    allocations: Counter,
    allocation_failures: Family<ReasonLabel, Counter>,
    releases: Counter,
    proxy_starts: Counter,
    proxy_restarts: Counter,
    proxy_start_failures: Counter,
    orphans_reaped: Counter,
    pass_duration: Histogram,
    proxies: Arc<ProxyStats>,
    store_errors: Family<KindLabel, Counter>,
    errors: Family<ErrorLabel, Counter>,
    api: ApiMetrics,
    view: RwLock<View>,
}

impl Inner {
    /// Registers every metric with its help text (the table operators read in `/metrics`).
    fn register(&mut self) {
        let r = &mut self.registry;
        for (name, help, g) in [
            (
                "vncd_pool_ports",
                "Ports in the websocket port pool (--port-range)",
                &self.pool_ports,
            ),
            (
                "vncd_pool_leased_ports",
                "Pool ports leased to a session",
                &self.pool_leased,
            ),
            (
                "vncd_pool_free_ports",
                "Pool ports that could be leased now: not leased and not quarantined",
                &self.pool_free,
            ),
            (
                "vncd_pool_quarantined_ports",
                "Pool ports skipped for now: held by another program (failed bind probe, retried after 10 s) or reserved by a libvirt domain",
                &self.pool_quarantined,
            ),
            (
                "vncd_leases_outside_pool",
                "Leases whose port lies outside the pool (an earlier --port-range): they serve until no console is open, then move into the pool",
                &self.pool_outside,
            ),
            (
                "vncd_max_sessions",
                "Most sessions served at once (--max-sessions)",
                &self.max_sessions,
            ),
        ] {
            r.register(name, help, g.clone());
        }
        for (name, help, c) in [
            (
                "vncd_allocations",
                "Ports leased to sessions",
                &self.allocations,
            ),
            ("vncd_releases", "Port leases released", &self.releases),
            (
                "vncd_proxy_starts",
                "Proxy processes started (first starts and restarts)",
                &self.proxy_starts,
            ),
            (
                "vncd_proxy_restarts",
                "Proxy processes started again for a lease that already had one (crash, failed start, adoption of a dead proxy)",
                &self.proxy_restarts,
            ),
            (
                "vncd_proxy_start_failures",
                "Proxy processes that could not be spawned",
                &self.proxy_start_failures,
            ),
            (
                "vncd_orphans_reaped",
                "Orphaned proxies of this vncd (its marker, no lease) that were ended",
                &self.orphans_reaped,
            ),
        ] {
            r.register(name, help, c.clone());
        }
        r.register(
            "vncd_sessions",
            "Sessions by phase, including refused manifests (Failed)",
            self.sessions.clone(),
        );
        r.register(
            "vncd_allocation_failures",
            "Failed port allocations by reason (PoolExhausted, PortConflict, PortInUse: counted once each time a session starts waiting for that reason, and per failed bind probe; StoreError: the lease could not be persisted)",
            self.allocation_failures.clone(),
        );
        r.register(
            "vncd_reconcile_duration_seconds",
            "Time one controller pass takes: observe, plan, persist, act, report",
            self.pass_duration.clone(),
        );
        r.register(
            "vncd_store_errors",
            "Lease store failures by kind (io, corrupt, lock, invalid; in Kubernetes mode the API failure: timeout, forbidden, server_error, transport, ...)",
            self.store_errors.clone(),
        );
        r.register(
            "vncd_kube_api_requests",
            "Kubernetes API calls by verb, kind and outcome (ok, or the kind of failure)",
            self.api.calls.clone(),
        );
        r.register(
            "vncd_kube_api_request_duration_seconds",
            "Time Kubernetes API calls take, by verb and kind (bounded by the call timeout)",
            self.api.durations.clone(),
        );
        r.register(
            "vncd_errors",
            "Other failures by component and kind: source (dir, watch, libvirt: the desired sessions could not be read), spawn (log, exec, token, vanished, proxy_user: a proxy could not be started)",
            self.errors.clone(),
        );
        r.register_collector(Box::new(self.proxies.clone()));
    }
}

/// The metrics registry and the controller's last view. Cheap to clone; clones share all.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut inner = Inner {
            registry: Registry::default(),
            pool_ports: Gauge::default(),
            pool_leased: Gauge::default(),
            pool_free: Gauge::default(),
            pool_quarantined: Gauge::default(),
            pool_outside: Gauge::default(),
            max_sessions: Gauge::default(),
            sessions: Family::default(),
            allocations: Counter::default(),
            allocation_failures: Family::default(),
            releases: Counter::default(),
            proxy_starts: Counter::default(),
            proxy_restarts: Counter::default(),
            proxy_start_failures: Counter::default(),
            orphans_reaped: Counter::default(),
            // 1 ms to ~16 s: an idle pass takes a few ms, a burst of starts much longer.
            pass_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
            ),
            proxies: Arc::new(ProxyStats::default()),
            store_errors: Family::default(),
            errors: Family::default(),
            api: ApiMetrics::default(),
            view: RwLock::new(View::default()),
        };
        inner.register();
        // Every label value exists from the start, so rates and alerts see zeros.
        for p in PHASES {
            inner
                .sessions
                .get_or_create(&PhaseLabel {
                    phase: p.to_string(),
                })
                .set(0);
        }
        for reason in allocation_failure_reasons() {
            inner
                .allocation_failures
                .get_or_create(&ReasonLabel {
                    reason: reason.to_owned(),
                })
                .inc_by(0);
        }
        Metrics(Arc::new(inner))
    }

    pub fn set_pool(&self, pool: Pool) {
        let i = &self.0;
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        i.pool_ports.set(n(pool.total));
        i.pool_leased.set(n(pool.leased));
        i.pool_free.set(n(pool.free()));
        i.pool_quarantined.set(n(pool.quarantined));
        i.pool_outside.set(n(pool.outside));
        i.max_sessions.set(n(pool.max_sessions));
    }

    /// Counts the sessions' phases; every phase not seen is set to 0.
    pub fn set_phases(&self, phases: impl IntoIterator<Item = Phase>) {
        let mut counts = [0i64; PHASES.len()];
        for p in phases {
            if let Some(i) = PHASES.iter().position(|q| *q == p) {
                counts[i] += 1;
            }
        }
        for (p, v) in PHASES.iter().zip(counts) {
            self.0
                .sessions
                .get_or_create(&PhaseLabel {
                    phase: p.to_string(),
                })
                .set(v);
        }
    }

    pub fn allocated(&self, n: u64) {
        self.0.allocations.inc_by(n);
    }

    pub fn allocation_failed(&self, reason: &str) {
        self.0
            .allocation_failures
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn released(&self, n: u64) {
        self.0.releases.inc_by(n);
    }

    /// A proxy was started; `restart` if its lease already had one.
    pub fn proxy_started(&self, restart: bool) {
        self.0.proxy_starts.inc();
        if restart {
            self.0.proxy_restarts.inc();
        }
    }

    pub fn proxy_start_failed(&self) {
        self.0.proxy_start_failures.inc();
    }

    /// A lease store load or commit failed; `kind` is [`crate::store::StoreError::metric_label`].
    pub fn store_error(&self, kind: &'static str) {
        self.0.store_errors.get_or_create(&KindLabel { kind }).inc();
    }

    /// A failure of `component` (`source`, `spawn`) of kind `kind` (its `metric_label()`).
    pub fn error(&self, component: &'static str, kind: &'static str) {
        self.0
            .errors
            .get_or_create(&ErrorLabel { component, kind })
            .inc();
    }

    /// The handle the Kubernetes adapters count their API calls with.
    pub fn api(&self) -> ApiMetrics {
        self.0.api.clone()
    }

    pub fn orphan_reaped(&self) {
        self.0.orphans_reaped.inc();
    }

    pub fn observe_pass(&self, took: Duration) {
        self.0.pass_duration.observe(took.as_secs_f64());
    }

    /// The builtin proxies whose stats files `/metrics` reads.
    pub fn set_proxy_stats(&self, sources: BTreeMap<String, StatsSource>) {
        if let Ok(mut s) = self.0.proxies.sources.lock() {
            *s = sources;
        }
    }

    pub fn set_view(&self, view: View) {
        if let Ok(mut v) = self.0.view.write() {
            *v = view;
        }
    }

    pub fn view(&self) -> View {
        self.0.view.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// The Prometheus text format. Reads the proxies' stats files: call it off the
    /// async executor.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.0.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `name` (with its labels, as rendered), if present.
    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn renders_every_metric_with_help_and_type() {
        let m = Metrics::new();
        m.set_pool(Pool {
            total: 10,
            leased: 3,
            outside: 2,
            quarantined: 1,
            max_sessions: 800,
        });
        m.set_phases([Phase::Ready, Phase::Pending, Phase::Ready]);
        m.allocated(3);
        m.allocation_failed("PoolExhausted");
        m.allocation_failed("PoolExhausted");
        m.released(1);
        m.proxy_started(false);
        m.proxy_started(true);
        m.proxy_start_failed();
        m.orphan_reaped();
        m.observe_pass(Duration::from_millis(3));
        let t = m.render();
        for (name, v) in [
            ("vncd_pool_ports", 10.0),
            ("vncd_pool_leased_ports", 3.0),
            ("vncd_pool_free_ports", 6.0),
            ("vncd_pool_quarantined_ports", 1.0),
            ("vncd_leases_outside_pool", 2.0),
            ("vncd_max_sessions", 800.0),
            ("vncd_sessions{phase=\"Ready\"}", 2.0),
            ("vncd_sessions{phase=\"Pending\"}", 1.0),
            ("vncd_sessions{phase=\"Expired\"}", 0.0),
            ("vncd_allocations_total", 3.0),
            (
                "vncd_allocation_failures_total{reason=\"PoolExhausted\"}",
                2.0,
            ),
            ("vncd_releases_total", 1.0),
            ("vncd_allocation_failures_total{reason=\"StoreError\"}", 0.0),
            ("vncd_proxy_starts_total", 2.0),
            ("vncd_proxy_restarts_total", 1.0),
            ("vncd_proxy_start_failures_total", 1.0),
            ("vncd_orphans_reaped_total", 1.0),
            ("vncd_reconcile_duration_seconds_count", 1.0),
            ("vncd_reconcile_duration_seconds_bucket{le=\"0.004\"}", 1.0),
            ("vncd_reconcile_duration_seconds_bucket{le=\"0.002\"}", 0.0),
        ] {
            assert_eq!(sample(&t, name), Some(v), "{name} in\n{t}");
        }
        for family in [
            "vncd_pool_ports gauge",
            "vncd_sessions gauge",
            "vncd_allocations_total counter",
            "vncd_allocation_failures_total counter",
            "vncd_proxy_restarts_total counter",
            "vncd_orphans_reaped_total counter",
            "vncd_reconcile_duration_seconds histogram",
            "vncd_proxy_connections_total counter",
            "vncd_proxy_active_connections gauge",
            "vncd_proxy_bytes_total counter",
        ] {
            assert!(
                t.contains(&format!("# TYPE {family}\n")),
                "{family} in\n{t}"
            );
        }
        // Every family is documented.
        let types = t.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = t.lines().filter(|l| l.starts_with("# HELP vncd_")).count();
        assert_eq!(types, helps);
        assert!(
            t.lines()
                .all(|l| l.starts_with('#') || l.starts_with("vncd_"))
        );
    }

    #[test]
    fn proxy_counters_come_from_live_stats_files_or_the_relays_report() {
        let dir = tempfile::tempdir().unwrap();
        let snap = Snapshot {
            pid: 4242,
            connections: 3,
            active: 1,
            refused: 2,
            ticket_invalid: 0,
            ticket_expired: 0,
            ticket_replayed: 1,
            bytes_to_target: 10,
            bytes_to_client: 1000,
        };
        crate::proxy::stats::write(&dir.path().join("vm1.json"), &snap).unwrap();
        crate::proxy::stats::write(&dir.path().join("old.json"), &snap).unwrap();
        let m = Metrics::new();
        m.set_proxy_stats(BTreeMap::from([
            (
                "vm1".to_owned(),
                StatsSource::File {
                    path: dir.path().join("vm1.json"),
                    pid: 4242,
                },
            ),
            (
                // Left by an earlier process of the session: ignored.
                "old".to_owned(),
                StatsSource::File {
                    path: dir.path().join("old.json"),
                    pid: 1,
                },
            ),
            (
                "gone".to_owned(),
                StatsSource::File {
                    path: dir.path().join("gone.json"),
                    pid: 5,
                },
            ),
            (
                // Counted by the relay: as reported.
                "relayed".to_owned(),
                StatsSource::Reported(Snapshot {
                    connections: 7,
                    ..snap
                }),
            ),
        ]));
        let t = m.render();
        for (name, v) in [
            ("vncd_proxy_connections_total{session=\"vm1\"}", 3.0),
            ("vncd_proxy_connections_total{session=\"relayed\"}", 7.0),
            ("vncd_proxy_active_connections{session=\"vm1\"}", 1.0),
            ("vncd_proxy_refused_connections_total{session=\"vm1\"}", 2.0),
            (
                "vncd_proxy_ticket_refusals_total{session=\"vm1\",reason=\"replayed\"}",
                1.0,
            ),
            (
                "vncd_proxy_ticket_refusals_total{session=\"vm1\",reason=\"invalid\"}",
                0.0,
            ),
            (
                "vncd_proxy_bytes_total{session=\"vm1\",direction=\"to_vnc\"}",
                10.0,
            ),
            (
                "vncd_proxy_bytes_total{session=\"vm1\",direction=\"to_client\"}",
                1000.0,
            ),
        ] {
            assert_eq!(sample(&t, name), Some(v), "{name} in\n{t}");
        }
        assert!(!t.contains("session=\"old\""), "{t}");
        assert!(!t.contains("session=\"gone\""), "{t}");
    }
}
