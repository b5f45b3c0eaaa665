//! The one place that talks to libvirt: a thread that polls the running domains.
//!
//! Why a poll and not lifecycle events: the `virt` crate has no safe wrapper for
//! domain event callbacks, and vncd forbids unsafe code. Listing the active domains is
//! one small RPC (domain names and ids come with the list, no further round trips), so
//! polling it four times a second reacts within a second and costs well under a
//! millisecond of libvirtd's time per poll. The live XML is fetched only for a domain
//! run vncd has not seen yet (a new name or id), and again for every domain every
//! [`REFRESH`], which repairs anything a poll could miss (a graphics device changed
//! on a running domain).
//!
//! Why a thread of its own: libvirt calls block. Here they block only this thread; the
//! controller reads the last result and a heartbeat, so a hung libvirtd shows up as a
//! stale heartbeat (an error: change nothing) and never as an empty domain list.
//! libvirt's default event loop runs on a second thread so keepalive works: a libvirtd
//! that stops answering closes the connection after a few seconds, the blocked call
//! returns an error, and the poller reconnects.

use std::collections::BTreeMap;
use std::sync::Arc;
#[cfg(feature = "libvirt")]
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;
#[cfg(feature = "libvirt")]
use tracing::{debug, info, warn};
#[cfg(feature = "libvirt")]
use virt::connect::Connect;
#[cfg(feature = "libvirt")]
use virt::error::ErrorNumber;

use super::graphics::DomainGraphics;
#[cfg(feature = "libvirt")]
use super::graphics::{self};

/// Every domain's live XML is read again this often.
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
pub const REFRESH: Duration = Duration::from_secs(10);
/// Longest pause between two connection attempts while libvirt is down.
#[cfg(feature = "libvirt")]
const MAX_RETRY: Duration = Duration::from_secs(2);
/// libvirt keepalive: a probe every 2 s, the connection is closed after 3 unanswered.
#[cfg(feature = "libvirt")]
const KEEPALIVE: (i32, u32) = (2, 3);

/// What the poller last saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// No answer yet since the poller started.
    Connecting,
    /// libvirt cannot be reached or refused a call; the text says why.
    Down(String),
    /// Running domains by libvirt name.
    Up(BTreeMap<String, DomainGraphics>),
}

/// When the poller last completed a poll, in ms since its epoch (0: never).
#[derive(Debug)]
pub struct Heartbeat {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Heartbeat {
    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    fn beat(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms.max(1), Ordering::Release);
    }

    /// How long ago the last poll completed; `None` if none ever did.
    pub fn age(&self) -> Option<Duration> {
        match self.last_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms)),
            ),
        }
    }
}

/// Without the `libvirt` feature there is nothing to poll with: always an error
/// ([`super::NOT_BUILT_IN`]); [`super::LibvirtSource::start`] refuses before this.
#[cfg(not(feature = "libvirt"))]
pub fn spawn(
    _uri: String,
    _interval: Duration,
) -> std::io::Result<(watch::Receiver<Observation>, Arc<Heartbeat>)> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        super::NOT_BUILT_IN,
    ))
}

/// Starts the poller for `uri`. It runs until the returned receiver is dropped.
#[cfg(feature = "libvirt")]
pub fn spawn(
    uri: String,
    interval: Duration,
) -> std::io::Result<(watch::Receiver<Observation>, Arc<Heartbeat>)> {
    start_event_loop();
    let (tx, rx) = watch::channel(Observation::Connecting);
    let heartbeat = Arc::new(Heartbeat {
        epoch: Instant::now(),
        last_ms: AtomicU64::new(0),
    });
    let hb = heartbeat.clone();
    std::thread::Builder::new()
        .name("vncd-libvirt".into())
        .spawn(move || Poller::new(uri, interval, tx, hb).run())?;
    Ok((rx, heartbeat))
}

#[cfg(feature = "libvirt")]
/// libvirt's default event loop, once per process: needed for keepalive. libvirt's own
/// error printing to stderr is switched off too; errors are logged through tracing.
fn start_event_loop() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        virt::error::clear_error_callback();
        if let Err(e) = virt::event::event_register_default_impl() {
            warn!(error = %e, "cannot start libvirt's event loop; a hung libvirtd is detected only by vncd's heartbeat");
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("vncd-libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        debug!(error = %e, "libvirt event loop iteration failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start libvirt's event loop thread");
        }
    });
}

