//! Lease stores: where leases live durably.
//!
//! The controller only sees [`LeaseStore`]. Standalone mode keeps leases in a locked
//! state file ([`file::FileStore`]); Kubernetes mode keeps them in each object's status.
//! Every commit is compare-and-swap on a revision, so two writers (the controller and
//! `vncd cleanup`, say) can never both hand out one port: the loser re-plans.

pub mod file;
pub mod kube_status;
pub mod lock;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;

use crate::lease::{Expiry, Lease};

/// Every lease a store holds, at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseSet {
    pub revision: u64,
    pub leases: BTreeMap<String, Lease>,
    /// Sessions that expired, by name (see [`Expiry`]).
    pub expired: BTreeMap<String, Expiry>,
}

/// One change to a lease set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseChange {
    /// Create or replace the lease of `lease.session`.
    Put(Lease),
    /// Drop the lease of this session.
    Remove(String),
    /// Record that a session expired.
    Expire(String, Expiry),
    /// Forget an expiry (the spec changed, or the session is gone).
    Unexpire(String),
}

/// Why a store could not load or commit.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the leases changed underneath us (expected revision {expected}, found {found}); re-planning"
    )]
    Conflict { expected: u64, found: u64 },
    #[error("state file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state file {} is corrupt: {detail}. vncd will not guess which ports are free, and left the file untouched. \
         Inspect it; to rebuild it from the running proxies vncd can prove are its own, run `vncd cleanup --once --rebuild-state`",
        path.display()
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error("a lease change is inconsistent: {0}")]
    Invalid(String),
    /// The API behind a remote store (Kubernetes mode) refused or failed a read or write.
    /// The error is boxed and labelled by the store that made it, so this module stays
    /// neutral: it names no client library.
    #[error("VncSession {object}: cannot {action}: {source}")]
    Api {
        object: String,
        action: String,
        /// The `kind` label of `vncd_store_errors_total` (e.g. `conflict`, `timeout`).
        label: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    /// A short, stable name for the kind of failure: the `kind` label of
    /// `vncd_store_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            StoreError::Conflict { .. } => "conflict",
            StoreError::Io { .. } => "io",
            StoreError::Corrupt { .. } => "corrupt",
            StoreError::Lock(_) => "lock",
            StoreError::Invalid(_) => "invalid",
            StoreError::Api { label, .. } => label,
        }
    }
}

/// A durable home for leases. See the module docs.
pub trait LeaseStore: Send {
    /// Reads every lease.
    fn load(&mut self) -> impl Future<Output = Result<LeaseSet, StoreError>> + Send;
    /// Applies `changes` if the store is still at revision `base`, durably, and returns
    /// the new set. A store that moved on answers [`StoreError::Conflict`].
    fn commit(
        &mut self,
        base: u64,
        changes: Vec<LeaseChange>,
    ) -> impl Future<Output = Result<LeaseSet, StoreError>> + Send;
    /// The leases, if another writer (`vncd cleanup`) moved the store past `revision`:
    /// the controller otherwise learns of that only when its next commit conflicts, and a
    /// session whose lease cleanup released keeps being served from memory. `None` if it
    /// did not, or this store cannot tell cheaply (it has no other writer).
    fn changed_since(&mut self, revision: u64) -> impl Future<Output = Option<LeaseSet>> + Send {
        let _ = revision;
        std::future::ready(None)
    }
}

/// Applies changes to a set, refusing any that would lease one port twice.
pub fn apply_changes(set: &mut LeaseSet, changes: Vec<LeaseChange>) -> Result<(), StoreError> {
    for change in changes {
        match change {
            LeaseChange::Put(lease) => {
                if let Some(other) = set
                    .leases
                    .values()
                    .find(|l| l.port == lease.port && l.session != lease.session)
                {
                    return Err(StoreError::Invalid(format!(
                        "port {} is already leased to session {:?}, not to {:?}",
                        lease.port, other.session, lease.session
                    )));
                }
                set.leases.insert(lease.session.clone(), lease);
            }
            LeaseChange::Remove(session) => {
                set.leases.remove(&session);
            }
            LeaseChange::Expire(session, expiry) => {
                set.expired.insert(session, expiry);
            }
            LeaseChange::Unexpire(session) => {
                set.expired.remove(&session);
            }
        }
    }
    set.revision += 1;
    Ok(())
}
