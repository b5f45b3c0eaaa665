//! Chaos: the real `vncd` binary, real proxies (builtin unless `VNCD_TEST_BACKEND` says
//! otherwise) and a real QEMU VNC server, under faults injected at seeded random points.
//!
//! Every cycle churns sessions (create, delete, retarget, delete-and-recreate) and
//! `kill -9`s vncd at a random moment of that churn, then restarts it. Most cycles add
//! one more fault: proxies SIGKILLed (whole process group), pool ports occupied by foreign
//! listeners (including the port of a proxy just killed), `leases.json` corrupted while
//! vncd is down or while it runs, the state directory made read-only or full mid-run.
//! The state directory is a small tmpfs this test mounts (and unmounts in Drop), so the
//! last two are real EROFS / ENOSPC errors.
//!
//! Invariants, checked after every fault once vncd has converged:
//! - no port is leased twice, every lease is inside the pool (leases.json);
//! - no orphan: every process carrying this state directory's marker is the recorded
//!   proxy of a lease (or in its process group), and every lease has exactly one;
//! - every remaining manifest is Ready (`vncd get -o json`) with the lease's port, pid,
//!   token and target, and a sample of them serves the real RFB banner;
//! - sessions the cycle did not touch kept their pid, port and lease (consoles survive);
//! - a corrupt state file is refused (run, cleanup, status) and never rewritten, and
//!   `vncd cleanup --once --rebuild-state` recovers it without disturbing live consoles.
//!
//! And continuously, by a sampler thread (every few ms): leases.json is always a whole,
//! valid file with unique ports unless the test itself corrupted it, and every Ready
//! session in sessions.json is backed by a persisted lease (see [`Sampler`]).
//!
//! Environment: `VNCD_CHAOS_CYCLES` (30), `VNCD_CHAOS_SESSIONS` (16), `VNCD_CHAOS_SEED`
//! (random; printed at start and on failure), `VNCD_CHAOS_REPORT` (a file to write the
//! figures to), `VNCD_CHAOS_FAULTS` (a comma-separated subset of the [`Fault`] names,
//! e.g. `FullStateDir,ReadOnlyStateDir`, to replay one kind). The seed replays the test's
//! decisions; process timing still varies.
//!
//!   bounded (CI):  cargo test --test chaos -- --nocapture
//!   long form:     VNCD_CHAOS_SESSIONS=200 VNCD_CHAOS_CYCLES=40 cargo test --test chaos -- --nocapture
//!
//! Needs root (it mounts a tmpfs) and qemu-system-x86_64.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;

// ------------------------------------------------------------------ seeded randomness

/// xorshift64*: small, seedable, good enough to pick faults.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// 0..n (0 when n is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len())])
    }
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

// ------------------------------------------------------------------ a tmpfs we mount

/// A tmpfs mounted at a fresh temp directory; unmounted in Drop (after everything that
/// uses it, see the field order of [`Chaos`]).
struct Tmpfs {
    _root: tempfile::TempDir,
    dir: PathBuf,
    read_only_bind: bool,
}

fn run_ok(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Unmounts the topmost mount at `dir`, retrying while it is busy (proxies that were
/// just SIGKILLed may still hold log files), then lazily.
fn unmount(dir: &Path) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if run_ok(Command::new("umount").arg(dir)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = run_ok(Command::new("umount").arg("-l").arg(dir));
}

impl Tmpfs {
    fn mount(size_mib: u64) -> Tmpfs {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size_mib}m,mode=0700"))
                .arg("vncd-chaos")
                .arg(&dir),
        )
        .unwrap_or_else(|e| {
            panic!("the chaos suite mounts a tmpfs for its state directory and needs root: {e}")
        });
        Tmpfs {
            _root: root,
            dir,
            read_only_bind: false,
        }
    }

    /// A read-only bind mount over the directory: new opens for writing fail with EROFS,
    /// while files already open (the proxies' logs) keep working, as on a real remount.
    fn make_read_only(&mut self) {
        run_ok(
            Command::new("mount")
                .arg("--bind")
                .arg(&self.dir)
                .arg(&self.dir),
        )
        .unwrap();
        self.read_only_bind = true;
        run_ok(
            Command::new("mount")
                .args(["-o", "remount,bind,ro"])
                .arg(&self.dir),
        )
        .unwrap();
    }

    fn make_writable(&mut self) {
        if self.read_only_bind {
            unmount(&self.dir);
            self.read_only_bind = false;
        }
    }

    /// Fills the filesystem to the last byte; returns the filler file.
    fn fill(&self) -> PathBuf {
        let path = self.dir.join("chaos-filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0x5a_u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        while f.write_all(&[0x5a]).is_ok() {}
        let _ = f.flush();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        self.make_writable();
        unmount(&self.dir);
    }
}

// ------------------------------------------------------------------ state files

#[derive(Clone, Debug, PartialEq, Eq)]
struct LeaseView {
    session: String,
    port: u16,
    uid: String,
    pid: Option<i64>,
    target: String,
}

/// Reads leases.json: Ok(None) when it does not exist, Err when it is not a lease file.
fn read_leases(path: &Path) -> Result<Option<Vec<LeaseView>>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if v["version"] != 1 {
        return Err(format!("version {}", v["version"]));
    }
    let list = v["leases"].as_array().ok_or("no leases array")?;
    list.iter()
        .map(|l| {
            let t = &l["target"];
            let target = if let Some(tcp) = t.get("tcp") {
                format!("{}:{}", tcp["host"].as_str().unwrap_or(""), tcp["port"])
            } else {
                format!("unix:{}", t["unix"]["path"].as_str().unwrap_or(""))
            };
            Ok(LeaseView {
                session: l["session"].as_str().ok_or("lease without session")?.into(),
                port: l["port"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or("lease without port")?,
                uid: l["uid"].as_str().unwrap_or_default().into(),
                pid: l["process"]["pid"].as_i64(),
                target,
            })
        })
        .collect::<Result<Vec<_>, &str>>()
        .map(Some)
        .map_err(str::to_owned)
}

/// Ports leased twice, sessions holding two leases, ports outside the pool.
fn lease_set_problems(leases: &[LeaseView], range: (u16, u16)) -> Vec<String> {
    let mut out = Vec::new();
    let mut ports = BTreeMap::new();
    let mut sessions = BTreeSet::new();
    for l in leases {
        if let Some(other) = ports.insert(l.port, &l.session) {
            out.push(format!(
                "port {} leased twice ({other} and {})",
                l.port, l.session
            ));
        }
        if !sessions.insert(&l.session) {
            out.push(format!("session {} holds two leases", l.session));
        }
        if !(range.0..=range.1).contains(&l.port) {
            out.push(format!(
                "port {} of {} is outside the pool",
                l.port, l.session
            ));
        }
    }
    out
}

/// The lease a status reports (`leaseUid`): what a console URL is minted for.
fn lease_of(status: &Value) -> String {
    status["leaseUid"].as_str().unwrap_or_default().to_owned()
}

/// True if `pid` is alive and carries this owner's marker with this lease uid.
fn proxy_of_lease_alive(pid: i64, owner: &str, uid: &str) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
    let has = |k: &str, v: &str| vars.contains(&format!("{k}={v}").as_bytes());
    has(vncd::supervisor::marker::OWNER, owner) && has(vncd::supervisor::marker::LEASE, uid)
}

