//! The supervisor owns proxy processes, whatever the backend.
//!
//! Identity is pid + start time + marker: every proxy is started with `VNCD_MARK_*`
//! variables in its environment naming the state directory (owner), the session and the
//! lease uid. A process is ours only if all three agree, so a reused pid, another
//! vncd's proxy or an unrelated websockify is never signalled. Each proxy leads its
//! own process group, so a stop reaches the per-connection children that websockify
//! forks (they hold the listening socket too).

pub mod builtin;
pub mod procfs;
pub mod reaper;
pub mod redact;
pub mod relay;
pub mod user;
pub mod websockify;

pub use user::{ProxyUids, ProxyUser};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::sync::mpsc;

use crate::console::Minter;
use crate::lease::{Lease, ProcRef};
use crate::reconcile::ProxyState;
use crate::session::Endpoint;
use crate::ticket::LeaseKey;

/// Environment variables that mark a proxy as ours.
pub mod marker {
    pub const OWNER: &str = "VNCD_MARK_OWNER";
    pub const SESSION: &str = "VNCD_MARK_SESSION";
    pub const LEASE: &str = "VNCD_MARK_LEASE";
    pub const PORT: &str = "VNCD_MARK_PORT";
    pub const TARGET: &str = "VNCD_MARK_TARGET";
    /// A digest of the security-relevant settings the proxy was started with
    /// ([`super::Supervisor::config_digest`]), so a vncd restarted with other settings
    /// replaces the proxies it adopts instead of serving under the old ones.
    pub const CONFIG: &str = "VNCD_MARK_CONFIG";
}

/// What a backend needs to build a proxy's command line.
#[derive(Clone, Debug)]
pub struct ProxySpec {
    pub session: String,
    pub listen: IpAddr,
    pub port: u16,
    pub target: Endpoint,
    pub web: Option<PathBuf>,
    /// The lease's ticket key (see [`crate::ticket`]); `None` only when the supervisor
    /// was given no [`Minter`], and then the proxy admits every client.
    pub key: Option<LeaseKey>,
    /// Where the backend's key file was written (see [`Backend::key_file`]), `-` for
    /// standard input.
    pub key_file: Option<PathBuf>,
    /// The directory that records used tickets (see [`crate::ticket::DirNonces`]): on
    /// disk, so a ticket stays used across websockify's forks and across a restart of
    /// the lease's proxy.
    pub nonces: Option<PathBuf>,
}

/// TLS material the proxies (or the relay) serve with: the same pair of PEM paths.
pub type Tls = crate::relay::TlsFiles;

/// A program and its arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandLine {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// How to start a proxy. The only thing that differs between websockify and
/// `vncd proxy`; supervision is the same for both.
pub trait Backend: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn command(&self, spec: &ProxySpec) -> CommandLine;
    /// The content of the key file this backend reads (it differs per backend), or
    /// `None` when the session has no key. Written with mode 0600 before the spawn.
    fn key_file(&self, spec: &ProxySpec) -> Option<String>;
    /// Extra environment for the proxy (e.g. where Python finds the ticket plugin).
    fn env(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
    /// Extra arguments that make the proxy keep per-session counters in `path` (see
    /// `proxy::stats`), or `None` if this backend cannot.
    fn stats_args(&self, _path: &Path) -> Option<Vec<String>> {
        None
    }
    /// Whether the proxy can take its key file as standard input (`--key-file -`).
    /// With `--proxy-user`, such a backend never needs to open the file itself, so it
    /// can stay readable by root only; other backends get the file chowned to them.
    fn key_on_stdin(&self) -> bool {
        false
    }
    /// The backend's security-relevant settings as text (program, TLS files, origins...),
    /// for [`Supervisor::config_digest`].
    fn settings(&self) -> String {
        String::new()
    }
    /// The TLS files the proxies load, whose changes on disk must reach them.
    fn tls(&self) -> Option<&Tls> {
        None
    }
}

/// Lays what the relay serves over a /proc observation: each session the relay serves
/// for its current lease is running as the relay, with the relay's counts and probe. A
/// per-session proxy of the earlier backend that serves a lease the relay does not is
/// marked stale, so the plan replaces it (one at a time) and the relay takes the port.
fn relay_overlay(served: relay::Served, obs: &mut Observation) {
    for s in obs.proxies.keys() {
        if !served.sessions.contains_key(s) {
            obs.stale.insert(s.clone());
        }
    }
    let Some(relay) = served.relay else {
        return;
    };
    for (name, s) in served.sessions {
        obs.stale.remove(&name);
        obs.proxies.insert(
            name.clone(),
            ProxyState::Running {
                process: relay,
                listening: s.listening,
                age_ms: s.age_ms,
            },
        );
        obs.clients.insert(name.clone(), s.clients);
        if let Some(t) = s.target {
            obs.targets.insert(name, t);
        }
    }
}

/// A process that carries our owner marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marked {
    pub process: ProcRef,
    pub pgid: i32,
    pub session: String,
    pub lease: String,
    pub port: Option<u16>,
    pub target: Option<String>,
    /// [`marker::CONFIG`]: the settings digest it was started with (None: an older vncd).
    pub config: Option<String>,
}

/// What one scan of /proc found.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    pub proxies: BTreeMap<String, ProxyState>,
    pub orphans: Vec<ProcRef>,
    /// Ports on which some process of ours (leader, child or orphan) listens.
    pub held_by_us: BTreeSet<u16>,
    /// Every marked process, for cleanup and rebuild.
    pub marked: Vec<Marked>,
    /// Connected clients per leased session with a live proxy.
    pub clients: BTreeMap<String, usize>,
    /// Sessions whose live proxy was started with other security-relevant settings than
    /// vncd has now (see [`Supervisor::config_digest`]): replaced, one at a time.
    pub stale: BTreeSet<String>,
    /// What the data plane knows of each serving session's target (the relay probes):
    /// `None` reachable, `Some(why)` not; missing is unknown.
    pub targets: BTreeMap<String, Option<String>>,
}

