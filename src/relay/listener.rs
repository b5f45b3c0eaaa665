//! Listeners: accept on a session port (or the gateway), admit fairly, hand each
//! connection to its handler task.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, warn};

use super::admission::{self, Admission, Decision};
use super::handler::{self, Handler, Kind};
use super::serving::ServingCell;
use super::session::{Live, lock};
use crate::proxy::conn::Gate;
use crate::proxy::refusals::Refusals;

/// The relay's admission before authentication, shared by every listener.
#[derive(Debug)]
pub(crate) struct Gatekeeper {
    admission: Mutex<Admission>,
    evictions: Mutex<HashMap<admission::Id, Arc<Notify>>>,
}

impl Gatekeeper {
    pub fn new(config: admission::Config) -> Arc<Gatekeeper> {
        Arc::new(Gatekeeper {
            admission: Mutex::new(Admission::new(config)),
            evictions: Mutex::new(HashMap::new()),
        })
    }

    /// Admits a connection from `ip`, evicting another if the relay is full.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Pending, admission::Refused> {
        let decision = lock(&self.admission).admit(ip.into(), Instant::now());
        match decision {
            Decision::Refuse(why) => Err(why),
            Decision::Admit { id, evict } => {
                let notify = Arc::new(Notify::new());
                let mut ev = lock(&self.evictions);
                if let Some(victim) = evict.and_then(|v| ev.remove(&v)) {
                    victim.notify_one();
                }
                ev.insert(id, notify.clone());
                Ok(Pending {
                    keeper: self.clone(),
                    id,
                    notify,
                })
            }
        }
    }

    fn leave(&self, id: admission::Id) -> bool {
        lock(&self.evictions).remove(&id);
        lock(&self.admission).leave(id)
    }

    /// Pending connections now.
    pub fn pending(&self) -> usize {
        lock(&self.admission).pending()
    }
}

/// One connection's place in the admission; left on drop.
#[derive(Debug)]
pub(crate) struct Pending {
    keeper: Arc<Gatekeeper>,
    id: admission::Id,
    notify: Arc<Notify>,
}

impl Gate for Pending {
    fn evicted(&self) -> impl Future<Output = ()> + Send {
        self.notify.notified()
    }

    fn authenticated(&self) -> bool {
        self.keeper.leave(self.id)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.keeper.leave(self.id);
    }
}

/// What every connection of the relay shares.
#[derive(Debug, Clone)]
pub(crate) struct Common {
    pub keeper: Arc<Gatekeeper>,
    pub refusals: Arc<Refusals>,
    pub ping_every: Duration,
    /// TLS, origins and static files, as declared.
    pub serving: Arc<ServingCell>,
    /// The relay's stop: ends pending connections (bridges end with their console).
    pub stop: watch::Receiver<bool>,
}

/// Binds a listener (SO_REUSEADDR, as tokio does, so a port in TIME_WAIT is reusable).
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves a session port until the task is aborted (the session closes).
pub(crate) fn spawn_session(
    listener: TcpListener,
    live: Arc<Live>,
    common: Common,
) -> JoinHandle<()> {
    let span = tracing::info_span!("session", name = %live.name);
    tokio::spawn(
        accept_loop(listener, common, move |sock, peer, pending, common| {
            let live = live.clone();
            live.connections.fetch_add(1, Ordering::Relaxed);
            let h = Handler::session(live);
            (h, sock, peer, pending, common)
        })
        .instrument(span),
    )
}

/// Serves the gateway port until the task is aborted.
pub(crate) fn spawn_gateway(
    listener: TcpListener,
    route: handler::Route,
    common: Common,
) -> JoinHandle<()> {
    let span = tracing::info_span!("gateway");
    tokio::spawn(
        accept_loop(listener, common, move |sock, peer, pending, common| {
            (Handler::gateway(route.clone()), sock, peer, pending, common)
        })
        .instrument(span),
    )
}

type Prepared = (Kind, TcpStream, SocketAddr, Pending, Common);

async fn accept_loop<F>(listener: TcpListener, common: Common, prepare: F)
where
    F: Fn(TcpStream, SocketAddr, Pending, Common) -> Prepared,
{
    let mut n = 0u64;
    loop {
        match listener.accept().await {
            Ok((sock, peer)) => {
                n += 1;
                let pending = match common.keeper.admit(peer.ip()) {
                    Ok(p) => p,
                    Err(why) => {
                        // Closed at once: no answer, a flood gets nothing to read.
                        common.refusals.record(why.as_str());
                        debug!(peer = %peer, why = why.as_str(), "connection refused");
                        continue;
                    }
                };
                let span = tracing::info_span!("conn", n, peer = %peer);
                let (h, sock, peer, pending, common) = prepare(sock, peer, pending, common.clone());
                tokio::spawn(handler::run(h, sock, peer, pending, common).instrument(span));
            }
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
