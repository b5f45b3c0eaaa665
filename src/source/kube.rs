//! The Kubernetes source: the VncSessions assigned to this node, from a watch.
//!
//! The watch carries a field selector `spec.nodeName=NODE` (the CRD declares
//! `.spec.nodeName` in `selectableFields`), so the API server sends each node only its own
//! share: with thousands of nodes no instance lists every session. A session without
//! `spec.nodeName` matches no node's selector and is served by nobody until it is assigned.
//!
//! Objects being deleted (`deletionTimestamp` set) are not desired, so the plan stops
//! their proxies and releases their ports (the lease store then drops the finalizer), but
//! they stay in the snapshot so their status can say `Terminating`. Specs that fail
//! [`Desired::from_spec`] (rules the schema cannot express, such as the node's own pool)
//! are reported as rejected; one that already holds a lease keeps it untouched, like a
//! broken manifest edit in standalone mode.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::{Rejected, Snapshot, Source, SourceError};
use crate::api::VncSession;
use crate::k8s::node_selector;
use crate::k8s::objects::Objects;
use crate::pool::PortRange;
use crate::session::Desired;

/// What the watch delivered, for the exit summary and the scale benchmark.
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Watch events carrying an object (initial list included).
    pub events: AtomicU64,
    /// Objects delivered whose `spec.nodeName` is not this node (the server should send none).
    pub foreign: AtomicU64,
    /// Distinct objects delivered.
    pub distinct: AtomicU64,
}

/// The watch-backed source. See the module docs.
#[derive(Debug)]
pub struct KubeSource {
    store: Store<VncSession>,
    objects: Objects,
    node: String,
    pool: PortRange,
    changed: Arc<Notify>,
    stats: Arc<WatchStats>,
    task: JoinHandle<()>,
}

impl KubeSource {
    /// Starts watching `api` for `node`'s sessions; [`KubeSource::synced`] resolves after
    /// the initial list.
    pub fn start(api: Api<VncSession>, node: &str, pool: PortRange, objects: Objects) -> Self {
        let (store, writer) = reflector::store();
        let changed = Arc::new(Notify::new());
        let stats = Arc::new(WatchStats::default());
        let config = watcher::Config::default().fields(&node_selector(node));
        let stream = watcher(api, config)
            .default_backoff()
            // managedFields are large and of no use to us.
            .modify(|o: &mut VncSession| crate::k8s::slim(&mut o.metadata))
            .reflect(writer);
        let (notify, counts, me) = (changed.clone(), stats.clone(), node.to_owned());
        let task = crate::task::spawn(
            tracing::info_span!("kube_source", node = %node),
            async move {
                let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
                futures::pin_mut!(stream);
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(ev) => {
                            let obj = match &ev {
                                watcher::Event::Apply(o)
                                | watcher::Event::InitApply(o)
                                | watcher::Event::Delete(o) => Some(o),
                                watcher::Event::Init | watcher::Event::InitDone => None,
                            };
                            if let Some(o) = obj {
                                counts.events.fetch_add(1, Ordering::Relaxed);
                                if o.spec.node_name.as_deref() != Some(me.as_str()) {
                                    counts.foreign.fetch_add(1, Ordering::Relaxed);
                                }
                                let id = (
                                    o.metadata.namespace.clone().unwrap_or_default(),
                                    o.metadata.name.clone().unwrap_or_default(),
                                );
                                if seen.insert(id) {
                                    counts.distinct.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            debug!(event = %ev, "watch event");
                            notify.notify_one();
                        }
                        Err(e) => {
                            warn!(error = %e, "VncSession watch failed; retrying with backoff")
                        }
                    }
                }
            },
        );
        KubeSource {
            store,
            objects,
            node: node.to_owned(),
            pool,
            changed,
            stats,
            task,
        }
    }