/// A proxy that ended on its own, reported so the controller can react at once.
#[derive(Clone, Debug)]
pub struct Exit {
    pub session: String,
    pub pid: i32,
    pub status: String,
}

/// Why a proxy could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot open proxy log {}: {source}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {} for session {session:?}: {source}", program.display())]
    Exec {
        program: PathBuf,
        session: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write ticket key file {}: {source}", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("proxy for session {session:?} exited before it could be identified")]
    Vanished { session: String },
    #[error(
        "session {session:?}: its proxy would run as uid {uid} (--proxy-uids, from port {port}), \
         which the live proxy of session {other:?} runs as; it waits until that one ends \
         (a lease outside the pool, or a pool larger than --proxy-uids)"
    )]
    UidInUse {
        session: String,
        port: u16,
        uid: u32,
        other: String,
    },
    #[error("cannot serve session {session:?} on the relay: {source}")]
    Relay {
        session: String,
        #[source]
        source: relay::RelayPlaneError,
    },
    #[error("cannot prepare {} for --proxy-user {user}: {source}", path.display())]
    ProxyUser {
        path: PathBuf,
        user: String,
        #[source]
        source: std::io::Error,
    },
}

impl SpawnError {
    /// A short, stable name for the kind of failure: the `kind` label of
    /// `vncd_errors_total{component="spawn"}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            SpawnError::Log { .. } => "log",
            SpawnError::Exec { .. } => "exec",
            SpawnError::Key { .. } => "key",
            SpawnError::Vanished { .. } => "vanished",
            SpawnError::UidInUse { .. } => "uid_in_use",
            SpawnError::ProxyUser { .. } => "proxy_user",
            SpawnError::Relay { .. } => "relay",
        }
    }
}

/// The process supervisor. See the module docs.
#[derive(Debug)]
pub struct Supervisor {
    owner: String,
    backend: Box<dyn Backend>,
    listen: IpAddr,
    web: Option<PathBuf>,
    log_dir: PathBuf,
    grace: Duration,
    exits: Option<mpsc::UnboundedSender<Exit>>,
    /// Our live children, and whether we are stopping each on purpose (so that its
    /// exit is not reported as a crash).
    children: std::sync::Arc<std::sync::Mutex<BTreeMap<i32, bool>>>,
    cache: std::sync::Mutex<ScanCache>,
    /// Who the proxies run as (`--proxy-user`); `None` runs them as vncd's own user.
    proxy_user: Option<ProxyUser>,
    /// With `--proxy-user`: a uid of its own for each proxy (`--proxy-uids`, websockify).
    proxy_uids: Option<ProxyUids>,
    /// When the proxies' logs were last checked against [`MAX_LOG_BYTES`].
    logs_checked: std::sync::Mutex<Option<std::time::Instant>>,
    /// Whether to be a child subreaper ([`Supervisor::reap_orphans`]), and whether the
    /// reaper runs yet.
    reap: bool,
    reaper: std::sync::OnceLock<()>,
    /// Derives each lease's ticket key; `None` (tests, `vncd cleanup`) starts proxies
    /// that admit every client.
    tickets: Option<Minter>,
    /// With `--relay`: the one relay that serves every session (see [`relay`]); proxies of
    /// the per-session backend that still serve a lease are replaced by it, one at a time.
    relay: Option<relay::RelayPlane>,
}

/// A proxy's log is cut back to nothing once it passes this size: at every start, and
/// while it runs (checked every [`LOG_CHECK_EVERY`] during the scan; the builtin proxy
/// also trims its own log). A log is for the last failure, not an archive.
pub const MAX_LOG_BYTES: u64 = 1024 * 1024;
const LOG_CHECK_EVERY: Duration = Duration::from_secs(10);

impl Supervisor {
    /// `owner` identifies this vncd's proxies: the canonical state directory path.
    pub fn new(
        owner: String,
        backend: Box<dyn Backend>,
        listen: IpAddr,
        web: Option<PathBuf>,
        log_dir: PathBuf,
        grace: Duration,
    ) -> Self {
        Supervisor {
            owner,
            backend,
            listen,
            web,
            log_dir,
            grace,
            exits: None,
            children: Default::default(),
            cache: Default::default(),
            proxy_user: None,
            proxy_uids: None,
            logs_checked: Default::default(),
            reap: false,
            reaper: std::sync::OnceLock::new(),
            tickets: None,
            relay: None,
        }
    }

    /// Gives every proxy started from now on its lease's ticket key, so it admits only
    /// clients with a ticket minted by `minter`.
    pub fn issue_tickets(&mut self, minter: Minter) {
        self.tickets = Some(minter);
    }

    /// Makes vncd a child subreaper and reaps the orphans that come to it (see
    /// [`reaper`]), without touching the proxies this supervisor waits for. Takes effect
    /// at the first [`Supervisor::observe`], inside the runtime.
    pub fn reap_orphans(&mut self) {
        self.reap = true;
    }

    /// Serves every session through `plane` (the relay) instead of a process each.
    pub fn serve_through_relay(&mut self, plane: relay::RelayPlane) {
        self.relay = Some(plane);
    }

    /// With the relay, ends it (see [`relay::RelayPlane::end`]): `--stop-on-exit` means
    /// nothing of vncd's keeps running.
    pub fn end_relay(&self) -> bool {
        self.relay.as_ref().is_some_and(relay::RelayPlane::end)
    }

