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
use crate::pool::PortRange;
use crate::reconcile::Report;
use crate::session::Endpoint;
use crate::source::{Rejected, Snapshot};

/// The reason given to sessions whose manifest was refused.
pub const INVALID: &str = "InvalidManifest";
/// Annotation naming where a session came from.
pub const SOURCE_ANNOTATION: &str = "vncd.io/source";

/// How console URLs are written.
#[derive(Clone, Debug, Default)]
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
        Endpoint::Tcp { host, port } => Target::tcp(host, *port),
        Endpoint::Unix { path } => Target::unix(path),
    };
    VncSessionSpec {
        target,
        ..VncSessionSpec::default()
    }
}

/// Warnings per desired session: the source's, plus the errors of rejected files that
/// claim a name a valid manifest serves (the valid one keeps serving; the status says why
/// the other was ignored).
fn warnings_of(snapshot: &Snapshot) -> BTreeMap<String, String> {
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
    warnings
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
        let warnings = warnings_of(snapshot);
        let mut items: Vec<VncSession> = reports
            .iter()
            .map(|(name, report)| {
                self.reported(snapshot, name, report, leases.get(name), warnings.get(name))
            })
            .collect();
        for r in &snapshot.rejected {
            if snapshot.desired.contains_key(&r.name) || reports.contains_key(&r.name) {
                continue;
            }
            items.push(self.rejected(snapshot, r, leases.get(&r.name)));
        }
        let live: std::collections::BTreeSet<String> = items
            .iter()
            .filter_map(|i| i.metadata.name.clone())
            .collect();
        // Keys are a session's name, or `NAME\0TYPE` for its other conditions.
        self.transitions
            .retain(|k, _| live.contains(k.split('\0').next().unwrap_or(k)));
        items.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        items
    }

    /// The object of a session the plan reported on (desired or terminating).
    fn reported(
        &mut self,
        snapshot: &Snapshot,
        name: &str,
        report: &Report,
        lease: Option<&Lease>,
        warning: Option<&String>,
    ) -> VncSession {
        let (mut obj, generation) = match (snapshot.objects.get(name), snapshot.desired.get(name)) {
            (Some(o), Some(d)) => (o.clone(), Some(d.generation)),
            _ => {
                let target = lease.map(|l| l.target.clone()).unwrap_or(Endpoint::Unix {
                    path: String::new(),
                });
                (VncSession::new(name, spec_of(&target)), None)
            }
        };
        let mut message = report.message.clone();
        if let Some(w) = warning {
            message = format!("{message} (warning: {w})");
        }
        let ready = report.phase == Phase::Ready;
        let cond = self.condition(name, ready, report.reason.as_str(), &message, generation);
        let mut conditions = vec![cond];
        if let Some(target) = &report.target {
            // What the data plane's probe says of the VNC server: Ready needs it reachable.
            let reachable = target.is_none();
            let mut c = self.condition(
                &format!("{name}\0TargetReachable"),
                reachable,
                if reachable {
                    "TargetReachable"
                } else {
                    "TargetUnreachable"
                },
                target
                    .as_deref()
                    .unwrap_or("the VNC server answers with its RFB banner"),
                generation,
            );
            c.type_ = "TargetReachable".into();
            conditions.push(c);
        }
        obj.status = Some(VncSessionStatus {
            phase: Some(report.phase),
            port: lease.map(|l| i32::from(l.port)),
            url: lease.map(|l| self.url.url(l.port, None)),
            pid: lease.and_then(|l| l.process).map(|p| p.pid),
            target: lease.map(|l| l.target.to_string()),
            reason: Some(report.reason.as_str().to_owned()),
            message: Some(message),
            allocated_at: lease.map(|l| Time(l.allocated_at)),
            observed_generation: generation,
            conditions,
            // Which lease this is: not a secret (tickets need the master key too), and it
            // tells a reader whether a console URL minted earlier is still for this lease.
            lease_uid: lease.map(|l| l.uid.clone()),
            // The other lease identity fields are for stores that keep leases in the status.
            ..VncSessionStatus::default()
        });
        obj
    }

    /// The object of a rejected manifest or domain: Failed (invalid), or Pending while it
    /// waits on something outside (a libvirt domain that is not running yet).
    fn rejected(&mut self, snapshot: &Snapshot, r: &Rejected, lease: Option<&Lease>) -> VncSession {
        let mut obj = VncSession::new(&r.name, VncSessionSpec::default());
        obj.metadata.annotations = Some(BTreeMap::from([(
            SOURCE_ANNOTATION.to_owned(),
            r.origin.clone(),
        )]));
        let (phase, reason) = match (snapshot.waiting.get(&r.name), snapshot.refused.get(&r.name)) {
            (Some(reason), _) => (Phase::Pending, *reason),
            (None, Some(reason)) => (Phase::Failed, *reason),
            (None, None) => (Phase::Failed, INVALID),
        };
        let cond = self.condition(&r.name, false, reason, &r.error, None);
        obj.status = Some(VncSessionStatus {
            phase: Some(phase),
            reason: Some(reason.into()),
            message: Some(r.error.clone()),
            // A protected name keeps its lease: show it.
            port: lease.map(|l| i32::from(l.port)),
            pid: lease.and_then(|l| l.process).map(|p| p.pid),
            conditions: vec![cond],
            ..VncSessionStatus::default()
        });
        obj
    }
}

