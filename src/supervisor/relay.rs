//! The relay as the supervisor's data plane (`vncd run --relay`): one long-lived
//! `vncd-proxy relay` per host serves every builtin session, instead of one process each.
//!
//! The supervisor keeps its interface (observe, start, stop), so the controller and the
//! core do not know which data plane serves: here *start* declares a lease to the relay,
//! *stop* takes it out of the declaration, and *observe* reads the relay's report.
//!
//! - **Declarative.** Every change sends the whole set (`declare`, versioned); a version is
//!   always one past what the relay has applied, so a restarted controller is never
//!   ignored as stale. The set is rebuilt from the leases and the relay's report, so a
//!   restarted controller adopts what the relay serves (same ports, connections kept).
//! - **The relay outlives the controller.** It runs in its own process group, logs to
//!   `STATE/logs/relay.log`, and is found again through its socket
//!   (`STATE/relay/relay.sock`): never through /proc of another uid.
//! - **A dead relay is started again.** Its sessions are then absent, the plan starts them,
//!   and they come back on their leased ports.
//! - **Ready means reachable.** The relay's probe result (connect + RFB banner) is reported
//!   per session; an unreachable target keeps its port but is not Ready.
//! - **Migration.** A per-session proxy of an earlier vncd that still serves a lease is
//!   reported as running but stale, so the plan replaces it (one at a time, like a settings
//!   change): stopped, then declared to the relay on the same port.
//!
//! The control client here is blocking (a local socket with a short timeout), because the
//! supervisor's observe and start are synchronous, like its /proc scan.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::procfs;
use crate::console::Minter;
use crate::lease::{Lease, ProcRef};
use crate::relay::control::{ControlError, Envelope, MAX_LINE, Request, Response, line};
use crate::relay::{Applied, Declaration, Report, ServingSpec, SessionSpec, TargetSpec, WireKey};
use crate::session::Endpoint;

/// How long one control exchange may take before the relay counts as unresponsive.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a freshly started relay may take to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a session could not be declared to the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayPlaneError {
    #[error("cannot start the relay {}: {source}", program.display())]
    Start {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the relay did not open its control socket {} within {START_TIMEOUT:?}; see {}", socket.display(), log.display())]
    NoSocket { socket: PathBuf, log: PathBuf },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("the relay refused session {session:?}: {message}")]
    Refused { session: String, message: String },
    #[error("no ticket key for session {session:?} (vncd was started without its master key)")]
    NoKey { session: String },
    #[error(
        "no relay answers on {} (this vncd starts none: the relay runs on its own, e.g. the chart's relay DaemonSet); its sessions are down until one does",
        socket.display()
    )]
    NotRunning { socket: PathBuf },
    #[error("cannot hand {} to the relay's user {user}: {source}", dir.display())]
    Handover {
        dir: PathBuf,
        user: String,
        #[source]
        source: std::io::Error,
    },
    #[error("relay pid {pid} vanished")]
    Vanished { pid: i32 },
    #[error("session {session:?} was not declared to the relay: {cause}")]
    NotDeclared { session: String, cause: String },
}

/// The relay data plane. See the module docs.
#[derive(Debug)]
pub struct RelayPlane {
    state_dir: PathBuf,
    /// The relay's control socket.
    socket: PathBuf,
    /// Start a relay when none answers (`vncd run`), or only ever talk to one that
    /// something else runs (`vncd kube`: the chart's relay DaemonSet, in another pod).
    launch: bool,
    program: PathBuf,
    listen: IpAddr,
    minter: Minter,
    /// The gateway to declare with the sessions (`--gateway`), if any.
    gateway: Option<std::net::SocketAddr>,
    /// TLS, origins and static files to declare with the sessions.
    serving: ServingSpec,
    /// The uid the relay runs under (`--proxy-user`), never the controller's: it parses
    /// every untrusted client, so it must not reach the master key or vncd's state.
    /// None: the controller's uid.
    run_as: Option<super::ProxyUser>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// What this controller wants the relay to serve, by session.
    declared: BTreeMap<String, SessionSpec>,
    /// The last version the relay applied.
    applied: u64,
    /// The relay last seen, with when each of its sessions was first seen (for age).
    relay: Option<ProcRef>,
    seen_since: BTreeMap<String, Instant>,
    /// The relay's last report.
    report: Option<Report>,
}