fn log_since(v: &Vncd, mark: u64) -> String {
    let mut f = match std::fs::File::open(v.tmp.path().join("vncd.log")) {
        Ok(f) => f,
        Err(_) => return String::new(),
    };
    let _ = f.seek(SeekFrom::Start(mark));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s
}

fn log_mark(v: &Vncd) -> u64 {
    std::fs::metadata(v.tmp.path().join("vncd.log")).map_or(0, |m| m.len())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ------------------------------------------------------------------ the sampler

/// What the sampler counted and found.
#[derive(Default)]
struct SamplerStats {
    samples: u64,
    lease_files_checked: u64,
    skipped_while_corrupted: u64,
    ready_checked: u64,
    ready_in_current_leases: u64,
    ready_released_since: u64,
    ready_while_corrupted: u64,
    /// lease uid -> (session, port, uid) of every lease ever seen in leases.json.
    history: HashMap<String, (String, u16, String)>,
    violations: Vec<String>,
}

impl SamplerStats {
    /// Records a violation once (a sampler sees the same one many times).
    fn violation(&mut self, v: String) {
        if !self.violations.contains(&v) {
            self.violations.push(v);
        }
    }
}

/// Reads sessions.json and then leases.json, again and again, while the chaos runs.
///
/// "No lease reported that was not persisted" is checked soundly without knowing when
/// sessions.json was written: a Ready item (session, port, lease uid, pid) in sessions.json
/// must be either in the leases.json read right after it, or a lease seen in an earlier
/// read that has since been released. vncd releases a lease only once its proxy is gone,
/// so if the lease is missing while the proxy carrying that very lease uid still runs,
/// the status reported something leases.json does not hold: a violation. A Ready item
/// whose lease uid was never seen in any read of leases.json is a violation too: a Ready
/// lease stays in the file at least from its commit until its proxy has started,
/// listened, been observed and later stopped, which is far longer than the sampling gap.
struct Sampler {
    stop: Arc<AtomicBool>,
    corrupt_expected: Arc<AtomicBool>,
    stats: Arc<Mutex<SamplerStats>>,
    handle: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(state: PathBuf, owner: String, range: (u16, u16)) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let corrupt_expected = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(SamplerStats::default()));
        let (s, c, st) = (stop.clone(), corrupt_expected.clone(), stats.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                sample(&state, &owner, range, &c, &st);
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        Sampler {
            stop,
            corrupt_expected,
            stats,
            handle: Some(handle),
        }
    }

    fn expect_corruption(&self, on: bool) {
        self.corrupt_expected.store(on, Ordering::SeqCst);
    }

    /// Adds a lease file's leases to the history (the last good file before a corruption).
    fn record(&self, bytes: &[u8]) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), bytes).unwrap();
        let mut st = self.stats.lock().unwrap();
        for l in read_leases(tmp.path()).ok().flatten().unwrap_or_default() {
            st.history.insert(l.uid.clone(), (l.session, l.port, l.uid));
        }
    }

    fn violations(&self) -> Vec<String> {
        self.stats.lock().unwrap().violations.clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn sample(
    state: &Path,
    owner: &str,
    range: (u16, u16),
    corrupt_expected: &AtomicBool,
    stats: &Mutex<SamplerStats>,
) {
    // sessions.json first, leases.json right after.
    let sessions = std::fs::read(state.join("sessions.json")).ok();
    let expected = corrupt_expected.load(Ordering::SeqCst);
    let leases = read_leases(&state.join("leases.json"));
    let mut st = stats.lock().unwrap();
    st.samples += 1;
    let sessions: Option<Value> = match sessions.map(|b| serde_json::from_slice(&b)) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => {
            st.violations
                .push(format!("sessions.json is not whole valid JSON: {e}"));
            None
        }
    };
    // While the test has corrupted leases.json on purpose, Ready statuses are checked
    // against the leases seen before (the test records the last good file under the
    // lock, see Chaos::corrupt_state_file): no new lease can be persisted meanwhile.
    let current = match leases {
        Ok(_) | Err(_) if expected || corrupt_expected.load(Ordering::SeqCst) => {
            st.skipped_while_corrupted += 1;
            None
        }
        Ok(l) => Some(l.unwrap_or_default()),
        Err(e) => {
            st.violation(format!(
                "leases.json unreadable though nobody corrupted it: {e}"
            ));
            return;
        }
    };
    if let Some(leases) = &current {
        st.lease_files_checked += 1;
        for p in lease_set_problems(leases, range) {
            st.violation(format!("leases.json: {p}"));
        }
        for l in leases {
            st.history
                .insert(l.uid.clone(), (l.session.clone(), l.port, l.uid.clone()));
        }
    }
    let Some(sessions) = sessions else { return };
    let mut ready_ports = BTreeMap::new();
    for item in sessions["items"].as_array().into_iter().flatten() {
        let status = &item["status"];
        if status["phase"] != "Ready" {
            continue;
        }
        st.ready_checked += 1;
        let name = item["metadata"]["name"].as_str().unwrap_or_default();
        let port = status["port"].as_u64().unwrap_or(0) as u16;
        let token = lease_of(status);
        let pid = status["pid"].as_i64().unwrap_or(0);
        if let Some(other) = ready_ports.insert(port, name.to_owned()) {
            st.violation(format!(
                "sessions.json shows {other} and {name} Ready on one port {port}"
            ));
        }
        if current.as_ref().is_some_and(|leases| {
            leases
                .iter()
                .any(|l| l.session == name && l.port == port && l.uid == token)
        }) {
            st.ready_in_current_leases += 1;
            continue;
        }
        match st.history.get(&token).cloned() {
            Some((s, p, _)) if s == name && p == port && current.is_none() => {
                st.ready_while_corrupted += 1;
            }
            Some((s, p, uid)) if s == name && p == port => {
                if proxy_of_lease_alive(pid, owner, &uid) {
                    st.violation(format!(
                        "sessions.json shows {name} Ready on port {port} (pid {pid}) but leases.json \
                         no longer holds that lease while its proxy still runs"
                    ));
                } else {
                    st.ready_released_since += 1;
                }
            }
            _ => st.violation(format!(
                "sessions.json shows {name} Ready on port {port} with a lease never seen in leases.json"
            )),
        }
    }
}

