//! The HTTP endpoints of `vncd run --http` and `vncd kube --http`, one axum [`Router`]
//! over a shared [`AppState`]:
//!
//! - `/healthz`: 200 while the process serves HTTP and its controller loop keeps
//!   completing passes (liveness; see [`Health::pass_completed`]). A loop that is stuck
//!   (a hung store call, a deadlock) fails the probe, so the kubelet restarts it.
//! - `/readyz`: 200 only after the first full pass (desired sessions listed, leases
//!   loaded, statuses published) and, in Kubernetes mode, while this instance holds the
//!   node lease; a passive standby answers 503, so a Service or a rollout never counts it
//!   as serving.
//! - `/metrics`: Prometheus text format (see [`crate::metrics`]).
//! - `/v1/status`: the seed's system status, as `vncd status --json` prints it.
//! - `/v1/sessions`: the seed's `{name: {url, ws_port, vnc_port, pid}}`; URLs without tickets.
//! - `POST /v1/sessions/NAME/url`: a fresh console URL with a ticket, for callers with the
//!   bearer token of `--http-token-file` (see [`console`]); absent without that flag.
//!
//! Apart from that route only GET and HEAD are served (405 otherwise); unknown paths get
//! 404 with the list of endpoints. Nothing here logs a request, so nothing here can log a
//! token or a ticket.
//!
//! The server is hyper's, driven here rather than by `axum::serve`, which sets no limits:
//! a request head must arrive within [`HEADER_TIMEOUT`] (also the most an idle keep-alive
//! connection is kept), and at most [`MAX_CONNECTIONS`] connections are open. When all are
//! taken, a new connection closes the oldest one that has not sent a request yet, so a
//! slowloris client cannot keep the kubelet's probes out; only when every connection is
//! busy with requests is a new one answered 503.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};

pub mod console;

use crate::health::{PassClock, Synced};
use crate::metrics::Metrics;
use crate::status::UrlStyle;

/// What the probes look at. Cheap to clone; clones share the flags.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// The first full pass is done.
    pub synced: Synced,
    /// This instance holds the node lease.
    pub leader: Arc<AtomicBool>,
    /// When the controller last completed a pass, and how long it may go without one.
    /// A clone can be handed to the controller, like `synced`.
    pub passes: PassClock,
}

impl Health {
    /// The controller finished a pass. Call it after every pass (or give the controller
    /// a clone of [`Health::passes`]); /healthz fails once none completed for the limit
    /// [`Health::expect_passes_every`] sets. Before the first call /healthz does not
    /// look at passes (start-up is what /readyz is for).
    pub fn pass_completed(&self) {
        self.passes.completed();
    }

    /// The controller passes at least every `resync`: /healthz fails after
    /// `5 * resync` (at least 30 s) without a completed pass.
    pub fn expect_passes_every(&self, resync: Duration) {
        self.passes.expect_every(resync);
    }

    /// Alive, or why not.
    pub fn liveness(&self) -> Result<(), String> {
        self.passes.check()
    }

    pub fn set_leader(&self, held: bool) {
        self.leader.store(held, Ordering::Relaxed);
    }

    /// Standalone mode: no node lease to wait for, ready after the first full pass.
    pub fn standalone() -> Self {
        let h = Health::default();
        h.set_leader(true);
        h
    }

    /// Ready, or why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if !self.leader.load(Ordering::Relaxed) {
            return Err("not ready: waiting for the node lease (another vncd serves this node)\n");
        }
        if !self.synced.get() {
            return Err("not ready: first sync not done\n");
        }
        Ok(())
    }
}

/// The router's shared state.
#[derive(Clone, Debug, Default)]
pub struct AppState {
    pub health: Health,
    /// Serves `/metrics` and `/v1/*` (404 without).
    pub metrics: Option<Metrics>,
    /// How `/v1/sessions` writes URLs.
    pub urls: Option<UrlStyle>,
    /// Serve the unauthenticated `/v1/*` views (404 when false). Standalone serves them;
    /// Kubernetes mode only with `--http-api`, since the API server already holds that
    /// state behind RBAC and the chart binds `--http` on the host's addresses.
    pub v1: bool,
    /// Mint console URLs at `POST /v1/sessions/NAME/url` (404 without).
    pub console: Option<console::ConsoleApi>,
    /// `/metrics` is served on this other address instead (`vncd kube --metrics`): 404
    /// here, saying where. The chart binds it to loopback, since the metrics name every
    /// session and its traffic while `--http` listens on the node's addresses for the
    /// kubelet's probes.
    pub metrics_elsewhere: Option<SocketAddr>,
}

