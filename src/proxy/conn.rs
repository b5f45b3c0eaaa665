//! One accepted connection, from TLS and the first request head to the end of its console
//! session: static files (keep-alive), then the websocket upgrade, the ticket, the target
//! and the bridge.
//!
//! Shared by the per-session `vncd proxy` process and the relay (`crate::relay`), so both
//! data planes check tickets and bridge consoles with the same code. What differs between
//! them comes in through two small traits:
//! - [`Router`]: which [`Console`] an upgrade goes to (one fixed console for a proxy or a
//!   relay session port; the session the ticket names for the relay's gateway);
//! - [`Gate`]: the connection's place in the pre-authentication admission (the proxy's
//!   slots, the relay's per-source admission), which may evict it while it is pending.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::{debug, warn};

use super::bridge::{self, End};
use super::http::{self, HeadError};
use super::stats;
use super::token::{self, Tickets};
use super::upgrade;
use super::web;

/// Time a new connection has to send its first request head (and finish TLS).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time an idle keep-alive HTTP connection is kept open.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to connect to the VNC target.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The 503 for a connection over the authenticated-connection cap.
pub const TOO_MANY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
Content-Length: 21\r\nConnection: close\r\nRetry-After: 5\r\n\r\ntoo many connections\n";

/// Where sessions are pumped to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `HOST:PORT`.
    Tcp(String),
    /// A unix socket (e.g. QEMU's `-vnc unix:PATH`).
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

/// A connected target of either kind.
pub enum TargetStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Connects to the target within [`CONNECT_TIMEOUT`].
pub async fn connect(target: &Target) -> io::Result<TargetStream> {
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

/// One console: what an upgrade is checked against and bridged to.
pub struct Console {
    pub target: Target,
    /// `None`: no ticket required (a proxy without `--key-file`).
    pub tickets: Option<Tickets>,
    pub counters: Arc<stats::Counters>,
    pub ping_every: Duration,
    /// The cap on authenticated (bridged) connections; `None`: no cap here (the proxy
    /// caps with its slots instead). Shared, so the relay can change it in place.
    limit: Option<Arc<Limit>>,
    /// When set, bridges end once it turns true (the relay ends a session's connections
    /// this way); otherwise the `stop` given to [`connection`] ends them.
    ends: Option<watch::Sender<bool>>,
}

impl fmt::Debug for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Console")
            .field("target", &self.target)
            .field("tickets", &self.tickets)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl Console {
    pub fn new(
        target: Target,
        tickets: Option<Tickets>,
        counters: Arc<stats::Counters>,
        ping_every: Duration,
    ) -> Self {
        Console {
            target,
            tickets,
            counters,
            ping_every,
            limit: None,
            ends: None,
        }
    }

    /// A console whose connections end on [`Console::end_connections`] rather than on the
    /// server's stop, capped by `limit`.
    pub fn endable(mut self, limit: Arc<Limit>) -> Self {
        self.limit = Some(limit);
        self.ends = Some(watch::channel(false).0);
        self
    }

    /// Ends every bridged connection of this console (and any it would still bridge).
    pub fn end_connections(&self) {
        if let Some(e) = &self.ends {
            let _ = e.send(true);
        }
    }
}

/// A cap on authenticated connections, shared by the generations of one relay session.
#[derive(Debug, Default)]
pub struct Limit {
    max: AtomicUsize,
    held: AtomicUsize,
}

impl Limit {
    pub fn new(max: usize) -> Arc<Limit> {
        Arc::new(Limit {
            max: AtomicUsize::new(max),
            held: AtomicUsize::new(0),
        })
    }

    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Authenticated connections holding a place now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// A place under the cap, given back on drop; `None` when the cap is reached.
    fn reserve(self: &Arc<Self>) -> Option<Reserved> {
        let max = self.max.load(Ordering::Relaxed);
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Reserved(Some(self.clone())))
    }
}

