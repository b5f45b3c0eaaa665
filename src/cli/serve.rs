//! Flags shared by the two controllers, `vncd run` (standalone) and `vncd kube`: the port
//! pool, the proxy backend, addresses and timeouts. Both build the same core from them.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tracing::info;

use super::PoolArgs;
use crate::console::Minter;
use crate::controller::LoopConfig;
use crate::reconcile::Limits;
use crate::source::policy::TargetPolicy;
use crate::status::UrlStyle;
use crate::supervisor::builtin::Builtin;
use crate::supervisor::websockify::{Websockify, install_plugin};
use crate::ticket::MasterKey;

/// The master key's file name in the state directory.
pub const TICKET_KEY_FILE: &str = "ticket.key";
use crate::supervisor::{Backend, ProxyUids, ProxyUser, Supervisor, Tls};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum BackendKind {
    /// `vncd proxy`, vncd's own proxy: nothing else to install, ~0.5 MiB per session.
    Builtin,
    /// websockify (Python), one process per session.
    Websockify,
}

/// How a controller serves sessions.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Which proxy serves each session.
    #[arg(long, env = "VNCD_BACKEND", value_enum, default_value_t = BackendKind::Builtin)]
    pub backend: BackendKind,
    /// Serve every builtin session through one relay process (`vncd-proxy relay`, started
    /// if none runs, adopted if one does, restarted if it dies) instead of one proxy
    /// process each; running per-session proxies are replaced by it one at a time. The
    /// relay outlives vncd and keeps its consoles open while vncd restarts. It serves
    /// --tls-cert (reloaded when the files change), --origin and --web; with --proxy-user
    /// the relay runs under that uid and owns STATE_DIR/relay. `vncd run --backend
    /// builtin` always serves this way unless given --per-session-proxies.
    #[arg(long, env = "VNCD_RELAY")]
    pub relay: bool,
    /// With --relay: talk to a relay that runs on its own (the chart's relay DaemonSet, or
    /// `vncd relay --state-dir DIR --socket PATH` under its own unit) on this control
    /// socket, and never start one. While none answers its sessions are down, not Ready.
    /// `vncd kube --relay` needs it: a relay started inside the controller's pod would
    /// end with it.
    #[arg(long, env = "VNCD_RELAY_SOCKET", value_name = "PATH")]
    pub relay_socket: Option<PathBuf>,
    /// With the relay: one more port, outside the pool, that serves every session; the
    /// ticket routes each connection to its session (`vncd url NAME --gateway`). Declared
    /// to the relay, so changing it moves the gateway without dropping consoles.
    #[arg(long, env = "VNCD_GATEWAY", value_name = "ADDR:PORT")]
    pub gateway: Option<std::net::SocketAddr>,
    /// The gateway's URL as browsers reach it (behind a reverse proxy, say) [default:
    /// ws[s]://PUBLIC_HOST:PORT/].
    #[arg(
        long,
        env = "VNCD_GATEWAY_URL",
        value_name = "URL",
        requires = "gateway"
    )]
    pub gateway_url: Option<String>,
    /// The websockify program (a name looked up in PATH, or a path).
    #[arg(long, env = "VNCD_WEBSOCKIFY", default_value = "websockify")]
    pub websockify: PathBuf,
    /// A noVNC directory for the proxy to serve; URLs then point at its vnc.html.
    #[arg(long, env = "VNCD_WEB")]
    pub web: Option<PathBuf>,
    /// PEM certificate chain: proxies serve https/wss and URLs use them. Needs --tls-key.
    #[arg(long, env = "VNCD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "VNCD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Allowed Origin of browser clients (repeatable; builtin backend). Unset allows any.
    #[arg(long = "origin", env = "VNCD_ORIGIN", value_delimiter = ',')]
    pub origins: Vec<String>,
    /// Address the proxies listen on.
    #[arg(long, env = "VNCD_LISTEN_ADDRESS", default_value = "0.0.0.0")]
    pub listen_address: IpAddr,
    /// Host name put in console URLs [default: this machine's host name].
    #[arg(long, env = "VNCD_PUBLIC_HOST")]
    pub public_host: Option<String>,
    /// Seconds between full resyncs, which repair what no event reports (a killed proxy).
    #[arg(long, env = "VNCD_RESYNC_INTERVAL", value_name = "SECONDS", value_parser = seconds, default_value = "2")]
    pub resync_interval: Duration,
    /// Seconds a new proxy may take to listen before it counts as failed.
    #[arg(long, env = "VNCD_START_TIMEOUT", value_name = "SECONDS", value_parser = seconds, default_value = "30")]
    pub start_timeout: Duration,
    /// Most proxies starting at once; the rest queue (reason Queued) [default: no cap on
    /// the relay, which takes them in one declaration; 64 for per-session builtin proxies,
    /// which start in milliseconds; twice the CPU count for websockify, whose Python
    /// start-up is CPU-bound and thrashes when hundreds start together].
    #[arg(long, env = "VNCD_MAX_STARTING")]
    pub max_starting: Option<usize>,
    /// Seconds between SIGTERM and SIGKILL when stopping a proxy.
    #[arg(long, env = "VNCD_STOP_GRACE", value_name = "SECONDS", value_parser = seconds, default_value = "2")]
    pub stop_grace: Duration,
    /// Targets sessions may point at, repeatable: `ADDR_OR_CIDR:PORT`,
    /// `ADDR_OR_CIDR:LO-HI` or `unix:/DIR/` (e.g. `127.0.0.0/8:5900-5999`). A session whose
    /// target no rule allows is Failed (TargetNotAllowed) and gets no port. `vncd run`
    /// allows every target when none is given (its manifests are root's); `vncd kube`
    /// allows none (VncSession creators are tenants), and there every rule names the
    /// namespace it is for: `NAMESPACE=RULE`, or `*=RULE` for every namespace.
    #[arg(
        long = "allow-target",
        env = "VNCD_ALLOW_TARGET",
        value_delimiter = ',',
        value_name = "RULE"
    )]
    pub allow_targets: Vec<crate::source::policy::ScopedRule>,
    /// Stop every proxy and release every port when vncd exits (by default they keep
    /// running and the next vncd adopts them).
    #[arg(long, env = "VNCD_STOP_ON_EXIT")]
    pub stop_on_exit: bool,
    /// Run every proxy as USER[:GROUP] (names or ids), e.g. `nobody`; vncd must be root (or
    /// have CAP_SETUID and CAP_SETGID, but no ambient capabilities).
    /// A proxy then cannot read vncd's state files or other sessions' tokens. For a
    /// unix-socket VNC target give a GROUP that may connect to it (e.g. `nobody:kvm`).
    #[arg(long, env = "VNCD_PROXY_USER", value_name = "USER[:GROUP]")]
    pub proxy_user: Option<String>,
    /// With --proxy-user and --backend websockify: run each websockify proxy as a uid of
    /// its own from LO-HI (with --proxy-user's group), so one proxy cannot read another
    /// session's key file, signal it or ptrace it. A proxy's uid follows from its port;
    /// the range must hold at least as many uids as --port-range has ports. Not used by
    /// the builtin backend, whose proxies get their key as an open file and never read a
    /// key file of their own. The uids need no passwd entries; pick a range no one uses.
    #[arg(long, env = "VNCD_PROXY_UIDS", value_name = "LO-HI")]
    pub proxy_uids: Option<ProxyUids>,
    /// Seconds a console ticket (the credential in a URL from `vncd url`, `vncd apply
    /// --wait`, the HTTP API or a VncConsoleRequest) stays valid while unused. A ticket
    /// opens one connection; that connection then lasts past the TTL.
    #[arg(long, env = "VNCD_TICKET_TTL", value_name = "SECONDS", value_parser = ticket_ttl, default_value = "60")]
    pub ticket_ttl: Duration,
}