/// What the relay serves, as the supervisor's observation needs it.
#[derive(Debug, Default)]
pub struct Served {
    /// The relay's identity (the "process" of every session it serves).
    pub relay: Option<ProcRef>,
    /// Per served session of a current lease: listening, age, authenticated clients,
    /// and the target's reachability (`None` unknown, `Some(None)` reachable,
    /// `Some(Some(why))` unreachable).
    pub sessions: BTreeMap<String, ServedSession>,
}

#[derive(Debug, Clone)]
pub struct ServedSession {
    pub listening: bool,
    pub age_ms: u64,
    pub clients: usize,
    pub target: Option<Option<String>>,
}

impl RelayPlane {
    /// The relay beside the running vncd: `vncd-proxy relay` if it is there (it links no
    /// libvirt), else `vncd relay`.
    pub fn beside(vncd: &Path, state_dir: &Path, listen: IpAddr, minter: Minter) -> Self {
        let small = vncd.with_file_name(super::builtin::PROXY_EXE);
        // Both take exactly the same command line: `... relay --state-dir DIR`.
        let program = if small.is_file() {
            small
        } else {
            vncd.to_owned()
        };
        RelayPlane {
            state_dir: state_dir.to_owned(),
            socket: crate::store::file::StateDir::new(state_dir).relay_socket(),
            launch: true,
            program,
            ..Self::external(Path::new(""), listen, minter)
        }
    }

