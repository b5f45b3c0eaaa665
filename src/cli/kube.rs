//! `vncd kube`: the controller in Kubernetes mode, one instance per node (DaemonSet).
//!
//! The same core as `vncd run`, with the Kubernetes adapters: sessions are the VncSessions
//! whose `spec.nodeName` is this node (a field selector, so each node receives only its
//! share), leases live in their statuses, statuses and events go to the API server.
//! Before the controller starts, the instance takes the node lease `vncd-NODE`; a second
//! instance for the same node waits passively until the holder stops renewing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{error, info};

use super::runtime;
use super::serve::{ServeArgs, seconds, shutdown_signal};
use crate::api::VncSession;
use crate::console::{Consoles, Minter};
use crate::controller::Controller;
use crate::http::{AppState, Health};
use crate::k8s::call::Metered;
use crate::k8s::crd;
use crate::k8s::events::Events;
use crate::k8s::janitor::{self, JanitorConfig};
use crate::k8s::node_lease::{LeaseConfig, NodeLease};
use crate::k8s::objects::Objects;
use crate::k8s::writer::Writer;
use crate::session::is_valid_name;
use crate::source::filter::Filtered;
use crate::source::kube::KubeSource;
use crate::source::policy::{Policed, TargetPolicy};
use crate::source::quota::NamespaceQuota;
use crate::status::StatusBuilder;
use crate::status::kube::KubeStatusSink;
use crate::store::kube_status::KubeStatusStore;

#[derive(Debug, Args)]
pub struct KubeArgs {
    /// The node this instance serves: it takes the VncSessions whose spec.nodeName is this
    /// (in a DaemonSet, the pod's spec.nodeName via the downward API).
    #[arg(long, env = "VNCD_NODE_NAME")]
    pub node_name: String,
    /// Serve only this namespace's sessions [default: all namespaces].
    #[arg(long, env = "VNCD_NAMESPACE")]
    pub namespace: Option<String>,
    /// Namespace of the node lease vncd-NODE [default: $POD_NAMESPACE, else kube-system].
    #[arg(long, env = "VNCD_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Seconds a silent holder keeps the node lease before a standby takes over.
    #[arg(long, env = "VNCD_LEASE_DURATION", value_name = "SECONDS", value_parser = seconds, default_value = "15")]
    pub lease_duration: Duration,
    /// Also serve the unauthenticated `/v1/status` and `/v1/sessions` on `--http` [default:
    /// off: the API server holds that state behind RBAC, and `--http` usually listens on
    /// the node's addresses; /healthz, /readyz and /metrics are always served].
    #[arg(long, env = "VNCD_HTTP_API")]
    pub http_api: bool,
    /// Seconds a node must be gone (no Node object, its node lease not renewed) before
    /// one elected instance removes its sessions' finalizers and marks them NodeGone, so
    /// deleting them (or their namespace) does not hang; 0 turns this off.
    #[arg(long, env = "VNCD_NODE_GONE_GRACE", value_name = "SECONDS", value_parser = seconds, default_value = "300")]
    pub node_gone_grace: Duration,
    /// This instance's name in the node lease [default: $POD_NAME, else HOSTNAME-PID].
    #[arg(long, env = "VNCD_IDENTITY")]
    pub identity: Option<String>,
    /// Serve /healthz and /readyz on this address (e.g. 0.0.0.0:9850).
    #[arg(long, env = "VNCD_HTTP")]
    pub http: Option<SocketAddr>,
    /// Serve /metrics on this address instead of on `--http` (e.g. 127.0.0.1:9851). The
    /// metrics name every session and its traffic; the chart binds them to loopback while
    /// `--http` stays on the node's addresses for the kubelet's probes.
    #[arg(long, env = "VNCD_METRICS", value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Where proxy logs go: STATE_DIR/logs/NAMESPACE/NAME.log (leases live in the API
    /// server, not here).
    #[arg(long, env = "VNCD_STATE_DIR", default_value = "/var/lib/vncd")]
    pub state_dir: PathBuf,
    /// The most sessions one namespace may hold on this node [default: no limit]. The
    /// newest past it, by creation time, wait as Pending (NamespaceQuotaExceeded) with no
    /// port, and converge when their namespace drops below it; a restart never reorders
    /// them. Namespaces are tenants: this keeps one from leasing every port of the pool.
    #[arg(long, env = "VNCD_MAX_SESSIONS_PER_NAMESPACE", value_name = "N")]
    pub max_sessions_per_namespace: Option<std::num::NonZeroUsize>,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub console: super::kube_console::ConsoleRequestArgs,
}

/// Why `vncd kube` stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("--node-name {0:?} is not a valid node name")]
    NodeName(String),
    #[error(
        "cannot configure a Kubernetes client (KUBECONFIG, ~/.kube/config or the in-cluster service account): {0}"
    )]
    Client(#[source] kube::Error),
    #[error("{0}; stopped serving so the new holder alone writes this node's sessions")]
    LeaseLost(String),
}

fn default_identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            format!(
                "{}-{}",
                super::serve::default_public_host(),
                std::process::id()
            )
        })
}