/// `--ticket-ttl`: whole seconds from 1 to [`crate::console::MAX_TTL`].
fn ticket_ttl(v: &str) -> Result<Duration, String> {
    let d = seconds(v)?;
    if d < Duration::from_secs(1) || d > crate::console::MAX_TTL {
        return Err(format!(
            "{v}: a ticket TTL must be between 1 and {} seconds",
            crate::console::MAX_TTL.as_secs()
        ));
    }
    Ok(d)
}

/// Parses a flag given in seconds (`2`, `0.5`): clap's value parser, so a bad value is
/// refused with the flag named before anything starts, and the code gets a `Duration`.
pub fn seconds(v: &str) -> Result<Duration, String> {
    v.trim()
        .parse::<f64>()
        .ok()
        .and_then(|f| Duration::try_from_secs_f64(f).ok())
        .ok_or_else(|| format!("{v} is not a number of seconds (e.g. 2 or 0.5)"))
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

/// The relay takes a pass's starts as one declaration and binds them in milliseconds, so
/// nothing queues behind a cap (64 per pass made 800 sessions wait 13 passes); spawned
/// proxies are capped so their start-up does not thrash.
fn default_max_starting(backend: BackendKind, relay: bool) -> usize {
    match backend {
        BackendKind::Builtin if relay => usize::MAX,
        BackendKind::Builtin => 64,
        BackendKind::Websockify => std::thread::available_parallelism().map_or(2, |n| 2 * n.get()),
    }
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
            start_timeout_ms: u64::try_from(self.start_timeout.as_millis()).unwrap_or(u64::MAX),
            max_starting: self
                .max_starting
                .unwrap_or_else(|| default_max_starting(self.backend, self.relay))
                .max(1),
        };
        Ok(LoopConfig {
            limits,
            resync: self.resync_interval,
            stop_on_exit: self.stop_on_exit,
        })
    }

    /// The target policy of `vncd run` (`kube` false) or `vncd kube` (see
    /// [`TargetPolicy::standalone`] and [`TargetPolicy::kubernetes`]).
    pub fn target_policy(
        &self,
        kube: bool,
    ) -> Result<TargetPolicy, crate::source::policy::ModeError> {
        if kube {
            TargetPolicy::kubernetes(&self.allow_targets)
        } else {
            TargetPolicy::standalone(&self.allow_targets)
        }
    }

    /// How console URLs are written.
    pub fn url_style(&self) -> UrlStyle {
        UrlStyle {
            public_host: self.public_host.clone().unwrap_or_else(default_public_host),
            web: self.web.is_some(),
            tls: self.tls_cert.is_some() && self.tls_key.is_some(),
        }
    }

    /// The certificate and key, checked readable now so a typo is one clear error at start.
    fn tls(&self) -> anyhow::Result<Option<Tls>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        for f in [cert, key] {
            std::fs::File::open(f).with_context(|| format!("cannot read {}", f.display()))?;
        }
        Ok(Some(Tls {
            cert: std::path::absolute(cert)?,
            key: std::path::absolute(key)?,
        }))
    }

    /// The ticket minter, with the master key `STATE_DIR/ticket.key` (created 0600 on the
    /// first start; a key others could read or write is refused with how to fix it).
    pub fn minter(&self, state_dir: &Path) -> anyhow::Result<Minter> {
        let master = MasterKey::load_or_create(&state_dir.join(TICKET_KEY_FILE))?;
        Ok(Minter::new(master, self.url_style(), self.ticket_ttl))
    }

    /// The supervisor: proxies marked with `owner`, logging under `log_dir` (in the
    /// state directory), admitting clients with tickets from `minter`.
    /// The websockify backend, with vncd's ticket plugin written to `STATE/websockify/`.
    fn websockify(&self, tls: Option<Tls>, log_dir: &Path) -> anyhow::Result<Websockify> {
        anyhow::ensure!(
            self.origins.is_empty(),
            "--origin needs the builtin backend; websockify has no Origin allowlist"
        );
        let program = resolve_program(&self.websockify)?;
        if self.web.is_some() && !crate::supervisor::websockify::supports_file_only(&program) {
            tracing::warn!(
                websockify = %program.display(),
                "this websockify has no --file-only (it is older than 0.11): it lists \
                 the directories under --web; upgrade it or use --backend builtin"
            );
        }
        let state = log_dir.parent().unwrap_or(log_dir);
        let plugin = state.join("websockify");
        let plugin_dir = install_plugin(&plugin)
            .with_context(|| format!("cannot install the ticket plugin in {}", plugin.display()))?;
        Ok(Websockify {
            program,
            tls,
            plugin_dir: Some(plugin_dir),
        })
    }

    /// What `--relay` does not serve yet is refused at start rather than served without.
    fn check_relay(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.backend != BackendKind::Websockify,
            "--relay does not support --backend websockify yet: leave out one of the two (without --relay every session gets a proxy process of its own, which supports it)"
        );
        if let Some(gw) = self.gateway {
            anyhow::ensure!(
                !self.pool.port_range.contains(gw.port()),
                "--gateway {gw} lies inside the pool {}: a session could be leased its port; choose a port outside the pool",
                self.pool.port_range
            );
        }
        if let Some(u) = &self.gateway_url {
            anyhow::ensure!(
                u.starts_with("ws://") || u.starts_with("wss://"),
                "--gateway-url {u:?} is not a ws:// or wss:// URL"
            );
        }
        Ok(())
    }

    /// The URL `vncd url --gateway` prints: `--gateway-url`, else `ws[s]://PUBLIC_HOST:PORT/`
    /// (wss with `--tls-cert`: the relay serves the gateway with the sessions' certificate).
    pub fn gateway_url(&self, public_host: &str) -> Option<String> {
        let gw = self.gateway?;
        Some(self.gateway_url.clone().unwrap_or_else(|| {
            crate::status::UrlStyle {
                public_host: public_host.to_owned(),
                web: false,
                tls: self.tls_cert.is_some() && self.tls_key.is_some(),
            }
            .url(gw.port(), None)
        }))
    }

    pub fn supervisor(
        &self,
        owner: String,
        log_dir: &Path,
        minter: &Minter,
    ) -> anyhow::Result<Supervisor> {
        let tls = self.tls()?;
        let backend: Box<dyn Backend> = match self.backend {
            BackendKind::Builtin => Box::new(Builtin::beside(
                &std::env::current_exe().context("cannot find the vncd executable")?,
                tls,
                self.origins.clone(),
            )),
            BackendKind::Websockify => Box::new(self.websockify(tls, log_dir)?),
        };
        let web = match &self.web {
            Some(web) => {
                anyhow::ensure!(web.is_dir(), "--web {} is not a directory", web.display());
                Some(std::path::absolute(web)?)
            }
            None => None,
        };
        let web_for_relay = web.clone();
        // Fail at start, not at the first lease, if no lease id or key can be made.
        crate::lease::check_rng()?;
        if self.relay {
            self.check_relay()?;
        } else if let Some(socket) = &self.relay_socket {
            anyhow::bail!(
                "--relay-socket {} names a relay, which this controller does not use (--per-session-proxies, --backend websockify, or vncd kube without --relay)",
                socket.display()
            );
        } else if let Some(gw) = self.gateway {
            anyhow::bail!(
                "--gateway {gw} is served by the relay, which this controller does not use (--per-session-proxies, --backend websockify, or vncd kube without --relay)"
            );
        }
        let proxy_user = self
            .proxy_user
            .as_deref()
            .map(ProxyUser::resolve)
            .transpose()?;
        let owner_dir = owner.clone();
        let mut supervisor = Supervisor::new(
            owner,
            backend,
            self.listen_address,
            web,
            log_dir.to_owned(),
            self.stop_grace,
        );
        supervisor.issue_tickets(minter.clone());
        if self.relay {
            let vncd = std::env::current_exe().context("cannot find the vncd executable")?;
            anyhow::ensure!(
                self.relay_socket.is_none() || self.proxy_user.is_none(),
                "--proxy-user does not apply with --relay-socket: that relay runs on its own, under the uid its own unit or pod gives it"
            );
            let plane = match &self.relay_socket {
                Some(socket) => crate::supervisor::relay::RelayPlane::external(
                    socket,
                    self.listen_address,
                    minter.clone(),
                ),
                None => crate::supervisor::relay::RelayPlane::beside(
                    &vncd,
                    Path::new(&owner_dir),
                    self.listen_address,
                    minter.clone(),
                ),
            };
            supervisor.serve_through_relay(
                plane
                    // The relay runs as --proxy-user, like the proxies it replaces.
                    .run_as(proxy_user.clone())
                    .with_gateway(self.gateway)
                    .with_serving(crate::relay::ServingSpec {
                        tls: self.tls()?,
                        origins: self.origins.clone(),
                        web: web_for_relay,
                    }),
            );
        }
        // Orphaned proxy children (and, as PID 1 in a container, every orphan) come to
        // vncd and are reaped; the proxies' own exit statuses stay the supervisor's.
        supervisor.reap_orphans();
        if self.proxy_user.is_none()
            && let (Some(uids), BackendKind::Websockify) = (&self.proxy_uids, &self.backend)
        {
            anyhow::bail!(
                "--proxy-uids {uids} needs --proxy-user USER[:GROUP]: vncd then switches each \
                 proxy to its own uid, with that user's group"
            );
        }
        if let Some(base) = proxy_user {
            // The TLS check below is done as a proxy would be: under --proxy-uids with a
            // uid of the range (only the group and others' bits can then let it read).
            let user = match self.proxy_uids_for_backend()? {
                Some(uids) => uids.user_for(&base, self.pool.port_range.start()),
                None => base.clone(),
            };
            // The proxies load the certificate and key themselves: say now, not at the
            // first session, if they cannot.
            if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
                for f in [cert, key] {
                    let readable = user
                        .can_read(f)
                        .with_context(|| format!("cannot check {}", f.display()))?;
                    anyhow::ensure!(
                        readable,
                        "--proxy-user {user} cannot read {f}: the proxies load it themselves; \
                         make it readable by that user or group (e.g. `chgrp GROUP {f}; chmod \
                         640 {f}` with --proxy-user USER:GROUP)",
                        f = f.display()
                    );
                }
            }
            // The proxies open their nonce and stats files by path under the state
            // directory (whose own mode vncd sets): every directory above it must let
            // them through, or every ticket is refused while the session shows Ready.
            if let Some(state) = log_dir.parent().and_then(Path::parent) {
                let reachable = user
                    .can_search(state)
                    .with_context(|| format!("cannot check {}", state.display()))?;
                anyhow::ensure!(
                    reachable,
                    "--proxy-user {user} cannot enter {dir} or a directory above it, so its \
                     proxies could not record a ticket's use and would refuse every console: \
                     give that user search permission on each (e.g. `chmod o+x {dir}`) or \
                     put the state directory elsewhere",
                    dir = state.display()
                );
            }
            info!(user = %base, proxy_uids = ?self.proxy_uids_for_backend()?.map(|u| u.to_string()), "proxies run as --proxy-user");
            supervisor.give_each_proxy_a_uid(self.proxy_uids_for_backend()?);
            supervisor.run_proxies_as(Some(base));
        }
        Ok(supervisor)
    }
}

impl ServeArgs {
    /// `--proxy-uids`, where it applies (websockify), checked against the pool: fewer uids
    /// than ports could put two live proxies on one uid. The builtin backend ignores it.
    fn proxy_uids_for_backend(&self) -> anyhow::Result<Option<ProxyUids>> {
        let Some(uids) = self.proxy_uids else {
            return Ok(None);
        };
        if !matches!(self.backend, BackendKind::Websockify) {
            return Ok(None);
        }
        let ports = self.pool.port_range.len() as u64;
        anyhow::ensure!(
            uids.count() >= ports,
            "--proxy-uids {uids} holds {} uids, fewer than the {ports} ports of --port-range {}: \
             two websockify proxies could share a uid; give a range of at least {ports} uids",
            uids.count(),
            self.pool.port_range
        );
        Ok(Some(uids))
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
