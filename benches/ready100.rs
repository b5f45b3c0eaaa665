//! 100 sessions at once, until all are Ready: vncd against the seed's sequential flow.
//!
//! Run: `cargo bench --bench ready100` (needs websockify and QEMU; `scripts/install-deps`).
//!
//! - vncd: 100 manifests are written at once into a watched directory; the clock stops
//!   when `sessions.json` shows all 100 Ready (each proxy's group owns its listening
//!   socket). Then every manifest is removed and the clock stops when no lease remains.
//! - seed-style: the seed's coordinator flow, one VM after another: probe a port, spawn
//!   websockify, wait until it accepts a connection.
//!
//! Both use the same websockify and the same QEMU VNC server, in the same run.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Qemu, Vncd, manifest};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

const N: usize = 100;

fn all_ready(v: &Vncd) -> bool {
    vncd::status::file::read(&v.state.join("sessions.json")).is_ok_and(|f| {
        f.items
            .iter()
            .filter(|i| i.status.as_ref().and_then(|s| s.phase) == Some(vncd::api::Phase::Ready))
            .count()
            == N
    })
}

fn vncd_run(qemu: &Qemu) -> (Duration, Duration) {
    let mut v = Vncd::new(N as u16 + 10);
    v.start();
    std::thread::sleep(Duration::from_millis(500));
    let texts: Vec<(String, String)> = (0..N)
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
    while !all_ready(&v) {
        let exited = v.child.as_mut().unwrap().try_wait().unwrap().is_some();
        assert!(
            !exited && start.elapsed() < Duration::from_secs(120),
            "not all Ready:\n{}",
            v.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready = start.elapsed();
    let start = Instant::now();
    for (f, _) in &texts {
        std::fs::remove_file(v.sessions.join(f)).unwrap();
    }
    while !v.leases()["leases"].as_array().unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(20));
    }
    (ready, start.elapsed())
}

fn seed_run(qemu: &Qemu) -> Duration {
    let base = common::free_port().max(30000);
    let mut children = Vec::new();
    let start = Instant::now();
    let mut port = base;
    for _ in 0..N {
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

use std::os::unix::process::CommandExt;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("ready100 benchmark: run it with `cargo bench --bench ready100`");
        return;
    }
    let qemu = Qemu::tcp();
    let seed = seed_run(&qemu);
    let (ready, released) = vncd_run(&qemu);
    println!(
        "{N} sessions at once, websockify backend, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  seed-style, one after another, until each accepts: {:.2} s",
        seed.as_secs_f64()
    );
    println!(
        "  vncd, 100 manifests written at once, until all Ready: {:.2} s  ({:.2}x seed)",
        ready.as_secs_f64(),
        ready.as_secs_f64() / seed.as_secs_f64()
    );
    println!(
        "  vncd, all 100 manifests removed, until all released: {:.2} s",
        released.as_secs_f64()
    );
}
