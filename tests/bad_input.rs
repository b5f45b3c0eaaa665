//! Bad input against the real `vncd`, its builtin proxy and a real QEMU VNC server:
//! malformed manifests, command lines and raw HTTP requests. Each input must get a clear
//! error (a Failed/InvalidManifest status naming the problem, a non-zero exit with a
//! message, an HTTP error status or a closed connection), nothing may crash, and nothing
//! else may be disturbed: a good session stays Ready with the same pid and port after
//! every single input, and (for HTTP) its connected client keeps its console.
//!
//! Each test prints a table of the inputs and the errors they got (`--nocapture`), the
//! source of the table in RELIABILITY.md.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// One row of the table printed at the end of each test.
struct Row {
    input: String,
    got: String,
}

fn print_table(title: &str, rows: &[Row]) {
    println!("\n### {title} ({} inputs)\n", rows.len());
    println!("| input | error it got |\n| --- | --- |");
    for r in rows {
        let clean = |s: &str| {
            s.replace('|', "\\|")
                .replace('\n', " ")
                .chars()
                .take(220)
                .collect::<String>()
        };
        println!("| {} | {} |", clean(&r.input), clean(&r.got));
    }
}

/// The session that must not notice anything.
struct Good {
    pid: Value,
    port: Value,
    target: Value,
}

impl Good {
    fn of(v: &Vncd) -> Good {
        let st = v.wait_ready("good");
        Good {
            pid: st["pid"].clone(),
            port: st["port"].clone(),
            target: st["target"].clone(),
        }
    }

    /// vncd still runs and "good" is Ready with the same pid, port and target.
    fn assert_undisturbed(&self, v: &mut Vncd, after: &str) {
        assert!(
            v.child.as_mut().unwrap().try_wait().unwrap().is_none(),
            "vncd exited after {after}:\n{}",
            v.log()
        );
        let st = v.item("good").unwrap()["status"].clone();
        assert_eq!(st["phase"], "Ready", "good not Ready after {after}: {st}");
        assert_eq!(st["pid"], self.pid, "good's proxy changed after {after}");
        assert_eq!(st["port"], self.port, "good's port changed after {after}");
        assert_eq!(
            st["target"], self.target,
            "good's target changed after {after}"
        );
    }
}

// ------------------------------------------------------------------ manifests

/// How a bad manifest lands in the sessions directory.
enum Make {
    Text(String),
    Bytes(Vec<u8>),
    Symlink(PathBuf),
    Dir,
    Fifo,
    Socket,
    Sparse(u64),
    Mode000(String),
}

fn good_manifest(name: &str, port: u16) -> String {
    manifest(name, u32::from(port))
}

fn with_spec(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: vncd.io/v1alpha1\nkind: VncSession\nmetadata:\n  name: {name}\nspec:\n{spec}"
    )
}

fn billion_laughs() -> String {
    let mut s = String::from(
        "apiVersion: vncd.io/v1alpha1\nkind: VncSession\nl0: &l0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n",
    );
    for i in 1..10 {
        let p = i - 1;
        s.push_str(&format!(
            "l{i}: &l{i} [*l{p},*l{p},*l{p},*l{p},*l{p},*l{p},*l{p},*l{p},*l{p}]\n"
        ));
    }
    s
}

fn quadratic_blowup() -> String {
    // One 16 KiB scalar referenced 60 times: ~1 MiB once expanded.
    let mut s = format!(
        "apiVersion: vncd.io/v1alpha1\nkind: VncSession\nmetadata:\n  name: quad\n  annotations:\n    a: &a \"{}\"\nspec:\n  target: {{host: 127.0.0.1, port: 5901}}\nx: [",
        "x".repeat(16 * 1024)
    );
    for _ in 0..60 {
        s.push_str("*a,");
    }
    s.push_str("*a]\n");
    s
}

