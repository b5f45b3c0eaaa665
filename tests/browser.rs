//! Real noVNC in real headless Chromium opens the console URL vncd reports, through
//! vncd's proxy (the backend under test), to a real QEMU VNC server.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

fn run_console(url: &str, extra: &[&str]) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/console.py");
    Command::new("python3")
        .arg(script)
        .arg(url)
        .args(extra)
        .output()
        .unwrap()
}

fn require_browser() {
    require("chromium");
    require("chromedriver");
    assert!(
        std::path::Path::new("/usr/share/novnc/vnc.html").exists(),
        "noVNC is not installed; run scripts/install-deps"
    );
    let ok = Command::new("python3")
        .args(["-c", "import selenium"])
        .status()
        .unwrap()
        .success();
    assert!(
        ok,
        "python selenium is not installed; run scripts/install-deps"
    );
}

#[test]
fn novnc_in_chromium_opens_a_url_from_vncd_url_once_and_a_wrong_ticket_never() {
    require_browser();
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(3);
    v.extra.extend(["--web".into(), "/usr/share/novnc".into()]);
    v.start();
    v.add_session("vm1", qemu.port);
    v.wait_ready("vm1");
    // The URL `vncd url` prints, as a user would paste it into the browser.
    let url = v.url("vm1");
    assert!(
        url.contains("/vnc.html?path=websockify%3Ftoken%3Dv1."),
        "{url}"
    );

    let out = run_console(&url, &[]);
    assert!(
        out.status.success(),
        "noVNC did not connect through {url}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let (page, token) = url.split_once("%3Ftoken%3D").unwrap();
    let wrong = format!("{page}%3Ftoken%3D{}", "0".repeat(token.len()));
    let out = run_console(&wrong, &["--expect-refused"]);
    assert!(
        out.status.success(),
        "noVNC connected with a wrong ticket:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The ticket was used up by the first page: opening the same URL again is refused.
    let out = run_console(&url, &["--expect-refused"]);
    assert!(
        out.status.success(),
        "noVNC connected twice with one ticket:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// noVNC's own files over plain HTTP on loopback (the relay serves websockets only), so
/// the page connects to the relay's port given in its URL. Ended by pid on drop.
struct NoVncPages {
    child: std::process::Child,
    port: u16,
}

impl NoVncPages {
    fn serve() -> NoVncPages {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .args(["--directory", "/usr/share/novnc"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_for("noVNC's pages", std::time::Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        NoVncPages { child, port }
    }

    /// The noVNC page that opens the websocket `ws://127.0.0.1:PORT/?token=T`.
    fn page_for(&self, ws_url: &str) -> String {
        let rest = ws_url.strip_prefix("ws://127.0.0.1:").expect(ws_url);
        let (port, query) = rest.split_once("/?").expect(ws_url);
        let query = query.replace('=', "%3D");
        format!(
            "http://127.0.0.1:{}/vnc.html?host=127.0.0.1&port={port}&path=%3F{query}",
            self.port
        )
    }
}

impl Drop for NoVncPages {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_console(page: &str, extra: &[&str], what: &str) {
    let out = run_console(page, extra);
    assert!(
        out.status.success(),
        "{what} ({page}):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn novnc_in_chromium_opens_relay_consoles_on_the_session_port_and_through_the_gateway() {
    require_browser();
    let qemu = Qemu::tcp();
    let pages = NoVncPages::serve();
    let mut v = Vncd::new(3);
    let gw = free_port();
    v.extra = vec![
        "--relay".into(),
        "--backend".into(),
        "builtin".into(),
        "--gateway".into(),
        format!("127.0.0.1:{gw}"),
    ];
    v.start();
    v.add_session("vm1", qemu.port);
    v.wait_ready("vm1");

    // The session's own port, with `vncd url`'s v1 ticket.
    let url = v.url("vm1");
    assert!(url.contains("/?token=v1."), "{url}");
    assert_console(
        &pages.page_for(&url),
        &[],
        "noVNC did not connect on the session port",
    );
    assert_console(
        &pages.page_for(&url),
        &["--expect-refused"],
        "a spent ticket connected again",
    );

    // The gateway, with `vncd url --gateway`'s v2 ticket.
    let out = v.cmd(&[
        "url",
        "vm1",
        "--gateway",
        "--state-dir",
        v.state.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(
        url.starts_with(&format!("ws://127.0.0.1:{gw}/?token=v2.")),
        "{url}"
    );
    assert_console(
        &pages.page_for(&url),
        &[],
        "noVNC did not connect through the gateway",
    );
    assert_console(
        &pages.page_for(&url),
        &["--expect-refused"],
        "a spent gateway ticket connected again",
    );
    let (page, token) = url.split_once("token=").unwrap();
    let wrong = format!("{page}token={}", "0".repeat(token.len()));
    assert_console(
        &pages.page_for(&wrong),
        &["--expect-refused"],
        "a wrong ticket connected through the gateway",
    );
}

/// The packaged unit's users with the relay: vncd as root, the relay as the unit's proxy
/// user (`VNCD_PROXY_USER=nobody`). Under a parent directory every user may enter (as
/// /var/lib is), noVNC in Chromium opens the console from `vncd url`. Under a parent only
/// root can enter, vncd refuses at start with the fix, so nothing shows Ready with a
/// console that cannot open.
#[test]
fn novnc_opens_a_relay_console_run_as_the_units_proxy_user_and_a_root_only_parent_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    require_browser();
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test switches users: run it as root (scripts/test does)"
    );
    let qemu = Qemu::tcp();
    let relay_as_nobody = || -> Vec<String> {
        ["--relay", "--backend", "builtin", "--proxy-user", "nobody"]
            .map(String::from)
            .to_vec()
    };

    // Only root can enter the state dir's parent.
    let mut closed = Vncd::new(2);
    std::fs::set_permissions(closed.tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    closed.extra = relay_as_nobody();
    closed.add_session("vm1", qemu.port);
    closed.start();
    let start = std::time::Instant::now();
    let code = loop {
        if let Some(code) = closed.child.as_mut().unwrap().try_wait().unwrap() {
            break code;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "vncd kept running under a parent the relay cannot enter: {}",
            closed.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(!code.success());
    assert!(
        closed.log().contains("cannot enter"),
        "no fix named: {}",
        closed.log()
    );
    assert!(
        closed
            .item("vm1")
            .is_none_or(|i| i["status"]["phase"] != "Ready"),
        "Ready under a parent the relay cannot enter"
    );
    closed.child = None;

    let pages = NoVncPages::serve();
    let mut v = Vncd::new(2);
    std::fs::set_permissions(v.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    v.extra = relay_as_nobody();
    v.add_session("vm1", qemu.port);
    v.start();
    v.wait_ready("vm1");
    assert_console(
        &pages.page_for(&v.url("vm1")),
        &[],
        "noVNC did not connect to the relay run as nobody",
    );
}
