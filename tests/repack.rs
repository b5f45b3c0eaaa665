//! The seed's dynamic port range: `vncd run` restarted with another `--port-range` keeps
//! serving the leases it finds outside the new pool, reports them as `OutsidePool`, and
//! moves each into the pool once no console is open on it, or at once with
//! `vncd cleanup --once --repack`. Real `vncd`, real proxies, QEMU as the VNC server.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Client, Qemu, Vncd, wait_for};
use serde_json::Value;

fn port_of(v: &Vncd, name: &str) -> u16 {
    v.item(name).unwrap()["status"]["port"].as_u64().unwrap() as u16
}

fn inside(range: (u16, u16), port: u16) -> bool {
    (range.0..=range.1).contains(&port)
}

/// Waits until `name` is Ready on a port inside `range`.
fn wait_moved(v: &Vncd, name: &str, range: (u16, u16)) -> Value {
    wait_for(
        &format!("{name} Ready inside {range:?}"),
        Duration::from_secs(30),
        || {
            let st = v.item(name)?["status"].clone();
            let port = st["port"].as_u64()? as u16;
            (st["phase"] == "Ready" && st["reason"] == "ProxyReady" && inside(range, port))
                .then_some(st)
        },
    )
}

/// Waits until the restarted vncd reports `name` Ready with reason `OutsidePool` (until its
/// first pass, `vncd get` still shows what the previous instance wrote).
fn wait_outside(v: &Vncd, name: &str) -> Value {
    wait_for(
        &format!("{name} Ready/OutsidePool"),
        Duration::from_secs(30),
        || {
            let st = v.item(name)?["status"].clone();
            (st["phase"] == "Ready" && st["reason"] == "OutsidePool").then_some(st)
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_port_range_moves_idle_leases_in_and_keeps_open_consoles() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(10);
    let first = v.range;
    for n in ["vm1", "vm2", "vm3"] {
        v.add_session(n, qemu.port);
    }
    v.start();
    for n in ["vm1", "vm2", "vm3"] {
        v.wait_ready(n);
    }
    let vm1_port = port_of(&v, "vm1");
    // A console open on vm1 across the restart.
    let mut console = Client::connect(&v.url("vm1")).await;
    assert_eq!(console.read(12).await, b"RFB 003.008\n");
    let (w, h) = console.handshake().await;
    // The rest of ServerInit: pixel format, then the name.
    console.read(16).await;
    let len = console.read(4).await;
    console
        .read(u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize)
        .await;
    v.terminate();

    // The same state directory, another pool.
    let base = common::pool_base(10);
    v.range = (base, base + 9);
    assert!(!inside(v.range, vm1_port));
    v.start();
    // vm2 and vm3 had no console: they move into the new pool, with new URLs.
    for n in ["vm2", "vm3"] {
        let st = wait_moved(&v, n, v.range);
        assert!(!inside(first, st["port"].as_u64().unwrap() as u16));
    }
    // vm1 keeps serving its old port, Ready, and says why it is outside the pool.
    let st = wait_outside(&v, "vm1");
    assert_eq!(st["port"].as_u64().unwrap() as u16, vm1_port);
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("console(s) are open"),
        "{st}"
    );
    // Its console is still the same connection: a framebuffer update comes back.
    let mut req = vec![3u8, 0, 0, 0, 0, 0];
    req.extend_from_slice(&w.to_be_bytes());
    req.extend_from_slice(&h.to_be_bytes());
    console.write(&req).await;
    assert_eq!(
        console.read(1).await,
        [0],
        "no FramebufferUpdate on the kept console"
    );
    // `vncd status` counts it, instead of saying nothing is allocated.
    let out = v.cmd(&["status", "--state-dir", v.state.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("allocated:     2 "), "{text}");
    assert!(text.contains("outside pool:  1 leases"), "{text}");
    let out = v.cmd(&["status", "--json", "--state-dir", v.state.to_str().unwrap()]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["port_pool"]["outside_pool_leases"], 1, "{json}");

    // --repack moves it at once, open console or not.
    let out = v.cmd(&[
        "cleanup",
        "--once",
        "--repack",
        "--state-dir",
        v.state.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "cleanup --repack failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_moved(&v, "vm1", v.range);
    // Every session now serves in the new pool, and the new URL opens vm1's console.
    let mut again = Client::connect(&v.url("vm1")).await;
    assert_eq!(again.read(12).await, b"RFB 003.008\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_outside_the_pool_moves_in_when_its_console_closes() {
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(4);
    v.add_session("vm1", qemu.port);
    v.start();
    v.wait_ready("vm1");
    let mut console = Client::connect(&v.url("vm1")).await;
    assert_eq!(console.read(12).await, b"RFB 003.008\n");
    v.terminate();
    let base = common::pool_base(4);
    v.range = (base, base + 3);
    v.start();
    wait_outside(&v, "vm1");
    drop(console);
    wait_moved(&v, "vm1", v.range);
}
