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
