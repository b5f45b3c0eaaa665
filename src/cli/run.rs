//! `vncd run`: the standalone controller.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tracing::info;

use super::serve::{ServeArgs, seconds, shutdown_signal};
use super::{SessionsArgs, StateArgs, runtime};
use crate::console::Consoles;
use crate::controller::Controller;
use crate::http::console::{BearerToken, ConsoleApi};
use crate::http::{AppState, Health};
use crate::metrics::Metrics;
use crate::source::dir::DirSource;
use crate::source::policy::Policed;
use crate::status::StatusBuilder;
use crate::status::file::FileSink;
use crate::store::file::FileStore;
use crate::store::lock::LockGuard;

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub sessions: SessionsArgs,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub libvirt: super::libvirt::LibvirtArgs,
    /// Seconds to wait for another vncd to let go of the state directory.
    #[arg(long, env = "VNCD_LOCK_TIMEOUT", value_name = "SECONDS", value_parser = seconds, default_value = "10")]
    pub lock_timeout: Duration,
    /// Serve /healthz, /readyz, /metrics, /v1/status and /v1/sessions on this address
    /// (e.g. 127.0.0.1:9850) [default: off].
    #[arg(long, env = "VNCD_HTTP")]
    pub http: Option<SocketAddr>,
    /// Also serve `POST /v1/sessions/NAME/url` on --http, which mints console URLs for
    /// callers that send `Authorization: Bearer TOKEN`, TOKEN being this file's content
    /// (mode 0600; e.g. `openssl rand -hex 32`) [default: the route does not exist].
    #[arg(
        long,
        env = "VNCD_HTTP_TOKEN_FILE",
        value_name = "FILE",
        requires = "http"
    )]
    pub http_token_file: Option<PathBuf>,
    /// One `vncd-proxy` process per builtin session, as before the relay, instead of the
    /// one relay that serves them all (the default). Kept for one release so a host can go
    /// back; the relay replaces such proxies one at a time when this is dropped again.
    #[arg(
        long,
        env = "VNCD_PER_SESSION_PROXIES",
        conflicts_with_all = ["relay", "relay_socket", "gateway"]
    )]
    pub per_session_proxies: bool,
}

impl RunArgs {
    /// Resolves the data plane: the builtin backend is the relay unless
    /// --per-session-proxies asks for the old one; websockify keeps a process per session.
    fn resolve(mut self) -> Self {
        if self.serve.backend == super::serve::BackendKind::Builtin && !self.per_session_proxies {
            self.serve.relay = true;
        }
        self
    }
}

/// Records what this controller really runs with, for `vncd status | get | cleanup`
/// (written under the controller lock, so the record is always this instance's).
fn record_config(
    args: &RunArgs,
    state: &crate::store::file::StateDir,
    supervisor: &crate::supervisor::Supervisor,
    url: &crate::status::UrlStyle,
) -> anyhow::Result<()> {
    let pool = &args.serve.pool;
    crate::runconfig::RunConfig {
        format: crate::runconfig::FORMAT,
        vncd_version: env!("CARGO_PKG_VERSION").into(),
        sessions_dir: crate::runconfig::normalize(&args.sessions.sessions_dir),
        port_range: pool.port_range,
        max_sessions: pool.max_sessions,
        backend: supervisor.backend_name().into(),
        listen_address: args.serve.listen_address,
        public_host: url.public_host.clone(),
        libvirt: args.libvirt.libvirt_uri.clone(),
        web: url.web,
        tls: url.tls,
        ticket_ttl_seconds: args.serve.ticket_ttl.as_secs(),
        gateway: args.serve.gateway,
        gateway_url: args.serve.gateway_url(&url.public_host),
    }
    .write(state.root())?;
    Ok(())
}

/// The state directory, created and checked, with the proxies' owner marker (its
/// canonical path) and the controller lock that makes this the only `vncd run` on it.
fn claim_state(
    args: &RunArgs,
) -> anyhow::Result<(crate::store::file::StateDir, String, LockGuard)> {
    let state = args.state.dir();
    state.create()?;
    let owner = std::fs::canonicalize(state.root())
        .with_context(|| {
            format!(
                "cannot resolve state directory {}",
                args.state.state_dir.display()
            )
        })?
        .display()
        .to_string();
    let mut lock = LockGuard::acquire(&state.controller_lock(), args.lock_timeout)?;
    lock.record_pid()
        .with_context(|| format!("cannot write {}", state.controller_lock().display()))?;
    Ok((state, owner, lock))
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let args = args.resolve();
    // A libvirt flag on a build without libvirt: say how to get one, before any state.
    args.libvirt.check_built_in()?;
    // A bad token file is the caller's mistake: say so before touching any state.
    let bearer = args
        .http_token_file
        .as_deref()
        .map(BearerToken::load)
        .transpose()?;
    let (state, owner, lock) = claim_state(&args)?;
    let lock_timeout = args.lock_timeout;
    let config = args.serve.loop_config()?;
    let minter = args.serve.minter(state.root())?;
    let consoles = Consoles::default();
    let console_api = bearer.map(|token| ConsoleApi {
        minter: minter.clone(),
        consoles: consoles.clone(),
        token: std::sync::Arc::new(token),
    });
    let supervisor = args
        .serve
        .supervisor(owner.clone(), &state.root().join("logs"), &minter)?;
    let url = args.serve.url_style();
    let pool = args.serve.pool.clone();
    record_config(&args, &state, &supervisor, &url)?;
    let rt = runtime()?;
    rt.block_on(async move {
        let source = DirSource::watch(&args.sessions.sessions_dir, pool.port_range)?;
        let source = args.libvirt.source(source, pool.port_range).await?;
        // The manifests are root's: every target is allowed unless rules are given.
        let policy = args.serve.target_policy(false)?;
        let allow_target = policy.describe();
        let source = Policed::new(source, policy);
        let store = FileStore::new(state.clone(), lock_timeout);
        let sink = FileSink::new(state.sessions(), supervisor.backend_name());
        let health = Health::standalone();
        health.expect_passes_every(config.resync);
        let metrics = Metrics::new();
        if let Some(addr) = args.http {
            crate::http::serve_api(
                addr,
                AppState {
                    health: health.clone(),
                    metrics: Some(metrics.clone()),
                    urls: Some(url.clone()),
                    v1: true,
                    console: console_api,
                    metrics_elsewhere: None,
                },
            )
            .await?;
        }
        info!(
            sessions_dir = %args.sessions.sessions_dir.display(),
            state_dir = %owner,
            port_range = %pool.port_range,
            max_sessions = pool.max_sessions,
            backend = supervisor.backend_name(),
            allow_target = %allow_target,
            "vncd running"
        );
        let controller = Controller::new(
            source,
            store,
            sink,
            supervisor,
            StatusBuilder::new(url),
            config,
        )
        .with_metrics(metrics)
        .with_consoles(consoles)
        .with_synced(health.synced.clone())
        .with_pass_clock(health.passes.clone());
        controller.run(shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    drop(lock);
    Ok(ExitCode::SUCCESS)
}
