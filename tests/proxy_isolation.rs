//! What one proxy can do to another, and what a session leaves on disk, with the real
//! vncd binary and real websockify (run as root: vncd switches proxies to other uids).
//!
//! - `--proxy-uids`: each websockify proxy runs as a uid of its own, so proxy A cannot
//!   read B's key file or log, signal B (kill(B, 0) gives EPERM) or read B's memory
//!   (/proc/B/mem, which needs ptrace access). The probes run as A's uid and group with
//!   no supplementary groups, exactly what A has (setpriv, util-linux).
//! - A released session leaves no log, key or used-ticket directory behind, so churn of
//!   session names does not fill the disk.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn pid_of(status: &Value) -> i64 {
    status["pid"].as_i64().expect("a pid")
}

/// The (uid, gid) a process runs as.
fn ids_of(pid: i64) -> (u32, u32) {
    let m = std::fs::metadata(format!("/proc/{pid}")).unwrap();
    (m.uid(), m.gid())
}

/// What a process with exactly `uid` and `gid` (no supplementary groups) gets from
/// open(path), kill(pid, 0) and open(/proc/pid/mem): "ok" or the errno name.
fn probe(uid: u32, gid: u32, path: &Path, pid: i64) -> (String, String, String) {
    let script = r#"
import errno, os, sys
def try_(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
path, pid = sys.argv[1], int(sys.argv[2])
print(try_(lambda: open(path, "rb").read(1)))
print(try_(lambda: os.kill(pid, 0)))
print(try_(lambda: open(f"/proc/{pid}/mem", "rb").close()))
"#;
    let out = Command::new("setpriv")
        .args([
            format!("--reuid={uid}").as_str(),
            format!("--regid={gid}").as_str(),
            "--clear-groups",
            // The system Python: one under root's home (pyenv) is out of reach of A's uid.
            if Path::new("/usr/bin/python3").exists() {
                "/usr/bin/python3"
            } else {
                "python3"
            },
            "-c",
            script,
        ])
        .arg(path)
        .arg(pid.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "probe as uid {uid} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines().map(str::to_owned);
    (
        lines.next().unwrap(),
        lines.next().unwrap(),
        lines.next().unwrap(),
    )
}

/// Whether a process may ptrace another of its own uid here (Yama's ptrace_scope 0, or
/// no Yama): only then can the positive control on /proc/A/mem succeed.
fn same_uid_ptrace_allowed() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").map_or(true, |s| s.trim() == "0")
}

#[test]
fn each_websockify_proxy_runs_as_its_own_uid_and_cannot_touch_another() {
    use std::os::unix::fs::PermissionsExt;
    require("websockify");
    require("setpriv");
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test switches users: run it as root (scripts/test does)"
    );
    let mut v = Vncd::new(4);
    // The proxies reach their files through the temp dir, like /var/lib in production.
    std::fs::set_permissions(v.tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let (lo, hi) = (3_900_000_000u32, 3_900_000_003u32);
    v.extra.extend([
        "--backend".into(),
        "websockify".into(),
        "--proxy-user".into(),
        "nobody".into(),
        "--proxy-uids".into(),
        format!("{lo}-{hi}"),
    ]);
    v.start();
    let target = free_port();
    v.add_session("a", target);
    v.add_session("b", target);
    let a = v.wait_ready("a");
    let b = v.wait_ready("b");
    let (pa, pb) = (pid_of(&a), pid_of(&b));
    let (ua, ga) = ids_of(pa);
    let (ub, gb) = ids_of(pb);
    assert_ne!(ua, ub, "two websockify proxies share uid {ua}");
    for u in [ua, ub] {
        assert!((lo..=hi).contains(&u), "uid {u} is outside --proxy-uids");
    }
    assert_eq!((ga, gb), (65534, 65534), "the group is --proxy-user's");
    let key = |s: &str| v.state.join(format!("keys/{s}.key"));
    let log = |s: &str| v.state.join(format!("logs/{s}.log"));
    // Each key file belongs to its own proxy's uid alone (0600).
    for (s, u) in [("a", ua), ("b", ub)] {
        let m = std::fs::metadata(key(s)).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (u, 0o600), "keys/{s}.key");
    }

    // Positive controls: as A, its own key file and process are reachable, so the
    // refusals below are about B, not about the probe.
    let (own_key, own_kill, own_mem) = probe(ua, ga, &key("a"), pa);
    assert_eq!((own_key.as_str(), own_kill.as_str()), ("ok", "ok"));
    if same_uid_ptrace_allowed() {
        assert_eq!(
            own_mem, "ok",
            "A cannot read its own memory: the probe is broken"
        );
    }
    // As A: B's key file, B's process and B's memory are out of reach.
    let (b_key, b_kill, b_mem) = probe(ua, ga, &key("b"), pb);
    assert_eq!(b_key, "EACCES", "A's uid can read B's key file");
    assert_eq!(b_kill, "EPERM", "A's uid can signal B's proxy");
    assert_eq!(b_mem, "EACCES", "A's uid can read B's memory (ptrace)");
    let (b_log, _, _) = probe(ua, ga, &log("b"), pb);
    assert_eq!(b_log, "EACCES", "A's uid can read B's log");
    // And the other way round.
    let (a_key, a_kill, a_mem) = probe(ub, gb, &key("a"), pa);
    assert_eq!(
        (a_key.as_str(), a_kill.as_str(), a_mem.as_str()),
        ("EACCES", "EPERM", "EACCES")
    );

    // A restarted proxy gets the same uid back: it follows from the lease's port.
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pa as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let back = wait_for("a's new proxy", Duration::from_secs(30), || {
        let st = v.item("a")?["status"].clone();
        (st["phase"] == "Ready" && st["pid"] != pa).then_some(st)
    });
    assert_eq!(ids_of(pid_of(&back)).0, ua);
    // So does an adopted one after vncd restarts.
    v.kill9();
    v.start();
    let again = v.wait_ready("b");
    assert_eq!(pid_of(&again), pb, "b's proxy was adopted, not replaced");
    assert_eq!(ids_of(pb).0, ub);
}

