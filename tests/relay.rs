//! The node relay (issue 17): the serving core in-process (`vncd::relay::serve`) and the
//! real `vncd-proxy relay` binary, against real QEMU VNC servers, with a real websocket
//! client and tickets minted from the declared lease keys. Nothing is mocked.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Qemu, free_port, try_banner};
use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use vncd::relay::{Client, Limits, Report, SessionSpec, TargetSpec, WireKey};
use vncd::ticket::{LeaseKey, mint, unix_now};

const RELAY_BIN: &str = env!("CARGO_BIN_EXE_vncd-proxy");

fn key(n: u8) -> LeaseKey {
    LeaseKey::from_bytes([n; 32])
}

fn spec(name: &str, port: u16, target: TargetSpec, k: &LeaseKey) -> SessionSpec {
    SessionSpec {
        name: name.into(),
        port,
        listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
        target,
        lease_uid: format!("lease-{name}"),
        lease_key: WireKey(k.clone()),
        limits: Limits::default(),
    }
}

fn ticket(k: &LeaseKey) -> String {
    mint(k, Duration::from_secs(60), unix_now()).unwrap().text
}

fn url(port: u16, ticket: &str) -> String {
    format!("ws://127.0.0.1:{port}/websockify?token={ticket}")
}

/// A port nobody listens on (a dead VNC target).
fn dead_target() -> TargetSpec {
    TargetSpec::Tcp(format!("127.0.0.1:{}", free_port()))
}

