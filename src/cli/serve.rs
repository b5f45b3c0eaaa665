//! Flags shared by the two controllers, `vncd run` (standalone) and `vncd kube`: the port
//! pool, the proxy backend, addresses and timeouts. Both build the same core from them.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tracing::info;

use super::PoolArgs;
use crate::controller::LoopConfig;
use crate::reconcile::Limits;
use crate::status::UrlStyle;
use crate::supervisor::websockify::Websockify;
use crate::supervisor::{Backend, Supervisor};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum BackendKind {
    /// websockify (Python), one process per session.
    Websockify,
}

/// How a controller serves sessions.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Which proxy serves each session.
    #[arg(long, env = "VNCD_BACKEND", value_enum, default_value_t = BackendKind::Websockify)]
    pub backend: BackendKind,
    /// The websockify program (a name looked up in PATH, or a path).
    #[arg(long, env = "VNCD_WEBSOCKIFY", default_value = "websockify")]
    pub websockify: PathBuf,
    /// A noVNC directory for the proxy to serve; URLs then point at its vnc.html.
    #[arg(long, env = "VNCD_WEB")]
    pub web: Option<PathBuf>,
    /// Address the proxies listen on.
    #[arg(long, env = "VNCD_LISTEN_ADDRESS", default_value = "0.0.0.0")]
    pub listen_address: IpAddr,
    /// Host name put in console URLs [default: this machine's host name].
    #[arg(long, env = "VNCD_PUBLIC_HOST")]
    pub public_host: Option<String>,
    /// Seconds between full resyncs, which repair what no event reports (a killed proxy).
    #[arg(long, env = "VNCD_RESYNC_INTERVAL", default_value_t = 2.0)]
    pub resync_interval: f64,
    /// Seconds a new proxy may take to listen before it counts as failed.
    #[arg(long, env = "VNCD_START_TIMEOUT", default_value_t = 10.0)]
    pub start_timeout: f64,
    /// Most proxies starting at once; the rest queue (reason Queued).
    #[arg(long, env = "VNCD_MAX_STARTING", default_value_t = 16)]
    pub max_starting: usize,
    /// Seconds between SIGTERM and SIGKILL when stopping a proxy.
    #[arg(long, env = "VNCD_STOP_GRACE", default_value_t = 2.0)]
    pub stop_grace: f64,
    /// Stop every proxy and release every port when vncd exits (by default they keep
    /// running and the next vncd adopts them).
    #[arg(long, env = "VNCD_STOP_ON_EXIT")]
    pub stop_on_exit: bool,
}

pub fn secs(v: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("--{flag} {v} is not a number of seconds"))
}

/// Finds `program` in PATH (or checks the path), so a missing websockify is one clear
/// error at start instead of hundreds of failed sessions.
fn resolve_program(program: &PathBuf) -> anyhow::Result<PathBuf> {
    if program.components().count() > 1 {
        anyhow::ensure!(program.is_file(), "{} does not exist", program.display());
        return Ok(program.clone());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{} not found in PATH; install it (`pip install websockify`) or pass --websockify PATH",
                program.display()
            )
        })
}

pub fn default_public_host() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

impl ServeArgs {
    /// The loop settings.
    pub fn loop_config(&self) -> anyhow::Result<LoopConfig> {
        let limits = Limits {
            range: self.pool.port_range,
            max_sessions: self.pool.max_sessions,
            start_timeout_ms: u64::try_from(secs(self.start_timeout, "start-timeout")?.as_millis())
                .unwrap_or(u64::MAX),
            max_starting: self.max_starting.max(1),
        };
        Ok(LoopConfig {
            limits,
            resync: secs(self.resync_interval, "resync-interval")?,
            stop_on_exit: self.stop_on_exit,
        })
    }

    /// How console URLs are written.
    pub fn url_style(&self) -> UrlStyle {
        UrlStyle {
            public_host: self.public_host.clone().unwrap_or_else(default_public_host),
            web: self.web.is_some(),
            tls: false,
        }
    }

    /// The supervisor: proxies marked with `owner`, logging under `log_dir`.
    pub fn supervisor(&self, owner: String, log_dir: &Path) -> anyhow::Result<Supervisor> {
        let backend: Box<dyn Backend> = match self.backend {
            BackendKind::Websockify => Box::new(Websockify {
                program: resolve_program(&self.websockify)?,
            }),
        };
        if let Some(web) = &self.web {
            anyhow::ensure!(web.is_dir(), "--web {} is not a directory", web.display());
        }
        Ok(Supervisor::new(
            owner,
            backend,
            self.listen_address,
            self.web.clone(),
            log_dir.to_owned(),
            secs(self.stop_grace, "stop-grace")?,
        ))
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}
