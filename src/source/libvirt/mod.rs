//! The libvirt source: running domains with VNC graphics, read from libvirt.
//!
//! [`LibvirtSource`] turns what the [`poller`] last saw into a [`DomainTable`]:
//! the consoles of running domains by libvirt name, and the ports their own graphics
//! servers hold. [`super::merge`] turns the table into sessions (one per domain, named
//! by [`name::session_name`]) and resolves manifests that name a domain.
//!
//! Talking to libvirt ([`poller`]) needs the `libvirt` cargo feature, which links
//! libvirt's C library; everything else here is pure and always built. Without the
//! feature, [`LibvirtSource::start`] fails with [`NOT_BUILT_IN`], and `vncd run
//! --libvirt` says so before it touches anything (see `cli::libvirt`).
//!
//! A libvirt that cannot be reached, or that has not answered for [`STALE_AFTER`], is an
//! error, never an empty table: a lost connection must not look like "every VM stopped",
//! which would stop every console.

pub mod graphics;
pub mod name;
pub mod poller;
pub mod qemu_conf;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use self::graphics::{Console, GraphicsError};
use self::poller::{Heartbeat, Observation};
use super::SourceError;

/// Why a build without the `libvirt` feature cannot serve libvirt domains, and how to
/// get one that can.
pub const NOT_BUILT_IN: &str = "this vncd was built without libvirt support; build it with \
`cargo build --release --features libvirt` (needs libvirt-dev and pkg-config: \
scripts/install-build-deps --libvirt), or install the Debian package (scripts/build-deb), \
which has it";

/// Whether this build can talk to libvirt (the `libvirt` cargo feature).
pub const BUILT_IN: bool = cfg!(feature = "libvirt");

/// A libvirt that has not completed a poll for this long counts as unreachable.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// What libvirt runs right now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainTable {
    /// Running domains by libvirt name: their VNC console, or why it is unusable
    /// ([`GraphicsError::NoVnc`] for domains without VNC graphics).
    pub consoles: BTreeMap<String, Result<Console, GraphicsError>>,
    /// Ports the running domains' own graphics servers hold.
    pub ports: BTreeSet<u16>,
    /// Running domains' UUIDs by libvirt name (from the live XML), so a domain recreated
    /// under the same name is told apart from the one it replaced.
    pub uuids: BTreeMap<String, String>,
}

impl DomainTable {
    fn from_domains(domains: &BTreeMap<String, graphics::DomainGraphics>) -> Self {
        let mut t = DomainTable::default();
        for (name, g) in domains {
            t.consoles.insert(name.clone(), g.console.clone());
            t.ports.extend(g.ports.iter().copied());
            if let Some(uuid) = &g.uuid {
                t.uuids.insert(name.clone(), uuid.clone());
            }
        }
        t
    }
}

/// The libvirt source. See the module docs.
#[derive(Debug)]
pub struct LibvirtSource {
    uri: String,
    rx: watch::Receiver<Observation>,
    heartbeat: Arc<Heartbeat>,
}

impl LibvirtSource {
    /// Starts polling `uri` every `interval`. Connecting happens in the background; until
    /// it succeeds, [`LibvirtSource::table`] returns an error.
    pub fn start(uri: &str, interval: Duration) -> Result<Self, SourceError> {
        if !BUILT_IN {
            return Err(SourceError::Libvirt {
                uri: uri.to_owned(),
                detail: NOT_BUILT_IN.to_owned(),
            });
        }
        let (rx, heartbeat) =
            poller::spawn(uri.to_owned(), interval).map_err(|e| SourceError::Libvirt {
                uri: uri.to_owned(),
                detail: format!("cannot start the poller thread: {e}"),
            })?;
        Ok(LibvirtSource {
            uri: uri.to_owned(),
            rx,
            heartbeat,
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Waits up to `timeout` for the first answer (domains or an error), so vncd's first
    /// pass does not fail only because the connection is still being opened.
    pub async fn first_answer(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.heartbeat.age().is_none() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// The running domains, or why libvirt cannot say.
    pub fn table(&mut self) -> Result<DomainTable, SourceError> {
        let err = |detail: String| SourceError::Libvirt {
            uri: self.uri.clone(),
            detail,
        };
        let obs = self.rx.borrow_and_update().clone();
        let table = match obs {
            Observation::Connecting => return Err(err("not connected yet".into())),
            Observation::Down(why) => return Err(err(why)),
            Observation::Up(domains) => DomainTable::from_domains(&domains),
        };
        match self.heartbeat.age() {
            Some(age) if age <= STALE_AFTER => Ok(table),
            Some(age) => Err(err(format!(
                "no answer for {} ms (a hung libvirtd?)",
                age.as_millis()
            ))),
            None => Err(err("not connected yet".into())),
        }
    }

    /// Resolves when the poller saw a change (a domain started or stopped, the
    /// connection was lost or came back).
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
