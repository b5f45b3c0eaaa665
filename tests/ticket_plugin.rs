//! The websockify ticket plugin (contrib/websockify/vncd_ticket.py) against the Rust ticket
//! code: first the plugin alone in python3 (known-answer vectors, tampering, expiry,
//! replays, key file checks, one nonce directory shared with the Rust `DirNonces`), then a
//! real websockify loading it in front of a real QEMU VNC server, with tickets minted by
//! `vncd::ticket::mint`, as vncd's websockify backend runs it (token plugin plus the
//! auth plugin that spends a ticket only for an upgrade websockify completes).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use vncd::session::Endpoint;
use vncd::ticket::{
    self, DEFAULT_TTL, DirNonces, LeaseKey, MasterKey, NonceStore, TicketError, unix_now,
};

const PLUGIN_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/websockify");
const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/ticket-vectors.json"
);

/// Runs a list of calls through the plugin module in one python3 process, in order, and
/// returns one result per call: `{"ok": value}` or `{"err": message, "kind": class name}`.
/// Calls: `lookup` (the websockify entry point, real clock), `verify` (a fixed `now`),
/// `lease_key` (the derivation, recomputed independently of the plugin), and `prune` and
/// `consume` (the nonce directory, with an optional or fixed `now`).
const DRIVER: &str = r#"
import hashlib, hmac, json, struct, sys
import vncd_ticket as vt

def lease_key(master, session, uid):
    s, u = session.encode(), uid.encode()
    msg = b"vncd lease key v1\0" + struct.pack(">I", len(s)) + s + struct.pack(">I", len(u)) + u
    return hmac.new(master, msg, hashlib.sha256).hexdigest()

out = []
for c in json.load(sys.stdin):
    try:
        if c["op"] == "lookup":
            r = list(vt.VncdTicket(c["src"]).lookup(c["token"]))
        elif c["op"] == "verify":
            nonce, exp = vt.verify(bytes.fromhex(c["key"]), c["token"], c["now"])
            r = [nonce.hex(), exp]
        elif c["op"] == "lease_key":
            r = lease_key(bytes.fromhex(c["master"]), c["session"], c["uid"])
        elif c["op"] == "prune":
            now = c.get("now")
            r = vt.prune(c["dir"], (lambda: now) if now is not None else vt.time.time)
        elif c["op"] == "consume":
            now = c["now"]
            r = vt.consume(c["dir"], bytes.fromhex(c["nonce"]), c["exp"], lambda: now)
        out.append({"ok": r})
    except Exception as e:
        out.append({"err": str(e), "kind": type(e).__name__})
print(json.dumps(out))
"#;

fn python(calls: &[Value]) -> Vec<Value> {
    common::require("python3");
    let mut child = Command::new("python3")
        .args(["-c", DRIVER])
        .env("PYTHONPATH", PLUGIN_DIR)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = serde_json::to_vec(calls).unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python3 driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.len(), calls.len());
    v
}

/// A 0600 key file for websockify as vncd will write it, and its (0700) nonce directory.
fn key_file(dir: &Path, name: &str, key: &LeaseKey, target: &Endpoint) -> PathBuf {
    let nonces = dir.join(format!("{name}.nonces"));
    fs::create_dir_all(&nonces).unwrap();
    fs::set_permissions(&nonces, fs::Permissions::from_mode(0o700)).unwrap();
    let path = dir.join(format!("{name}.key"));
    let text = ticket::websockify_key_file(name, key, target, &nonces).unwrap();
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn lookup(src: &Path, token: &str) -> Value {
    json!({"op": "lookup", "src": src, "token": token})
}

#[track_caller]
fn ok(r: &Value) -> &Value {
    // No closure: #[track_caller] must reach the panic, so a failure names the call.
    match r.get("ok") {
        Some(v) => v,
        None => panic!("plugin refused a good ticket: {r}"),
    }
}

/// Asserts a refusal whose message says `why` and does not contain the ticket.
#[track_caller]
fn refused(r: &Value, why: &str, ticket: &str) {
    let Some(msg) = r["err"].as_str() else {
        panic!("plugin accepted a ticket it must refuse ({why})");
    };
    assert!(msg.contains(why), "refused for another reason: {msg}");
    for part in ticket.split('.').skip(2) {
        assert!(!msg.contains(part), "the refusal shows the ticket: {msg}");
    }
}

fn tcp(port: u16) -> Endpoint {
    Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port,
    }
}

