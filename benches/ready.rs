//! Many sessions at once, until all are Ready, measured in one run:
//!
//! - seed-style: the seed's coordinator flow, one VM after another: probe a port, spawn
//!   websockify, wait until it accepts a connection (100 sessions);
//! - vncd with the websockify backend and with the builtin backend: manifests are written
//!   at once into a watched directory; the clock stops when `sessions.json` shows all
//!   Ready (each proxy's group owns its listening socket). Then every manifest is removed
//!   and the clock stops when no lease remains.
//!
//! Run: `cargo bench --bench ready` (needs websockify and QEMU; `scripts/install-deps`).
//! `cargo bench --bench ready -- relay` runs only the relay comparison (issue 17): 800
//! sessions at once with one relay (`vncd run --relay`) against 800 per-session proxies in
//! the same run, and the relay's PSS growth per session against websockify's per-session
//! PSS over 50 websockify processes.
//! `VNCD_BENCH_LARGE` (default 800) sets the large builtin run; websockify's large run
//! uses `VNCD_BENCH_LARGE_WEBSOCKIFY` (default 200: 800 websockify processes need ~16 GiB).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Qemu, Vncd, manifest};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

fn ready_count(v: &Vncd) -> usize {
    vncd::status::file::read(&v.state.join("sessions.json")).map_or(0, |f| {
        f.items
            .iter()
            .filter(|i| i.status.as_ref().and_then(|s| s.phase) == Some(vncd::api::Phase::Ready))
            .count()
    })
}

