//! `vncd run --relay`: the relay as the data plane of the real controller. One relay
//! process serves every session; it reports Ready only for reachable targets, survives a
//! `kill -9` of the controller with its consoles open, comes back on the same ports after
//! its own death, and replaces the per-session proxies of an earlier run one at a time.
//! With `--gateway`, one more port serves every session, routed by the ticket.
//! Real `vncd`, real `vncd-proxy relay`, QEMU as the VNC server.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::{Client, Qemu, Vncd, relay_pids, try_banner, wait_for};
use futures::SinkExt;
use serde_json::Value;

fn relay_vncd(size: u16) -> Vncd {
    let mut v = Vncd::new(size);
    v.extra = vec!["--relay".into(), "--backend".into(), "builtin".into()];
    v
}

fn status(v: &Vncd, name: &str) -> Value {
    v.item(name)
        .map(|i| i["status"].clone())
        .unwrap_or(Value::Null)
}

fn condition<'a>(st: &'a Value, kind: &str) -> Option<&'a Value> {
    st["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

/// Reads the rest of ServerInit after `handshake` (pixel format and name).
async fn finish_init(c: &mut Client) {
    c.read(16).await;
    let len = c.read(4).await;
    c.read(u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize)
        .await;
}

/// A FramebufferUpdateRequest, answered by a FramebufferUpdate (message type 0).
async fn frame(c: &mut Client, w: u16, h: u16) {
    let mut req = vec![3u8, 0, 0, 0, 0, 0];
    req.extend_from_slice(&w.to_be_bytes());
    req.extend_from_slice(&h.to_be_bytes());
    c.write(&req).await;
    assert_eq!(c.read(1).await, [0], "no FramebufferUpdate");
    // Skip the rest of the update: padding, rectangle count, then each rectangle's header
    // and raw pixels would follow; a fresh connection per check keeps this simple, so the
    // caller only ever asks for one frame per connection.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_serves_every_session_and_ready_means_reachable() {
    let qemu = Qemu::tcp();
    let dead = common::free_port();
    let mut v = relay_vncd(6);
    v.add_session("vm1", qemu.port);
    v.add_session("vm2", qemu.port);
    v.add_session("down", dead);
    v.start();
    let a = v.wait_ready("vm1");
    let b = v.wait_ready("vm2");
    // One process serves both: the relay, not a proxy each.
    assert_eq!(a["pid"], b["pid"], "{a}\n{b}");
    let relays = relay_pids(&v.owner());
    assert_eq!(relays.len(), 1, "{relays:?}");
    assert_eq!(a["pid"].as_i64().unwrap() as i32, relays[0]);
    assert!(
        vncd::supervisor::scan(&v.owner()).is_empty(),
        "a per-session proxy runs"
    );
    let reach = condition(&a, "TargetReachable").expect("a TargetReachable condition");
    assert_eq!(reach["status"], "True", "{a}");
    // A session whose VNC server is down keeps its port but is not Ready.
    let st = wait_for("down TargetUnreachable", Duration::from_secs(20), || {
        let st = status(&v, "down");
        (st["reason"] == "TargetUnreachable").then_some(st)
    });
    assert_eq!(st["phase"], "Pending", "{st}");
    assert!(st["port"].as_u64().is_some(), "{st}");
    assert_eq!(
        condition(&st, "TargetReachable").unwrap()["status"],
        "False"
    );
    // A ticket opens a console once; a replay is refused.
    let url = v.url("vm1");
    let mut c = Client::connect(&url).await;
    assert_eq!(c.read(12).await, b"RFB 003.008\n");
    assert!(
        common::try_banner(&url).await.is_err(),
        "a replay got through"
    );
    drop(c);
    // Deleting a session takes it off the relay and releases its port.
    let port = b["port"].as_u64().unwrap() as u16;
    v.remove_session("vm2");
    wait_for("vm2 released", Duration::from_secs(20), || {
        v.item("vm2").is_none().then_some(())
    });
    wait_for("vm2's port closed", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .is_err()
            .then_some(())
    });
    // The relay still serves vm1.
    assert_eq!(common::rfb_banner(&v.url("vm1")).await, b"RFB 003.008\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_consoles_survive_a_kill_9_of_the_controller_and_a_dead_relay_comes_back() {
    let qemu = Qemu::tcp();
    let mut v = relay_vncd(4);
    v.add_session("vm1", qemu.port);
    v.start();
    let st = v.wait_ready("vm1");
    let port = st["port"].as_u64().unwrap();
    let relay = st["pid"].as_i64().unwrap();
    let mut c = Client::connect(&v.url("vm1")).await;
    assert_eq!(c.read(12).await, b"RFB 003.008\n");
    let (w, h) = c.handshake().await;
    finish_init(&mut c).await;

    v.kill9();
    // The console keeps working with no controller at all.
    frame(&mut c, w, h).await;
    v.start();
    // The restarted controller adopts the relay: same process, same port.
    let again = wait_for(
        "vm1 Ready after the restart",
        Duration::from_secs(20),
        || {
            let st = status(&v, "vm1");
            (st["phase"] == "Ready" && st["reason"] == "ProxyReady").then_some(st)
        },
    );
    assert_eq!(
        again["pid"].as_i64().unwrap(),
        relay,
        "another relay serves"
    );
    assert_eq!(again["port"].as_u64().unwrap(), port);
    assert_eq!(relay_pids(&v.owner()).len(), 1);
    // The console opened before the restart is the same connection, still served.
    let mut c2 = Client::connect(&v.url("vm1")).await;
    assert_eq!(c2.read(12).await, b"RFB 003.008\n");
    drop(c2);

    // The relay dies: vncd starts another, and the session comes back on its port.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(relay as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let back = wait_for("vm1 on a new relay", Duration::from_secs(30), || {
        let st = status(&v, "vm1");
        (st["phase"] == "Ready" && st["pid"].as_i64() != Some(relay)).then_some(st)
    });
    assert_eq!(back["port"].as_u64().unwrap(), port, "{back}");
    assert_eq!(common::rfb_banner(&v.url("vm1")).await, b"RFB 003.008\n");
}