fn lease_namespace(flag: Option<String>) -> String {
    flag.or_else(|| std::env::var("POD_NAMESPACE").ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "kube-system".into())
}

/// Resolves once `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

pub fn kube(args: KubeArgs) -> anyhow::Result<ExitCode> {
    // In a pod, a relay this vncd started would end with the container: vncd kube only
    // talks to one that runs on its own (the chart's relay DaemonSet), on a socket path
    // both pods share.
    anyhow::ensure!(
        !args.serve.relay || args.serve.relay_socket.is_some(),
        "vncd kube --relay needs --relay-socket PATH: the relay runs on its own (the chart's relay DaemonSet), not inside the controller's pod"
    );
    let node = args.node_name.clone();
    if !is_valid_name(&node) {
        return Err(KubeError::NodeName(node).into());
    }
    let log_dir = args.state_dir.join("logs");
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("cannot create proxy log directory {}", log_dir.display()))?;
    // In a DaemonSet the state dir is the pod's emptyDir: the key lives exactly as long
    // as the proxies it serves, and a restarted container finds it again.
    let minter = args.serve.minter(&args.state_dir)?;
    let plan = Setup {
        config: args.serve.loop_config()?,
        // Every instance for this node marks its proxies alike, so a successor adopts them.
        supervisor: args
            .serve
            .supervisor(format!("kube:{node}"), Path::new(&log_dir), &minter)?,
        minter,
        consoles: Consoles::default(),
        url: args.serve.url_style(),
        policy: args.serve.target_policy(true)?,
        lease: LeaseConfig {
            namespace: lease_namespace(args.lease_namespace.clone()),
            node,
            identity: args.identity.clone().unwrap_or_else(default_identity),
            duration: args.lease_duration,
        },
    };
    runtime()?.block_on(serve(args, plan))
}

/// What `vncd kube` builds from its flags before it talks to the API server.
struct Setup {
    config: crate::controller::LoopConfig,
    supervisor: crate::supervisor::Supervisor,
    /// Mints console URLs (the VncConsoleRequest responder uses it).
    minter: Minter,
    /// The consoles that are up, published by the controller after each pass.
    consoles: Consoles,
    url: crate::status::UrlStyle,
    lease: LeaseConfig,
    /// VncSession creators are tenants: each --allow-target rule names its namespace, and
    /// with none no target is allowed.
    policy: TargetPolicy,
}

/// The API client, the sessions' API, the metrics and the probes, once connected.
struct Connected {
    client: Client,
    api: Api<VncSession>,
    health: Health,
    metrics: crate::metrics::Metrics,
    metered: Metered,
}

/// Connects, checks the CRD and starts the probes (before the node lease, so a standby
/// instance answers /healthz and says why it is not ready).
async fn connect(args: &KubeArgs, url: &crate::status::UrlStyle) -> anyhow::Result<Connected> {
    let client = Client::try_default().await.map_err(KubeError::Client)?;
    let (api, scope): (Api<VncSession>, String) = match &args.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            format!(" in namespace {ns:?}"),
        ),
        None => (Api::all(client.clone()), String::new()),
    };
    crd::check(&api, &scope).await?;
    let health = Health::default();
    let metrics = crate::metrics::Metrics::new();
    if let Some(addr) = args.http {
        crate::http::serve_api(
            addr,
            AppState {
                health: health.clone(),
                metrics: Some(metrics.clone()),
                urls: Some(url.clone()),
                v1: args.http_api,
                // Kubernetes users get URLs through VncConsoleRequests (RBAC), not here.
                console: None,
                metrics_elsewhere: args.metrics,
            },
        )
        .await?;
    }
    if let Some(addr) = args.metrics {
        crate::http::serve_metrics(addr, metrics.clone()).await?;
    }
    let metered = Metered::new(metrics.api());
    Ok(Connected {
        client,
        api,
        health,
        metrics,
        metered,
    })
}

