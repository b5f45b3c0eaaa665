//! One served session at run time: its declared spec, the console its connections are
//! checked against and bridged to, its listener, counters and probe state.
//!
//! The console is replaced (a new *generation*) whenever the session's connections must
//! end while the session stays: a new target, lease or key, an idle timeout. The old
//! generation's bridges end at once; counters and the connection cap span generations.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::probe::ProbeState;
use super::table::SessionSpec;
use crate::proxy::conn::{Console, Limit};
use crate::proxy::stats::Counters;
use crate::proxy::token::Tickets;
use crate::ticket::DirNonces;

/// Locks a mutex; a panic elsewhere must not take the relay down with it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a session cannot be served (reported per session, the relay keeps running).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(
        "session {name:?}: cannot create its used-ticket directory {}: {source}",
        path.display()
    )]
    NonceDir {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("session {name:?}: cannot listen on {addr}: {source}")]
    Bind {
        name: String,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// A session the relay serves.
#[derive(Debug)]
pub(crate) struct Live {
    pub name: String,
    spec: Mutex<SessionSpec>,
    console: Mutex<Arc<Console>>,
    /// Consoles replaced by [`Live::rekey`] whose connections are still open: they end
    /// with the session's next restart or close, like the current console's.
    retired: Mutex<Vec<std::sync::Weak<Console>>>,
    nonce_dir: PathBuf,
    ping_every: Duration,
    pub counters: Arc<Counters>,
    limit: Arc<Limit>,
    /// TCP connections open now, pending ones included.
    pub connections: AtomicUsize,
    /// The accept task, while listening.
    listener: Mutex<Option<JoinHandle<()>>>,
    /// Why it is not listening, if it is not.
    pub error: Mutex<Option<String>>,
    pub probe: Mutex<ProbeState>,
}

impl Live {
    /// A session for `spec`, its used tickets recorded in `nonce_root/NAME/` (created 0700).
    pub fn new(
        spec: SessionSpec,
        nonce_root: &Path,
        ping_every: Duration,
    ) -> Result<Live, SessionError> {
        let nonce_dir = nonce_root.join(&spec.name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&nonce_dir)
            .map_err(|source| SessionError::NonceDir {
                name: spec.name.clone(),
                path: nonce_dir.clone(),
                source,
            })?;
        let counters = Arc::new(Counters::default());
        let limit = Limit::new(spec.limits.max_connections as usize);
        let console = console_for(&spec, &nonce_dir, &counters, &limit, ping_every);
        Ok(Live {
            name: spec.name.clone(),
            spec: Mutex::new(spec),
            console: Mutex::new(Arc::new(console)),
            retired: Mutex::new(Vec::new()),
            nonce_dir,
            ping_every,
            counters,
            limit,
            connections: AtomicUsize::new(0),
            listener: Mutex::new(None),
            error: Mutex::new(None),
            probe: Mutex::new(ProbeState::default()),
        })
    }

    pub fn spec(&self) -> SessionSpec {
        lock(&self.spec).clone()
    }

    /// The console a new connection goes to, unless the session has expired.
    pub fn console(&self, now_unix: u64) -> Option<Arc<Console>> {
        let expired = lock(&self.spec)
            .limits
            .expires_at
            .is_some_and(|e| now_unix >= e);
        (!expired).then(|| lock(&self.console).clone())
    }

    /// Authenticated connections now.
    pub fn authenticated(&self) -> usize {
        self.limit.held()
    }

    /// Ends every connection (bridged or about to be) and starts a new generation with
    /// `spec` for the connections to come.
    pub fn restart(&self, spec: SessionSpec) {
        self.next_generation(spec).end_connections();
        self.end_retired();
        // A new target deserves a probe of its own.
        *lock(&self.probe) = ProbeState::default();
    }

    /// A new lease key for the same lease and target: connections to come need tickets
    /// of the new key; open ones keep streaming (they were admitted for this lease).
    pub fn rekey(&self, spec: SessionSpec) {
        let old = self.next_generation(spec);
        let mut retired = lock(&self.retired);
        retired.retain(|w| w.strong_count() > 0);
        retired.push(Arc::downgrade(&old));
    }

    /// Makes `spec` current with a console of its own for the connections to come;
    /// returns the console it replaces (whose connections the caller ends, or not).
    fn next_generation(&self, spec: SessionSpec) -> Arc<Console> {
        self.limit.set_max(spec.limits.max_connections as usize);
        let fresh = console_for(
            &spec,
            &self.nonce_dir,
            &self.counters,
            &self.limit,
            self.ping_every,
        );
        *lock(&self.spec) = spec;
        std::mem::replace(&mut *lock(&self.console), Arc::new(fresh))
    }

    /// Ends the connections of consoles replaced by [`Live::rekey`].
    fn end_retired(&self) {
        for c in std::mem::take(&mut *lock(&self.retired)) {
            if let Some(c) = c.upgrade() {
                c.end_connections();
            }
        }
    }

    /// New limits, applied in place: connections stay.
    pub fn update(&self, spec: SessionSpec) {
        self.limit.set_max(spec.limits.max_connections as usize);
        *lock(&self.spec) = spec;
    }

    /// Ends the connections of the current generation and starts a new one.
    pub fn end_connections(&self) {
        let spec = self.spec();
        self.restart(spec);
    }

    pub fn set_listener(&self, task: JoinHandle<()>) {
        *lock(&self.error) = None;
        if let Some(old) = lock(&self.listener).replace(task) {
            old.abort();
        }
    }

    pub fn listening(&self) -> bool {
        lock(&self.listener)
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }

    /// Stops accepting; returns the task so the caller can wait until its socket is closed.
    pub fn take_listener(&self) -> Option<JoinHandle<()>> {
        let t = lock(&self.listener).take();
        if let Some(t) = &t {
            t.abort();
        }
        t
    }

    /// Closes the session: no more accepts, every connection ends.
    pub async fn close(&self) {
        if let Some(t) = self.take_listener() {
            let _ = t.await;
        }
        lock(&self.console).end_connections();
        self.end_retired();
        self.remove_spent_records();
    }

    /// A closed session's used-ticket directory goes once no record in it can matter: the
    /// expired ones are pruned and the directory removed if that empties it. A record of a
    /// ticket still valid stays, so the same lease declared again still refuses it.
    fn remove_spent_records(&self) {
        let _ = crate::ticket::DirNonces::new(&self.nonce_dir).prune();
        if std::fs::remove_dir(&self.nonce_dir).is_ok() && self.name.contains('/') {
            // NAMESPACE/NAME: the namespace's directory too, if it was the last.
            if let Some(ns) = self.nonce_dir.parent() {
                let _ = std::fs::remove_dir(ns);
            }
        }
    }

    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

fn console_for(
    spec: &SessionSpec,
    nonce_dir: &Path,
    counters: &Arc<Counters>,
    limit: &Arc<Limit>,
    ping_every: Duration,
) -> Console {
    let tickets = Tickets::for_lease(
        spec.lease_key.0.clone(),
        &spec.lease_uid,
        Box::new(DirNonces::new(nonce_dir.to_owned())),
    );
    Console::new(
        spec.target.to_target(),
        Some(tickets),
        counters.clone(),
        ping_every,
    )
    .endable(limit.clone())
}
