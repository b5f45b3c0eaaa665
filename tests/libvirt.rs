//! The libvirt source end to end: the real vncd binary, a real libvirtd (started by
//! scripts/libvirtd-up), real QEMU domains and real websockify, with a websocket client
//! reading the RFB banner through vncd's ports.
//!
//! The tests share one libvirtd and every vncd serves every running domain, so they
//! run one at a time (a file lock), and one of them restarts libvirtd. Domain
//! names carry this process's pid (`vncdtest-PID-...`); every domain a test defines is
//! destroyed and undefined by a Drop guard, and domains left by a test process that
//! no longer exists (killed before its guards ran) are removed before each test.
//!
//! Only with `--features libvirt` (the default build has no libvirt source): without it
//! this binary runs zero tests, which `.ci/run` counts as a failure of the libvirt run.
#![cfg(feature = "libvirt")]
#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Once;
use std::time::{Duration, Instant};

use common::*;
use nix::fcntl::{Flock, FlockArg};
use serde_json::Value;
use vncd::source::libvirt::name::session_name;

const URI: &str = "qemu:///system";
const PREFIX: &str = "vncdtest-";

fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .args(["-q", "-c", URI])
        .args(args)
        .output()
        .expect("run virsh")
}

fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(
        out.status.success(),
        "virsh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts (or verifies) the real libvirtd, once per test process.
fn libvirtd_up() {
    static UP: Once = Once::new();
    UP.call_once(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/libvirtd-up");
        let out = Command::new(&script)
            .output()
            .expect("run scripts/libvirtd-up");
        assert!(
            out.status.success(),
            "scripts/libvirtd-up failed (run scripts/install-deps first): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// Held for a whole test: an exclusive flock, so libvirt tests run one at a time
/// across threads and test processes alike (they share one libvirtd).
struct Serial(#[allow(dead_code)] Flock<std::fs::File>);

/// One test at a time; libvirtd up; leftovers of dead test processes removed.
fn setup() -> Serial {
    let file = std::fs::File::create(std::env::temp_dir().join("vncd-libvirt-tests.lock")).unwrap();
    let guard = Serial(
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .unwrap(),
    );
    require("websockify");
    libvirtd_up();
    reap_stale_domains();
    guard
}

/// Removes `vncdtest-PID-*` domains whose test process is gone.
fn reap_stale_domains() {
    for name in virsh_ok(&["list", "--all", "--name"]).lines() {
        let Some(rest) = name.trim().strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = virsh(&["destroy", name.trim()]);
            let _ = virsh(&["undefine", name.trim()]);
        }
    }
}

/// A persistent test domain: defined on creation, destroyed and undefined on drop.
struct Domain {
    name: String,
}

impl Domain {
    /// Defines a diskless TCG domain whose only device is `graphics` (it boots SeaBIOS,
    /// finds nothing to boot, and keeps serving VNC).
    fn define(suffix: &str, graphics: &str) -> Domain {
        let name = format!("{PREFIX}{}-{suffix}", std::process::id());
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64'>hvm</type></os><devices>{graphics}</devices></domain>"
        );
        let file = std::env::temp_dir().join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        let d = Domain { name };
        virsh_ok(&["define", file.to_str().unwrap()]);
        let _ = std::fs::remove_file(file);
        d
    }

    /// VNC on loopback with a port libvirt picks.
    fn autoport(suffix: &str) -> Domain {
        Domain::define(
            suffix,
            "<graphics type='vnc' autoport='yes' listen='127.0.0.1'/>",
        )
    }

    fn start(&self) {
        virsh_ok(&["start", &self.name]);
    }

    fn destroy(&self) {
        virsh_ok(&["destroy", &self.name]);
    }

    fn session(&self) -> String {
        session_name(&self.name)
    }

    /// `host:port` of its VNC server, from libvirt.
    fn vnc(&self) -> String {
        let display = virsh_ok(&["vncdisplay", &self.name]);
        let (host, n) = display.trim().rsplit_once(':').unwrap();
        format!("{host}:{}", 5900 + n.parse::<u32>().unwrap())
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
    }
}

/// A vncd serving libvirt's domains, with a qemu.conf of the test's own.
fn vncd(size: u16, qemu_conf: &str) -> Vncd {
    let mut v = Vncd::new(size);
    let conf = v.tmp.path().join("qemu.conf");
    std::fs::write(&conf, qemu_conf).unwrap();
    // Domains start QEMU processes on the same two cores: a slow proxy start is load,
    // not a failure these tests look for.
    v.extra.extend([
        "--start-timeout".into(),
        "30".into(),
        "--libvirt".into(),
        URI.into(),
        "--libvirt-qemu-conf".into(),
        conf.display().to_string(),
    ]);
    v
}

/// A qemu.conf that keeps libvirt's ports away from every test pool.
const APART: &str = "remote_display_port_min = 5900\nremote_display_port_max = 6999\n\
                     remote_websocket_port_min = 5700\nremote_websocket_port_max = 5899\n";

fn port_of(status: &Value) -> u16 {
    status["port"].as_u64().unwrap() as u16
}

fn lease_ports(v: &Vncd) -> Vec<u16> {
    v.leases()["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["port"].as_u64().unwrap() as u16)
        .collect()
}

fn has_lease(v: &Vncd, session: &str) -> bool {
    v.leases()["leases"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["session"] == session)
}

fn libvirtd_pid() -> i32 {
    std::fs::read_to_string("/run/libvirtd.pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_domain_gets_a_console_and_loses_it_when_destroyed() {
    let _serial = setup();
    let mut v = vncd(5, APART);
    v.start();
    // Not a DNS-1123 name: it maps to a cleaned name with a hash suffix.
    let d = Domain::autoport("Odd_Name");
    let name = d.session();
    assert_ne!(name, d.name);
    let t0 = Instant::now();
    d.start();
    let started = t0.elapsed();
    let st = v.wait_ready(&name);
    eprintln!(
        "measured: virsh start took {} ms; session Ready {} ms after it returned",
        started.as_millis(),
        (t0.elapsed() - started).as_millis()
    );
    assert_eq!(st["target"], d.vnc());
    let port = port_of(&st);
    assert!((v.range.0..=v.range.1).contains(&port));
    let mut c = Client::connect(&v.console_url(&st)).await;
    assert_eq!(c.read(12).await, b"RFB 003.008\n");
    let (w, h) = c.handshake().await;
    assert!(w > 0 && h > 0, "ServerInit {w}x{h}");
    let item = v.item(&name).unwrap();
    assert_eq!(item["spec"]["target"]["libvirtDomain"], d.name.as_str());

    let pid = st["pid"].as_i64().unwrap();
    let t0 = Instant::now();
    d.destroy();
    let destroyed = t0.elapsed();
    wait_for("the lease to be released", Duration::from_secs(10), || {
        (!has_lease(&v, &name)).then_some(())
    });
    eprintln!(
        "measured: virsh destroy took {} ms; lease released {} ms after it returned",
        destroyed.as_millis(),
        (t0.elapsed() - destroyed).as_millis()
    );
    assert!(
        v.stopped_serving(&st),
        "proxy {pid} still serves the console after its domain stopped"
    );
    wait_for(
        "the session to leave vncd get",
        Duration::from_secs(5),
        || v.item(&name).is_none().then_some(()),
    );
    TcpListener::bind(("127.0.0.1", port)).expect("port free again");
}

fn lease_uid(v: &Vncd, session: &str) -> Option<String> {
    v.leases()["leases"]
        .as_array()?
        .iter()
        .find(|l| l["session"] == session)?["uid"]
        .as_str()
        .map(str::to_owned)
}

/// A domain destroyed, undefined and defined again under its name (a new UUID) while vncd
/// cannot look (SIGSTOP, so no poll ever sees it gone: "within one poll"), at the same
/// VNC address: a new VM behind the same session name and target. It gets a new lease uid,
/// and a ticket minted for the old VM does not open it.
#[tokio::test(flavor = "multi_thread")]
async fn a_domain_recreated_under_its_name_gets_a_new_lease_and_old_tickets_die() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let _serial = setup();
    let mut v = vncd(5, APART);
    v.start();
    let graphics = "<graphics type='vnc' autoport='yes' listen='127.0.0.1'/>";
    let d = Domain::define("reborn", graphics);
    let uuid_old = virsh_ok(&["domuuid", &d.name]).trim().to_owned();
    d.start();
    let name = d.session();
    let st = v.wait_ready(&name);
    let uid_old = lease_uid(&v, &name).expect("a lease");
    let target_old = st["target"].clone();
    // A ticket minted for the old VM, not used yet.
    let old_ticket = v.url(&name);

    let vncd_pid = Pid::from_raw(v.child.as_ref().unwrap().id() as i32);
    kill(vncd_pid, Signal::SIGSTOP).unwrap();
    let recreate = std::panic::catch_unwind(|| {
        d.destroy();
        virsh_ok(&["undefine", &d.name]);
        let again = Domain::define("reborn", graphics);
        std::mem::forget(again); // same name: `d`'s guard removes it
        d.start();
    });
    kill(vncd_pid, Signal::SIGCONT).unwrap();
    recreate.unwrap();
    let uuid_new = virsh_ok(&["domuuid", &d.name]).trim().to_owned();
    assert_ne!(uuid_new, uuid_old, "the domain was not recreated");
    assert_eq!(
        d.vnc(),
        target_old.as_str().unwrap(),
        "the new VM must sit at the old address for this test to mean anything"
    );

    let uid_new = wait_for("a new lease uid", Duration::from_secs(30), || {
        lease_uid(&v, &name).filter(|u| *u != uid_old)
    });
    let st = v.wait_status(&name, "Ready", Duration::from_secs(30));
    assert_eq!(st["target"], target_old, "same name, same target");
    assert_ne!(uid_new, uid_old);
    let refused = try_banner(&old_ticket).await;
    assert!(
        refused.is_err(),
        "a ticket minted for the destroyed VM opened the new one: {refused:?}"
    );
    // A fresh ticket opens the new VM.
    assert_eq!(rfb_banner(&v.url(&name)).await, b"RFB 003.008\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_domains_started_at_once_all_get_consoles_without_collisions() {
    let _serial = setup();
    let mut v = vncd(12, APART);
    v.start();
    let domains: Vec<Domain> = (0..10)
        .map(|i| Domain::autoport(&format!("herd{i}")))
        .collect();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for d in &domains {
            s.spawn(|| d.start());
        }
    });
    let started = t0.elapsed();
    let mut ports = Vec::new();
    let mut urls = Vec::new();
    // Ten QEMUs and ten websockify processes starting at once on two cores: give
    // the herd time (a proxy that misses --start-timeout is restarted, not lost).
    for d in &domains {
        let st = v.wait_status(&d.session(), "Ready", Duration::from_secs(90));
        assert_eq!(st["target"], d.vnc(), "{}", d.name);
        ports.push(port_of(&st));
        urls.push(v.console_url(&st));
    }
    eprintln!(
        "measured: 10 domains started in {} ms; all 10 consoles Ready {} ms after the last start returned",
        started.as_millis(),
        (t0.elapsed() - started).as_millis()
    );
    let mut unique = ports.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 10, "ports collide: {ports:?}");
    let mut leased = lease_ports(&v);
    leased.sort_unstable();
    assert_eq!(leased, unique, "leases and statuses disagree");
    for u in &urls {
        assert_eq!(rfb_banner(u).await, b"RFB 003.008\n", "{u}");
    }
    std::thread::scope(|s| {
        for d in &domains {
            s.spawn(|| d.destroy());
        }
    });
    wait_for(
        "every lease to be released",
        Duration::from_secs(15),
        || lease_ports(&v).is_empty().then_some(()),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_naming_a_domain_waits_while_it_is_stopped_and_is_served_while_it_runs() {
    let _serial = setup();
    let mut v = vncd(5, APART);
    let d = Domain::autoport("named");
    let requested = v.range.0 + 2;
    v.write_manifest(
        "console.yaml",
        &format!(
            "apiVersion: vncd.io/v1alpha1\nkind: VncSession\nmetadata:\n  name: console\nspec:\n  target:\n    libvirtDomain: {}\n  port: {requested}\n",
            d.name
        ),
    );
    v.start();
    let st = v.wait_status("console", "Pending", Duration::from_secs(10));
    assert_eq!(st["reason"], "DomainNotRunning", "{st}");
    assert!(st["message"].as_str().unwrap().contains(&d.name), "{st}");
    assert!(
        st["port"].is_null(),
        "a stopped domain's session holds no port: {st}"
    );
    assert!(lease_ports(&v).is_empty());

    d.start();
    let st = v.wait_ready("console");
    assert_eq!(port_of(&st), requested);
    assert_eq!(st["target"], d.vnc());
    assert_eq!(rfb_banner(&v.console_url(&st)).await, b"RFB 003.008\n");
    // The manifest serves the domain: it gets no second session of its own.
    std::thread::sleep(Duration::from_millis(600));
    assert!(v.item(&d.session()).is_none(), "{:?}", v.items());
    assert_eq!(lease_ports(&v), [requested]);

    d.destroy();
    // While libvirt tears the domain down, a poll can see it still listed with no VNC
    // port (Pending/DomainStarting): wait for the state it settles in.
    let st = wait_for(
        "console Pending/DomainNotRunning",
        Duration::from_secs(10),
        || {
            let st = v.item("console")?["status"].clone();
            (st["phase"] == "Pending" && st["reason"] == "DomainNotRunning").then_some(st)
        },
    );
    assert_eq!(st["reason"], "DomainNotRunning", "{st}");
    wait_for("the lease to be released", Duration::from_secs(10), || {
        lease_ports(&v).is_empty().then_some(())
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_defined_by_a_manifest_and_a_domain_is_a_conflict_the_manifest_wins() {
    let _serial = setup();
    let qemu = Qemu::tcp();
    let mut v = vncd(5, APART);
    let d = Domain::autoport("clash");
    assert_eq!(
        d.session(),
        d.name,
        "a valid domain name is its session name"
    );
    v.add_session(&d.name, qemu.port);
    v.start();
    d.start();
    let st = wait_for(
        "the conflict to be reported",
        Duration::from_secs(20),
        || {
            let st = v.item(&d.name)?["status"].clone();
            (st["phase"] == "Ready"
                && st["message"]
                    .as_str()?
                    .contains("also maps to session name"))
            .then_some(st)
        },
    );
    assert_eq!(
        st["target"],
        format!("127.0.0.1:{}", qemu.port),
        "the manifest wins"
    );
    assert_eq!(lease_ports(&v).len(), 1);
    assert!(
        v.log().contains("also maps to session name"),
        "conflict not logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn vncd_rides_out_a_libvirtd_restart() {
    let _serial = setup();
    let mut v = vncd(5, APART);
    v.start();
    let a = Domain::autoport("before");
    a.start();
    let before = v.wait_ready(&a.session());

    let old = libvirtd_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for("libvirtd to exit", Duration::from_secs(20), || {
        (!pid_alive(i64::from(old))).then_some(())
    });
    // libvirtd is down: vncd must change nothing (not "no domains, stop everything").
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(3) {
        let st = v.item(&a.session()).unwrap()["status"].clone();
        assert_eq!(
            (st["phase"].clone(), st["pid"].clone(), st["port"].clone()),
            (
                before["phase"].clone(),
                before["pid"].clone(),
                before["port"].clone()
            ),
            "the session changed while libvirtd was down"
        );
        assert!(has_lease(&v, &a.session()));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        v.log().contains("lost the libvirt connection"),
        "{}",
        v.log()
    );
    assert_eq!(rfb_banner(&v.console_url(&before)).await, b"RFB 003.008\n");

    let t0 = Instant::now();
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/libvirtd-up"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "measured: libvirtd restart took {} ms",
        t0.elapsed().as_millis()
    );
    // vncd reconnects: a new domain gets a console, the old one keeps its proxy.
    let b = Domain::autoport("after");
    b.start();
    let st_b = v.wait_ready(&b.session());
    let st_a = v.wait_ready(&a.session());
    assert_eq!(
        (st_a["pid"].clone(), st_a["port"].clone()),
        (before["pid"].clone(), before["port"].clone())
    );
    assert_ne!(port_of(&st_a), port_of(&st_b));
    assert_eq!(lease_ports(&v).len(), 2);
    assert_eq!(rfb_banner(&v.console_url(&st_b)).await, b"RFB 003.008\n");
    // And it sees stops again.
    a.destroy();
    wait_for(
        "the stopped domain's lease to go",
        Duration::from_secs(10),
        || (!has_lease(&v, &a.session())).then_some(()),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ports_a_running_domain_holds_inside_the_pool_are_never_leased() {
    let _serial = setup();
    let qemu = Qemu::tcp();
    // libvirt's display range reaches into the pool: vncd says how to fix it.
    let mut v = vncd(4, "remote_display_port_min = 5900\n");
    let inside = v.range.0; // small pools lease their lowest port first
    // QEMU listens on 127.0.0.2, vncd on 127.0.0.1: a bind probe cannot see the clash,
    // only the domain's live XML can.
    let d = Domain::define(
        "inpool",
        &format!("<graphics type='vnc' port='{inside}' autoport='no' listen='127.0.0.2'/>"),
    );
    d.start();
    assert_eq!(d.vnc(), format!("127.0.0.2:{inside}"));
    TcpListener::bind(("127.0.0.1", inside)).expect("a bind probe on 127.0.0.1 succeeds");
    v.start();
    v.add_session("m", qemu.port);
    let m = v.wait_ready("m");
    let dom = v.wait_ready(&d.session());
    assert_eq!(dom["target"], format!("127.0.0.2:{inside}"));
    assert_ne!(port_of(&m), inside, "leased the domain's own VNC port");
    assert_ne!(port_of(&dom), inside, "leased the domain's own VNC port");
    assert_eq!(rfb_banner(&v.console_url(&m)).await, b"RFB 003.008\n");
    assert_eq!(rfb_banner(&v.console_url(&dom)).await, b"RFB 003.008\n");
    let fix = format!(
        "set remote_display_port_max = {} in {}",
        inside - 1,
        v.tmp.path().join("qemu.conf").display()
    );
    assert!(
        v.log().contains(&fix),
        "no exact fix in the log:\n{}",
        v.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_whose_port_a_domain_took_while_its_proxy_was_down_moves() {
    let _serial = setup();
    let qemu = Qemu::tcp();
    let mut v = vncd(4, APART);
    v.start();
    v.add_session("m", qemu.port);
    let before = v.wait_ready("m");
    let taken = port_of(&before);
    v.kill9();
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(before["pid"].as_i64().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("the proxy's port to free", Duration::from_secs(5), || {
        TcpListener::bind(("127.0.0.1", taken)).ok().map(drop)
    });
    // A VM starts while vncd and the proxy are down, and QEMU takes the port.
    let d = Domain::define(
        "taker",
        &format!("<graphics type='vnc' port='{taken}' autoport='no' listen='127.0.0.1'/>"),
    );
    d.start();
    v.start();
    let m = wait_for("m to move to another port", Duration::from_secs(20), || {
        let st = v.item("m")?["status"].clone();
        (st["phase"] == "Ready" && st["port"] != taken).then_some(st)
    });
    let dom = v.wait_ready(&d.session());
    assert_eq!(dom["target"], format!("127.0.0.1:{taken}"));
    assert_ne!(port_of(&dom), taken);
    assert_ne!(port_of(&dom), port_of(&m));
    assert_eq!(rfb_banner(&v.console_url(&m)).await, b"RFB 003.008\n");
    assert_eq!(rfb_banner(&v.console_url(&dom)).await, b"RFB 003.008\n");
    let mut leased = lease_ports(&v);
    leased.sort_unstable();
    leased.dedup();
    assert_eq!(leased.len(), 2, "{:?}", v.leases());
}
