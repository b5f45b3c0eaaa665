//! The command line: `vncd run | kube | get | status | cleanup | apply | delete | url | crd`.
//!
//! Every flag has a `VNCD_<FLAG>` environment fallback, so a systemd unit or a
//! container can configure vncd without arguments.

mod apply;
mod cleanup;
mod get;
mod kube;
mod kube_console;
mod libvirt;
mod relay_dir;
mod run;
mod serve;
mod url;
mod url_kube;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::pool::PortRange;
use crate::store::file::StateDir;

/// vncd leases websocket ports for VM consoles and supervises the proxies that serve
/// them, so that many VMs starting at once never collide on a port, leak a proxy or
/// lose their console when vncd restarts.
#[derive(Debug, Parser)]
#[command(name = "vncd", version, about, max_term_width = 100)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, env = "VNCD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `vncd=debug`.
    #[arg(long, env = "VNCD_LOG", default_value = "info", global = true)]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch a directory of VncSession manifests and converge: lease ports, run proxies,
    /// report URLs, repair crashes, release what is removed.
    Run(Box<run::RunArgs>),
    /// Kubernetes mode (one instance per node, e.g. a DaemonSet): serve the VncSessions
    /// whose spec.nodeName is this node; leases live in their statuses.
    Kube(Box<kube::KubeArgs>),
    /// List sessions with their status (like `kubectl get`).
    Get(get::GetArgs),
    /// Port pool and process health, as the seed's system status.
    Status(get::StatusArgs),
    /// Repair stale leases and end vncd's orphaned proxies; safe beside `vncd run`.
    Cleanup(cleanup::CleanupArgs),
    /// Write a VncSession manifest into the sessions directory (atomically).
    Apply(apply::ApplyArgs),
    /// Remove a session's manifest.
    Delete(apply::DeleteArgs),
    /// Print a fresh console URL for a session: its ticket opens one connection, within
    /// --ticket-ttl (60 s) unless --ttl says otherwise. With --kube, through a
    /// VncConsoleRequest, with your own kubeconfig and RBAC.
    Url(url::UrlArgs),
    /// Print the VncSession CustomResourceDefinition as YAML (or another of vncd's CRDs).
    Crd(CrdArgs),
    /// Run one websocket -> VNC proxy (the builtin backend; started by `vncd run`).
    Proxy(crate::proxy::ProxyArgs),
    /// Run the node relay: one process that serves every declared console session, told
    /// what to serve over its control socket (same as `vncd-proxy relay`; `vncd run
    /// --relay` starts it, `vncd kube --relay` talks to one that runs on its own).
    Relay(crate::relay::RelayArgs),
    /// Create STATE_DIR/relay for a relay that runs under a uid of its own (the chart's
    /// relay init container): mode 0750, owned by --relay-user, then exit.
    RelayDir(relay_dir::RelayDirArgs),
    /// Print a shell completion script, e.g. `vncd completions bash > /etc/bash_completion.d/vncd`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Where vncd keeps its state.
#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    /// State directory: leases.json, sessions.json, locks and proxy logs.
    #[arg(long, env = "VNCD_STATE_DIR", default_value = "/var/lib/vncd")]
    pub state_dir: PathBuf,
}

impl StateArgs {
    pub fn dir(&self) -> StateDir {
        StateDir::new(&self.state_dir)
    }
}

/// Where manifests live.
#[derive(Debug, Clone, Args)]
pub struct SessionsArgs {
    /// Directory of VncSession manifests (*.yaml, *.yml).
    #[arg(long, env = "VNCD_SESSIONS_DIR", default_value = crate::runconfig::DEFAULT_SESSIONS_DIR)]
    pub sessions_dir: PathBuf,
}

/// The port pool.
#[derive(Debug, Clone, Args)]
pub struct PoolArgs {
    /// Websocket ports to lease from, inclusive.
    #[arg(long, env = "VNCD_PORT_RANGE", default_value_t = PortRange::default())]
    pub port_range: PortRange,
    /// Most sessions served at once.
    #[arg(long, env = "VNCD_MAX_SESSIONS", default_value_t = crate::runconfig::DEFAULT_MAX_SESSIONS)]
    pub max_sessions: usize,
}