/// Leases by session: (port, lease uid, target).
fn lease_rows(v: &Vncd) -> Vec<(String, u64, String, Value)> {
    let mut rows: Vec<_> = v.leases()["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["session"].as_str().unwrap().to_owned(),
                l["port"].as_u64().unwrap(),
                l["uid"].as_str().unwrap().to_owned(),
                l["target"].clone(),
            )
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_file_is_rebuilt_from_the_relay_and_its_consoles_stay_open() {
    let qemu = Qemu::tcp();
    let mut v = relay_vncd(4);
    v.add_session("vm1", qemu.port);
    v.add_session("vm2", qemu.port);
    v.start();
    let relay = v.wait_ready("vm1")["pid"].as_i64().unwrap();
    v.wait_ready("vm2");
    let before = lease_rows(&v);
    assert_eq!(before.len(), 2, "{before:?}");
    let mut c = Client::connect(&v.url("vm1")).await;
    assert_eq!(c.read(12).await, b"RFB 003.008\n");
    let (w, h) = c.handshake().await;

    // The controller dies and its state file is lost to corruption: the relay alone
    // knows which session holds which port and lease. No session has a process of its
    // own, so the proxies' markers cannot say it.
    v.kill9();
    let leases = v.state.join("leases.json");
    std::fs::write(
        &leases,
        b"{\"version\":1,\"revision\":9,\"leases\":[{\"sess",
    )
    .unwrap();
    let out = v.cmd_here(&["cleanup", "--once", "--rebuild-state"]);
    assert!(
        out.status.success(),
        "cleanup --rebuild-state: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        lease_rows(&v),
        before,
        "the rebuilt leases are not the ones the relay serves"
    );
    // The restarted controller takes the rebuilt leases as they are: same relay, same
    // ports, and the console opened before still exchanges RFB.
    v.start();
    for name in ["vm1", "vm2"] {
        let st = v.wait_ready(name);
        assert_eq!(st["pid"].as_i64(), Some(relay), "{name}: {st}");
    }
    assert_eq!(lease_rows(&v), before);
    c.request_frame(w, h).await;
    assert_eq!(
        c.read(1).await,
        [0],
        "no FramebufferUpdate after the rebuild"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_session_proxies_of_an_earlier_run_are_replaced_by_the_relay() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(6);
    v.extra = vec![
        "--backend".into(),
        "builtin".into(),
        "--per-session-proxies".into(),
    ];
    for n in ["vm1", "vm2", "vm3"] {
        v.add_session(n, qemu.port);
    }
    v.start();
    let mut ports = Vec::new();
    for n in ["vm1", "vm2", "vm3"] {
        ports.push(v.wait_ready(n)["port"].as_u64().unwrap());
    }
    assert_eq!(vncd::supervisor::scan(&v.owner()).len(), 3);
    v.terminate();
    v.extra = vec!["--relay".into(), "--backend".into(), "builtin".into()];
    v.start();
    wait_for(
        "every session on the relay",
        Duration::from_secs(40),
        || {
            let relays = relay_pids(&v.owner());
            let on_relay = ["vm1", "vm2", "vm3"].iter().all(|n| {
                let st = status(&v, n);
                st["phase"] == "Ready"
                    && relays.len() == 1
                    && st["pid"].as_i64() == Some(i64::from(relays[0]))
            });
            on_relay.then_some(())
        },
    );
    for (n, port) in ["vm1", "vm2", "vm3"].iter().zip(&ports) {
        assert_eq!(status(&v, n)["port"].as_u64().unwrap(), *port, "{n} moved");
    }
    wait_for("no per-session proxy left", Duration::from_secs(10), || {
        vncd::supervisor::scan(&v.owner()).is_empty().then_some(())
    });
    assert_eq!(common::rfb_banner(&v.url("vm2")).await, b"RFB 003.008\n");
}

#[test]
fn relay_refuses_what_it_does_not_serve_yet() {
    let mut v = relay_vncd(2);
    v.extra = vec!["--relay".into(), "--backend".into(), "websockify".into()];
    v.start();
    let code = wait_for("vncd to exit", Duration::from_secs(10), || {
        v.child.as_mut().unwrap().try_wait().unwrap()
    });
    assert!(!code.success());
    assert!(
        v.log()
            .contains("--relay does not support --backend websockify yet"),
        "{}",
        v.log()
    );
    v.child = None;
}

/// `--proxy-user` with the relay: the relay, which parses every untrusted client, runs
/// under that uid (never the controller's), owns its directory (02750, the controller's
/// group), serves consoles, and cannot open the master key from which every lease key
/// derives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_runs_as_proxy_user_owns_its_directory_and_cannot_read_the_master_key() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test switches users: run it as root (scripts/test does)"
    );
    let qemu = Qemu::tcp();
    let mut v = relay_vncd(2);
    // The relay reaches its directory through the temp dir, like /var/lib in production.
    std::fs::set_permissions(v.tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    v.extra.extend(["--proxy-user".into(), "nobody".into()]);
    v.add_session("vm1", qemu.port);
    v.start();
    let st = v.wait_ready("vm1");
    assert_eq!(
        common::rfb_banner(&v.console_url(&st)).await,
        b"RFB 003.008\n"
    );
    // `vncd status` counts the relay's sessions as live (it asks the relay, since they
    // have no process of their own).
    let out = v.cmd(&["status", "--json", "--state-dir", v.state.to_str().unwrap()]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&status["active_processes"], &status["dead_proxies"]),
        (&Value::from(1), &Value::from(0)),
        "{status}"
    );
    assert_eq!(status["system_health"], "healthy", "{status}");
    let pid = st["pid"].as_i64().expect("the relay's pid");
    assert_eq!(
        relay_pids(&v.owner()),
        vec![i32::try_from(pid).unwrap()],
        "one relay serves vm1"
    );
    let proc_meta = std::fs::metadata(format!("/proc/{pid}")).unwrap();
    assert_eq!(
        (proc_meta.uid(), proc_meta.gid()),
        (65534, 65534),
        "the relay runs as --proxy-user"
    );
    let dir = std::fs::metadata(v.state.join("relay")).unwrap();
    assert_eq!(
        (dir.uid(), dir.gid(), dir.mode() & 0o7777),
        (65534, 0, 0o2750),
        "STATE/relay: the relay's, with the controller's group"
    );
    // The relay's uid cannot open the master key (vncd-proxy, run as that uid, fails to
    // load it as a key file).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vncd-proxy"))
        .args([
            "--listen",
            "127.0.0.1:1",
            "--target",
            "127.0.0.1:1",
            "--key-file",
        ])
        .arg(v.state.join("ticket.key"))
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot read ticket key file"),
        "the relay's uid could read ticket.key: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_serves_wss_and_a_renewed_certificate_without_ending_open_consoles() {
    let qemu = Qemu::tcp();
    let mut v = relay_vncd(3);
    let (first, cert, key) = common::serve_tls(&mut v);
    v.add_session("vm1", qemu.port);
    v.start();
    let st = v.wait_ready("vm1");
    let url = v.console_url(&st);
    assert!(url.starts_with("wss://127.0.0.1:"), "{url}");
    let mut open = common::wss_open(&url, first.cert.der()).await.unwrap();
    assert_eq!(common::wss_read(&mut open, 12).await, b"RFB 003.008\n");
    // Never plain ws on a TLS port.
    assert!(
        try_banner(&v.url("vm1").replacen("wss://", "ws://", 1))
            .await
            .is_err()
    );

    let second = common::renew_tls(v.tmp.path(), &cert, &key);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while common::wss_open(&v.url("vm1"), second.cert.der())
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay never served the renewed certificate: {}",
            v.relay_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // New connections get the new certificate only.
    assert!(
        common::wss_open(&v.url("vm1"), first.cert.der())
            .await
            .is_err()
    );
    // Loaded in place: the same relay, and the console opened before still talks RFB
    // (its security types answer our version).
    let now = status(&v, "vm1");
    assert_eq!(now["pid"], st["pid"], "the relay was restarted: {now}");
    assert_eq!(now["phase"], "Ready", "{now}");
    open.send(tokio_tungstenite::tungstenite::Message::Binary(
        b"RFB 003.008\n".to_vec().into(),
    ))
    .await
    .unwrap();
    let types = common::wss_read(&mut open, 2).await;
    assert!(types[0] >= 1, "no security types: {types:?}");
}