async fn healthz(State(state): State<AppState>) -> Response {
    match state.health.liveness() {
        Ok(()) => plain(StatusCode::OK, "ok\n".into()),
        Err(why) => plain(StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    match state.health.readiness() {
        Ok(()) => (StatusCode::OK, "ok\n"),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

const ENDPOINTS: &str =
    "/healthz /readyz /metrics /v1/status /v1/sessions POST:/v1/sessions/NAME/url";

fn plain(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

fn json(value: &serde_json::Value) -> Response {
    let mut body = serde_json::to_string_pretty(value).unwrap_or_default();
    body.push('\n');
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

const NOT_ENABLED: &str = "not found: this endpoint is not served by this vncd\n";

fn not_enabled() -> Response {
    plain(StatusCode::NOT_FOUND, NOT_ENABLED.into())
}

async fn metrics(State(state): State<AppState>) -> Response {
    if let Some(addr) = state.metrics_elsewhere {
        return plain(
            StatusCode::NOT_FOUND,
            format!("not found: /metrics is served on {addr} (--metrics)\n"),
        );
    }
    let Some(m) = state.metrics else {
        return not_enabled();
    };
    // Rendering reads the proxies' stats files.
    match tokio::task::spawn_blocking(move || m.render()).await {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(_) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot render metrics\n".into(),
        ),
    }
}

/// The controller's last view; 404 without metrics, 503 before the first pass.
fn view(state: &AppState) -> Result<crate::metrics::View, (StatusCode, &'static str)> {
    let (true, Some(m)) = (state.v1, &state.metrics) else {
        return Err((StatusCode::NOT_FOUND, NOT_ENABLED));
    };
    let v = m.view();
    if !v.synced {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: first pass not done\n",
        ));
    }
    Ok(v)
}

async fn v1_status(State(state): State<AppState>) -> Response {
    match view(&state) {
        Ok(v) => json(&v.status.to_json()),
        Err((status, why)) => plain(status, why.into()),
    }
}

async fn v1_sessions(State(state): State<AppState>) -> Response {
    let Some(urls) = &state.urls else {
        return not_enabled();
    };
    match view(&state) {
        Ok(v) => json(&crate::status::seed_sessions(&v.sessions, urls)),
        Err((status, why)) => plain(status, why.into()),
    }
}

async fn not_found() -> Response {
    plain(
        StatusCode::NOT_FOUND,
        format!("not found; endpoints: {ENDPOINTS}\n"),
    )
}

/// 405 naming the methods `allow`ed.
fn not_allowed(allow: &'static str, why: &'static str) -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [
            (header::ALLOW, allow),
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        ],
        why,
    )
        .into_response()
}

async fn method_not_allowed() -> Response {
    not_allowed("GET, HEAD", "method not allowed: only GET and HEAD\n")
}

async fn post_only() -> Response {
    not_allowed("POST", "method not allowed: only POST mints a URL\n")
}

/// GET (and HEAD) only, with a clear 405 for anything else.
fn read_only<H, T>(handler: H) -> MethodRouter<AppState>
where
    H: axum::handler::Handler<T, AppState>,
    T: 'static,
{
    get(handler).fallback(method_not_allowed)
}

/// The router with every endpoint.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", read_only(healthz))
        .route("/readyz", read_only(readyz))
        .route("/metrics", read_only(metrics))
        .route("/v1/status", read_only(v1_status))
        .route("/v1/sessions", read_only(v1_sessions))
        .route(
            "/v1/sessions/{name}/url",
            axum::routing::post(console::mint_url).fallback(post_only),
        )
        .fallback(not_found)
        .with_state(state)
}

/// A router that serves only `/metrics` from `metrics`: the `--metrics` listener.
pub fn metrics_router(metrics: Metrics) -> Router {
    Router::new()
        .route("/metrics", read_only(self::metrics))
        .fallback(not_found)
        .with_state(AppState {
            metrics: Some(metrics),
            ..AppState::default()
        })
}

/// Why the HTTP server could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {flag} {addr}: {source}")]
pub struct BindError {
    /// The flag that named the address (`--http`, `--metrics`).
    pub flag: &'static str,
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Time a client has to send a whole request head; also the longest an idle keep-alive
/// connection is kept. A slowloris client dripping a byte at a time is dropped after it.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections open at once; see the module docs for what happens past it.
pub const MAX_CONNECTIONS: usize = 64;
/// The answer to a connection past [`MAX_CONNECTIONS`] when none can be closed for it.
const TOO_MANY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
content-length: 21\r\nconnection: close\r\nretry-after: 1\r\n\r\ntoo many connections\n";

/// Binds `addr` (so a bad address fails at start) and serves `router` in the background,
/// with the limits in the module docs.
pub async fn serve(
    flag: &'static str,
    addr: SocketAddr,
    router: Router,
) -> Result<SocketAddr, BindError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { flag, addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| BindError { flag, addr, source })?;
    tokio::spawn(accept_loop(listener, router));
    Ok(local)
}

