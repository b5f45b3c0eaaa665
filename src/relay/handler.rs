//! One relay connection: route it to its session's console, then the shared connection
//! path of `crate::proxy::conn` (HTTP upgrade, ticket check, websocket <-> TCP/unix bridge).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::listener::{Common, Pending};
use super::serving::{Serving, Tls};
use super::session::Live;
use crate::proxy::conn::{self, Console, Router};

/// The gateway's routing: the console the presented ticket names, if any.
pub(crate) type Route = Arc<dyn Fn(Option<&[u8]>) -> Option<Arc<Console>> + Send + Sync>;

/// Where a connection's upgrade goes.
pub(crate) enum Kind {
    /// A session port: its one console (none once the session has expired).
    Session(Arc<Live>),
    /// The gateway: the session whose lease the ticket names.
    Gateway(Route),
}

/// One connection's routing, with the serving settings in effect when it was accepted.
pub(crate) struct Handler {
    kind: Kind,
    serving: Arc<Serving>,
}

impl Handler {
    pub fn session(live: Arc<Live>) -> Kind {
        Kind::Session(live)
    }

    pub fn gateway(route: Route) -> Kind {
        Kind::Gateway(route)
    }
}

impl Router for Handler {
    fn route(&self, token: Option<&[u8]>) -> Option<Arc<Console>> {
        match &self.kind {
            Kind::Session(live) => live.console(crate::ticket::unix_now()),
            Kind::Gateway(route) => route(token),
        }
    }

    fn web(&self) -> Option<&Path> {
        self.serving.web.as_deref()
    }

    fn origins(&self) -> &[String] {
        &self.serving.origins
    }
}

/// Serves the connection to its end and logs it.
pub(crate) async fn run(
    kind: Kind,
    sock: TcpStream,
    _peer: SocketAddr,
    pending: Pending,
    common: Common,
) {
    let started = Instant::now();
    let h = Handler {
        kind,
        serving: common.serving.current(),
    };
    let tls = match &h.serving.tls {
        Tls::Plain => None,
        Tls::On(acceptor) => Some(acceptor.clone()),
        // TLS is declared but never loaded: never serve this connection as plain ws.
        Tls::Unusable => {
            common.refusals.record("TLS certificate not loaded");
            if let Kind::Session(live) = &h.kind {
                live.connections.fetch_sub(1, Ordering::Relaxed);
            }
            return;
        }
    };
    let summary = conn::connection(
        &h,
        tls.as_ref(),
        sock,
        &pending,
        common.stop.clone(),
        common.ping_every,
    )
    .await;
    drop(pending);
    match &h.kind {
        Kind::Session(live) => {
            crate::proxy::log_summary(summary, started, &common.refusals, Some(&live.counters));
            live.connections.fetch_sub(1, Ordering::Relaxed);
        }
        Kind::Gateway(_) => {
            crate::proxy::log_summary(summary, started, &common.refusals, None);
        }
    }
}