// ------------------------------------------------------------------ the chaos driver

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillProxies,
    /// Processes carrying this state directory's marker but no lease (what a crash
    /// between spawn and commit, or a lost state file, would leave): real `vncd proxy`
    /// processes listening on free pool ports.
    Orphans,
    ForeignListeners,
    CorruptWhileDown,
    CorruptWhileRunning,
    ReadOnlyStateDir,
    FullStateDir,
}

const FAULTS: [Fault; 7] = [
    Fault::KillProxies,
    Fault::Orphans,
    Fault::ForeignListeners,
    Fault::CorruptWhileDown,
    Fault::CorruptWhileRunning,
    Fault::ReadOnlyStateDir,
    Fault::FullStateDir,
];

#[derive(Clone, Debug)]
enum Op {
    /// A new session targeting QEMU number .1.
    Create(String, usize),
    Delete(String),
    /// Point an existing session at the other QEMU.
    Retarget(String, usize),
    /// Delete a manifest and write it again at once (a new lease is expected).
    Recreate(String, usize),
}

/// Counts for RELIABILITY.md.
#[derive(Default, Debug)]
struct Figures {
    cycles: u64,
    vncd_kill9: u64,
    vncd_restarts: u64,
    manifests_created: u64,
    manifests_deleted: u64,
    manifests_retargeted: u64,
    manifests_recreated: u64,
    proxies_sigkilled: u64,
    proxies_sigkilled_while_vncd_down: u64,
    orphans_planted: u64,
    /// Killed proxies checked to be back on the same lease (port, lease) with a new pid.
    same_lease_restarts: u64,
    foreign_listeners: u64,
    ports_stolen: u64,
    steal_races_lost: u64,
    corruptions: BTreeMap<&'static str, u64>,
    corrupt_refusals: u64,
    rebuilds: u64,
    read_only_windows: u64,
    full_windows: u64,
    convergence_checks: u64,
    sessions_verified_ready: u64,
    stability_checks: u64,
    banner_checks: u64,
    status_checks: u64,
    orphan_scans: u64,
    /// Temp files (`.NAME.tmp.PID`) of dead writers found in the state directory.
    stale_temp_files: BTreeSet<String>,
}

/// Field order is drop order: the sampler stops first, then vncd and its proxies end
/// (the harness's Vncd drop), then QEMU, then the tmpfs is unmounted.
struct Chaos {
    sampler: Sampler,
    v: Vncd,
    foreign: Vec<(u16, TcpListener)>,
    /// Orphans we planted (our children, so we reap them).
    orphans: Vec<std::process::Child>,
    qemu: [Qemu; 2],
    fs: Tmpfs,
    rng: Rng,
    seed: u64,
    cycle: usize,
    sessions: usize,
    stage: String,
    /// Desired sessions: name -> index of the QEMU they target.
    live: BTreeMap<String, usize>,
    next_id: usize,
    /// Sessions whose port was taken by a foreign listener while their proxy was down:
    /// they must end up on another port.
    stolen: BTreeMap<String, u16>,
    /// session -> (port, pid, lease uid) at the last convergence.
    baseline: BTreeMap<String, (u16, i64, String)>,
    /// Sessions this cycle changed on purpose (they may change pid or port).
    touched: BTreeSet<String>,
    /// The snapshot `baseline` replaced at the last convergence.
    before_fault: BTreeMap<String, (u16, i64, String)>,
    figures: Figures,
    rt: tokio::runtime::Runtime,
}

impl Drop for Chaos {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept = std::env::temp_dir().join(format!("vncd-chaos-{}.log", self.seed));
            let _ = std::fs::copy(self.v.tmp.path().join("vncd.log"), &kept);
            eprintln!("the whole vncd log is kept in {}", kept.display());
            eprintln!(
                "\nCHAOS FAILED: VNCD_CHAOS_SEED={} cycle {} stage {:?} (sessions {}, backend {})\n\
                 replay: VNCD_CHAOS_SEED={} VNCD_CHAOS_SESSIONS={} cargo test --test chaos -- --nocapture\n\
                 --- last lines of the vncd log ---\n{}",
                self.seed,
                self.cycle,
                self.stage,
                self.sessions,
                backend(),
                self.seed,
                self.sessions,
                tail(&self.v.log(), 60)
            );
        }
    }
}

impl Chaos {
    fn leases_path(&self) -> PathBuf {
        self.v.state.join("leases.json")
    }

    fn leases(&self) -> Vec<LeaseView> {
        read_leases(&self.leases_path())
            .unwrap_or_else(|e| panic!("leases.json unreadable: {e}"))
            .unwrap_or_default()
    }