#[test]
fn a_pool_larger_than_the_proxy_uids_is_refused_at_start() {
    let v = Vncd::new(4);
    let out = v.cmd(&[
        "run",
        "--sessions-dir",
        &v.sessions.display().to_string(),
        "--state-dir",
        &v.state.display().to_string(),
        "--port-range",
        &v.range_arg(),
        "--backend",
        "websockify",
        "--proxy-user",
        "nobody",
        "--proxy-uids",
        "3900000000-3900000002",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--proxy-uids 3900000000-3900000002 holds 3 uids, fewer than the 4 ports"),
        "{err}"
    );
}

#[test]
fn released_sessions_leave_no_log_key_or_ticket_records() {
    let mut v = Vncd::new(3);
    v.start();
    // A real VNC server: on the relay a session is Ready only once its target answers.
    let qemu = Qemu::tcp();
    let target = qemu.port;
    let on_relay = v.on_relay();
    let leftovers = |v: &Vncd| -> Vec<String> {
        ["logs", "keys", "nonces", "relay/nonces"]
            .iter()
            .flat_map(|d| {
                std::fs::read_dir(v.state.join(d))
                    .into_iter()
                    .flatten()
                    .map(move |e| format!("{d}/{}", e.unwrap().file_name().to_string_lossy()))
                    // The relay's own log, not a session's.
                    .filter(|f| f != "logs/relay.log")
            })
            .collect()
    };
    // Churn: 12 session names through a pool of 3 ports, one or two at a time.
    for round in 0..6 {
        let names = [format!("churn-{round}-x"), format!("churn-{round}-y")];
        for n in &names {
            v.add_session(n, target);
        }
        for n in &names {
            v.wait_ready(n);
            // On the relay the session's used tickets are kept in relay/nonces/NAME.
            let own = if on_relay {
                format!("relay/nonces/{n}")
            } else {
                format!("logs/{n}.log")
            };
            assert!(v.state.join(&own).exists(), "a live session has its {own}");
        }
        for n in &names {
            v.remove_session(n);
        }
        wait_for("the sessions' release", Duration::from_secs(20), || {
            let l = v.leases();
            l["leases"]
                .as_array()
                .is_none_or(|a| a.is_empty())
                .then_some(())
        });
        // forget() runs right after the release is committed; allow it a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut left = leftovers(&v);
        while !left.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            left = leftovers(&v);
        }
        assert!(
            left.is_empty(),
            "round {round}: released sessions left {left:?}"
        );
    }
}
