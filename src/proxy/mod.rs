//! `vncd proxy`: the data plane. One process per console session that accepts websocket
//! connections (noVNC, websockify clients) and pumps each one to the VM's VNC server.
//!
//! - The listening socket is bound by this process itself, before anything is accepted, so a
//!   supervisor can see readiness as a LISTEN socket among the process's descriptors.
//! - Websocket upgrades are served on `/`, `/websockify`, `/TOKEN` and `/websockify/TOKEN`.
//!   With `--token-file`, an upgrade without the right token gets 403 and the VNC target is
//!   never contacted. Static files (`--web`) are served WITHOUT the token: noVNC's page must be
//!   able to load before it knows where to connect, and it holds nothing secret.
//! - `run` returns `Ok(())` on every clean stop (SIGTERM, SIGINT, idle timeout, max lifetime)
//!   and an error naming the address or file at fault otherwise.
//! - Tokens never reach the logs: request paths are logged without query strings and with
//!   token-shaped segments redacted.

mod args;
mod bridge;
mod http;
mod logcap;
mod refusals;
pub(crate) mod slots;
pub mod stats;
mod tls;
mod token;
mod upgrade;
mod web;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::{Instrument, debug, info, warn};

pub use args::ProxyArgs;

use bridge::End;
use http::HeadError;
use token::{KeyFileError, Tickets};

/// Time a new connection has to send its first request head (and finish TLS).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time an idle keep-alive HTTP connection is kept open.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to connect to the VNC target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// On stop, time given to connections to close cleanly before they are dropped.
const STOP_GRACE: Duration = Duration::from_millis(800);
/// Connections over `--max-connections` that are still being answered 503 (the answer
/// needs a moment so the client reads it instead of a reset). Beyond this many, excess
/// connections are closed without an answer.
const MAX_REJECTING: usize = 64;
/// The 503 for a connection over `--max-connections`.
const TOO_MANY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
Content-Length: 21\r\nConnection: close\r\nRetry-After: 5\r\n\r\ntoo many connections\n";

/// Why the proxy could not start or run. Each message names the address or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot read ticket key file {}: {source}", path.display())]
    KeyFile { path: PathBuf, source: io::Error },
    #[error("ticket key file {} does not hold a key (64 hex digits)", path.display())]
    BadKey { path: PathBuf },
    #[error("cannot use web directory {}: {source}", path.display())]
    WebDir { path: PathBuf, source: io::Error },
    #[error("cannot load TLS certificate {}: {detail}", path.display())]
    TlsCert { path: PathBuf, detail: String },
    #[error("cannot load TLS key {}: {detail}", path.display())]
    TlsKey { path: PathBuf, detail: String },
    #[error(
        "TLS certificate {} and key {} cannot be used together: {source}",
        cert.display(),
        key.display()
    )]
    TlsConfig {
        cert: PathBuf,
        key: PathBuf,
        source: tokio_rustls::rustls::Error,
    },
    #[error("cannot handle {signal}: {source}")]
    Signal {
        signal: &'static str,
        source: io::Error,
    },
}

/// Where sessions are pumped to.
#[derive(Debug, Clone)]
enum Target {
    Tcp(String),
    Unix(PathBuf),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(a) => f.write_str(a),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What every connection needs, loaded once at start.
struct Shared {
    target: Target,
    tickets: Option<Tickets>,
    origins: Vec<String>,
    /// Canonical web root.
    web: Option<PathBuf>,
    tls: Option<TlsAcceptor>,
    counters: Arc<stats::Counters>,
    /// Refused and timed-out connections, summed up in the log (see `refusals`).
    refusals: Arc<refusals::Refusals>,
    /// The `--max-connections` cap (see `slots`).
    slots: Arc<slots::Slots>,
    ping_every: Duration,
}

impl Shared {
    fn load(args: &ProxyArgs) -> Result<Self, ProxyError> {
        let target = match (&args.target, &args.unix_target) {
            (_, Some(p)) => Target::Unix(p.clone()),
            (Some(a), None) => Target::Tcp(a.clone()),
            // clap makes one of them required; an empty target would fail every session.
            (None, None) => Target::Tcp(String::new()),
        };
        let tickets = match &args.key_file {
            None => None,
            Some(path) => Some(Tickets::load(path, args.nonce_dir.as_deref()).map_err(
                |e| match e {
                    KeyFileError::Io(source) => ProxyError::KeyFile {
                        path: path.clone(),
                        source,
                    },
                    KeyFileError::Malformed => ProxyError::BadKey { path: path.clone() },
                },
            )?),
        };
        let web = match &args.web {
            None => None,
            Some(dir) => Some(web_root(dir)?),
        };
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            _ => None,
        };
        Ok(Self {
            target,
            tickets,
            origins: args.origins.clone(),
            web,
            tls,
            counters: Arc::default(),
            refusals: Arc::default(),
            slots: slots::Slots::new(usize::try_from(args.max_connections).unwrap_or(usize::MAX)),
            ping_every: Duration::from_secs(args.ping_interval),
        })
    }
}

