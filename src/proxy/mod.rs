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

pub(crate) mod args;
pub(crate) mod bridge;
pub(crate) mod conn;
pub(crate) mod http;
mod logcap;
pub(crate) mod refusals;
pub(crate) mod slots;
pub mod stats;
pub(crate) mod tls;
pub(crate) mod token;
pub(crate) mod upgrade;
mod web;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, warn};

pub use args::ProxyArgs;

use token::{KeyFileError, Tickets};

/// On stop, time given to connections to close cleanly before they are dropped.
const STOP_GRACE: Duration = Duration::from_millis(800);
/// Connections over `--max-connections` that are still being answered 503 (the answer
/// needs a moment so the client reads it instead of a reset). Beyond this many, excess
/// connections are closed without an answer.
const MAX_REJECTING: usize = 64;
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

/// What every connection needs, loaded once at start.
struct Shared {
    /// The one console this proxy serves.
    console: Arc<conn::Console>,
    /// Allowed `Origin` headers (`--origin`); empty allows any.
    origins: Vec<String>,
    /// Canonical web root.
    web: Option<PathBuf>,
    tls: Option<TlsAcceptor>,
    /// Refused and timed-out connections, summed up in the log (see `refusals`).
    refusals: Arc<refusals::Refusals>,
    /// The `--max-connections` cap (see `slots`).
    slots: Arc<slots::Slots>,
}

impl Shared {
    fn load(args: &ProxyArgs) -> Result<Self, ProxyError> {
        let target = match (&args.target, &args.unix_target) {
            (_, Some(p)) => conn::Target::Unix(p.clone()),
            (Some(a), None) => conn::Target::Tcp(a.clone()),
            // clap makes one of them required; an empty target would fail every session.
            (None, None) => conn::Target::Tcp(String::new()),
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
        let console = conn::Console::new(
            target,
            tickets,
            Arc::default(),
            Duration::from_secs(args.ping_interval),
        );
        Ok(Self {
            console: Arc::new(console),
            origins: args.origins.clone(),
            web,
            tls,
            refusals: Arc::default(),
            slots: slots::Slots::new(usize::try_from(args.max_connections).unwrap_or(usize::MAX)),
        })
    }
}

/// The canonical root of a static-file directory, or why it cannot serve.
pub(crate) fn web_root(dir: &Path) -> Result<PathBuf, ProxyError> {
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
        target = %shared.console.target,
        tls = shared.tls.is_some(),
        tickets = shared.console.tickets.is_some(),
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
        let stats_writer = args.stats_file.clone().map(|path| {
            tokio::spawn(stats::writer(
                path,
                shared.console.counters.clone(),
                stop.clone(),
            ))
        });
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
            stats::write_final(path, &shared.console.counters);
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
    shared.console.counters.refused();
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
            sock.write_all(conn::TOO_MANY).await?;
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

/// Serve one accepted connection and log one line when it ends (the caller's span names
/// the peer and the connection number). Refused ones are only counted, see `refusals`.
async fn connection(
    shared: Arc<Shared>,
    sock: TcpStream,
    slot: slots::Slot,
    stop: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let summary = conn::connection(
        &*shared,
        shared.tls.as_ref(),
        sock,
        &slot,
        stop,
        shared.console.ping_every,
    )
    .await;
    drop(slot);
    log_summary(
        summary,
        started,
        &shared.refusals,
        Some(&shared.console.counters),
    );
}

/// The one log line of a connection; refused ones are summed up in `refusals` instead.
pub(crate) fn log_summary(
    mut summary: conn::Summary,
    started: Instant,
    refusals: &refusals::Refusals,
    counters: Option<&stats::Counters>,
) {
    if summary.refused {
        if let (true, Some(c)) = (summary.evicted, counters) {
            c.refused();
        }
        refusals.record(&summary.outcome);
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

impl conn::Router for Shared {
    fn route(&self, _token: Option<&[u8]>) -> Option<Arc<conn::Console>> {
        Some(self.console.clone())
    }

    fn web(&self) -> Option<&Path> {
        self.web.as_deref()
    }

    fn origins(&self) -> &[String] {
        &self.origins
    }
}

impl conn::Gate for slots::Slot {
    fn evicted(&self) -> impl Future<Output = ()> + Send {
        slots::Slot::evicted(self)
    }

    fn authenticated(&self) -> bool {
        slots::Slot::authenticated(self)
    }
}