/// The websocket URL behind a `--web` console URL
/// (`http://H:P/vnc.html?path=websockify%3Ftoken%3DT`).
fn ws_of_web_url(url: &str) -> String {
    let (base, rest) = url
        .split_once("/vnc.html?path=websockify%3Ftoken%3D")
        .unwrap();
    format!(
        "{}/websockify?token={rest}",
        base.replacen("http://", "ws://", 1)
    )
}

/// The HTTP status of an upgrade with `origin`: 101 when it was accepted.
async fn upgrade_status(url: &str, origin: &str) -> u16 {
    use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("Origin", origin.parse().unwrap());
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "binary".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Ok((_ws, resp)) => resp.status().as_u16(),
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("upgrade {url}: {e}"),
    }
}

/// A plain GET on loopback: the status code and body.
async fn http_get(port: u64, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port as u16))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_serves_web_files_enforces_origins_and_follows_new_ones_in_place() {
    let qemu = Qemu::tcp();
    let mut v = relay_vncd(3);
    let web = v.tmp.path().join("novnc");
    std::fs::create_dir_all(&web).unwrap();
    std::fs::write(web.join("vnc.html"), "<title>noVNC stand-in</title>").unwrap();
    let base = v.extra.clone();
    let with_origin = |o: &str| {
        let mut a = base.clone();
        a.extend([
            "--web".into(),
            web.display().to_string(),
            "--origin".into(),
            o.into(),
        ]);
        a
    };
    v.extra = with_origin("http://a.example");
    v.add_session("vm1", qemu.port);
    v.start();
    let st = v.wait_ready("vm1");
    let port = st["port"].as_u64().unwrap();
    let (code, page) = http_get(port, "/vnc.html").await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("noVNC stand-in"), "{page}");
    let (code, body) = http_get(port, "/../../etc/passwd").await;
    assert!(code == 403 || code == 404, "{body}");
    assert!(!body.contains("root:"), "{body}");

    assert_eq!(
        upgrade_status(&ws_of_web_url(&v.url("vm1")), "http://evil.example").await,
        403
    );
    assert_eq!(
        upgrade_status(&ws_of_web_url(&v.url("vm1")), "http://a.example").await,
        101
    );
    let mut open =
        Client::connect_from(&ws_of_web_url(&v.url("vm1")), Some("http://a.example")).await;
    assert_eq!(open.read(12).await, b"RFB 003.008\n");

    // A controller restarted with another origin: the same relay serves it at once, and the
    // console opened before stays open.
    v.terminate();
    v.extra = with_origin("http://b.example");
    v.start();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while upgrade_status(&ws_of_web_url(&v.url("vm1")), "http://b.example").await != 101 {
        assert!(std::time::Instant::now() < deadline, "{}", v.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        upgrade_status(&ws_of_web_url(&v.url("vm1")), "http://a.example").await,
        403
    );
    assert_eq!(
        status(&v, "vm1")["pid"],
        st["pid"],
        "the relay was restarted"
    );
    let (w, h) = open.handshake().await;
    assert!(w > 0 && h > 0);
}

