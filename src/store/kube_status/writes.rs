//! Which API writes a commit needs: pure planning, apart from the I/O that performs them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{ExpiredStatus, VncSessionStatus};
use crate::k8s::lease_fields::whole_seconds;
use crate::lease::{Expiry, Lease};
use crate::store::LeaseChange;

/// What a write does to a session's expiry record (`status.expired`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ExpiryOp {
    #[default]
    Keep,
    Set(Expiry),
    Clear,
}

impl ExpiryOp {
    pub(super) fn apply(&self, status: &mut VncSessionStatus) {
        match self {
            ExpiryOp::Keep => {}
            ExpiryOp::Set(e) => {
                status.expired = Some(ExpiredStatus {
                    generation: e.generation,
                    reason: e.reason.clone(),
                    message: e.message.clone(),
                    at: Time(whole_seconds(e.at)),
                });
            }
            ExpiryOp::Clear => status.expired = None,
        }
    }
}

/// One API write a commit needs: every change of one session in one pass goes into a
/// single write, because two writes of one object in flight at once would conflict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Persist a new or changed lease.
    Lease {
        lease: Lease,
        /// The lease is new (not a retarget of an existing one).
        new: bool,
        expiry: ExpiryOp,
    },
    /// Clear a lease.
    Release { lease: Lease, expiry: ExpiryOp },
    /// Only record or forget an expiry.
    Expiry { key: String, expiry: ExpiryOp },
}

impl Write {
    pub(super) fn key(&self) -> &str {
        match self {
            Write::Lease { lease, .. } | Write::Release { lease, .. } => &lease.session,
            Write::Expiry { key, .. } => key,
        }
    }

    fn expiry_mut(&mut self) -> &mut ExpiryOp {
        match self {
            Write::Lease { expiry, .. }
            | Write::Release { expiry, .. }
            | Write::Expiry { expiry, .. } => expiry,
        }
    }
}

/// Which changes need a write now. A change that only records the proxy process of an
/// unchanged lease is deferred to the status sink (see the module docs). Returns the
/// writes with the indices of the changes each one persists.
pub fn plan_writes(
    current: &BTreeMap<String, Lease>,
    changes: &[LeaseChange],
) -> Vec<(Vec<usize>, Write)> {
    let mut out: Vec<(Vec<usize>, Write)> = Vec::new();
    let mut slot: BTreeMap<String, usize> = BTreeMap::new();
    for (i, change) in changes.iter().enumerate() {
        let (key, write) = match change {
            LeaseChange::Put(lease) => {
                let prev = current.get(&lease.session);
                let record_only = prev.is_some_and(|p| {
                    p.uid == lease.uid
                        && p.port == lease.port
                        && p.target == lease.target
                        && p.allocated_at == lease.allocated_at
                });
                if record_only {
                    continue;
                }
                let write = Write::Lease {
                    lease: lease.clone(),
                    new: prev.is_none(),
                    expiry: ExpiryOp::Keep,
                };
                (&lease.session, write)
            }
            LeaseChange::Remove(session) => {
                let Some(lease) = current.get(session) else {
                    continue;
                };
                let write = Write::Release {
                    lease: lease.clone(),
                    expiry: ExpiryOp::Keep,
                };
                (session, write)
            }
            LeaseChange::Expire(session, e) => {
                let op = ExpiryOp::Set(e.clone());
                let write = Write::Expiry {
                    key: session.clone(),
                    expiry: op,
                };
                (session, write)
            }
            LeaseChange::Unexpire(session) => {
                let write = Write::Expiry {
                    key: session.clone(),
                    expiry: ExpiryOp::Clear,
                };
                (session, write)
            }
        };
        match slot.get(key) {
            Some(&at) => {
                let (indices, merged) = &mut out[at];
                indices.push(i);
                match write {
                    Write::Expiry { expiry, .. } => *merged.expiry_mut() = expiry,
                    mut other => {
                        *other.expiry_mut() = std::mem::take(merged.expiry_mut());
                        *merged = other;
                    }
                }
            }
            None => {
                slot.insert(key.clone(), out.len());
                out.push((vec![i], write));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::ProcRef;
    use crate::session::Endpoint;
    use jiff::Timestamp;

    fn lease(session: &str, port: u16) -> Lease {
        Lease::for_test(session, port)
    }

    #[test]
    fn recording_a_pid_is_deferred_but_lease_changes_are_written() {
        let old = lease("ns/a", 6100);
        let current = BTreeMap::from([("ns/a".to_owned(), old.clone())]);
        let mut recorded = old.clone();
        recorded.process = Some(ProcRef {
            pid: 7,
            start_time: 1,
        });
        let mut retargeted = old.clone();
        retargeted.target = Endpoint::Unix { path: "/s".into() };
        let fresh = lease("ns/b", 6101);
        let changes = vec![
            LeaseChange::Put(recorded),
            LeaseChange::Put(fresh.clone()),
            LeaseChange::Remove("ns/gone".into()),
        ];
        let w = plan_writes(&current, &changes);
        assert_eq!(
            w,
            vec![(
                vec![1],
                Write::Lease {
                    lease: fresh,
                    new: true,
                    expiry: ExpiryOp::Keep,
                }
            )]
        );
        // A retarget is a write of the changed lease, not a new one.
        let w = plan_writes(&current, &[LeaseChange::Put(retargeted.clone())]);
        assert_eq!(
            w,
            vec![(
                vec![0],
                Write::Lease {
                    lease: retargeted,
                    new: false,
                    expiry: ExpiryOp::Keep,
                }
            )]
        );
    }

    #[test]
    fn changes_of_one_session_become_one_write() {
        let old = lease("ns/a", 6100);
        let current = BTreeMap::from([("ns/a".to_owned(), old.clone())]);
        let expiry = Expiry {
            generation: 2,
            reason: "IdleTimeout".into(),
            message: "no client for 60 s".into(),
            at: Timestamp::now(),
        };
        // Expired with no proxy left: expiry and release go in the same write.
        let w = plan_writes(
            &current,
            &[
                LeaseChange::Expire("ns/a".into(), expiry.clone()),
                LeaseChange::Remove("ns/a".into()),
            ],
        );
        assert_eq!(
            w,
            vec![(
                vec![0, 1],
                Write::Release {
                    lease: old,
                    expiry: ExpiryOp::Set(expiry),
                }
            )]
        );
        // A changed spec: the expiry is forgotten in the write of the new lease.
        let fresh = lease("ns/b", 6101);
        let w = plan_writes(
            &current,
            &[
                LeaseChange::Unexpire("ns/b".into()),
                LeaseChange::Put(fresh.clone()),
                LeaseChange::Unexpire("ns/gone".into()),
            ],
        );
        assert_eq!(
            w,
            vec![
                (
                    vec![0, 1],
                    Write::Lease {
                        lease: fresh,
                        new: true,
                        expiry: ExpiryOp::Clear,
                    }
                ),
                (
                    vec![2],
                    Write::Expiry {
                        key: "ns/gone".into(),
                        expiry: ExpiryOp::Clear,
                    }
                ),
            ]
        );
    }
}