    fn manifest_for(&self, name: &str, q: usize) -> String {
        manifest(name, u32::from(self.qemu[q].port))
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Create(name, q) => {
                self.v
                    .write_manifest(&format!("{name}.yaml"), &self.manifest_for(name, *q));
                self.live.insert(name.clone(), *q);
                self.figures.manifests_created += 1;
            }
            Op::Delete(name) => {
                self.v.remove_session(name);
                self.live.remove(name);
                self.stolen.remove(name);
                self.figures.manifests_deleted += 1;
            }
            Op::Retarget(name, q) => {
                self.v
                    .write_manifest(&format!("{name}.yaml"), &self.manifest_for(name, *q));
                self.live.insert(name.clone(), *q);
                self.figures.manifests_retargeted += 1;
            }
            Op::Recreate(name, q) => {
                self.v.remove_session(name);
                self.stolen.remove(name);
                self.v
                    .write_manifest(&format!("{name}.yaml"), &self.manifest_for(name, *q));
                self.live.insert(name.clone(), *q);
                self.figures.manifests_recreated += 1;
            }
        }
        let name = match op {
            Op::Create(n, _) | Op::Delete(n) | Op::Retarget(n, _) | Op::Recreate(n, _) => n,
        };
        self.touched.insert(name.clone());
    }

    fn new_name(&mut self) -> String {
        self.next_id += 1;
        format!("s{:05}", self.next_id)
    }

    /// Deletes, retargets and recreates some sessions and creates new ones up to the
    /// target count, in random order.
    fn plan_churn(&mut self) -> Vec<Op> {
        let mut ops = Vec::new();
        let names: Vec<String> = self.live.keys().cloned().collect();
        let mut chosen = BTreeSet::new();
        let deletes = self.rng.below(self.sessions / 5 + 2);
        for _ in 0..deletes {
            if let Some(n) = self.rng.pick(&names)
                && chosen.insert(n.clone())
            {
                ops.push(Op::Delete(n.clone()));
            }
        }
        for _ in 0..self.rng.below(3) {
            if let Some(n) = self.rng.pick(&names)
                && chosen.insert(n.clone())
            {
                let q = 1 - self.live[n];
                ops.push(Op::Retarget(n.clone(), q));
            }
        }
        if self.rng.chance(50)
            && let Some(n) = self.rng.pick(&names)
            && chosen.insert(n.clone())
        {
            let q = self.rng.below(2);
            ops.push(Op::Recreate(n.clone(), q));
        }
        let remaining = self.live.len() - ops.iter().filter(|o| matches!(o, Op::Delete(_))).count();
        for _ in remaining..self.sessions {
            let name = self.new_name();
            let q = self.rng.below(2);
            ops.push(Op::Create(name, q));
        }
        self.rng.shuffle(&mut ops);
        ops
    }

    fn kill_vncd(&mut self) {
        self.v.kill9();
        self.figures.vncd_kill9 += 1;
    }

    fn start_vncd(&mut self) {
        self.v.start();
        self.figures.vncd_restarts += 1;
    }

    /// SIGKILL to the process groups of `n` random proxies of ours.
    fn kill_proxies(&mut self, n: usize) -> Vec<(String, u16)> {
        let mut leaders: Vec<_> = vncd::supervisor::scan(&self.v.owner())
            .into_iter()
            .filter(|m| m.process.pid == m.pgid && self.live.contains_key(&m.session))
            .collect();
        self.rng.shuffle(&mut leaders);
        let mut killed = Vec::new();
        for m in leaders.into_iter().take(n) {
            let _ = killpg(Pid::from_raw(m.pgid), Signal::SIGKILL);
            self.touched.insert(m.session.clone());
            killed.push((m.session, m.port.unwrap_or(0)));
        }
        self.figures.proxies_sigkilled += killed.len() as u64;
        killed
    }

    /// A churn with `kill -9` of vncd at a random moment; vncd is restarted unless
    /// `stay_down`. Sometimes a proxy is SIGKILLed while vncd is down.
    fn churn_with_kill(&mut self, stay_down: bool) {
        self.stage = "churn with kill -9".into();
        let ops = self.plan_churn();
        let kill_at = self.rng.below(ops.len() + 1);
        let restart_early = !stay_down && self.rng.chance(50);
        for (i, op) in ops.iter().enumerate() {
            if i == kill_at {
                std::thread::sleep(self.rng.ms(0, 500));
                self.kill_vncd();
                if self.rng.chance(30) {
                    let n = self.kill_proxies(1).len();
                    self.figures.proxies_sigkilled_while_vncd_down += n as u64;
                }
                if restart_early {
                    self.start_vncd();
                }
            }
            self.apply(op);
            std::thread::sleep(self.rng.ms(0, 30));
        }
        if kill_at == ops.len() {
            std::thread::sleep(self.rng.ms(0, 600));
            self.kill_vncd();
        }
        if !stay_down && self.v.child.is_none() {
            self.start_vncd();
        }
    }

    /// Occupies random free pool ports, and sometimes the port of a proxy just killed.
    fn foreign_listeners(&mut self) {
        self.stage = "foreign listeners".into();
        // Give some back first.
        let mut kept = Vec::new();
        for (port, l) in std::mem::take(&mut self.foreign) {
            if self.rng.chance(40) {
                drop(l);
            } else {
                kept.push((port, l));
            }
        }
        self.foreign = kept;
        let leased: BTreeSet<u16> = self.leases().iter().map(|l| l.port).collect();
        let free: Vec<u16> = (self.v.range.0..=self.v.range.1)
            .filter(|p| !leased.contains(p) && !self.foreign.iter().any(|(f, _)| f == p))
            .collect();
        for _ in 0..1 + self.rng.below(3) {
            if self.foreign.len() >= 6 {
                break;
            }
            if let Some(&p) = self.rng.pick(&free)
                && let Ok(l) = TcpListener::bind(("127.0.0.1", p))
            {
                self.foreign.push((p, l));
                self.figures.foreign_listeners += 1;
            }
        }
        if self.foreign.len() < 6 && self.rng.chance(70) {
            // Steal: kill a proxy and take its port before vncd restarts it.
            for (session, port) in self.kill_proxies(1) {
                let start = Instant::now();
                let mut won = None;
                while start.elapsed() < Duration::from_millis(300) {
                    if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                        won = Some(l);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                match won {
                    Some(l) => {
                        self.foreign.push((port, l));
                        self.stolen.insert(session, port);
                        self.figures.ports_stolen += 1;
                        self.figures.foreign_listeners += 1;
                    }
                    None => self.figures.steal_races_lost += 1,
                }
            }
        }
    }

    /// Starts 1-3 real proxies that carry our marker but match no lease.
    fn plant_orphans(&mut self) {
        self.stage = "orphans".into();
        let leased: BTreeSet<u16> = self.leases().iter().map(|l| l.port).collect();
        let free: Vec<u16> = (self.v.range.0..=self.v.range.1)
            .filter(|p| !leased.contains(p) && !self.foreign.iter().any(|(f, _)| f == p))
            .collect();
        for i in 0..1 + self.rng.below(3) {
            let Some(&port) = self.rng.pick(&free) else {
                break;
            };
            let child = Command::new(BIN)
                .args(["proxy", "--listen"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("--target")
                .arg(format!("127.0.0.1:{}", self.qemu[0].port))
                .env(vncd::supervisor::marker::OWNER, self.v.owner())
                .env(vncd::supervisor::marker::SESSION, format!("ghost{i}"))
                .env(vncd::supervisor::marker::LEASE, "0123456789abcdef")
                .env(vncd::supervisor::marker::PORT, port.to_string())
                .process_group(0)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            self.orphans.push(child);
            self.figures.orphans_planted += 1;
        }
    }

    /// Writes a random kind of corruption over leases.json, holding leases.lock so that
    /// a running vncd cannot replace it mid-write. Returns the bytes written.
    fn corrupt_state_file(&mut self) -> Vec<u8> {
        let path = self.leases_path();
        self.sampler.expect_corruption(true);
        let _lock = vncd::store::lock::LockGuard::acquire(
            &self.v.state.join("leases.lock"),
            Duration::from_secs(10),
        )
        .unwrap();
        // The last good version, which no commit can replace while we hold the lock.
        let good = std::fs::read(&path).unwrap_or_else(|_| b"{}".to_vec());
        self.sampler.record(&good);
        let kinds = [
            "truncated",
            "empty",
            "garbage",
            "nul bytes inside",
            "zero-filled",
            "port leased twice",
            "unknown version",
            "unknown field",
            "not an object",
        ];
        let kind = kinds[self.rng.below(kinds.len())];
        let mut value: Value = serde_json::from_slice(&good).unwrap_or(Value::Null);
        let bytes: Vec<u8> = match kind {
            "truncated" => good[..1 + self.rng.below(good.len().saturating_sub(2).max(1))].to_vec(),
            "empty" => Vec::new(),
            "garbage" => (0..1 + self.rng.below(4096))
                .map(|_| self.rng.next() as u8)
                .collect(),
            "nul bytes inside" => {
                let mut b = good.clone();
                for _ in 0..1 + self.rng.below(4) {
                    let i = self.rng.below(b.len());
                    b[i] = 0;
                }
                b
            }
            "zero-filled" => vec![0; good.len()],
            "port leased twice" => {
                let leases = value["leases"].as_array_mut().unwrap();
                if leases.len() >= 2 {
                    let p = leases[0]["port"].clone();
                    leases[1]["port"] = p;
                } else {
                    value["version"] = 7.into();
                }
                serde_json::to_vec_pretty(&value).unwrap()
            }
            "unknown version" => {
                value["version"] = 2.into();
                serde_json::to_vec_pretty(&value).unwrap()
            }
            "unknown field" => {
                value["leasesV2"] = Value::Array(Vec::new());
                serde_json::to_vec_pretty(&value).unwrap()
            }
            _ => b"[]".to_vec(),
        };
        std::fs::write(&path, &bytes).unwrap();
        *self.figures.corruptions.entry(kind).or_default() += 1;
        bytes
    }

    fn rebuild_state(&mut self) {
        let out = self.v.cmd_here(&["cleanup", "--once", "--rebuild-state"]);
        assert!(
            out.status.success(),
            "cleanup --rebuild-state failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        read_leases(&self.leases_path()).expect("a rebuilt state file that reads");
        self.sampler.expect_corruption(false);
        self.figures.rebuilds += 1;
    }

    /// The commands that read leases must refuse the corrupt file and leave it as it is.
    fn assert_corrupt_refused(&mut self, bytes: &[u8]) {
        let range = self.v.range_arg();
        let state = self.v.state.display().to_string();
        for args in [
            vec!["cleanup", "--once"],
            vec![
                "status",
                "--json",
                "--state-dir",
                &state,
                "--port-range",
                &range,
            ],
        ] {
            let out = if args[0] == "cleanup" {
                self.v.cmd_here(&args)
            } else {
                self.v.cmd(&args)
            };
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("corrupt") && err.contains("leases.json"),
                "`vncd {}` did not refuse the corrupt state file: {err}",
                args[0]
            );
            self.figures.corrupt_refusals += 1;
        }
        assert_eq!(
            std::fs::read(self.leases_path()).unwrap(),
            bytes,
            "the corrupt state file was rewritten"
        );
    }

    fn corrupt_while_down(&mut self) {
        self.stage = "corrupt leases.json while vncd is down".into();
        assert!(self.v.child.is_none());
        let bytes = self.corrupt_state_file();
        let mark = log_mark(&self.v);
        self.v.start();
        let status = wait_for(
            "vncd to refuse the corrupt state file",
            Duration::from_secs(20),
            || self.v.child.as_mut().unwrap().try_wait().unwrap(),
        );
        self.v.child = None;
        assert!(!status.success(), "vncd started on a corrupt state file");
        let log = log_since(&self.v, mark);
        assert!(
            log.contains("leases.json") && log.contains("corrupt"),
            "vncd's refusal does not name the file: {log}"
        );
        self.figures.corrupt_refusals += 1;
        self.assert_corrupt_refused(&bytes);
        self.rebuild_state();
        self.start_vncd();
    }

    fn corrupt_while_running(&mut self) {
        self.stage = "corrupt leases.json while vncd runs".into();
        let bytes = self.corrupt_state_file();
        let mark = log_mark(&self.v);
        // Ask for changes that need a commit.
        let name = self.new_name();
        self.apply(&Op::Create(name.clone(), 0));
        let names: Vec<String> = self.live.keys().cloned().collect();
        if let Some(victim) = self.rng.pick(&names).filter(|n| **n != name).cloned() {
            self.apply(&Op::Delete(victim));
        }
        self.passes_while_failing(mark, "is corrupt", &name);
        self.assert_corrupt_refused(&bytes);
        self.rebuild_state();
    }

    /// Waits until vncd has failed a lease commit with `error` and then run five more
    /// passes, checking all along that it keeps running and never reports `new` Ready
    /// (its lease cannot have been persisted).
    fn passes_while_failing(&mut self, mark: u64, error: &str, new: &str) {
        wait_for(
            &format!("vncd to fail a lease commit with {error:?} and keep passing"),
            Duration::from_secs(30),
            || {
                assert!(
                    self.v.child.as_mut().unwrap().try_wait().unwrap().is_none(),
                    "vncd exited during: {}",
                    self.stage
                );
                assert!(
                    self.v
                        .item(new)
                        .is_none_or(|i| i["status"]["phase"] != "Ready"),
                    "{new} was reported Ready while no lease could be persisted ({})",
                    self.stage
                );
                let log = log_since(&self.v, mark);
                let first = log
                    .find("cannot persist lease changes")
                    .filter(|at| log[*at..].lines().next().is_some_and(|l| l.contains(error)))?;
                let passes = log[first..]
                    .lines()
                    .filter(|l| {
                        l.contains("pass done") || l.contains("cannot persist lease changes")
                    })
                    .count();
                (passes > 5).then_some(())
            },
        );
        // The failure is an ERROR once, then repeats at debug level (not a flood).
        let log = log_since(&self.v, mark);
        let errors = log
            .lines()
            .filter(|l| l.contains("cannot persist lease changes") && l.contains("ERROR"))
            .count();
        assert!(
            (1..=2).contains(&errors),
            "{errors} ERROR lines for one failing state file ({})",
            self.stage
        );
    }

    /// Makes the state directory read-only or full, asks for a new session and the removal
    /// of another (both need a commit), and checks that vncd keeps running, logs the
    /// failed commit and leaves leases.json exactly as it was. Then lifts the fault.
    fn state_dir_fault(&mut self, full: bool) {
        self.stage = if full {
            "full state filesystem"
        } else {
            "read-only state directory"
        }
        .into();
        let before = std::fs::read(self.leases_path()).unwrap();
        let mark = log_mark(&self.v);
        let filler = if full {
            self.figures.full_windows += 1;
            Some(self.fs.fill())
        } else {
            self.figures.read_only_windows += 1;
            self.fs.make_read_only();
            None
        };
        let names: Vec<String> = self.live.keys().cloned().collect();
        if let Some(victim) = self.rng.pick(&names).cloned() {
            self.apply(&Op::Delete(victim));
        }
        let name = self.new_name();
        self.apply(&Op::Create(name.clone(), 1));
        let errno = if full {
            "No space left on device"
        } else {
            "Read-only file system"
        };
        self.passes_while_failing(mark, errno, &name);
        assert_eq!(
            std::fs::read(self.leases_path()).unwrap(),
            before,
            "leases.json changed during: {}",
            self.stage
        );
        match filler {
            Some(f) => std::fs::remove_file(f).unwrap(),
            None => self.fs.make_writable(),
        }
    }

    /// One look at the whole system; Ok(snapshot) once every invariant holds.
    fn check_converged(&mut self) -> Result<BTreeMap<String, (u16, i64, String)>, String> {
        if let Some(st) = self.v.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!("vncd exited ({st}) during {}", self.stage);
        }
        let leases = read_leases(&self.leases_path())
            .map_err(|e| format!("leases.json unreadable: {e}"))?
            .unwrap_or_default();
        let problems = lease_set_problems(&leases, self.v.range);
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let by_session: BTreeMap<&str, &LeaseView> =
            leases.iter().map(|l| (l.session.as_str(), l)).collect();
        let leased: BTreeSet<&str> = by_session.keys().copied().collect();
        let wanted: BTreeSet<&str> = self.live.keys().map(String::as_str).collect();
        if leased != wanted {
            return Err(format!(
                "leases and manifests differ on {:?}",
                leased.symmetric_difference(&wanted).collect::<Vec<_>>()
            ));
        }
        // Statuses written by this very vncd, not left over from the one killed before.
        let pid = self.v.child.as_ref().map(|c| c.id());
        let status_file: Value = std::fs::read(self.v.state.join("sessions.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        if status_file["controllerPid"].as_u64() != pid.map(u64::from) {
            return Err(format!(
                "sessions.json is from controller {} not {pid:?}",
                status_file["controllerPid"]
            ));
        }
        let items = self.v.items();
        let shown: BTreeSet<String> = items
            .iter()
            .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_owned))
            .collect();
        let wanted_owned: BTreeSet<String> = self.live.keys().cloned().collect();
        if shown != wanted_owned {
            return Err(format!(
                "vncd get shows {:?} beyond/short of the manifests",
                shown
                    .symmetric_difference(&wanted_owned)
                    .collect::<Vec<_>>()
            ));
        }
        let mut snap = BTreeMap::new();
        for item in &items {
            let name = item["metadata"]["name"].as_str().unwrap();
            let st = &item["status"];
            let lease = by_session[name];
            if st["phase"] != "Ready" {
                return Err(format!("{name} is {} ({})", st["phase"], st["message"]));
            }
            let port = st["port"].as_u64().unwrap_or(0) as u16;
            let pid = st["pid"].as_i64().unwrap_or(0);
            let token = lease_of(st);
            let target = format!("127.0.0.1:{}", self.qemu[self.live[name]].port);
            if port != lease.port || Some(pid) != lease.pid || token != lease.uid {
                return Err(format!(
                    "{name}: status port {port} pid {pid} differs from its lease {lease:?}"
                ));
            }
            if st["target"] != target.as_str() || lease.target != target {
                return Err(format!("{name}: target {} not {target}", st["target"]));
            }
            if self.stolen.get(name) == Some(&port) {
                return Err(format!("{name} is still on its stolen port {port}"));
            }
            if self.foreign.iter().any(|(p, _)| *p == port) {
                return Err(format!("{name} is leased a port a foreign listener holds"));
            }
            snap.insert(name.to_owned(), (port, pid, token));
        }
        // Orphans: every marked process is a lease's recorded proxy or in its group.
        let marked = vncd::supervisor::scan(&self.v.owner());
        let leaders: BTreeMap<i32, &vncd::supervisor::Marked> = marked
            .iter()
            .filter(|m| m.process.pid == m.pgid)
            .map(|m| (m.pgid, m))
            .collect();
        for m in &marked {
            let Some(leader) = leaders.get(&m.pgid) else {
                return Err(format!(
                    "orphan pid {} (its group leader is gone)",
                    m.process.pid
                ));
            };
            let lease = by_session.get(leader.session.as_str());
            let ok = lease.is_some_and(|l| {
                l.uid == leader.lease && l.pid == Some(i64::from(leader.process.pid))
            });
            if !ok {
                return Err(format!(
                    "orphan proxy pid {} (session {}, lease {}) matches no lease",
                    m.process.pid, m.session, m.lease
                ));
            }
        }
        if self.v.on_relay() {
            // One relay serves every lease: no process of a session's own, and every
            // lease records the one relay as its process.
            let relays = relay_pids(&self.v.owner());
            if !leaders.is_empty() || relays.len() != 1 {
                return Err(format!(
                    "{} per-session proxies and relays {relays:?} for {} leases",
                    leaders.len(),
                    leases.len()
                ));
            }
            if let Some(l) = leases.iter().find(|l| l.pid != Some(i64::from(relays[0]))) {
                return Err(format!("lease {l:?} is not served by relay {}", relays[0]));
            }
        } else if leaders.len() != leases.len() {
            return Err(format!(
                "{} proxies for {} leases",
                leaders.len(),
                leases.len()
            ));
        }
        Ok(snap)
    }

    fn converge(&mut self, after: &str) {
        self.stage = format!("convergence after {after}");
        let timeout = Duration::from_secs(60 + self.sessions as u64 / 2);
        let start = Instant::now();
        let snap = loop {
            match self.check_converged() {
                Ok(s) => break s,
                Err(e) if start.elapsed() > timeout => {
                    panic!("not converged {timeout:?} after {after}: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        self.figures.convergence_checks += 1;
        self.figures.orphan_scans += 1;
        self.figures.sessions_verified_ready += snap.len() as u64;
        // Sessions nobody touched kept their console: same pid, port and lease.
        for (name, before) in &self.baseline {
            if self.touched.contains(name) {
                continue;
            }
            if let Some(now) = snap.get(name) {
                self.figures.stability_checks += 1;
                assert_eq!(
                    now, before,
                    "{name} was not touched by the test but its (port, pid, lease) changed after {after}"
                );
            }
        }
        // A sample serves the real banner.
        let names: Vec<String> = snap.keys().cloned().collect();
        for _ in 0..3 {
            if let Some(name) = self.rng.pick(&names).cloned() {
                self.banner(&name, &snap[&name]);
            }
        }
        // vncd's own health view agrees.
        let out = self.v.cmd(&[
            "status",
            "--json",
            "--state-dir",
            self.v.state.to_str().unwrap(),
            "--port-range",
            &self.v.range_arg(),
        ]);
        let s: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert_eq!(s["dead_proxies"], 0, "vncd status: {s}");
        assert_eq!(s["orphan_processes"], 0, "vncd status: {s}");
        assert_eq!(
            s["port_pool"]["allocated_ports"],
            self.live.len(),
            "vncd status: {s}"
        );
        self.figures.status_checks += 1;
        for dir in [self.v.state.clone(), self.v.state.join("keys")] {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                let writer = n
                    .rsplit_once(".tmp.")
                    .and_then(|(_, p)| p.parse::<i64>().ok());
                if n.starts_with('.') && writer.is_some_and(|p| !pid_alive(p)) {
                    self.figures.stale_temp_files.insert(n);
                }
            }
        }
        let v = self.sampler.violations();
        assert!(v.is_empty(), "sampler found violations:\n{}", v.join("\n"));
        self.before_fault = std::mem::replace(&mut self.baseline, snap);
        self.touched.clear();
    }

    fn banner(&mut self, name: &str, (port, _, _): &(u16, i64, String)) {
        let url = self.v.url(name);
        assert!(url.starts_with(&format!("ws://127.0.0.1:{port}/")), "{url}");
        let got = self.rt.block_on(try_banner(&url));
        assert_eq!(
            got.as_deref().map_err(String::as_str),
            Ok(&b"RFB 003.008\n"[..]),
            "{name} on port {port} does not serve the VNC banner"
        );
        self.figures.banner_checks += 1;
    }

    fn pick_fault(&mut self) -> Option<Fault> {
        if let Ok(only) = std::env::var("VNCD_CHAOS_FAULTS") {
            // For replaying one kind of fault: a comma-separated list of Fault names.
            let allowed: Vec<Fault> = FAULTS
                .into_iter()
                .filter(|f| only.split(',').any(|o| o.trim() == format!("{f:?}")))
                .collect();
            assert!(
                !allowed.is_empty(),
                "VNCD_CHAOS_FAULTS={only:?} names no fault of {FAULTS:?}"
            );
            return self.rng.pick(&allowed).copied();
        }
        // The first cycles cover every fault once, in random order; later ones draw.
        let mut order = FAULTS;
        let mut r = Rng::new(self.seed ^ 0xfa17);
        r.shuffle(&mut order);
        if self.cycle < order.len() {
            return Some(order[self.cycle]);
        }
        let weights = [3, 1, 3, 2, 2, 1, 1];
        let roll = self.rng.below(weights.iter().sum::<usize>() + 2);
        let mut acc = 0;
        for (f, w) in FAULTS.iter().zip(weights) {
            acc += w;
            if roll < acc {
                return Some(*f);
            }
        }
        None // a cycle of churn and kill -9 alone
    }
}

#[test]
fn vncd_keeps_its_invariants_under_chaos() {
    require("qemu-system-x86_64");
    let seed = std::env::var("VNCD_CHAOS_SEED")
        .ok()
        .map(|s| s.trim().parse().expect("VNCD_CHAOS_SEED is a number"))
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            t.as_nanos() as u64 ^ u64::from(std::process::id())
        });
    let cycles = env_num("VNCD_CHAOS_CYCLES", 30) as usize;
    let sessions = env_num("VNCD_CHAOS_SESSIONS", 16).max(2) as usize;
    println!(
        "chaos: VNCD_CHAOS_SEED={seed} VNCD_CHAOS_CYCLES={cycles} VNCD_CHAOS_SESSIONS={sessions} backend={}",
        backend()
    );
    let started = Instant::now();
    let fs = Tmpfs::mount(32 + sessions as u64 / 4);
    let pool = (sessions + sessions / 4 + 16) as u16;
    let mut v = Vncd::new(pool);
    v.state = fs.dir.clone();
    let sampler = Sampler::start(v.state.clone(), v.owner(), v.range);
    let mut c = Chaos {
        sampler,
        v,
        foreign: Vec::new(),
        orphans: Vec::new(),
        qemu: [Qemu::tcp(), Qemu::tcp()],
        fs,
        rng: Rng::new(seed),
        seed,
        cycle: 0,
        sessions,
        stage: "start".into(),
        live: BTreeMap::new(),
        next_id: 0,
        stolen: BTreeMap::new(),
        baseline: BTreeMap::new(),
        touched: BTreeSet::new(),
        before_fault: BTreeMap::new(),
        figures: Figures::default(),
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    };
    c.start_vncd();
    c.figures.vncd_restarts = 0;
    for cycle in 0..cycles {
        c.cycle = cycle;
        c.figures.cycles += 1;
        let fault = c.pick_fault();
        c.churn_with_kill(fault == Some(Fault::CorruptWhileDown));
        if fault == Some(Fault::CorruptWhileDown) {
            c.corrupt_while_down();
        }
        c.converge("churn with kill -9");
        match fault {
            Some(Fault::KillProxies) => {
                c.stage = "kill proxies".into();
                let n = 1 + c.rng.below(c.sessions / 4 + 1);
                let killed = c.kill_proxies(n);
                c.converge("SIGKILL of proxies");
                // Each came back on its own lease: same port and lease, a new pid.
                for (session, port) in killed {
                    let (now_port, now_pid, now_token) = &c.baseline[&session];
                    assert_eq!(
                        *now_port, port,
                        "{session} moved after its proxy was killed"
                    );
                    let before = c.before_fault.get(&session).unwrap();
                    assert_eq!(
                        (now_token, true),
                        (&before.2, *now_pid != before.1),
                        "{session}"
                    );
                    c.figures.same_lease_restarts += 1;
                }
            }
            Some(Fault::Orphans) => {
                c.plant_orphans();
                c.converge("orphans planted");
                for mut o in std::mem::take(&mut c.orphans) {
                    wait_for(
                        "vncd to end a planted orphan",
                        Duration::from_secs(10),
                        || o.try_wait().unwrap(),
                    );
                }
            }
            Some(Fault::ForeignListeners) => {
                c.foreign_listeners();
                c.converge("foreign listeners");
            }
            Some(Fault::CorruptWhileRunning) => {
                c.corrupt_while_running();
                c.converge("corruption while running");
            }
            Some(Fault::ReadOnlyStateDir) => {
                c.state_dir_fault(false);
                c.converge("read-only state directory");
            }
            Some(Fault::FullStateDir) => {
                c.state_dir_fault(true);
                c.converge("full state filesystem");
            }
            Some(Fault::CorruptWhileDown) | None => {}
        }
        println!(
            "chaos: cycle {cycle} ({:?}) converged with {} sessions at {:?}",
            fault,
            c.live.len(),
            started.elapsed()
        );
    }
    // Every console works; then everything is released.
    c.stage = "final".into();
    let snap = c.baseline.clone();
    for (name, s) in &snap {
        c.banner(name, s);
    }
    for (_, l) in std::mem::take(&mut c.foreign) {
        drop(l);
    }
    let names: Vec<String> = c.live.keys().cloned().collect();
    for n in names {
        c.apply(&Op::Delete(n));
    }
    c.converge("deleting every session");
    assert!(c.leases().is_empty());
    assert!(vncd::supervisor::scan(&c.v.owner()).is_empty());
    let st = c.sampler.stats.lock().unwrap();
    let figures = format!(
        "seed {seed}, {cycles} cycles, {sessions} sessions, backend {}, {:?}\n{:#?}\n\
         sampler: {} samples, {} lease files checked, {} skipped while corrupted, \
         {} Ready items checked ({} in the lease file read right after, {} released since, \
         {} against earlier leases while the file was corrupt), {} distinct leases seen, {} violations",
        backend(),
        started.elapsed(),
        c.figures,
        st.samples,
        st.lease_files_checked,
        st.skipped_while_corrupted,
        st.ready_checked,
        st.ready_in_current_leases,
        st.ready_released_since,
        st.ready_while_corrupted,
        st.history.len(),
        st.violations.len(),
    );
    println!("{figures}");
    if let Ok(path) = std::env::var("VNCD_CHAOS_REPORT") {
        std::fs::write(path, &figures).unwrap();
    }
    assert!(st.violations.is_empty(), "{:?}", st.violations);
}

/// Regression: vncd's own directory scans (inotify IN_OPEN) used to count as changes,
/// so an idle vncd ran a pass (a full /proc scan) every ~100 ms instead of resting
/// until its resync interval (0.5 s here).
#[test]
fn an_idle_vncd_rests_between_resyncs() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    v.start();
    v.add_session("vm1", qemu.port);
    v.wait_ready("vm1");
    std::thread::sleep(Duration::from_secs(1)); // let the start settle
    let mark = log_mark(&v);
    std::thread::sleep(Duration::from_secs(4));
    let passes = log_since(&v, mark).matches("pass done").count();
    assert!(
        passes <= 10,
        "an idle vncd ran {passes} passes in 4 s with a 0.5 s resync interval"
    );
}