#[cfg(feature = "libvirt")]
/// A domain run: the same name with the same id is the same run, whose live XML
/// only changes by explicit device updates (caught by [`REFRESH`]).
type RunKey = (String, Option<u32>);

#[cfg(feature = "libvirt")]
struct Poller {
    uri: String,
    interval: Duration,
    tx: watch::Sender<Observation>,
    heartbeat: Arc<Heartbeat>,
    conn: Option<Connect>,
    cache: BTreeMap<RunKey, DomainGraphics>,
    refreshed: Instant,
    retry: Duration,
}

#[cfg(feature = "libvirt")]
impl Poller {
    fn new(
        uri: String,
        interval: Duration,
        tx: watch::Sender<Observation>,
        heartbeat: Arc<Heartbeat>,
    ) -> Self {
        Poller {
            uri,
            interval,
            tx,
            heartbeat,
            conn: None,
            cache: BTreeMap::new(),
            refreshed: Instant::now(),
            retry: interval,
        }
    }

    fn run(mut self) {
        while !self.tx.is_closed() {
            let pause = match self.poll() {
                Ok(domains) => {
                    self.retry = self.interval;
                    self.publish(Observation::Up(domains));
                    self.heartbeat.beat();
                    self.interval
                }
                Err(e) => {
                    self.disconnect();
                    let was_up = matches!(*self.tx.borrow(), Observation::Up(_));
                    if was_up {
                        warn!(uri = %self.uri, error = %e, "lost the libvirt connection; reconnecting");
                    } else {
                        debug!(uri = %self.uri, error = %e, "libvirt is not reachable yet");
                    }
                    self.publish(Observation::Down(e));
                    // Down is an answer too: the controller must see it promptly.
                    self.heartbeat.beat();
                    self.retry = (self.retry * 2).min(MAX_RETRY);
                    self.retry
                }
            };
            std::thread::sleep(pause);
        }
        self.disconnect();
    }

    fn publish(&self, obs: Observation) {
        self.tx.send_if_modified(|cur| {
            if *cur == obs {
                return false;
            }
            *cur = obs;
            true
        });
    }

    fn disconnect(&mut self) {
        if let Some(mut c) = self.conn.take() {
            let _ = c.close();
        }
        self.cache.clear();
    }

    fn connect(&mut self) -> Result<&Connect, String> {
        if self.conn.is_none() {
            let c = Connect::open(Some(&self.uri))
                .map_err(|e| format!("cannot connect to {}: {}", self.uri, e.message()))?;
            if let Err(e) = c.set_keep_alive(KEEPALIVE.0, KEEPALIVE.1) {
                debug!(error = %e, "libvirt keepalive not enabled");
            }
            info!(uri = %self.uri, "connected to libvirt");
            self.conn = Some(c);
        }
        self.conn
            .as_ref()
            .ok_or_else(|| format!("no connection to {}", self.uri))
    }

    /// One poll: the running domains and their graphics.
    fn poll(&mut self) -> Result<BTreeMap<String, DomainGraphics>, String> {
        if self.refreshed.elapsed() >= REFRESH {
            self.cache.clear();
            self.refreshed = Instant::now();
        }
        let uri = self.uri.clone();
        let conn = self.connect()?;
        let list = conn
            .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            .map_err(|e| format!("cannot list running domains at {uri}: {}", e.message()))?;
        let mut runs = Vec::with_capacity(list.len());
        for dom in &list {
            let name = dom
                .get_name()
                .map_err(|e| format!("cannot read a domain name at {uri}: {}", e.message()))?;
            runs.push((name, dom.get_id()));
        }
        let mut fresh = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (dom, key) in list.iter().zip(runs) {
            let g = match self.cache.remove(&key) {
                Some(g) => g,
                None => match dom.get_xml_desc(0) {
                    Ok(xml) => graphics::parse(&key.0, &xml),
                    // It stopped between the list and this call: it is simply gone.
                    Err(e)
                        if matches!(
                            e.code(),
                            ErrorNumber::NoDomain | ErrorNumber::OperationInvalid
                        ) =>
                    {
                        continue;
                    }
                    Err(e) => {
                        return Err(format!(
                            "cannot read the live XML of domain {:?} at {uri}: {}",
                            key.0,
                            e.message()
                        ));
                    }
                },
            };
            // A console still being set up is looked at again next poll.
            if !g.console.as_ref().is_err_and(|e| e.is_transient()) {
                fresh.insert(key.clone(), g.clone());
            }
            out.insert(key.0, g);
        }
        self.cache = fresh;
        Ok(out)
    }
}