async fn serve(args: KubeArgs, setup: Setup) -> anyhow::Result<ExitCode> {
    let (stop_tx, stop) = watch::channel(false);
    crate::task::spawn(tracing::info_span!("signals"), async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let c = connect(&args, &setup.url).await?;
    c.health.expect_passes_every(setup.config.resync);
    let lease_cfg = setup.lease.clone();
    let _janitor = start_janitor(&args, &c, &lease_cfg);
    info!(node = %lease_cfg.node, lease = %lease_cfg.name(), namespace = %lease_cfg.namespace, identity = %lease_cfg.identity, "taking the node lease");
    let held = tokio::select! {
        held = NodeLease::new(c.client.clone(), lease_cfg.clone(), c.metered.clone()).acquire() => held,
        () = stopped(stop.clone()) => return Ok(ExitCode::SUCCESS),
    };
    c.health.set_leader(true);
    let node = lease_cfg.node.as_str();
    let objects = Objects::default();
    let writer = Writer::new(c.client.clone(), c.metered.clone());
    let events = Events::start(c.client.clone(), node, c.metered.clone());
    let source = KubeSource::start(
        c.api.clone(),
        node,
        args.serve.pool.port_range,
        objects.clone(),
    );
    tokio::select! {
        () = source.synced() => {}
        () = stopped(stop.clone()) => {
            held.release().await;
            return Ok(ExitCode::SUCCESS);
        }
    }
    let watch_stats = source.stats();
    // The VncConsoleRequest responder (issue #12): see cli/kube_console.rs.
    let (_responder, console_counts) = super::kube_console::start(
        &args.console,
        &super::kube_console::ConsoleWiring {
            client: &c.client,
            namespace: args.namespace.as_deref(),
            node,
            objects: &objects,
            metered: &c.metered,
            minter: &setup.minter,
            consoles: &setup.consoles,
        },
    );
    let (store, sink) = adapters(&c, &writer, objects, node, &setup.url, &events);
    info!(
        node = %node,
        namespace = args.namespace.as_deref().unwrap_or("(all)"),
        port_range = %args.serve.pool.port_range,
        max_sessions = args.serve.pool.max_sessions,
        backend = setup.supervisor.backend_name(),
        allow_target = %setup.policy.describe(),
        max_sessions_per_namespace = args.max_sessions_per_namespace.map(std::num::NonZeroUsize::get),
        "vncd kube running"
    );
    let controller = Controller::new(
        Filtered::new(
            Policed::new(source, setup.policy),
            args.max_sessions_per_namespace.map(NamespaceQuota::new),
        ),
        store,
        sink,
        setup.supervisor,
        StatusBuilder::new(setup.url),
        setup.config,
    )
    .with_metrics(c.metrics)
    .with_consoles(setup.consoles.clone())
    .with_pass_clock(c.health.passes.clone());
    let mut lost = None;
    let shutdown = async {
        tokio::select! {
            () = stopped(stop.clone()) => {}
            why = held.lost() => lost = Some(why),
        }
    };
    let result = controller.run(shutdown).await;
    c.health.set_leader(false);
    log_totals(&writer, &events, &watch_stats, &console_counts);
    result?;
    hand_over(lost, held).await
}

/// After the controller stopped: an error if the node lease was lost (another instance may
/// serve the node already), else the lease is released so a successor takes over at once.
async fn hand_over(
    lost: Option<String>,
    held: crate::k8s::node_lease::HeldLease,
) -> anyhow::Result<ExitCode> {
    match lost {
        Some(why) => {
            error!(reason = %why, "lost the node lease");
            Err(KubeError::LeaseLost(why).into())
        }
        None => {
            held.release().await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The Kubernetes lease store and status sink of `node`, sharing one object cache, one
/// counted writer and one event publisher.
fn adapters(
    c: &Connected,
    writer: &Writer,
    objects: Objects,
    node: &str,
    url: &crate::status::UrlStyle,
    events: &Events,
) -> (KubeStatusStore, KubeStatusSink) {
    let store = KubeStatusStore::new(
        c.api.clone(),
        writer.clone(),
        objects.clone(),
        node,
        url.clone(),
        events.clone(),
    );
    let sink = KubeStatusSink::new(
        writer.clone(),
        objects,
        node,
        url.clone(),
        events.clone(),
        c.health.synced.clone(),
    );
    (store, sink)
}

/// Starts the janitor for sessions of nodes that are gone, unless `--node-gone-grace 0`.
fn start_janitor(args: &KubeArgs, c: &Connected, lease: &LeaseConfig) -> Option<AbortOnDrop> {
    if args.node_gone_grace.is_zero() {
        return None;
    }
    let cfg = JanitorConfig {
        namespace: lease.namespace.clone(),
        identity: lease.identity.clone(),
        grace: args.node_gone_grace,
        every: (args.node_gone_grace / 4)
            .clamp(Duration::from_millis(500), Duration::from_secs(30)),
        lease_duration: lease.duration,
    };
    let writer = Writer::new(c.client.clone(), c.metered.clone());
    Some(AbortOnDrop(crate::task::spawn(
        tracing::info_span!("janitor"),
        janitor::run(
            c.client.clone(),
            c.api.clone(),
            cfg,
            writer,
            c.metered.clone(),
        ),
    )))
}

/// A background task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The exit log: what this instance wrote, what its watch delivered and how many console
/// requests it answered and collected.
fn log_totals(
    writer: &Writer,
    events: &Events,
    watch_stats: &crate::source::kube::WatchStats,
    consoles: &crate::k8s::console::ResponderCounts,
) {
    let (status_writes, finalizer_writes, conflicts) = writer.counts().summary();
    info!(
        status_writes,
        finalizer_writes,
        conflicts,
        console_answers = consoles.answers.load(Ordering::Relaxed),
        console_deletes = consoles.deletes.load(Ordering::Relaxed),
        events = events.published(),
        watch_events = watch_stats.events.load(Ordering::Relaxed),
        watch_objects = watch_stats.distinct.load(Ordering::Relaxed),
        watch_foreign = watch_stats.foreign.load(Ordering::Relaxed),
        "vncd kube stopped"
    );
}
