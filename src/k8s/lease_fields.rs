//! A lease as the status fields of its VncSession, and back.
//!
//! Pure mapping, shared by the lease store (which writes and reads leases) and the status
//! sink (which writes whole statuses and must carry the lease fields along, because under
//! server-side apply a field the manager leaves out is removed).

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::VncSessionStatus;
use crate::clock::BootInstant;
use crate::lease::{Lease, ProcRef};
use crate::session::Endpoint;
use crate::status::UrlStyle;

/// Writes `lease`'s fields into `status`, or clears them for `None`.
pub fn put_lease_fields(
    status: &mut VncSessionStatus,
    lease: Option<&Lease>,
    node: &str,
    url: &UrlStyle,
) {
    status.port = lease.map(|l| i32::from(l.port));
    // The bare URL: it opens nothing without a ticket, which only a VncConsoleRequest
    // (RBAC-checked by the API server) obtains.
    status.url = lease.map(|l| url.url(l.port, None));
    status.target = lease.map(|l| l.target.to_string());
    // The API stores whole seconds; writing more would make every comparison differ.
    status.allocated_at = lease.map(|l| Time(whole_seconds(l.allocated_at)));
    status.lease_uid = lease.map(|l| l.uid.clone());
    let boot = lease.and_then(|l| l.allocated_boot.as_ref());
    status.allocated_boot_id = boot.map(|b| b.boot_id.clone());
    status.allocated_uptime_ms = boot.map(|b| i64::try_from(b.uptime_ms).unwrap_or(i64::MAX));
    status.node = lease.map(|_| node.to_owned());
    status.pid = lease.and_then(|l| l.process).map(|p| p.pid);
    status.process_start_time = lease
        .and_then(|l| l.process)
        .map(|p| i64::try_from(p.start_time).unwrap_or(i64::MAX));
}

/// `t` without its fraction of a second, as `metav1.Time` carries it.
pub fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// Reads the lease `node` wrote into `status`, if there is a complete one.
pub fn lease_from_status(key: &str, status: &VncSessionStatus, node: &str) -> Option<Lease> {
    if status.node.as_deref() != Some(node) {
        return None;
    }
    let port = u16::try_from(status.port?).ok().filter(|p| *p != 0)?;
    let target: Endpoint = status.target.as_deref()?.parse().ok()?;
    let process = match (status.pid, status.process_start_time) {
        (Some(pid), Some(st)) => Some(ProcRef {
            pid,
            start_time: u64::try_from(st).ok()?,
        }),
        _ => None,
    };
    Some(Lease {
        session: key.to_owned(),
        port,
        target,
        uid: status.lease_uid.clone()?,
        process,
        allocated_at: status.allocated_at.as_ref()?.0,
        allocated_boot: match (&status.allocated_boot_id, status.allocated_uptime_ms) {
            (Some(boot_id), Some(ms)) => Some(BootInstant {
                boot_id: boot_id.clone(),
                uptime_ms: u64::try_from(ms).ok()?,
            }),
            _ => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Phase;

    fn lease(session: &str, port: u16) -> Lease {
        Lease::for_test(session, port)
    }

    fn url() -> UrlStyle {
        UrlStyle {
            public_host: "node1.example".into(),
            web: false,
            tls: false,
        }
    }

    #[test]
    fn a_lease_round_trips_through_the_status() {
        let mut l = lease("ns/vm1", 6100);
        // The API keeps whole seconds of allocatedAt.
        l.allocated_at = whole_seconds(l.allocated_at);
        l.process = Some(ProcRef {
            pid: 42,
            start_time: 12345,
        });
        let mut st = VncSessionStatus::default();
        put_lease_fields(&mut st, Some(&l), "n1", &url());
        assert_eq!(st.port, Some(6100));
        assert_eq!(st.url.as_deref(), Some("ws://node1.example:6100/"));
        assert_eq!(st.node.as_deref(), Some("n1"));
        assert_eq!(st.target.as_deref(), Some("127.0.0.1:5901"));
        assert_eq!(st.process_start_time, Some(12345));
        assert_eq!(lease_from_status("ns/vm1", &st, "n1"), Some(l.clone()));
        // Another node's lease is not ours to adopt.
        assert_eq!(lease_from_status("ns/vm1", &st, "n2"), None);
        // Without a process the lease still stands (the proxy is found by its uid).
        st.pid = None;
        let back = lease_from_status("ns/vm1", &st, "n1").unwrap();
        assert_eq!(back.process, None);
        assert_eq!(back.uid, l.uid);
    }

    #[test]
    fn written_times_are_whole_seconds_like_the_api_stores_them() {
        let l = lease("ns/vm1", 6100);
        let mut st = VncSessionStatus::default();
        put_lease_fields(&mut st, Some(&l), "n1", &url());
        let json = serde_json::to_value(&st).unwrap();
        let back: VncSessionStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, st, "a status survives the API's round trip unchanged");
    }

    #[test]
    fn clearing_removes_every_lease_field() {
        let mut st = VncSessionStatus::default();
        put_lease_fields(&mut st, Some(&lease("ns/vm1", 6100)), "n1", &url());
        st.phase = Some(Phase::Ready);
        put_lease_fields(&mut st, None, "n1", &url());
        assert_eq!(
            st,
            VncSessionStatus {
                phase: Some(Phase::Ready),
                ..VncSessionStatus::default()
            }
        );
    }

    #[test]
    fn incomplete_statuses_hold_no_lease() {
        let mut st = VncSessionStatus::default();
        put_lease_fields(&mut st, Some(&lease("ns/vm1", 6100)), "n1", &url());
        for broken in [
            VncSessionStatus {
                port: Some(70000),
                ..st.clone()
            },
            VncSessionStatus {
                lease_uid: None,
                ..st.clone()
            },
            VncSessionStatus {
                target: Some("nonsense".into()),
                ..st.clone()
            },
            VncSessionStatus {
                allocated_at: None,
                ..st.clone()
            },
        ] {
            assert_eq!(
                lease_from_status("ns/vm1", &broken, "n1"),
                None,
                "{broken:?}"
            );
        }
    }
}