/// A place under a [`Limit`] (or none, for an uncapped console).
struct Reserved(Option<Arc<Limit>>);

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Some(l) = &self.0 {
            l.held.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Which console a websocket upgrade goes to.
pub trait Router: Send + Sync {
    /// The console for an upgrade presenting `token` (percent-decoded), or `None` when
    /// nothing here can accept it (answered like an invalid ticket: 403).
    fn route(&self, token: Option<&[u8]>) -> Option<Arc<Console>>;
    /// The directory of static files served without a ticket, if any.
    fn web(&self) -> Option<&Path> {
        None
    }
    /// Allowed `Origin` headers of an upgrade; empty allows any.
    fn origins(&self) -> &[String] {
        &[]
    }
}

/// A connection's place in the admission before authentication.
pub trait Gate {
    /// Resolves when the connection was evicted while pending (it then ends at once).
    fn evicted(&self) -> impl Future<Output = ()> + Send;
    /// Marks the connection authenticated, so it can no longer be evicted. `false` if it
    /// was evicted already.
    fn authenticated(&self) -> bool;
}

/// What one connection did, for its log line.
#[derive(Debug, Default)]
pub struct Summary {
    pub kind: &'static str,
    /// Redacted path of the last request.
    pub path: String,
    pub outcome: String,
    pub requests: u32,
    pub to_target: u64,
    pub to_client: u64,
    /// Refused or timed out before anything was served: summed up, not logged alone.
    pub refused: bool,
    /// Evicted while pending, to make room for another connection.
    pub evicted: bool,
}

/// TCP keepalive: the kernel probes an idle connection after `every` and then every few
/// seconds, and gives up after about `2 * every` in all, so a client that vanished
/// (powered off, network gone) is dropped even while nothing is sent to it. The
/// user timeout does the same for data sent but never acknowledged.
pub fn keepalive(sock: &TcpStream, every: Duration) {
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

/// Serves one accepted connection to its end and says what happened. The caller logs it
/// (and counts refusals); `counters` gets the refusals of evicted connections.
pub async fn connection<R: Router, G: Gate>(
    router: &R,
    tls: Option<&TlsAcceptor>,
    sock: TcpStream,
    gate: &G,
    stop: watch::Receiver<bool>,
    ping_every: Duration,
) -> Summary {
    let _ = sock.set_nodelay(true);
    keepalive(&sock, ping_every);
    let mut summary = Summary {
        kind: "http",
        ..Summary::default()
    };
    let served = async {
        match tls {
            None => serve(router, sock, gate, stop, &mut summary).await,
            Some(acceptor) => {
                match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(sock)).await {
                    Ok(Ok(tls)) => serve(router, tls, gate, stop, &mut summary).await,
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
        () = gate.evicted() => true,
    };
    if evicted {
        summary.outcome = "closed for a newer connection (admission)".into();
        summary.refused = true;
        summary.evicted = true;
    }
    summary
}

/// Run `fut` unless the server stops first.
async fn unless_stopped<F: Future>(stop: &mut watch::Receiver<bool>, fut: F) -> Option<F::Output> {
    tokio::select! {
        out = fut => Some(out),
        _ = stop.wait_for(|s| *s) => None,
    }
}

/// Read requests from one connection: static files (keep-alive) until a websocket upgrade.
async fn serve<R: Router, G: Gate, S>(
    router: &R,
    mut stream: S,
    gate: &G,
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
            return websocket(router, stream, gate, req, buf, stop, summary).await;
        }
        // A request with a body (not expected for GET/HEAD) ends the connection: its body
        // would otherwise be taken for the next request.
        let keep_alive = req.keep_alive()
            && matches!(req.method.as_str(), "GET" | "HEAD")
            && req.header("content-length").is_none_or(|l| l.trim() == "0")
            && req.header("transfer-encoding").is_none();
        let served = web::serve(&mut stream, router.web(), &req, keep_alive);
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
    console: &Console,
    accept: upgrade::Accept,
) -> Result<upgrade::Accept, upgrade::Reject> {
    match (&console.tickets, &accept.ticket) {
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

/// Route, check the upgrade, connect the target, answer 101 and pump until the session ends.
async fn websocket<R: Router, G: Gate, S>(
    router: &R,
    mut stream: S,
    gate: &G,
    req: http::Request,
    leftover: Vec<u8>,
    stop: watch::Receiver<bool>,
    summary: &mut Summary,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let presented = token::ws_path(req.path(), req.query()).and_then(|e| e.token(req.query()));
    let Some(console) = router.route(presented.as_deref()) else {
        let r = upgrade::ticket_rejected(&crate::ticket::TicketError::Malformed);
        let _ = http::write_plain(&mut stream, r.status, r.message, r.extra, false).await;
        let _ = stream.shutdown().await;
        summary.outcome = format!("{} {}", r.status, r.message);
        summary.refused = true;
        return;
    };
    let accept = match upgrade::check(&req, console.tickets.as_ref(), router.origins())
        .and_then(|a| use_ticket(&console, a))
    {
        Ok(a) => a,
        Err(r) => {
            console.counters.refused();
            if let Some(reason) = r.ticket {
                console.counters.ticket_refused(reason);
            }
            let _ = http::write_plain(&mut stream, r.status, r.message, r.extra, false).await;
            let _ = stream.shutdown().await;
            summary.outcome = format!("{} {}", r.status, r.message);
            summary.refused = true;
            return;
        }
    };
    // From here on the connection is a console session: it can no longer be evicted.
    let reserved = if !gate.authenticated() {
        None
    } else {
        match &console.limit {
            Some(l) => l.reserve(),
            None => Some(Reserved(None)),
        }
    };
    let Some(_reserved) = reserved else {
        console.counters.refused();
        let _ = stream.write_all(TOO_MANY).await;
        let _ = stream.shutdown().await;
        summary.outcome = "503 too many connections".into();
        summary.refused = true;
        return;
    };
    // A console that ends its own connections (the relay's) is also the one whose end
    // matters while connecting; the server's stop still ends the rest.
    let mut ends = match &console.ends {
        Some(e) => e.subscribe(),
        None => stop.clone(),
    };
    let Some(target) = unless_stopped(&mut ends, connect(&console.target)).await else {
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
    let counters = &console.counters;
    let stats = match target {
        Err(e) => {
            warn!(target = %console.target, error = %e, "cannot connect to the VNC target");
            bridge::close(ws, CloseCode::Error, "cannot connect to the VNC target").await;
            summary.outcome = format!("target unreachable: {e}");
            return;
        }
        Ok(TargetStream::Tcp(t)) => {
            counters.opened();
            bridge::run(ws, t, &mut ends, counters, console.ping_every).await
        }
        Ok(TargetStream::Unix(t)) => {
            counters.opened();
            bridge::run(ws, t, &mut ends, counters, console.ping_every).await
        }
    };
    counters.closed();
    summary.outcome = stats.end.as_str().into();
    summary.to_target = stats.to_target;
    summary.to_client = stats.to_client;
}
