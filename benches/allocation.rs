//! Durable allocation cost: vncd's lease commit against the seed's approach, same run.
//!
//! Run: `cargo bench --bench allocation`
//!
//! - seed-style: lock, re-read and re-parse the whole JSON state, add one entry, write a
//!   temp file, rename. No fsync (as measured on the withdrawn implementation).
//! - vncd, one per commit: lock, re-read, revision check, write temp, fsync, rename,
//!   fsync the directory. The durable version of the same thing.
//! - vncd, batched: what the controller actually does when many sessions arrive at once,
//!   all leases of one planning pass in one commit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use vncd::lease::Lease;
use vncd::session::Endpoint;
use vncd::store::file::{FileStore, StateDir, read_state};
use vncd::store::lock::LockGuard;
use vncd::store::{LeaseChange, LeaseSet};

const EXISTING: usize = 700;
const ALLOCS: usize = 100;

fn lease(i: usize) -> Lease {
    let target = Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port: 5900,
    };
    Lease::new(
        &format!("vm-{i}"),
        6100 + i as u16,
        target,
        Timestamp::now(),
    )
}

fn fresh(label: &str) -> (tempfile::TempDir, FileStore, StateDir) {
    // On the project's disk (target/), not tmpfs, so fsync costs what it costs.
    let base = std::env::var("CARGO_TARGET_TMPDIR").unwrap_or_else(|_| "target".into());
    let tmp = tempfile::Builder::new()
        .prefix(label)
        .tempdir_in(base)
        .unwrap();
    let dir = StateDir::new(tmp.path());
    dir.create().unwrap();
    let store = FileStore::new(dir.clone(), Duration::from_secs(5));
    let seed: Vec<LeaseChange> = (0..EXISTING).map(|i| LeaseChange::Put(lease(i))).collect();
    store.commit_blocking(0, seed).unwrap();
    (tmp, store, dir)
}

fn seed_style(dir: &StateDir) -> Duration {
    let path = dir.root().join("seed.json");
    let mut map: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for i in 0..EXISTING {
        map.insert(
            format!("{}", 6100 + i),
            serde_json::json!({"vm_id": format!("vm-{i}"), "pid": 1, "allocated_at": 0}),
        );
    }
    std::fs::write(&path, serde_json::to_vec(&map).unwrap()).unwrap();
    let start = Instant::now();
    for i in EXISTING..EXISTING + ALLOCS {
        let _g = LockGuard::acquire(&dir.root().join("seed.lock"), Duration::from_secs(5)).unwrap();
        let mut state: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        state.insert(
            format!("{}", 6100 + i),
            serde_json::json!({"vm_id": format!("vm-{i}"), "pid": 1, "allocated_at": 0}),
        );
        let tmp = dir.root().join("seed.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&state).unwrap()).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    start.elapsed()
}

fn vncd_single(store: &FileStore, dir: &StateDir) -> Duration {
    let mut rev = read_state(&dir.leases()).unwrap().revision;
    let start = Instant::now();
    for i in EXISTING..EXISTING + ALLOCS {
        rev = store
            .commit_blocking(rev, vec![LeaseChange::Put(lease(i))])
            .unwrap()
            .revision;
    }
    start.elapsed()
}

fn vncd_batched(store: &FileStore, dir: &StateDir) -> Duration {
    let set: LeaseSet = read_state(&dir.leases()).unwrap();
    let changes = (EXISTING..EXISTING + ALLOCS)
        .map(|i| LeaseChange::Put(lease(i)))
        .collect();
    let start = Instant::now();
    store.commit_blocking(set.revision, changes).unwrap();
    start.elapsed()
}

fn per_alloc(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0 / ALLOCS as f64
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("allocation benchmark: run it with `cargo bench --bench allocation`");
        return;
    }
    let rounds = 5;
    let (mut seed, mut single, mut batched) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (_t, _s, dir) = fresh("bench-seed");
        seed.push(per_alloc(seed_style(&dir)));
        let (_t, store, dir) = fresh("bench-single");
        single.push(per_alloc(vncd_single(&store, &dir)));
        let (_t, store, dir) = fresh("bench-batch");
        batched.push(per_alloc(vncd_batched(&store, &dir)));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (s, o, b) = (median(&mut seed), median(&mut single), median(&mut batched));
    println!(
        "durable allocation cost, {ALLOCS} allocations on top of {EXISTING} leases, median of {rounds} rounds"
    );
    println!("  seed-style (re-read + rewrite, no fsync):   {s:.3} ms/allocation");
    println!(
        "  vncd, one allocation per commit (fsync):    {o:.3} ms/allocation  ({:.2}x seed)",
        o / s
    );
    println!(
        "  vncd, one planning pass per commit (fsync): {b:.3} ms/allocation  ({:.3}x seed)",
        b / s
    );
}
