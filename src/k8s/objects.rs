//! What vncd last learned from the API server about this node's VncSessions.
//!
//! The source (watch), the lease store (LIST and status writes) and the status sink
//! (status writes) all see the same objects. They share this cache so that each write
//! carries the newest `resourceVersion` any of them has seen, and so that the sink writes
//! only what differs from what the server already holds. A stale guess is never a
//! correctness problem: the API server refuses it with 409 and the writer reloads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::ResourceExt;

use super::{FINALIZER, object_ref, session_key};
use crate::api::{VncSession, VncSessionStatus};
use crate::lease::Lease;

/// One VncSession as the API server last showed it to us.
#[derive(Clone, Debug, PartialEq)]
pub struct Known {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    pub generation: Option<i64>,
    /// `metadata.deletionTimestamp` is set: the object waits for its finalizers.
    pub deleting: bool,
    pub finalizers: Vec<String>,
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// The status the server holds (as of `resource_version`).
    pub status: VncSessionStatus,
    /// This node's watch currently delivers the object (it is assigned to this node).
    pub watched: bool,
}

impl Known {
    /// None for an object without a name or namespace (the API server never sends one).
    pub fn from_object(obj: &VncSession) -> Option<Known> {
        Some(Known {
            namespace: obj.metadata.namespace.clone()?,
            name: obj.metadata.name.clone()?,
            uid: obj.metadata.uid.clone().unwrap_or_default(),
            resource_version: obj.resource_version().unwrap_or_default(),
            generation: obj.metadata.generation,
            deleting: obj.metadata.deletion_timestamp.is_some(),
            finalizers: obj.finalizers().to_vec(),
            node_name: obj.spec.node_name.clone(),
            status: obj.status.clone().unwrap_or_default(),
            watched: false,
        })
    }

    pub fn key(&self) -> String {
        session_key(&self.namespace, &self.name)
    }

    /// Carries vncd's finalizer.
    pub fn has_finalizer(&self) -> bool {
        self.finalizers.iter().any(|f| f == FINALIZER)
    }

    pub fn reference(&self) -> ObjectReference {
        object_ref(&self.namespace, &self.name, &self.uid)
    }
}

/// True if `candidate` is provably older than `cached`. Resource versions are opaque to
/// clients; etcd-backed ones are increasing integers, and only then do we compare. A
/// wrong answer costs one 409 and a reload, never a wrong write.
fn is_older(candidate: &str, cached: &str) -> bool {
    match (candidate.parse::<u64>(), cached.parse::<u64>()) {
        (Ok(a), Ok(b)) => a < b,
        _ => false,
    }
}

#[derive(Debug, Default)]
struct Inner {
    known: BTreeMap<String, Known>,
    /// The lease store's current lease set, for the sink to write lease fields from.
    leases: BTreeMap<String, Lease>,
}

/// The shared cache. Cheap to clone; all clones see the same objects.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    inner: Arc<Mutex<Inner>>,
}

impl Objects {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an object from a watch, a LIST or a write response, unless we already hold
    /// a newer version of it. Returns its key.
    pub fn observe(&self, obj: &VncSession) -> Option<String> {
        let mut fresh = Known::from_object(obj)?;
        let key = fresh.key();
        let mut inner = self.lock();
        match inner.known.get_mut(&key) {
            Some(old)
                if old.uid == fresh.uid
                    && is_older(&fresh.resource_version, &old.resource_version) => {}
            Some(old) => {
                fresh.watched = old.watched;
                *old = fresh;
            }
            None => {
                inner.known.insert(key.clone(), fresh);
            }
        }
        Some(key)
    }

    /// Marks exactly `keys` as delivered by this node's watch, and forgets objects that
    /// are neither watched nor leased (so the cache stays as small as the node's share).
    pub fn set_watched(&self, keys: &BTreeSet<String>) {
        let mut inner = self.lock();
        let Inner { known, leases } = &mut *inner;
        for (k, v) in known.iter_mut() {
            v.watched = keys.contains(k);
        }
        known.retain(|k, v| v.watched || leases.contains_key(k));
    }

    /// Drops an object the API server says is gone.
    pub fn forget(&self, key: &str) {
        self.lock().known.remove(key);
    }

    pub fn get(&self, key: &str) -> Option<Known> {
        self.lock().known.get(key).cloned()
    }

    /// Every object in the cache.
    pub fn all(&self) -> Vec<Known> {
        self.lock().known.values().cloned().collect()
    }

    pub fn set_leases(&self, leases: &BTreeMap<String, Lease>) {
        self.lock().leases = leases.clone();
    }

    pub fn lease(&self, key: &str) -> Option<Lease> {
        self.lock().leases.get(key).cloned()
    }

    pub fn leased(&self, key: &str) -> bool {
        self.lock().leases.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Target, VncSessionSpec};

    fn obj(name: &str, uid: &str, rv: &str, port: Option<i32>) -> VncSession {
        let mut o = VncSession::new(
            name,
            VncSessionSpec {
                target: Target::tcp("127.0.0.1", 5901),
                node_name: Some("n1".into()),
                ..VncSessionSpec::default()
            },
        );
        o.metadata.namespace = Some("ns".into());
        o.metadata.uid = Some(uid.into());
        o.metadata.resource_version = Some(rv.into());
        o.status = Some(VncSessionStatus {
            port,
            ..VncSessionStatus::default()
        });
        o
    }

    #[test]
    fn an_older_version_never_replaces_a_newer_one() {
        let c = Objects::default();
        assert_eq!(
            c.observe(&obj("vm1", "u1", "10", Some(1))).as_deref(),
            Some("ns/vm1")
        );
        c.observe(&obj("vm1", "u1", "9", Some(2)));
        assert_eq!(c.get("ns/vm1").unwrap().status.port, Some(1));
        c.observe(&obj("vm1", "u1", "11", Some(3)));
        assert_eq!(c.get("ns/vm1").unwrap().status.port, Some(3));
        // A recreated object (new uid) replaces whatever we had.
        c.observe(&obj("vm1", "u2", "5", None));
        assert_eq!(c.get("ns/vm1").unwrap().uid, "u2");
        // Opaque versions are taken as they come.
        c.observe(&obj("vm1", "u2", "abc", Some(4)));
        assert_eq!(c.get("ns/vm1").unwrap().status.port, Some(4));
    }

    #[test]
    fn unwatched_objects_are_kept_only_while_leased() {
        let c = Objects::default();
        c.observe(&obj("a", "u1", "1", None));
        c.observe(&obj("b", "u2", "1", None));
        let lease = Lease::new(
            "ns/b",
            6100,
            crate::session::Endpoint::Unix { path: "/s".into() },
            jiff::Timestamp::now(),
        );
        c.set_leases(&BTreeMap::from([("ns/b".to_owned(), lease)]));
        c.set_watched(&BTreeSet::new());
        assert!(c.get("ns/a").is_none());
        assert!(!c.get("ns/b").unwrap().watched);
        c.observe(&obj("a", "u1", "2", None));
        c.set_watched(&BTreeSet::from(["ns/a".to_owned()]));
        assert!(c.get("ns/a").unwrap().watched);
        // Observing again keeps the watched flag.
        c.observe(&obj("a", "u1", "3", None));
        assert!(c.get("ns/a").unwrap().watched);
        assert!(c.leased("ns/b") && !c.leased("ns/a"));
    }
}
