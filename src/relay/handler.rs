//! One relay connection: route it to its session's console, then the shared connection
//! path of `crate::proxy::conn` (HTTP upgrade, ticket check, websocket <-> TCP/unix bridge).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::listener::{Common, Pending};
use super::session::Live;
use crate::proxy::conn::{self, Console, Router};

/// The gateway's routing: the console the presented ticket names, if any.
pub(crate) type Route = Arc<dyn Fn(Option<&[u8]>) -> Option<Arc<Console>> + Send + Sync>;

/// Where a connection's upgrade goes.
pub(crate) enum Handler {
    /// A session port: its one console (none once the session has expired).
    Session(Arc<Live>),
    /// The gateway: the session whose lease the ticket names.
    Gateway(Route),
}

impl Handler {
    pub fn session(live: Arc<Live>) -> Self {
        Handler::Session(live)
    }

    pub fn gateway(route: Route) -> Self {
        Handler::Gateway(route)
    }
}

impl Router for Handler {
    fn route(&self, token: Option<&[u8]>) -> Option<Arc<Console>> {
        match self {
            Handler::Session(live) => live.console(crate::ticket::unix_now()),
            Handler::Gateway(route) => route(token),
        }
    }
}

/// Serves the connection to its end and logs it.
pub(crate) async fn run(
    h: Handler,
    sock: TcpStream,
    _peer: SocketAddr,
    pending: Pending,
    common: Common,
) {
    let started = Instant::now();
    let summary = conn::connection(
        &h,
        None,
        sock,
        &pending,
        common.stop.clone(),
        common.ping_every,
    )
    .await;
    drop(pending);
    match &h {
        Handler::Session(live) => {
            crate::proxy::log_summary(summary, started, &common.refusals, Some(&live.counters));
            live.connections.fetch_sub(1, Ordering::Relaxed);
        }
        Handler::Gateway(_) => {
            crate::proxy::log_summary(summary, started, &common.refusals, None);
        }
    }
}
