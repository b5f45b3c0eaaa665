//! Time to mint a console URL in standalone mode, each way, against what a VM manager did
//! before tickets to read a URL (which then carried a fixed token), measured in one run:
//!
//! - `Minter::mint` in process (derive the lease key, sign, format): the floor;
//! - `vncd url vm1` (a process: read config.json, leases.json and the master key, mint)
//!   against `vncd get vm1 -o json` (a process that reads sessions.json);
//! - `POST /v1/sessions/vm1/url` on a running `vncd run --http` (bearer token) against
//!   `GET /v1/sessions` on the same server.
//!
//! Run: `cargo bench --bench mint` (needs QEMU; `scripts/install-deps`). `VNCD_BENCH_MINTS`
//! (default 300) sets the samples per way.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{Qemu, Vncd, pool_base, wait_for};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Stats {
    p50: Duration,
    p99: Duration,
}

fn measure(n: usize, mut f: impl FnMut()) -> Stats {
    let mut t: Vec<Duration> = (0..n)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    Stats {
        p50: percentile(&t, 0.5),
        p99: percentile(&t, 0.99),
    }
}

fn http(port: u16, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn row(what: &str, s: &Stats, base: Option<&Stats>) {
    let ratio = base.map_or(String::from("-"), |b| {
        format!("{:.2}x", us(s.p50) / us(b.p50))
    });
    println!(
        "| {what} | {:.0} µs | {:.0} µs | {ratio} |",
        us(s.p50),
        us(s.p99)
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("mint benchmark: run it with `cargo bench --bench mint`");
        return;
    }
    let n: usize = std::env::var("VNCD_BENCH_MINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    let http_port = pool_base(1);
    let token_file = v.tmp.path().join("http-token");
    std::fs::write(&token_file, "bench-token-0123456789abcdef\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    v.extra = vec![
        "--backend".into(),
        "builtin".into(),
        "--http".into(),
        format!("127.0.0.1:{http_port}"),
        "--http-token-file".into(),
        token_file.display().to_string(),
    ];
    v.start();
    v.add_session("vm1", qemu.port);
    v.wait_ready("vm1");
    wait_for("HTTP API", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", http_port)).ok()
    });

    let master = vncd::ticket::MasterKey::load(&v.state.join("ticket.key")).unwrap();
    let minter = vncd::console::Minter::new(
        master,
        vncd::status::UrlStyle {
            public_host: "127.0.0.1".into(),
            web: false,
            tls: false,
        },
        Duration::from_secs(60),
    );
    let leases = vncd::store::file::read_state(&v.state.join("leases.json")).unwrap();
    let lease = leases.leases["vm1"].clone();
    let in_process = measure(n * 10, || {
        let u = minter
            .mint(
                &lease,
                vncd::console::MintOptions::default(),
                vncd::ticket::unix_now(),
            )
            .unwrap();
        std::hint::black_box(u);
    });

    let state = v.state.display().to_string();
    let cli_get = measure(n, || {
        let out = v.cmd(&["get", "vm1", "-o", "json", "--state-dir", &state]);
        assert!(out.status.success());
    });
    let cli_url = measure(n, || {
        let out = v.cmd(&["url", "vm1", "--state-dir", &state]);
        assert!(out.status.success());
    });
    let get = "GET /v1/sessions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let post = "POST /v1/sessions/vm1/url HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \
                bench-token-0123456789abcdef\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let http_get = measure(n, || {
        http(http_port, get);
    });
    let http_post = measure(n, || {
        assert!(http(http_port, post).contains("token=v1."));
    });

    println!(
        "\nMinting a console URL (standalone), {n} samples per way ({} in process)\n",
        n * 10
    );
    println!("| way | p50 | p99 | p50 vs the alternative |");
    println!("| --- | --- | --- | --- |");
    row("`Minter::mint` in process", &in_process, None);
    row(
        "`vncd get vm1 -o json` (before tickets: read the URL)",
        &cli_get,
        None,
    );
    row("`vncd url vm1` (mint)", &cli_url, Some(&cli_get));
    row("`GET /v1/sessions`", &http_get, None);
    row(
        "`POST /v1/sessions/vm1/url` (mint)",
        &http_post,
        Some(&http_get),
    );
}