/// The seed's `get_system_status()`: what `vncd status --json` prints and `GET /v1/status`
/// serves. Built from leases and an observation of the proxies, by both.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SystemStatus {
    pub total_ports: usize,
    /// Leases whose port is inside the pool.
    pub allocated_ports: usize,
    /// Leases whose port lies outside the pool (an earlier `--port-range`): they still
    /// serve, and move into the pool once no console is open on them.
    pub outside_pool: usize,
    /// Leases with a live proxy.
    pub active_processes: usize,
    /// Leases without a live proxy.
    pub dead_proxies: usize,
    /// Processes with this vncd's marker that match no lease.
    pub orphan_processes: usize,
    pub controller_running: bool,
}

impl SystemStatus {
    pub fn new(
        range: PortRange,
        leases: &BTreeMap<String, Lease>,
        live_proxies: usize,
        orphans: usize,
        controller_running: bool,
    ) -> Self {
        SystemStatus {
            total_ports: range.len(),
            allocated_ports: leases.values().filter(|l| range.contains(l.port)).count(),
            outside_pool: leases.values().filter(|l| !range.contains(l.port)).count(),
            active_processes: live_proxies,
            dead_proxies: leases.len().saturating_sub(live_proxies),
            orphan_processes: orphans,
            controller_running,
        }
    }

    pub fn free_ports(&self) -> usize {
        self.total_ports.saturating_sub(self.allocated_ports)
    }

    /// Percent of the pool leased, to one decimal.
    pub fn utilization_percent(&self) -> f64 {
        if self.total_ports == 0 {
            return 0.0;
        }
        ((self.allocated_ports as f64) * 1000.0 / (self.total_ports as f64)).round() / 10.0
    }

    /// `healthy`, or `warning` with a dead proxy, an orphan or the pool 90 % leased.
    pub fn health(&self) -> &'static str {
        if self.dead_proxies == 0 && self.orphan_processes == 0 && self.utilization_percent() < 90.0
        {
            "healthy"
        } else {
            "warning"
        }
    }

    /// The seed's JSON shape, plus vncd's three extra fields.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "port_pool": {
                "total_ports": self.total_ports,
                "allocated_ports": self.allocated_ports,
                "free_ports": self.free_ports(),
                "utilization_percent": self.utilization_percent(),
                "outside_pool_leases": self.outside_pool,
            },
            "active_processes": self.active_processes,
            "dead_proxies": self.dead_proxies,
            "orphan_processes": self.orphan_processes,
            "controller_running": self.controller_running,
            "system_health": self.health(),
        })
    }
}

