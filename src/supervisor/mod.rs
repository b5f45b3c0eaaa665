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
pub mod websockify;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::sync::mpsc;

use crate::lease::{Lease, ProcRef};
use crate::reconcile::ProxyState;
use crate::session::Endpoint;

/// Environment variables that mark a proxy as ours.
pub mod marker {
    pub const OWNER: &str = "VNCD_MARK_OWNER";
    pub const SESSION: &str = "VNCD_MARK_SESSION";
    pub const LEASE: &str = "VNCD_MARK_LEASE";
    pub const PORT: &str = "VNCD_MARK_PORT";
    pub const TARGET: &str = "VNCD_MARK_TARGET";
}

/// What a backend needs to build a proxy's command line.
#[derive(Clone, Debug)]
pub struct ProxySpec {
    pub session: String,
    pub listen: IpAddr,
    pub port: u16,
    pub target: Endpoint,
    pub web: Option<PathBuf>,
    /// The session token, if the lease has one.
    pub token: Option<String>,
    /// Where the backend's token file was written (see [`Backend::token_file`]).
    pub token_file: Option<PathBuf>,
}

/// TLS material the proxies serve with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

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
    /// The content of the token file this backend reads (it differs per backend), or
    /// `None` when the session has no token. Written with mode 0600 before the spawn.
    fn token_file(&self, spec: &ProxySpec) -> Option<String>;
    /// Extra arguments that make the proxy keep per-session counters in `path` (see
    /// `proxy::stats`), or `None` if this backend cannot.
    fn stats_args(&self, _path: &Path) -> Option<Vec<String>> {
        None
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
    #[error("cannot write token file {}: {source}", path.display())]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("proxy for session {session:?} exited before it could be identified")]
    Vanished { session: String },
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
}

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
    pub fn observe(&self, leases: &BTreeMap<String, Lease>) -> Observation {
        let marked = self.scan();
        let mut obs = match self.cache.lock() {
            Ok(mut c) => classify_cached(marked, leases, &mut c),
            Err(_) => classify(marked, leases),
        };
        self.count_authenticated(&mut obs);
        obs
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
    fn count_authenticated(&self, obs: &mut Observation) {
        for (session, n) in obs.clients.iter_mut() {
            if let Some(ProxyState::Running { process, .. }) = obs.proxies.get(session)
                && let Some(auth) = self.authenticated_clients(session, *process)
            {
                *n = auth;
            }
        }
    }

    /// Starts the proxy of a persisted lease, in its own process group, with our marker.
    pub fn spawn(&self, lease: &Lease) -> Result<ProcRef, SpawnError> {
        let mut spec = ProxySpec {
            session: lease.session.clone(),
            listen: self.listen,
            port: lease.port,
            target: lease.target.clone(),
            web: self.web.clone(),
            token: lease.token.clone(),
            token_file: None,
        };
        if let Some(content) = self.backend.token_file(&spec) {
            let path = self.token_dir().join(format!("{}.token", lease.session));
            write_private(&path, content.as_bytes()).map_err(|source| SpawnError::Token {
                path: path.clone(),
                source,
            })?;
            spec.token_file = Some(path);
        }
        let mut line = self.backend.command(&spec);
        if let Some(path) = self.stats_file(&lease.session)
            && let Some(extra) = self.backend.stats_args(&path)
        {
            // A missing directory only costs the counters; the proxy still serves.
            if let Some(dir) = path.parent()
                && let Err(e) = private_dir(dir)
            {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot create stats directory");
            }
            line.args.extend(extra);
        }
        let log_path = self.log_dir.join(format!("{}.log", lease.session));
        let log = open_log(&log_path).map_err(|source| SpawnError::Log {
            path: log_path.clone(),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| SpawnError::Log {
            path: log_path.clone(),
            source,
        })?;
        let mut cmd = tokio::process::Command::new(&line.program);
        cmd.args(&line.args);
        // Our own VNCD_* settings are not the proxy's business.
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
            .stdin(Stdio::null())
            // A file, not a pipe: the proxy must outlive us without SIGPIPE.
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|source| SpawnError::Exec {
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
        let st = procfs::stat(pid).ok_or_else(vanished)?;
        let exits = self.exits.clone();
        let session = lease.session.clone();
        let children = self.children.clone();
        if let Ok(mut c) = children.lock() {
            c.insert(pid, false);
        }
        // Reap the child (no zombies) and say why it ended, unless we ended it.
        tokio::spawn(async move {
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
        Ok(ProcRef {
            pid,
            start_time: st.start_time,
        })
    }

    /// True if `process` is still the very process we started (same start time, our marker).
    pub fn is_ours(&self, process: ProcRef) -> bool {
        let same = procfs::stat(process.pid)
            .is_some_and(|st| st.is_alive() && st.start_time == process.start_time);
        same && procfs::environ(process.pid)
            .is_some_and(|env| env.get(marker::OWNER) == Some(&self.owner))
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
        terminate(process.pid, leads_group, self.grace).await;
        true
    }

    /// Token files live beside the logs, in a directory only we can read.
    fn token_dir(&self) -> PathBuf {
        self.log_dir.with_file_name("tokens")
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

    /// Forgets a released session's counters file.
    pub fn forget(&self, session: &str) {
        if let Some(path) = self.stats_file(session) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// The last non-empty line a proxy wrote to its log, for failure messages.
    pub fn last_log_line(&self, session: &str) -> Option<String> {
        last_line(&self.log_dir.join(format!("{session}.log")))
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
    let now = procfs::uptime_ms();
    let ticks = procfs::clock_ticks();
    let mut obs = Observation::default();

    // Group leaders that match a lease exactly.
    let mut leaders: BTreeMap<&str, &Marked> = BTreeMap::new();
    for m in &marked {
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
    let mut live = HashSet::new();
    for (session, m) in &leaders {
        let port = leases[*session].port;
        obs.clients.insert(
            (*session).to_owned(),
            established.get(&port).copied().unwrap_or(0),
        );
        live.insert(m.process);
        // Listening: the port's LISTEN socket belongs to the leader's group. A socket
        // seen before that still listens on the port needs no fd walk.
        let listening = listeners.get(&port).is_some_and(|ids| {
            if cache
                .sockets
                .get(&m.process)
                .is_some_and(|i| ids.contains(i))
            {
                return true;
            }
            let found = marked.iter().filter(|o| o.pgid == m.pgid).find_map(|o| {
                procfs::socket_inodes(o.process.pid)
                    .intersection(ids)
                    .next()
                    .copied()
            });
            if let Some(inode) = found {
                cache.sockets.insert(m.process, inode);
            }
            found.is_some()
        });
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
        std::fs::create_dir_all(dir)?;
    }
    // Keep logs bounded: start over once a log passes 1 MiB.
    let too_big = std::fs::metadata(path).is_ok_and(|m| m.len() > 1024 * 1024);
    std::fs::OpenOptions::new()
        .create(true)
        .append(!too_big)
        .write(true)
        .truncate(too_big)
        .mode(0o600)
        .open(path)
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

/// SIGTERM, wait up to `grace`, SIGKILL, wait a little more.
async fn terminate(pid: i32, group: bool, grace: Duration) {
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
