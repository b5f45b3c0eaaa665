//! The relay's state: the applied table, the live sessions, and performing a converge.
//!
//! [`Relay`] is the handle the control socket (and an in-process test or a controller
//! that embeds the relay) uses: [`Relay::declare`] and [`Relay::report`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::admission;
use super::control::{Applied, Declaration, RelayInfo, Report, SessionReport};
use super::listener::{self, Common, Gatekeeper};
use super::probe;
use super::session::{Live, SessionError, lock};
use super::table::{self, Change, Converged, SessionSpec, Table, TargetSpec};
use crate::proxy::conn::Console;
use crate::proxy::refusals::Refusals;

/// How often the relay checks deadlines, idle sessions, probes and failed listeners.
const TICK: Duration = Duration::from_millis(500);
/// How often a session whose port was busy tries to listen again.
const RETRY_BIND: Duration = Duration::from_secs(2);

/// What a relay is configured with at start (not by declaration).
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Where used tickets are recorded: one directory per session.
    pub nonce_root: PathBuf,
    pub admission: admission::Config,
    pub ping_every: Duration,
    /// The soft RLIMIT_NOFILE, to warn when a declaration needs more descriptors.
    pub nofile: Option<u64>,
}

/// The relay: cheap to clone, every clone is the same relay.
#[derive(Debug, Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: RelayConfig,
    started_unix: u64,
    /// Serializes declarations (held across binds).
    table: tokio::sync::Mutex<Table>,
    applied_version: Mutex<u64>,
    live: Mutex<BTreeMap<String, Arc<Live>>>,
    by_lease: Mutex<HashMap<String, Arc<Live>>>,
    common: Common,
    stop_tx: watch::Sender<bool>,
    kick: Notify,
    /// The gateway served now: its address and its accept task.
    gateway: Mutex<Option<(SocketAddr, tokio::task::JoinHandle<()>)>>,
}

impl Relay {
    pub fn new(config: RelayConfig) -> Relay {
        let (stop_tx, stop) = watch::channel(false);
        let common = Common {
            keeper: Gatekeeper::new(config.admission),
            refusals: Arc::new(Refusals::default()),
            ping_every: config.ping_every,
            serving: Arc::default(),
            stop,
        };
        Relay {
            inner: Arc::new(Inner {
                config,
                started_unix: crate::ticket::unix_now(),
                table: tokio::sync::Mutex::new(Table::default()),
                applied_version: Mutex::new(0),
                live: Mutex::new(BTreeMap::new()),
                by_lease: Mutex::new(HashMap::new()),
                common,
                stop_tx,
                kick: Notify::new(),
                gateway: Mutex::new(None),
            }),
        }
    }

    /// Converges to the whole desired set `sessions` at `version` (see [`table::converge`])
    /// and to the declared `gateway` (none: a served one closes).
    pub async fn declare(&self, d: Declaration) -> Applied {
        let Declaration {
            version,
            sessions,
            gateway,
            serving,
        } = d;
        let mut table = self.inner.table.lock().await;
        let plan = match table::converge(&table, version, &sessions) {
            Converged::Stale { applied } => {
                return Applied {
                    version,
                    applied_version: applied,
                    changed: false,
                    errors: BTreeMap::new(),
                    gateway_error: None,
                    serving_error: None,
                };
            }
            Converged::Plan(p) => p,
        };
        // Before the sessions: a connection accepted on a newly opened port already gets
        // the declared TLS and origins.
        let serving_error = self.inner.common.serving.apply(serving);
        let mut errors: BTreeMap<String, String> = plan
            .errors
            .iter()
            .map(|(n, e)| (n.clone(), e.to_string()))
            .collect();
        for (name, change) in &plan.changes {
            let spec = plan.table.sessions.get(name).cloned();
            if let Err(e) = self.perform(name, *change, spec).await {
                errors.insert(name.clone(), e.to_string());
            }
        }
        *table = plan.table;
        *lock(&self.inner.applied_version) = version;
        self.index_leases();
        self.check_nofile();
        let opened = plan
            .changes
            .values()
            .filter(|c| **c == Change::Open)
            .count();
        let closed = plan
            .changes
            .values()
            .filter(|c| **c == Change::Close)
            .count();
        info!(
            version,
            sessions = table.sessions.len(),
            opened,
            closed,
            errors = errors.len(),
            "declaration applied"
        );
        for e in errors.values() {
            warn!(error = %e, "session not (fully) applied");
        }
        self.inner.kick.notify_one();
        let gateway_error = self.converge_gateway(gateway).await;
        Applied {
            version,
            applied_version: version,
            changed: true,
            errors,
            gateway_error,
            serving_error,
        }
    }

