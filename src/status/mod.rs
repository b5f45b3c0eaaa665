//! Turning plan reports and leases into VncSession statuses, and publishing them.
//!
//! Statuses are built only from leases the store has already persisted, so vncd never
//! reports a port or URL that a crash could take back.

pub mod file;
pub mod kube;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{Phase, Target, VncSession, VncSessionSpec, VncSessionStatus};
use crate::lease::Lease;
use crate::reconcile::Report;
use crate::session::Endpoint;
use crate::source::Snapshot;

/// The reason given to sessions whose manifest was refused.
pub const INVALID: &str = "InvalidManifest";
/// Annotation naming where a session came from.
pub const SOURCE_ANNOTATION: &str = "vncd.io/source";

/// How console URLs are written.
#[derive(Clone, Debug)]
pub struct UrlStyle {
    pub public_host: String,
    /// A noVNC page is served, so the URL opens it.
    pub web: bool,
    pub tls: bool,
}

impl UrlStyle {
    /// The console URL. With a token, the noVNC page is told to connect to
    /// `websockify?token=...` (both backends accept that path), and a bare websocket URL
    /// carries `?token=...`.
    pub fn url(&self, port: u16, token: Option<&str>) -> String {
        let host = match self.public_host.parse::<IpAddr>() {
            Ok(IpAddr::V6(a)) => format!("[{a}]"),
            _ => self.public_host.clone(),
        };
        let (http, ws) = if self.tls {
            ("https", "wss")
        } else {
            ("http", "ws")
        };
        match (self.web, token) {
            (true, Some(t)) => {
                format!("{http}://{host}:{port}/vnc.html?path=websockify%3Ftoken%3D{t}")
            }
            (true, None) => format!("{http}://{host}:{port}/vnc.html"),
            (false, Some(t)) => format!("{ws}://{host}:{port}/?token={t}"),
            (false, None) => format!("{ws}://{host}:{port}/"),
        }
    }
}

/// Builds statuses, remembering when each Ready condition last changed.
#[derive(Debug)]
pub struct StatusBuilder {
    url: UrlStyle,
    transitions: BTreeMap<String, (bool, Time)>,
}

fn spec_of(target: &Endpoint) -> VncSessionSpec {
    let target = match target {
        Endpoint::Tcp { host, port } => Target {
            host: Some(host.clone()),
            port: Some(i32::from(*port)),
            unix_socket: None,
            libvirt_domain: None,
        },
        Endpoint::Unix { path } => Target {
            unix_socket: Some(path.clone()),
            ..Target::default()
        },
    };
    VncSessionSpec {
        target,
        port: None,
        idle_timeout_seconds: None,
        max_lifetime_seconds: None,
        node_name: None,
    }
}

impl StatusBuilder {
    pub fn new(url: UrlStyle) -> Self {
        StatusBuilder {
            url,
            transitions: BTreeMap::new(),
        }
    }

    fn condition(
        &mut self,
        name: &str,
        ready: bool,
        reason: &str,
        message: &str,
        gen_: Option<i64>,
    ) -> Condition {
        let entry = self
            .transitions
            .entry(name.to_owned())
            .or_insert_with(|| (ready, Time(Timestamp::now())));
        if entry.0 != ready {
            *entry = (ready, Time(Timestamp::now()));
        }
        Condition {
            type_: "Ready".into(),
            status: if ready { "True" } else { "False" }.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: gen_,
            last_transition_time: entry.1.clone(),
        }
    }