/// The PSS of the processes `pids`, in KiB, summed (from /proc/PID/smaps_rollup).
fn pss_kib(pids: impl IntoIterator<Item = i32>) -> u64 {
    pids.into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|t| {
            t.lines()
                .find(|l| l.starts_with("Pss:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// PSS of vncd's proxies (and their children), in KiB, summed.
fn proxies_pss_kib(v: &Vncd) -> u64 {
    pss_kib(
        vncd::supervisor::scan(&v.owner())
            .iter()
            .map(|m| m.process.pid),
    )
}

struct VncdRun {
    ready: Duration,
    released: Duration,
    pss_kib_per_session: f64,
}

/// PSS of the relay serving `v`'s state dir, in KiB.
fn relay_pss_kib(v: &Vncd) -> u64 {
    pss_kib(common::relay_pids(&v.owner()))
}

/// `backend` is `builtin` (the default data plane: the relay), `relay` (the same, said
/// with `--relay`), `processes` (`--per-session-proxies`: a `vncd-proxy` per session) or
/// `websockify`. For the relay, the PSS per session is its growth from an empty relay.
fn vncd_run(qemu: &Qemu, backend: &str, n: usize) -> VncdRun {
    let mut v = Vncd::new(n as u16 + 10);
    let relay = backend == "relay";
    let processes = backend == "processes";
    v.extra.extend([
        "--backend".into(),
        if relay || processes {
            "builtin"
        } else {
            backend
        }
        .into(),
        "--max-sessions".into(),
        n.to_string(),
    ]);
    if relay {
        v.extra.push("--relay".into());
    }
    if processes {
        v.extra.push("--per-session-proxies".into());
    }
    v.start();
    std::thread::sleep(Duration::from_millis(500));
    let relay_empty = relay.then(|| relay_pss_kib(&v));
    let texts: Vec<(String, String)> = (0..n)
        .map(|i| {
            (
                format!("vm{i}.yaml"),
                manifest(&format!("vm{i}"), qemu.port.into()),
            )
        })
        .collect();
    let start = Instant::now();
    for (f, t) in &texts {
        v.write_manifest(f, t);
    }
    while ready_count(&v) < n {
        let exited = v.child.as_mut().unwrap().try_wait().unwrap().is_some();
        assert!(
            !exited && start.elapsed() < Duration::from_secs(300),
            "not all Ready:\n{}",
            v.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready = start.elapsed();
    let pss_kib_per_session = match relay_empty {
        Some(empty) => relay_pss_kib(&v).saturating_sub(empty) as f64 / n as f64,
        None => proxies_pss_kib(&v) as f64 / n as f64,
    };
    let start = Instant::now();
    for (f, _) in &texts {
        std::fs::remove_file(v.sessions.join(f)).unwrap();
    }
    while !v.leases()["leases"].as_array().unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(300));
        std::thread::sleep(Duration::from_millis(20));
    }
    VncdRun {
        ready,
        released: start.elapsed(),
        pss_kib_per_session,
    }
}

fn seed_run(qemu: &Qemu, n: usize) -> Duration {
    let mut port = common::free_port().max(30000);
    let mut children = Vec::new();
    let start = Instant::now();
    for _ in 0..n {
        while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            port += 1;
        }
        let child = Command::new("websockify")
            .arg(format!("127.0.0.1:{port}"))
            .arg(format!("127.0.0.1:{}", qemu.port))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            std::thread::sleep(Duration::from_millis(5));
        }
        children.push(child);
        port += 1;
    }
    let elapsed = start.elapsed();
    for mut c in children {
        let _ = killpg(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let _ = c.wait();
    }
    elapsed
}

fn env_n(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("ready benchmark: run it with `cargo bench --bench ready`");
        return;
    }
    let large = env_n("VNCD_BENCH_LARGE", 800);
    let large_ws = env_n("VNCD_BENCH_LARGE_WEBSOCKIFY", 200);
    let qemu = Qemu::tcp();
    if std::env::args().any(|a| a == "relay") {
        relay_comparison(&qemu, large);
        return;
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("sessions created at once until all Ready, {cores} cores, one QEMU VNC target");
    let seed = seed_run(&qemu, 100);
    println!(
        "  seed-style, 100 one after another (websockify): {:.2} s",
        seed.as_secs_f64()
    );
    let line = |label: &str, r: &VncdRun| {
        println!(
            "  {label}: ready {:.2} s ({:.3}x seed), released {:.2} s, proxy PSS {:.0} KiB/session",
            r.ready.as_secs_f64(),
            r.ready.as_secs_f64() / seed.as_secs_f64(),
            r.released.as_secs_f64(),
            r.pss_kib_per_session
        );
    };
    let ws = vncd_run(&qemu, "websockify", 100);
    line("vncd websockify, 100 at once", &ws);
    let bi = vncd_run(&qemu, "builtin", 100);
    line("vncd builtin,    100 at once", &bi);
    println!(
        "  builtin/websockify at 100: ready {:.3}x, PSS {:.3}x",
        bi.ready.as_secs_f64() / ws.ready.as_secs_f64(),
        bi.pss_kib_per_session / ws.pss_kib_per_session.max(1.0)
    );
    let ws_l = vncd_run(&qemu, "websockify", large_ws);
    line(&format!("vncd websockify, {large_ws} at once"), &ws_l);
    let bi_l = vncd_run(&qemu, "builtin", large);
    line(&format!("vncd builtin,    {large} at once"), &bi_l);
    let per = |r: &VncdRun, n: usize| r.ready.as_secs_f64() * 1000.0 / n as f64;
    println!(
        "  ready time per session: builtin {:.2} ms ({large} at once), websockify {:.2} ms ({large_ws} at once), ratio {:.3}x",
        per(&bi_l, large),
        per(&ws_l, large_ws),
        per(&bi_l, large) / per(&ws_l, large_ws)
    );
}

/// The relay against the per-session builtin proxies and websockify, in one run.
fn relay_comparison(qemu: &Qemu, n: usize) {
    let cores = std::thread::available_parallelism().map_or(0, |c| c.get());
    println!("relay comparison: {n} sessions at once until all Ready, {cores} cores");
    let per_process = vncd_run(qemu, "processes", n);
    let relay = vncd_run(qemu, "relay", n);
    let ws = vncd_run(qemu, "websockify", 50);
    let show = |label: &str, r: &VncdRun| {
        println!(
            "  {label}: ready {:.2} s, released {:.2} s, PSS {:.1} KiB/session",
            r.ready.as_secs_f64(),
            r.released.as_secs_f64(),
            r.pss_kib_per_session
        );
    };
    show(&format!("per-session vncd-proxy, {n}"), &per_process);
    show(&format!("one relay (--relay),    {n}"), &relay);
    show("websockify,             50", &ws);
    println!(
        "  relay / per-process: ready {:.3}x; relay PSS growth per session / websockify PSS per session: 1/{:.0}",
        relay.ready.as_secs_f64() / per_process.ready.as_secs_f64(),
        ws.pss_kib_per_session / relay.pss_kib_per_session.max(0.001)
    );
}
