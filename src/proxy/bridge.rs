//! The data pump of one session: websocket binary frames <-> target byte stream.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::stats::Counters;

/// Target read buffer: it starts small (an idle VNC session sends little) and doubles while reads
/// fill it (bulk framebuffer updates: fewer, larger frames are much faster), up to the maximum,
/// which is also the largest frame sent to the client. It shrinks back after many small reads in a row.
const MIN_CHUNK: usize = 16 * 1024;
const MAX_CHUNK: usize = 256 * 1024;
/// How long to wait for the client's answer to our close frame.
const CLOSE_WAIT: Duration = Duration::from_millis(500);

/// Websocket settings for one session: small buffers (the client sends keys and pointer events),
/// bounded messages.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * 1024 * 1024)
        .max_message_size(Some(4 * 1024 * 1024))
        .max_frame_size(Some(4 * 1024 * 1024))
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client sent a close frame or closed its connection.
    Client,
    /// The client connection failed (reset, broken pipe).
    ClientError,
    /// The client broke the websocket protocol (reserved bits, unmasked or unknown frames,
    /// a stray continuation): answered with close code 1002.
    ProtocolError,
    /// The client sent a message or frame larger than the limit: close code 1009.
    TooBig,
    /// The client sent nothing, not even a pong, for two ping intervals: it is gone.
    ClientTimeout,
    /// The target closed its connection.
    Target,
    /// Reading from or writing to the target failed.
    TargetError,
    /// The process is stopping (signal or max lifetime).
    Shutdown,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Client => "client closed",
            End::ClientError => "client error",
            End::ProtocolError => "client broke the websocket protocol",
            End::TooBig => "client message too big",
            End::ClientTimeout => "client stopped answering pings",
            End::Target => "target closed",
            End::TargetError => "target error",
            End::Shutdown => "proxy stopping",
        }
    }
}

/// What went through a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub end: End,
    /// Bytes from the client to the target.
    pub to_target: u64,
    /// Bytes from the target to the client.
    pub to_client: u64,
}

/// Send a close frame and give the client a moment to answer, then drop the connection.
pub async fn close<S>(mut ws: WebSocketStream<S>, code: CloseCode, reason: &'static str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

/// Pump until either side ends or `stop` turns true, then close both sides.
///
/// Every `ping_every` the client gets a ping; a client that sent nothing at all (no data,
/// no pong) for `2 * ping_every` has vanished and its session ends, even while a send
/// to it is stuck on a full socket buffer.
pub async fn run<S, T>(
    ws: WebSocketStream<S>,
    target: T,
    stop: &mut watch::Receiver<bool>,
    counters: &Counters,
    ping_every: Duration,
) -> Stats
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut target_rx, mut target_tx) = tokio::io::split(target);
    let (mut ws_tx, mut ws_rx) = ws.split();
    let mut to_target = 0u64;
    let mut to_client = 0u64;
    // When the client was last heard of (see `Heard`); both pumps run in this one task.
    let heard = Heard::new();
    let end = tokio::select! {
        e = upstream(&mut ws_rx, &mut target_tx, counters, &heard, &mut to_target) => e,
        e = downstream(&mut target_rx, &mut ws_tx, counters, ping_every, &mut to_client) => e,
        e = async {
            // An error means the sender is gone: treat it like a stop.
            let _ = stop.wait_for(|s| *s).await;
            End::Shutdown
        } => e,
        e = heard.silence(ping_every * 2) => e,
    };
    let _ = target_tx.shutdown().await;
    drop(target_tx);
    drop(target_rx);
    let stats = Stats {
        end,
        to_target,
        to_client,
    };
    // Both halves come from the same split, so this cannot fail.
    if let Ok(ws) = ws_tx.reunite(ws_rx) {
        finish(ws, end).await;
    }
    stats
}

/// When the client was last heard of, in milliseconds since `base` (the future must be
/// Send, so an atomic rather than a Cell).
struct Heard {
    base: Instant,
    last: AtomicU64,
}