    /// Every session worth showing: desired ones, terminating ones and rejected ones.
    pub fn build(
        &mut self,
        snapshot: &Snapshot,
        reports: &BTreeMap<String, Report>,
        leases: &BTreeMap<String, Lease>,
    ) -> Vec<VncSession> {
        let mut items = Vec::new();
        let mut warnings = snapshot.warnings.clone();
        for r in &snapshot.rejected {
            if snapshot.desired.contains_key(&r.name) {
                let w = warnings.entry(r.name.clone()).or_default();
                if !w.is_empty() {
                    w.push_str("; ");
                }
                w.push_str(&r.error);
            }
        }
        for (name, report) in reports {
            let lease = leases.get(name);
            let (mut obj, generation) =
                match (snapshot.objects.get(name), snapshot.desired.get(name)) {
                    (Some(o), Some(d)) => (o.clone(), Some(d.generation)),
                    _ => {
                        let target = lease.map(|l| l.target.clone()).unwrap_or(Endpoint::Unix {
                            path: String::new(),
                        });
                        (VncSession::new(name, spec_of(&target)), None)
                    }
                };
            let mut message = report.message.clone();
            if let Some(w) = warnings.get(name) {
                message = format!("{message} (warning: {w})");
            }
            let ready = report.phase == Phase::Ready;
            let cond = self.condition(name, ready, report.reason, &message, generation);
            obj.status = Some(VncSessionStatus {
                phase: Some(report.phase),
                port: lease.map(|l| i32::from(l.port)),
                url: lease.map(|l| self.url.url(l.port, l.token.as_deref())),
                pid: lease.and_then(|l| l.process).map(|p| p.pid),
                target: lease.map(|l| l.target.to_string()),
                reason: Some(report.reason.to_owned()),
                message: Some(message),
                allocated_at: lease.map(|l| Time(l.allocated_at)),
                observed_generation: generation,
                conditions: vec![cond],
                // Lease identity fields are for stores that keep leases in the status.
                ..VncSessionStatus::default()
            });
            items.push(obj);
        }
        for r in &snapshot.rejected {
            if snapshot.desired.contains_key(&r.name) || reports.contains_key(&r.name) {
                continue;
            }
            let mut obj = VncSession::new(
                &r.name,
                VncSessionSpec {
                    target: Target::default(),
                    port: None,
                    idle_timeout_seconds: None,
                    max_lifetime_seconds: None,
                    node_name: None,
                },
            );
            obj.metadata.annotations = Some(BTreeMap::from([(
                SOURCE_ANNOTATION.to_owned(),
                r.origin.clone(),
            )]));
            let (phase, reason) = match snapshot.waiting.get(&r.name) {
                Some(reason) => (Phase::Pending, *reason),
                None => (Phase::Failed, INVALID),
            };
            let cond = self.condition(&r.name, false, reason, &r.error, None);
            obj.status = Some(VncSessionStatus {
                phase: Some(phase),
                reason: Some(reason.into()),
                message: Some(r.error.clone()),
                // A protected name keeps its lease: show it.
                port: leases.get(&r.name).map(|l| i32::from(l.port)),
                pid: leases.get(&r.name).and_then(|l| l.process).map(|p| p.pid),
                conditions: vec![cond],
                ..VncSessionStatus::default()
            });
            items.push(obj);
        }
        let live: std::collections::BTreeSet<String> = items
            .iter()
            .filter_map(|i| i.metadata.name.clone())
            .collect();
        self.transitions.retain(|k, _| live.contains(k));
        items.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        items
    }
}

/// Where statuses go: a file standalone, object statuses under Kubernetes.
pub trait StatusSink: Send {
    fn publish(&mut self, items: &[VncSession]) -> impl Future<Output = ()> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_web_tls_and_token_settings() {
        let mut u = UrlStyle {
            public_host: "vnc.example".into(),
            web: false,
            tls: false,
        };
        assert_eq!(u.url(6100, None), "ws://vnc.example:6100/");
        assert_eq!(u.url(6100, Some("ab")), "ws://vnc.example:6100/?token=ab");
        u.web = true;
        assert_eq!(u.url(6100, None), "http://vnc.example:6100/vnc.html");
        assert_eq!(
            u.url(6100, Some("ab")),
            "http://vnc.example:6100/vnc.html?path=websockify%3Ftoken%3Dab"
        );
        u.tls = true;
        assert_eq!(u.url(6100, None), "https://vnc.example:6100/vnc.html");
        u.web = false;
        assert_eq!(u.url(6100, Some("ab")), "wss://vnc.example:6100/?token=ab");
        u.public_host = "::1".into();
        assert_eq!(u.url(1, None), "wss://[::1]:1/");
    }
}