    /// Runs every proxy as `user` (see [`ProxyUser`]).
    pub fn run_proxies_as(&mut self, user: Option<ProxyUser>) {
        self.proxy_user = user;
    }

    /// Runs each proxy as a uid of its own from `uids` (with `--proxy-user`'s group), see
    /// [`ProxyUids`]. Without a `--proxy-user` it has no effect.
    pub fn give_each_proxy_a_uid(&mut self, uids: Option<ProxyUids>) {
        self.proxy_uids = uids;
    }

    /// Who the proxy of `lease` runs as: `--proxy-user`, with its own uid under
    /// `--proxy-uids`.
    fn user_for(&self, lease: &Lease) -> Option<ProxyUser> {
        let base = self.proxy_user.as_ref()?;
        Some(match &self.proxy_uids {
            Some(uids) => uids.user_for(base, lease.port),
            None => base.clone(),
        })
    }

    /// Refuses to start `lease`'s proxy as `user` while a live proxy of another session
    /// runs as that uid (only possible with `--proxy-uids`, for a lease outside the pool).
    fn check_uid_free(&self, lease: &Lease, user: &ProxyUser) -> Result<(), SpawnError> {
        use std::os::unix::fs::MetadataExt;
        if self.proxy_uids.is_none() {
            return Ok(());
        }
        let other = self.scan().into_iter().find(|m| {
            m.session != lease.session
                && std::fs::metadata(format!("/proc/{}", m.process.pid))
                    .is_ok_and(|meta| meta.uid() == user.uid)
        });
        match other {
            Some(m) => Err(SpawnError::UidInUse {
                session: lease.session.clone(),
                port: lease.port,
                uid: user.uid,
                other: m.session,
            }),
            None => Ok(()),
        }
    }