    /// A relay that something else runs and keeps running (`--relay-socket`; in
    /// Kubernetes the chart's relay DaemonSet, so rolling the controller touches no
    /// console). This plane never starts one: while none answers on `socket`, its
    /// sessions count as down and are not Ready. The relay may live in another PID
    /// namespace, so its identity is what it reports (pid and start time), never a look
    /// at this namespace's /proc.
    pub fn external(socket: &Path, listen: IpAddr, minter: Minter) -> Self {
        RelayPlane {
            state_dir: PathBuf::new(),
            socket: socket.to_owned(),
            launch: false,
            program: PathBuf::new(),
            listen,
            minter,
            gateway: None,
            serving: ServingSpec::default(),
            run_as: None,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The relay that answered with `report`: with a relay of our own, its pid and start
    /// time from /proc (None if it is gone); with an external one, as it reports itself.
    fn identity(&self, report: &Report) -> Option<ProcRef> {
        let pid = i32::try_from(report.relay.pid).ok()?;
        if !self.launch {
            return Some(ProcRef {
                pid,
                start_time: report.relay.started_unix,
            });
        }
        local_identity(report)
    }

    /// Declares `gateway` with the sessions (see `vncd run --gateway`).
    #[must_use]
    pub fn with_gateway(mut self, gateway: Option<std::net::SocketAddr>) -> Self {
        self.gateway = gateway;
        self
    }

    /// Starts the relay as `user` (`--proxy-user`), handing it `STATE/relay` first.
    #[must_use]
    pub fn run_as(mut self, user: Option<super::ProxyUser>) -> Self {
        self.run_as = user;
        self
    }

    /// Declares `serving` with the sessions (`--tls-cert`/`--tls-key`, `--origin`, `--web`).
    #[must_use]
    pub fn with_serving(mut self, serving: ServingSpec) -> Self {
        self.serving = serving;
        self
    }

    fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    fn log(&self) -> PathBuf {
        self.state_dir.join("logs").join("relay.log")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The relay's report, starting a relay first if none answers.
    fn report(&self) -> Result<Report, RelayPlaneError> {
        match call(&self.socket(), &Request::Report {}) {
            Ok(Response::Report(r)) => Ok(r),
            Ok(_) => Err(ControlError::Unexpected { asked: "report" }.into()),
            // A relay runs but will not let this controller in: starting another would
            // only find it running.
            Err(e @ ControlError::Connect { .. }) if e.permission_denied() => Err(e.into()),
            Err(ControlError::Connect { .. }) if !self.launch => Err(RelayPlaneError::NotRunning {
                socket: self.socket(),
            }),
            Err(ControlError::Connect { .. }) => {
                self.start_relay()?;
                match call(&self.socket(), &Request::Report {})? {
                    Response::Report(r) => Ok(r),
                    _ => Err(ControlError::Unexpected { asked: "report" }.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Starts `vncd-proxy relay --state-dir DIR` in its own process group, logging to
    /// `STATE/logs/relay.log`, and waits for its socket.
    fn start_relay(&self) -> Result<(), RelayPlaneError> {
        let log = self.log();
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
        };
        let start_err = |source| RelayPlaneError::Start {
            program: self.program.clone(),
            source,
        };
        let out = open().map_err(start_err)?;
        let err = out.try_clone().map_err(start_err)?;
        let mut cmd = Command::new(&self.program);
        if let Some(user) = &self.run_as {
            let dir = self.state_dir.join("relay");
            hand_over_dir(&dir, user, nix::unistd::getegid().as_raw()).map_err(|source| {
                RelayPlaneError::Handover {
                    dir: dir.clone(),
                    user: user.to_string(),
                    source,
                }
            })?;
            // std drops supplementary groups (setgroups(0)) when root changes the uid.
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd.arg("relay")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd.spawn().map_err(start_err)?;
        info!(pid = child.id(), program = %self.program.display(), "started the relay");
        // Not waited for: it outlives vncd. While vncd runs, the orphan reaper takes its
        // exit status if it dies.
        drop(child);
        let until = Instant::now() + START_TIMEOUT;
        while Instant::now() < until {
            match UnixStream::connect(self.socket()) {
                Ok(_) => return Ok(()),
                Err(source) if source.kind() == std::io::ErrorKind::PermissionDenied => {
                    let path = self.socket();
                    return Err(ControlError::Connect { path, source }.into());
                }
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(RelayPlaneError::NoSocket {
            socket: self.socket(),
            log,
        })
    }

    /// What the relay serves of `leases`. Sessions the relay serves for no current lease
    /// (a deleted session, an older lease of a retargeted one) are taken out of the
    /// declaration here, so nothing serves a lease that is gone.
    pub fn observe(&self, leases: &BTreeMap<String, Lease>) -> Served {
        let report = match self.report() {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot reach the relay; its sessions count as down");
                let mut inner = self.lock();
                inner.relay = None;
                inner.report = None;
                inner.seen_since.clear();
                return Served::default();
            }
        };
        let relay = self.identity(&report);
        let mut inner = self.lock();
        if inner.relay != relay {
            // Another relay (restarted, or the first look): what it has applied decides the
            // next version; its sessions are what it serves now.
            inner.seen_since.clear();
        }
        inner.relay = relay;
        inner.applied = inner.applied.max(report.applied_version);
        let now = Instant::now();
        let mut served = Served {
            relay,
            sessions: BTreeMap::new(),
        };
        let mut keep = BTreeMap::new();
        for (name, s) in &report.sessions {
            let Some(lease) = leases.get(name) else {
                continue;
            };
            if lease.uid != s.lease_uid || lease.port != s.port {
                continue;
            }
            // Adopt it into the declaration (a restarted controller starts empty).
            if let Ok(spec) = self.spec(lease) {
                keep.insert(name.clone(), spec);
            }
            let since = *inner.seen_since.entry(name.clone()).or_insert(now);
            served.sessions.insert(
                name.clone(),
                ServedSession {
                    listening: s.listening,
                    age_ms: u64::try_from(now.duration_since(since).as_millis())
                        .unwrap_or(u64::MAX),
                    clients: s.authenticated,
                    target: s.target_reachable.map(|ok| {
                        (!ok).then(|| {
                            s.target_error
                                .clone()
                                .unwrap_or_else(|| "the target does not answer".into())
                        })
                    }),
                },
            );
        }
        // Sessions declared but not (yet) in the report stay declared if their lease holds.
        for (name, spec) in &inner.declared {
            if leases
                .get(name)
                .is_some_and(|l| l.uid == spec.lease_uid && l.port == spec.port)
            {
                keep.entry(name.clone()).or_insert_with(|| spec.clone());
            }
        }
        inner
            .seen_since
            .retain(|s, _| served.sessions.contains_key(s));
        let gone: BTreeSet<&String> = report
            .sessions
            .keys()
            .filter(|s| !keep.contains_key(*s))
            .collect();
        // A gateway the relay does not serve as declared (another controller's, or one
        // whose address was busy) is declared again.
        let gateway_differs = report.gateway != self.gateway.map(|a| a.to_string());
        // Likewise serving settings: a relay adopted from a controller started with
        // another certificate or origin list serves ours from the next declaration.
        let serving_differs = report.serving != self.serving;
        let changed =
            keep != inner.declared || !gone.is_empty() || gateway_differs || serving_differs;
        inner.declared = keep;
        inner.report = Some(report.clone());
        if changed && let Err(e) = self.declare(&mut inner) {
            warn!(error = %e, "cannot declare to the relay");
        }
        served
    }

    /// The counters the relay last reported for `session`.
    pub fn counters(&self, session: &str) -> Option<crate::proxy::stats::Snapshot> {
        self.lock().report.as_ref()?.sessions.get(session)?.counters
    }

    /// The relay's declaration of `lease`.
    fn spec(&self, lease: &Lease) -> Result<SessionSpec, RelayPlaneError> {
        Ok(SessionSpec {
            name: lease.session.clone(),
            port: lease.port,
            listen: self.listen,
            target: match &lease.target {
                Endpoint::Tcp { host, port } => TargetSpec::Tcp(format!("{host}:{port}")),
                Endpoint::Unix { path } => TargetSpec::Unix(path.into()),
            },
            lease_uid: lease.uid.clone(),
            lease_key: WireKey(self.minter.lease_key(lease)),
            limits: crate::relay::Limits::default(),
        })
    }

    /// Declares the current set, one version past what the relay applied.
    fn declare(&self, inner: &mut Inner) -> Result<Applied, RelayPlaneError> {
        let version = inner.applied + 1;
        let sessions: Vec<SessionSpec> = inner.declared.values().cloned().collect();
        let req = Request::Declare(Declaration {
            version,
            sessions,
            gateway: self.gateway,
            serving: self.serving.clone(),
        });
        match call(&self.socket(), &req)? {
            Response::Applied(a) => {
                inner.applied = inner.applied.max(a.applied_version);
                if let Some(e) = &a.gateway_error {
                    warn!(error = %e, "the relay does not serve the gateway");
                }
                if let Some(e) = &a.serving_error {
                    warn!(error = %e, "the relay does not serve as declared");
                }
                Ok(a)
            }
            _ => Err(ControlError::Unexpected { asked: "declare" }.into()),
        }
    }

    /// Serves every lease of `leases` on the relay (starting the relay if needed), with one
    /// declaration for the whole batch: declaring once per lease sends the growing set N
    /// times, O(N^2) for N sessions starting together (800 at boot). Returns, per lease in
    /// order, the relay's identity (which the lease records as its "process") or why the
    /// relay did not take it; a refused lease is taken out of the declaration again.
    pub fn start_all(&self, leases: &[Lease]) -> Vec<Result<ProcRef, RelayPlaneError>> {
        match self.declare_batch(leases) {
            Ok(results) => results,
            // The batch never reached the relay: every lease of it failed for that reason.
            Err(e) => {
                let cause = e.to_string();
                leases
                    .iter()
                    .map(|l| {
                        Err(RelayPlaneError::NotDeclared {
                            session: l.session.clone(),
                            cause: cause.clone(),
                        })
                    })
                    .collect()
            }
        }
    }

    fn declare_batch(
        &self,
        leases: &[Lease],
    ) -> Result<Vec<Result<ProcRef, RelayPlaneError>>, RelayPlaneError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let report = self.report()?;
        let relay = self.identity(&report).ok_or(RelayPlaneError::Vanished {
            pid: i32::try_from(report.relay.pid).unwrap_or(-1),
        })?;
        let specs: Vec<Result<SessionSpec, RelayPlaneError>> =
            leases.iter().map(|l| self.spec(l)).collect();
        let mut inner = self.lock();
        inner.applied = inner.applied.max(report.applied_version);
        for spec in specs.iter().flatten() {
            inner.declared.insert(spec.name.clone(), spec.clone());
        }
        let applied = match self.declare(&mut inner) {
            Ok(a) => a,
            Err(e) => {
                for spec in specs.iter().flatten() {
                    inner.declared.remove(&spec.name);
                }
                return Err(e);
            }
        };
        inner.relay = Some(relay);
        let mut refused = false;
        let results = leases
            .iter()
            .zip(specs)
            .map(|(lease, spec)| {
                spec?;
                if let Some(message) = applied.errors.get(&lease.session) {
                    inner.declared.remove(&lease.session);
                    refused = true;
                    return Err(RelayPlaneError::Refused {
                        session: lease.session.clone(),
                        message: message.clone(),
                    });
                }
                Ok(relay)
            })
            .collect();
        if refused && let Err(e) = self.declare(&mut inner) {
            // The relay keeps the refused sessions as declared-but-failed until the next
            // declaration; observe declares again.
            warn!(error = %e, "cannot take refused sessions off the relay");
        }
        Ok(results)
    }

    /// Stops serving `session` (its connections end). Returns whether it was declared.
    pub fn stop(&self, session: &str) -> bool {
        let mut inner = self.lock();
        if inner.declared.remove(session).is_none() {
            return false;
        }
        if let Err(e) = self.declare(&mut inner) {
            warn!(session, error = %e, "cannot take the session off the relay");
        }
        true
    }

    /// Whether `process` is the relay this plane serves through (so stopping a session of
    /// it means taking the session off the relay, never signalling the process).
    pub fn is_relay(&self, process: ProcRef) -> bool {
        self.lock().relay == Some(process)
    }

    /// Ends the relay with SIGTERM (`--stop-on-exit`, once every session is off it), if
    /// this plane starts its relays: a relay run on its own (`--relay-socket`) is its own
    /// unit's or pod's to end. The process signalled is the one that answers on this state
    /// directory's socket, with the pid it reports and that pid's start time in /proc
    /// unchanged since; nothing else is signalled. Returns whether one was signalled.
    pub fn end(&self) -> bool {
        if !self.launch {
            return false;
        }
        let Ok(Response::Report(report)) = call(&self.socket(), &Request::Report {}) else {
            return false;
        };
        let Some(relay) = local_identity(&report) else {
            return false;
        };
        let still = procfs::stat(relay.pid).is_some_and(|st| st.start_time == relay.start_time);
        if !still {
            return false;
        }
        info!(pid = relay.pid, "ending the relay (--stop-on-exit)");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(relay.pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .is_ok()
    }
}

/// What the relay answering on `socket` serves of `leases`, for the commands that judge a
/// state directory beside `vncd run` without being its controller (`vncd status`,
/// `vncd cleanup`): relay sessions have no process of their own to find in /proc.
#[derive(Debug, Default)]
pub struct RelayView {
    /// The relay (pid and start time in /proc), if one answers and is visible here.
    pub relay: Option<ProcRef>,
    /// Sessions served for their current lease and port: listening, authenticated clients.
    pub sessions: BTreeMap<String, (bool, usize)>,
}

impl RelayView {
    /// Asks the relay; empty if none answers. It never starts one.
    pub fn ask(socket: &Path, leases: &BTreeMap<String, Lease>) -> Self {
        let Ok(Response::Report(report)) = call(socket, &Request::Report {}) else {
            return RelayView::default();
        };
        let sessions = leases
            .iter()
            .filter_map(|(name, l)| {
                let s = report.sessions.get(name)?;
                (s.lease_uid == l.uid && s.port == l.port)
                    .then(|| (name.clone(), (s.listening, s.authenticated)))
            })
            .collect();
        RelayView {
            relay: local_identity(&report),
            sessions,
        }
    }

    /// The sessions it serves now (listening): what `vncd status` counts as live.
    pub fn serving(&self) -> BTreeSet<String> {
        self.sessions
            .iter()
            .filter(|(_, (listening, _))| *listening)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// The relay of `report` as /proc here sees it (pid and start time), as
/// [`RelayPlane::beside`] records it in leases.
fn local_identity(report: &Report) -> Option<ProcRef> {
    let pid = i32::try_from(report.relay.pid).ok()?;
    procfs::stat(pid).map(|st| ProcRef {
        pid,
        start_time: st.start_time,
    })
}

/// The leases the relay answering on `socket` serves, as `vncd cleanup --rebuild-state`
/// rebuilds them: session, port, lease uid and target as the relay holds them, with the
/// relay as their process (identified by its pid and start time in /proc, as
/// [`RelayPlane::beside`] records it). Empty if no relay answers, or for a session whose
/// target the relay does not report; a relay never decides which port a session holds
/// beyond what it was declared.
pub fn served_leases(socket: &Path) -> Vec<Lease> {
    let Ok(Response::Report(report)) = call(socket, &Request::Report {}) else {
        return Vec::new();
    };
    let process = local_identity(&report);
    report
        .sessions
        .into_iter()
        .filter_map(|(session, s)| {
            let target = match s.target? {
                TargetSpec::Tcp(addr) => addr.parse().ok()?,
                TargetSpec::Unix(path) => Endpoint::Unix {
                    path: path.to_str()?.to_owned(),
                },
            };
            Some(Lease {
                session,
                port: s.port,
                target,
                uid: s.lease_uid,
                process,
                allocated_at: jiff::Timestamp::now(),
                allocated_boot: crate::clock::BootInstant::now(),
            })
        })
        .collect()
}

/// Makes `dir` (STATE/relay) the relay user's own before the relay starts: the state
/// directory above it searchable (not readable) by others, `dir` created if missing, mode
/// 02750, owned by `user` with the controller's group (so the controller
/// reaches the socket and nothing else can): `group`. The set-group-ID bit gives the
/// socket the relay creates in it that group too; without it the socket would carry the
/// relay's own group, and a controller without CAP_DAC_OVERRIDE (the unit's) could not
/// connect to it. The relay itself cannot create it,
/// since the state directory is the controller's (or, in the chart, the kubelet's
/// hostPath, prepared by `vncd relay-dir` in an init container with CAP_CHOWN alone).
///
/// If it belongs to someone else (a relay that ran under the controller's uid before),
/// its contents (the used-ticket records) become the user's too, so the new relay still
/// refuses tickets spent before. That walk never follows a symbolic link: a relay that
/// planted one could otherwise make root chown a file elsewhere. Once the directory is
/// the user's, its contents are left alone.
pub fn hand_over_dir(dir: &Path, user: &super::ProxyUser, group: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt, lchown};
    // A way through the state directory (search only: its files stay 0600 root).
    if let Some(state) = dir.parent() {
        super::add_search_permission(state)?;
    }
    match std::fs::DirBuilder::new().mode(0o2750).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let mut meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            "not a directory",
        ));
    }
    if meta.uid() == user.uid && meta.mode() & 0o2000 == 0 {
        // The user's already, from before the set-group-ID bit: only its owner (or
        // CAP_FOWNER, which the unit lacks) may set it, so take it back for a moment
        // (CAP_CHOWN), set it, and hand it over again below.
        lchown(dir, Some(nix::unistd::geteuid().as_raw()), None)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o2750))?;
        lchown(dir, Some(user.uid), None)?;
        meta = std::fs::symlink_metadata(dir)?;
    }
    if meta.uid() != user.uid {
        fn walk(d: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
            for entry in std::fs::read_dir(d)? {
                let entry = entry?;
                let path = entry.path();
                // Not followed: file_type() describes the entry itself.
                if entry.file_type()?.is_dir() {
                    walk(&path, uid, gid)?;
                }
                lchown(&path, Some(uid), Some(gid))?;
            }
            Ok(())
        }
        walk(dir, user.uid, user.gid)?;
        // The mode while it is still ours (after the chown only its owner, or
        // CAP_FOWNER, could change it); a relay tightens its own mode itself later.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o2750))?;
    }
    if meta.uid() != user.uid || meta.gid() != group {
        lchown(dir, Some(user.uid), Some(group))?;
    }
    Ok(())
}

/// One request and its answer on the control socket, blocking, with [`CALL_TIMEOUT`].
fn call(socket: &Path, req: &Request) -> Result<Response, ControlError> {
    let s = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    s.set_read_timeout(Some(CALL_TIMEOUT))?;
    s.set_write_timeout(Some(CALL_TIMEOUT))?;
    (&s).write_all(&line(&Envelope::new(req)))?;
    let mut reader = BufReader::new(std::io::Read::take(&s, MAX_LINE as u64 + 1));
    let mut buf = Vec::new();
    if reader.read_until(b'\n', &mut buf)? == 0 {
        return Err(ControlError::Closed);
    }
    let env: Envelope<Response> = serde_json::from_slice(buf.trim_ascii_end())?;
    match env.body {
        Response::Error { message } => Err(ControlError::Refused(message)),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// Switching the relay to `--proxy-user`: the used-ticket records of the earlier relay
    /// become the new uid's, and a symbolic link planted in the directory is not followed
    /// (root would otherwise chown whatever it points at).
    #[test]
    fn the_relay_dir_is_handed_over_without_following_links() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to chown (scripts/test runs as root)");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        let dir = state.join("relay");
        std::fs::create_dir_all(dir.join("nonces/vm1")).unwrap();
        std::fs::write(dir.join("nonces/vm1/used"), b"").unwrap();
        let outside = tmp.path().join("precious");
        std::fs::write(&outside, b"root's").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("nonces/link")).unwrap();
        let user = crate::supervisor::ProxyUser {
            spec: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        hand_over_dir(&dir, &user, 0).unwrap();
        let m = |p: &Path| std::fs::symlink_metadata(p).unwrap();
        assert_eq!(
            (m(&dir).uid(), m(&dir).gid(), m(&dir).mode() & 0o7777),
            (65534, 0, 0o2750)
        );
        assert_eq!(m(&dir.join("nonces/vm1/used")).uid(), 65534);
        assert_eq!(m(&dir.join("nonces/link")).uid(), 65534, "the link itself");
        assert_eq!(m(&outside).uid(), 0, "what the link points at stays root's");
        assert_eq!(m(&state).mode() & 0o7777, 0o711, "searchable, not readable");
        // Once the user's, the contents are left alone.
        std::fs::write(dir.join("later"), b"").unwrap();
        hand_over_dir(&dir, &user, 0).unwrap();
        assert_eq!(m(&dir.join("later")).uid(), 0);
        // A directory handed over before the set-group-ID bit gets it, and stays the
        // user's.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        hand_over_dir(&dir, &user, 0).unwrap();
        assert_eq!(
            (m(&dir).uid(), m(&dir).gid(), m(&dir).mode() & 0o7777),
            (65534, 0, 0o2750)
        );
    }
}