    /// Serves the gateway at `want` (or none). An unchanged address keeps its listener and
    /// its connections; a moved one closes the old listener (connections it accepted stay
    /// open: they belong to their sessions) and binds the new one. Returns why `want`
    /// could not be bound; the old gateway is then closed all the same, so the relay never
    /// serves an address the controller no longer declares.
    async fn converge_gateway(&self, want: Option<SocketAddr>) -> Option<String> {
        let current = lock(&self.inner.gateway).as_ref().map(|(a, _)| *a);
        if current == want {
            return None;
        }
        let old = lock(&self.inner.gateway).take();
        if let Some((addr, task)) = old {
            task.abort();
            // Awaited, so the port is closed (the listener dropped) when the declaration
            // is answered; a move to a port on the same address can then bind it.
            let _ = task.await;
            info!(gateway = %addr, "gateway closed");
        }
        let addr = want?;
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let bound = l.local_addr().unwrap_or(addr);
                let me = self.clone();
                let route: super::handler::Route = Arc::new(move |t| me.route(t));
                let task = listener::spawn_gateway(l, route, self.inner.common.clone());
                info!(gateway = %bound, "gateway listening");
                *lock(&self.inner.gateway) = Some((addr, task));
                None
            }
            Err(e) => {
                let message = format!("cannot listen on the gateway {addr}: {e}");
                warn!(error = %message, "gateway not served");
                Some(message)
            }
        }
    }

    async fn perform(
        &self,
        name: &str,
        change: Change,
        spec: Option<SessionSpec>,
    ) -> Result<(), SessionError> {
        let existing = lock(&self.inner.live).get(name).cloned();
        match (change, existing, spec) {
            (Change::Close, Some(live), _) => {
                lock(&self.inner.live).remove(name);
                live.close().await;
                info!(session = name, "session closed");
            }
            // Open, or kept but never created (its used-ticket directory failed before).
            (Change::Open, _, Some(spec)) | (Change::Keep, None, Some(spec)) => {
                let live = Arc::new(Live::new(
                    spec,
                    &self.inner.config.nonce_root,
                    self.inner.config.ping_every,
                )?);
                lock(&self.inner.live).insert(name.to_owned(), live.clone());
                self.listen(&live).await?;
            }
            (Change::Reopen, Some(live), Some(spec)) => {
                if let Some(t) = live.take_listener() {
                    let _ = t.await;
                }
                live.restart(spec);
                self.listen(&live).await?;
            }
            (Change::Restart, Some(live), Some(spec)) => live.restart(spec),
            (Change::Rekey, Some(live), Some(spec)) => live.rekey(spec),
            (Change::Update, Some(live), Some(spec)) => live.update(spec),
            (Change::Keep, Some(live), _) if !live.listening() => self.listen(&live).await?,
            _ => {}
        }
        Ok(())
    }

    /// Opens the session's listener; on failure the session stays, not listening, with
    /// the error reported (and retried, see [`Relay::maintain`]).
    async fn listen(&self, live: &Arc<Live>) -> Result<(), SessionError> {
        let spec = live.spec();
        let addr = SocketAddr::new(spec.listen, spec.port);
        match listener::bind(addr).await {
            Ok(l) => {
                let task = listener::spawn_session(l, live.clone(), self.inner.common.clone());
                live.set_listener(task);
                Ok(())
            }
            Err(source) => {
                let e = SessionError::Bind {
                    name: live.name.clone(),
                    addr,
                    source,
                };
                *lock(&live.error) = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn index_leases(&self) {
        let live = lock(&self.inner.live);
        let index = live
            .values()
            .map(|l| (l.spec().lease_uid, l.clone()))
            .collect();
        *lock(&self.inner.by_lease) = index;
    }

    /// Warns when the declared set may need more descriptors than RLIMIT_NOFILE allows.
    fn check_nofile(&self) {
        let Some(limit) = self.inner.config.nofile else {
            return;
        };
        let live = lock(&self.inner.live);
        let authenticated: u64 = live
            .values()
            .map(|l| u64::from(l.spec().limits.max_connections))
            .sum();
        // A listener each, two sockets per bridged connection, the pending ones, slack.
        let needed = live.len() as u64
            + 2 * authenticated.min(100_000)
            + self.inner.config.admission.global as u64
            + 64;
        if limit < needed {
            warn!(
                limit,
                needed,
                sessions = live.len(),
                "RLIMIT_NOFILE is lower than the declared sessions may need; raise the hard limit (LimitNOFILE= in the unit)"
            );
        }
    }

    /// The console the gateway routes `token` to: the session whose lease the ticket names.
    pub(crate) fn route(&self, token: Option<&[u8]>) -> Option<Arc<Console>> {
        let text = std::str::from_utf8(token?).ok()?;
        // One lookup and, in the upgrade check, one MAC with that lease's key.
        let uid = crate::ticket::lease_uid_of(text)?;
        let live = lock(&self.inner.by_lease).get(uid).cloned()?;
        live.console(crate::ticket::unix_now())
    }

    /// What the relay observes now.
    pub fn report(&self) -> Report {
        let live: Vec<Arc<Live>> = lock(&self.inner.live).values().cloned().collect();
        // With a declared certificate that never loaded, every connection is closed at
        // once: no session is served, whatever its listener does.
        let unusable = self.inner.common.serving.unusable();
        let sessions = live
            .iter()
            .map(|l| {
                let spec = l.spec();
                let snap = l.counters.snapshot();
                let authenticated = l.authenticated();
                let probe = lock(&l.probe).clone();
                let (reachable, target_error) = if authenticated > 0 {
                    (Some(true), None)
                } else {
                    (probe.reachable, probe.error)
                };
                let last = l.counters.last_activity();
                let report = SessionReport {
                    port: spec.port,
                    lease_uid: spec.lease_uid,
                    listening: l.listening() && !unusable,
                    connections: l.open_connections(),
                    authenticated,
                    bytes_in: snap.bytes_to_target,
                    bytes_out: snap.bytes_to_client,
                    last_activity_unix: (last > 0).then_some(last),
                    target_reachable: reachable,
                    target_error,
                    error: lock(&l.error).clone(),
                    target: Some(spec.target),
                    counters: Some(snap),
                };
                (l.name.clone(), report)
            })
            .collect();
        Report {
            relay: RelayInfo {
                pid: std::process::id(),
                started_unix: self.inner.started_unix,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pending: self.inner.common.keeper.pending(),
            },
            applied_version: *lock(&self.inner.applied_version),
            sessions,
            gateway: lock(&self.inner.gateway)
                .as_ref()
                .map(|(a, _)| a.to_string()),
            serving: self.inner.common.serving.spec(),
            serving_error: self.inner.common.serving.error(),
        }
    }

    /// Deadlines, idle timeouts, probes and listeners to retry, until the relay stops.
    pub(crate) async fn maintain(&self) {
        let mut stop = self.inner.common.stop.clone();
        let mut last_retry = Instant::now();
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                () = tokio::time::sleep(TICK) => {}
                () = self.inner.kick.notified() => {}
            }
            let now = Instant::now();
            let now_unix = crate::ticket::unix_now();
            self.inner.common.serving.refresh();
            let live: Vec<Arc<Live>> = lock(&self.inner.live).values().cloned().collect();
            let retry = now.duration_since(last_retry) >= RETRY_BIND;
            if retry {
                last_retry = now;
            }
            let mut probes: HashMap<TargetSpec, Vec<Arc<Live>>> = HashMap::new();
            for l in live {
                self.deadlines(&l, now_unix);
                if probe_due(&l, now) {
                    probes.entry(l.spec().target).or_default().push(l.clone());
                }
                if retry && !l.listening() && lock(&l.error).is_some() {
                    let _ = self.listen(&l).await;
                }
            }
            for (target, sessions) in probes {
                tokio::spawn(async move {
                    let outcome = probe::probe(&target.to_target()).await;
                    for l in sessions {
                        lock(&l.probe).finished(&outcome);
                    }
                });
            }
        }
    }

    /// Expiry and idle timeout, enforced by the relay itself so that a dead controller
    /// does not keep a console open forever.
    fn deadlines(&self, l: &Arc<Live>, now_unix: u64) {
        let spec = l.spec();
        if l.authenticated() == 0 {
            return;
        }
        let expired = spec.limits.expires_at.is_some_and(|e| now_unix >= e);
        let idle = spec
            .limits
            .idle_timeout_secs
            .is_some_and(|t| now_unix.saturating_sub(l.counters.last_activity()) >= t);
        if expired || idle {
            info!(
                session = %l.name,
                reason = if expired { "expired" } else { "idle timeout" },
                "ending the session's connections"
            );
            l.end_connections();
        }
    }

    /// Stops the relay: no more accepts, every connection ends.
    pub(crate) async fn shutdown(&self) {
        let _ = self.inner.stop_tx.send(true);
        if let Some((_, task)) = lock(&self.inner.gateway).take() {
            task.abort();
        }
        let live: Vec<Arc<Live>> = lock(&self.inner.live).values().cloned().collect();
        for l in live {
            l.close().await;
        }
    }

    /// TCP connections open now over all sessions.
    pub(crate) fn open_connections(&self) -> usize {
        lock(&self.inner.live)
            .values()
            .map(|l| l.open_connections())
            .sum()
    }

    pub(crate) fn refusals(&self) -> Arc<Refusals> {
        self.inner.common.refusals.clone()
    }

    pub(crate) fn stop_signal(&self) -> watch::Receiver<bool> {
        self.inner.common.stop.clone()
    }
}

/// Whether `l`'s target is to be probed now (and marks the probe started if so).
fn probe_due(l: &Arc<Live>, now: Instant) -> bool {
    let authenticated = l.authenticated();
    let mut p = lock(&l.probe);
    if authenticated > 0 {
        p.bridged();
        return false;
    }
    if !p.due(now, authenticated) {
        return false;
    }
    p.started(now);
    true
}