    /// Where proxies that exit on their own are reported.
    pub fn report_exits(&mut self, tx: mpsc::UnboundedSender<Exit>) {
        self.exits = Some(tx);
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn listen_address(&self) -> IpAddr {
        self.listen
    }

    /// Every live process that carries our owner marker.
    pub fn scan(&self) -> Vec<Marked> {
        match self.cache.lock() {
            Ok(mut c) => scan_cached(&self.owner, &mut c),
            Err(_) => scan(&self.owner),
        }
    }

    /// Scans and classifies in one go; see [`classify`]. Where the backend keeps stats
    /// files, [`Observation::clients`] counts only authenticated clients (see
    /// [`Supervisor::authenticated_clients`]).
    /// A digest of every setting that decides what a proxy exposes: the backend and its
    /// program, TLS files (paths, and the identity, size and mtime of their contents, so a
    /// renewed certificate counts as a change), allowed origins, the web directory, the
    /// listen address and the proxy user. A stable hash (FNV-1a), not std's, so a new
    /// vncd build does not see every adopted proxy as changed.
    pub fn config_digest(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        let mut text = format!(
            "{}\n{}\n{}\n{:?}\n{:?}",
            self.backend.name(),
            self.backend.settings(),
            self.listen,
            self.web,
            self.proxy_user.as_ref().map(ToString::to_string)
        );
        if let Some(uids) = &self.proxy_uids {
            text.push_str(&format!("\nproxy uids {uids}"));
        }
        if let Some(m) = &self.tickets {
            text.push_str(&format!("\nticket key {}", m.key_id()));
        }
        if let Some(tls) = self.backend.tls() {
            for f in [&tls.cert, &tls.key] {
                let stamp = std::fs::metadata(f).map_or((0, 0, 0, 0), |m| {
                    (
                        m.dev(),
                        m.ino(),
                        m.size(),
                        m.mtime_nsec() + m.mtime() * 1_000_000_000,
                    )
                });
                text.push_str(&format!("\n{} {stamp:?}", f.display()));
            }
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// Sessions whose running proxy carries another settings digest than [`Self::config_digest`].
    fn stale_proxies(&self, obs: &Observation) -> BTreeSet<String> {
        let now = self.config_digest();
        obs.proxies
            .iter()
            .filter_map(|(session, state)| match state {
                ProxyState::Running { process, .. } => obs
                    .marked
                    .iter()
                    .find(|m| m.process == *process)
                    .filter(|m| m.config.as_deref() != Some(now.as_str()))
                    .map(|_| session.clone()),
                ProxyState::Absent => None,
            })
            .collect()
    }

    pub fn observe(&self, leases: &BTreeMap<String, Lease>) -> Observation {
        if self.reap {
            self.reaper
                .get_or_init(|| reaper::start(self.children.clone()));
        }
        let marked = self.scan();
        let mut obs = match self.cache.lock() {
            Ok(mut c) => classify_cached(marked, leases, &mut c),
            Err(_) => classify(marked, leases),
        };
        self.count_authenticated(&mut obs);
        self.cap_logs(&obs);
        obs.stale = self.stale_proxies(&obs);
        if let Some(plane) = &self.relay {
            relay_overlay(plane.observe(leases), &mut obs);
        }
        obs
    }

    /// Truncates the log of every live proxy that grew past [`MAX_LOG_BYTES`], at most
    /// every [`LOG_CHECK_EVERY`]. This covers websockify, which cannot trim its own log;
    /// the log is opened with O_APPEND, so the proxy simply goes on writing at the start.
    fn cap_logs(&self, obs: &Observation) {
        let Ok(mut checked) = self.logs_checked.lock() else {
            return;
        };
        if checked.is_some_and(|t| t.elapsed() < LOG_CHECK_EVERY) {
            return;
        }
        *checked = Some(std::time::Instant::now());
        for session in obs.proxies.keys() {
            let path = self.log_dir.join(format!("{session}.log"));
            if let Err(e) = truncate_if_over(&path, MAX_LOG_BYTES) {
                tracing::debug!(path = %path.display(), error = %e, "cannot check proxy log");
            }
        }
    }

    /// The clients of `session`'s proxy `process` that passed the token check, from the
    /// proxy's stats file; `None` when this backend keeps no stats (websockify) or the
    /// file is missing or from another process.
    pub fn authenticated_clients(&self, session: &str, process: ProcRef) -> Option<usize> {
        let path = self.stats_file(session)?;
        let pid = u32::try_from(process.pid).ok()?;
        crate::proxy::stats::authenticated_clients(&path, pid)
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Replaces the established-connection counts of [`classify`] by the authenticated
    /// counts where the proxy publishes them. An established TCP connection proves
    /// nothing: anyone who can reach the port (a scanner, a client without the token,
    /// a slowloris) would otherwise keep a session from ever expiring for idleness. The
    /// proxy counts a websocket session only once it passed the token and Origin checks.
    /// The count is never more than the established connections: with `--proxy-user` the
    /// stats files are written by the (less trusted) proxies.
    fn count_authenticated(&self, obs: &mut Observation) {
        for (session, n) in obs.clients.iter_mut() {
            if let Some(ProxyState::Running { process, .. }) = obs.proxies.get(session)
                && let Some(auth) = self.authenticated_clients(session, *process)
            {
                *n = auth.min(*n);
            }
        }
    }

    /// Starts the proxy of a persisted lease, in its own process group, with our marker;
    /// with the relay, declares the lease to it instead.
    /// Starts serving every lease of `leases`; per lease in order, its process or why not.
    /// Per-session proxies are spawned one by one; the relay takes the batch in one
    /// declaration (see [`relay::RelayPlane::start_all`]).
    pub fn spawn_all(&self, leases: &[Lease]) -> Vec<Result<ProcRef, SpawnError>> {
        if let Some(plane) = &self.relay {
            return plane
                .start_all(leases)
                .into_iter()
                .zip(leases)
                .map(|(r, lease)| {
                    r.map_err(|source| SpawnError::Relay {
                        session: lease.session.clone(),
                        source,
                    })
                })
                .collect();
        }
        leases
            .iter()
            .map(|l| {
                let _span = tracing::info_span!("spawn", session = %l.session).entered();
                self.spawn(l)
            })
            .collect()
    }

    /// Spawns the per-session proxy of `lease` (not through the relay: [`Self::spawn_all`]).
    fn spawn(&self, lease: &Lease) -> Result<ProcRef, SpawnError> {
        let mut spec = ProxySpec {
            session: lease.session.clone(),
            listen: self.listen,
            port: lease.port,
            target: lease.target.clone(),
            web: self.web.clone(),
            key: self.tickets.as_ref().map(|m| m.lease_key(lease)),
            key_file: None,
            nonces: None,
        };
        let user = self.user_for(lease);
        if let Some(u) = &user {
            self.check_uid_free(lease, u)?;
        }
        self.nonce_dir(lease, &mut spec, user.as_ref())?;
        let stdin = self.key_input(lease, &mut spec, user.as_ref())?;
        if let Some(u) = &user {
            self.prepare_for(u)?;
        }
        let mut line = self.backend.command(&spec);
        self.add_stats_args(&lease.session, &mut line, user.as_ref());
        let mut cmd = self.command(lease, &line, stdin, user.as_ref())?;
        // Spawned and registered under the children lock, which the orphan reaper holds
        // while it reaps: it can never take this child's exit status from us.
        let mut tracked = self.children.lock().ok();
        let child = cmd.spawn().map_err(|source| SpawnError::Exec {
            program: line.program.clone(),
            session: lease.session.clone(),
            source,
        })?;
        let vanished = || SpawnError::Vanished {
            session: lease.session.clone(),
        };
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(vanished)?;
        if let Some(c) = tracked.as_mut() {
            c.insert(pid, false);
        }
        drop(tracked);
        let st = procfs::stat(pid).ok_or_else(vanished)?;
        self.watch_exit(child, pid, lease.session.clone());
        Ok(ProcRef {
            pid,
            start_time: st.start_time,
        })
    }

    /// Writes the session's key file (0600) and decides how the proxy gets it: as its
    /// open standard input, or by path (chowned to `--proxy-user` for a backend that
    /// re-reads it). Returns the proxy's standard input.
    fn key_input(
        &self,
        lease: &Lease,
        spec: &mut ProxySpec,
        user: Option<&ProxyUser>,
    ) -> Result<Stdio, SpawnError> {
        let Some(content) = self.backend.key_file(spec) else {
            return Ok(Stdio::null());
        };
        let path = self.key_path(&lease.session);
        let token_err = |source| SpawnError::Key {
            path: path.clone(),
            source,
        };
        write_private(&path, content.as_bytes()).map_err(token_err)?;
        match user {
            // The proxy gets the open file, never the path: only root can read it.
            Some(_) if self.backend.key_on_stdin() => {
                spec.key_file = Some(PathBuf::from("-"));
                return Ok(Stdio::from(open_nofollow(&path).map_err(token_err)?));
            }
            // websockify re-reads the file by path: it must own it (still 0600) and
            // reach it (search permission on keys/ and, in Kubernetes mode, on the
            // namespace directory below it).
            Some(u) => hand_to(u, &path, &self.key_dir()).map_err(token_err)?,
            None => {}
        }
        spec.key_file = Some(path.clone());
        Ok(Stdio::null())
    }

    /// The directory where the proxy records used tickets (`STATE/nonces/NAME/`, 0700,
    /// the proxy user's). It is kept while the lease lives, so a proxy restarted after a
    /// crash still refuses the tickets its predecessor accepted; [`Self::forget`] removes
    /// it at release.
    fn nonce_dir(
        &self,
        lease: &Lease,
        spec: &mut ProxySpec,
        user: Option<&ProxyUser>,
    ) -> Result<(), SpawnError> {
        use std::os::unix::fs::DirBuilderExt;
        if spec.key.is_none() {
            return Ok(());
        }
        let root = self.log_dir.with_file_name("nonces");
        let dir = root.join(&lease.session);
        let err = |source| SpawnError::Key {
            path: dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(err)?;
        if let Some(u) = user {
            hand_to(u, &dir, &root).map_err(err)?;
        }
        spec.nonces = Some(dir);
        Ok(())
    }

    /// The backend's arguments for per-session counters, with their directory prepared.
    fn add_stats_args(&self, session: &str, line: &mut CommandLine, user: Option<&ProxyUser>) {
        let Some(path) = self.stats_file(session) else {
            return;
        };
        let Some(extra) = self.backend.stats_args(&path) else {
            return;
        };
        // A missing directory only costs the counters; the proxy still serves.
        if let Some(dir) = path.parent()
            && let Err(e) = private_dir(dir).and_then(|()| match user {
                Some(u) => u.give(dir),
                None => Ok(()),
            })
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create stats directory");
        }
        line.args.extend(extra);
    }

    /// The proxy's command: its log as stdout and stderr (a file, so it outlives us
    /// without SIGPIPE), our markers and no other VNCD_* settings in its environment, its
    /// own process group, and `--proxy-user`'s uid and gid.
    fn command(
        &self,
        lease: &Lease,
        line: &CommandLine,
        stdin: Stdio,
        user: Option<&ProxyUser>,
    ) -> Result<tokio::process::Command, SpawnError> {
        let log_path = self.log_dir.join(format!("{}.log", lease.session));
        let log_err = |source| SpawnError::Log {
            path: log_path.clone(),
            source,
        };
        let log = open_log(&log_path).map_err(log_err)?;
        let log2 = log.try_clone().map_err(log_err)?;
        let mut cmd = tokio::process::Command::new(&line.program);
        cmd.args(&line.args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("VNCD_") {
                cmd.env_remove(k);
            }
        }
        cmd.env(marker::OWNER, &self.owner)
            .env(marker::SESSION, &lease.session)
            .env(marker::LEASE, &lease.uid)
            .env(marker::PORT, lease.port.to_string())
            .env(marker::TARGET, lease.target.to_string())
            .env(marker::CONFIG, self.config_digest())
            .envs(self.backend.env())
            .stdin(stdin)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0)
            .kill_on_drop(false);
        if let Some(u) = user {
            // std drops supplementary groups (setgroups(0)) when root changes the uid, so
            // the proxy has exactly this uid and gid.
            cmd.uid(u.uid).gid(u.gid);
        }
        Ok(cmd)
    }

    /// Reaps the child (no zombies) and reports why it ended, unless we ended it.
    fn watch_exit(&self, mut child: tokio::process::Child, pid: i32, session: String) {
        let exits = self.exits.clone();
        let children = self.children.clone();
        let span = tracing::info_span!("proxy_exit", session = %session, pid);
        crate::task::spawn(span, async move {
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("unknown status ({e})"),
            };
            let expected = children
                .lock()
                .ok()
                .and_then(|mut c| c.remove(&pid))
                .unwrap_or(false);
            if let (Some(tx), false) = (exits, expected) {
                let _ = tx.send(Exit {
                    session,
                    pid,
                    status,
                });
            }
        });
    }

    /// True if `process` is still the very process we started (same start time, our marker).
    pub fn is_ours(&self, process: ProcRef) -> bool {
        let same = procfs::stat(process.pid)
            .is_some_and(|st| st.is_alive() && st.start_time == process.start_time);
        same && procfs::environ(process.pid)
            .is_some_and(|env| env.get(marker::OWNER) == Some(&self.owner))
    }

    /// Stops serving `session`, whose proxy is `process`: with the relay, takes the session
    /// off the relay (its connections end, the relay serves on); otherwise [`Self::stop`].
    pub async fn stop_session(&self, session: &str, process: ProcRef) -> bool {
        match &self.relay {
            Some(plane) if plane.is_relay(process) => plane.stop(session),
            _ => self.stop(process).await,
        }
    }

    /// Stops a proxy or an orphan: SIGTERM (to its whole group if it leads one), SIGKILL
    /// after the grace period. Identity is checked right before signalling; a process
    /// that is not provably ours is left alone and `false` returned.
    pub async fn stop(&self, process: ProcRef) -> bool {
        if !self.is_ours(process) {
            return false;
        }
        let leads_group = procfs::stat(process.pid).is_some_and(|st| st.pgid == process.pid);
        if let Some(stopping) = self
            .children
            .lock()
            .ok()
            .as_mut()
            .and_then(|c| c.get_mut(&process.pid))
        {
            *stopping = true;
        }
        terminate(process, &self.owner, leads_group, self.grace).await;
        true
    }

    /// What a proxy running as `user` needs: a way through the state directory to its
    /// stats file (search permission only, no listing; leases.json and sessions.json
    /// stay 0600 root), the stats directory as its own, and for a backend that reads
    /// its token file by path, the tokens directory searchable too.
    fn prepare_for(&self, user: &ProxyUser) -> Result<(), SpawnError> {
        let err = |path: &Path| {
            let path = path.to_owned();
            let user = user.to_string();
            move |source| SpawnError::ProxyUser { path, user, source }
        };
        if let Some(state) = self.log_dir.parent() {
            add_search_permission(state).map_err(err(state))?;
        }
        if self.backend.stats_args(Path::new("x")).is_some() {
            let stats = self.log_dir.with_file_name("stats");
            private_dir(&stats)
                .and_then(|()| user.give(&stats))
                .map_err(err(&stats))?;
        }
        if !self.backend.key_on_stdin() {
            let tokens = self.key_dir();
            private_dir(&tokens)
                .and_then(|()| add_search_permission(&tokens))
                .map_err(err(&tokens))?;
        }
        Ok(())
    }

    /// Key files live beside the logs, in a directory only we can read.
    fn key_dir(&self) -> PathBuf {
        self.log_dir.with_file_name("keys")
    }

    /// `STATE/keys/NAME.key`.
    fn key_path(&self, session: &str) -> PathBuf {
        self.key_dir().join(format!("{session}.key"))
    }

    /// Where the counters of `session`'s proxy, whose pid is `pid`, come from: the relay's
    /// last report, or the proxy's stats file; `None` if this backend keeps none.
    pub fn stats_source(&self, session: &str, pid: u32) -> Option<crate::metrics::StatsSource> {
        if let Some(plane) = &self.relay {
            return plane
                .counters(session)
                .map(crate::metrics::StatsSource::Reported);
        }
        let path = self.stats_file(session)?;
        Some(crate::metrics::StatsSource::File { path, pid })
    }

    /// Where the proxy of `session` keeps its counters (`STATE/stats/NAME.json`, beside
    /// the tokens and logs), if this backend keeps any.
    pub fn stats_file(&self, session: &str) -> Option<PathBuf> {
        let path = self
            .log_dir
            .with_file_name("stats")
            .join(format!("{session}.json"));
        self.backend.stats_args(&path).map(|_| path)
    }

    /// Forgets a released session's counters, ticket key, used-ticket records and log.
    /// The log goes too: it is kept for the last failure of a live lease, and one left
    /// per released name would let session-name churn fill the disk.
    pub fn forget(&self, session: &str) {
        let _ = std::fs::remove_file(self.log_dir.join(format!("{session}.log")));
        if let Some(path) = self.stats_file(session) {
            let _ = std::fs::remove_file(path);
        }
        let _ = std::fs::remove_file(self.key_path(session));
        let _ = std::fs::remove_dir_all(self.log_dir.with_file_name("nonces").join(session));
    }

    /// The last non-empty line a proxy wrote to its log, for failure messages (which go
    /// to statuses, Kubernetes Events and vncd's own log), with tickets redacted:
    /// websockify logs request lines, `GET /websockify?token=...` included.
    pub fn last_log_line(&self, session: &str) -> Option<String> {
        let line = last_line(&self.log_dir.join(format!("{session}.log")))?;
        Some(redact::tokens(&line))
    }
}

/// What a scan remembers between passes, so a steady state with hundreds of proxies
/// costs one `stat` per process instead of reading every environment and fd table.
/// Observation only: signalling always re-checks identity from /proc (see `is_ours`).
#[derive(Debug, Default)]
pub struct ScanCache {
    /// The marker (or its absence) of each process, by pid and start time: a process's
    /// initial environment never changes.
    marks: HashMap<ProcRef, Option<Marker>>,
    /// The listening socket each proxy leader was seen to own.
    sockets: HashMap<ProcRef, u64>,
}

/// The marker fields a proxy carries in its environment.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Marker {
    session: String,
    lease: String,
    port: Option<u16>,
    target: Option<String>,
    config: Option<String>,
}

fn read_marker(pid: i32, owner: &str) -> Option<Marker> {
    let env = procfs::environ(pid)?;
    if env.get(marker::OWNER)? != owner {
        return None;
    }
    Some(Marker {
        session: env.get(marker::SESSION).cloned().unwrap_or_default(),
        lease: env.get(marker::LEASE).cloned().unwrap_or_default(),
        port: env.get(marker::PORT).and_then(|p| p.parse().ok()),
        target: env.get(marker::TARGET).cloned(),
        config: env.get(marker::CONFIG).cloned(),
    })
}

/// Every live process that carries our owner marker.
pub fn scan(owner: &str) -> Vec<Marked> {
    scan_cached(owner, &mut ScanCache::default())
}

/// [`scan`], reusing what `cache` learnt in earlier passes.
pub fn scan_cached(owner: &str, cache: &mut ScanCache) -> Vec<Marked> {
    let mut seen = HashSet::new();
    let marked = procfs::pids()
        .into_iter()
        .filter_map(|pid| {
            let st = procfs::stat(pid).filter(procfs::Stat::is_alive)?;
            let process = ProcRef {
                pid,
                start_time: st.start_time,
            };
            seen.insert(process);
            let mark = cache
                .marks
                .entry(process)
                .or_insert_with(|| read_marker(pid, owner))
                .clone()?;
            Some(Marked {
                process,
                pgid: st.pgid,
                session: mark.session,
                lease: mark.lease,
                port: mark.port,
                target: mark.target,
                config: mark.config,
            })
        })
        .collect();
    cache.marks.retain(|p, _| seen.contains(p));
    marked
}

/// Matches our processes against the leases: which lease has a live proxy, is it
/// listening, and which processes belong to no lease at all.
///
/// Scan first, read leases second: a proxy is only started after its lease is
/// persisted, so any process the scan saw has its lease in a later read, and a
/// concurrent `vncd cleanup` never mistakes a just-started proxy for an orphan.
pub fn classify(marked: Vec<Marked>, leases: &BTreeMap<String, Lease>) -> Observation {
    classify_cached(marked, leases, &mut ScanCache::default())
}

/// [`classify`], reusing the listening sockets `cache` saw proxies own.
pub fn classify_cached(
    marked: Vec<Marked>,
    leases: &BTreeMap<String, Lease>,
    cache: &mut ScanCache,
) -> Observation {
    let listeners = procfs::listening_sockets();
    let mut obs = Observation::default();
    let leaders = leaders_of(&marked, leases);
    let leader_pgids: BTreeSet<i32> = leaders.values().map(|m| m.pgid).collect();
    for m in &marked {
        let is_leader = leaders
            .get(m.session.as_str())
            .is_some_and(|l| l.process == m.process);
        if !is_leader && !leader_pgids.contains(&m.pgid) {
            obs.orphans.push(m.process);
        }
    }
    let established = procfs::established_by_port();
    let (now, ticks) = (procfs::uptime_ms(), procfs::clock_ticks());
    let mut live = HashSet::new();
    for (session, m) in &leaders {
        let port = leases[*session].port;
        obs.clients.insert(
            (*session).to_owned(),
            established.get(&port).copied().unwrap_or(0),
        );
        live.insert(m.process);
        let listening = listeners
            .get(&port)
            .is_some_and(|ids| group_listens(m, ids, &marked, cache));
        let started_ms = m.process.start_time.saturating_mul(1000) / ticks;
        obs.proxies.insert(
            (*session).to_owned(),
            ProxyState::Running {
                process: m.process,
                listening,
                age_ms: now.saturating_sub(started_ms),
            },
        );
    }
    cache.sockets.retain(|p, _| live.contains(p));

    // Ports of leases without a live proxy that some process of ours still listens on
    // (a child of a dead leader, say): busy, but not taken by another program.
    for lease in leases.values() {
        if leaders.contains_key(lease.session.as_str()) {
            continue;
        }
        if let Some(ids) = listeners.get(&lease.port)
            && marked
                .iter()
                .any(|m| !procfs::socket_inodes(m.process.pid).is_disjoint(ids))
        {
            obs.held_by_us.insert(lease.port);
        }
    }
    obs.marked = marked;
    obs
}

/// The group leader serving each lease: a marked process leading its own group whose
/// lease uid matches, preferring the one the lease recorded.
fn leaders_of<'a>(
    marked: &'a [Marked],
    leases: &BTreeMap<String, Lease>,
) -> BTreeMap<&'a str, &'a Marked> {
    let mut leaders: BTreeMap<&str, &Marked> = BTreeMap::new();
    for m in marked {
        let Some(lease) = leases.get(&m.session) else {
            continue;
        };
        if lease.uid != m.lease || m.process.pid != m.pgid {
            continue;
        }
        let better = match leaders.get(m.session.as_str()) {
            None => true,
            Some(prev) => lease.process == Some(m.process) && lease.process != Some(prev.process),
        };
        if better {
            leaders.insert(&m.session, m);
        }
    }
    leaders
}