/// Replaces field `i` (0 version, 1 expiry, 2 nonce, 3 mac) of a ticket.
fn with_field(text: &str, i: usize, value: &str) -> String {
    let mut parts: Vec<String> = text.split('.').map(str::to_owned).collect();
    parts[i] = value.to_owned();
    parts.join(".")
}

/// Flips one character of field `i` to another character of the base64url alphabet.
fn flip(text: &str, i: usize) -> String {
    let field = text.split('.').nth(i).unwrap();
    let mut b = field.as_bytes().to_vec();
    b[0] = if b[0] == b'A' { b'B' } else { b'A' };
    with_field(text, i, std::str::from_utf8(&b).unwrap())
}

#[test]
fn the_plugin_checks_tickets_exactly_as_the_rust_code_does() {
    let tmp = tempfile::tempdir().unwrap();
    let data: Value = serde_json::from_str(&fs::read_to_string(VECTORS).unwrap()).unwrap();
    let vectors = data["vectors"].as_array().unwrap();
    let master = data["master_key_hex"].as_str().unwrap();

    // 1. Known answers: the lease key derivation and every vector, once accepted (with the
    //    target from the key file) and then refused as a replay; the expired one refused.
    let mut calls = Vec::new();
    let mut expect = Vec::new();
    for (i, v) in vectors.iter().enumerate() {
        let t = v["ticket"].as_str().unwrap();
        let key = LeaseKey::from_hex(v["lease_key_hex"].as_str().unwrap()).unwrap();
        let src = key_file(tmp.path(), &format!("v{i}"), &key, &tcp(5901));
        calls.push(json!({"op": "lease_key", "master": master,
            "session": v["session"], "uid": v["lease_uid"]}));
        expect.push(("lease_key", v["lease_key_hex"].clone(), t.to_owned()));
        calls.push(lookup(&src, t));
        calls.push(lookup(&src, t));
        if v["valid_now"].as_bool().unwrap() {
            // Valid a minute before its expiry, but that expiry is years away: refused on
            // the real clock, twice, because a refused ticket is never spent.
            let exp = v["expires_at"].as_u64().unwrap();
            calls.push(
                json!({"op": "verify", "key": v["lease_key_hex"], "token": t, "now": exp - 60}),
            );
            expect.push(("beyond the longest ticket TTL", Value::Null, t.to_owned()));
            expect.push(("beyond the longest ticket TTL", Value::Null, t.to_owned()));
            expect.push(("verify", json!(exp), t.to_owned()));
        } else {
            expect.push(("ticket expired", Value::Null, t.to_owned()));
            expect.push(("ticket expired", Value::Null, t.to_owned()));
        }
    }
    let results = python(&calls);
    for (r, (what, value, t)) in results.iter().zip(&expect) {
        match *what {
            "lease_key" | "accept" => assert_eq!(ok(r), value, "{what}"),
            "verify" => assert_eq!(&ok(r)[1], value, "{what}"),
            why => refused(r, why, t),
        }
    }

    // 2. Expiry boundary, tampering and a wrong lease key, at a fixed `now`.
    let v0 = &vectors[0];
    let t0 = v0["ticket"].as_str().unwrap();
    let k0 = v0["lease_key_hex"].as_str().unwrap();
    let exp = v0["expires_at"].as_u64().unwrap();
    let other_key = vectors[2]["lease_key_hex"].as_str().unwrap();
    assert_ne!(k0, other_key);
    let verify = |key: &str, token: &str, now: u64| json!({"op": "verify", "key": key, "token": token, "now": now});
    let cases: Vec<(Value, &str, String)> = vec![
        (verify(k0, t0, exp - 1), "", t0.to_owned()),
        (verify(k0, t0, exp), "ticket expired", t0.to_owned()),
        (verify(other_key, t0, 0), "signature", t0.to_owned()),
        (verify(k0, &flip(t0, 2), 0), "signature", flip(t0, 2)),
        (verify(k0, &flip(t0, 3), 0), "signature", flip(t0, 3)),
        (
            verify(k0, &with_field(t0, 1, &(exp + 1).to_string()), 0),
            "signature",
            t0.to_owned(),
        ),
        (
            verify(k0, &with_field(t0, 0, "v2"), 0),
            "malformed",
            t0.to_owned(),
        ),
        (
            verify(k0, &with_field(t0, 1, &format!("0{exp}")), 0),
            "malformed",
            t0.to_owned(),
        ),
        (verify(k0, &format!("{t0}="), 0), "malformed", t0.to_owned()),
        (
            verify(k0, &format!("{t0}.x"), 0),
            "malformed",
            t0.to_owned(),
        ),
        (
            verify(k0, &t0[..t0.len() - 1], 0),
            "malformed",
            t0.to_owned(),
        ),
        (verify(k0, "", 0), "malformed", String::new()),
        (verify(k0, &"A".repeat(5000), 0), "malformed", String::new()),
        // Non-ASCII digits must not pass as a decimal expiry.
        (
            verify(k0, &with_field(t0, 1, "４１０２４４４８００"), 0),
            "malformed",
            t0.to_owned(),
        ),
    ];
    // The second vector's nonce is all ones: its last character "w" has zero trailing bits;
    // "x" decodes to the same bytes with one more bit set, a second spelling Rust refuses.
    let t1 = vectors[1]["ticket"].as_str().unwrap();
    let nonce1 = t1.split('.').nth(2).unwrap();
    assert!(nonce1.ends_with('w'));
    let alias = with_field(t1, 2, &format!("{}x", &nonce1[..21]));
    let mut cases = cases;
    cases.push((verify(k0, &alias, 0), "malformed", alias.clone()));
    let lease0 = LeaseKey::from_hex(k0).unwrap();
    assert!(matches!(
        ticket::verify(&lease0, &alias, 0),
        Err(TicketError::Malformed)
    ));
    let calls: Vec<Value> = cases.iter().map(|c| c.0.clone()).collect();
    for (r, (_, why, t)) in python(&calls).iter().zip(&cases) {
        if why.is_empty() {
            assert_eq!(ok(r)[1], exp);
        } else {
            refused(r, why, t);
        }
    }

    // 3. Fresh tickets from the Rust `mint` (random nonces) are accepted once; a unix
    //    target comes back the way websockify expects one; expired and other-lease
    //    tickets are refused.
    let m = MasterKey::from_bytes([42; 32]);
    let key = m.lease_key("vm7", "aaaaaaaaaaaaaaaa");
    let newer = m.lease_key("vm7", "bbbbbbbbbbbbbbbb");
    let sock = Endpoint::Unix {
        path: "/run/vm 7.sock".into(),
    };
    let src = key_file(tmp.path(), "vm7", &key, &sock);
    let mut calls = Vec::new();
    let now = unix_now();
    let fresh: Vec<String> = (0..20)
        .map(|_| ticket::mint(&key, DEFAULT_TTL, now).unwrap().text)
        .collect();
    for t in &fresh {
        calls.push(lookup(&src, t));
    }
    let expired = ticket::mint(&key, DEFAULT_TTL, now - 3600).unwrap().text;
    let retargeted = ticket::mint(&newer, DEFAULT_TTL, now).unwrap().text;
    calls.push(lookup(&src, &expired));
    calls.push(lookup(&src, &retargeted));
    calls.push(lookup(&src, &fresh[3]));
    let r = python(&calls);
    for x in &r[..20] {
        assert_eq!(ok(x), &json!(["unix_socket", "/run/vm 7.sock"]));
    }
    refused(&r[20], "ticket expired", &expired);
    refused(&r[21], "signature", &retargeted);
    refused(&r[22], "ticket already used", &fresh[3]);

    // 4. One nonce directory, two implementations: a use recorded by either is a replay
    //    for the other.
    let nonces = tmp.path().join("vm7.nonces");
    let rust_store = DirNonces::new(&nonces);
    let by_rust = ticket::mint(&key, DEFAULT_TTL, now).unwrap().text;
    ticket::check(&key, &by_rust, now, &rust_store).unwrap();
    let by_python = ticket::mint(&key, DEFAULT_TTL, now).unwrap().text;
    let r = python(&[lookup(&src, &by_rust), lookup(&src, &by_python)]);
    refused(&r[0], "ticket already used", &by_rust);
    ok(&r[1]);
    let v = ticket::verify(&key, &by_python, now).unwrap();
    assert!(matches!(rust_store.consume(&v), Err(TicketError::Replayed)));

    // 5. Pruning: the plugin removes records long expired, keeps fresh ones and foreign files.
    let stale = nonces.join(format!("{}.AAAAAAAAAAAAAAAAAAAAAA", now - 1000));
    fs::write(&stale, "").unwrap();
    fs::write(nonces.join("README"), "").unwrap();
    let before = fs::read_dir(&nonces).unwrap().count();
    let r = python(&[json!({"op": "prune", "dir": nonces})]);
    assert_eq!(ok(&r[0]), 1);
    assert!(!stale.exists());
    assert_eq!(fs::read_dir(&nonces).unwrap().count(), before - 1);

    // 6. The race the post-record clock check closes: a replay verified before expiry
    //    that stalls until another process pruned the first use is still refused.
    let race = tmp.path().join("race");
    fs::create_dir(&race).unwrap();
    let (exp, late) = (now + 60, now + 60 + ticket::PRUNE_GRACE_SECS);
    let nonce = "00112233445566778899aabbccddeeff";
    let consume =
        |at: u64| json!({"op": "consume", "dir": race, "nonce": nonce, "exp": exp, "now": at});
    let r = python(&[
        consume(now),
        consume(now + 1),
        json!({"op": "prune", "dir": race, "now": late - 1}),
        json!({"op": "prune", "dir": race, "now": late}),
        consume(late),
    ]);
    ok(&r[0]);
    refused(&r[1], "ticket already used", "");
    assert_eq!(ok(&r[2]), 0);
    assert_eq!(ok(&r[3]), 1);
    refused(&r[4], "ticket expired", "");

    // 7. Key files it must not trust, and a nonce directory it cannot write: refused.
    let t = ticket::mint(&key, DEFAULT_TTL, now).unwrap().text;
    let loose = key_file(tmp.path(), "loose", &key, &tcp(5901));
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o640)).unwrap();
    let link = tmp.path().join("link.key");
    std::os::unix::fs::symlink(&src, &link).unwrap();
    let no_nonces = key_file(tmp.path(), "gone", &key, &tcp(5901));
    fs::remove_dir(tmp.path().join("gone.nonces")).unwrap();
    let r = python(&[
        lookup(&loose, &t),
        lookup(&link, &t),
        lookup(&tmp.path().join("missing.key"), &t),
        lookup(&no_nonces, &t),
    ]);
    refused(&r[0], "must be 0600", &t);
    refused(&r[1], "cannot open", &t);
    refused(&r[2], "cannot open", &t);
    refused(&r[3], "cannot record ticket use", &t);
    // None of those consumed it: the right key file still accepts it once.
    let r = python(&[lookup(&src, &t), lookup(&src, &t)]);
    ok(&r[0]);
    refused(&r[1], "ticket already used", &t);
}

