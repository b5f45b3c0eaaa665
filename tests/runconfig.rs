//! `vncd status`, `vncd get` and `vncd cleanup` use the configuration that `vncd run`
//! recorded in STATE_DIR/config.json: the real binary, a real proxy and QEMU.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Output;
use std::time::Duration;

use common::{Qemu, Vncd, pid_alive, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

fn text(out: &Output) -> String {
    format!(
        "rc {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `vncd ARGS --state-dir S` and nothing else, with no VNCD_* pool or directory variables.
fn only_state(v: &Vncd, args: &[&str], env: &[(&str, &str)]) -> Output {
    std::process::Command::new(common::BIN)
        .args(args)
        .arg("--state-dir")
        .arg(&v.state)
        .env("VNCD_LOG", "warn")
        .env_remove("VNCD_PORT_RANGE")
        .env_remove("VNCD_MAX_SESSIONS")
        .env_remove("VNCD_SESSIONS_DIR")
        .env_remove("VNCD_LIBVIRT")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn status_json(v: &Vncd) -> Value {
    let out = only_state(v, &["status", "--json"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_contradiction(out: &Output, flag: &str, recorded: &str, v: &Vncd) {
    assert!(!out.status.success(), "expected an error: {}", text(out));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = v.state.join("config.json").display().to_string();
    for part in [flag, recorded, file.as_str()] {
        assert!(err.contains(part), "{part:?} missing in: {err}");
    }
}

#[test]
fn status_get_and_cleanup_follow_the_recorded_run_configuration() {
    let qemu = Qemu::tcp();
    // 40 ports: not the default pool of 900.
    let mut v = Vncd::new(40);
    v.add_session("vm1", qemu.port);
    v.start();
    let st = v.wait_ready("vm1");

    let rec: Value =
        serde_json::from_str(&std::fs::read_to_string(v.state.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(rec["portRange"], v.range_arg());
    assert_eq!(rec["publicHost"], "127.0.0.1");
    assert_eq!(rec["listenAddress"], "127.0.0.1");
    assert_eq!(
        rec["sessionsDir"],
        std::fs::canonicalize(&v.sessions)
            .unwrap()
            .display()
            .to_string()
    );

    // status with only --state-dir reports the controller's pool.
    let s = status_json(&v);
    assert_eq!(s["port_pool"]["total_ports"], 40, "{s}");
    assert_eq!(s["port_pool"]["allocated_ports"], 1, "{s}");
    assert_eq!(s["controller_running"], true, "{s}");
    // The same values given explicitly agree.
    let out = only_state(&v, &["status", "--port-range", &v.range_arg()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("config.json"),
        "{}",
        text(&out)
    );

    // cleanup with only --state-dir reads the controller's sessions directory.
    let out = only_state(&v, &["cleanup", "--once"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(v.item("vm1").is_some());
    assert_eq!(v.leases()["leases"].as_array().unwrap().len(), 1);

    // get with only --state-dir.
    let out = only_state(&v, &["get", "vm1", "-o", "json"], &[]);
    assert!(out.status.success(), "{}", text(&out));

    // apply and delete with only --state-dir write into and remove from the recorded
    // sessions directory (`--wait` returns once the controller has served / released it).
    let manifest_file = v.tmp.path().join("vm2.yaml");
    std::fs::write(
        &manifest_file,
        common::manifest("vm2", u32::from(qemu.port)),
    )
    .unwrap();
    let out = only_state(
        &v,
        &[
            "apply",
            "-f",
            manifest_file.to_str().unwrap(),
            "--wait",
            "--timeout",
            "30",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(v.sessions.join("vm2.yaml").is_file(), "{}", text(&out));
    let out = only_state(&v, &["delete", "vm2", "--wait", "--timeout", "30"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!v.sessions.join("vm2.yaml").exists());

    // A flag or variable that contradicts the record is an error naming both values.
    let out = only_state(&v, &["status", "--port-range", "6100-6999"], &[]);
    assert_contradiction(&out, "--port-range 6100-6999", &v.range_arg(), &v);
    let out = only_state(&v, &["status"], &[("VNCD_PORT_RANGE", "6100-6999")]);
    assert_contradiction(&out, "VNCD_PORT_RANGE", &v.range_arg(), &v);
    let out = only_state(&v, &["status", "--max-sessions", "7"], &[]);
    assert_contradiction(&out, "--max-sessions 7", "800", &v);
    let elsewhere = v.tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let out = only_state(
        &v,
        &[
            "cleanup",
            "--once",
            "--sessions-dir",
            elsewhere.to_str().unwrap(),
        ],
        &[],
    );
    assert_contradiction(
        &out,
        "--sessions-dir",
        &v.sessions.display().to_string(),
        &v,
    );
    // The refused cleanup changed nothing.
    assert_eq!(v.leases()["leases"].as_array().unwrap().len(), 1);

    // vncd stopped: the record stays and the readers still use it.
    assert!(v.terminate().success(), "{}", v.log());
    let s = status_json(&v);
    assert_eq!(s["port_pool"]["total_ports"], 40, "{s}");
    assert_eq!(s["controller_running"], false, "{s}");
    let out = only_state(&v, &["status", "--port-range", "6100-6999"], &[]);
    assert_contradiction(&out, "--port-range", &v.range_arg(), &v);

    // With its proxy dead, a still-wanted session keeps its lease: cleanup found the
    // manifest in the recorded directory (reading any other would release it).
    let pid = st["pid"].as_i64().unwrap();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    wait_for("the proxy to die", Duration::from_secs(10), || {
        (!pid_alive(pid)).then_some(())
    });
    let out = only_state(&v, &["cleanup", "--once"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(v.leases()["leases"].as_array().unwrap().len(), 1);
    // Once the manifest is gone from that directory, the same cleanup releases it.
    v.remove_session("vm1");
    let out = only_state(&v, &["cleanup", "--once"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(v.leases()["leases"].as_array().unwrap().len(), 0);
    assert_eq!(status_json(&v)["port_pool"]["allocated_ports"], 0);
}

#[test]
fn without_a_record_flags_and_defaults_apply_as_before() {
    let v = Vncd::new(10);
    std::fs::create_dir_all(&v.state).unwrap();
    let s = status_json(&v);
    assert_eq!(s["port_pool"]["total_ports"], 900, "{s}");
    let out = only_state(&v, &["status", "--json", "--port-range", "7000-7009"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["port_pool"]["total_ports"], 10, "{s}");
    // A corrupt record is an error naming the file, not a silent fallback.
    std::fs::write(v.state.join("config.json"), b"{").unwrap();
    let out = only_state(&v, &["status"], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("config.json"),
        "{}",
        text(&out)
    );
}