/// Whether the leader's process group owns one of the port's LISTEN sockets (`ids`).
/// A socket seen before that still listens on the port needs no fd walk.
fn group_listens(
    leader: &Marked,
    ids: &BTreeSet<u64>,
    marked: &[Marked],
    cache: &mut ScanCache,
) -> bool {
    if cache
        .sockets
        .get(&leader.process)
        .is_some_and(|i| ids.contains(i))
    {
        return true;
    }
    let found = marked
        .iter()
        .filter(|o| o.pgid == leader.pgid)
        .find_map(|o| {
            procfs::socket_inodes(o.process.pid)
                .intersection(ids)
                .next()
                .copied()
        });
    if let Some(inode) = found {
        cache.sockets.insert(leader.process, inode);
    }
    found.is_some()
}

fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Writes a 0600 file, creating its 0700 directory first (Kubernetes session keys are
/// `namespace/name`: one directory per namespace).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        private_dir(dir)?;
    }
    crate::fsutil::write_replace(path, bytes, 0o600)
}

fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    // Kubernetes session keys are `namespace/name`: one log directory per namespace.
    if let Some(dir) = path.parent() {
        private_dir(dir)?;
    }
    // Always O_APPEND (so a later truncation, by us or by the proxy, is safe); keep logs
    // bounded: start over once a log passes MAX_LOG_BYTES. O_NOFOLLOW: a symlink planted
    // in the logs directory must not make root append to some other file.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    let meta = log.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > MAX_LOG_BYTES {
        log.set_len(0)?;
    }
    Ok(log)
}

