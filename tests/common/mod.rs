//! Shared harness for integration tests: the real `vncd` binary, real websockify and a
//! real QEMU VNC server. Every process a test starts is ended by pid in a Drop guard,
//! including the proxies vncd started (found by vncd's marker for the test's own state
//! directory), so a failing test leaves nothing behind.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub const BIN: &str = env!("CARGO_BIN_EXE_vncd");

/// Fails the test with a clear message if a required real component is missing.
pub fn require(program: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed; run scripts/test (it installs the real components)"
    );
}

/// Polls `f` until it returns Some, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free TCP port on loopback (bound once and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real VNC server: QEMU with no machine, serving RFB on loopback.
pub struct Qemu {
    child: Child,
    pub port: u16,
    pub socket: Option<PathBuf>,
}

impl Qemu {
    pub fn tcp() -> Qemu {
        require("qemu-system-x86_64");
        for _ in 0..20 {
            let port = free_port();
            if port <= 5900 {
                continue;
            }
            let display = format!("127.0.0.1:{}", port - 5900);
            let child = qemu(&display);
            let mut q = Qemu {
                child,
                port,
                socket: None,
            };
            if q.wait_banner() {
                return q;
            }
        }
        panic!("could not start QEMU as a VNC server");
    }

    /// `127.0.0.1:PORT` of a TCP server.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn unix(path: &Path) -> Qemu {
        require("qemu-system-x86_64");
        let child = qemu(&format!("unix:{}", path.display()));
        let mut q = Qemu {
            child,
            port: 0,
            socket: Some(path.to_owned()),
        };
        assert!(
            q.wait_banner(),
            "QEMU did not serve VNC on {}",
            path.display()
        );
        q
    }

    fn wait_banner(&mut self) -> bool {
        use std::io::Read;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            let stream: Option<Box<dyn Read>> = match &self.socket {
                Some(p) => std::os::unix::net::UnixStream::connect(p)
                    .ok()
                    .map(|s| Box::new(s) as Box<dyn Read>),
                None => std::net::TcpStream::connect(("127.0.0.1", self.port))
                    .ok()
                    .map(|s| Box::new(s) as Box<dyn Read>),
            };
            if let Some(mut s) = stream {
                let mut buf = [0u8; 12];
                if s.read_exact(&mut buf).is_ok() && &buf == b"RFB 003.008\n" {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        false
    }
}

fn qemu(vnc: &str) -> Child {
    Command::new("qemu-system-x86_64")
        .args([
            "-display",
            "none",
            "-nodefaults",
            "-machine",
            "none",
            "-vnc",
            vnc,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu")
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One vncd setup: a sessions dir, a state dir and (maybe) a running `vncd run`.
pub struct Vncd {
    pub tmp: tempfile::TempDir,
    pub sessions: PathBuf,
    pub state: PathBuf,
    pub range: (u16, u16),
    pub extra: Vec<String>,
    /// Extra environment for `vncd run` (e.g. libfaketime's).
    pub env: Vec<(String, String)>,
    pub child: Option<Child>,
}

impl Vncd {
    /// A setup whose pool is `size` ports starting at a free-looking base port.
    pub fn new(size: u16) -> Vncd {
        if backend() == "websockify" {
            require("websockify");
        }
        let tmp = tempfile::tempdir().unwrap();
        let sessions = tmp.path().join("sessions");
        let state = tmp.path().join("state");
        std::fs::create_dir_all(&sessions).unwrap();
        let base = pool_base(size);
        Vncd {
            tmp,
            sessions,
            state,
            range: (base, base + size - 1),
            extra: Vec::new(),
            env: Vec::new(),
            child: None,
        }
    }

    pub fn range_arg(&self) -> String {
        format!("{}-{}", self.range.0, self.range.1)
    }

    pub fn base_args(&self) -> Vec<String> {
        vec![
            "--sessions-dir".into(),
            self.sessions.display().to_string(),
            "--state-dir".into(),
            self.state.display().to_string(),
            "--port-range".into(),
            self.range_arg(),
        ]
    }

    /// Spawns `vncd run`, logging to state/../vncd.log.
    pub fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join("vncd.log"))
            .unwrap();
        let mut args = vec!["run".to_string()];
        args.extend(self.base_args());
        args.extend([
            "--public-host".into(),
            "127.0.0.1".into(),
            "--listen-address".into(),
            "127.0.0.1".into(),
        ]);
        args.extend(["--resync-interval".into(), "0.5".into()]);
        if !self
            .extra
            .iter()
            .any(|a| a == "--backend" || a == "--relay" || a == "--per-session-proxies")
        {
            match backend().as_str() {
                "processes" => args.extend([
                    "--backend".into(),
                    "builtin".into(),
                    "--per-session-proxies".into(),
                ]),
                b => args.extend(["--backend".into(), b.into()]),
            }
        }
        args.extend(self.extra.clone());
        let child = Command::new(BIN)
            .args(&args)
            .env("VNCD_LOG", "vncd=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("vncd.log")).unwrap_or_default()
    }

    /// The relay's log (`STATE/logs/relay.log`), for `vncd run --relay`.
    pub fn relay_log(&self) -> String {
        std::fs::read_to_string(self.state.join("logs").join("relay.log")).unwrap_or_default()
    }

    /// SIGKILL to vncd alone: its proxies must live on.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM to vncd and wait for it.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM).unwrap();
        c.wait().unwrap()
    }

    /// Runs a vncd subcommand to completion.
    pub fn cmd(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("VNCD_LOG", "warn")
            .output()
            .unwrap()
    }

    /// Runs a vncd subcommand with the standard dirs and pool appended.
    pub fn cmd_here(&self, args: &[&str]) -> Output {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(self.base_args());
        Command::new(BIN)
            .args(&all)
            .env("VNCD_LOG", "warn")
            .output()
            .unwrap()
    }

    pub fn write_manifest(&self, file: &str, text: &str) {
        let tmp = self.sessions.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, self.sessions.join(file)).unwrap();
    }

    pub fn add_session(&self, name: &str, target_port: u16) {
        self.write_manifest(
            &format!("{name}.yaml"),
            &manifest(name, u32::from(target_port)),
        );
    }

    pub fn remove_session(&self, name: &str) {
        std::fs::remove_file(self.sessions.join(format!("{name}.yaml"))).unwrap();
    }

    /// `vncd get -o json` items, or an empty list before the first status.
    pub fn items(&self) -> Vec<Value> {
        let out = Command::new(BIN)
            .args(["get", "-o", "json", "--state-dir"])
            .arg(&self.state)
            .output()
            .unwrap();
        if !out.status.success() {
            return Vec::new();
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["items"].as_array().cloned().unwrap_or_default()
    }

    pub fn item(&self, name: &str) -> Option<Value> {
        self.items()
            .into_iter()
            .find(|i| i["metadata"]["name"] == name)
    }

    /// A fresh console URL (`vncd url`, a single-use ticket) for the session `name`.
    pub fn url(&self, name: &str) -> String {
        let out = self.cmd(&["url", name, "--state-dir", self.state.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "vncd url {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// A fresh console URL for the session whose status is `status` (found by its port).
    pub fn console_url(&self, status: &Value) -> String {
        let port = &status["port"];
        let leases = self.leases();
        let name = leases["leases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| &l["port"] == port)
            .unwrap_or_else(|| panic!("no lease on port {port}: {leases}"))["session"]
            .as_str()
            .unwrap()
            .to_owned();
        self.url(&name)
    }

    /// Waits for `name` to be Ready and returns its status.
    pub fn wait_ready(&self, name: &str) -> Value {
        self.wait_status(name, "Ready", Duration::from_secs(20))
    }

    pub fn wait_status(&self, name: &str, phase: &str, timeout: Duration) -> Value {
        let mut last = Value::Null;
        let start = Instant::now();
        loop {
            if let Some(i) = self.item(name) {
                if i["status"]["phase"] == phase {
                    return i["status"].clone();
                }
                last = i["status"].clone();
            }
            if start.elapsed() > timeout {
                panic!(
                    "{name} not {phase} after {timeout:?}; last status {last}\nvncd log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn leases(&self) -> Value {
        let text = std::fs::read_to_string(self.state.join("leases.json"))
            .unwrap_or_else(|_| "{\"leases\":[]}".into());
        serde_json::from_str(&text).unwrap()
    }

    /// Whether `vncd run` serves through the relay (one process for every session) rather
    /// than a process per session: what "its proxy ended" means differs.
    pub fn on_relay(&self) -> bool {
        let has = |flag: &str| self.extra.iter().any(|a| a == flag);
        let websockify = self
            .extra
            .windows(2)
            .any(|w| w[0] == "--backend" && w[1] == "websockify");
        if has("--relay") {
            return true;
        }
        if has("--per-session-proxies") || websockify {
            return false;
        }
        let explicit = has("--backend");
        explicit || backend() == "builtin"
    }

    /// Whether what served `status` (its `pid` and `port`) has stopped serving it: its
    /// process ended, or, on the relay (which serves every session and lives on), its port
    /// no longer accepts connections.
    pub fn stopped_serving(&self, status: &Value) -> bool {
        if self.on_relay() {
            let port = status["port"].as_u64().expect("a status with a port") as u16;
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        } else {
            !pid_alive(status["pid"].as_i64().expect("a status with a pid"))
        }
    }

    pub fn owner(&self) -> String {
        std::fs::canonicalize(&self.state)
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }
}

impl Drop for Vncd {
    fn drop(&mut self) {
        self.kill9();
        // End the proxies this test's vncd started: they carry its state dir as marker.
        for m in vncd::supervisor::scan(&self.owner()) {
            let _ = killpg(Pid::from_raw(m.pgid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(m.process.pid), Signal::SIGKILL);
        }
        // And a relay (`vncd run --relay`) serving this test's state dir.
        for pid in relay_pids(&self.owner()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Relay processes started for `state_dir`: their command line is `... relay --state-dir
/// STATE_DIR ...` with exactly this directory, so only this test's relay matches.
pub fn relay_pids(state_dir: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
            args.contains(&b"relay".as_slice())
                && args
                    .windows(2)
                    .any(|w| w[0] == b"--state-dir" && w[1] == state_dir.as_bytes())
        })
        .collect()
}

/// The data plane under test: `VNCD_TEST_BACKEND`, so the same suite runs against each
/// (scripts/test): `builtin` unless set (`vncd run`'s default: the relay; `relay` says
/// the same), `websockify`, or `processes` (`--per-session-proxies`: one `vncd-proxy`
/// per session, the builtin data plane before the relay).
pub fn backend() -> String {
    match std::env::var("VNCD_TEST_BACKEND").as_deref() {
        Err(_) | Ok("relay") => "builtin".into(),
        Ok(b) => b.into(),
    }
}

/// Hands out disjoint pool ranges so tests running in parallel never share ports.
pub fn pool_base(size: u16) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Each test binary gets its own band of 1000 ports by its target name (the file name
    // without cargo's hash suffix), so binaries never share ports even if one leaves a
    // straggler behind; tests in one binary then slice the band.
    let exe = std::env::current_exe().unwrap();
    let name = exe.file_name().unwrap().to_string_lossy().into_owned();
    let target = name.rsplit_once('-').map_or(name.as_str(), |(t, _)| t);
    let band: u32 = match target {
        "standalone" => 0,
        "chaos" => 1,
        "bad_input" => 2,
        "browser" => 3,
        "libvirt" => 4,
        "ready" => 5,
        "kube" => 6,
        "http" => 7,
        "proxy_isolation" => 12,
        "libvirt_feature" => 13,
        // Hashed bands start after the named ones, so they never meet one of those.
        other => {
            8 + other
                .bytes()
                .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
                % 4
        }
    };
    // VNCD_TEST_PORT_BASE moves every band, so two checkouts can run the suites at once.
    let first: u16 = std::env::var("VNCD_TEST_PORT_BASE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20000);
    let base = first + band as u16 * 1000;
    base + NEXT.fetch_add(size + 1, Ordering::SeqCst)
}

pub fn manifest(name: &str, target_port: u32) -> String {
    format!(
        "apiVersion: vncd.io/v1alpha1\nkind: VncSession\nmetadata:\n  name: {name}\nspec:\n  target:\n    host: 127.0.0.1\n    port: {target_port}\n"
    )
}

pub fn pid_alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let st = s
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim().chars().next());
            !matches!(st, Some('Z') | Some('X') | None)
        })
        .unwrap_or(false)
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A websocket VNC client, as noVNC would be: `binary` subprotocol, byte-stream reads.
pub struct Client {
    pub ws: Ws,
    buf: Vec<u8>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        Client::connect_from(url, None).await
    }

    /// [`Client::connect`] as a page of `origin` would (browsers send `Origin`).
    pub async fn connect_from(url: &str, origin: Option<&str>) -> Client {
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "binary".parse().unwrap());
        if let Some(o) = origin {
            req.headers_mut().insert("Origin", o.parse().unwrap());
        }
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(req),
        )
        .await
        .expect("websocket connect timed out")
        .expect("websocket connect");
        Client {
            ws,
            buf: Vec::new(),
        }
    }

    /// Reads exactly `n` bytes of the stream carried in binary frames.
    pub async fn read(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            let msg = tokio::time::timeout(Duration::from_secs(5), self.ws.next())
                .await
                .expect("websocket read timed out")
                .expect("websocket closed")
                .expect("websocket error");
            if let Message::Binary(b) = msg {
                self.buf.extend_from_slice(&b);
            }
        }
        self.buf.drain(..n).collect()
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::Binary(bytes.to_vec().into()))
            .await
            .unwrap();
    }

    /// After [`Client::handshake`]: reads the rest of ServerInit (pixel format, name) and
    /// asks for a full frame; the next byte read is the server's answer (0:
    /// FramebufferUpdate) — proof that the connection still carries RFB both ways.
    pub async fn request_frame(&mut self, w: u16, h: u16) {
        let rest = self.read(20).await;
        let name_len = u32::from_be_bytes([rest[16], rest[17], rest[18], rest[19]]) as usize;
        self.read(name_len).await;
        let mut fbur = vec![3u8, 0, 0, 0, 0, 0];
        fbur.extend_from_slice(&w.to_be_bytes());
        fbur.extend_from_slice(&h.to_be_bytes());
        self.write(&fbur).await;
    }

    /// The RFB handshake after the banner, up to ServerInit: returns width and height.
    pub async fn handshake(&mut self) -> (u16, u16) {
        self.write(b"RFB 003.008\n").await;
        let n = self.read(1).await[0] as usize;
        let types = self.read(n).await;
        assert!(
            types.contains(&1),
            "VNC server offers no 'None' security: {types:?}"
        );
        self.write(&[1]).await;
        assert_eq!(self.read(4).await, [0, 0, 0, 0], "security result");
        self.write(&[1]).await; // ClientInit, shared
        let init = self.read(4).await;
        (
            u16::from_be_bytes([init[0], init[1]]),
            u16::from_be_bytes([init[2], init[3]]),
        )
    }
}

/// Connects to a session URL and reads the RFB banner from the real VNC server.
pub async fn rfb_banner(url: &str) -> Vec<u8> {
    let mut c = Client::connect(url).await;
    c.read(12).await
}

/// Tries a websocket URL: Ok(first bytes) if the RFB banner came through, Err(why) if
/// the upgrade was refused or the connection closed without it.
pub async fn try_banner(url: &str) -> Result<Vec<u8>, String> {
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "binary".parse().unwrap());
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    banner_of(&mut ws).await
}

/// The RFB banner (12 bytes) from an open websocket.
async fn banner_of<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Result<Vec<u8>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    while buf.len() < 12 {
        match tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => buf.extend_from_slice(&b),
            Ok(Some(Ok(Message::Close(c)))) => return Err(format!("closed: {c:?}")),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(None) => return Err("closed".into()),
            Err(_) => return Err("no banner".into()),
        }
    }
    Ok(buf)
}

/// [`try_banner`] from `source` (another loopback address, say): admission before
/// authentication counts pending connections per source address.
pub async fn try_banner_from(url: &str, source: std::net::Ipv4Addr) -> Result<Vec<u8>, String> {
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "binary".parse().unwrap());
    let host = req.uri().host().ok_or("no host")?.to_owned();
    let port = req.uri().port_u16().ok_or("no port")?;
    let addr: std::net::SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind((source, 0).into()).map_err(|e| e.to_string())?;
    let stream = tokio::time::timeout(Duration::from_secs(5), sock.connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::client_async(req, stream),
    )
    .await
    .map_err(|_| "upgrade timed out".to_string())?
    .map_err(|e| e.to_string())?;
    banner_of(&mut ws).await
}

