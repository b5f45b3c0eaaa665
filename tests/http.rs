//! `vncd run --http`: the real binary, a real QEMU VNC server and real proxies, observed
//! only through the HTTP endpoints (/readyz, /metrics, /v1/status, /v1/sessions).
//! Everything listens on loopback; every process a test starts is ended by pid in a Drop
//! guard (the Vncd harness ends vncd and the proxies carrying its state directory).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// One HTTP/1.1 request to loopback: (status, body), or None if nothing listens yet.
fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    http_with(port, method, path, "")
}

/// Like [`http`], with extra header lines (each ending in CRLF).
fn http_with(port: u16, method: &str, path: &str, headers: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

fn get(port: u16, path: &str) -> (u16, String) {
    http(port, "GET", path).unwrap_or_else(|| panic!("GET {path}: no answer"))
}

fn get_json(port: u16, path: &str) -> Value {
    let (status, body) = get(port, path);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The value of one sample (`name` with its labels exactly as rendered).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn metric(port: u16, name: &str) -> Option<f64> {
    let (status, body) = get(port, "/metrics");
    assert_eq!(status, 200, "{body}");
    sample(&body, name)
}

/// Waits until `name` satisfies `ok`; returns its value.
fn wait_metric(port: u16, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let mut last = None;
    let start = std::time::Instant::now();
    loop {
        last = metric(port, name).or(last);
        if let Some(v) = last.filter(|v| ok(*v)) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{name}: last value {last:?}\n{}",
            get(port, "/metrics").1
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A vncd with `--http` on a port of this binary's band.
fn vncd_with_http(pool: u16) -> (Vncd, u16) {
    let mut v = Vncd::new(pool);
    let http_port = pool_base(1);
    v.extra = vec!["--http".into(), format!("127.0.0.1:{http_port}")];
    v.start();
    (v, http_port)
}

/// Waits for /readyz to answer 200 and checks a full pass is behind it.
fn wait_ready_http(port: u16) {
    let mut seen = Vec::new();
    wait_for("/readyz 200", Duration::from_secs(20), || {
        let (status, _) = http(port, "GET", "/readyz")?;
        seen.push(status);
        (status == 200).then_some(())
    });
    assert!(seen.iter().all(|s| *s == 200 || *s == 503), "{seen:?}");
    // Ready means a pass has completed: it is timed, and the view is published.
    assert!(metric(port, "vncd_reconcile_duration_seconds_count").unwrap() >= 1.0);
    assert_eq!(get(port, "/v1/status").0, 200);
}

/// A proxy planted with this vncd's marker and no lease; killed and reaped on drop.
struct Planted(Child);

impl Drop for Planted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn http_endpoints_follow_a_session_from_creation_to_deletion() {
    let qemu = Qemu::tcp();
    let (v, port) = vncd_with_http(4);
    wait_ready_http(port);

    let st = get_json(port, "/v1/status");
    assert_eq!(st["port_pool"]["total_ports"], 4, "{st}");
    assert_eq!(st["port_pool"]["allocated_ports"], 0, "{st}");
    assert_eq!(st["controller_running"], true, "{st}");
    assert_eq!(get_json(port, "/v1/sessions"), serde_json::json!({}));
    assert_eq!(metric(port, "vncd_pool_ports"), Some(4.0));
    assert_eq!(metric(port, "vncd_pool_leased_ports"), Some(0.0));
    assert_eq!(metric(port, "vncd_pool_free_ports"), Some(4.0));
    let starts0 = metric(port, "vncd_proxy_starts_total").unwrap();

    // Create: the lease and the proxy show up.
    v.add_session("vm1", qemu.port);
    let status = v.wait_ready("vm1");
    let ws_port = status["port"].as_u64().unwrap();
    let pid = status["pid"].as_i64().unwrap();
    let sessions = get_json(port, "/v1/sessions");
    let s = &sessions["vm1"];
    assert_eq!(s["ws_port"], ws_port, "{sessions}");
    assert_eq!(s["vnc_port"], qemu.port, "{sessions}");
    assert_eq!(s["pid"], pid, "{sessions}");
    assert_eq!(s["url"], format!("ws://127.0.0.1:{ws_port}/"), "{sessions}");
    assert_eq!(status["url"], format!("ws://127.0.0.1:{ws_port}/"));
    let token_url = v.url("vm1");
    let token = token_url.rsplit_once("token=").unwrap().1.to_owned();
    assert!(!get(port, "/v1/sessions").1.contains(&token));
    assert_eq!(
        wait_metric(port, "vncd_pool_leased_ports", |v| v == 1.0),
        1.0
    );
    assert_eq!(metric(port, "vncd_pool_free_ports"), Some(3.0));
    assert!(metric(port, "vncd_proxy_starts_total").unwrap() >= starts0 + 1.0);
    assert!(metric(port, "vncd_allocations_total").unwrap() >= 1.0);
    wait_metric(port, "vncd_sessions{phase=\"Ready\"}", |v| v == 1.0);
    let st = get_json(port, "/v1/status");
    assert_eq!(st["port_pool"]["allocated_ports"], 1, "{st}");
    assert_eq!(st["active_processes"], 1, "{st}");

    // A client through the builtin proxy: its connections and bytes are counted.
    if backend() == "builtin" {
        let conns = "vncd_proxy_connections_total{session=\"vm1\"}";
        let active = "vncd_proxy_active_connections{session=\"vm1\"}";
        let down = "vncd_proxy_bytes_total{session=\"vm1\",direction=\"to_client\"}";
        let up = "vncd_proxy_bytes_total{session=\"vm1\",direction=\"to_vnc\"}";
        assert_eq!(wait_metric(port, conns, |v| v == 0.0), 0.0);
        let mut c = Client::connect(&token_url).await;
        assert_eq!(c.read(12).await, b"RFB 003.008\n");
        c.handshake().await;
        wait_metric(port, conns, |v| v == 1.0);
        wait_metric(port, active, |v| v == 1.0);
        // The banner, the security types and ServerInit came down; the client's version,
        // security choice and ClientInit went up.
        wait_metric(port, down, |v| v >= 12.0 + 4.0 + 24.0);
        wait_metric(port, up, |v| v >= 14.0);
        drop(c);
        wait_metric(port, active, |v| v == 0.0);
        assert_eq!(metric(port, conns), Some(1.0));
        // A refused upgrade (no ticket; a used one) is counted too, by reason, and never
        // reaches the VNC server.
        assert!(
            try_banner(&format!("ws://127.0.0.1:{ws_port}/"))
                .await
                .is_err()
        );
        assert!(try_banner(&token_url).await.is_err());
        wait_metric(
            port,
            "vncd_proxy_refused_connections_total{session=\"vm1\"}",
            |v| v >= 2.0,
        );
        for reason in ["invalid", "replayed"] {
            wait_metric(
                port,
                &format!("vncd_proxy_ticket_refusals_total{{session=\"vm1\",reason=\"{reason}\"}}"),
                |v| v == 1.0,
            );
        }
        assert_eq!(metric(port, conns), Some(1.0));
    }

    // A killed proxy is restarted on its lease: a restart.
    let restarts0 = metric(port, "vncd_proxy_restarts_total").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_metric(port, "vncd_proxy_restarts_total", |v| v >= restarts0 + 1.0);
    let new_pid = wait_for("a new proxy pid", Duration::from_secs(20), || {
        let s = get_json(port, "/v1/sessions");
        s["vm1"]["pid"].as_i64().filter(|p| *p != pid)
    });
    assert!(pid_alive(new_pid));
    assert_eq!(
        get_json(port, "/v1/sessions")["vm1"]["ws_port"],
        ws_port,
        "same lease"
    );

    // Delete: the lease goes, and so does the session.
    v.remove_session("vm1");
    wait_metric(port, "vncd_pool_leased_ports", |v| v == 0.0);
    assert_eq!(metric(port, "vncd_pool_free_ports"), Some(4.0));
    assert!(metric(port, "vncd_releases_total").unwrap() >= 1.0);
    wait_for("/v1/sessions empty", Duration::from_secs(10), || {
        (get_json(port, "/v1/sessions") == serde_json::json!({})).then_some(())
    });
    assert_eq!(
        get_json(port, "/v1/status")["port_pool"]["allocated_ports"],
        0
    );
    wait_metric(port, "vncd_sessions{phase=\"Ready\"}", |v| v == 0.0);
    assert!(
        !v.state.join("stats").join("vm1.json").exists(),
        "stats file forgotten with the lease"
    );

    // Bad requests get a clear 4xx.
    let (status, body) = http(port, "POST", "/v1/sessions").unwrap();
    assert_eq!(status, 405, "{body}");
    let (status, body) = get(port, "/v2/whatever");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("/metrics"), "{body}");
    // vncd's log never carries a ticket.
    assert!(!v.log().contains(&token), "ticket in the vncd log");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_planted_orphan_is_reaped_and_counted() {
    let qemu = Qemu::tcp();
    let (v, port) = vncd_with_http(3);
    wait_ready_http(port);
    assert_eq!(metric(port, "vncd_orphans_reaped_total"), Some(0.0));

    // A real proxy that carries this vncd's marker but matches no lease.
    let orphan_port = v.range.1;
    let mut orphan = Planted(
        Command::new(BIN)
            .args(["proxy", "--listen"])
            .arg(format!("127.0.0.1:{orphan_port}"))
            .arg("--target")
            .arg(format!("127.0.0.1:{}", qemu.port))
            .env(vncd::supervisor::marker::OWNER, v.owner())
            .env(vncd::supervisor::marker::SESSION, "ghost")
            .env(vncd::supervisor::marker::LEASE, "0123456789abcdef")
            .env(vncd::supervisor::marker::PORT, orphan_port.to_string())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_metric(port, "vncd_orphans_reaped_total", |v| v >= 1.0);
    wait_for("the orphan to end", Duration::from_secs(10), || {
        orphan.0.try_wait().unwrap()
    });
    let st = get_json(port, "/v1/status");
    assert_eq!(st["orphan_processes"], 0, "{st}");
    assert_eq!(metric(port, "vncd_proxy_starts_total"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_turns_200_only_once_the_first_pass_is_done() {
    // The first pass will have to commit a lease; holding leases.lock keeps it waiting.
    let mut v = Vncd::new(2);
    v.add_session("vm0", 1);
    std::thread::sleep(Duration::from_millis(400)); // let the manifest settle
    std::fs::create_dir_all(&v.state).unwrap();
    let lock = vncd::store::lock::LockGuard::acquire(
        &v.state.join("leases.lock"),
        Duration::from_secs(10),
    )
    .unwrap();
    let port = pool_base(1);
    v.extra = vec!["--http".into(), format!("127.0.0.1:{port}")];
    v.start();
    wait_for("/healthz 200", Duration::from_secs(20), || {
        (http(port, "GET", "/healthz")?.0 == 200).then_some(())
    });
    for _ in 0..5 {
        let (status, body) = get(port, "/readyz");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("first sync"), "{body}");
        assert_eq!(get(port, "/v1/status").0, 503);
        assert_eq!(get(port, "/v1/sessions").0, 503);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        metric(port, "vncd_reconcile_duration_seconds_count"),
        Some(0.0)
    );
    drop(lock);
    wait_for("/readyz 200", Duration::from_secs(20), || {
        (get(port, "/readyz").0 == 200).then_some(())
    });
    assert!(metric(port, "vncd_reconcile_duration_seconds_count").unwrap() >= 1.0);
    assert_eq!(metric(port, "vncd_allocations_total"), Some(1.0));
    let s = get_json(port, "/v1/sessions");
    assert_eq!(s["vm0"]["vnc_port"], 1, "{s}");
}

/// Sends `raw` bytes and returns whatever comes back before the server closes (or 5 s).
fn raw_exchange(port: u16, raw: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The server may answer and close before it has read everything: ignore write errors.
    let _ = s.write_all(raw);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_to_the_api_get_an_error_and_disturb_nothing() {
    let qemu = Qemu::tcp();
    let (v, port) = vncd_with_http(4);
    wait_ready_http(port);
    v.add_session("vm1", qemu.port);
    let before = v.wait_ready("vm1");
    let big_header = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let many_headers = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..500)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect::<String>()
    );
    let long_path = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "p".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("binary junk", vec![0, 159, 146, 150, 255, 0, 1, 2, 3]),
        ("not HTTP", b"HELLO\r\n\r\n".to_vec()),
        ("oversized header", big_header.into_bytes()),
        ("500 headers", many_headers.into_bytes()),
        ("100 KB path", long_path.into_bytes()),
        (
            "websocket upgrade",
            b"GET /v1/sessions HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec(),
        ),
        (
            "POST with a body",
            b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
        ),
        (
            "lying content-length",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\nab".to_vec(),
        ),
        ("path traversal", b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("HTTP/0.9", b"GET /metrics\r\n\r\n".to_vec()),
    ];
    for (what, raw) in &cases {
        let answer = raw_exchange(port, raw);
        let status: Option<u16> = answer
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok());
        // RELIABILITY.md's table of bad inputs quotes these lines.
        eprintln!(
            "bad API input: {what} -> {}",
            answer.lines().next().unwrap_or("(closed, no answer)")
        );
        // Either a client error, or the connection closed with no answer (a request too
        // broken to answer); never a success, never a server error.
        match status {
            // The API speaks no websocket: an upgrade is never accepted (a plain answer
            // that ignores the header is fine). A GET's body is not read, so a lying
            // Content-Length neither hangs the server nor changes the answer.
            Some(code) if matches!(*what, "websocket upgrade" | "lying content-length") => assert!(
                code != 101 && code < 500,
                "{what}: answered {code}:\n{answer:.300}"
            ),
            Some(code) => assert!(
                (400..500).contains(&code),
                "{what}: answered {code}:\n{answer:.300}"
            ),
            None => assert!(answer.is_empty(), "{what}: {answer:.300}"),
        }
        // vncd keeps serving the API and the console.
        assert_eq!(get(port, "/healthz").0, 200, "after {what}");
    }
    let after = v.wait_ready("vm1");
    assert!(before["pid"].is_i64(), "{before}");
    assert_eq!(after["pid"], before["pid"], "the proxy was not disturbed");
    assert_eq!(rfb_banner(&v.console_url(&after)).await, b"RFB 003.008\n");
    assert!(!v.log().contains("panicked"), "vncd panicked:\n{}", v.log());
}

/// Whether the server closed `s` within `limit` (EOF or reset).
fn closed_within(s: &mut std::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(out),
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_and_idle_floods_cannot_keep_the_api_from_answering() {
    const CAP: usize = 64; // vncd::http::MAX_CONNECTIONS
    let (_v, port) = vncd_with_http(2);
    wait_ready_http(port);
    // A slowloris client: a header byte every 300 ms. It is dropped once the 10 s head
    // timeout passes, however much it still has to send.
    let started = std::time::Instant::now();
    let drip = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        for b in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: "
            .iter()
            .cycle()
        {
            if s.write_all(&[*b]).is_err() {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(300));
            if started.elapsed() > Duration::from_secs(30) {
                return None;
            }
        }
        None
    });
    // (Alone: a flood would close it sooner, as the oldest idle connection.)
    let dropped = drip
        .join()
        .unwrap()
        .expect("the slowloris client was never dropped");
    eprintln!("measured: a slowloris client dropped after {dropped:?}");
    assert!(
        dropped >= Duration::from_secs(9) && dropped < Duration::from_secs(14),
        "slowloris dropped after {dropped:?}"
    );
    // Twice the cap of idle connections: every one is accepted, each new one closing
    // the oldest idle one, so no more than the cap are ever open...
    let mut idle: Vec<std::net::TcpStream> = (0..2 * CAP)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut closed = 0;
    for s in &mut idle {
        if closed_within(s, Duration::from_millis(50)).is_some() {
            closed += 1;
        }
    }
    assert!(
        closed >= CAP,
        "only {closed} of {} idle connections were closed",
        2 * CAP
    );
    // ...and a real request still gets through, at once.
    let t = std::time::Instant::now();
    assert_eq!(get(port, "/healthz").0, 200);
    let took = t.elapsed();
    eprintln!(
        "measured: {closed} of {} idle connections closed to make room; /healthz answered in {took:?}",
        2 * CAP
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    // The remaining idle connections are closed by the head timeout too.
    for s in &mut idle {
        assert!(
            closed_within(s, Duration::from_secs(15)).is_some(),
            "an idle connection was kept past the head timeout"
        );
    }
    // When every connection is busy (requests in flight on keep-alive connections that
    // already sent one), a new one gets 503 instead of waiting.
    let mut busy = Vec::new();
    for _ in 0..CAP {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 256];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = s.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        busy.push(s);
    }
    let mut extra = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let answer = closed_within(&mut extra, Duration::from_secs(3)).expect("answered and closed");
    assert!(
        answer.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    drop(busy);
    wait_for("/healthz after the flood", Duration::from_secs(5), || {
        (http(port, "GET", "/healthz")?.0 == 200).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn the_url_endpoint_mints_tickets_only_for_the_bearer_of_the_token_file() {
    use std::os::unix::fs::PermissionsExt;
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    let http_port = pool_base(1);
    let token_file = v.tmp.path().join("http-token");
    std::fs::write(&token_file, "correct-horse-battery-staple-0123\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    v.extra = vec![
        "--http".into(),
        format!("127.0.0.1:{http_port}"),
        "--http-token-file".into(),
        token_file.display().to_string(),
    ];
    v.start();
    wait_ready_http(http_port);
    v.add_session("vm1", qemu.port);
    v.wait_ready("vm1");
    let path = "/v1/sessions/vm1/url";
    let auth = "Authorization: Bearer correct-horse-battery-staple-0123\r\n";
    // 401 without the token or with a wrong one; the answer says nothing about sessions.
    for headers in ["", "Authorization: Bearer wrong-wrong-wrong-wrong\r\n"] {
        let (status, body) = http_with(http_port, "POST", path, headers).unwrap();
        assert_eq!(status, 401, "{headers:?}: {body}");
        assert!(!body.contains("vm1"), "{body}");
    }
    // 404 for an unknown session, with the token.
    let (status, body) = http_with(http_port, "POST", "/v1/sessions/nope/url", auth).unwrap();
    assert_eq!(status, 404, "{body}");
    // 200: a URL whose ticket opens the console once.
    let (status, body) = http_with(http_port, "POST", path, auth).unwrap();
    assert_eq!(status, 200, "{body}");
    let j: Value = serde_json::from_str(&body).unwrap();
    let url = j["url"].as_str().unwrap();
    assert!(url.contains("?token=v1."), "{j}");
    let expires: jiff::Timestamp = j["expiresAt"].as_str().unwrap().parse().unwrap();
    let left = expires.as_second() - jiff::Timestamp::now().as_second();
    assert!((55..=61).contains(&left), "default TTL 60 s: {j}");
    assert_eq!(try_banner(url).await.unwrap(), b"RFB 003.008\n");
    assert!(try_banner(url).await.is_err(), "the ticket opened twice");
    // GET is not how to mint.
    assert_eq!(http_with(http_port, "GET", path, auth).unwrap().0, 405);
    // A token file others can read is refused at start, naming the file and the fix.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut args = vec!["run".to_owned()];
    args.extend(v.base_args());
    args.extend([
        "--http".into(),
        format!("127.0.0.1:{}", pool_base(1)),
        "--http-token-file".into(),
        token_file.display().to_string(),
        "--lock-timeout".into(),
        "0.2".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = v.cmd(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("chmod 600"), "{err}");
}