/// Opens an existing regular file for reading without following a symlink.
fn open_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

/// Truncates the log at `path` to nothing if it is larger than `max`.
fn truncate_if_over(path: &Path, max: u64) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::symlink_metadata(path)?.len() <= max {
        return Ok(());
    }
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    if log.metadata()?.is_file() {
        log.set_len(0)?;
        writeln!(
            log,
            "[vncd: log truncated, it grew past {max} bytes at {}]",
            jiff::Timestamp::now()
        )?;
    }
    Ok(())
}

/// Gives `path` (a key file, a nonce directory) to the proxy user and makes it reachable:
/// search permission on every directory between it and `root` (`keys/` or `nonces/`, and
/// in Kubernetes mode the namespace directory below).
fn hand_to(user: &ProxyUser, path: &Path, root: &Path) -> std::io::Result<()> {
    user.give(path)?;
    for dir in path.ancestors().skip(1) {
        if !dir.starts_with(root) {
            break;
        }
        add_search_permission(dir)?;
    }
    Ok(())
}

/// Adds search (x) permission for group and others to a directory of ours, so a proxy
/// run as another user can reach one known file inside without listing it. Write
/// permission for group and others is taken away at the same time: a proxy user that
/// could write there (a Kubernetes emptyDir is created 0777) could rename `tokens/` or
/// `logs/` away and put its own in their place.
pub(crate) fn add_search_permission(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    let want = (mode | 0o011) & !0o022;
    if want != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(want))?;
    }
    Ok(())
}