/// One leased session as the seed's `list_active_sessions()` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveSession {
    pub ws_port: u16,
    /// The VNC server's TCP port; `None` for a unix socket target.
    pub vnc_port: Option<u16>,
    pub pid: Option<i32>,
}

impl ActiveSession {
    pub fn of(lease: &Lease) -> Self {
        ActiveSession {
            ws_port: lease.port,
            vnc_port: match &lease.target {
                Endpoint::Tcp { port, .. } => Some(*port),
                Endpoint::Unix { .. } => None,
            },
            pid: lease.process.map(|p| p.pid),
        }
    }
}

/// The seed's `{name: {url, ws_port, vnc_port, pid}}` map. URLs carry no token: this map
/// is served over plain HTTP (`GET /v1/sessions`), and a console URL with its token is a
/// key to that console (`vncd get`, mode 0600, has it).
pub fn seed_sessions(
    sessions: &BTreeMap<String, ActiveSession>,
    url: &UrlStyle,
) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = sessions
        .iter()
        .map(|(name, s)| {
            (
                name.clone(),
                serde_json::json!({
                    "url": url.url(s.ws_port, None),
                    "ws_port": s.ws_port,
                    "vnc_port": s.vnc_port,
                    "pid": s.pid,
                }),
            )
        })
        .collect();
    serde_json::Value::Object(map)
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

    fn lease(name: &str, port: u16, target: Endpoint, pid: Option<i32>) -> Lease {
        let mut l = Lease::new(name, port, target, Timestamp::now());
        l.process = pid.map(|pid| crate::lease::ProcRef { pid, start_time: 1 });
        l
    }

    #[test]
    fn system_status_has_the_seed_shape() {
        let range = PortRange::new(6100, 6109).unwrap();
        let tcp = Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: 5901,
        };
        let leases = BTreeMap::from([
            ("a".to_owned(), lease("a", 6100, tcp.clone(), Some(10))),
            ("b".to_owned(), lease("b", 6101, tcp.clone(), None)),
            // Outside the pool (the range shrank): not an allocated pool port.
            ("c".to_owned(), lease("c", 7000, tcp, Some(12))),
        ]);
        let s = SystemStatus::new(range, &leases, 2, 1, true);
        assert_eq!(
            s.to_json(),
            serde_json::json!({
                "port_pool": {
                    "total_ports": 10,
                    "allocated_ports": 2,
                    "free_ports": 8,
                    "utilization_percent": 20.0,
                    "outside_pool_leases": 1,
                },
                "active_processes": 2,
                "dead_proxies": 1,
                "orphan_processes": 1,
                "controller_running": true,
                "system_health": "warning",
            })
        );
        let empty = SystemStatus::new(range, &BTreeMap::new(), 0, 0, false);
        assert_eq!(empty.health(), "healthy");
        assert_eq!(empty.to_json()["port_pool"]["free_ports"], 10);
    }

    #[test]
    fn seed_sessions_map_names_to_url_ports_and_pid_without_tokens() {
        let url = UrlStyle {
            public_host: "vnc.example".into(),
            web: false,
            tls: false,
        };
        let tcp = lease(
            "vm1",
            6100,
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 5901,
            },
            Some(42),
        );
        let unix = lease(
            "vm2",
            6101,
            Endpoint::Unix {
                path: "/run/vm2.sock".into(),
            },
            None,
        );
        let sessions = BTreeMap::from([
            ("vm1".to_owned(), ActiveSession::of(&tcp)),
            ("vm2".to_owned(), ActiveSession::of(&unix)),
        ]);
        let v = seed_sessions(&sessions, &url);
        assert_eq!(
            v,
            serde_json::json!({
                "vm1": {"url": "ws://vnc.example:6100/", "ws_port": 6100, "vnc_port": 5901, "pid": 42},
                "vm2": {"url": "ws://vnc.example:6101/", "ws_port": 6101, "vnc_port": null, "pid": null},
            })
        );
        assert!(!v.to_string().contains("token"));
    }
}
