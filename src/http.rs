//! The HTTP endpoints of `vncd run --http` and `vncd kube --http`, one axum [`Router`]
//! over a shared [`AppState`]:
//!
//! - `/healthz`: 200 while the process serves HTTP at all (liveness).
//! - `/readyz`: 200 only after the first full pass (desired sessions listed, leases
//!   loaded, statuses published) and, in Kubernetes mode, while this instance holds the
//!   node lease; a passive standby answers 503, so a Service or a rollout never counts it
//!   as serving.
//! - `/metrics`: Prometheus text format (see [`crate::metrics`]).
//! - `/v1/status`: the seed's system status, as `vncd status --json` prints it.
//! - `/v1/sessions`: the seed's `{name: {url, ws_port, vnc_port, pid}}`; URLs without tokens.
//!
//! Only GET and HEAD are served (405 otherwise); unknown paths get 404 with the list of
//! endpoints. Nothing here logs a request, so nothing here can log a token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};

use crate::health::Synced;
use crate::metrics::Metrics;
use crate::status::UrlStyle;

/// What the probes look at. Cheap to clone; clones share the flags.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// The first full pass is done.
    pub synced: Synced,
    /// This instance holds the node lease.
    pub leader: Arc<AtomicBool>,
}

impl Health {
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
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    match state.health.readiness() {
        Ok(()) => (StatusCode::OK, "ok\n"),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

const ENDPOINTS: &str = "/healthz /readyz /metrics /v1/status /v1/sessions";

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
    let Some(m) = &state.metrics else {
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

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [
            (header::ALLOW, "GET, HEAD"),
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        ],
        "method not allowed: only GET and HEAD\n",
    )
        .into_response()
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
        .fallback(not_found)
        .with_state(state)
}

/// Why the HTTP server could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on --http {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr` (so a bad address fails at start) and serves `router` in the background.
pub async fn serve(addr: SocketAddr, router: Router) -> Result<SocketAddr, BindError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| BindError { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok(local)
}

/// Serves [`router`]`(state)` on `addr` and logs where: what `vncd run` and `vncd kube`
/// do with `--http`.
pub async fn serve_api(addr: SocketAddr, state: AppState) -> Result<SocketAddr, BindError> {
    let bound = serve(addr, router(state)).await?;
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
        let addr = serve("127.0.0.1:0".parse().unwrap(), router(state.clone()))
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
        };
        let addr = serve("127.0.0.1:0".parse().unwrap(), router(state.clone()))
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
        let token = lease.token.clone().unwrap();
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
        assert!(!body.contains(&token));

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
    async fn without_metrics_the_api_endpoints_are_404() {
        let addr = serve("127.0.0.1:0".parse().unwrap(), router(AppState::default()))
            .await
            .unwrap();
        for path in ["/metrics", "/v1/status", "/v1/sessions"] {
            assert!(get_status(addr, path).await.contains("404"), "{path}");
        }
    }
}
