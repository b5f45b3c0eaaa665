//! The control loop: observe -> plan -> persist -> act -> report.
//!
//! Generic over where desired state comes from ([`Source`]), where leases live
//! ([`LeaseStore`]) and where statuses go ([`StatusSink`]), so standalone and
//! Kubernetes modes run this very loop. The decision itself is [`reconcile::plan`].
//!
//! One pass, one stage per file:
//! - [`observe`]: scan proxies, probe ports, measure idle time: the plain inputs of `plan()`;
//! - `plan()`: the pure decision, grouped by stage ([`reconcile::Plan::staged`]);
//! - [`persist`]: commit lease changes before anything acts on them;
//! - [`act`]: stop proxies and orphans, then start what is missing;
//! - [`report`]: statuses from persisted leases only, metrics, the HTTP view.
//!
//! What the loop keeps between passes is one struct ([`memory::Memory`]); adapters and
//! configuration stay apart from it.

mod act;
mod memory;
mod observe;
mod persist;
mod report;

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::console::Consoles;
use crate::health::{PassClock, Synced};
use crate::metrics::Metrics;
use crate::reconcile::{self, Limits};
use crate::source::{Snapshot, Source};
use crate::status::{StatusBuilder, StatusSink};
use crate::store::{LeaseSet, LeaseStore, StoreError};
use crate::supervisor::{Exit, Supervisor};

use memory::Memory;

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
    // Adapters.
    source: S,
    store: L,
    sink: R,
    supervisor: Supervisor,
    statuses: StatusBuilder,
    metrics: Metrics,
    /// The consoles that are up, for whoever mints tickets (HTTP API, VncConsoleRequests).
    consoles: Consoles,
    /// Set after the first full pass, for a readiness probe.
    synced: Option<Synced>,
    /// Ticked after every pass, for a liveness probe that catches a hung loop.
    passes: Option<PassClock>,
    // Configuration.
    config: LoopConfig,
    // State: the persisted leases as last committed or loaded, and what passes remember.
    leases: LeaseSet,
    memory: Memory,
    exits: mpsc::UnboundedReceiver<Exit>,
    pass_count: u64,
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
            metrics: Metrics::default(),
            consoles: Consoles::default(),
            synced: None,
            passes: None,
            config,
            leases: LeaseSet::default(),
            memory: Memory::default(),
            exits: rx,
            pass_count: 0,
        }
    }

    /// Feeds `metrics` (and the view `/v1/*` serves) after every pass.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Publishes the leases whose proxies run to `consoles` after every pass.
    pub fn with_consoles(mut self, consoles: Consoles) -> Self {
        self.consoles = consoles;
        self
    }

    /// Sets `synced` once the first full pass is done (standalone readiness).
    pub fn with_synced(mut self, synced: Synced) -> Self {
        self.synced = Some(synced);
        self
    }

    /// Ticks `clock` after every pass (liveness: `/healthz` fails when the loop hangs).
    pub fn with_pass_clock(mut self, clock: PassClock) -> Self {
        self.passes = Some(clock);
        self
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
            if let Some(clock) = &self.passes {
                clock.completed();
            }
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
            if self.leases.leases.is_empty() {
                self.supervisor.end_relay();
            }
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
        self.memory
            .restarts
            .entry(exit.session)
            .or_default()
            .last_error = Some(msg);
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
                self.metrics.error("source", e.metric_label());
                error!(error = %e, "cannot read desired sessions; changing nothing this pass");
                return false;
            }
        };
        if let Some(set) = self.store.changed_since(self.leases.revision).await {
            info!(
                from = self.leases.revision,
                to = set.revision,
                "leases changed outside this controller (vncd cleanup); reloaded"
            );
            self.leases = set;
        }
        let busy = self.converge(&snapshot).await;
        if let Some(s) = &self.synced {
            s.set();
        }
        busy || snapshot.unsettled
    }

    /// One pass of observe -> plan -> persist -> act -> report, timed, in a `pass` span.
    async fn converge(&mut self, snapshot: &Snapshot) -> bool {
        self.pass_count += 1;
        let span = info_span!("pass", n = self.pass_count);
        let started = Instant::now();
        let busy = self.stages(snapshot).instrument(span).await;
        self.metrics.observe_pass(started.elapsed());
        busy
    }

    /// The stages in order; each is a method of its own file.
    async fn stages(&mut self, snapshot: &Snapshot) -> bool {
        let started = Instant::now();
        let seen = self.observe(snapshot);
        let plan =
            reconcile::plan(&seen.inputs(snapshot, &self.leases, &self.memory, self.config.limits));
        for reason in self.memory.count_waiting(&plan.reports) {
            self.metrics.allocation_failed(reason.as_str());
        }
        let staged = plan.staged();
        let persisted = match self
            .persist(snapshot, &staged.lease_ops)
            .instrument(info_span!("persist", ops = staged.lease_ops.len()))
            .await
        {
            persist::Persisted::Retry => return true,
            persist::Persisted::Failed => {
                self.act_while_store_fails(&staged).await;
                return true;
            }
            persist::Persisted::Done { changed } => changed,
        };
        let acted = self
            .act(&staged, seen.now_ms)
            .instrument(info_span!(
                "act",
                stops = staged.stops.len(),
                starts = staged.starts.len()
            ))
            .await;
        let report_started = Instant::now();
        self.report(snapshot, &seen.obs, &plan.reports, &acted)
            .instrument(info_span!("report", sessions = plan.reports.len()))
            .await;
        debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            observe_ms = seen.took_ms,
            spawn_ms = acted.spawn_ms,
            started = acted.started.len(),
            report_ms = report_started.elapsed().as_millis() as u64,
            actions = plan.actions.len(),
            "pass done"
        );
        plan.busy || persisted || acted.changed
    }
}
