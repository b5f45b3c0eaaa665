//! The standalone mode end to end: the real vncd binary, real websockify, a real QEMU
//! VNC server, and a real websocket client reading the RFB banner through vncd's port.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn port_of(status: &Value) -> u16 {
    status["port"].as_u64().unwrap() as u16
}

fn pid_of(status: &Value) -> i64 {
    status["pid"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_becomes_ready_serves_rfb_and_is_released_on_delete() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(5);
    v.start();
    v.add_session("vm1", qemu.port);
    let st = v.wait_ready("vm1");
    let port = port_of(&st);
    assert!((v.range.0..=v.range.1).contains(&port));
    let url = v.console_url(&st);
    assert!(
        url.starts_with(&format!("ws://127.0.0.1:{port}/?token=")),
        "{url}"
    );
    assert_eq!(st["target"], format!("127.0.0.1:{}", qemu.port));
    assert!(st["allocatedAt"].is_string());
    let mut c = Client::connect(&v.console_url(&st)).await;
    assert_eq!(c.read(12).await, b"RFB 003.008\n");
    let (w, h) = c.handshake().await;
    assert!(w > 0 && h > 0, "ServerInit {w}x{h}");

    // The lease is on disk with pid and start time.
    let leases = v.leases();
    let l = &leases["leases"][0];
    assert_eq!(l["session"], "vm1");
    assert_eq!(l["port"], port);
    assert_eq!(l["process"]["pid"], st["pid"]);
    assert!(l["process"]["startTime"].as_u64().unwrap() > 0);

    let pid = pid_of(&st);
    v.remove_session("vm1");
    wait_for("lease release", Duration::from_secs(10), || {
        v.leases()["leases"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    });
    assert!(
        v.stopped_serving(&st),
        "proxy {pid} still serves port {port} after delete"
    );
    // An intended stop is not reported as a crash.
    assert!(!v.log().contains("proxy exited"), "{}", v.log());
    wait_for("vm1 gone from get", Duration::from_secs(5), || {
        v.item("vm1").is_none().then_some(())
    });
    TcpListener::bind(("127.0.0.1", port)).expect("port free again");
}

#[tokio::test(flavor = "multi_thread")]
async fn proxies_survive_kill_9_of_vncd_and_are_adopted_with_clients_connected() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(5);
    v.start();
    v.add_session("vm1", qemu.port);
    v.add_session("vm2", qemu.port);
    let s1 = v.wait_ready("vm1");
    let s2 = v.wait_ready("vm2");
    let mut c = Client::connect(&v.console_url(&s1)).await;
    assert_eq!(c.read(12).await, b"RFB 003.008\n");

    v.kill9();
    assert!(
        pid_alive(pid_of(&s1)) && pid_alive(pid_of(&s2)),
        "proxies died with vncd"
    );
    assert_eq!(rfb_banner(&v.console_url(&s2)).await, b"RFB 003.008\n");

    v.start();
    // Same ports, same pids: adopted, not restarted.
    std::thread::sleep(Duration::from_millis(1500));
    let a1 = v.wait_ready("vm1");
    let a2 = v.wait_ready("vm2");
    assert_eq!(
        (a1["pid"].clone(), a1["port"].clone()),
        (s1["pid"].clone(), s1["port"].clone())
    );
    assert_eq!(
        (a2["pid"].clone(), a2["port"].clone()),
        (s2["pid"].clone(), s2["port"].clone())
    );
    // The client connected before the crash never noticed.
    let (w, h) = c.handshake().await;
    assert!(w > 0 && h > 0);
    assert!(
        !v.log().contains("started proxy session=vm1 port")
            || v.log().matches("started proxy session=vm1").count() == 1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_proxy_comes_back_on_the_same_port() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(5);
    v.start();
    v.add_session("vm1", qemu.port);
    let st = v.wait_ready("vm1");
    let old = pid_of(&st);
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let new = wait_for("a new proxy", Duration::from_secs(15), || {
        let s = v.item("vm1")?["status"].clone();
        (s["phase"] == "Ready" && s["pid"].as_i64()? != old).then_some(s)
    });
    assert_eq!(new["port"], st["port"]);
    assert_eq!(rfb_banner(&v.console_url(&new)).await, b"RFB 003.008\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_of_an_adopted_session_killed_while_vncd_was_down_is_restarted() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(5);
    v.start();
    v.add_session("vm1", qemu.port);
    let st = v.wait_ready("vm1");
    v.kill9();
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid_of(&st) as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    v.start();
    let new = wait_for("a restarted proxy", Duration::from_secs(15), || {
        let s = v.item("vm1")?["status"].clone();
        (s["phase"] == "Ready" && s["pid"] != st["pid"]).then_some(s)
    });
    assert_eq!(new["port"], st["port"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_held_by_a_foreign_listener_is_skipped_and_reused_once_free() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(4);
    // Small pools allocate lowest first; a foreign program holds the first port.
    let foreign = TcpListener::bind(("127.0.0.1", v.range.0)).unwrap();
    v.start();
    v.add_session("vm1", qemu.port);
    let st = v.wait_ready("vm1");
    assert_eq!(port_of(&st), v.range.0 + 1);
    assert_eq!(rfb_banner(&v.console_url(&st)).await, b"RFB 003.008\n");
    // Never dropped from the pool for good: once free, it is leased again.
    drop(foreign);
    std::thread::sleep(Duration::from_secs(11)); // the busy mark expires after 10 s
    v.add_session("vm2", qemu.port);
    let st2 = v.wait_ready("vm2");
    assert_eq!(port_of(&st2), v.range.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_exhaustion_is_reported_and_heals_when_a_port_frees() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(2);
    v.start();
    for n in ["a", "b"] {
        v.add_session(n, qemu.port);
        v.wait_ready(n);
    }
    v.add_session("c", qemu.port);
    let st = v.wait_status("c", "Pending", Duration::from_secs(10));
    wait_for("PoolExhausted", Duration::from_secs(5), || {
        (v.item("c")?["status"]["reason"] == "PoolExhausted").then_some(())
    });
    assert!(st["port"].is_null());
    // The others are unaffected.
    assert_eq!(v.item("a").unwrap()["status"]["phase"], "Ready");
    v.remove_session("a");
    let st = v.wait_ready("c");
    assert_eq!(rfb_banner(&v.console_url(&st)).await, b"RFB 003.008\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_manifests_are_reported_and_disturb_nothing() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(5);
    v.start();
    v.add_session("good", qemu.port);
    let good = v.wait_ready("good");
    let m = manifest("x", qemu.port.into());
    v.write_manifest("notyaml.yaml", "{{{ not: [yaml");
    v.write_manifest(
        "notarget.yaml",
        &m.replace("x\n", "notarget\n")
            .replace("  target:\n    host: 127.0.0.1\n", "  target:\n"),
    );
    v.write_manifest("badport.yaml", &manifest("badport", 70000));
    v.write_manifest(
        "outofpool.yaml",
        &format!("{}  port: 80\n", manifest("outofpool", qemu.port.into())),
    );
    v.write_manifest(
        "badhost.yaml",
        &manifest("badhost", 1).replace("127.0.0.1", "\"a;reboot\""),
    );
    v.write_manifest("dup.yaml", &manifest("good", u32::from(qemu.port) + 1));
    v.write_manifest(
        "kind.yaml",
        &m.replace("VncSession", "Pod").replace("x\n", "kind\n"),
    );
    v.write_manifest("huge.yaml", &format!("{m}# {}\n", "x".repeat(200_000)));
    v.write_manifest("bin.yaml", "\u{0}\u{1}\u{2}garbage");
    std::os::unix::fs::symlink("/etc/hostname", v.sessions.join("link.yaml")).unwrap();

    let expect = [
        ("notyaml", "not valid YAML"),
        ("notarget", "spec.target"),
        ("badport", "70000"),
        ("outofpool", "outside the port pool"),
        ("badhost", "a;reboot"),
        ("kind", "kind \"Pod\""),
        ("huge", "bytes; the limit"),
        ("bin", "not"),
        ("link", "symbolic link"),
    ];
    for (name, needle) in expect {
        let st = wait_for(
            &format!("rejection of {name}"),
            Duration::from_secs(10),
            || {
                let i = v.item(name)?;
                (i["status"]["phase"] == "Failed").then(|| i["status"].clone())
            },
        );
        assert_eq!(st["reason"], "InvalidManifest", "{name}: {st}");
        let msg = st["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{name}: {msg:?} lacks {needle:?}");
    }
    // The duplicate is reported on the session it collided with; the session is untouched.
    let g = wait_for("duplicate warning", Duration::from_secs(5), || {
        let s = v.item("good")?["status"].clone();
        s["message"]
            .as_str()?
            .contains("duplicate name")
            .then_some(s)
    });
    assert_eq!(g["phase"], "Ready");
    assert_eq!(g["pid"], good["pid"]);
    assert_eq!(g["target"], format!("127.0.0.1:{}", qemu.port));
    assert_eq!(rfb_banner(&v.console_url(&g)).await, b"RFB 003.008\n");
    // vncd is still running, and `vncd get` in table form shows them all.
    assert!(v.child.as_mut().unwrap().try_wait().unwrap().is_none());
    let out = v.cmd(&["get", "--state-dir", v.state.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&out.stdout);
    for (name, _) in expect {
        assert!(table.contains(name), "{name} missing from table:\n{table}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_that_turns_invalid_keeps_its_console() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    v.start();
    v.add_session("vm1", qemu.port);
    let st = v.wait_ready("vm1");
    v.write_manifest(
        "vm1.yaml",
        &manifest("vm1", qemu.port.into()).replace("port: ", "port: nope"),
    );
    let now = wait_for("warning", Duration::from_secs(5), || {
        let s = v.item("vm1")?["status"].clone();
        s["message"]
            .as_str()?
            .contains("still serving")
            .then_some(s)
    });
    assert_eq!(now["pid"], st["pid"]);
    assert_eq!(now["phase"], "Ready");
}

#[test]
fn a_second_vncd_on_the_same_state_dir_refuses_clearly() {
    let mut v = Vncd::new(3);
    v.start();
    wait_for("first vncd to lock", Duration::from_secs(5), || {
        v.state.join("vncd.lock").exists().then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut args = vec!["run", "--lock-timeout", "0.3"];
    let base = v.base_args();
    args.extend(base.iter().map(String::as_str));
    let out = v.cmd(&args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vncd.lock") && err.contains("another"),
        "{err}"
    );
    let pid = v.child.as_ref().unwrap().id();
    assert!(err.contains(&format!("pid {pid}")), "{err}");
}

#[test]
fn a_corrupt_state_file_is_refused_and_left_untouched() {
    let mut v = Vncd::new(3);
    std::fs::create_dir_all(&v.state).unwrap();
    let junk = b"{\"version\":1,\"revision\":3,\"leases\":[{\"session\":\"vm1\",\"po";
    std::fs::write(v.state.join("leases.json"), junk).unwrap();
    v.start();
    let status = v.child.as_mut().unwrap().wait().unwrap();
    v.child = None;
    assert!(!status.success());
    let log = v.log();
    assert!(
        log.contains("leases.json") && log.contains("corrupt"),
        "{log}"
    );
    assert_eq!(std::fs::read(v.state.join("leases.json")).unwrap(), junk);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_state_file_can_be_rebuilt_from_proven_proxies() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    v.start();
    v.add_session("vm1", qemu.port);
    let st = v.wait_ready("vm1");
    v.kill9();
    let revision = v.leases()["revision"].as_u64().unwrap();
    // A torn write: the revision is still readable, the rest is not.
    std::fs::write(
        v.state.join("leases.json"),
        format!("{{\"version\":1,\"revision\":{revision},\"leases\":[{{\"sess"),
    )
    .unwrap();
    let out = v.cmd_here(&["cleanup", "--once", "--rebuild-state"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leases = v.leases();
    assert_eq!(
        leases["revision"].as_u64(),
        Some(revision + 1),
        "the rebuilt file continues the revision: {leases}"
    );
    assert_eq!(leases["leases"][0]["session"], "vm1");
    assert_eq!(leases["leases"][0]["port"], st["port"]);
    assert_eq!(leases["leases"][0]["process"]["pid"], st["pid"]);
    let kept: Vec<_> = std::fs::read_dir(&v.state)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("leases.json.corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "the corrupt file is kept as evidence");
    v.start();
    let again = v.wait_ready("vm1");
    assert_eq!(again["pid"], st["pid"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn cleanup_ends_our_orphans_releases_stale_leases_and_spares_foreign_processes() {
    require("websockify");
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(6);
    v.start();
    v.add_session("keep", qemu.port);
    v.add_session("gone", qemu.port);
    let keep = v.wait_ready("keep");
    let gone = v.wait_ready("gone");
    v.kill9();
    // The session "gone" is deleted and its proxy died while no vncd ran: a stale lease.
    v.remove_session("gone");
    let sessions = |v: &Vncd| -> Vec<String> {
        v.leases()["leases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["session"].as_str().unwrap().to_owned())
            .collect()
    };
    if v.on_relay() {
        // The relay still serves "gone": cleanup leaves it (and the relay) to `vncd run`.
        let out = v.cmd_here(&["cleanup", "--once"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(pid_alive(pid_of(&keep)), "cleanup stopped the relay");
        assert_eq!(
            sessions(&v),
            ["gone", "keep"],
            "a served lease was released"
        );
        // What makes "gone" stale on the relay: the relay died too.
    }
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid_of(&gone) as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // An orphan of ours: a proxy with our marker but no lease.
    let orphan_port = v.range.1;
    let mut orphan = std::process::Command::new("websockify")
        .arg(format!("127.0.0.1:{orphan_port}"))
        .arg(format!("127.0.0.1:{}", qemu.port))
        .env(vncd::supervisor::marker::OWNER, v.owner())
        .env(vncd::supervisor::marker::SESSION, "ghost")
        .env(vncd::supervisor::marker::LEASE, "deadbeef")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // A foreign websockify with no marker: never to be touched.
    let foreign_port = free_port();
    let mut foreign = std::process::Command::new("websockify")
        .arg(format!("127.0.0.1:{foreign_port}"))
        .arg(format!("127.0.0.1:{}", qemu.port))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("orphan to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", orphan_port)).ok()
    });

    let out = v.cmd_here(&["cleanup", "--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = wait_for("orphan to end", Duration::from_secs(5), || {
        orphan.try_wait().unwrap()
    });
    assert!(!status.success() || status.code().is_some());
    assert!(
        foreign.try_wait().unwrap().is_none(),
        "cleanup touched a foreign websockify"
    );
    assert_eq!(
        sessions(&v),
        ["keep"],
        "stale lease released, live one kept"
    );
    if !v.on_relay() {
        assert!(pid_alive(pid_of(&keep)), "cleanup stopped a wanted proxy");
    }
    let _ = foreign.kill();
    let _ = foreign.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_on_exit_ends_every_proxy_and_releases_every_port() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    v.extra.push("--stop-on-exit".into());
    v.start();
    v.add_session("vm1", qemu.port);
    let st = v.wait_ready("vm1");
    let status = v.terminate();
    assert!(status.success());
    assert!(v.stopped_serving(&st));
    assert!(v.leases()["leases"].as_array().unwrap().is_empty());
    // The relay it started ends too: nothing of vncd's keeps running.
    wait_for("the relay to end", Duration::from_secs(10), || {
        relay_pids(&v.owner()).is_empty().then_some(())
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn by_default_sigterm_leaves_consoles_running() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    v.start();
    v.add_session("vm1", qemu.port);
    let st = v.wait_ready("vm1");
    assert!(v.terminate().success());
    assert!(pid_alive(pid_of(&st)));
    assert_eq!(rfb_banner(&v.console_url(&st)).await, b"RFB 003.008\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_wait_prints_the_url_and_delete_wait_returns_after_release() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    v.start();
    let file = v.tmp.path().join("vm9.yaml");
    std::fs::write(
        &file,
        format!(
            "{}  port: {}\n",
            manifest("vm9", qemu.port.into()),
            v.range.1
        ),
    )
    .unwrap();
    let out = v.cmd_here(&[
        "apply",
        "-f",
        file.to_str().unwrap(),
        "--wait",
        "--timeout",
        "20",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("ws://127.0.0.1:{}/", v.range.1)),
        "{stdout}"
    );
    // A fresh console URL with its ticket, which opens the console once.
    let url = stdout.lines().last().unwrap().trim().to_owned();
    assert!(url.contains("?token=v1."), "{url}");
    assert_eq!(rfb_banner(&url).await, b"RFB 003.008\n");
    assert!(
        try_banner(&url).await.is_err(),
        "the ticket of apply --wait opened twice"
    );
    let st9 = v.item("vm9").unwrap()["status"].clone();
    let out = v.cmd(&[
        "delete",
        "vm9",
        "--wait",
        "--sessions-dir",
        v.sessions.to_str().unwrap(),
        "--state-dir",
        v.state.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(v.leases()["leases"].as_array().unwrap().is_empty());
    assert!(v.stopped_serving(&st9));
    // A manifest apply refuses never reaches the directory.
    std::fs::write(&file, manifest("vm9", 0)).unwrap();
    let out = v.cmd_here(&["apply", "-f", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.target.port 0"));
    assert!(!v.sessions.join("vm9.yaml").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_unix_socket_target_is_served() {
    let tmp = tempfile::tempdir().unwrap();
    let qemu = Qemu::unix(&tmp.path().join("vnc.sock"));
    let mut v = Vncd::new(3);
    v.start();
    v.write_manifest(
        "u.yaml",
        &format!(
            "apiVersion: vncd.io/v1alpha1\nkind: VncSession\nmetadata: {{name: u}}\nspec:\n  target: {{unixSocket: {}}}\n",
            qemu.socket.as_ref().unwrap().display()
        ),
    );
    let st = v.wait_ready("u");
    assert_eq!(rfb_banner(&v.console_url(&st)).await, b"RFB 003.008\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_that_cannot_start_is_reported_and_retried_without_leaking() {
    let mut v = Vncd::new(3);
    let fake = v.tmp.path().join("broken-proxy");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'cannot open display: simulated failure' >&2\nexit 3\n",
    )
    .unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&fake).unwrap().permissions(),
        0o755,
    );
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    v.extra.extend(["--backend".into(), "websockify".into()]);
    v.extra
        .extend(["--websockify".into(), fake.display().to_string()]);
    v.start();
    v.add_session("vm1", 5999);
    let st = v.wait_status("vm1", "Failed", Duration::from_secs(15));
    let msg = st["message"].as_str().unwrap();
    assert!(
        msg.contains("simulated failure") && msg.contains("restarting in"),
        "{msg}"
    );
    // Deleting it releases its port even though its proxy never ran.
    v.remove_session("vm1");
    wait_for("release", Duration::from_secs(10), || {
        v.leases()["leases"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    });
}

#[test]
fn status_reports_the_pool_like_the_seed() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(10);
    v.start();
    v.add_session("vm1", qemu.port);
    v.wait_ready("vm1");
    let range = v.range_arg();
    let out = v.cmd(&[
        "status",
        "--json",
        "--state-dir",
        v.state.to_str().unwrap(),
        "--port-range",
        &range,
    ]);
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["port_pool"]["total_ports"], 10);
    assert_eq!(s["port_pool"]["allocated_ports"], 1);
    assert_eq!(s["port_pool"]["free_ports"], 9);
    assert_eq!(s["port_pool"]["utilization_percent"], 10.0);
    assert_eq!(s["active_processes"], 1);
    assert_eq!(s["system_health"], "healthy");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_console_ticket_opens_one_connection_and_nothing_else_does() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    v.start();
    v.add_session("vm1", qemu.port);
    let st = v.wait_ready("vm1");
    // Status, `vncd get` and sessions.json show the base URL, which carries no credential.
    let base = st["url"].as_str().unwrap().to_owned();
    assert_eq!(base, format!("ws://127.0.0.1:{}/", st["port"]));
    let url = v.url("vm1");
    let (prefix, ticket) = url.split_once("?token=").unwrap();
    assert_eq!(prefix, base);
    assert!(ticket.starts_with("v1."), "{ticket}");
    // The ticket works once; its replay is refused, also while the first connection is
    // open, and that first connection is not disturbed.
    let mut first = Client::connect(&url).await;
    assert_eq!(first.read(12).await, b"RFB 003.008\n");
    let replay = try_banner(&url).await;
    assert!(replay.is_err(), "a replayed ticket was let through");
    let (w, h) = first.handshake().await;
    assert!(w > 0 && h > 0);
    // The base URL, a made-up ticket and an altered one open nothing.
    let fresh = v.url("vm1");
    let fresh_ticket = fresh.split_once("?token=").unwrap().1.to_owned();
    let mut altered = fresh_ticket.clone().into_bytes();
    let last = altered.len() - 2;
    altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
    for bad in [
        base.clone(),
        format!("{base}?token=wrong"),
        format!("{base}?token={}", String::from_utf8(altered).unwrap()),
        format!("{base}?token={}", &fresh_ticket[..fresh_ticket.len() - 1]),
    ] {
        let got = try_banner(&bad).await;
        assert!(got.is_err(), "{bad} was let through: {got:?}");
    }
    // None of that spent the fresh ticket.
    assert_eq!(try_banner(&fresh).await.unwrap(), b"RFB 003.008\n");
    // Tickets never reach vncd's log; the key files are private.
    assert!(!v.log().contains(ticket) && !v.log().contains(&fresh_ticket));
    use std::os::unix::fs::PermissionsExt;
    // The relay holds lease keys in memory only; a per-session proxy gets a key file.
    let keys: &[&str] = if v.on_relay() { &[] } else { &["keys/vm1.key"] };
    for f in ["leases.json", "sessions.json", "ticket.key"]
        .iter()
        .chain(keys)
    {
        let mode = std::fs::metadata(v.state.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} is readable by others: {mode:o}");
    }
    // A session that does not exist gets a clear error, not a URL.
    let out = v.cmd(&["url", "nope", "--state-dir", v.state.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"nope\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = v.cmd(&[
        "url",
        "vm1",
        "--view-only",
        "--state-dir",
        v.state.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not supported yet"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_ticket_is_refused_but_a_connection_opened_before_stays_up() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    v.extra = vec!["--ticket-ttl".into(), "2".into()];
    v.start();
    v.add_session("vm1", qemu.port);
    v.wait_ready("vm1");
    let used = v.url("vm1");
    let unused = v.url("vm1");
    let mut open = Client::connect(&used).await;
    assert_eq!(open.read(12).await, b"RFB 003.008\n");
    // Past the TTL (2 s, recorded in config.json for `vncd url`) and one more second.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let got = try_banner(&unused).await;
    assert!(got.is_err(), "an expired ticket was let through: {got:?}");
    // The connection opened in time still works: the VNC handshake completes now.
    let (w, h) = open.handshake().await;
    assert!(
        w > 0 && h > 0,
        "ServerInit {w}x{h} after the ticket expired"
    );
    // A longer TTL asked for explicitly is honoured.
    let out = v.cmd(&[
        "url",
        "vm1",
        "--ttl",
        "30",
        "--json",
        "--state-dir",
        v.state.to_str().unwrap(),
    ]);
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    let expires = j["expiresAt"]
        .as_str()
        .unwrap()
        .parse::<jiff::Timestamp>()
        .unwrap();
    let left = expires.as_second() - jiff::Timestamp::now().as_second();
    assert!((28..=31).contains(&left), "{j}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        try_banner(j["url"].as_str().unwrap()).await.unwrap(),
        b"RFB 003.008\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_session_expires_and_stays_expired_until_its_spec_changes() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(4);
    v.start();
    let idle = |secs: u32| {
        format!(
            "{}  idleTimeoutSeconds: {secs}\n",
            manifest("idle", qemu.port.into())
        )
    };
    v.write_manifest("idle.yaml", &idle(2));
    v.write_manifest(
        "busy.yaml",
        &format!(
            "{}  idleTimeoutSeconds: 2\n",
            manifest("busy", qemu.port.into())
        ),
    );
    let st = v.wait_ready("idle");
    let busy = v.wait_ready("busy");
    // A client keeps "busy" alive past its idle timeout.
    let mut c = Client::connect(&v.console_url(&busy)).await;
    assert_eq!(c.read(12).await, b"RFB 003.008\n");
    let ex = v.wait_status("idle", "Expired", Duration::from_secs(10));
    assert_eq!(ex["reason"], "IdleTimeout");
    assert!(ex["port"].is_null() && ex["url"].is_null(), "{ex}");
    assert!(v.stopped_serving(&st));
    wait_for("idle lease released", Duration::from_secs(5), || {
        let l = v.leases();
        (!l["leases"]
            .as_array()?
            .iter()
            .any(|l| l["session"] == "idle"))
        .then_some(())
    });
    assert_eq!(v.item("busy").unwrap()["status"]["phase"], "Ready");
    let (w, _) = c.handshake().await;
    assert!(w > 0);
    // Still expired a while later: the manifest is present but unchanged.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(v.item("idle").unwrap()["status"]["phase"], "Expired");
    // A spec change brings it back.
    v.write_manifest("idle.yaml", &idle(60));
    let back = v.wait_ready("idle");
    assert_eq!(rfb_banner(&v.console_url(&back)).await, b"RFB 003.008\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn max_lifetime_ends_a_session_even_with_a_live_client() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    v.start();
    v.write_manifest(
        "vm1.yaml",
        &format!(
            "{}  maxLifetimeSeconds: 10\n",
            manifest("vm1", qemu.port.into())
        ),
    );
    let st = v.wait_ready("vm1");
    let mut c = Client::connect(&v.console_url(&st)).await;
    assert_eq!(c.read(12).await, b"RFB 003.008\n");
    let ex = v.wait_status("vm1", "Expired", Duration::from_secs(25));
    assert_eq!(ex["reason"], "MaxLifetime");
    // The live connection was cut.
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match futures::StreamExt::next(&mut c.ws).await {
                None | Some(Err(_)) => break,
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        cut.is_ok(),
        "the client stayed connected after the lifetime ended"
    );
    assert!(v.stopped_serving(&st));
    assert!(v.leases()["leases"].as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_serves_wss_with_a_self_signed_certificate() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    let (ck, _, _) = serve_tls(&mut v);
    v.start();
    v.add_session("vm1", qemu.port);
    let st = v.wait_ready("vm1");
    let url = v.console_url(&st);
    assert!(url.starts_with("wss://127.0.0.1:"), "{url}");
    assert_eq!(wss_banner(&url, ck.cert.der()).await, b"RFB 003.008\n");
    // Plain ws on the TLS port gets no console.
    assert!(
        try_banner(&url.replacen("wss://", "ws://", 1))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_target_rules_refuse_other_targets_and_are_checked_again_on_restart() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(5);
    v.extra = vec!["--allow-target".into(), format!("127.0.0.1:{}", qemu.port)];
    v.start();
    v.add_session("allowed", qemu.port);
    // Port 22 on loopback: not the VNC server the rule names.
    v.add_session("ssh", 22);
    v.wait_ready("allowed");
    let st = v.wait_status("ssh", "Failed", Duration::from_secs(20));
    assert_eq!(st["reason"], "TargetNotAllowed", "{st}");
    assert!(st["port"].is_null() && st["pid"].is_null(), "{st}");
    let msg = st["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("127.0.0.1:22") && msg.contains(&format!("127.0.0.1/32:{}", qemu.port)),
        "{msg}"
    );
    let leases = v.leases();
    assert_eq!(leases["leases"].as_array().unwrap().len(), 1, "{leases}");

    // The rules are checked again: without them (vncd run then allows every target),
    // the same manifest is served.
    v.terminate();
    v.extra.clear();
    v.start();
    wait_for(
        "the once refused session leased",
        Duration::from_secs(20),
        || {
            v.leases()["leases"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["session"] == "ssh")
                .then_some(())
        },
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_url_from_before_a_retarget_does_not_open_the_new_target() {
    let first = Qemu::tcp();
    let second = Qemu::tcp();
    let mut v = Vncd::new(3);
    v.start();
    v.add_session("vm1", first.port);
    let before = v.wait_ready("vm1");
    let allocated = v.leases()["leases"][0]["allocatedAt"].clone();
    let old_url = v.console_url(&before);
    let unused_old = v.console_url(&before);
    assert_eq!(rfb_banner(&old_url).await, b"RFB 003.008\n");
    v.add_session("vm1", second.port);
    let after = wait_for(
        "vm1 served at its new target",
        Duration::from_secs(20),
        || {
            let s = v.item("vm1")?["status"].clone();
            (s["phase"] == "Ready" && s["target"] == format!("127.0.0.1:{}", second.port))
                .then_some(s)
        },
    );
    assert_eq!(after["port"], before["port"], "a retarget keeps its port");
    let new_url = v.console_url(&after);
    assert_ne!(new_url, old_url);
    assert!(
        try_banner(&old_url).await.is_err(),
        "the URL from before the retarget opened the new target"
    );
    // Also a ticket minted before the retarget and never used: it names the old lease.
    assert!(
        try_banner(&unused_old).await.is_err(),
        "an unused ticket from before the retarget opened the new target"
    );
    assert_eq!(rfb_banner(&new_url).await, b"RFB 003.008\n");
    // The same lease age: a retarget does not extend maxLifetimeSeconds.
    let leases = v.leases();
    let l = &leases["leases"][0];
    assert_eq!(l["allocatedAt"], allocated, "{leases}");
}

// ---------------------------------------------------------------- hardening (issue #11)

/// The real uid of a process, from /proc/PID/status.
fn uid_of(pid: i64) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Whether uid/gid 65534 (nobody, with no supplementary groups: what the proxy has) can
/// read `path`.
fn nobody_can_read(path: &std::path::Path) -> bool {
    use std::os::unix::process::CommandExt;
    std::process::Command::new("cat")
        .arg(path)
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread")]
async fn proxies_run_as_the_proxy_user_and_cannot_read_the_state() {
    proxy_user_case("builtin").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn websockify_proxies_run_as_the_proxy_user_too() {
    require("websockify");
    proxy_user_case("websockify").await;
}

/// `--proxy-user nobody` with `backend`: the proxy runs as uid 65534, serves, and cannot
/// read vncd's state; a restarted proxy too.
async fn proxy_user_case(backend: &str) {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let builtin = backend == "builtin";
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    // The proxy reaches its files through the temp dir, like /var/lib in production.
    std::fs::set_permissions(v.tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    v.extra.extend([
        "--backend".into(),
        backend.into(),
        "--proxy-user".into(),
        "nobody".into(),
    ]);
    if builtin {
        // A proxy process per session; the relay run as --proxy-user is
        // tests/relay_run.rs the_relay_runs_as_proxy_user_owns_its_directory_and_cannot_read_the_master_key.
        v.extra.push("--per-session-proxies".into());
    }
    v.start();
    v.add_session("vm1", qemu.port);
    let st = v.wait_ready("vm1");
    let pid = pid_of(&st);
    assert_eq!(uid_of(pid), Some(65534), "the proxy does not run as nobody");
    // It serves, with its token.
    let mut c = Client::connect(&v.console_url(&st)).await;
    assert_eq!(c.read(12).await, b"RFB 003.008\n");
    let (w, _) = c.handshake().await;
    assert!(w > 0);
    // Its identity cannot read vncd's state. The builtin proxy got its token file as an
    // open stdin, so cannot read even that; websockify re-reads it, so owns it.
    for f in ["leases.json", "sessions.json", "logs/vm1.log"] {
        let p = v.state.join(f);
        assert!(p.exists(), "{f} missing");
        assert!(!nobody_can_read(&p), "the proxy user can read {f}");
    }
    let token_file = v.state.join("keys/vm1.key");
    assert_eq!(nobody_can_read(&token_file), !builtin, "{backend} key file");
    // Neither can read the master key, from which every lease key derives.
    assert!(!nobody_can_read(&v.state.join("ticket.key")));
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Its log and (builtin) stats files still work.
    let log = std::fs::read_to_string(v.state.join("logs/vm1.log")).unwrap();
    assert!(!log.trim().is_empty(), "empty proxy log");
    if builtin {
        assert!(log.contains("proxy listening"), "{log}");
        wait_for("stats of the proxy", Duration::from_secs(10), || {
            let text = std::fs::read_to_string(v.state.join("stats/vm1.json")).ok()?;
            let s: Value = serde_json::from_str(&text).ok()?;
            (s["pid"] == pid && s["active"] == 1).then_some(())
        });
    }
    // A restart of the proxy works the same way.
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let back = wait_for("a new proxy", Duration::from_secs(20), || {
        let st = v.item("vm1")?["status"].clone();
        (st["phase"] == "Ready" && st["pid"] != pid).then_some(st)
    });
    assert_eq!(uid_of(pid_of(&back)), Some(65534));
    assert_eq!(rfb_banner(&v.console_url(&back)).await, b"RFB 003.008\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn websockify_log_lines_reach_statuses_without_tokens_and_list_no_directories() {
    require("websockify");
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    let web = v.tmp.path().join("web");
    std::fs::create_dir_all(web.join("sub")).unwrap();
    std::fs::write(web.join("vnc.html"), "<html>noVNC</html>").unwrap();
    std::fs::write(web.join("sub/hidden.txt"), "x").unwrap();
    v.extra.extend([
        "--backend".into(),
        "websockify".into(),
        "--web".into(),
        web.display().to_string(),
    ]);
    v.start();
    v.add_session("vm1", qemu.port);
    let mut st = v.wait_ready("vm1");
    let port = port_of(&st);
    let get = |path: String| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let upgrade = |path: String| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_millis(500), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    // --file-only: no directory listing, where this websockify knows the option (0.11+);
    // an older one (Debian 12 has 0.10) lists directories, and vncd says so at start.
    let help = std::process::Command::new("websockify")
        .arg("--help")
        .output()
        .unwrap();
    let listing = get("/sub/".into()).await;
    if String::from_utf8_lossy(&help.stdout).contains("--file-only") {
        assert!(
            !listing.contains("hidden.txt"),
            "directory listed: {listing}"
        );
    } else {
        assert!(
            v.log().contains("this websockify has no --file-only"),
            "no warning about directory listings"
        );
    }
    // websockify logs the request lines of accepted upgrades, ticket and all; then its
    // proxy dies (vncd backs off and says why, quoting the log).
    let log_path = v.state.join("logs/vm1.log");
    let mut tickets = Vec::new();
    let mut message = None;
    for _ in 0..6 {
        let url = v.url("vm1");
        // With --web the URL opens noVNC, which is told the ticket in `path`.
        let token = url.split_once("token%3D").unwrap().1.to_owned();
        let _ = upgrade(format!("/websockify?token={token}")).await;
        wait_for(
            "the ticket in the proxy's own log",
            Duration::from_secs(5),
            || {
                let log = std::fs::read_to_string(&log_path).ok()?;
                log.contains(&token).then_some(())
            },
        );
        tickets.push(token);
        let pid = pid_of(&st);
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        // The exit shows in the status while vncd waits out its backoff before the
        // restart, which grows with each quick death: kill until it is seen.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while message.is_none() && std::time::Instant::now() < until {
            message = v
                .item("vm1")
                .and_then(|i| i["status"]["message"].as_str().map(str::to_owned))
                .filter(|m| m.contains("exited"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if message.is_some() {
            break;
        }
        st = wait_for("a new proxy", Duration::from_secs(20), || {
            let st = v.item("vm1")?["status"].clone();
            (st["phase"] == "Ready" && st["pid"] != pid).then_some(st)
        });
    }
    let message = message.expect("a proxy exit reported in the status");
    let sessions = std::fs::read_to_string(v.state.join("sessions.json")).unwrap();
    for token in &tickets {
        assert!(
            !message.contains(token),
            "ticket in the status message: {message}"
        );
        for line in sessions.lines().filter(|l| l.contains("message")) {
            assert!(!line.contains(token), "ticket in sessions.json: {line}");
        }
        assert!(!v.log().contains(token), "ticket in vncd's log");
    }
    // The quoted log line may be a request line: its ticket is replaced.
    if message.contains("token=") || message.contains("token%3D") {
        assert!(message.contains("<redacted>"), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_without_the_token_do_not_keep_a_session_from_expiring() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    v.extra.extend(["--backend".into(), "builtin".into()]);
    v.start();
    v.write_manifest(
        "idle.yaml",
        &format!(
            "{}  idleTimeoutSeconds: 3\n",
            manifest("idle", qemu.port.into())
        ),
    );
    let st = v.wait_ready("idle");
    let port = port_of(&st);
    // Three connections at all times that never pass the token check: they drip a
    // request head byte by byte, and reconnect as soon as the proxy drops them.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut drippers = Vec::new();
    for _ in 0..3 {
        let stop = stop.clone();
        drippers.push(tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                for b in b"GET /?token=wrong HTTP/1.1\r\nX-Drip: ".iter().cycle() {
                    if stop.load(std::sync::atomic::Ordering::Relaxed)
                        || s.write_all(&[*b]).await.is_err()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }));
    }
    // Idle means no authenticated client: it expires on time despite the connections.
    let expired = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        v.wait_status("idle", "Expired", Duration::from_secs(12))
    }));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for d in drippers {
        let _ = d.await;
    }
    let ex = expired.unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert_eq!(ex["reason"], "IdleTimeout");
}

/// Runs `vncd run` on `state` and expects it to refuse at once: returns its stderr.
/// A vncd that does not exit within 10 s is killed (by pid) and the test fails.
fn run_refused(v: &Vncd, state: &std::path::Path) -> String {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vncd"))
        .args([
            "run",
            "--sessions-dir",
            v.sessions.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--port-range",
            &v.range_arg(),
            "--listen-address",
            "127.0.0.1",
        ])
        .env("VNCD_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    use std::io::Read;
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    let status = status.unwrap_or_else(|| panic!("vncd ran on {}: {err}", state.display()));
    assert!(!status.success(), "{err}");
    err
}

#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_state_directory_is_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let qemu = Qemu::tcp();
    let v = Vncd::new(2);
    v.add_session("vm1", qemu.port);
    let outside = v.tmp.path().join("outside.txt");
    std::fs::write(&outside, "precious").unwrap();
    let fresh = |name: &str| {
        let d = v.tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        d
    };
    // World-writable (like a directory someone made in /tmp first).
    let open = fresh("open");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = run_refused(&v, &open);
    assert!(
        err.contains(&format!("chmod 700 {}", open.display())),
        "{err}"
    );
    // Group-writable keys/.
    let group = fresh("group");
    std::fs::create_dir(group.join("keys")).unwrap();
    std::fs::set_permissions(group.join("keys"), std::fs::Permissions::from_mode(0o770)).unwrap();
    let err = run_refused(&v, &group);
    assert!(err.contains("keys directory"), "{err}");
    // logs/ a symlink to somewhere else.
    let linked = fresh("linked");
    std::os::unix::fs::symlink(v.tmp.path(), linked.join("logs")).unwrap();
    let err = run_refused(&v, &linked);
    assert!(err.contains("logs directory"), "{err}");
    // leases.json a symlink to a file of someone else's: never read through.
    let planted = fresh("planted");
    std::os::unix::fs::symlink(&outside, planted.join("leases.json")).unwrap();
    let err = run_refused(&v, &planted);
    assert!(err.contains("leases.json"), "{err}");
    if nix::unistd::Uid::effective().is_root() {
        // Owned by another user.
        let theirs = fresh("theirs");
        nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let err = run_refused(&v, &theirs);
        assert!(
            err.contains(&format!("chown 0 {}", theirs.display())),
            "{err}"
        );
    }
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "precious");
    // Nothing was started or written for any of them.
    for d in ["open", "group", "linked", "theirs"] {
        assert!(!v.tmp.path().join(d).join("leases.json").exists(), "{d}");
    }
    // A state directory vncd creates itself (the README's /tmp/vncd-state) is 0700.
    let mut v2 = Vncd::new(2);
    v2.state = v2.tmp.path().join("made-by-vncd");
    v2.start();
    v2.add_session("vm1", qemu.port);
    v2.wait_ready("vm1");
    let mode = std::fs::metadata(&v2.state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

/// (ppid, state, pgid) of a process, from /proc/PID/stat.
fn ppid_state_pgid(pid: i32) -> Option<(i32, char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f[1].parse().ok()?, f[0].chars().next()?, f[2].parse().ok()?))
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn orphaned_proxy_children_come_to_vncd_and_are_reaped() {
    use std::os::unix::fs::PermissionsExt;
    require("websockify");
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    // A websockify that leaves a child of its own behind (as a forked per-client handler
    // can): a sleep in its process group, carrying its marker.
    let fake = v.tmp.path().join("websockify-with-child");
    // It ignores SIGTERM, so it outlives vncd's first attempt to end it by the stop grace.
    std::fs::write(
        &fake,
        "#!/bin/sh\n(trap '' TERM; exec sleep 120) &\nexec websockify \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    v.extra.extend([
        "--backend".into(),
        "websockify".into(),
        "--websockify".into(),
        fake.display().to_string(),
    ]);
    v.start();
    let vncd_pid = v.child.as_ref().unwrap().id() as i32;
    v.add_session("vm1", qemu.port);
    let st = v.wait_ready("vm1");
    let leader = pid_of(&st) as i32;
    let child = wait_for("the proxy's child", Duration::from_secs(5), || {
        all_pids().into_iter().find(|&p| {
            p != leader && ppid_state_pgid(p).is_some_and(|(pp, _, g)| g == leader && pp == leader)
        })
    });
    // The proxy dies; its child is orphaned. It must come to vncd (a child subreaper),
    // not to init.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(leader),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut seen = Vec::new();
    let reparented = (0..250).any(|_| {
        let now = ppid_state_pgid(child);
        seen.push(now);
        std::thread::sleep(Duration::from_millis(20));
        now.is_some_and(|(ppid, _, _)| ppid == vncd_pid)
    });
    assert!(
        reparented,
        "orphan {child} not reparented to vncd {vncd_pid}: {seen:?}\n{}",
        v.log()
    );
    // vncd ends it (an orphan carrying its marker) and reaps it: no zombie child is left.
    wait_for(
        "the orphan gone, not a zombie",
        Duration::from_secs(15),
        || {
            let zombies: Vec<i32> = all_pids()
                .into_iter()
                .filter(|&p| {
                    ppid_state_pgid(p).is_some_and(|(pp, s, _)| pp == vncd_pid && s == 'Z')
                })
                .collect();
            (ppid_state_pgid(child).is_none() && zombies.is_empty()).then_some(())
        },
    );
    // The session itself is served again by a new proxy.
    let back = wait_for("a new proxy", Duration::from_secs(20), || {
        let st = v.item("vm1")?["status"].clone();
        (st["phase"] == "Ready" && st["pid"] != leader).then_some(st)
    });
    assert_eq!(rfb_banner(&v.console_url(&back)).await, b"RFB 003.008\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_user_without_the_capabilities_to_supervise_is_refused_at_start() {
    // Without CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH and CAP_KILL a root vncd could start
    // proxies as nobody but not recognise them afterwards (their /proc entries are
    // nobody's), so it would release their leases and start more, a leak per pass.
    require("setpriv");
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let qemu = Qemu::tcp();
    let v = Vncd::new(2);
    v.add_session("vm1", qemu.port);
    let out = std::process::Command::new("setpriv")
        .args([
            "--bounding-set=-all,+setuid,+setgid,+chown",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_vncd"))
        .args([
            "run",
            "--sessions-dir",
            v.sessions.to_str().unwrap(),
            "--state-dir",
            v.state.to_str().unwrap(),
            "--port-range",
            &v.range_arg(),
            "--listen-address",
            "127.0.0.1",
            "--proxy-user",
            "nobody",
        ])
        .env("VNCD_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("CAP_DAC_READ_SEARCH, CAP_KILL, CAP_SYS_PTRACE"),
        "{err}"
    );
    assert!(!v.state.join("leases.json").exists());
    let owner = std::fs::canonicalize(&v.state)
        .unwrap()
        .display()
        .to_string();
    assert!(
        vncd::supervisor::scan(&owner).is_empty(),
        "a proxy was started"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn adopted_proxies_follow_changed_settings_one_at_a_time() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(4);
    // Per-session proxies: the relay follows changed settings in place instead (tests/relay_run.rs
    // the_relay_serves_web_files_enforces_origins_and_follows_new_ones_in_place).
    v.extra = vec![
        "--origin".into(),
        "http://a.example".into(),
        "--per-session-proxies".into(),
    ];
    if backend() == "websockify" {
        // websockify has no Origin allowlist: change its web directory instead.
        let web = v.tmp.path().join("web-a");
        std::fs::create_dir_all(&web).unwrap();
        v.extra = vec!["--web".into(), web.display().to_string()];
    }
    v.start();
    v.add_session("vm1", qemu.port);
    v.add_session("vm2", qemu.port);
    let one = v.wait_ready("vm1");
    let two = v.wait_ready("vm2");
    // Same settings: a restarted vncd adopts both proxies as they are.
    v.terminate();
    v.start();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(v.wait_ready("vm1")["pid"], one["pid"]);
    assert_eq!(v.wait_ready("vm2")["pid"], two["pid"]);
    // Other settings: every adopted proxy is replaced, one at a time, and the log says why.
    v.terminate();
    let mark = v.log().len();
    if backend() == "websockify" {
        let web = v.tmp.path().join("web-b");
        std::fs::create_dir_all(&web).unwrap();
        v.extra = vec!["--web".into(), web.display().to_string()];
    } else {
        v.extra = vec![
            "--origin".into(),
            "http://b.example".into(),
            "--per-session-proxies".into(),
        ];
    }
    v.start();
    wait_for("both proxies replaced", Duration::from_secs(30), || {
        let a = v.item("vm1")?["status"].clone();
        let b = v.item("vm2")?["status"].clone();
        (a["phase"] == "Ready"
            && b["phase"] == "Ready"
            && a["pid"] != one["pid"]
            && b["pid"] != two["pid"])
            .then_some(())
    });
    let log = v.log()[mark..].to_owned();
    let events: Vec<&str> = log
        .lines()
        .filter_map(|l| {
            if l.contains("stopping proxy") && l.contains("ConfigChanged") {
                Some("stop")
            } else if l.contains("started proxy") {
                Some("start")
            } else {
                None
            }
        })
        .collect();
    assert_eq!(events, ["stop", "start", "stop", "start"], "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewed_tls_certificate_reaches_the_proxy_within_a_resync() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    let (first, cert, key) = serve_tls(&mut v);
    v.start();
    v.add_session("vm1", qemu.port);
    let st = v.wait_ready("vm1");
    let url = v.console_url(&st);
    assert_eq!(wss_banner(&url, first.cert.der()).await, b"RFB 003.008\n");
    // The certificate is renewed on disk.
    let second = renew_tls(v.tmp.path(), &cert, &key);
    // A per-session proxy is replaced (its config digest covers the files); the relay
    // loads the new files in place. Either way new connections get the new certificate.
    let deadline = Instant::now() + Duration::from_secs(20);
    while wss_open(&v.url("vm1"), second.cert.der()).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let renewed = if v.on_relay() {
        let now = v.wait_ready("vm1");
        assert_eq!(now["pid"], st["pid"], "the relay loads it in place");
        now
    } else {
        // websockify forks per connection and may read the new files before its
        // replacement (the settings digest covers them) is done: wait for that too.
        wait_for(
            "the proxy restarted with the new certificate",
            Duration::from_secs(20),
            || {
                let s = v.item("vm1")?["status"].clone();
                (s["phase"] == "Ready" && s["pid"] != st["pid"]).then_some(s)
            },
        )
    };
    assert_eq!(renewed["url"], st["url"], "the same lease serves on");
    assert_eq!(
        wss_banner(&v.console_url(&renewed), second.cert.der()).await,
        b"RFB 003.008\n"
    );
}
