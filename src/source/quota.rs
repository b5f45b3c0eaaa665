//! A per-namespace share of a node's sessions (`vncd kube --max-sessions-per-namespace`).
//!
//! In Kubernetes mode namespaces are tenants, and without a share one tenant could lease
//! every port of a node's pool and leave the others' consoles Pending. [`NamespaceQuota`]
//! admits at most `max` desired sessions per namespace on this node; the rest wait,
//! reported `Pending` with reason [`NAMESPACE_QUOTA_EXCEEDED`], hold no port and no
//! proxy, and converge by themselves once their namespace drops below the share.
//!
//! Which ones wait is a pure function of the objects: the oldest `max` by
//! `metadata.creationTimestamp` are admitted. The API server stamps that time in whole
//! seconds, so a tie is broken first by whether the object's status already records a
//! lease (a session that is serving is never displaced by a newcomer of the same
//! second), then by name. The same objects therefore give the same answer on every pass
//! and after every restart: nothing is reordered, and a serving session never loses its
//! port to a newer one. Lowering the share makes the newest ones wait.
//!
//! Only desired sessions count: a session refused by the target policy (applied before
//! this rule), waiting for another reason, or being deleted uses none of the share.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;

use super::filter::Admission;
use super::policy::namespace_of;
use super::{Rejected, Snapshot};

/// The status reason of a session past its namespace's share.
pub const NAMESPACE_QUOTA_EXCEEDED: &str = "NamespaceQuotaExceeded";

/// At most `max` desired sessions per namespace. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamespaceQuota {
    max: NonZeroUsize,
}

/// How a session sorts within its namespace: older first, then serving first, then name.
/// An object without a creation time (none from a real API server) sorts last.
type Rank = (jiff::Timestamp, bool, String);

impl NamespaceQuota {
    pub fn new(max: NonZeroUsize) -> Self {
        NamespaceQuota { max }
    }

