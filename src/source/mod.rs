//! Sources of desired state.
//!
//! A source says which sessions should exist. The controller asks it for a
//! [`Snapshot`] and waits on [`Source::changed`]; it never learns whether sessions came
//! from a directory, the Kubernetes API or libvirt.

pub mod dir;
pub mod filter;
pub mod kube;
pub mod libvirt;
pub mod merge;
pub mod policy;
pub mod quota;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use crate::api::VncSession;
use crate::session::{Desired, DomainRef};

/// A source object that could not be accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// The session name it claims, or a name derived from where it came from.
    pub name: String,
    /// Where it came from (a file path, an object reference).
    pub origin: String,
    pub error: String,
}

/// Everything a source wants right now.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub desired: BTreeMap<String, Desired>,
    /// The objects behind `desired`, reported back with their status.
    pub objects: BTreeMap<String, VncSession>,
    pub rejected: Vec<Rejected>,
    /// Sessions whose source object is unreadable right now; their leases stay put.
    pub protected: BTreeSet<String>,
    /// Notes to attach to a desired session's status (e.g. "manifest broken, still
    /// serving the last valid version").
    pub warnings: BTreeMap<String, String>,
    /// Some input is still being written; look again shortly.
    pub unsettled: bool,
    /// Sessions whose target names a libvirt domain. [`merge`] resolves them into
    /// `desired` from the live domain XML; the controller never looks at them, so
    /// unresolved they hold no port.
    pub unresolved: BTreeMap<String, DomainRef>,
    /// Ports that programs the source knows about listen on (a running domain's own VNC
    /// and websocket ports): never leased, even when a bind probe on vncd's listen
    /// address would succeed.
    pub reserved_ports: BTreeSet<u16>,
    /// Reasons for `rejected` names that are waiting rather than invalid (e.g.
    /// `DomainNotRunning`); they are reported Pending with this reason.
    pub waiting: BTreeMap<String, &'static str>,
    /// Reasons for `rejected` names that a policy refused (e.g. `TargetNotAllowed`); they
    /// are reported Failed with this reason rather than as invalid manifests.
    pub refused: BTreeMap<String, &'static str>,
}

/// Why a source could not produce a snapshot. The controller then changes nothing:
/// an unreadable source never means "nothing is desired".
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read sessions directory {}: {source}", path.display())]
    Dir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch sessions directory {}: {detail}", path.display())]
    Watch {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("libvirt at {uri} cannot say which domains run: {detail}")]
    Libvirt { uri: String, detail: String },
}

impl SourceError {
    /// A short, stable name for the kind of failure: the `kind` label of
    /// `vncd_errors_total{component="source"}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            SourceError::Dir { .. } => "dir",
            SourceError::Watch { .. } => "watch",
            SourceError::Libvirt { .. } => "libvirt",
        }
    }
}

/// A source of desired sessions. See the module docs.
pub trait Source: Send {
    fn snapshot(&mut self) -> impl Future<Output = Result<Snapshot, SourceError>> + Send;
    /// Resolves when something may have changed.
    fn changed(&mut self) -> impl Future<Output = ()> + Send;
}