fn web_root(dir: &Path) -> Result<PathBuf, ProxyError> {
    let err = |source| ProxyError::WebDir {
        path: dir.to_owned(),
        source,
    };
    let root = std::fs::canonicalize(dir).map_err(err)?;
    if !std::fs::metadata(&root).map_err(err)?.is_dir() {
        return Err(err(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    Ok(root)
}

/// Run the proxy until a signal, the idle timeout or the max lifetime stops it.
pub async fn run(args: ProxyArgs) -> Result<(), ProxyError> {
    let started = Instant::now();
    let shared = Arc::new(Shared::load(&args)?);
    let mut signals = Signals::new()?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| ProxyError::Bind {
            addr: args.listen,
            source,
        })?;
    let local = listener.local_addr().unwrap_or(args.listen);
    info!(
        listen = %local,
        target = %shared.target,
        tls = shared.tls.is_some(),
        tickets = shared.tickets.is_some(),
        web = shared.web.is_some(),
        "proxy listening"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let background = Background::start(&args, &shared, &stop_rx);
    let mut tasks = JoinSet::new();
    let reason = accept_loop(
        &args,
        &shared,
        &listener,
        &mut signals,
        &mut tasks,
        &stop_rx,
        started,
    )
    .await;
    drop(listener);
    info!(reason, connections = tasks.len(), "proxy stopping");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(STOP_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.shutdown().await;
    background.finish(&args, &shared).await;
    Ok(())
}

/// SIGTERM and SIGINT, which end the proxy gracefully.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, ProxyError> {
        let sig = |kind, name| {
            signal(kind).map_err(|source| ProxyError::Signal {
                signal: name,
                source,
            })
        };
        Ok(Signals {
            term: sig(SignalKind::terminate(), "SIGTERM")?,
            int: sig(SignalKind::interrupt(), "SIGINT")?,
        })
    }
}

/// The proxy's background tasks: the stats file, the refusal summary and the log cap.
struct Background {
    stats_writer: Option<tokio::task::JoinHandle<()>>,
    refusal_reporter: tokio::task::JoinHandle<()>,
}

impl Background {
    fn start(args: &ProxyArgs, shared: &Arc<Shared>, stop: &watch::Receiver<bool>) -> Self {
        let stats_writer = args
            .stats_file
            .clone()
            .map(|path| tokio::spawn(stats::writer(path, shared.counters.clone(), stop.clone())));
        let refusal_reporter = tokio::spawn(refusals::reporter(
            shared.refusals.clone(),
            Duration::from_secs(args.refusal_log_interval),
            stop.clone(),
        ));
        if args.max_log_bytes > 0 {
            tokio::spawn(logcap::watch_stderr(args.max_log_bytes, stop.clone()));
        }
        Background {
            stats_writer,
            refusal_reporter,
        }
    }

    /// After the stop: the last refusal summary and the final counters are written.
    async fn finish(self, args: &ProxyArgs, shared: &Shared) {
        let _ = self.refusal_reporter.await;
        if let (Some(task), Some(path)) = (self.stats_writer, &args.stats_file) {
            let _ = task.await;
            stats::write_final(path, &shared.counters);
        }
    }
}

/// Accepts and serves connections until a signal, the maximum lifetime or the idle
/// timeout; returns why it stopped.
async fn accept_loop(
    args: &ProxyArgs,
    shared: &Arc<Shared>,
    listener: &TcpListener,
    signals: &mut Signals,
    tasks: &mut JoinSet<()>,
    stop_rx: &watch::Receiver<bool>,
    started: Instant,
) -> &'static str {
    let rejecting = Arc::new(AtomicUsize::new(0));
    let connection_no = AtomicU64::new(0);
    let idle = (args.idle_timeout > 0).then(|| Duration::from_secs(args.idle_timeout));
    let end_of_life =
        (args.max_lifetime > 0).then(|| started + Duration::from_secs(args.max_lifetime));
    let mut idle_since = started;
    loop {
        let idle_deadline = idle.filter(|_| tasks.is_empty()).map(|d| idle_since + d);
        tokio::select! {
            _ = signals.term.recv() => return "SIGTERM",
            _ = signals.int.recv() => return "SIGINT",
            () = sleep_until(end_of_life) => return "max lifetime reached",
            () = sleep_until(idle_deadline) => return "idle timeout",
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    warn!(error = %e, "connection task failed");
                }
                if tasks.is_empty() {
                    idle_since = Instant::now();
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    let n = connection_no.fetch_add(1, Ordering::Relaxed) + 1;
                    let Ok(slot) = shared.slots.admit(n) else {
                        reject_excess(shared, sock, &rejecting);
                        continue;
                    };
                    // One span per connection: every line it logs names the peer and the
                    // connection number, however deep in the code it is written.
                    let span = tracing::info_span!("conn", n, peer = %peer);
                    let conn = connection(shared.clone(), sock, slot, stop_rx.clone());
                    tasks.spawn(conn.instrument(span));
                }
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Answers a connection over `--max-connections` (every slot authenticated) with 503 (plain HTTP only; a TLS client
/// would not understand it) and counts it as refused. The answer is written in a task of
/// its own, given a second to be read, so the accept loop never waits for a client.
fn reject_excess(shared: &Arc<Shared>, sock: TcpStream, rejecting: &Arc<AtomicUsize>) {
    shared.counters.refused();
    shared.refusals.record("503 too many connections");
    if shared.tls.is_some() || rejecting.load(Ordering::Relaxed) >= MAX_REJECTING {
        return;
    }
    rejecting.fetch_add(1, Ordering::Relaxed);
    let rejecting = rejecting.clone();
    tokio::spawn(async move {
        let mut sock = sock;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            use tokio::io::AsyncReadExt;
            sock.write_all(TOO_MANY).await?;
            sock.shutdown().await?;
            // Drain what the client sent, so closing does not reset the connection
            // before the client has read the answer.
            let mut sink = [0u8; 1024];
            while sock.read(&mut sink).await? > 0 {}
            io::Result::Ok(())
        })
        .await;
        rejecting.fetch_sub(1, Ordering::Relaxed);
    });
}

/// Sleep until `deadline`, or forever if there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// What one connection did, for its log line.
#[derive(Debug, Default)]
struct Summary {
    kind: &'static str,
    /// Redacted path of the last request.
    path: String,
    outcome: String,
    requests: u32,
    to_target: u64,
    to_client: u64,
    /// Refused or timed out before anything was served: summed up, not logged alone.
    refused: bool,
}

/// TCP keepalive: the kernel probes an idle connection after `every` and then every few
/// seconds, and gives up after about `2 * every` in all, so a client that vanished
/// (powered off, network gone) is dropped even while nothing is sent to it. The
/// user timeout does the same for data sent but never acknowledged.
fn keepalive(sock: &TcpStream, every: Duration) {
    let probe = (every / 4).max(Duration::from_secs(1));
    let params = socket2::TcpKeepalive::new()
        .with_time(every)
        .with_interval(probe)
        .with_retries(4);
    let s = socket2::SockRef::from(sock);
    if let Err(e) = s
        .set_tcp_keepalive(&params)
        .and_then(|()| s.set_tcp_user_timeout(Some(every * 2)))
    {
        debug!(error = %e, "cannot set TCP keepalive");
    }
}

/// Serve one accepted connection and log one line when it ends (the caller's span names
/// the peer and the connection number). Refused ones are only counted, see `refusals`.
async fn connection(
    shared: Arc<Shared>,
    sock: TcpStream,
    slot: slots::Slot,
    stop: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let _ = sock.set_nodelay(true);
    keepalive(&sock, shared.ping_every);
    let mut summary = Summary {
        kind: "http",
        ..Summary::default()
    };
    let served = async {
        match &shared.tls {
            None => serve(&shared, sock, &slot, stop, &mut summary).await,
            Some(acceptor) => {
                match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(sock)).await {
                    Ok(Ok(tls)) => serve(&shared, tls, &slot, stop, &mut summary).await,
                    Ok(Err(_)) => {
                        summary.outcome = "TLS handshake failed".into();
                        summary.refused = true;
                    }
                    Err(_) => {
                        summary.outcome = "TLS handshake timed out".into();
                        summary.refused = true;
                    }
                }
            }
        }
    };
    let evicted = tokio::select! {
        () = served => false,
        () = slot.evicted() => true,
    };
    if evicted {
        shared.counters.refused();
        summary.outcome = "closed for a newer connection (--max-connections)".into();
        summary.refused = true;
    }
    drop(slot);
    if summary.refused {
        shared.refusals.record(&summary.outcome);
        debug!(outcome = %summary.outcome, "connection refused");
        return;
    }
    if summary.outcome.is_empty() {
        summary.outcome = "closed".into();
    }
    if summary.path.is_empty() {
        summary.path = "-".into();
    }
    info!(
        kind = summary.kind,
        path = %summary.path,
        requests = summary.requests,
        outcome = %summary.outcome,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_to_target = summary.to_target,
        bytes_to_client = summary.to_client,
        "connection closed"
    );
}

/// Run `fut` unless the proxy stops first.
async fn unless_stopped<F: Future>(stop: &mut watch::Receiver<bool>, fut: F) -> Option<F::Output> {
    tokio::select! {
        out = fut => Some(out),
        _ = stop.wait_for(|s| *s) => None,
    }
}

/// Read requests from one connection: static files (keep-alive) until a websocket upgrade.
async fn serve<S>(
    shared: &Shared,
    mut stream: S,
    slot: &slots::Slot,
    mut stop: watch::Receiver<bool>,
    summary: &mut Summary,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    loop {
        let wait = if summary.requests == 0 {
            HEAD_TIMEOUT
        } else {
            KEEPALIVE_TIMEOUT
        };
        let Some(head) =
            unless_stopped(&mut stop, http::read_head(&mut stream, &mut buf, wait)).await
        else {
            summary.outcome = End::Shutdown.as_str().into();
            return;
        };
        let req = match head {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(e) => {
                let (status, msg) = match e {
                    HeadError::TooLarge => (431, "request head too large"),
                    HeadError::Malformed(m) => (400, m),
                    HeadError::Timeout if summary.requests == 0 => (408, "no request in time"),
                    HeadError::Timeout => return,
                    HeadError::Io(e) => {
                        summary.outcome = format!("client error: {e}");
                        return;
                    }
                };
                let _ = http::write_plain(&mut stream, status, msg, "", false).await;
                let _ = stream.shutdown().await;
                summary.outcome = format!("{status} {msg}");
                summary.refused = true;
                return;
            }
        };
        summary.requests += 1;
        summary.path = token::redact(&req.target, req.wants_websocket());
        if req.wants_websocket() {
            summary.kind = "websocket";
            return websocket(shared, stream, slot, req, buf, stop, summary).await;
        }
        // A request with a body (not expected for GET/HEAD) ends the connection: its body
        // would otherwise be taken for the next request.
        let keep_alive = req.keep_alive()
            && matches!(req.method.as_str(), "GET" | "HEAD")
            && req.header("content-length").is_none_or(|l| l.trim() == "0")
            && req.header("transfer-encoding").is_none();
        let served = web::serve(&mut stream, shared.web.as_deref(), &req, keep_alive);
        match unless_stopped(&mut stop, served).await {
            Some(Ok(n)) => summary.to_client += n,
            Some(Err(_)) => {
                summary.outcome = "client error".into();
                return;
            }
            None => {
                summary.outcome = End::Shutdown.as_str().into();
                return;
            }
        }
        debug!(path = %summary.path, method = %req.method, "static request served");
        if !keep_alive {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// Uses up the ticket of an accepted upgrade: the last check, so only an upgrade that
/// would otherwise succeed spends it. A replay (also of a ticket whose first connection
/// is still open) is refused here.
fn use_ticket(
    shared: &Shared,
    accept: upgrade::Accept,
) -> Result<upgrade::Accept, upgrade::Reject> {
    match (&shared.tickets, &accept.ticket) {
        (Some(t), Some(v)) => match t.consume(v) {
            Ok(()) => Ok(accept),
            Err(e) => {
                if let crate::ticket::TicketError::NonceStore { .. } = e {
                    warn!(error = %e, "cannot record a ticket's use; refusing it");
                }
                Err(upgrade::ticket_rejected(&e))
            }
        },
        _ => Ok(accept),
    }
}

/// A connected target of either kind.
enum TargetStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

async fn connect(target: &Target) -> io::Result<TargetStream> {
    let connecting = async {
        match target {
            Target::Tcp(addr) => {
                let s = TcpStream::connect(addr.as_str()).await?;
                let _ = s.set_nodelay(true);
                Ok(TargetStream::Tcp(s))
            }
            Target::Unix(path) => Ok(TargetStream::Unix(UnixStream::connect(path).await?)),
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")))
}

/// Check the upgrade, connect the target, answer 101 and pump until the session ends.
async fn websocket<S>(
    shared: &Shared,
    mut stream: S,
    slot: &slots::Slot,
    req: http::Request,
    leftover: Vec<u8>,
    mut stop: watch::Receiver<bool>,
    summary: &mut Summary,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let accept = match upgrade::check(&req, shared.tickets.as_ref(), &shared.origins)
        .and_then(|a| use_ticket(shared, a))
    {
        Ok(a) => a,
        Err(r) => {
            shared.counters.refused();
            if let Some(reason) = r.ticket {
                shared.counters.ticket_refused(reason);
            }
            let _ = http::write_plain(&mut stream, r.status, r.message, r.extra, false).await;
            let _ = stream.shutdown().await;
            summary.outcome = format!("{} {}", r.status, r.message);
            summary.refused = true;
            return;
        }
    };
    // From here on the connection is a console session and keeps its slot.
    if !slot.authenticated() {
        shared.counters.refused();
        let _ = stream.write_all(TOO_MANY).await;
        let _ = stream.shutdown().await;
        summary.outcome = "503 too many connections".into();
        summary.refused = true;
        return;
    }
    let Some(target) = unless_stopped(&mut stop, connect(&shared.target)).await else {
        summary.outcome = End::Shutdown.as_str().into();
        return;
    };
    if stream.write_all(accept.response.as_bytes()).await.is_err() || stream.flush().await.is_err()
    {
        summary.outcome = "client error".into();
        return;
    }
    let ws = WebSocketStream::from_partially_read(
        stream,
        leftover,
        Role::Server,
        Some(bridge::ws_config()),
    )
    .await;
    let counters = &shared.counters;
    let stats = match target {
        Err(e) => {
            warn!(target = %shared.target, error = %e, "cannot connect to the VNC target");
            bridge::close(ws, CloseCode::Error, "cannot connect to the VNC target").await;
            summary.outcome = format!("target unreachable: {e}");
            return;
        }
        Ok(TargetStream::Tcp(t)) => {
            counters.opened();
            bridge::run(ws, t, &mut stop, counters, shared.ping_every).await
        }
        Ok(TargetStream::Unix(t)) => {
            counters.opened();
            bridge::run(ws, t, &mut stop, counters, shared.ping_every).await
        }
    };
    counters.closed();
    summary.outcome = stats.end.as_str().into();
    summary.to_target = stats.to_target;
    summary.to_client = stats.to_client;
}
