//! `vncd proxy` end to end: the real binary against a real VNC server (QEMU), with a real
//! websocket client (tokio-tungstenite). Nothing is mocked.
//!
//! Needs `qemu-system-x86_64` (Debian package qemu-system-x86) on PATH; the QEMU harness is
//! the shared one in `tests/common`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod common;

use common::{CountingForwarder, Qemu, free_port};

const VNCD: &str = env!("CARGO_BIN_EXE_vncd");
const BANNER: &[u8] = b"RFB 003.008\n";

// ---------------------------------------------------------------- helpers: processes

/// A running `vncd proxy`, killed by pid on drop. Its stderr is collected.
struct Proxy {
    child: Child,
    port: u16,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_proxy(args: &[&str]) -> (Child, Arc<Mutex<String>>) {
    let mut child = Command::new(VNCD)
        .arg("proxy")
        .args(args)
        .env("VNCD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vncd");
    let log = Arc::new(Mutex::new(String::new()));
    let mut err = child.stderr.take().expect("stderr");
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .expect("log lock")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (child, log)
}

impl Proxy {
    /// Start `vncd proxy --listen 127.0.0.1:PORT ARGS...` and wait until it accepts.
    async fn start(args: &[&str]) -> Proxy {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut all = vec!["--listen", listen.as_str()];
        all.extend_from_slice(args);
        let (child, stderr) = spawn_proxy(&all);
        let mut p = Proxy {
            child,
            port,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("proxy exited early ({st}): {}", p.log());
            }
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "proxy never listened: {}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn log(&self) -> String {
        self.stderr.lock().expect("log lock").clone()
    }

    fn url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"))
    }

    /// Wait for the process to exit on its own.
    async fn exited_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        wait_exit(&mut self.child, limit).await
    }
}

async fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------- helpers: clients

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn request(
    url: &str,
    protocol: Option<&str>,
    origin: Option<&str>,
) -> tungstenite::handshake::client::Request {
    let mut req = url.into_client_request().expect("request");
    if let Some(p) = protocol {
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(p).expect("header"),
        );
    }
    if let Some(o) = origin {
        req.headers_mut()
            .insert("Origin", HeaderValue::from_str(o).expect("header"));
    }
    req
}

async fn ws_connect(url: &str) -> Ws {
    let (ws, resp) = tokio_tungstenite::connect_async(request(url, Some("binary"), None))
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"binary"[..])
    );
    ws
}

/// The HTTP status of a refused upgrade.
async fn refused_status(req: tungstenite::handshake::client::Request) -> (u16, String) {
    match tokio_tungstenite::connect_async(req).await {
        Err(tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("upgrade was accepted"),
    }
}

/// An RFB client over a websocket.
struct Rfb<S> {
    ws: WebSocketStream<S>,
    buf: Vec<u8>,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Rfb<S> {
    fn new(ws: WebSocketStream<S>) -> Self {
        Rfb {
            ws,
            buf: Vec::new(),
        }
    }

    async fn read(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            let msg = tokio::time::timeout(Duration::from_secs(5), self.ws.next())
                .await
                .expect("RFB data in time")
                .expect("websocket open")
                .expect("websocket frame");
            match msg {
                Message::Binary(b) => self.buf.extend_from_slice(&b),
                Message::Close(c) => panic!("closed: {c:?}"),
                _ => {}
            }
        }
        self.buf.drain(..n).collect()
    }

    async fn send(&mut self, b: &[u8]) {
        self.ws
            .send(Message::Binary(b.to_vec().into()))
            .await
            .expect("send");
    }

    /// Version, security type None, ClientInit; returns ServerInit's width and height.
    async fn handshake(&mut self) -> (u16, u16) {
        assert_eq!(self.read(12).await, BANNER);
        self.send(BANNER).await;
        let n = self.read(1).await[0] as usize;
        assert!(n > 0, "server refused the connection");
        let types = self.read(n).await;
        assert!(types.contains(&1), "security type None offered: {types:?}");
        self.send(&[1]).await;
        assert_eq!(self.read(4).await, [0, 0, 0, 0], "SecurityResult OK");
        self.send(&[1]).await; // ClientInit, shared
        let init = self.read(24).await;
        let w = u16::from_be_bytes([init[0], init[1]]);
        let h = u16::from_be_bytes([init[2], init[3]]);
        let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
        let _name = self.read(name_len).await;
        (w, h)
    }
}

/// The next close frame's code, or None if the connection ended without one.
async fn close_code<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    limit: Duration,
) -> Option<CloseCode> {
    let until = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => panic!("no close within {limit:?}"),
            Ok(Some(Ok(Message::Close(c)))) => return c.map(|c| c.code),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return None,
        }
    }
}