fn last_line(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.chars().take(300).collect())
}

fn group_alive(pgid: i32) -> bool {
    killpg(Pid::from_raw(pgid), None).is_ok()
}

fn proc_alive(pid: i32) -> bool {
    procfs::stat(pid).is_some_and(|s| s.is_alive())
}

/// Whether `process` (or, once its leader is gone, some member of its group) still
/// carries our marker. Checked again right before the SIGKILL that follows the grace
/// period: in those seconds the proxy may have exited and its pid been reused, or the
/// process may have exec'd into something that is no longer our proxy.
fn still_ours(process: ProcRef, owner: &str, group: bool) -> bool {
    let marked = |pid: i32| {
        procfs::environ(pid)
            .is_some_and(|env| env.get(marker::OWNER).map(String::as_str) == Some(owner))
    };
    match procfs::stat(process.pid).filter(procfs::Stat::is_alive) {
        Some(st) => st.start_time == process.start_time && marked(process.pid),
        // The leader is gone; a pid in use as a process group id is never handed out
        // again, so the group is still the one the leader made.
        None => {
            group
                && procfs::pids().into_iter().any(|p| {
                    procfs::stat(p).is_some_and(|s| s.pgid == process.pid && s.is_alive())
                        && marked(p)
                })
        }
    }
}