    fn rank(snap: &Snapshot, key: &str) -> Rank {
        let obj = snap.objects.get(key);
        let created = obj.and_then(|o| o.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let serving = obj
            .and_then(|o| o.status.as_ref())
            .is_some_and(|s| s.lease_uid.is_some());
        (
            created.unwrap_or(jiff::Timestamp::MAX),
            !serving,
            key.to_owned(),
        )
    }
}

impl Admission for NamespaceQuota {
    fn apply(&self, snap: &mut Snapshot) {
        let mut by_ns: BTreeMap<&str, Vec<(Rank, &str)>> = BTreeMap::new();
        for key in snap.desired.keys() {
            let Some(ns) = namespace_of(snap, key) else {
                continue;
            };
            by_ns
                .entry(ns)
                .or_default()
                .push((Self::rank(snap, key), key.as_str()));
        }
        let max = self.max.get();
        let mut waiting = Vec::new();
        for (ns, mut keys) in by_ns {
            if keys.len() <= max {
                continue;
            }
            keys.sort();
            let total = keys.len();
            for (i, (rank, key)) in keys.into_iter().enumerate().skip(max) {
                let created = if rank.0 == jiff::Timestamp::MAX {
                    "unknown".to_owned()
                } else {
                    rank.0.to_string()
                };
                waiting.push((
                    key.to_owned(),
                    format!(
                        "namespace {ns} has {total} sessions on this node and may use {max} (--max-sessions-per-namespace); this one (created {created}) is number {} by creation time and waits until an older one goes",
                        i + 1
                    ),
                ));
            }
        }
        for (key, error) in waiting {
            snap.desired.remove(&key);
            snap.waiting.insert(key.clone(), NAMESPACE_QUOTA_EXCEEDED);
            snap.rejected.push(Rejected {
                origin: format!("session {key}"),
                name: key,
                error,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Target, VncSession, VncSessionSpec, VncSessionStatus};
    use crate::pool::PortRange;
    use crate::session::Desired;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use proptest::prelude::*;

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    /// A snapshot of desired sessions `(NS/NAME, created second, serving)`.
    fn snap(sessions: &[(&str, i64, bool)]) -> Snapshot {
        let mut s = Snapshot::default();
        for (key, created, serving) in sessions {
            let (ns, name) = key.split_once('/').unwrap();
            let spec = VncSessionSpec {
                target: Target::tcp("127.0.0.1", 5901),
                ..VncSessionSpec::default()
            };
            let mut o = VncSession::new(name, spec.clone());
            o.metadata.namespace = Some(ns.into());
            o.metadata.creation_timestamp = Some(Time(at(*created)));
            if *serving {
                o.status = Some(VncSessionStatus {
                    lease_uid: Some("u".into()),
                    ..VncSessionStatus::default()
                });
            }
            s.desired.insert(
                (*key).into(),
                Desired::from_spec(name, &spec, PortRange::default()).unwrap(),
            );
            s.objects.insert((*key).into(), o);
        }
        s
    }

    fn quota(max: usize) -> NamespaceQuota {
        NamespaceQuota::new(NonZeroUsize::new(max).unwrap())
    }

    fn desired(s: &Snapshot) -> Vec<&str> {
        s.desired.keys().map(String::as_str).collect()
    }

    #[test]
    fn the_newest_past_the_share_wait_and_other_namespaces_are_untouched() {
        // Names sort against creation order, so a name-ordered rule would fail here.
        let mut s = snap(&[
            ("a/z-old", 1, false),
            ("a/y-mid", 2, false),
            ("a/x-new", 3, false),
            ("b/only", 9, false),
        ]);
        quota(2).apply(&mut s);
        assert_eq!(desired(&s), ["a/y-mid", "a/z-old", "b/only"]);
        assert_eq!(s.waiting["a/x-new"], NAMESPACE_QUOTA_EXCEEDED);
        assert_eq!(s.rejected.len(), 1);
        let msg = &s.rejected[0].error;
        assert!(
            s.rejected[0].name == "a/x-new"
                && msg.contains("namespace a has 3 sessions")
                && msg.contains("may use 2")
                && msg.contains("--max-sessions-per-namespace"),
            "{msg}"
        );
    }

    #[test]
    fn under_the_share_nothing_changes() {
        let mut s = snap(&[("a/one", 1, false), ("a/two", 2, false)]);
        quota(2).apply(&mut s);
        assert_eq!(desired(&s), ["a/one", "a/two"]);
        assert!(s.rejected.is_empty() && s.waiting.is_empty());
    }

    #[test]
    fn a_serving_session_is_never_displaced_by_a_newcomer_of_the_same_second() {
        // "b" leased first; "a" arrives in the same second and sorts before it by name.
        let mut s = snap(&[("t/b", 5, true), ("t/a", 5, false)]);
        quota(1).apply(&mut s);
        assert_eq!(desired(&s), ["t/b"]);
        assert_eq!(s.waiting["t/a"], NAMESPACE_QUOTA_EXCEEDED);
    }

    #[test]
    fn the_waiting_one_converges_when_an_older_one_goes() {
        let all = [("a/1", 1, true), ("a/2", 2, true), ("a/3", 3, false)];
        let mut s = snap(&all);
        quota(2).apply(&mut s);
        assert!(s.waiting.contains_key("a/3"));
        let mut s = snap(&all[1..]);
        quota(2).apply(&mut s);
        assert_eq!(desired(&s), ["a/2", "a/3"]);
        assert!(s.waiting.is_empty());
    }

    #[test]
    fn lowering_the_share_makes_the_newest_wait() {
        let mut s = snap(&[("a/1", 1, true), ("a/2", 2, true), ("a/3", 3, true)]);
        quota(1).apply(&mut s);
        assert_eq!(desired(&s), ["a/1"]);
        assert_eq!(s.waiting.len(), 2);
    }

    proptest! {
        /// For any objects: no namespace gets more than its share, a namespace within it
        /// is untouched, and nobody admitted is newer than anybody waiting in the same
        /// namespace (ties: a serving one is not behind a non-serving one).
        #[test]
        fn the_share_is_kept_and_the_oldest_are_admitted(
            raw in proptest::collection::btree_map((0u8..3, 0u8..30), (0i64..6, any::<bool>()), 0..40),
            max in 1usize..6,
        ) {
            let sessions: Vec<(String, i64, bool)> = raw
                .iter()
                .map(|((ns, n), (t, l))| (format!("ns{ns}/s{n}"), *t, *l))
                .collect();
            let v: Vec<(&str, i64, bool)> =
                sessions.iter().map(|(k, t, l)| (k.as_str(), *t, *l)).collect();
            let before = snap(&v);
            let mut s = before.clone();
            quota(max).apply(&mut s);
            prop_assert_eq!(s.desired.len() + s.rejected.len(), before.desired.len());
            for ns in 0..3 {
                let p = format!("ns{ns}/");
                let all: Vec<&(&str, i64, bool)> = v.iter().filter(|x| x.0.starts_with(&p)).collect();
                let kept: Vec<&&(&str, i64, bool)> = all.iter().filter(|x| s.desired.contains_key(x.0)).collect();
                prop_assert_eq!(kept.len(), all.len().min(max));
                for k in &kept {
                    for w in all.iter().filter(|x| !s.desired.contains_key(x.0)) {
                        prop_assert_eq!(s.waiting[w.0], NAMESPACE_QUOTA_EXCEEDED);
                        prop_assert!(k.1 < w.1 || (k.1 == w.1 && (k.2 || !w.2)), "{:?} admitted before {:?}", k, w);
                    }
                }
            }
        }
    }
}