/// A wss connection as [`wss_open`] makes it.
pub type Wss =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Opens a `wss://` session URL over 127.0.0.1, trusting exactly `cert_der` (the test's
/// self-signed certificate, issued for "localhost"). Err(why) if the TLS handshake (another
/// certificate, say) or the upgrade fails.
pub async fn wss_open(url: &str, cert_der: &[u8]) -> Result<Wss, String> {
    use std::sync::Arc;
    use tokio_rustls::rustls::{self, pki_types::CertificateDer, pki_types::ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(cert_der.to_vec())).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let port: u16 = url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| format!("TLS handshake: {e}"))?;
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "binary".parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .map_err(|e| format!("wss upgrade: {e}"))?;
    Ok(ws)
}

/// Reads at least `n` bytes of binary frames from `ws`, failing on a close or a timeout.
pub async fn wss_read(ws: &mut Wss, n: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    while buf.len() < n {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("wss read timed out")
        {
            Some(Ok(Message::Binary(b))) => buf.extend_from_slice(&b),
            Some(Ok(_)) => {}
            other => panic!("wss closed: {other:?}"),
        }
    }
    buf
}

/// [`wss_open`], then the RFB banner.
pub async fn wss_banner(url: &str, cert_der: &[u8]) -> Vec<u8> {
    let mut ws = wss_open(url, cert_der)
        .await
        .expect("wss with the session's certificate");
    wss_read(&mut ws, 12).await
}