fn init_logging(cli: &Cli) {
    init_logging_with(&cli.log, cli.log_format);
}

fn init_logging_with(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

/// Runs the parsed command line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let result = match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Kube(args) => kube::kube(*args),
        Command::Get(args) => get::get(args),
        Command::Status(args) => get::status(args),
        Command::Cleanup(args) => cleanup::cleanup(args),
        Command::Apply(args) => apply::apply(args),
        Command::Delete(args) => apply::delete(args),
        Command::Url(args) => url::url(args),
        Command::Crd(args) => print_crd(&args),
        Command::Proxy(args) => run_proxy(args),
        Command::Relay(args) => run_relay(args),
        Command::RelayDir(args) => relay_dir::relay_dir(&args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "vncd", &mut buf);
            emit(&String::from_utf8_lossy(&buf));
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vncd: error: {}", error_chain(&e));
            ExitCode::from(2)
        }
    }
}

/// Which CRD `vncd crd` prints.
#[derive(Debug, Args)]
pub struct CrdArgs {
    /// The CRD's name [default: vncsessions.vncd.io].
    #[arg(value_parser = ["vncsessions.vncd.io", "vncconsolerequests.vncd.io"])]
    pub name: Option<String>,
    /// Print every CRD vncd uses, as one multi-document YAML stream.
    #[arg(long, conflicts_with = "name")]
    pub all: bool,
}

fn print_crd(args: &CrdArgs) -> anyhow::Result<ExitCode> {
    use ::kube::CustomResourceExt;
    let sessions = serde_saphyr::to_string(&crate::api::VncSession::crd())?;
    let requests = serde_saphyr::to_string(&crate::k8s::console_request::VncConsoleRequest::crd())?;
    let text = match (args.all, args.name.as_deref()) {
        (true, _) => format!("{sessions}---\n{requests}"),
        (false, Some("vncconsolerequests.vncd.io")) => requests,
        _ => sessions,
    };
    emit(&text);
    Ok(ExitCode::SUCCESS)
}

/// The error and its causes, each said once: error types that already put their
/// source in their own message would otherwise repeat it (`... File exists: File exists`).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// Writes command output to stdout; a closed pipe (`vncd get | head`) is not an error.
pub(crate) fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// The `vncd-proxy` executable: logging from `VNCD_LOG` / `VNCD_LOG_FORMAT` as `vncd`
/// reads them, then the proxy.
pub fn proxy_main(args: crate::proxy::ProxyArgs) -> ExitCode {
    let format = match std::env::var("VNCD_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Human,
    };
    let filter = std::env::var("VNCD_LOG").unwrap_or_else(|_| "info".into());
    init_logging_with(&filter, format);
    match run_proxy(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vncd-proxy: error: {}", error_chain(&e));
            ExitCode::from(2)
        }
    }
}

/// The `vncd-proxy relay` executable: logging as [`proxy_main`], then the relay.
pub fn relay_main(args: crate::relay::RelayArgs) -> ExitCode {
    let format = match std::env::var("VNCD_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Human,
    };
    let filter = std::env::var("VNCD_LOG").unwrap_or_else(|_| "info".into());
    init_logging_with(&filter, format);
    match run_relay(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vncd-proxy relay: error: {}", error_chain(&e));
            ExitCode::from(2)
        }
    }
}

/// The relay serves every session of the host: a multi-threaded runtime.
fn run_relay(args: crate::relay::RelayArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(crate::relay::run(args))?;
    Ok(ExitCode::SUCCESS)
}

/// One proxy per session: a current-thread runtime keeps each process small.
fn run_proxy(args: crate::proxy::ProxyArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(crate::proxy::run(args))?;
    Ok(ExitCode::SUCCESS)
}

/// A multi-threaded runtime for the commands that need one.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::other("File exists (os error 17)");
        let inner = anyhow::Error::new(io).context("cannot create X: File exists (os error 17)");
        let e = inner.context("cannot start");
        assert_eq!(
            error_chain(&e),
            "cannot start: cannot create X: File exists (os error 17)"
        );
        let plain = anyhow::anyhow!("root").context("outer");
        assert_eq!(error_chain(&plain), "outer: root");
    }
}