fn place(dir: &Path, file: &str, make: &Make) -> PathBuf {
    let path = dir.join(file);
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    match make {
        Make::Text(t) => {
            std::fs::write(&tmp, t).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
        Make::Bytes(b) => {
            std::fs::write(&tmp, b).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
        Make::Symlink(to) => std::os::unix::fs::symlink(to, &path).unwrap(),
        Make::Dir => std::fs::create_dir(&path).unwrap(),
        Make::Fifo => {
            nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap()
        }
        Make::Socket => {
            let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
            std::mem::forget(l); // the socket file stays; the fd closes with the test
        }
        Make::Sparse(len) => {
            let f = std::fs::File::create(&tmp).unwrap();
            f.set_len(*len).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
        Make::Mode000(t) => {
            std::fs::write(&tmp, t).unwrap();
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o000)).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
    }
    path
}

fn remove(path: &Path) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    if meta.is_dir() {
        std::fs::remove_dir(path).unwrap();
    } else {
        std::fs::remove_file(path).unwrap();
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_manifests_get_clear_errors_and_disturb_nothing() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(4);
    v.start();
    v.add_session("good", qemu.port);
    let good = Good::of(&v);
    let q = qemu.port;
    let target = |extra: &str| format!("  target:\n    host: 127.0.0.1\n    port: {q}\n{extra}");
    let mode000_needle = if is_root() {
        // Root reads a file of mode 000 anyway; the content's own error shows instead.
        "spec.target.port 0"
    } else {
        "Permission denied"
    };
    // (file, how, name `vncd get` reports it under, text the message must contain)
    let cases: Vec<(&str, Make, &str, &str)> = vec![
        (
            "bomb.yaml",
            Make::Text(billion_laughs()),
            "bomb",
            "not valid YAML",
        ),
        (
            "quad.yaml",
            Make::Text(quadratic_blowup()),
            "quad",
            "not valid YAML",
        ),
        (
            "deep.yaml",
            Make::Text(format!("a: {}{}\n", "[".repeat(10_000), "]".repeat(10_000))),
            "deep",
            "not valid YAML",
        ),
        (
            "huge.yaml",
            Make::Text(format!(
                "{}# {}\n",
                good_manifest("huge", q),
                "x".repeat(200_000)
            )),
            "huge",
            "bytes; the limit is 65536",
        ),
        (
            "sparse.yaml",
            Make::Sparse(10 << 30),
            "sparse",
            "10737418240 bytes",
        ),
        (
            "binary.yaml",
            Make::Bytes(
                (0..4096u32)
                    .map(|i| (i * 7919 % 251) as u8 | 0x80)
                    .collect(),
            ),
            "binary",
            "not UTF-8 text",
        ),
        (
            "nul.yaml",
            Make::Text(format!("{}# \u{0}\n", good_manifest("nul", q))),
            "nul",
            "not UTF-8 text",
        ),
        (
            "link-out.yaml",
            Make::Symlink("/etc/passwd".into()),
            "link-out",
            "symbolic link",
        ),
        (
            "link-in.yaml",
            Make::Symlink(v.sessions.join("good.yaml")),
            "link-in",
            "symbolic link",
        ),
        ("dir.yaml", Make::Dir, "dir", "is not a regular file"),
        ("fifo.yaml", Make::Fifo, "fifo", "is not a regular file"),
        (
            "socket.yaml",
            Make::Socket,
            "socket",
            "is not a regular file",
        ),
        (
            "mode000.yaml",
            Make::Mode000(with_spec(
                "mode000",
                "  target: {host: 127.0.0.1, port: 0}\n",
            )),
            "mode000",
            mode000_needle,
        ),
        (
            "empty.yaml",
            Make::Text(String::new()),
            "empty",
            "manifest is empty",
        ),
        (
            "comments.yml",
            Make::Text("# nothing but a comment\n".into()),
            "comments",
            "manifest is empty",
        ),
        (
            "list.yaml",
            Make::Text("- a\n- b\n".into()),
            "list",
            "must be a YAML mapping",
        ),
        (
            "scalar.yaml",
            Make::Text("hello\n".into()),
            "scalar",
            "must be a YAML mapping",
        ),
        (
            "tabs.yaml",
            Make::Text("a:\n\t- b\n".into()),
            "tabs",
            "not valid YAML",
        ),
        (
            "braces.yaml",
            Make::Text("{{{ not: [yaml".into()),
            "braces",
            "not valid YAML",
        ),
        (
            "multi.yaml",
            Make::Text(format!(
                "{}---\n{}",
                good_manifest("multi", q),
                good_manifest("multi2", q)
            )),
            "multi",
            "more than one YAML document",
        ),
        (
            "kind.yaml",
            Make::Text(good_manifest("kind", q).replace("VncSession", "Pod")),
            "kind",
            "kind \"Pod\" is not VncSession",
        ),
        (
            "nokind.yaml",
            Make::Text(good_manifest("nokind", q).replace("kind: VncSession\n", "")),
            "nokind",
            "kind \"\" is not VncSession",
        ),
        (
            "apiversion.yaml",
            Make::Text(good_manifest("apiversion", q).replace("vncd.io/v1alpha1", "v1")),
            "apiversion",
            "apiVersion \"v1\" is not vncd.io/v1alpha1",
        ),
        (
            "noname.yaml",
            Make::Text(good_manifest("x", q).replace("  name: x\n", "  labels: {}\n")),
            "noname",
            "metadata.name is missing",
        ),
        (
            "meta-string.yaml",
            Make::Text(
                good_manifest("x", q).replace("metadata:\n  name: x\n", "metadata: hello\n"),
            ),
            "meta-string",
            "metadata is invalid",
        ),
        (
            "name-number.yaml",
            Make::Text(good_manifest("x", q).replace("name: x", "name: 12345")),
            "name-number",
            "metadata is invalid",
        ),
        (
            "traversal.yaml",
            Make::Text(good_manifest("../../etc/passwd", q)),
            "../../etc/passwd",
            "is not valid",
        ),
        (
            "slash.yaml",
            Make::Text(good_manifest("a/b", q)),
            "a/b",
            "is not valid",
        ),
        (
            "upper.yaml",
            Make::Text(good_manifest("VM1", q)),
            "VM1",
            "is not valid",
        ),
        (
            "long.yaml",
            Make::Text(good_manifest(&"a".repeat(254), q)),
            "a".repeat(254).leak(),
            "is not valid",
        ),
        (
            "spec-list.yaml",
            Make::Text(with_spec("spec-list", "  - 1\n  - 2\n")),
            "spec-list",
            "spec is invalid",
        ),
        (
            "port-string.yaml",
            Make::Text(with_spec(
                "port-string",
                "  target: {host: 127.0.0.1, port: \"x\"}\n",
            )),
            "port-string",
            "spec is invalid",
        ),
        (
            "port-float.yaml",
            Make::Text(with_spec(
                "port-float",
                "  target: {host: 127.0.0.1, port: 5901.5}\n",
            )),
            "port-float",
            "spec is invalid",
        ),
        (
            "port-negative.yaml",
            Make::Text(with_spec(
                "port-negative",
                "  target: {host: 127.0.0.1, port: -1}\n",
            )),
            "port-negative",
            "spec.target.port -1 is out of range 1-65535",
        ),
        (
            "port-huge.yaml",
            Make::Text(with_spec(
                "port-huge",
                "  target: {host: 127.0.0.1, port: 70000}\n",
            )),
            "port-huge",
            "spec.target.port 70000 is out of range",
        ),
        (
            "port-bigint.yaml",
            Make::Text(with_spec(
                "port-bigint",
                "  target: {host: 127.0.0.1, port: 99999999999999999999}\n",
            )),
            "port-bigint",
            "spec is invalid",
        ),
        (
            "pool-negative.yaml",
            Make::Text(with_spec("pool-negative", &target("  port: -5\n"))),
            "pool-negative",
            "spec.port -5 is outside the port pool",
        ),
        (
            "pool-outside.yaml",
            Make::Text(with_spec("pool-outside", &target("  port: 65536\n"))),
            "pool-outside",
            "spec.port 65536 is outside the port pool",
        ),
        (
            "host-semicolon.yaml",
            Make::Text(good_manifest("host-semicolon", q).replace("127.0.0.1", "\"a;reboot\"")),
            "host-semicolon",
            "spec.target.host \"a;reboot\" is not an IP address or DNS name",
        ),
        (
            "host-subshell.yaml",
            Make::Text(
                good_manifest("host-subshell", q).replace("127.0.0.1", "\"$(touch /tmp/pwned)\""),
            ),
            "host-subshell",
            "is not an IP address or DNS name",
        ),
        (
            "host-backtick.yaml",
            Make::Text(good_manifest("host-backtick", q).replace("127.0.0.1", "\"`id`\"")),
            "host-backtick",
            "is not an IP address or DNS name",
        ),
        (
            "host-dash.yaml",
            Make::Text(good_manifest("host-dash", q).replace("127.0.0.1", "\"-oProxyCommand=x\"")),
            "host-dash",
            "is not an IP address or DNS name",
        ),
        (
            "host-newline.yaml",
            Make::Text(good_manifest("host-newline", q).replace("127.0.0.1", "\"a\\nb\"")),
            "host-newline",
            "is not an IP address or DNS name",
        ),
        (
            "both-targets.yaml",
            Make::Text(with_spec(
                "both-targets",
                &target("    unixSocket: /run/x.sock\n"),
            )),
            "both-targets",
            "give only one",
        ),
        (
            "unix-relative.yaml",
            Make::Text(with_spec(
                "unix-relative",
                "  target: {unixSocket: vnc.sock}\n",
            )),
            "unix-relative",
            "must be an absolute path",
        ),
        (
            "unix-dotdot.yaml",
            Make::Text(with_spec(
                "unix-dotdot",
                "  target: {unixSocket: /run/../etc/shadow}\n",
            )),
            "unix-dotdot",
            "must be an absolute path without '..'",
        ),
        (
            "unknown-field.yaml",
            Make::Text(with_spec("unknown-field", &target("  prot: 1\n"))),
            "unknown-field",
            "prot",
        ),
        (
            "idle-negative.yaml",
            Make::Text(with_spec(
                "idle-negative",
                &target("  idleTimeoutSeconds: -1\n"),
            )),
            "idle-negative",
            "spec.idleTimeoutSeconds -1 must be between 1 and 315360000 seconds",
        ),
        (
            "idle-string.yaml",
            Make::Text(with_spec(
                "idle-string",
                &target("  idleTimeoutSeconds: never\n"),
            )),
            "idle-string",
            "spec is invalid",
        ),
        (
            "$(reboot);\n`id`.yaml",
            Make::Text("{{{".into()),
            "$(reboot);\n`id`",
            "not valid YAML",
        ),
        (
            "claims-good.yaml",
            Make::Text(with_spec("good", "  target: {host: 127.0.0.1, port: 0}\n")),
            "good",
            "spec.target.port 0",
        ),
        (
            "dup.yaml",
            Make::Text(good_manifest("good", q.wrapping_add(1))),
            "good",
            "duplicate name: session \"good\" is already defined",
        ),
    ];
    let mut rows = Vec::new();
    for (file, make, name, needle) in &cases {
        let path = place(&v.sessions, file, make);
        let what = format!("{file:?}");
        let msg = wait_for(
            &format!("the error for {what}"),
            Duration::from_secs(15),
            || {
                let item = v.item(name)?;
                let st = &item["status"];
                let msg = st["message"].as_str()?.to_owned();
                if *name == "good" {
                    // A file claiming the good session's name: reported on it, as a warning.
                    return msg.contains(needle).then_some(msg);
                }
                (st["phase"] == "Failed"
                    && st["reason"] == "InvalidManifest"
                    && msg.contains(needle))
                .then_some(msg)
            },
        );
        good.assert_undisturbed(&mut v, &what);
        rows.push(Row {
            input: format!("manifest {what}"),
            got: msg,
        });
        remove(&path);
        wait_for(
            &format!("{what} to be forgotten"),
            Duration::from_secs(10),
            || {
                let forgotten = match v.item(name) {
                    None => true,
                    Some(i) => {
                        *name == "good" && !i["status"]["message"].as_str()?.contains(needle)
                    }
                };
                forgotten.then_some(())
            },
        );
        good.assert_undisturbed(&mut v, &what);
    }
    // A file whose name is not UTF-8 is not a manifest vncd can name: it is skipped.
    let odd = v
        .sessions
        .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"\xff\xfe.yaml"));
    std::fs::write(&odd, "{{{").unwrap();
    std::thread::sleep(Duration::from_millis(1500)); // two resync passes; nothing to wait for
    good.assert_undisturbed(&mut v, "a non-UTF-8 file name");
    rows.push(Row {
        input: "manifest file named b\"\\xff\\xfe.yaml\"".into(),
        got: "ignored (not listed in `vncd get`; vncd keeps running)".into(),
    });
    std::fs::remove_file(&odd).unwrap();
    // The good session still serves its console.
    assert_eq!(rfb_banner(&v.url("good")).await, b"RFB 003.008\n");
    print_table("Manifests", &rows);
    assert!(rows.len() >= 30);
}