/// A self-signed certificate for localhost.
pub fn self_signed() -> rcgen::CertifiedKey<rcgen::KeyPair> {
    rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap()
}

/// A self-signed certificate for localhost in `v`'s temp dir, and the flags that make vncd
/// serve it; returns the certificate and the two file paths.
pub fn serve_tls(v: &mut Vncd) -> (rcgen::CertifiedKey<rcgen::KeyPair>, PathBuf, PathBuf) {
    let ck = self_signed();
    let cert = v.tmp.path().join("cert.pem");
    let key = v.tmp.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    v.extra.extend([
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ]);
    (ck, cert, key)
}

/// Renews the certificate at `cert`/`key` as cert-manager or certbot would: new files
/// replace the old ones by rename (the key first, so a reader can catch the pair half-way).
pub fn renew_tls(dir: &Path, cert: &Path, key: &Path) -> rcgen::CertifiedKey<rcgen::KeyPair> {
    let next = self_signed();
    let tmp_cert = dir.join("cert.pem.new");
    let tmp_key = dir.join("key.pem.new");
    std::fs::write(&tmp_cert, next.cert.pem()).unwrap();
    std::fs::write(&tmp_key, next.signing_key.serialize_pem()).unwrap();
    std::fs::rename(&tmp_key, key).unwrap();
    std::fs::rename(&tmp_cert, cert).unwrap();
    next
}

/// A TCP forwarder in front of a real VNC server that counts the connections it gets, so a
/// test can prove how often (or that never) the server was contacted.
#[allow(dead_code)]
pub struct CountingForwarder {
    pub addr: std::net::SocketAddr,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CountingForwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[allow(dead_code)]
impl CountingForwarder {
    pub async fn new(upstream: String) -> Self {
        use std::sync::atomic::Ordering;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind forwarder");
        let addr = l.local_addr().expect("addr");
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = count.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let up = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(up).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        CountingForwarder { addr, count, task }
    }

    pub fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }
}