/// Regression: a manifest written less than the settle time (200 ms) before vncd
/// started was skipped by the first scan as "still being written", and its session
/// taken for deleted: vncd stopped its running console (or released its lease, and so
/// its URL, when the proxy was down), then started it again a pass later.
#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_rewritten_just_before_a_restart_keeps_its_console_and_lease() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(4);
    v.start();
    v.add_session("live", qemu.port);
    v.add_session("down", qemu.port);
    let live = v.wait_ready("live");
    let down = v.wait_ready("down");
    let mut client = Client::connect(&v.console_url(&live)).await;
    assert_eq!(client.read(12).await, b"RFB 003.008\n");
    v.kill9();
    // "down" loses its proxy while vncd is away: it must come back on the same lease. On
    // the relay, which serves both, nothing of one session can die alone: both stay up.
    let on_relay = v.on_relay();
    if !on_relay {
        killpg(
            Pid::from_raw(down["pid"].as_i64().unwrap() as i32),
            Signal::SIGKILL,
        )
        .unwrap();
    }
    let mark = log_mark(&v);
    // Both manifests are rewritten, unchanged, right before vncd starts again.
    v.add_session("live", qemu.port);
    v.add_session("down", qemu.port);
    v.start();
    let back = wait_for("down to be restarted", Duration::from_secs(15), || {
        let s = v.item("down")?["status"].clone();
        (s["phase"] == "Ready" && (on_relay || s["pid"] != down["pid"])).then_some(s)
    });
    assert_eq!(
        (&back["port"], &back["leaseUid"]),
        (&down["port"], &down["leaseUid"]),
        "down got a new lease: its console URLs stopped working"
    );
    let now = v.wait_ready("live");
    assert_eq!(now["pid"], live["pid"], "live's proxy was restarted");
    let log = log_since(&v, mark);
    assert!(
        !log.contains("reason=Removed") && !log.contains("lease released"),
        "vncd treated a rewritten manifest as deleted:\n{log}"
    );
    let (w, h) = client.handshake().await;
    assert!(w > 0 && h > 0, "the connected client lost its console");
}

