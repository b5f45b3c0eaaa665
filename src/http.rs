//! The HTTP endpoints of `vncd kube`: `/healthz` and `/readyz`.
//!
//! [`router`] builds a plain axum [`Router`] over a shared [`AppState`], so more routes
//! (metrics, an API) can be merged into the same router later without touching the probes.
//!
//! - `/healthz`: 200 while the process serves HTTP at all (liveness).
//! - `/readyz`: 200 only after the first full pass (desired sessions listed, leases
//!   loaded, statuses published) and while this instance holds the node lease; a passive
//!   standby answers 503, so a Service or a rollout never counts it as serving.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::status::kube::Synced;

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

/// The router with the probe endpoints.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get_status(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.lines().next().unwrap_or_default().to_owned()
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
}