fn url_via_gateway(v: &Vncd, name: &str) -> std::process::Output {
    v.cmd(&[
        "url",
        name,
        "--gateway",
        "--state-dir",
        v.state.to_str().unwrap(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_every_session_by_its_ticket_and_moves_without_dropping_consoles() {
    let qemu = Qemu::tcp();
    let mut v = relay_vncd(4);
    // Without --gateway, `vncd url --gateway` says how to get one.
    v.add_session("vm1", qemu.port);
    v.start();
    v.wait_ready("vm1");
    let out = url_via_gateway(&v, "vm1");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("serves no gateway"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    v.terminate();

    let gw = common::free_port();
    v.extra
        .extend(["--gateway".into(), format!("127.0.0.1:{gw}")]);
    v.add_session("vm2", qemu.port);
    v.start();
    v.wait_ready("vm1");
    v.wait_ready("vm2");
    let mut consoles = Vec::new();
    for name in ["vm1", "vm2"] {
        let out = url_via_gateway(&v, name);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        // The default gateway URL: ws://PUBLIC_HOST:PORT/, with a ticket naming the lease.
        let lease_uid = v.item(name).unwrap()["status"]["leaseUid"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            url.starts_with(&format!("ws://127.0.0.1:{gw}/?token=v2.{lease_uid}.")),
            "{url}"
        );
        let mut c = Client::connect(&url).await;
        assert_eq!(c.read(12).await, b"RFB 003.008\n");
        // Single use, on the gateway as on the session port.
        let again = try_banner(&url).await.unwrap_err();
        assert!(again.contains("403"), "{again}");
        consoles.push(c);
    }
    // The relay serves the gateway because vncd declared it: the relay's argv has none.
    let relays = relay_pids(&v.owner());
    assert_eq!(relays.len(), 1);
    let argv = std::fs::read(format!("/proc/{}/cmdline", relays[0])).unwrap();
    assert!(
        !String::from_utf8_lossy(&argv).contains("gateway"),
        "{}",
        String::from_utf8_lossy(&argv)
    );

    // Restarted with another gateway: the same relay moves it, the consoles stay open.
    v.terminate();
    let gw2 = common::free_port();
    let at = v.extra.iter().position(|a| a == "--gateway").unwrap();
    v.extra[at + 1] = format!("127.0.0.1:{gw2}");
    v.start();
    wait_for("the gateway to move", Duration::from_secs(20), || {
        let out = url_via_gateway(&v, "vm1");
        String::from_utf8_lossy(&out.stdout)
            .starts_with(&format!("ws://127.0.0.1:{gw2}/"))
            .then_some(())
    });
    let url = wait_for("the new gateway to serve", Duration::from_secs(20), || {
        let out = url_via_gateway(&v, "vm2");
        let url = String::from_utf8(out.stdout).ok()?.trim().to_owned();
        std::net::TcpStream::connect(("127.0.0.1", gw2))
            .is_ok()
            .then_some(url)
    });
    assert_eq!(try_banner(&url).await.unwrap(), b"RFB 003.008\n");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", gw)).is_err(),
        "the old gateway still accepts"
    );
    assert_eq!(relay_pids(&v.owner()), relays, "the relay was restarted");
    for mut c in consoles {
        let (w, h) = c.handshake().await;
        finish_init(&mut c).await;
        frame(&mut c, w, h).await;
    }
}

#[test]
fn a_gateway_inside_the_pool_is_refused() {
    let mut v = relay_vncd(2);
    v.extra
        .extend(["--gateway".into(), format!("127.0.0.1:{}", v.range.0)]);
    v.start();
    let code = wait_for("vncd to exit", Duration::from_secs(10), || {
        v.child.as_mut().unwrap().try_wait().unwrap()
    });
    assert!(!code.success());
    assert!(v.log().contains("lies inside the pool"), "{}", v.log());
    v.child = None;
}