/// A process started by this test, in its own process group; the group is killed on drop.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.0.id() as i32), Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// A real websockify with the plugin, listening on loopback; its output goes to `log`.
fn websockify(key_file: &Path, log: &Path) -> (Group, u16) {
    for _ in 0..10 {
        let port = common::free_port();
        let out = fs::File::create(log).unwrap();
        let child = Command::new("websockify")
            .args([
                "--token-plugin",
                "vncd_ticket.VncdTicket",
                "--token-source",
                &key_file.display().to_string(),
                "--auth-plugin",
                "vncd_ticket.VncdSpend",
                &format!("127.0.0.1:{port}"),
            ])
            .env("PYTHONPATH", PLUGIN_DIR)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap();
        let mut g = Group(child);
        let listening = (0..100).any(|_| {
            if let Ok(Some(_)) = g.0.try_wait() {
                return false;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
            false
        });
        if listening {
            return (g, port);
        }
    }
    panic!(
        "websockify did not start: {}",
        fs::read_to_string(log).unwrap_or_default()
    );
}

fn url(port: u16, ticket: Option<&str>) -> String {
    match ticket {
        Some(t) => format!("ws://127.0.0.1:{port}/websockify?token={t}"),
        None => format!("ws://127.0.0.1:{port}/websockify"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_websockify_accepts_a_ticket_once() {
    // A missing websockify fails the test: the plugin is proven only against the real one.
    common::require("websockify");
    let tmp = tempfile::tempdir().unwrap();
    let qemu = common::Qemu::tcp();
    let m = MasterKey::load_or_create(&tmp.path().join("ticket.key")).unwrap();
    let key = m.lease_key("vm1", "1111222233334444");
    let src = key_file(tmp.path(), "vm1", &key, &tcp(qemu.port));
    let log = tmp.path().join("websockify.log");
    let (_ws, port) = websockify(&src, &log);
    let now = unix_now();

    // No ticket: refused.
    let r = common::try_banner(&url(port, None)).await;
    assert!(r.is_err(), "no ticket got through: {r:?}");

    // A ticket for another lease (the same session before a retarget): refused.
    let old = m.lease_key("vm1", "0000000000000000");
    let foreign = ticket::mint(&old, DEFAULT_TTL, now).unwrap().text;
    let r = common::try_banner(&url(port, Some(&foreign))).await;
    assert!(r.is_err(), "another lease's ticket got through: {r:?}");

    // An expired ticket: refused.
    let expired = ticket::mint(&key, DEFAULT_TTL, now - 120).unwrap().text;
    let r = common::try_banner(&url(port, Some(&expired))).await;
    assert!(r.is_err(), "an expired ticket got through: {r:?}");

    // A good ticket: the real VNC server's banner, with the RFB handshake after it.
    let good = ticket::mint(&key, DEFAULT_TTL, now).unwrap().text;
    let mut c = common::Client::connect(&url(port, Some(&good))).await;
    assert_eq!(c.read(12).await, b"RFB 003.008\n");
    let (w, h) = c.handshake().await;
    assert!(w > 0 && h > 0);

    // The same ticket again, while the first connection is still open, and after it closed.
    let r = common::try_banner(&url(port, Some(&good))).await;
    assert!(r.is_err(), "a replayed ticket got through: {r:?}");
    drop(c);
    let r = common::try_banner(&url(port, Some(&good))).await;
    assert!(r.is_err(), "a replayed ticket got through: {r:?}");

    // A second ticket of the same lease still works: single use is per ticket.
    let second = ticket::mint(&key, DEFAULT_TTL, now).unwrap().text;
    assert_eq!(
        common::rfb_banner(&url(port, Some(&second))).await,
        b"RFB 003.008\n"
    );

    // The refusals are logged with their reasons, and the tickets that were never
    // accepted appear nowhere in websockify's log.
    let text = fs::read_to_string(&log).unwrap();
    for t in [&foreign, &expired] {
        for part in t.split('.').skip(2) {
            assert!(!text.contains(part), "log shows a refused ticket:\n{text}");
        }
    }
    for why in [
        "vncd ticket refused (session vm1): ticket signature does not verify",
        "vncd ticket refused (session vm1): ticket expired",
        "vncd ticket refused (session vm1): ticket already used",
    ] {
        assert!(text.contains(why), "log lacks {why:?}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_websockify_reaches_a_unix_socket_target() {
    // A missing websockify fails the test: the plugin is proven only against the real one.
    common::require("websockify");
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("vnc.sock");
    let _qemu = common::Qemu::unix(&sock);
    let key = MasterKey::from_bytes([7; 32]).lease_key("vm2", "5555666677778888");
    let target = Endpoint::Unix {
        path: sock.display().to_string(),
    };
    let src = key_file(tmp.path(), "vm2", &key, &target);
    let (_ws, port) = websockify(&src, &tmp.path().join("websockify.log"));
    let t = ticket::mint(&key, DEFAULT_TTL, unix_now()).unwrap().text;
    assert_eq!(
        common::rfb_banner(&url(port, Some(&t))).await,
        b"RFB 003.008\n"
    );
    assert!(common::try_banner(&url(port, Some(&t))).await.is_err());
}

/// Sends a raw upgrade request whose `Sec-WebSocket-Version` is `version` and returns the
/// status line of the answer.
fn raw_upgrade(port: u16, ticket: &str, version: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /websockify?token={ticket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: {version}\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_websockify_spends_a_ticket_only_for_an_upgrade_it_completes() {
    common::require("websockify");
    let tmp = tempfile::tempdir().unwrap();
    let qemu = common::Qemu::tcp();
    let key = MasterKey::from_bytes([9; 32]).lease_key("vm1", "9999888877776666");
    let src = key_file(tmp.path(), "vm1", &key, &tcp(qemu.port));
    let log = tmp.path().join("websockify.log");
    let (_ws, port) = websockify(&src, &log);
    let good = ticket::mint(&key, DEFAULT_TTL, unix_now()).unwrap().text;

    // A good ticket on an upgrade websockify refuses (a websocket version it does not
    // speak): refused, and the ticket is not used up.
    let status = raw_upgrade(port, &good, "99");
    assert!(
        !status.contains(" 101 "),
        "a bad upgrade was switched: {status:?}"
    );
    assert!(
        fs::read_dir(tmp.path().join("vm1.nonces"))
            .unwrap()
            .next()
            .is_none(),
        "the bad upgrade spent the ticket"
    );
    // The same ticket then opens the console, once.
    assert_eq!(
        common::rfb_banner(&url(port, Some(&good))).await,
        b"RFB 003.008\n"
    );
    assert!(common::try_banner(&url(port, Some(&good))).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_websockify_refuses_a_ticket_that_lives_for_years() {
    common::require("websockify");
    let tmp = tempfile::tempdir().unwrap();
    let qemu = common::Qemu::tcp();
    let key = MasterKey::from_bytes([3; 32]).lease_key("vm1", "1212343456567878");
    let src = key_file(tmp.path(), "vm1", &key, &tcp(qemu.port));
    let log = tmp.path().join("websockify.log");
    let (_ws, port) = websockify(&src, &log);
    let ten_years = Duration::from_secs(10 * 365 * 24 * 3600);
    let forever = ticket::mint(&key, ten_years, unix_now()).unwrap().text;
    assert!(matches!(
        ticket::verify(&key, &forever, unix_now()),
        Err(TicketError::TooFarAhead)
    ));
    let r = common::try_banner(&url(port, Some(&forever))).await;
    assert!(r.is_err(), "a ten-year ticket opened the console: {r:?}");
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("beyond the longest ticket TTL"),
        "log lacks the reason:\n{text}"
    );
    // Within the longest TTL it works.
    let hour = ticket::mint(&key, ticket::MAX_TTL, unix_now())
        .unwrap()
        .text;
    assert_eq!(
        common::rfb_banner(&url(port, Some(&hour))).await,
        b"RFB 003.008\n"
    );
}