async fn accept_loop(listener: tokio::net::TcpListener, router: Router) {
    let slots = crate::proxy::slots::Slots::new(MAX_CONNECTIONS);
    let mut n = 0u64;
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        n += 1;
        match slots.admit(n) {
            Ok(slot) => {
                tokio::spawn(connection(sock, router.clone(), slot));
            }
            Err(_) => {
                tokio::spawn(refuse(sock));
            }
        }
    }
}

/// Serves one connection until it ends, its head times out, or a newer connection
/// evicts it (only before its first request).
async fn connection(sock: tokio::net::TcpStream, router: Router, slot: crate::proxy::slots::Slot) {
    let slot = Arc::new(slot);
    let service = Marking {
        inner: hyper_util::service::TowerToHyperService::new(router),
        slot: slot.clone(),
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
    tokio::select! {
        _ = conn => {}
        () = slot.evicted() => {}
    }
}

/// Answers 503 and closes, giving the client a second to read it.
async fn refuse(mut sock: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        sock.write_all(TOO_MANY).await?;
        sock.shutdown().await?;
        let mut sink = [0u8; 1024];
        while sock.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}

/// The router as a hyper service that marks its connection busy (no longer evictable)
/// once a whole request head has arrived.
#[derive(Debug)]
struct Marking<S> {
    inner: S,
    slot: Arc<crate::proxy::slots::Slot>,
}

impl<S, R> hyper::service::Service<R> for Marking<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: R) -> Self::Future {
        self.slot.authenticated();
        self.inner.call(req)
    }
}

/// Serves [`metrics_router`] on `addr` (`--metrics`) and logs where.
pub async fn serve_metrics(addr: SocketAddr, metrics: Metrics) -> Result<SocketAddr, BindError> {
    let bound = serve("--metrics", addr, metrics_router(metrics)).await?;
    tracing::info!(addr = %bound, "serving /metrics");
    Ok(bound)
}