/// A raw HTTP/1.1 request; returns the whole response.
async fn http_raw(port: u16, req: &[u8]) -> String {
    use tokio::io::AsyncReadExt;
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(req).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

async fn http_get(port: u16, path: &str) -> String {
    http_raw(
        port,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

/// A lease key in `dir/key` (as vncd's supervisor writes it) and the key itself.
fn key_file(dir: &Path) -> (PathBuf, vncd::ticket::LeaseKey) {
    let key = vncd::ticket::LeaseKey::from_bytes([0x5a; 32]);
    (write_file(dir, "key", &format!("{}\n", key.to_hex())), key)
}

/// A fresh ticket for `key`, valid for a minute.
fn ticket(key: &vncd::ticket::LeaseKey) -> String {
    vncd::ticket::mint(key, Duration::from_secs(60), vncd::ticket::unix_now())
        .expect("mint")
        .text
}

fn write_file(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(&p, body).expect("write");
    p
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn tcp_target_banner_server_init_and_ping() {
    let qemu = Qemu::tcp();
    let proxy = Proxy::start(&["--target", &qemu.addr()]).await;
    for path in ["/", "/websockify"] {
        let mut rfb = Rfb::new(ws_connect(&proxy.url(path)).await);
        let (w, h) = rfb.handshake().await;
        assert!(w > 0 && h > 0, "ServerInit {w}x{h}");
        // Pings are answered while the session runs.
        rfb.ws
            .send(Message::Ping(b"hi".to_vec().into()))
            .await
            .expect("ping");
        let pong = loop {
            match tokio::time::timeout(Duration::from_secs(5), rfb.ws.next()).await {
                Ok(Some(Ok(Message::Pong(p)))) => break p,
                Ok(Some(Ok(_))) => continue,
                other => panic!("no pong: {other:?}"),
            }
        };
        assert_eq!(&pong[..], b"hi");
        rfb.ws.close(None).await.expect("close");
    }
    // One log line per connection, with bytes both ways.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !proxy.log().contains("path=/websockify") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = proxy.log();
    let line = log
        .lines()
        .find(|l| l.contains("connection closed") && l.contains("websocket"))
        .unwrap_or_else(|| panic!("no session log line: {log}"));
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    assert!(line.contains("bytes_to_target=14"), "{line}"); // 12 + 1 + 1
    assert!(!line.contains("bytes_to_client=0 "), "{line}");
}

#[tokio::test]
async fn unix_socket_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let qemu = Qemu::unix(&dir.path().join("vnc.sock"));
    let sock = qemu
        .socket
        .as_deref()
        .and_then(Path::to_str)
        .expect("utf-8 path")
        .to_owned();
    let proxy = Proxy::start(&["--unix-target", &sock]).await;
    let mut rfb = Rfb::new(ws_connect(&proxy.url("/websockify")).await);
    let (w, h) = rfb.handshake().await;
    assert!(w > 0 && h > 0);
}

#[tokio::test]
async fn a_bad_ticket_is_refused_before_the_target_is_contacted() {
    let qemu = Qemu::tcp();
    let relay = CountingForwarder::new(qemu.addr()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (tf, key) = key_file(dir.path());
    let good = ticket(&key);
    let other = ticket(&vncd::ticket::LeaseKey::from_bytes([1; 32]));
    let relay_addr = relay.addr.to_string();
    let proxy = Proxy::start(&[
        "--target",
        &relay_addr,
        "--key-file",
        tf.to_str().expect("path"),
        "--refusal-log-interval",
        "1",
    ])
    .await;

    for path in [
        "/".to_owned(),
        "/websockify".to_owned(),
        "/websockify?token=BADTOKEN1".to_owned(),
        format!("/?token={}", &good[..good.len() - 1]),
        format!("/?token={good}x"),
        format!("/{other}"),
        "/websockify/BADTOKEN3".to_owned(),
    ] {
        let (status, _) = refused_status(request(&proxy.url(&path), Some("binary"), None)).await;
        assert_eq!(status, 403, "{path}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        relay.count(),
        0,
        "the VNC server was contacted without a token"
    );

    for path in [
        format!("/websockify?token={good}"),
        format!("/?token={}", ticket(&key)),
        format!("/{}", ticket(&key)),
        format!("/websockify/{}", ticket(&key)),
    ] {
        let mut rfb = Rfb::new(ws_connect(&proxy.url(&path)).await);
        assert_eq!(rfb.read(12).await, BANNER, "{path}");
    }
    assert_eq!(relay.count(), 4);
    // Refusals are summed up: one line per interval, not one per connection.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let log = proxy.log();
    let summaries: Vec<&str> = log.lines().filter(|l| l.contains("refused ")).collect();
    assert_eq!(summaries.len(), 1, "one summary line: {log}");
    assert!(
        summaries[0].contains(
            "refused 7 connections in the last 1s: 403 missing or invalid console ticket x7"
        ),
        "{log}"
    );
    // Accepted sessions are still logged one by one, inside their connection's span.
    assert!(
        !log.lines()
            .any(|l| l.contains("missing or invalid console ticket") && !l.contains("refused 7")),
        "a refusal logged on its own: {log}"
    );
    assert_eq!(log.matches("connection closed").count(), 5, "{log}");
    assert!(log.contains("conn{n=9 peer=127.0.0.1:"), "{log}");
    assert!(!log.contains(&good), "ticket leaked into the log: {log}");
    assert!(!log.contains(&other), "ticket leaked into the log: {log}");
    assert!(
        !log.contains("BADTOKEN"),
        "presented token leaked into the log: {log}"
    );
}

#[tokio::test]
async fn origin_allowlist() {
    let qemu = Qemu::tcp();
    let proxy = Proxy::start(&[
        "--target",
        &qemu.addr(),
        "--origin",
        "http://good.example",
        "--origin",
        "https://other.example",
    ])
    .await;
    let url = proxy.url("/");
    assert_eq!(
        refused_status(request(&url, Some("binary"), None)).await.0,
        403
    );
    assert_eq!(
        refused_status(request(&url, Some("binary"), Some("http://evil.example")))
            .await
            .0,
        403
    );
    let (ws, _) = tokio_tungstenite::connect_async(request(
        &url,
        Some("binary"),
        Some("http://good.example"),
    ))
    .await
    .expect("allowed origin");
    assert_eq!(Rfb::new(ws).read(12).await, BANNER);
}

#[tokio::test]
async fn subprotocols_binary_none_and_base64() {
    let qemu = Qemu::tcp();
    let proxy = Proxy::start(&["--target", &qemu.addr()]).await;
    let url = proxy.url("/websockify");

    let (ws, resp) = tokio_tungstenite::connect_async(request(&url, Some("base64, binary"), None))
        .await
        .expect("binary offered");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"binary"[..])
    );
    assert_eq!(Rfb::new(ws).read(12).await, BANNER);

    let (ws, resp) = tokio_tungstenite::connect_async(request(&url, None, None))
        .await
        .expect("no subprotocol");
    assert!(resp.headers().get("sec-websocket-protocol").is_none());
    assert_eq!(Rfb::new(ws).read(12).await, BANNER);

    let (status, body) = refused_status(request(&url, Some("base64"), None)).await;
    assert_eq!(status, 400);
    assert!(body.contains("base64"), "{body}");
}

#[tokio::test]
async fn tls_wss_with_self_signed_cert() {
    use tokio_rustls::rustls::{self, pki_types::ServerName};

    let qemu = Qemu::tcp();
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let cert = write_file(dir.path(), "cert.pem", &ck.cert.pem());
    let key = write_file(dir.path(), "key.pem", &ck.signing_key.serialize_pem());
    let proxy = Proxy::start(&[
        "--target",
        &qemu.addr(),
        "--tls-cert",
        cert.to_str().expect("path"),
        "--tls-key",
        key.to_str().expect("path"),
    ])
    .await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake with the proxy's certificate");
    let url = format!("wss://localhost:{}/websockify", proxy.port);
    let (ws, _) = tokio_tungstenite::client_async(request(&url, Some("binary"), None), tls)
        .await
        .expect("wss upgrade");
    let mut rfb = Rfb::new(ws);
    let (w, h) = rfb.handshake().await;
    assert!(w > 0 && h > 0);

    // Plain ws on the TLS port does not work.
    assert!(
        tokio_tungstenite::connect_async(request(&proxy.url("/"), Some("binary"), None))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn static_files_and_traversal() {
    let qemu = Qemu::tcp();
    let outer = tempfile::tempdir().expect("tempdir");
    let web = outer.path().join("web");
    write_file(&web, "vnc.html", "<html>noVNC page</html>");
    write_file(&web, "app/ui.js", "export const x = 1;");
    write_file(&web, "app/styles/base.css", "body{}");
    write_file(outer.path(), "secret.txt", "TOP-SECRET");
    let (tf, _) = key_file(outer.path());
    let proxy = Proxy::start(&[
        "--target",
        &qemu.addr(),
        "--web",
        web.to_str().expect("path"),
        "--key-file",
        tf.to_str().expect("path"),
    ])
    .await;
    let p = proxy.port;

    // Served without a ticket (the page must load before it knows the ticket).
    let r = http_get(
        p,
        "/vnc.html?autoconnect=true&path=websockify%3Ftoken%3Dtok",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    assert!(
        r.contains("Content-Type: text/html; charset=utf-8\r\n"),
        "{r}"
    );
    assert!(r.ends_with("<html>noVNC page</html>"), "{r}");
    let r = http_get(p, "/app/ui.js").await;
    assert!(r.contains("Content-Type: text/javascript"), "{r}");
    let r = http_get(p, "/app/styles/base.css").await;
    assert!(r.contains("Content-Type: text/css"), "{r}");
    let r = http_raw(p, b"HEAD /vnc.html HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 200 ") && r.ends_with("\r\n\r\n"),
        "{r}"
    );

    assert!(
        http_get(p, "/missing.html")
            .await
            .starts_with("HTTP/1.1 404 ")
    );
    for evil in [
        "/../secret.txt",
        "/app/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/app/%2E%2E%2F%2E%2E%2Fsecret.txt",
        "/..%5csecret.txt",
    ] {
        let r = http_get(p, evil).await;
        assert!(r.starts_with("HTTP/1.1 403 "), "{evil}: {r}");
        assert!(!r.contains("TOP-SECRET"), "{evil}: {r}");
    }

    // Keep-alive: two requests on one connection.
    let r = http_raw(
        p,
        b"GET /app/ui.js HTTP/1.1\r\nHost: x\r\n\r\nGET /vnc.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.matches("HTTP/1.1 200 OK").count(), 2, "{r}");
    assert!(!proxy.log().contains("token%3Dtok"), "query string logged");
}

#[tokio::test]
async fn oversized_and_malformed_requests() {
    let qemu = Qemu::tcp();
    let proxy = Proxy::start(&["--target", &qemu.addr()]).await;
    let mut big = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nX-Pad: ".to_vec();
    big.resize(64 * 1024, b'a');
    big.extend_from_slice(b"\r\n\r\n");
    let r = http_raw(proxy.port, &big).await;
    assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    let r = http_raw(proxy.port, b"\x16\x03\x01\x00\x05hello\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    let r = http_raw(proxy.port, b"GET / HTTP/1.1\r\nBroken header line\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    // Still alive and serving.
    let mut rfb = Rfb::new(ws_connect(&proxy.url("/")).await);
    assert_eq!(rfb.read(12).await, BANNER);
}

#[tokio::test]
async fn target_down_closes_with_1011() {
    let dead = format!("127.0.0.1:{}", free_port());
    let proxy = Proxy::start(&["--target", &dead]).await;
    let mut ws = ws_connect(&proxy.url("/websockify")).await;
    assert_eq!(
        close_code(&mut ws, Duration::from_secs(5)).await,
        Some(CloseCode::Error)
    );
}

#[tokio::test]
async fn many_concurrent_sessions() {
    let qemu = Qemu::tcp();
    let proxy = Proxy::start(&["--target", &qemu.addr()]).await;
    let mut sessions = Vec::new();
    for _ in 0..8 {
        sessions.push(Rfb::new(ws_connect(&proxy.url("/")).await));
    }
    for s in &mut sessions {
        assert_eq!(s.read(12).await, BANNER);
    }
}

#[tokio::test]
async fn idle_timeout_exits_only_without_clients() {
    let qemu = Qemu::tcp();
    // Nobody ever connects (beyond the readiness probe): exits after about 1 s.
    let mut p = Proxy::start(&["--target", &qemu.addr(), "--idle-timeout", "1"]).await;
    let st = p.exited_within(Duration::from_secs(4)).await;
    assert!(st.is_some_and(|s| s.success()), "{st:?}: {}", p.log());

    // A live client keeps it alive past the timeout; its leaving starts the clock.
    let mut p = Proxy::start(&["--target", &qemu.addr(), "--idle-timeout", "1"]).await;
    let mut rfb = Rfb::new(ws_connect(&p.url("/")).await);
    assert_eq!(rfb.read(12).await, BANNER);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        p.child.try_wait().expect("try_wait").is_none(),
        "exited with a client connected"
    );
    rfb.ws.close(None).await.expect("close");
    drop(rfb);
    let left = Instant::now();
    let st = p.exited_within(Duration::from_secs(4)).await;
    assert!(st.is_some_and(|s| s.success()), "{st:?}: {}", p.log());
    assert!(
        left.elapsed() >= Duration::from_millis(700),
        "exited too early"
    );
}

#[tokio::test]
async fn max_lifetime_closes_live_session() {
    let qemu = Qemu::tcp();
    let mut p = Proxy::start(&["--target", &qemu.addr(), "--max-lifetime", "2"]).await;
    let mut rfb = Rfb::new(ws_connect(&p.url("/")).await);
    let (w, h) = rfb.handshake().await;
    assert!(w > 0 && h > 0);
    assert_eq!(
        close_code(&mut rfb.ws, Duration::from_secs(4)).await,
        Some(CloseCode::Away)
    );
    let st = p.exited_within(Duration::from_secs(2)).await;
    assert!(st.is_some_and(|s| s.success()), "{st:?}: {}", p.log());
}

#[tokio::test]
async fn sigterm_exits_zero_promptly_with_live_client() {
    let qemu = Qemu::tcp();
    let mut p = Proxy::start(&["--target", &qemu.addr()]).await;
    let mut rfb = Rfb::new(ws_connect(&p.url("/")).await);
    assert_eq!(rfb.read(12).await, BANNER);
    // A connection still sending its request head must not delay the exit either.
    let mut half = TcpStream::connect(("127.0.0.1", p.port))
        .await
        .expect("connect");
    half.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;

    let sent = Instant::now();
    nix::sys::signal::kill(p.pid(), nix::sys::signal::Signal::SIGTERM).expect("kill");
    assert_eq!(
        close_code(&mut rfb.ws, Duration::from_secs(2)).await,
        Some(CloseCode::Away)
    );
    let st = p.exited_within(Duration::from_secs(2)).await;
    assert!(st.is_some_and(|s| s.success()), "{st:?}: {}", p.log());
    assert!(
        sent.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        sent.elapsed()
    );
}

#[tokio::test]
async fn address_in_use_exits_nonzero() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (mut child, log) = spawn_proxy(&["--listen", &addr, "--target", "127.0.0.1:5900"]);
    let st = wait_exit(&mut child, Duration::from_secs(5)).await;
    let _ = child.kill();
    let _ = child.wait();
    let st = st.expect("proxy should exit when its port is taken");
    assert!(!st.success(), "EADDRINUSE must exit non-zero");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let log = log.lock().expect("lock").clone();
    assert!(log.contains(&addr), "stderr should name {addr}: {log}");
    drop(taken);
}

#[tokio::test]
async fn bad_flags_and_unreadable_files_exit_nonzero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-token");
    let missing = missing.to_str().expect("path");
    let empty = write_file(dir.path(), "empty", "\n");
    let listen = format!("127.0.0.1:{}", free_port());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--listen", &listen], "--target"),
        (
            vec![
                "--listen",
                &listen,
                "--target",
                "h:1",
                "--unix-target",
                "/s",
            ],
            "cannot be used",
        ),
        (vec!["--listen", "nonsense", "--target", "h:1"], "--listen"),
        (
            vec![
                "--listen",
                &listen,
                "--target",
                "h:1",
                "--key-file",
                missing,
            ],
            missing,
        ),
        (
            vec![
                "--listen",
                &listen,
                "--target",
                "h:1",
                "--key-file",
                empty.to_str().expect("path"),
            ],
            "does not hold a key",
        ),
        (
            vec!["--listen", &listen, "--target", "h:1", "--web", missing],
            missing,
        ),
        (
            vec![
                "--listen",
                &listen,
                "--target",
                "h:1",
                "--tls-cert",
                missing,
                "--tls-key",
                missing,
            ],
            missing,
        ),
    ];
    for (args, needle) in cases {
        let (mut child, log) = spawn_proxy(&args);
        let st = wait_exit(&mut child, Duration::from_secs(5)).await;
        let _ = child.kill();
        let _ = child.wait();
        let st = st.unwrap_or_else(|| panic!("{args:?} did not exit"));
        assert!(!st.success(), "{args:?} exited 0");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let log = log.lock().expect("lock").clone();
        assert!(
            log.contains(needle),
            "{args:?}: stderr lacks {needle:?}: {log}"
        );
    }
}

// ---------------------------------------------------------------- hardening (issue #11)

/// The stats file's counters, once the proxy wrote them.
fn stats(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

/// Waits until `f` holds for the stats file (the proxy writes it within ~200 ms of a change).
async fn wait_stats(path: &Path, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stats(path);
        if f(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: stats {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the server closed `s` within `limit` (EOF or reset; data before it is ignored).
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A websocket upgrade done by hand on a raw socket: returns the socket after the 101 head.
async fn raw_upgrade(port: u16, path: &str) -> TcpStream {
    use tokio::io::AsyncReadExt;
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.expect("read"), 1, "closed in the head");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101 "), "{head:?}");
    s
}

#[tokio::test]
async fn over_the_cap_unauthenticated_connections_make_room_and_authenticated_ones_get_503() {
    let qemu = Qemu::tcp();
    let dir = tempfile::tempdir().expect("tempdir");
    let (tf, key) = key_file(dir.path());
    let sf = dir.path().join("stats.json");
    let qaddr = qemu.addr();
    let proxy = Proxy::start(&[
        "--target",
        &qaddr,
        "--key-file",
        tf.to_str().expect("path"),
        "--stats-file",
        sf.to_str().expect("path"),
        "--max-connections",
        "3",
    ])
    .await;
    let url = || proxy.url(&format!("/websockify?token={}", ticket(&key)));
    // Three silent sockets take every slot...
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(
            TcpStream::connect(("127.0.0.1", proxy.port))
                .await
                .expect("connect"),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...and still cannot keep the real user out: each new connection evicts the oldest
    // one that has not passed the token check.
    let mut consoles = Vec::new();
    for _ in 0..3 {
        let mut rfb = Rfb::new(ws_connect(&url()).await);
        assert_eq!(rfb.read(12).await, BANNER);
        consoles.push(rfb);
    }
    for (i, s) in silent.iter_mut().enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(3)).await,
            "silent connection {i} was not evicted"
        );
    }
    // Every slot holds an authenticated console: the next connection gets 503, whoever
    // it is, and the consoles are untouched.
    let (status, body) = refused_status(request(&url(), Some("binary"), None)).await;
    assert_eq!(status, 503, "{body}");
    let resp = http_get(proxy.port, "/").await;
    assert!(resp.starts_with("HTTP/1.1 503 "), "{resp}");
    wait_stats(&sf, "refusals counted", |s| {
        s["refused"].as_u64() >= Some(2 + 3) && s["active"] == 3
    })
    .await;
    for rfb in &mut consoles {
        rfb.send(BANNER).await;
        let n = rfb.read(1).await[0] as usize;
        assert!(n > 0);
    }
    drop(consoles.pop());
    wait_stats(&sf, "a console left", |s| s["active"] == 2).await;
    // A freed slot serves again.
    let mut rfb = Rfb::new(ws_connect(&url()).await);
    assert_eq!(rfb.read(12).await, BANNER);
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_dropped_and_keepalive_is_on() {
    let qemu = Qemu::tcp();
    let dir = tempfile::tempdir().expect("tempdir");
    let sf = dir.path().join("stats.json");
    let qaddr = qemu.addr();
    let proxy = Proxy::start(&[
        "--target",
        &qaddr,
        "--stats-file",
        sf.to_str().expect("path"),
        "--ping-interval",
        "1",
    ])
    .await;
    // A live client: tungstenite answers pings while it reads.
    let mut good = ws_connect(&proxy.url("/websockify")).await;
    let reader = tokio::spawn(async move {
        let mut pings = 0u32;
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, good.next()).await {
            if matches!(m, Message::Ping(_)) {
                pings += 1;
            }
        }
        (pings, good)
    });
    // A vanished client: upgraded, then never reads nor answers.
    let started = Instant::now();
    let mut gone = raw_upgrade(proxy.port, "/websockify").await;
    wait_stats(&sf, "both sessions open", |s| s["active"] == 2).await;
    // TCP keepalive is armed on the accepted sockets (ss shows the timer).
    let ss = Command::new("ss")
        .args([
            "-tno",
            "state",
            "established",
            &format!("( sport = :{} )", proxy.port),
        ])
        .output()
        .expect("ss");
    let ss = String::from_utf8_lossy(&ss.stdout).into_owned();
    assert!(ss.contains("keepalive"), "no keepalive timer: {ss}");
    wait_stats(&sf, "the silent client dropped", |s| s["active"] == 1).await;
    let took = started.elapsed();
    eprintln!("measured: a silent client dropped {took:?} after its upgrade (ping interval 1 s)");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "dropped after {took:?} (ping interval 1 s, limit 2 s)"
    );
    assert!(closed_within(&mut gone, Duration::from_secs(2)).await);
    let (pings, mut good) = reader.await.expect("reader");
    assert!(pings >= 3, "the live client got {pings} pings in 5 s");
    // The live client is still connected after more than twice the limit.
    good.send(Message::Binary(BANNER.to_vec().into()))
        .await
        .expect("still connected");
    assert_eq!(stats(&sf)["active"], 1);
}

#[tokio::test]
async fn websocket_protocol_errors_get_close_1002_and_bad_upgrades_400() {
    let qemu = Qemu::tcp();
    let qaddr = qemu.addr();
    let proxy = Proxy::start(&["--target", &qaddr]).await;
    for (what, frame) in [
        ("reserved bits", vec![0xffu8; 16]),
        ("stray continuation", vec![0x80, 0x80, 1, 2, 3, 4]),
        ("unmasked frame", vec![0x82, 0x03, 1, 2, 3]),
    ] {
        let mut ws = ws_connect(&proxy.url("/websockify")).await;
        match ws.get_mut() {
            MaybeTlsStream::Plain(s) => s.write_all(&frame).await.expect("write"),
            _ => unreachable!("plain ws"),
        }
        assert_eq!(
            close_code(&mut ws, Duration::from_secs(5)).await,
            Some(CloseCode::Protocol),
            "{what}"
        );
    }
    for (what, key, host) in [
        ("short key", "abc", "Host: h\r\n"),
        ("key of 17 bytes", "dGhlIHNhbXBsZSBub25jZXg=", "Host: h\r\n"),
        ("no Host", "dGhlIHNhbXBsZSBub25jZQ==", ""),
        (
            "Host with a space",
            "dGhlIHNhbXBsZSBub25jZQ==",
            "Host: a b\r\n",
        ),
    ] {
        let resp = http_raw(
            proxy.port,
            format!(
                "GET / HTTP/1.1\r\n{host}Upgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 400 "), "{what}: {resp}");
    }
}

#[tokio::test]
async fn web_serves_regular_files_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = dir.path().join("web");
    write_file(&web, "vnc.html", "<html>");
    std::fs::create_dir_all(web.join("noindex")).expect("mkdir");
    nix::unistd::mkfifo(&web.join("fifo.html"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let proxy = Proxy::start(&[
        "--target",
        "127.0.0.1:9",
        "--web",
        web.to_str().expect("path"),
    ])
    .await;
    // A FIFO would block the open (and the connection) forever; it is refused at once.
    let started = Instant::now();
    let resp = http_get(proxy.port, "/fifo.html").await;
    assert!(resp.starts_with("HTTP/1.1 404 "), "{resp}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let resp = http_get(proxy.port, "/noindex/").await;
    assert!(resp.starts_with("HTTP/1.1 404 "), "{resp}");
    let resp = http_get(proxy.port, "/vnc.html").await;
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
}

#[tokio::test]
async fn the_proxy_truncates_its_own_log_past_the_cap() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("vm1.log");
    std::fs::write(&log_path, "x".repeat(10_000)).expect("prefill");
    let open = || {
        std::fs::OpenOptions::new()
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .expect("log")
    };
    let port = free_port();
    let mut child = Command::new(VNCD)
        .args([
            "proxy",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--target",
            "127.0.0.1:9",
            "--max-log-bytes",
            "4096",
        ])
        .env("VNCD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(open()))
        .stderr(Stdio::from(open()))
        .spawn()
        .expect("spawn");
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(&mut child);
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.len() < 4096 && text.contains("log truncated") {
            assert!(!text.contains("xxxx"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "log not truncated: {} bytes",
            text.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
