//! The relay: one long-lived process per host that serves every builtin console session
//! (issue 17), in place of one `vncd proxy` process per session.
//!
//! The controller declares the whole desired set of sessions over a unix socket
//! ([`control`]); the relay converges its [`table`] to it, listens on each leased port,
//! admits connections fairly before authentication ([`admission`]), checks each upgrade's
//! ticket against the session's lease key and bridges it to the target with the same code
//! as `vncd proxy` (`crate::proxy::conn`), probes each target ([`probe`]) and reports what
//! it observes. It never waits for the controller: it keeps serving the last declared set.
//!
//! Files, one job each:
//! - `args.rs`: the command line (shared by `vncd relay` and `vncd-proxy relay`);
//! - `table.rs`: declared sessions and the pure converge;
//! - `control.rs`: the JSON-lines protocol, the peer check, a client;
//! - `state.rs`: the running relay ([`Relay`]): performing a converge, reports, deadlines;
//! - `session.rs`: one live session (console generations, listener, counters);
//! - `listener.rs` / `handler.rs`: accept + admission, and one connection;
//! - `serving.rs`: TLS, allowed origins and static files, declared and reloaded;
//! - `admission.rs`, `probe.rs`: fair admission, target probe (pure parts unit-tested);
//! - `start.rs`: process setup and the start-up checks.
//!
//! `vncd run --relay` uses it as its data plane (`crate::supervisor::relay`); without the
//! flag, `vncd run` still runs one `vncd-proxy` per session.

mod admission;
pub mod args;
pub mod control;
mod handler;
mod listener;
mod probe;
pub mod serving;
mod session;
mod start;
mod state;
pub mod table;

use std::future::Future;
use std::time::Duration;

use tokio::net::UnixListener;
use tracing::{info, warn};

pub use admission::{Config as AdmissionConfig, PROTECT};
pub use args::RelayArgs;
pub use control::{Applied, Client, ControlError, Declaration, Peers, Report, SessionReport};
pub use probe::PROBE_EVERY;
pub use serving::{ServingSpec, TlsFiles};
pub use start::{RelayError, run};
pub use state::{Relay, RelayConfig};
pub use table::{Limits, SessionSpec, TargetSpec, WireKey};

/// On stop, time given to connections to close cleanly.
const STOP_GRACE: Duration = Duration::from_millis(800);

/// The sockets a relay serves besides the session ports it opens by declaration.
#[derive(Debug)]
pub struct Listeners {
    /// The control socket. (The gateway is declared over it, like the sessions.)
    pub control: UnixListener,
}

/// Serves `relay` until `shutdown` resolves: the control socket, the gateway, the
/// declared sessions and their upkeep. Then every listener closes and every connection
/// ends (given [`STOP_GRACE`] to close cleanly).
pub async fn serve(
    relay: Relay,
    listeners: Listeners,
    peers: Peers,
    shutdown: impl Future<Output = ()>,
) {
    let maintain = tokio::spawn({
        let r = relay.clone();
        async move { r.maintain().await }
    });
    let reporter = tokio::spawn(crate::proxy::refusals::reporter(
        relay.refusals(),
        Duration::from_secs(10),
        relay.stop_signal(),
    ));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listeners.control.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(control::serve_peer(relay.clone(), stream, peers));
                }
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    info!(connections = relay.open_connections(), "relay stopping");
    relay.shutdown().await;
    let _ = tokio::time::timeout(STOP_GRACE, async {
        while relay.open_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _ = maintain.await;
    let _ = reporter.await;
}
