//! Sessions of a node that is gone.
//!
//! A session's finalizer (`vncd.io/cleanup`) makes its deletion wait until the node's
//! vncd has stopped the proxy and released the port. If that node is gone for good (its
//! Node object deleted) nobody ever removes the finalizer, and deleting the session, or
//! its namespace, hangs forever.
//!
//! One instance in the cluster (elected with its own Lease, `vncd--janitor`, a name no
//! node's Lease can have) looks after such sessions: when a session's node has no Node
//! object and its node Lease (`vncd-NODE`) has not changed for the grace period (as this
//! instance observes it, like the node Lease itself, never by comparing clocks), it
//! records reason `NodeGone` in the session's status and removes the finalizer. A node
//! that comes back simply leases the session again: nothing was released on its behalf
//! but the finalizer, and no process of that node can be touched from here.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

use super::call::Metered;
use super::lease_fields::put_lease_fields;
use super::node_lease::{LeaseConfig, NodeLease};
use super::objects::Known;
use super::writer::Writer;
use super::{FINALIZER, is_not_found};
use crate::api::{Phase, VncSession};
use crate::status::UrlStyle;

/// The status reason of a session whose node is gone.
pub const NODE_GONE: &str = "NodeGone";

/// The `node` of the janitor's own Lease: `vncd--janitor`, not a valid node name.
const LEASE_NODE: &str = "-janitor";

/// How the janitor runs.
#[derive(Clone, Debug)]
pub struct JanitorConfig {
    /// Where the node Leases live (the release namespace).
    pub namespace: String,
    pub identity: String,
    /// How long a node must be gone (no Node, its Lease unchanged) before its sessions'
    /// finalizers are removed.
    pub grace: Duration,
    /// How often to look.
    pub every: Duration,
    pub lease_duration: Duration,
}

/// What the janitor has seen of one node that has no Node object.
#[derive(Debug)]
struct Missing {
    /// The node Lease's resourceVersion when first seen (None: no Lease).
    lease_version: Option<String>,
    since: Instant,
}

/// Runs the janitor until the task is dropped: wait for its Lease, look after gone
/// nodes' sessions while holding it, wait again if it is lost.
/// `sessions` is scoped like the controller's watch (all namespaces, or `--namespace`).
pub async fn run(
    client: Client,
    sessions: Api<VncSession>,
    cfg: JanitorConfig,
    writer: Writer,
    metered: Metered,
) {
    loop {
        let lease = LeaseConfig {
            namespace: cfg.namespace.clone(),
            node: LEASE_NODE.into(),
            identity: cfg.identity.clone(),
            duration: cfg.lease_duration,
        };
        let held = NodeLease::new(client.clone(), lease, metered.clone())
            .acquire()
            .await;
        info!(
            grace_s = cfg.grace.as_secs(),
            "looking after sessions of nodes that are gone"
        );
        let mut janitor = Janitor {
            sessions: sessions.clone(),
            nodes: Api::all(client.clone()),
            leases: Api::namespaced(client.clone(), &cfg.namespace),
            writer: writer.clone(),
            metered: metered.clone(),
            grace: cfg.grace,
            missing: BTreeMap::new(),
        };
        let why = tokio::select! {
            why = held.lost() => why,
            () = async {
                loop {
                    janitor.sweep().await;
                    tokio::time::sleep(cfg.every).await;
                }
            } => unreachable!("the sweep loop never ends"),
        };
        warn!(reason = %why, "lost the janitor lease; waiting to take it again");
    }
}

struct Janitor {
    sessions: Api<VncSession>,
    nodes: Api<Node>,
    leases: Api<Lease>,
    writer: Writer,
    metered: Metered,
    grace: Duration,
    missing: BTreeMap<String, Missing>,
}

impl Janitor {
    /// One look: which nodes holding finalized sessions are gone, and their sessions freed.
    async fn sweep(&mut self) {
        let list = self
            .metered
            .call(
                "list",
                "VncSession",
                "",
                self.sessions.list(&ListParams::default()),
            )
            .await;
        let items = match list {
            Ok(l) => l.items,
            Err(e) => {
                warn!(error = %e, "janitor cannot list sessions");
                return;
            }
        };
        let mut by_node: BTreeMap<String, Vec<VncSession>> = BTreeMap::new();
        for o in items {
            if !o.finalizers().iter().any(|f| f == FINALIZER) {
                continue;
            }
            let node = o
                .status
                .as_ref()
                .and_then(|s| s.node.clone())
                .or_else(|| o.spec.node_name.clone());
            if let Some(node) = node {
                by_node.entry(node).or_default().push(o);
            }
        }
        self.missing.retain(|n, _| by_node.contains_key(n));
        for (node, sessions) in by_node {
            if self.gone(&node).await {
                for s in sessions {
                    self.free(&node, &s).await;
                }
            }
        }
    }

    /// True once `node` has had no Node object and an unchanged (or no) node Lease for
    /// the whole grace period, as this instance observed it.
    async fn gone(&mut self, node: &str) -> bool {
        match self
            .metered
            .call("get", "Node", node, self.nodes.get_opt(node))
            .await
        {
            Ok(Some(_)) => {
                self.missing.remove(node);
                return false;
            }
            Ok(None) => {}
            Err(e) => {
                warn!(node, error = %e, "janitor cannot read the Node");
                return false;
            }
        }
        let name = format!("vncd-{node}");
        let lease = match self
            .metered
            .call("get", "Lease", &name, self.leases.get_opt(&name))
            .await
        {
            Ok(l) => l.and_then(|l| l.metadata.resource_version),
            Err(e) => {
                warn!(node, error = %e, "janitor cannot read the node lease");
                return false;
            }
        };
        let seen = self.missing.entry(node.to_owned()).or_insert(Missing {
            lease_version: lease.clone(),
            since: Instant::now(),
        });
        if seen.lease_version != lease {
            // Someone renewed it: the node's vncd is alive somewhere.
            *seen = Missing {
                lease_version: lease,
                since: Instant::now(),
            };
            return false;
        }
        seen.since.elapsed() >= self.grace
    }

    /// Records `NodeGone` in the session's status and removes vncd's finalizer.
    async fn free(&self, node: &str, obj: &VncSession) {
        let Some(known) = Known::from_object(obj) else {
            return;
        };
        let mut status = known.status.clone();
        // The lease of a node that is gone holds nothing: no port, no proxy to reach.
        put_lease_fields(&mut status, None, node, &UrlStyle::default());
        status.phase = Some(if known.deleting {
            Phase::Terminating
        } else {
            Phase::Failed
        });
        status.reason = Some(NODE_GONE.into());
        status.message = Some(format!(
            "node {node} is gone (no Node object, and its vncd has not renewed lease vncd-{node} for {} s); the finalizer was removed so the session can be deleted",
            self.grace.as_secs()
        ));
        status.conditions.clear();
        let known = match self.writer.apply_status(&known, &status).await {
            Ok(o) => Known::from_object(&o).unwrap_or(known),
            Err(e) if is_not_found(&e) => return,
            Err(e) => {
                warn!(session = %known.key(), error = %e, "janitor cannot record NodeGone; will retry");
                return;
            }
        };
        match self.writer.set_finalizer(&known, false).await {
            Ok(_) => {
                info!(session = %known.key(), node, "node is gone: removed the session's finalizer")
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                warn!(session = %known.key(), error = %e, "janitor cannot remove the finalizer; will retry")
            }
        }
    }
}