/// SIGTERM, wait up to `grace`, SIGKILL (only if still provably ours), wait a little more.
async fn terminate(process: ProcRef, owner: &str, group: bool, grace: Duration) {
    let pid = process.pid;
    let signal = |sig| {
        let _ = if group {
            killpg(Pid::from_raw(pid), sig)
        } else {
            kill(Pid::from_raw(pid), sig)
        };
    };
    let alive = || {
        if group {
            group_alive(pid) && proc_or_members(pid)
        } else {
            proc_alive(pid)
        }
    };
    signal(Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    while alive() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if alive() {
        if !still_ours(process, owner, group) {
            tracing::warn!(
                pid,
                "not sending SIGKILL: the process is no longer provably our proxy"
            );
            return;
        }
        signal(Signal::SIGKILL);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while alive() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A group whose only remaining member is an unreaped zombie counts as gone.
fn proc_or_members(pgid: i32) -> bool {
    if proc_alive(pgid) {
        return true;
    }
    procfs::pids()
        .into_iter()
        .any(|p| procfs::stat(p).is_some_and(|s| s.pgid == pgid && s.is_alive()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// Kills and reaps a child we started, whatever the test did.
    struct Reap(std::process::Child);

    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn marked_child(owner: &str, script: &str) -> (Reap, ProcRef) {
        let child = std::process::Command::new("sh")
            .args(["-c", script])
            .env(marker::OWNER, owner)
            .process_group(0)
            .spawn()
            .expect("sh");
        let pid = i32::try_from(child.id()).expect("pid");
        let st = procfs::stat(pid).expect("stat");
        (
            Reap(child),
            ProcRef {
                pid,
                start_time: st.start_time,
            },
        )
    }

    #[test]
    fn a_running_proxys_log_is_cut_back_past_the_cap_and_never_through_a_symlink() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vm1.log");
        // The proxy's end: an O_APPEND descriptor that keeps writing.
        let mut proxy_end = open_log(&path).expect("log");
        proxy_end.write_all(&[b'x'; 3000]).expect("write");
        truncate_if_over(&path, 4096).expect("check");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").len(),
            3000,
            "under the cap"
        );
        proxy_end.write_all(&[b'y'; 2000]).expect("write");
        truncate_if_over(&path, 4096).expect("check");
        proxy_end.write_all(b"after\n").expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("[vncd: log truncated"), "{text}");
        assert!(text.ends_with("after\n") && !text.contains("xxx"), "{text}");
        // A symlink in place of a log is neither truncated through nor opened.
        let outside = dir.path().join("outside");
        std::fs::write(&outside, vec![b'z'; 9000]).expect("write");
        let link = dir.path().join("vm2.log");
        std::os::unix::fs::symlink(&outside, &link).expect("symlink");
        let _ = truncate_if_over(&link, 10);
        assert!(open_log(&link).is_err());
        assert_eq!(std::fs::metadata(&outside).expect("meta").len(), 9000);
    }

    #[tokio::test]
    async fn sigkill_after_the_grace_period_goes_only_to_a_process_still_ours() {
        let owner = format!("/vncd-test-owner-{}", std::process::id());
        // Ignores SIGTERM and stays ours: SIGKILLed after the grace period.
        let (mut stubborn, p) = marked_child(&owner, "trap '' TERM; exec sleep 30");
        std::thread::sleep(Duration::from_millis(100));
        assert!(still_ours(p, &owner, true));
        terminate(p, &owner, true, Duration::from_millis(300)).await;
        let st = stubborn.0.wait().expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(9),
            "{st}"
        );

        // Ignores SIGTERM and, during the grace period, becomes another program without
        // our marker (what a reused pid looks like): no SIGKILL.
        let (mut changed, p) =
            marked_child(&owner, "trap '' TERM; sleep 0.3; exec env -i sleep 30");
        // Give sh time to install its trap.
        std::thread::sleep(Duration::from_millis(100));
        assert!(still_ours(p, &owner, true));
        terminate(p, &owner, true, Duration::from_millis(800)).await;
        assert!(
            changed.0.try_wait().expect("try_wait").is_none(),
            "SIGKILL sent to a process that was no longer ours"
        );
        assert!(!still_ours(p, &owner, true));
        // A wrong start time (the pid was reused) is not ours either.
        let reused = ProcRef {
            pid: p.pid,
            start_time: p.start_time + 1,
        };
        assert!(!still_ours(reused, &owner, true));
        let _ = changed.0.kill();
    }
}
