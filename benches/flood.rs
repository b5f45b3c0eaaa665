//! A flood of unauthenticated connections against one session's port, measured per
//! backend in one run (RELIABILITY.md, "Flood"):
//!
//! - 10,000 connections in 60 s (`VNCD_FLOOD_CONNECTIONS`, `VNCD_FLOOD_SECONDS`) from 8
//!   threads: half send a websocket upgrade without a token, half send garbage and close;
//! - meanwhile one legitimate client holds a console open (token, RFB handshake) and asks
//!   for a framebuffer update every second;
//! - every 5 s: the proxy's log size, and vncd's and the proxy's threads and open files.
//!
//! It reports whether the log stayed bounded, vncd's threads and fds stayed constant and
//! the legitimate client stayed served, for the builtin proxy and for websockify.
//!
//! Run: `cargo bench --bench flood` (needs QEMU and websockify; `scripts/install-deps`).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Client, Qemu, Vncd};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Threads and open file descriptors of a process.
fn threads_fds(pid: i64) -> (u64, u64) {
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Threads:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    (threads, fds)
}

/// One unauthenticated attempt: an upgrade without a token, or garbage.
fn attack(port: u16, i: u64) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = if i.is_multiple_of(2) {
        "GET /?token=wrong HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".to_string()
    } else {
        format!("\x16\x03\x01garbage {i}\r\n\r\n")
    };
    let _ = s.write_all(req.as_bytes());
    let mut buf = [0u8; 512];
    let _ = s.read(&mut buf);
    true
}

struct Sample {
    at_s: u64,
    log_bytes: u64,
    vncd: (u64, u64),
    proxy: (u64, u64),
}

struct Outcome {
    backend: String,
    sent: u64,
    samples: Vec<Sample>,
    legit_updates: u64,
    legit_ok_at_end: bool,
}

fn flood(qemu: &Qemu, backend: &str, total: u64, secs: u64) -> Outcome {
    let mut v = Vncd::new(3);
    v.extra.extend(["--backend".into(), backend.into()]);
    v.start();
    v.add_session("vm1", qemu.port);
    let st = v.wait_ready("vm1");
    let port = st["port"].as_u64().unwrap() as u16;
    // A console URL with a ticket (the status URL carries none since tickets: with it the
    // legitimate client was refused with 403 and the bench reported it as lost).
    let url = v.url("vm1");
    let proxy_pid = st["pid"].as_i64().unwrap();
    let vncd_pid = i64::from(v.child.as_ref().unwrap().id());
    // The relay (the builtin default) logs for every session in one file of its own.
    let log = if v.on_relay() {
        v.state.join("logs").join("relay.log")
    } else {
        v.state.join("logs").join("vm1.log")
    };

    // The legitimate client, on its own runtime thread.
    let stop = Arc::new(AtomicBool::new(false));
    let updates = Arc::new(AtomicU64::new(0));
    let legit = {
        let (stop, updates) = (stop.clone(), updates.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut c = Client::connect(&url).await;
                assert_eq!(c.read(12).await, b"RFB 003.008\n");
                let (w, h) = c.handshake().await;
                let request = |w: u16, h: u16| {
                    let mut m = vec![3u8, 1, 0, 0, 0, 0];
                    m.extend(w.to_be_bytes());
                    m.extend(h.to_be_bytes());
                    m
                };
                while !stop.load(Ordering::Relaxed) {
                    c.write(&request(w, h)).await;
                    let got = tokio::time::timeout(Duration::from_secs(5), c.read(1)).await;
                    match got {
                        Ok(b) if !b.is_empty() => {
                            updates.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => return false,
                    }
                    // Drain what else arrived, then wait a second.
                    let _ = tokio::time::timeout(Duration::from_millis(200), c.read(65536)).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                true
            })
        })
    };

    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let per_thread = total / 8;
    let attackers: Vec<_> = (0..8)
        .map(|t| {
            let sent = sent.clone();
            std::thread::spawn(move || {
                let gap = Duration::from_secs_f64(secs as f64 / per_thread as f64);
                for i in 0..per_thread {
                    let due = started + gap * u32::try_from(i).unwrap();
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if attack(port, t * per_thread + i) {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let mut samples = Vec::new();
    while attackers.iter().any(|a| !a.is_finished()) || samples.is_empty() {
        samples.push(Sample {
            at_s: started.elapsed().as_secs(),
            log_bytes: std::fs::metadata(&log).map_or(0, |m| m.len()),
            vncd: threads_fds(vncd_pid),
            proxy: threads_fds(proxy_pid),
        });
        std::thread::sleep(Duration::from_secs(5));
    }
    for a in attackers {
        a.join().unwrap();
    }
    samples.push(Sample {
        at_s: started.elapsed().as_secs(),
        log_bytes: std::fs::metadata(&log).map_or(0, |m| m.len()),
        vncd: threads_fds(vncd_pid),
        proxy: threads_fds(proxy_pid),
    });
    stop.store(true, Ordering::Relaxed);
    let legit_ok_at_end = legit.join().unwrap_or(false);
    let out = Outcome {
        backend: backend.into(),
        sent: sent.load(Ordering::Relaxed),
        samples,
        legit_updates: updates.load(Ordering::Relaxed),
        legit_ok_at_end,
    };
    v.terminate();
    out
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("flood benchmark: run it with `cargo bench --bench flood`");
        return;
    }
    let total = env_num("VNCD_FLOOD_CONNECTIONS", 10_000);
    let secs = env_num("VNCD_FLOOD_SECONDS", 60);
    let qemu = Qemu::tcp();
    println!("flood: {total} unauthenticated connections in {secs} s against one session port");
    let mut results = Vec::new();
    for backend in ["builtin", "websockify"] {
        if backend == "websockify" && which("websockify").is_none() {
            println!("websockify not installed; skipping its run");
            continue;
        }
        results.push(flood(&qemu, backend, total, secs));
    }
    for r in &results {
        println!("\n== {} backend: {} connections made", r.backend, r.sent);
        println!(
            "{:>5} {:>12} {:>14} {:>14}",
            "t (s)", "log bytes", "vncd thr/fds", "proxy thr/fds"
        );
        for s in &r.samples {
            println!(
                "{:>5} {:>12} {:>9}/{:<4} {:>9}/{:<4}",
                s.at_s, s.log_bytes, s.vncd.0, s.vncd.1, s.proxy.0, s.proxy.1
            );
        }
        let first = &r.samples[0];
        let last = r.samples.last().unwrap();
        let max_vncd_fds = r.samples.iter().map(|s| s.vncd.1).max().unwrap_or(0);
        let max_vncd_threads = r.samples.iter().map(|s| s.vncd.0).max().unwrap_or(0);
        println!(
            "log grew {} bytes ({:.1} bytes per connection); vncd threads {}..{} fds {}..{}; legitimate client: {} framebuffer updates, {}",
            last.log_bytes.saturating_sub(first.log_bytes),
            last.log_bytes.saturating_sub(first.log_bytes) as f64 / r.sent.max(1) as f64,
            first.vncd.0,
            max_vncd_threads,
            first.vncd.1,
            max_vncd_fds,
            r.legit_updates,
            if r.legit_ok_at_end {
                "still served at the end"
            } else {
                "LOST its console"
            }
        );
    }
    if results.len() == 2 {
        let growth = |r: &Outcome| {
            r.samples
                .last()
                .unwrap()
                .log_bytes
                .saturating_sub(r.samples[0].log_bytes) as f64
        };
        println!(
            "\nlog growth, builtin / websockify: {:.4}",
            growth(&results[0]) / growth(&results[1]).max(1.0)
        );
    }
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