impl Heard {
    fn new() -> Self {
        Heard {
            base: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn now(&self) {
        let since = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(since, Ordering::Relaxed);
    }

    /// Resolves once the client has been silent for `limit` (no frame, not even a pong).
    async fn silence(&self, limit: Duration) -> End {
        loop {
            let heard = self.base + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = heard + limit;
            if Instant::now() >= deadline {
                return End::ClientTimeout;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Client to target: websocket messages become bytes for the VNC server.
async fn upstream<S, W>(
    ws_rx: &mut futures::stream::SplitStream<WebSocketStream<S>>,
    target_tx: &mut W,
    counters: &Counters,
    heard: &Heard,
    to_target: &mut u64,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
{
    while let Some(msg) = ws_rx.next().await {
        heard.now();
        let data = match msg {
            Ok(Message::Binary(b)) => b,
            // noVNC sends binary; forward text payloads as bytes too, like websockify.
            Ok(Message::Text(t)) => t.into(),
            Ok(Message::Close(_)) => return End::Client,
            // Pings are answered by tungstenite itself; nothing else carries data.
            Ok(_) => continue,
            // A client that just drops the connection is not a protocol error.
            Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                return End::ClientError;
            }
            Err(WsError::Protocol(_) | WsError::Utf8(_)) => return End::ProtocolError,
            Err(WsError::Capacity(_)) => return End::TooBig,
            Err(_) => return End::ClientError,
        };
        if target_tx.write_all(&data).await.is_err() {
            return End::TargetError;
        }
        *to_target += data.len() as u64;
        counters.to_target(data.len());
    }
    End::Client
}

/// Target to client: VNC bytes become binary messages, in chunks that grow while the
/// target keeps filling them; a ping every `ping_every` keeps the client honest.
async fn downstream<S, R>(
    target_rx: &mut R,
    ws_tx: &mut futures::stream::SplitSink<WebSocketStream<S>, Message>,
    counters: &Counters,
    ping_every: Duration,
    to_client: &mut u64,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let mut buf = vec![0u8; MIN_CHUNK];
    let mut small_reads = 0u32;
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // `read` is cancel-safe: a ping never loses target bytes.
        let read = tokio::select! {
            r = target_rx.read(&mut buf) => r,
            _ = ping.tick() => {
                if ws_tx.send(Message::Ping(Default::default())).await.is_err() {
                    return End::ClientError;
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) => return End::Target,
            Ok(n) => n,
            Err(_) => return End::TargetError,
        };
        if ws_tx
            .send(Message::Binary(buf[..n].to_vec().into()))
            .await
            .is_err()
        {
            return End::ClientError;
        }
        *to_client += n as u64;
        counters.to_client(n);
        if n == buf.len() && buf.len() < MAX_CHUNK {
            buf.resize(buf.len() * 2, 0);
            small_reads = 0;
        } else if n < MIN_CHUNK && buf.len() > MIN_CHUNK {
            // Back to small after a quiet spell, not after one short read.
            small_reads += 1;
            if small_reads == 64 {
                buf = vec![0u8; MIN_CHUNK];
                small_reads = 0;
            }
        }
    }
}

/// Ends the websocket the way `end` calls for: answer a client's close, or send one.
async fn finish<S>(ws: WebSocketStream<S>, end: End)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match end {
        End::Client => {
            // Answer the client's close frame (tungstenite queued the reply) and flush it.
            let mut ws = ws;
            let _ = tokio::time::timeout(CLOSE_WAIT, ws.close(None)).await;
        }
        End::ClientError => {}
        End::ProtocolError => close(ws, CloseCode::Protocol, "websocket protocol error").await,
        End::TooBig => close(ws, CloseCode::Size, "message too big").await,
        End::ClientTimeout => close(ws, CloseCode::Away, "no answer to pings").await,
        End::Target => close(ws, CloseCode::Normal, "target closed the connection").await,
        End::TargetError => close(ws, CloseCode::Error, "target connection failed").await,
        End::Shutdown => close(ws, CloseCode::Away, "proxy stopping").await,
    }
}