/// Polls the relay's report until `f` holds.
async fn wait_report(client: &mut Client, what: &str, f: impl Fn(&Report) -> bool) -> Report {
    let start = Instant::now();
    loop {
        let r = client.report().await.unwrap();
        if f(&r) {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out waiting for {what}; last report: {r:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ready(r: &Report, name: &str) -> bool {
    r.sessions
        .get(name)
        .is_some_and(|s| s.listening && s.target_reachable == Some(true))
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

/// The real relay binary, ended by pid on drop.
struct RelayProc {
    child: Child,
    state: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl RelayProc {
    fn start(state: &Path, extra: &[&str]) -> RelayProc {
        let log = state.join(format!("relay-{}.log", unix_now_nanos()));
        let socket = state.join("relay").join("relay.sock");
        let child = Command::new(RELAY_BIN)
            .arg("relay")
            .arg("--state-dir")
            .arg(state)
            .args(extra)
            .env("VNCD_LOG", "info,vncd=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut r = RelayProc {
            child,
            state: state.to_owned(),
            socket,
            log,
        };
        r.wait_socket();
        r
    }

    fn wait_socket(&mut self) {
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("relay exited with {st}: {}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "relay did not open its socket: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn client(&self) -> Client {
        Client::connect(&self.socket).await.unwrap()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn unix_now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_serve_bridges_a_ticketed_console_to_qemu_and_refuses_a_replay() {
    let qemu = Qemu::tcp();
    let tmp = tempfile::tempdir().unwrap();
    let nonces = tmp.path().join("nonces");
    std::fs::create_dir(&nonces).unwrap();
    let relay = vncd::relay::Relay::new(vncd::relay::RelayConfig {
        nonce_root: nonces.clone(),
        admission: vncd::relay::AdmissionConfig {
            per_source: 8,
            global: 64,
            protect: vncd::relay::PROTECT,
        },
        ping_every: Duration::from_secs(20),
        nofile: None,
    });
    let sock = tmp.path().join("c.sock");
    let control = tokio::net::UnixListener::bind(&sock).unwrap();
    let me = nix::unistd::geteuid().as_raw();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(vncd::relay::serve(
        relay.clone(),
        vncd::relay::Listeners { control },
        vncd::relay::Peers {
            relay_uid: me,
            controller_uid: me,
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    let k = key(1);
    let port = free_port();
    let mut c = Client::connect(&sock).await.unwrap();
    let applied = c
        .declare(1, vec![spec("vm1", port, TargetSpec::Tcp(qemu.addr()), &k)])
        .await
        .unwrap();
    assert!(applied.changed && applied.errors.is_empty(), "{applied:?}");
    wait_report(&mut c, "vm1 ready", |r| ready(r, "vm1")).await;

    let t = ticket(&k);
    let mut console = common::Client::connect(&url(port, &t)).await;
    assert_eq!(console.read(12).await, b"RFB 003.008\n");
    let (w, h) = console.handshake().await;
    assert!(w > 0 && h > 0);
    let r = wait_report(&mut c, "one authenticated client", |r| {
        r.sessions["vm1"].authenticated == 1
    })
    .await;
    assert!(r.sessions["vm1"].bytes_out > 12 && r.sessions["vm1"].bytes_in > 0);
    assert!(r.sessions["vm1"].last_activity_unix.is_some());
    // The same ticket again: refused, also while its first connection is open.
    let replay = try_banner(&url(port, &t)).await.unwrap_err();
    assert!(replay.contains("403"), "{replay}");
    // A ticket of another key: refused.
    let forged = try_banner(&url(port, &ticket(&key(2)))).await.unwrap_err();
    assert!(forged.contains("403"), "{forged}");
    // The used ticket is recorded on disk, under the session's name.
    assert_eq!(std::fs::read_dir(nonces.join("vm1")).unwrap().count(), 1);
    // Relay-level API without the socket: the same report.
    assert_eq!(relay.report().sessions["vm1"].authenticated, 1);

    // Stopping the relay ends the console.
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("serve returns after shutdown")
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match console.ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the console did not end with the relay");
    assert!(
        !port_open(port),
        "the session port is closed after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_binary_serves_declared_sessions_and_outlives_its_controller() {
    let qemu = Qemu::tcp();
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(tmp.path(), &[]);
    let (ka, kb) = (key(10), key(11));
    let (pa, pb) = (free_port(), free_port());
    let sessions = vec![
        spec("vm-a", pa, TargetSpec::Tcp(qemu.addr()), &ka),
        spec("vm-dead", pb, dead_target(), &kb),
    ];
    let mut c = relay.client().await;
    let applied = c.declare(1, sessions.clone()).await.unwrap();
    assert!(applied.errors.is_empty(), "{applied:?}");
    let r = wait_report(&mut c, "both probed", |r| {
        ready(r, "vm-a")
            && r.sessions
                .get("vm-dead")
                .is_some_and(|s| s.listening && s.target_reachable == Some(false))
    })
    .await;
    let dead = &r.sessions["vm-dead"];
    assert!(
        dead.target_error
            .as_deref()
            .is_some_and(|e| e.contains("cannot connect")),
        "{dead:?}"
    );
    assert_eq!(r.relay.pid, relay.child.id());
    assert_eq!(r.applied_version, 1);

    // A stale or repeated version is acknowledged without change.
    let stale = c.declare(1, vec![]).await.unwrap();
    assert!(!stale.changed && stale.applied_version == 1, "{stale:?}");
    assert!(port_open(pa) && port_open(pb));

    // A console with a ticket; its replay is refused.
    let t = ticket(&ka);
    let mut console = common::Client::connect(&url(pa, &t)).await;
    assert_eq!(console.read(12).await, b"RFB 003.008\n");
    console.handshake().await;
    assert!(try_banner(&url(pa, &t)).await.unwrap_err().contains("403"));

    // Redeclare without vm-dead: only its listener closes; vm-a's console stays.
    let applied = c.declare(2, vec![sessions[0].clone()]).await.unwrap();
    assert!(applied.changed);
    assert!(!port_open(pb), "vm-dead's port is closed");
    assert!(port_open(pa));
    let r = c.report().await.unwrap();
    assert!(!r.sessions.contains_key("vm-dead"));
    assert_eq!(r.sessions["vm-a"].authenticated, 1);
    // The rest of ServerInit (pixel format, name), then a FramebufferUpdateRequest.
    let rest = console.read(20).await;
    let name_len = u32::from_be_bytes([rest[16], rest[17], rest[18], rest[19]]);
    console.read(name_len as usize).await;
    console.write(&[3, 0, 0, 0, 0, 0, 0, 1, 0, 1]).await;
    let update = console.read(4).await;
    assert_eq!(update[0], 0, "a FramebufferUpdate after the redeclare");

    // The controller goes away: the relay keeps serving the last declared set.
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t2 = ticket(&ka);
    assert_eq!(try_banner(&url(pa, &t2)).await.unwrap(), b"RFB 003.008\n");
    let mut c2 = relay.client().await;
    let r = c2.report().await.unwrap();
    assert_eq!(
        r.applied_version, 2,
        "the last declaration is still in effect"
    );
    assert!(
        r.sessions["vm-a"].authenticated >= 1,
        "the open console is still bridged"
    );
    drop((console, c2));

    // A restarted relay, declared again, still refuses a ticket spent before.
    let state = relay.state.clone();
    drop(relay);
    let relay = RelayProc::start(&state, &[]);
    let mut c = relay.client().await;
    c.declare(1, vec![sessions[0].clone()]).await.unwrap();
    wait_report(&mut c, "vm-a ready again", |r| ready(r, "vm-a")).await;
    let again = try_banner(&url(pa, &t)).await.unwrap_err();
    assert!(again.contains("403"), "{again}");
    assert_eq!(
        try_banner(&url(pa, &ticket(&ka))).await.unwrap(),
        b"RFB 003.008\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_uid_is_refused_on_the_control_socket() {
    common::require("setpriv");
    common::require("perl");
    let tmp = tempfile::tempdir().unwrap();
    // A socket outside the 0750 relay directory, opened to everyone by file mode, so
    // that only the SO_PEERCRED check stands between uid 65534 and the relay.
    let open_dir = tmp.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for d in [tmp.path(), open_dir.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let socket = open_dir.join("r.sock");
    let mut relay = RelayProc {
        child: Command::new(RELAY_BIN)
            .args(["relay", "--state-dir"])
            .arg(tmp.path())
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join("relay.log")).unwrap())
            .spawn()
            .unwrap(),
        state: tmp.path().to_owned(),
        socket: socket.clone(),
        log: tmp.path().join("relay.log"),
    };
    relay.wait_socket();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = r#"use IO::Socket::UNIX; my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die "connect: $!"; print $s "{\"proto\":1,\"type\":\"report\"}\n"; my $l = <$s>; print $l;"#;
    let out = tokio::task::spawn_blocking(move || {
        Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .args(["perl", "-e", script])
            .arg(&socket)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.contains("\"type\":\"error\"") && answer.contains("uid 65534 may not control"),
        "answer {answer:?}, {}, stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!answer.contains("\"sessions\""), "no report for uid 65534");
    common::wait_for("the refusal in the log", Duration::from_secs(5), || {
        relay
            .log()
            .contains("control connection refused")
            .then_some(())
    });
    // The relay's own uid still gets its report.
    let r = relay.client().await.report().await.unwrap();
    assert_eq!(r.relay.pid, relay.child.id());
}

#[test]
fn a_relay_that_cannot_write_its_directory_refuses_to_start_with_the_fix() {
    common::require("setpriv");
    let tmp = tempfile::tempdir().unwrap();
    // The trap `--proxy-user` fell into: a state dir that the relay's uid cannot write.
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(RELAY_BIN)
        .args(["relay", "--state-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("uid 65534") && err.contains("Fix:") && err.contains("relay"),
        "{err}"
    );
    let take_over = Command::new(RELAY_BIN)
        .args(["relay", "--take-over", "--state-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!take_over.status.success());
    assert!(String::from_utf8_lossy(&take_over.stderr).contains("not supported yet"));
}

/// Opens silent connections from `source` to `port` until `stop`, keeping each open until
/// the relay closes it; counts them in `opened`.
async fn flood(source: Ipv4Addr, port: u16, stop: Arc<AtomicBool>, opened: Arc<AtomicUsize>) {
    while !stop.load(Ordering::Relaxed) {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::from((source, 0))).unwrap();
        if let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_millis(500),
            sock.connect(SocketAddr::from(([127, 0, 0, 1], port))),
        )
        .await
        {
            opened.fetch_add(1, Ordering::Relaxed);
            let stop = stop.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut b = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_secs(8), async {
                    while !stop.load(Ordering::Relaxed) {
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                })
                .await;
            });
        }
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
}

/// A client on its own address that needs 0.2 s between connecting and its upgrade.
async fn slow_client(port: u16, ticket: &str) -> Result<Vec<u8>, String> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from(([127, 0, 0, 2], 0))).unwrap();
    let tcp = tokio::time::timeout(
        Duration::from_secs(2),
        sock.connect(SocketAddr::from(([127, 0, 0, 1], port))),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut req = url(port, ticket).into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "binary".parse().unwrap());
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(3),
        tokio_tungstenite::client_async(req, tcp),
    )
    .await
    .map_err(|_| "upgrade timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    while buf.len() < 12 {
        match tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => buf.extend_from_slice(&b),
            Ok(Some(Ok(_))) => {}
            other => return Err(format!("no banner: {other:?}")),
        }
    }
    Ok(buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_eight_addresses_does_not_keep_a_slow_client_out() {
    let qemu = Qemu::tcp();
    let tmp = tempfile::tempdir().unwrap();
    // Small caps, so the flood (8 sources x 16) overruns the global cap and evictions
    // and the protection window are what let the client in.
    let relay = RelayProc::start(
        tmp.path(),
        &["--max-pending", "64", "--max-pending-per-source", "16"],
    );
    let k = key(20);
    let port = free_port();
    let mut c = relay.client().await;
    c.declare(1, vec![spec("vm", port, TargetSpec::Tcp(qemu.addr()), &k)])
        .await
        .unwrap();
    wait_report(&mut c, "vm ready", |r| ready(r, "vm")).await;

    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let flooders: Vec<_> = (10..18)
        .map(|n| {
            tokio::spawn(flood(
                Ipv4Addr::new(127, 0, 0, n),
                port,
                stop.clone(),
                opened.clone(),
            ))
        })
        .collect();
    // Let the flood fill the relay (and pass the protection window).
    let full = wait_report(&mut c, "the flood to fill the pending cap", |r| {
        r.relay.pending >= 64
    })
    .await;
    assert!(full.relay.pending <= 128, "{:?}", full.relay);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let mut got_in = 0;
    let mut failures = Vec::new();
    for _ in 0..8 {
        match slow_client(port, &ticket(&k)).await {
            Ok(b) if b == b"RFB 003.008\n" => got_in += 1,
            Ok(b) => failures.push(format!("banner {b:?}")),
            Err(e) => failures.push(e),
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let during = c.report().await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        let _ = f.await;
    }
    let flood_count = opened.load(Ordering::Relaxed);
    assert!(
        flood_count >= 500,
        "the flood opened only {flood_count} connections"
    );
    assert!(
        during.relay.pending >= 48,
        "the flood was still on: {:?}",
        during.relay
    );
    assert_eq!(
        got_in, 8,
        "a slow client got in {got_in} of 8 times during a flood of {flood_count} connections: {failures:?}"
    );
}

fn ticket_v2(k: &LeaseKey, lease_uid: &str) -> String {
    vncd::ticket::mint_v2(
        k,
        lease_uid,
        vncd::ticket::Grant::default(),
        Duration::from_secs(60),
        unix_now(),
    )
    .unwrap()
    .text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_routes_a_v2_ticket_to_the_session_of_its_lease() {
    let qemu = Qemu::tcp();
    let tmp = tempfile::tempdir().unwrap();
    let gw = free_port();
    let relay = RelayProc::start(tmp.path(), &[]);
    let (ka, kb) = (key(30), key(31));
    let (pa, pb) = (free_port(), free_port());
    let mut c = relay.client().await;
    let sessions = vec![
        spec("vm-a", pa, TargetSpec::Tcp(qemu.addr()), &ka),
        spec("vm-b", pb, dead_target(), &kb),
    ];
    // The gateway is declared with the sessions, not given on the relay's command line.
    let gw_addr: std::net::SocketAddr = format!("127.0.0.1:{gw}").parse().unwrap();
    let applied = c
        .declare_with_gateway(1, sessions.clone(), Some(gw_addr))
        .await
        .unwrap();
    assert_eq!(applied.gateway_error, None, "{applied:?}");
    let r = wait_report(&mut c, "vm-a ready", |r| ready(r, "vm-a")).await;
    assert_eq!(r.gateway, Some(format!("127.0.0.1:{gw}")));

    // A v2 ticket names its lease: the gateway routes it to vm-a and checks it there.
    let t = ticket_v2(&ka, "lease-vm-a");
    assert_eq!(try_banner(&url(gw, &t)).await.unwrap(), b"RFB 003.008\n");
    // Used once, whichever port it came through.
    assert!(try_banner(&url(gw, &t)).await.unwrap_err().contains("403"));
    assert!(try_banner(&url(pa, &t)).await.unwrap_err().contains("403"));
    // A v2 ticket for a lease this relay does not serve, one whose MAC is of another
    // lease's key, and a v1 ticket (which names no lease): refused.
    for bad in [
        ticket_v2(&ka, "lease-unknown"),
        ticket_v2(&kb, "lease-vm-a"),
        ticket(&ka),
    ] {
        let e = try_banner(&url(gw, &bad)).await.unwrap_err();
        assert!(e.contains("403"), "{e}");
    }
    // On a session port, a v2 ticket must name that port's lease.
    let e = try_banner(&url(pb, &ticket_v2(&ka, "lease-vm-a")))
        .await
        .unwrap_err();
    assert!(e.contains("403"), "{e}");
    // And v1 stays valid on session ports.
    assert_eq!(
        try_banner(&url(pa, &ticket(&ka))).await.unwrap(),
        b"RFB 003.008\n"
    );
    // Declared without a gateway: the gateway closes, the sessions stay served.
    let applied = c.declare(2, sessions.clone()).await.unwrap();
    assert!(applied.changed, "{applied:?}");
    assert!(!port_open(gw), "the undeclared gateway still accepts");
    assert_eq!(c.report().await.unwrap().gateway, None);
    assert!(port_open(pa));
    // A gateway address another program holds: the declaration says so, and the
    // sessions are still served.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = holder.local_addr().unwrap();
    let applied = c
        .declare_with_gateway(3, sessions, Some(busy))
        .await
        .unwrap();
    let why = applied
        .gateway_error
        .expect("a busy gateway address is reported");
    assert!(why.contains(&busy.to_string()), "{why}");
    assert!(port_open(pa));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_sharing_a_target_share_one_probe() {
    let qemu = Qemu::tcp();
    // Counts the connections the real QEMU gets, so the probes can be counted.
    let counted = common::CountingForwarder::new(qemu.addr()).await;
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(tmp.path(), &[]);
    let mut c = relay.client().await;
    let n = 40;
    // Distinct ports: free_port() may hand out a port it gave before.
    let mut ports = std::collections::BTreeSet::new();
    while ports.len() < n {
        ports.insert(free_port());
    }
    let sessions: Vec<SessionSpec> = ports
        .into_iter()
        .enumerate()
        .map(|(i, port)| {
            spec(
                &format!("vm{i}"),
                port,
                TargetSpec::Tcp(counted.addr.to_string()),
                &key(100 + i as u8),
            )
        })
        .collect();
    let applied = c.declare(1, sessions).await.unwrap();
    assert!(applied.errors.is_empty(), "{applied:?}");
    wait_report(&mut c, "every session reachable", |r| {
        (0..n).all(|i| ready(r, &format!("vm{i}")))
    })
    .await;
    // One probe per round for the one server, not one per session (a probe storm: QEMU
    // drops the oldest of more than 32 connecting clients).
    let probes = counted.count();
    assert!(
        (1..=3).contains(&probes),
        "{probes} probe connections for {n} sessions of one VNC server"
    );
}

/// A controller that lost its master key (a new pod with a new emptyDir) declares the
/// same leases with new keys: open consoles keep streaming, only new tickets change. A new
/// target still ends every connection, also those admitted under the earlier key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_lease_key_keeps_open_consoles_and_a_new_target_still_ends_them() {
    let qemu = Qemu::tcp();
    let other = Qemu::tcp();
    let tmp = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(tmp.path(), &[]);
    let (old, new) = (key(20), key(21));
    let port = free_port();
    let mut c = relay.client().await;
    c.declare(
        1,
        vec![spec("vm", port, TargetSpec::Tcp(qemu.addr()), &old)],
    )
    .await
    .unwrap();
    wait_report(&mut c, "vm ready", |r| ready(r, "vm")).await;
    let mut console = common::Client::connect(&url(port, &ticket(&old))).await;
    assert_eq!(console.read(12).await, b"RFB 003.008\n");
    let (w, h) = console.handshake().await;

    let applied = c
        .declare(
            2,
            vec![spec("vm", port, TargetSpec::Tcp(qemu.addr()), &new)],
        )
        .await
        .unwrap();
    assert!(applied.changed && applied.errors.is_empty(), "{applied:?}");
    // The open console still carries RFB: the rest of ServerInit, then a frame.
    console.request_frame(w, h).await;
    assert_eq!(
        console.read(1).await,
        [0],
        "a FramebufferUpdate after the rekey"
    );
    // New connections need the new key.
    let stale = try_banner(&url(port, &ticket(&old))).await.unwrap_err();
    assert!(stale.contains("403"), "{stale}");
    assert_eq!(
        try_banner(&url(port, &ticket(&new))).await.unwrap(),
        b"RFB 003.008\n"
    );

    // Retargeted: the console admitted under the old key ends too.
    c.declare(
        3,
        vec![spec("vm", port, TargetSpec::Tcp(other.addr()), &new)],
    )
    .await
    .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match console.ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        end.is_ok(),
        "a console of the old key outlived a new target"
    );
}

/// `vncd-proxy relay --state-dir DIR --check`, the chart's probe of the relay pod: 0 while
/// a relay answers on the socket, non-zero with the reason once none does.
#[test]
fn the_check_flag_succeeds_while_a_relay_answers_and_fails_once_it_is_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(tmp.path(), &[]);
    let check = || {
        Command::new(RELAY_BIN)
            .arg("relay")
            .arg("--state-dir")
            .arg(tmp.path())
            .arg("--check")
            .output()
            .unwrap()
    };
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It names the pid that answered (scripts/check-deb ends exactly that relay).
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("pid {} sessions 0\n", relay.child.id())
    );
    relay.kill9();
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("no relay answers on") && err.contains("relay.sock"),
        "{err}"
    );
}