// ------------------------------------------------------------------ command lines

/// Runs vncd with `args`, killing it (and failing) if it is still running after 20 s:
/// a bad argument must make it exit, not serve.
fn run_vncd(args: &[String], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("VNCD_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "`vncd {}` accepted the input and kept running; stderr: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let p = e.path();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_command_lines_exit_non_zero_with_a_message_and_write_nothing() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(4);
    v.start();
    v.add_session("good", qemu.port);
    let good = Good::of(&v);
    let scratch = tempfile::tempdir().unwrap();
    let junk = scratch.path().join("junk.yaml");
    std::fs::write(&junk, b"\x00\x01\x02\xff\xfegarbage").unwrap();
    let badname = scratch.path().join("badname.yaml");
    std::fs::write(&badname, manifest("../good", u32::from(qemu.port))).unwrap();
    let huge = scratch.path().join("huge.yaml");
    std::fs::write(&huge, "#".repeat(100_000)).unwrap();
    let a_file = scratch.path().join("a-file");
    std::fs::write(&a_file, "x").unwrap();
    // A key only root can read: a proxy run as --proxy-user nobody could not load it.
    let private_key = scratch.path().join("key.pem");
    std::fs::write(&private_key, "k").unwrap();
    std::fs::set_permissions(
        &private_key,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap();
    let sessions = v.sessions.display().to_string();
    let state = v.state.display().to_string();
    let pool = v.range_arg();
    let good_port = good.port.as_u64().unwrap().to_string();
    let s = |x: &str| x.to_owned();
    let p = |x: &Path| x.display().to_string();

    // `vncd run` with one bad flag each, on a fresh state directory (so a run that got
    // past the flag would be seen writing state and starting proxies).
    let run_cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![s("--port-range"), s("abc")],
            "invalid value 'abc' for '--port-range",
        ),
        (vec![s("--port-range"), s("7000-6000")], "7000-6000"),
        (vec![s("--port-range"), s("0-10")], "0-10"),
        (vec![s("--port-range"), s("6100-70000")], "6100-70000"),
        (vec![s("--port-range=6100-")], "6100-"),
        (vec![s("--port-range=-6100")], "-6100"),
        (
            vec![s("--backend"), s("nope")],
            "invalid value 'nope' for '--backend",
        ),
        (
            vec![
                s("--tls-cert"),
                s("/nonexistent/cert.pem"),
                s("--tls-key"),
                s("/nonexistent/key.pem"),
            ],
            "cannot read /nonexistent/cert.pem",
        ),
        (vec![s("--tls-cert"), p(&a_file)], "--tls-key"),
        (
            vec![s("--allow-target"), s("127.0.0.1")],
            "invalid --allow-target rule \"127.0.0.1\": no port",
        ),
        (
            vec![s("--allow-target"), s("vnc.example.com:5900")],
            "not an IP address",
        ),
        (
            vec![s("--allow-target"), s("10.0.0.0/33:5900")],
            "prefix length too long",
        ),
        (
            vec![s("--allow-target"), s("127.0.0.1:5999-5900")],
            "the port range is empty",
        ),
        (
            vec![s("--allow-target"), s("unix:run/libvirt")],
            "must be an absolute path",
        ),
        (
            vec![s("--resync-interval"), s("abc")],
            "invalid value 'abc' for '--resync-interval",
        ),
        (
            vec![s("--resync-interval=-1")],
            "invalid value '-1' for '--resync-interval <SECONDS>': -1 is not a number of seconds",
        ),
        (
            vec![s("--start-timeout"), s("inf")],
            "invalid value 'inf' for '--start-timeout <SECONDS>': inf is not a number of seconds",
        ),
        (
            vec![s("--lock-timeout"), s("NaN")],
            "invalid value 'NaN' for '--lock-timeout <SECONDS>': NaN is not a number of seconds",
        ),
        (
            vec![s("--stop-grace=-3")],
            "invalid value '-3' for '--stop-grace <SECONDS>': -3 is not a number of seconds",
        ),
        (
            vec![s("--max-sessions=-1")],
            "invalid value '-1' for '--max-sessions",
        ),
        (
            vec![s("--listen-address"), s("not-an-ip")],
            "invalid value 'not-an-ip' for '--listen-address",
        ),
        (
            vec![s("--web"), s("/nonexistent/novnc")],
            "--web /nonexistent/novnc is not a directory",
        ),
        (
            vec![s("--proxy-user"), s("no-such-user-vncd")],
            "--proxy-user \"no-such-user-vncd\": no such user",
        ),
        (
            vec![s("--proxy-user"), s("nobody:no-such-group-vncd")],
            "no such group \"no-such-group-vncd\"",
        ),
        (
            vec![s("--proxy-user"), s("root")],
            "--proxy-user \"root\" is root (uid 0)",
        ),
        (
            vec![
                s("--proxy-user"),
                s("nobody"),
                s("--tls-cert"),
                p(&a_file),
                s("--tls-key"),
                p(&private_key),
            ],
            "cannot read",
        ),
        (
            vec![
                s("--backend"),
                s("websockify"),
                s("--websockify"),
                s("/nonexistent/websockify"),
            ],
            "/nonexistent/websockify does not exist",
        ),
        (
            vec![
                s("--backend"),
                s("websockify"),
                s("--origin"),
                s("https://x.example"),
            ],
            "--origin needs the builtin backend",
        ),
        (
            vec![s("--log-format"), s("xml")],
            "invalid value 'xml' for '--log-format",
        ),
        (
            vec![s("--frobnicate")],
            "unexpected argument '--frobnicate'",
        ),
    ];
    let mut rows = Vec::new();
    for (extra, needle) in &run_cases {
        let fresh = tempfile::tempdir().unwrap();
        let st = fresh.path().join("state");
        let mut args = vec![
            s("run"),
            s("--sessions-dir"),
            sessions.clone(),
            s("--state-dir"),
            p(&st),
            s("--listen-address"),
            s("127.0.0.1"),
        ];
        if !extra[0].starts_with("--port-range") {
            args.extend([s("--port-range"), pool.clone()]);
        }
        if extra[0] == "--listen-address" {
            args.retain(|a| a != "--listen-address" && a != "127.0.0.1");
        }
        args.extend(extra.iter().cloned());
        let out = run_vncd(&args, &[]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let what = format!("vncd run {}", extra.join(" "));
        assert!(!out.status.success(), "{what} succeeded");
        assert!(err.contains(needle), "{what}: {err:?} lacks {needle:?}");
        assert!(!st.join("leases.json").exists() && !st.join("sessions.json").exists());
        let owner = std::fs::canonicalize(&st).map(|p| p.display().to_string());
        if let Ok(owner) = owner {
            assert!(
                vncd::supervisor::scan(&owner).is_empty(),
                "{what} started a proxy"
            );
        }
        good.assert_undisturbed(&mut v, &what);
        rows.push(Row {
            input: format!("`{what}`"),
            got: format!(
                "exit {}: {}",
                out.status.code().unwrap_or(-1),
                first_error_line(&err)
            ),
        });
    }
    // The same through the environment.
    {
        let fresh = tempfile::tempdir().unwrap();
        let out = run_vncd(
            &[
                s("run"),
                s("--state-dir"),
                p(&fresh.path().join("state")),
                s("--sessions-dir"),
                sessions.clone(),
            ],
            &[("VNCD_PORT_RANGE", "6999-6100")],
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success() && err.contains("6999-6100"), "{err}");
        good.assert_undisturbed(&mut v, "VNCD_PORT_RANGE");
        rows.push(Row {
            input: "`VNCD_PORT_RANGE=6999-6100 vncd run`".into(),
            got: format!(
                "exit {}: {}",
                out.status.code().unwrap_or(-1),
                first_error_line(&err)
            ),
        });
    }
    // Bad sessions/state paths, and the relay without the socket kube mode needs.
    for (what, args, needle) in [
        (
            "`vncd kube --relay` without `--relay-socket` (a relay started in the controller's pod would end with it)",
            vec![
                s("kube"),
                s("--node-name"),
                s("node-a"),
                s("--relay"),
                s("--port-range"),
                pool.clone(),
            ],
            "needs --relay-socket",
        ),
        (
            "--sessions-dir is a regular file",
            vec![
                s("run"),
                s("--sessions-dir"),
                p(&a_file),
                s("--port-range"),
                pool.clone(),
            ],
            "a-file",
        ),
        (
            "--state-dir is a regular file",
            vec![
                s("run"),
                s("--sessions-dir"),
                sessions.clone(),
                s("--state-dir"),
                p(&a_file),
                s("--port-range"),
                pool.clone(),
            ],
            "a-file",
        ),
    ] {
        let mut args = args;
        if !args.contains(&s("--state-dir")) {
            args.extend([s("--state-dir"), p(&scratch.path().join("st2"))]);
        }
        let out = run_vncd(&args, &[]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success() && err.contains(needle),
            "{what}: {err}"
        );
        good.assert_undisturbed(&mut v, what);
        rows.push(Row {
            input: format!("`vncd {}` with {what}", args[0]),
            got: format!(
                "exit {}: {}",
                out.status.code().unwrap_or(-1),
                first_error_line(&err)
            ),
        });
    }

    // Commands against the live state: refused, and the sessions dir and leases unchanged.
    let other_cases: Vec<(Vec<String>, i32, &str)> = vec![
        (
            vec![s("get"), s("missing"), s("--state-dir"), state.clone()],
            1,
            "session \"missing\" not found",
        ),
        (
            vec![s("get"), s("-o"), s("xml"), s("--state-dir"), state.clone()],
            2,
            "invalid value 'xml'",
        ),
        (
            vec![s("get"), s("--state-dir"), s("/nonexistent/state")],
            2,
            "no status yet at /nonexistent/state/sessions.json",
        ),
        (
            vec![
                s("apply"),
                s("-f"),
                p(&junk),
                s("--sessions-dir"),
                sessions.clone(),
                s("--port-range"),
                pool.clone(),
            ],
            2,
            "was not applied: manifest is not UTF-8 text",
        ),
        (
            vec![
                s("apply"),
                s("-f"),
                s("/nonexistent/vm.yaml"),
                s("--sessions-dir"),
                sessions.clone(),
            ],
            2,
            "cannot open /nonexistent/vm.yaml",
        ),
        (
            vec![
                s("apply"),
                s("-f"),
                p(scratch.path()),
                s("--sessions-dir"),
                sessions.clone(),
            ],
            2,
            "cannot read",
        ),
        (
            vec![
                s("apply"),
                s("-f"),
                p(&badname),
                s("--sessions-dir"),
                sessions.clone(),
                s("--port-range"),
                pool.clone(),
            ],
            2,
            "name \"../good\" is not valid",
        ),
        (
            vec![
                s("apply"),
                s("-f"),
                p(&huge),
                s("--sessions-dir"),
                sessions.clone(),
            ],
            2,
            "bytes; the limit is 65536",
        ),
        (
            vec![s("apply"), s("--sessions-dir"), sessions.clone()],
            2,
            "--filename",
        ),
        (
            vec![
                s("delete"),
                s("unknown"),
                s("--sessions-dir"),
                sessions.clone(),
                s("--state-dir"),
                state.clone(),
            ],
            1,
            "no manifest for session \"unknown\"",
        ),
        (
            vec![
                s("delete"),
                s("../good"),
                s("--sessions-dir"),
                sessions.clone(),
                s("--state-dir"),
                state.clone(),
            ],
            1,
            "no manifest for session \"../good\"",
        ),
        (
            vec![
                s("delete"),
                s("good.yaml"),
                s("--sessions-dir"),
                sessions.clone(),
                s("--state-dir"),
                state.clone(),
            ],
            1,
            "no manifest for session \"good.yaml\"",
        ),
        (
            vec![s("cleanup"), s("--state-dir"), state.clone()],
            2,
            "--once",
        ),
        (
            vec![
                s("cleanup"),
                s("--once"),
                s("--state-dir"),
                s("/nonexistent/state"),
            ],
            2,
            "state directory /nonexistent/state does not exist",
        ),
        (
            vec![
                s("cleanup"),
                s("--once"),
                s("--interval"),
                s("5"),
                s("--state-dir"),
                state.clone(),
            ],
            2,
            "cannot be used with",
        ),
        (
            vec![
                s("status"),
                s("--port-range"),
                s("x-y"),
                s("--state-dir"),
                state.clone(),
            ],
            2,
            "invalid value 'x-y' for '--port-range",
        ),
        (
            vec![
                s("proxy"),
                s("--listen"),
                s("nope"),
                s("--target"),
                s("127.0.0.1:5901"),
            ],
            2,
            "invalid value 'nope' for '--listen",
        ),
        (
            vec![
                s("proxy"),
                s("--listen"),
                s("127.0.0.1:1"),
                s("--target"),
                s("no-port"),
            ],
            2,
            "is not HOST:PORT",
        ),
        (
            vec![
                s("proxy"),
                s("--listen"),
                format!("127.0.0.1:{good_port}"),
                s("--target"),
                format!("127.0.0.1:{}", qemu.port),
            ],
            2,
            "cannot listen on 127.0.0.1:",
        ),
        (
            vec![
                s("proxy"),
                s("--listen"),
                s("127.0.0.1:1"),
                s("--target"),
                s("127.0.0.1:5901"),
                s("--max-connections"),
                s("0"),
            ],
            2,
            "invalid value '0' for '--max-connections <N>'",
        ),
        (
            vec![
                s("proxy"),
                s("--listen"),
                s("127.0.0.1:1"),
                s("--target"),
                s("127.0.0.1:5901"),
                s("--ping-interval"),
                s("0"),
            ],
            2,
            "invalid value '0' for '--ping-interval <SECS>'",
        ),
        (
            vec![
                s("proxy"),
                s("--listen"),
                s("127.0.0.1:1"),
                s("--target"),
                s("127.0.0.1:5901"),
                s("--refusal-log-interval"),
                s("0"),
            ],
            2,
            "invalid value '0' for '--refusal-log-interval <SECS>'",
        ),
        (
            vec![
                s("proxy"),
                s("--listen"),
                s("127.0.0.1:1"),
                s("--target"),
                s("127.0.0.1:5901"),
                s("--max-log-bytes"),
                s("lots"),
            ],
            2,
            "invalid value 'lots' for '--max-log-bytes <BYTES>'",
        ),
        (
            vec![s("frobnicate")],
            2,
            "unrecognized subcommand 'frobnicate'",
        ),
    ];
    for (args, code, needle) in &other_cases {
        let before_sessions = listing(&v.sessions);
        let before_leases = std::fs::read(v.state.join("leases.json")).unwrap();
        let out = run_vncd(args, &[]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let what = format!("vncd {}", args.join(" "));
        assert_eq!(out.status.code(), Some(*code), "{what}: {err}");
        assert!(err.contains(needle), "{what}: {err:?} lacks {needle:?}");
        assert_eq!(
            listing(&v.sessions),
            before_sessions,
            "{what} changed the sessions dir"
        );
        assert_eq!(
            std::fs::read(v.state.join("leases.json")).unwrap(),
            before_leases,
            "{what} changed the leases"
        );
        good.assert_undisturbed(&mut v, &what);
        rows.push(Row {
            input: format!("`{what}`")
                .replace(&sessions, "SESSIONS")
                .replace(&state, "STATE")
                .replace(&p(scratch.path()), "TMP"),
            got: format!("exit {code}: {}", first_error_line(&err)),
        });
    }
    assert_eq!(rfb_banner(&v.url("good")).await, b"RFB 003.008\n");
    for r in &mut rows {
        r.input = r
            .input
            .replace(&sessions, "SESSIONS")
            .replace(&pool, "POOL");
    }
    print_table("Command lines", &rows);
    assert!(rows.len() >= 30);
}

fn first_error_line(err: &str) -> String {
    err.lines()
        .find(|l| l.contains("error") || l.starts_with("vncd:"))
        .unwrap_or_else(|| err.lines().next().unwrap_or(""))
        .trim()
        .to_owned()
}

// ------------------------------------------------------------------ raw HTTP

/// Sends `req` on a new connection and reads until the server closes (or 15 s pass).
async fn raw(port: u16, req: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let _ = s.write_all(req).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_line(resp: &str) -> String {
    resp.lines()
        .next()
        .unwrap_or("(closed without a response)")
        .to_owned()
}

fn upgrade(path: &str, extra: &str, skip: &[&str]) -> Vec<u8> {
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: x\r\n");
    for (k, v) in [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ] {
        if !skip.contains(&k) {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    head.push_str(extra);
    head.push_str("\r\n");
    head.into_bytes()
}

/// The status code of the first close frame among the server's (unmasked) frames.
fn close_code(mut bytes: &[u8]) -> Option<u16> {
    while bytes.len() >= 2 {
        let opcode = bytes[0] & 0x0f;
        let (len, head) = match bytes[1] & 0x7f {
            126 if bytes.len() >= 4 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
            127 if bytes.len() >= 10 => (
                usize::try_from(u64::from_be_bytes(bytes[2..10].try_into().ok()?)).ok()?,
                10,
            ),
            n if n < 126 => (usize::from(n), 2),
            _ => return None,
        };
        let payload = bytes.get(head..head + len)?;
        if opcode == 8 {
            return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
        bytes = &bytes[head + len..];
    }
    None
}

/// A noVNC-like client of the good session that must keep its console.
struct Watcher {
    client: Client,
}

impl Watcher {
    async fn connect(url: &str) -> Watcher {
        let mut client = Client::connect(url).await;
        assert_eq!(client.read(12).await, b"RFB 003.008\n");
        let (w, h) = client.handshake().await;
        assert!(w > 0 && h > 0);
        Watcher { client }
    }

    /// The connection still works end to end: a ping through the proxy gets its pong.
    async fn alive(&mut self, after: &str) {
        self.client
            .ws
            .send(Message::Ping(b"still there?".to_vec().into()))
            .await
            .unwrap_or_else(|e| panic!("the good client's connection broke after {after}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.client.ws.next()).await {
                Ok(Some(Ok(Message::Pong(p)))) if &p[..] == b"still there?" => return,
                Ok(Some(Ok(_))) => continue,
                other => panic!("the good client lost its console after {after}: {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_http_requests_get_errors_and_the_proxy_keeps_serving() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(4);
    // The builtin proxy with static files, so traversal has something to aim at.
    let web = v.tmp.path().join("web");
    std::fs::create_dir_all(web.join("app")).unwrap();
    std::fs::write(web.join("vnc.html"), "<html>noVNC</html>").unwrap();
    std::fs::write(v.tmp.path().join("secret.txt"), "TOP-SECRET").unwrap();
    std::os::unix::fs::symlink(v.tmp.path().join("secret.txt"), web.join("app/leak.txt")).unwrap();
    v.extra.extend([
        "--backend".into(),
        "builtin".into(),
        "--web".into(),
        web.display().to_string(),
    ]);
    v.start();
    v.add_session("good", qemu.port);
    let good = Good::of(&v);
    let port = good.port.as_u64().unwrap() as u16;
    // A fresh console URL (a ticket) for each real connection; the malformed upgrades
    // below share one that is never spent, since only an accepted upgrade uses it up.
    let ticket_of = |url: String| url.split("token%3D").nth(1).unwrap().to_owned();
    let ws_url = |v: &Vncd| {
        format!(
            "ws://127.0.0.1:{port}/websockify?token={}",
            ticket_of(v.url("good"))
        )
    };
    let mut watcher = Watcher::connect(&ws_url(&v)).await;
    let token = ticket_of(v.url("good"));
    let tok = |path: &str| format!("{path}?token={token}");

    let mut big_header = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
    big_header.resize(64 * 1024, b'a');
    big_header.extend_from_slice(b"\r\n\r\n");
    let mut many_headers = String::from("GET / HTTP/1.1\r\n");
    for i in 0..200 {
        many_headers.push_str(&format!("X-{i}: y\r\n"));
    }
    many_headers.push_str("\r\n");
    let long_url = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(40_000));
    let garbage: Vec<u8> = (0..512u32)
        .map(|i| (i * 131 % 256) as u8)
        .chain(*b"\r\n\r\n")
        .collect();

    // (input, request bytes, expected start of the response)
    let cases: Vec<(String, Vec<u8>, &str)> = vec![
        ("64 KiB header".into(), big_header, "HTTP/1.1 431 "),
        (
            "200 headers".into(),
            many_headers.into_bytes(),
            "HTTP/1.1 431 ",
        ),
        (
            "40 KB request line".into(),
            long_url.into_bytes(),
            "HTTP/1.1 431 ",
        ),
        (
            "512 bytes of binary garbage".into(),
            garbage,
            "HTTP/1.1 400 ",
        ),
        (
            "TLS ClientHello on the plain port".into(),
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(),
            "HTTP/1.1 400 ",
        ),
        (
            "HTTP/2 preface".into(),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            "HTTP/1.1 400 ",
        ),
        (
            "`GET / FTP/1.1`".into(),
            b"GET / FTP/1.1\r\n\r\n".to_vec(),
            "HTTP/1.1 400 ",
        ),
        (
            "header line without a colon".into(),
            b"GET / HTTP/1.1\r\nBroken header\r\n\r\n".to_vec(),
            "HTTP/1.1 400 ",
        ),
        (
            "absolute-form target".into(),
            b"GET http://evil.example/ HTTP/1.1\r\n\r\n".to_vec(),
            "HTTP/1.1 400 ",
        ),
        (
            "upgrade without a ticket".into(),
            upgrade("/websockify", "", &[]),
            "HTTP/1.1 403 ",
        ),
        (
            "upgrade with a wrong ticket".into(),
            upgrade(
                "/websockify?token=00000000000000000000000000000000",
                "",
                &[],
            ),
            "HTTP/1.1 403 ",
        ),
        (
            "upgrade with the ticket as a path segment, wrong".into(),
            upgrade("/websockify/deadbeef", "", &[]),
            "HTTP/1.1 403 ",
        ),
        (
            "upgrade on an unknown path".into(),
            upgrade(&tok("/a/b/c"), "", &[]),
            "HTTP/1.1 404 ",
        ),
        (
            "websocket version 8".into(),
            upgrade(
                &tok("/websockify"),
                "Sec-WebSocket-Version: 8\r\n",
                &["Sec-WebSocket-Version"],
            ),
            "HTTP/1.1 426 ",
        ),
        (
            "missing Sec-WebSocket-Key".into(),
            upgrade(&tok("/websockify"), "", &["Sec-WebSocket-Key"]),
            "HTTP/1.1 400 ",
        ),
        (
            "empty Sec-WebSocket-Key".into(),
            upgrade(
                &tok("/websockify"),
                "Sec-WebSocket-Key: \r\n",
                &["Sec-WebSocket-Key"],
            ),
            "HTTP/1.1 400 ",
        ),
        (
            "Sec-WebSocket-Key not 16 bytes of base64".into(),
            upgrade(
                &tok("/websockify"),
                "Sec-WebSocket-Key: not-a-key\r\n",
                &["Sec-WebSocket-Key"],
            ),
            "HTTP/1.1 400 ",
        ),
        (
            "Sec-WebSocket-Key of 17 bytes".into(),
            upgrade(
                &tok("/websockify"),
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZXg=\r\n",
                &["Sec-WebSocket-Key"],
            ),
            "HTTP/1.1 400 ",
        ),
        (
            "two Host headers".into(),
            upgrade(&tok("/websockify"), "Host: evil.example\r\n", &[]),
            "HTTP/1.1 400 ",
        ),
        (
            "missing Connection: Upgrade".into(),
            upgrade(
                &tok("/websockify"),
                "Connection: keep-alive\r\n",
                &["Connection"],
            ),
            "HTTP/1.1 400 ",
        ),
        (
            "upgrade by POST".into(),
            String::from_utf8(upgrade(&tok("/websockify"), "", &[]))
                .unwrap()
                .replacen("GET", "POST", 1)
                .into_bytes(),
            "HTTP/1.1 400 ",
        ),
        (
            "subprotocol base64 only".into(),
            upgrade(
                &tok("/websockify"),
                "Sec-WebSocket-Protocol: base64\r\n",
                &[],
            ),
            "HTTP/1.1 400 ",
        ),
        (
            "unknown subprotocol".into(),
            upgrade(&tok("/websockify"), "Sec-WebSocket-Protocol: chat\r\n", &[]),
            "HTTP/1.1 400 ",
        ),
        (
            "`GET /../secret.txt`".into(),
            b"GET /../secret.txt HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            "HTTP/1.1 403 ",
        ),
        (
            "`GET /%2e%2e/secret.txt`".into(),
            b"GET /%2e%2e/secret.txt HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            "HTTP/1.1 403 ",
        ),
        (
            "`GET /app/%2E%2E%2F%2E%2E%2Fsecret.txt`".into(),
            b"GET /app/%2E%2E%2F%2E%2E%2Fsecret.txt HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            "HTTP/1.1 403 ",
        ),
        (
            "`GET /..%5csecret.txt` (backslash)".into(),
            b"GET /..%5csecret.txt HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            "HTTP/1.1 403 ",
        ),
        (
            "`GET /app/leak.txt` (symlink out of the web root)".into(),
            b"GET /app/leak.txt HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            "HTTP/1.1 403 ",
        ),
        (
            "`GET /vnc.html%00.png` (NUL)".into(),
            b"GET /vnc.html%00.png HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            "HTTP/1.1 403 ",
        ),
        (
            "`GET /.git/config` (hidden segment)".into(),
            b"GET /.git/config HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            "HTTP/1.1 403 ",
        ),
        (
            "`GET /%zz` (bad escape)".into(),
            b"GET /%zz HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            "HTTP/1.1 400 ",
        ),
        (
            "`GET /%ff` (not UTF-8)".into(),
            b"GET /%ff HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            "HTTP/1.1 400 ",
        ),
        (
            "`DELETE /vnc.html`".into(),
            b"DELETE /vnc.html HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            "HTTP/1.1 405 ",
        ),
        (
            "closed inside the request head".into(),
            b"GET /vnc.html HTTP/1.1\r\nHost:".to_vec(),
            "",
        ),
    ];
    let mut rows = Vec::new();
    for (what, req, expect) in &cases {
        let resp = if expect.is_empty() {
            // Half a head, then the client closes its side.
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            s.write_all(req).await.unwrap();
            s.shutdown().await.unwrap();
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        } else {
            raw(port, req).await
        };
        let line = status_line(&resp);
        if expect.is_empty() {
            assert!(
                resp.is_empty() || resp.starts_with("HTTP/1.1 400 "),
                "{what}: {resp}"
            );
        } else {
            assert!(
                resp.starts_with(expect),
                "{what}: expected {expect:?}, got {resp:?}"
            );
        }
        assert!(
            !resp.contains("TOP-SECRET"),
            "{what} leaked the secret file"
        );
        let body = resp
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or("")
            .trim()
            .to_owned();
        watcher.alive(what).await;
        good.assert_undisturbed(&mut v, what);
        rows.push(Row {
            input: what.clone(),
            got: if body.is_empty() {
                line
            } else {
                format!("{line} — {body}")
            },
        });
    }

    // After a good upgrade: garbage instead of websocket frames, and a frame claiming
    // an absurd length. The proxy ends that connection and nothing else.
    for (what, frames) in [
        (
            "64 bytes of 0xff after a good upgrade (reserved bits and opcode)",
            vec![0xffu8; 64],
        ),
        (
            "continuation frame with nothing to continue",
            vec![0x80, 0x80, 1, 2, 3, 4],
        ),
        ("unmasked client frame", vec![0x82, 0x03, 1, 2, 3]),
        (
            "frame claiming 2^63 bytes",
            [
                0x82u8, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4,
            ]
            .to_vec(),
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        // An accepted upgrade spends its ticket: a fresh one each time.
        let fresh = format!("/websockify?token={}", ticket_of(v.url("good")));
        s.write_all(&upgrade(&fresh, "Sec-WebSocket-Protocol: binary\r\n", &[]))
            .await
            .unwrap();
        let mut head = vec![0u8; 512];
        let n = s.read(&mut head).await.unwrap();
        assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 101 "));
        s.write_all(&frames).await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "{what}: the proxy kept the connection open");
        let close =
            close_code(&rest).map_or("no close frame".into(), |c| format!("close code {c}"));
        watcher.alive(what).await;
        good.assert_undisturbed(&mut v, what);
        rows.push(Row {
            input: what.into(),
            got: format!("101, then the proxy ended that connection ({close})"),
        });
    }

    // Slowloris: 30 connections dribbling a head one byte at a time, 10 sending nothing.
    // The good client keeps working and a new client gets its banner meanwhile; each slow
    // connection gets 408 (or is closed) once the 10 s head timeout passes.
    let started = Instant::now();
    let mut slow = Vec::new();
    for i in 0..40 {
        slow.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            if i < 30 {
                for b in b"GET /vnc.html HTTP/1.1\r\nHost: slow\r\nX-Drip: ".iter() {
                    if s.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
            }
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    watcher.alive("slowloris in progress").await;
    // The relay caps pending connections per source address (32), so the flood's own
    // address is full: the newcomer comes from an address of its own, as a real client
    // does. A per-session proxy evicts its oldest pending connection for a newcomer.
    let on_relay = v.on_relay();
    let newcomer = if on_relay {
        common::try_banner_from(&ws_url(&v), std::net::Ipv4Addr::new(127, 0, 0, 2)).await
    } else {
        try_banner(&ws_url(&v)).await
    };
    assert_eq!(newcomer.unwrap(), b"RFB 003.008\n");
    let mut answers = std::collections::BTreeMap::new();
    for t in slow {
        let resp = t.await.unwrap();
        let line = status_line(&resp);
        // 408 after the head timeout; or, past --max-connections (16), closed to make
        // room for a newer connection, or 503 while the evicted ones are still closing.
        assert!(
            resp.is_empty()
                || resp.starts_with("HTTP/1.1 408 ")
                || resp.starts_with("HTTP/1.1 503 "),
            "slow client got {resp:?}"
        );
        *answers.entry(line).or_insert(0) += 1;
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(25),
        "slow clients held for {took:?}"
    );
    watcher.alive("slowloris").await;
    good.assert_undisturbed(&mut v, "slowloris");
    rows.push(Row {
        input: "slowloris: 30 heads dripped a byte per 400 ms + 10 silent connections".into(),
        got: if on_relay {
            format!("{answers:?} (408 after the 10 s head timeout; past 32 pending from one address the rest are closed at once); the good client and a new one from another address were served meanwhile")
        } else {
            format!("{answers:?} (408 after the 10 s head timeout; past 16 connections the oldest unauthenticated ones are closed, 503 while they close); the good client and a new one were served meanwhile")
        },
    });

    // Still serving, files included.
    assert_eq!(try_banner(&ws_url(&v)).await.unwrap(), b"RFB 003.008\n");
    let page = raw(port, b"GET /vnc.html HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(
        page.starts_with("HTTP/1.1 200 ") && page.ends_with("<html>noVNC</html>"),
        "{page}"
    );
    print_table("HTTP requests to the builtin proxy", &rows);
    assert!(rows.len() >= 30);
}