    /// Resolves once the initial list has arrived.
    pub async fn synced(&self) {
        if self.store.wait_until_ready().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    pub fn stats(&self) -> Arc<WatchStats> {
        self.stats.clone()
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Builds the snapshot from the objects the watch holds. Pure apart from `objects`,
/// which learns every object's newest version and which ones this node is assigned.
pub fn snapshot_of(
    items: &[Arc<VncSession>],
    node: &str,
    pool: PortRange,
    objects: &Objects,
) -> Snapshot {
    let mut snap = Snapshot::default();
    let mut watched = BTreeSet::new();
    for obj in items {
        // The API server filters by node; this guards against a server that ignored the
        // selector: another node's session is never ours to serve.
        if obj.spec.node_name.as_deref() != Some(node) {
            continue;
        }
        let Some(key) = objects.observe(obj) else {
            continue;
        };
        let name = obj.metadata.name.clone().unwrap_or_default();
        watched.insert(key.clone());
        snap.objects.insert(key.clone(), (**obj).clone());
        if obj.metadata.deletion_timestamp.is_some() {
            continue;
        }
        match Desired::from_spec(&name, &obj.spec, pool) {
            Ok(mut d) => {
                d.name = key.clone();
                if let Some(g) = obj.metadata.generation {
                    d.generation = g;
                }
                snap.desired.insert(key, d);
            }
            Err(e) => {
                let status = obj.status.as_ref();
                let holds_lease = status
                    .is_some_and(|s| s.lease_uid.is_some() && s.node.as_deref() == Some(node))
                    || objects.leased(&key);
                if holds_lease {
                    snap.protected.insert(key.clone());
                }
                snap.rejected.push(Rejected {
                    name: key.clone(),
                    origin: format!("VncSession {key}"),
                    error: e.to_string(),
                });
            }
        }
    }
    objects.set_watched(&watched);
    snap
}

impl Source for KubeSource {
    async fn snapshot(&mut self) -> Result<Snapshot, SourceError> {
        Ok(snapshot_of(
            &self.store.state(),
            &self.node,
            self.pool,
            &self.objects,
        ))
    }

    async fn changed(&mut self) {
        self.changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Target, VncSessionSpec, VncSessionStatus};
    use jiff::Timestamp;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn obj(name: &str, node: Option<&str>, port: Option<i32>) -> Arc<VncSession> {
        let mut o = VncSession::new(
            name,
            VncSessionSpec {
                target: Target::tcp("127.0.0.1", 5901),
                port,
                node_name: node.map(str::to_owned),
                ..VncSessionSpec::default()
            },
        );
        o.metadata.namespace = Some("ns".into());
        o.metadata.uid = Some(format!("uid-{name}"));
        o.metadata.resource_version = Some("1".into());
        o.metadata.generation = Some(3);
        Arc::new(o)
    }

    fn pool() -> PortRange {
        "6100-6199".parse().unwrap()
    }

    #[test]
    fn only_this_nodes_sessions_are_desired_under_namespaced_keys() {
        let c = Objects::default();
        let items = [
            obj("a", Some("n1"), None),
            obj("b", Some("n2"), None),
            obj("c", None, None),
        ];
        let s = snapshot_of(&items, "n1", pool(), &c);
        assert_eq!(s.desired.keys().collect::<Vec<_>>(), ["ns/a"]);
        let d = &s.desired["ns/a"];
        assert_eq!(d.name, "ns/a");
        assert_eq!(
            d.generation, 3,
            "observedGeneration follows metadata.generation"
        );
        assert!(c.get("ns/a").unwrap().watched);
        assert!(c.get("ns/b").is_none());
    }

    #[test]
    fn deleting_objects_are_listed_but_not_desired() {
        let c = Objects::default();
        let mut o = (*obj("a", Some("n1"), None)).clone();
        o.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let s = snapshot_of(&[Arc::new(o)], "n1", pool(), &c);
        assert!(s.desired.is_empty());
        assert!(s.objects.contains_key("ns/a"));
        assert!(c.get("ns/a").unwrap().deleting);
    }

    #[test]
    fn invalid_specs_are_rejected_and_protect_a_held_lease() {
        let c = Objects::default();
        let fresh = obj("new", Some("n1"), Some(80));
        let mut leased = (*obj("old", Some("n1"), Some(80))).clone();
        leased.status = Some(VncSessionStatus {
            lease_uid: Some("abc".into()),
            node: Some("n1".into()),
            port: Some(6100),
            ..VncSessionStatus::default()
        });
        let s = snapshot_of(&[fresh, Arc::new(leased)], "n1", pool(), &c);
        assert!(s.desired.is_empty());
        assert_eq!(s.rejected.len(), 2);
        assert!(
            s.rejected[0]
                .error
                .contains("outside the port pool 6100-6199")
        );
        assert_eq!(s.rejected[0].name, "ns/new");
        assert_eq!(
            s.protected.iter().collect::<Vec<_>>(),
            ["ns/old"],
            "only the session holding a lease keeps it"
        );
    }

    #[test]
    fn the_selector_names_the_node() {
        assert_eq!(node_selector("worker-1"), "spec.nodeName=worker-1");
        assert_eq!(
            crate::k8s::key_of(&obj("a", None, None)).as_deref(),
            Some("ns/a")
        );
    }
}