/// Serves [`router`]`(state)` on `addr` and logs where: what `vncd run` and `vncd kube`
/// do with `--http`.
pub async fn serve_api(addr: SocketAddr, state: AppState) -> Result<SocketAddr, BindError> {
    let bound = serve("--http", addr, router(state)).await?;
    tracing::info!(addr = %bound, "serving /healthz /readyz /metrics /v1/status /v1/sessions");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn request(addr: SocketAddr, method: &str, path: &str) -> (String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (
            head.lines().next().unwrap_or_default().to_owned(),
            body.to_owned(),
        )
    }

    async fn get_status(addr: SocketAddr, path: &str) -> String {
        request(addr, "GET", path).await.0
    }

    #[tokio::test]
    async fn readiness_needs_both_the_lease_and_a_first_sync() {
        let state = AppState::default();
        let addr = serve_api("127.0.0.1:0".parse().unwrap(), state.clone())
            .await
            .unwrap();
        assert!(get_status(addr, "/healthz").await.contains("200"));
        assert!(get_status(addr, "/readyz").await.contains("503"));
        state.health.synced.set();
        assert!(
            get_status(addr, "/readyz").await.contains("503"),
            "synced but no lease"
        );
        state.health.set_leader(true);
        assert!(get_status(addr, "/readyz").await.contains("200"));
        state.health.set_leader(false);
        assert!(
            get_status(addr, "/readyz").await.contains("503"),
            "lease lost"
        );
        assert!(get_status(addr, "/nope").await.contains("404"));
    }

    /// `vncd kube --metrics`: the probes stay on `--http`, the metrics move to their own
    /// (loopback) listener and are not served on `--http` at all.
    #[tokio::test]
    async fn metrics_elsewhere_leaves_the_probes_and_serves_metrics_only_there() {
        let metrics = Metrics::new();
        let m = serve_metrics("127.0.0.1:0".parse().unwrap(), metrics.clone())
            .await
            .unwrap();
        let state = AppState {
            health: Health::standalone(),
            metrics: Some(metrics),
            metrics_elsewhere: Some(m),
            ..AppState::default()
        };
        let h = serve_api("127.0.0.1:0".parse().unwrap(), state)
            .await
            .unwrap();
        assert!(get_status(h, "/healthz").await.contains("200"));
        let (st, body) = request(h, "GET", "/metrics").await;
        assert!(
            st.contains("404") && body.contains(&m.to_string()),
            "{st} {body}"
        );
        let (st, body) = request(m, "GET", "/metrics").await;
        assert!(
            st.contains("200") && body.contains("vncd_pool_ports"),
            "{st} {body}"
        );
        assert!(
            get_status(m, "/healthz").await.contains("404"),
            "only /metrics there"
        );
        let e = serve_metrics(m, Metrics::new())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("--metrics") && e.contains(&m.to_string()), "{e}");
    }

    #[tokio::test]
    async fn standalone_serves_metrics_status_and_sessions_after_the_first_pass() {
        use crate::lease::{Lease, ProcRef};
        use crate::metrics::View;
        use crate::pool::PortRange;
        use crate::session::Endpoint;
        use crate::status::{ActiveSession, SystemStatus};
        use std::collections::BTreeMap;

        let metrics = Metrics::new();
        let state = AppState {
            health: Health::standalone(),
            metrics: Some(metrics.clone()),
            urls: Some(UrlStyle {
                public_host: "127.0.0.1".into(),
                web: false,
                tls: false,
            }),
            v1: true,
            console: None,
            metrics_elsewhere: None,
        };
        let addr = serve_api("127.0.0.1:0".parse().unwrap(), state.clone())
            .await
            .unwrap();
        assert!(get_status(addr, "/readyz").await.contains("503"));
        assert!(get_status(addr, "/v1/status").await.contains("503"));
        assert!(get_status(addr, "/v1/sessions").await.contains("503"));
        let (st, body) = request(addr, "GET", "/metrics").await;
        assert!(st.contains("200"), "{st}");
        assert!(body.contains("# TYPE vncd_pool_ports gauge"), "{body}");

        let mut lease = Lease::new(
            "vm1",
            6100,
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 5901,
            },
            jiff::Timestamp::now(),
        );
        lease.process = Some(ProcRef {
            pid: 77,
            start_time: 1,
        });
        let leases = BTreeMap::from([("vm1".to_owned(), lease.clone())]);
        metrics.set_view(View {
            synced: true,
            status: SystemStatus::new(PortRange::new(6100, 6199).unwrap(), &leases, 1, 0, true),
            sessions: BTreeMap::from([("vm1".to_owned(), ActiveSession::of(&lease))]),
        });
        state.health.synced.set();
        assert!(get_status(addr, "/readyz").await.contains("200"));
        let (st, body) = request(addr, "GET", "/v1/status").await;
        assert!(st.contains("200"), "{st}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["port_pool"]["total_ports"], 100);
        assert_eq!(v["port_pool"]["allocated_ports"], 1);
        assert_eq!(v["active_processes"], 1);
        assert_eq!(v["system_health"], "healthy");
        let (st, body) = request(addr, "GET", "/v1/sessions").await;
        assert!(st.contains("200"), "{st}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"vm1": {"url": "ws://127.0.0.1:6100/", "ws_port": 6100, "vnc_port": 5901, "pid": 77}})
        );
        assert!(!body.contains("token"), "{body}");
        // Without --http-token-file there is no minting route.
        let (st, _) = request(addr, "POST", "/v1/sessions/vm1/url").await;
        assert!(st.contains("404"), "{st}");

        // Bad requests: clear 4xx.
        let (st, body) = request(addr, "POST", "/metrics").await;
        assert!(st.contains("405"), "{st}");
        assert!(body.contains("only GET"), "{body}");
        let (st, body) = request(addr, "GET", "/v1/nope").await;
        assert!(st.contains("404"), "{st}");
        assert!(body.contains("/v1/sessions"), "{body}");
        assert!(get_status(addr, "/metrics?x=1").await.contains("200"));
        let (st, _) = request(addr, "HEAD", "/healthz").await;
        assert!(st.contains("200"), "{st}");
    }

    #[tokio::test]
    async fn healthz_fails_when_the_controller_stops_completing_passes() {
        let state = AppState::default();
        let addr = serve_api("127.0.0.1:0".parse().unwrap(), state.clone())
            .await
            .unwrap();
        // No pass yet: liveness does not look at passes.
        assert!(get_status(addr, "/healthz").await.contains("200"));
        state.health.pass_completed();
        assert!(get_status(addr, "/healthz").await.contains("200"));
        // A loop that stopped: passes go stale. (The limit is at least 30 s in real use;
        // set it directly here.)
        state.health.passes.set_limit(Duration::from_millis(100));
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (st, body) = request(addr, "GET", "/healthz").await;
        assert!(st.contains("503"), "{st}");
        assert!(body.contains("no controller pass completed"), "{body}");
        state.health.pass_completed();
        assert!(get_status(addr, "/healthz").await.contains("200"));
        // The limit follows the resync interval, never below 30 s.
        state.health.expect_passes_every(Duration::from_secs(2));
        assert_eq!(state.health.passes.limit(), Duration::from_secs(30));
        state.health.expect_passes_every(Duration::from_secs(20));
        assert_eq!(state.health.passes.limit(), Duration::from_secs(100));
    }

    #[tokio::test]
    async fn without_metrics_the_api_endpoints_are_404() {
        let addr = serve_api("127.0.0.1:0".parse().unwrap(), AppState::default())
            .await
            .unwrap();
        for path in ["/metrics", "/v1/status", "/v1/sessions"] {
            assert!(get_status(addr, path).await.contains("404"), "{path}");
        }
    }
}