/// While the state filesystem is read-only no lease change can be persisted, but a deleted
/// session's console must still close, and a session past `maxLifetimeSeconds` must still
/// end and stay down; their releases land once the filesystem is writable again.
#[test]
fn a_read_only_state_dir_still_stops_deleted_and_expired_sessions() {
    let qemu = Qemu::tcp();
    let mut fs = Tmpfs::mount(16);
    let mut v = Vncd::new(4);
    v.state = fs.dir.clone();
    v.start();
    v.add_session("gone", qemu.port);
    v.write_manifest(
        "short.yaml",
        &format!(
            "apiVersion: vncd.io/v1alpha1\nkind: VncSession\nmetadata:\n  name: short\nspec:\n  target:\n    host: 127.0.0.1\n    port: {}\n  maxLifetimeSeconds: 6\n",
            qemu.port
        ),
    );
    let gone = v.wait_ready("gone");
    let short = v.wait_ready("short");
    let before = std::fs::read(v.state.join("leases.json")).unwrap();
    fs.make_read_only();
    v.remove_session("gone");
    let short_port = short["port"].as_u64().unwrap() as u16;
    wait_for(
        "the deleted session's proxy to stop with the store read-only",
        Duration::from_secs(15),
        || v.stopped_serving(&gone).then_some(()),
    );
    wait_for(
        "the expired session's proxy to stop with the store read-only",
        Duration::from_secs(20),
        || v.stopped_serving(&short).then_some(()),
    );
    // Expired stays down: nothing serves its port again while the store refuses writes.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", short_port)).is_err(),
        "the expired session was started again:\n{}",
        v.log()
    );
    assert_eq!(
        std::fs::read(v.state.join("leases.json")).unwrap(),
        before,
        "leases.json changed while read-only"
    );
    fs.make_writable();
    wait_for(
        "both releases to land once writable",
        Duration::from_secs(20),
        || {
            let leases = v.leases();
            leases["leases"].as_array()?.is_empty().then_some(())
        },
    );
    let st = v.wait_status("short", "Expired", Duration::from_secs(10));
    assert_eq!(st["reason"], "MaxLifetime", "{st}");
    assert!(
        v.item("gone").is_none(),
        "the deleted session is still shown"
    );
    v.terminate();
}
