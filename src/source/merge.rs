//! Combining the manifest source with libvirt's running domains.
//!
//! [`merge`] is pure: a manifest snapshot and a [`DomainTable`] in, one snapshot out.
//! Rules:
//! - a manifest with `spec.target.libvirtDomain` is served at the domain's live VNC
//!   address while the domain runs; otherwise it is reported Pending with reason
//!   `DomainNotRunning` (or why its console is unusable) and holds no port;
//! - every other running domain with VNC graphics gets a session of its own, named by
//!   [`session_name`]; a domain that a manifest names gets none (the manifest serves it);
//! - a name defined by both a manifest and a domain is a conflict: the manifest wins,
//!   the conflict is logged and shown in that session's status;
//! - a name two or more domains map to (a hash collision of [`session_name`], or a
//!   domain literally named like another's cleaned name) serves none of them: each is
//!   refused with reason `NameCollision` and a message naming all of them. Bounded
//!   DNS-1123 names cannot be collision-free, and letting the first domain win would let
//!   a domain that sorts first take over another's console;
//! - each session of a domain carries the domain's UUID as its instance
//!   ([`Desired::instance`]): a domain recreated under the same name gets a new lease;
//! - the ports the domains' own graphics servers hold become `reserved_ports`.
//!
//! [`Merged`] wraps any [`Source`] with an optional [`LibvirtSource`]. If libvirt cannot
//! answer, the whole snapshot is an error, so the controller changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use tracing::warn;

use super::libvirt::graphics::GraphicsError;
use super::libvirt::name::session_name;
use super::libvirt::{DomainTable, LibvirtSource};
use super::{Rejected, Snapshot, Source, SourceError};
use crate::api::{Target, VncSession, VncSessionSpec};
use crate::session::{Desired, SpecError, spec_generation};
use crate::status::SOURCE_ANNOTATION;

/// Status reasons of sessions that wait on libvirt.
pub mod reason {
    /// The manifest's domain is not running (or not defined).
    pub const DOMAIN_NOT_RUNNING: &str = "DomainNotRunning";
    /// The domain runs, but libvirt has not assigned its VNC port yet.
    pub const DOMAIN_STARTING: &str = "DomainStarting";
    /// The domain runs without a VNC console vncd can reach.
    pub const NO_VNC_CONSOLE: &str = "NoVncConsole";
    /// Two or more domains map to this session name; none of them is served.
    pub const NAME_COLLISION: &str = "NameCollision";
}

/// Annotation naming the libvirt domain behind a session.
pub const DOMAIN_ANNOTATION: &str = "vncd.io/libvirt-domain";

fn console_reason(e: &GraphicsError) -> &'static str {
    if e.is_transient() {
        reason::DOMAIN_STARTING
    } else {
        reason::NO_VNC_CONSOLE
    }
}

/// Combines `snap` (from manifests) with `table` (from libvirt, `None` without
/// `--libvirt`). Returns the snapshot and the name conflicts found. See the module docs.
pub fn merge(mut snap: Snapshot, table: Option<&DomainTable>) -> (Snapshot, Vec<String>) {
    let claimed = resolve_manifests(&mut snap, table);
    let Some(table) = table else {
        return (snap, Vec::new());
    };
    snap.reserved_ports.extend(table.ports.iter().copied());
    let conflicts = add_domains(&mut snap, table, &claimed);
    (snap, conflicts)
}

/// Serves each manifest naming a libvirt domain at the domain's live console, or rejects
/// it with why it waits. Returns the domains the manifests claim.
fn resolve_manifests(snap: &mut Snapshot, table: Option<&DomainTable>) -> BTreeSet<String> {
    let unresolved = std::mem::take(&mut snap.unresolved);
    let claimed: BTreeSet<String> = unresolved.values().map(|r| r.domain.clone()).collect();
    for (name, r) in unresolved {
        let origin = format!("manifest {name} (libvirtDomain {:?})", r.domain);
        let (error, why) = match table.map(|t| t.consoles.get(&r.domain)) {
            None => (SpecError::NeedsLibvirt(r.domain.clone()).to_string(), None),
            Some(Some(Ok(console))) => {
                let uuid = table.and_then(|t| t.uuids.get(&r.domain)).cloned();
                snap.desired
                    .insert(name.clone(), r.resolve(console.endpoint.clone(), uuid));
                continue;
            }
            Some(Some(Err(e))) => (
                format!("spec.target.libvirtDomain: {e}"),
                Some(console_reason(e)),
            ),
            Some(None) => (
                format!(
                    "spec.target.libvirtDomain: domain {:?} is not running; the console is served once it runs",
                    r.domain
                ),
                Some(reason::DOMAIN_NOT_RUNNING),
            ),
        };
        snap.objects.remove(&name);
        if let Some(why) = why {
            snap.waiting.insert(name.clone(), why);
        }
        snap.rejected.push(Rejected {
            name,
            origin,
            error,
        });
    }
    claimed
}

/// Gives every running domain with VNC graphics that no manifest claims a session of its
/// own. Returns the name conflicts (the manifest, or the first domain, keeps the name).
fn add_domains(
    snap: &mut Snapshot,
    table: &DomainTable,
    claimed: &BTreeSet<String>,
) -> Vec<String> {
    let manifest_names: BTreeSet<String> = snap
        .desired
        .keys()
        .chain(snap.protected.iter())
        .chain(snap.rejected.iter().map(|r| &r.name))
        .cloned()
        .collect();
    // Every session name the unclaimed domains map to, with all the domains that do.
    let mut by_name: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    for (domain, console) in &table.consoles {
        if claimed.contains(domain) || matches!(console, Err(GraphicsError::NoVnc { .. })) {
            continue;
        }
        by_name
            .entry(session_name(domain))
            .or_default()
            .push(domain);
    }
    let mut conflicts = Vec::new();
    for (name, domains) in by_name {
        if manifest_names.contains(&name) {
            for domain in domains {
                let msg = format!(
                    "libvirt domain {domain:?} also maps to session name {name:?}; the manifest keeps it and this domain gets no console of its own"
                );
                let w = snap.warnings.entry(name.clone()).or_default();
                if !w.is_empty() {
                    w.push_str("; ");
                }
                w.push_str(&msg);
                conflicts.push(msg);
            }
            continue;
        }
        if let [_, _, ..] = domains.as_slice() {
            refuse_collision(snap, &name, &domains, &mut conflicts);
            continue;
        }
        let domain = domains[0];
        let console = &table.consoles[domain];
        let origin = format!("libvirt domain {domain:?}");
        match console {
            Ok(c) => {
                let uuid = table.uuids.get(domain).cloned();
                let (desired, obj) =
                    domain_session(&name, domain, c.endpoint.clone(), uuid, origin);
                snap.desired.insert(name.clone(), desired);
                snap.objects.insert(name, obj);
            }
            Err(e) => {
                snap.waiting.insert(name.clone(), console_reason(e));
                snap.rejected.push(Rejected {
                    name,
                    origin,
                    error: e.to_string(),
                });
            }
        }
        if console.as_ref().is_err_and(GraphicsError::is_transient) {
            snap.unsettled = true;
        }
    }
    conflicts
}

/// Two or more domains map to `name`: refuse it (reason `NameCollision`) with a message
/// naming every one of them, so none of them can take over another's console.
fn refuse_collision(
    snap: &mut Snapshot,
    name: &str,
    domains: &[&String],
    conflicts: &mut Vec<String>,
) {
    let list = domains
        .iter()
        .map(|d| format!("{d:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let error = format!(
        "libvirt domains {list} all map to session name {name:?}; none of them is served \
         (rename one of them, or give it a manifest with spec.target.libvirtDomain and a name of its own)"
    );
    conflicts.push(error.clone());
    snap.refused.insert(name.to_owned(), reason::NAME_COLLISION);
    snap.rejected.push(Rejected {
        name: name.to_owned(),
        origin: format!("libvirt domains {list}"),
        error,
    });
}

/// The session of a domain no manifest names: desired at its console, and an object for
/// `vncd get` that says where it came from.
fn domain_session(
    name: &str,
    domain: &str,
    endpoint: crate::session::Endpoint,
    uuid: Option<String>,
    origin: String,
) -> (Desired, VncSession) {
    let spec = VncSessionSpec {
        target: Target {
            libvirt_domain: Some(domain.to_owned()),
            ..Target::default()
        },
        ..VncSessionSpec::default()
    };
    let desired = Desired {
        name: name.to_owned(),
        target: endpoint,
        requested_port: None,
        generation: spec_generation(&spec),
        idle_timeout_ms: None,
        max_lifetime_ms: None,
        instance: uuid,
    };
    let mut obj = VncSession::new(name, spec);
    obj.metadata.annotations = Some(BTreeMap::from([
        (SOURCE_ANNOTATION.to_owned(), origin),
        (DOMAIN_ANNOTATION.to_owned(), domain.to_owned()),
    ]));
    (desired, obj)
}

/// A source plus, optionally, libvirt's running domains. See the module docs.
#[derive(Debug)]
pub struct Merged<S> {
    inner: S,
    libvirt: Option<LibvirtSource>,
    conflicts: BTreeSet<String>,
}

impl<S: Source> Merged<S> {
    pub fn new(inner: S, libvirt: Option<LibvirtSource>) -> Self {
        Merged {
            inner,
            libvirt,
            conflicts: BTreeSet::new(),
        }
    }
}

impl<S: Source> Source for Merged<S> {
    async fn snapshot(&mut self) -> Result<Snapshot, SourceError> {
        let snap = self.inner.snapshot().await?;
        let table = match &mut self.libvirt {
            Some(l) => Some(l.table()?),
            None => None,
        };
        let (snap, conflicts) = merge(snap, table.as_ref());
        let conflicts: BTreeSet<String> = conflicts.into_iter().collect();
        for c in conflicts.difference(&self.conflicts) {
            warn!("{c}");
        }
        self.conflicts = conflicts;
        Ok(snap)
    }

    async fn changed(&mut self) {
        match &mut self.libvirt {
            None => self.inner.changed().await,
            Some(l) => {
                tokio::select! {
                    () = self.inner.changed() => {}
                    () = l.changed() => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{DomainRef, Endpoint};
    use crate::source::libvirt::graphics::Console;

    fn tcp(port: u16) -> Endpoint {
        Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
        }
    }

    fn table(domains: &[(&str, Result<Endpoint, GraphicsError>)], ports: &[u16]) -> DomainTable {
        DomainTable {
            consoles: domains
                .iter()
                .map(|(n, c)| {
                    (
                        n.to_string(),
                        c.clone().map(|endpoint| Console { endpoint }),
                    )
                })
                .collect(),
            ports: ports.iter().copied().collect(),
            uuids: BTreeMap::new(),
        }
    }

    fn manifest_snapshot(names: &[(&str, u16)], refs: &[(&str, &str)]) -> Snapshot {
        let mut s = Snapshot::default();
        for (n, p) in names {
            s.desired.insert(
                n.to_string(),
                Desired {
                    name: n.to_string(),
                    target: tcp(*p),
                    requested_port: None,
                    generation: 1,
                    idle_timeout_ms: None,
                    max_lifetime_ms: None,
                    instance: None,
                },
            );
        }
        for (n, d) in refs {
            s.unresolved.insert(
                n.to_string(),
                DomainRef {
                    name: n.to_string(),
                    domain: d.to_string(),
                    requested_port: Some(6200),
                    generation: 7,
                    idle_timeout_ms: None,
                    max_lifetime_ms: None,
                },
            );
        }
        s
    }

    #[test]
    fn running_domains_with_vnc_get_sessions_named_after_them() {
        let t = table(
            &[
                ("web-1", Ok(tcp(5901))),
                ("DB_01", Ok(tcp(5902))),
                (
                    "spice-only",
                    Err(GraphicsError::NoVnc {
                        domain: "spice-only".into(),
                    }),
                ),
            ],
            &[5901, 5902, 5903],
        );
        let (s, conflicts) = merge(Snapshot::default(), Some(&t));
        assert!(conflicts.is_empty());
        assert_eq!(s.desired["web-1"].target, tcp(5901));
        let db = session_name("DB_01");
        assert_eq!(s.desired[&db].target, tcp(5902));
        assert_eq!(s.desired.len(), 2, "a domain without VNC gets no session");
        assert_eq!(
            s.objects["web-1"].spec.target.libvirt_domain.as_deref(),
            Some("web-1")
        );
        assert_eq!(s.reserved_ports, BTreeSet::from([5901, 5902, 5903]));
    }

    #[test]
    fn a_manifest_naming_a_running_domain_is_resolved_from_its_live_console() {
        let t = table(&[("Web Server", Ok(tcp(5905)))], &[5905]);
        let (s, _) = merge(manifest_snapshot(&[], &[("web", "Web Server")]), Some(&t));
        let d = &s.desired["web"];
        assert_eq!(
            (d.target.clone(), d.requested_port),
            (tcp(5905), Some(6200))
        );
        assert_eq!(d.generation, 7);
        // The manifest serves the domain: no second session for it.
        assert_eq!(s.desired.len(), 1, "{:?}", s.desired.keys());
        assert!(s.rejected.is_empty());
    }

    #[test]
    fn a_manifest_whose_domain_is_not_running_waits_without_a_port() {
        let t = table(&[], &[]);
        let mut m = manifest_snapshot(&[], &[("web", "web")]);
        m.objects.insert(
            "web".into(),
            VncSession::new("web", VncSessionSpec::default()),
        );
        let (s, _) = merge(m, Some(&t));
        assert!(s.desired.is_empty());
        assert!(s.objects.is_empty());
        assert_eq!(s.waiting["web"], reason::DOMAIN_NOT_RUNNING);
        assert!(
            s.rejected[0].error.contains("\"web\" is not running"),
            "{:?}",
            s.rejected
        );
        assert!(!s.protected.contains("web"), "its lease must be released");
    }

    #[test]
    fn without_libvirt_a_domain_manifest_is_refused_clearly() {
        let (s, _) = merge(manifest_snapshot(&[("a", 5901)], &[("web", "web")]), None);
        assert_eq!(s.desired.keys().collect::<Vec<_>>(), ["a"]);
        assert!(
            s.rejected[0].error.contains("--libvirt"),
            "{:?}",
            s.rejected
        );
        assert!(!s.waiting.contains_key("web"), "a refusal, not a wait");
    }

    #[test]
    fn an_unusable_console_is_reported_with_its_reason() {
        let t = table(
            &[
                (
                    "vm-a",
                    Err(GraphicsError::ListenNone {
                        domain: "vm-a".into(),
                    }),
                ),
                (
                    "vm-b",
                    Err(GraphicsError::NoPort {
                        domain: "vm-b".into(),
                        port: "-1".into(),
                    }),
                ),
            ],
            &[],
        );
        let (s, _) = merge(manifest_snapshot(&[], &[("m", "vm-a")]), Some(&t));
        assert_eq!(s.waiting["m"], reason::NO_VNC_CONSOLE);
        assert_eq!(s.waiting["vm-b"], reason::DOMAIN_STARTING);
        assert!(
            s.unsettled,
            "a domain still starting is looked at again soon"
        );
        assert!(s.desired.is_empty());
    }

    #[test]
    fn a_name_defined_by_a_manifest_and_a_domain_is_a_conflict_the_manifest_wins() {
        let t = table(&[("vm1", Ok(tcp(5999)))], &[5999]);
        let (s, conflicts) = merge(manifest_snapshot(&[("vm1", 5901)], &[]), Some(&t));
        assert_eq!(s.desired["vm1"].target, tcp(5901), "the manifest wins");
        assert_eq!(conflicts.len(), 1);
        assert!(conflicts[0].contains("\"vm1\""), "{conflicts:?}");
        assert!(
            s.warnings["vm1"].contains("libvirt domain"),
            "{:?}",
            s.warnings
        );
        // A manifest that cannot be read still protects its name from the domain.
        let mut m = Snapshot::default();
        m.protected.insert("vm1".into());
        let (s, conflicts) = merge(m, Some(&t));
        assert!(s.desired.is_empty());
        assert_eq!(conflicts.len(), 1);
    }

    #[test]
    fn domains_sharing_a_session_name_are_all_refused_with_name_collision() {
        // A real 32-bit FNV-1a collision: both clean to the same base, so both get the
        // same hashed name; and a third domain literally named like a cleaned name.
        let (a, b) = ("wEbSErvERaBCdeFghijk", "WebSerVerabCDefghIjk");
        let name = session_name(a);
        assert_eq!(name, session_name(b), "the test needs a real collision");
        let literal = session_name("Web Server_1");
        let t = table(
            &[
                (a, Ok(tcp(5901))),
                (b, Ok(tcp(5902))),
                ("Web Server_1", Ok(tcp(5903))),
                (literal.as_str(), Ok(tcp(5904))),
                ("alone", Ok(tcp(5905))),
            ],
            &[],
        );
        let (s, conflicts) = merge(Snapshot::default(), Some(&t));
        assert_eq!(
            s.desired.keys().collect::<Vec<_>>(),
            ["alone"],
            "neither domain of a colliding name is served"
        );
        for (n, domains) in [
            (&name, [a, b]),
            (&literal, ["Web Server_1", literal.as_str()]),
        ] {
            assert_eq!(s.refused[n.as_str()], reason::NAME_COLLISION);
            assert!(!s.objects.contains_key(n.as_str()));
            let r: Vec<_> = s.rejected.iter().filter(|r| &r.name == n).collect();
            assert_eq!(r.len(), 1, "{:?}", s.rejected);
            for d in domains {
                assert!(r[0].error.contains(&format!("{d:?}")), "{}", r[0].error);
            }
            assert!(r[0].error.contains(n.as_str()), "{}", r[0].error);
        }
        assert_eq!(conflicts.len(), 2, "{conflicts:?}");
    }

    #[test]
    fn a_domain_session_carries_the_domain_uuid_as_its_instance() {
        let mut t = table(&[("vm-a", Ok(tcp(5901))), ("Web", Ok(tcp(5902)))], &[]);
        t.uuids.insert("vm-a".into(), "uuid-a".into());
        t.uuids.insert("Web".into(), "uuid-web".into());
        let (s, _) = merge(manifest_snapshot(&[], &[("web", "Web")]), Some(&t));
        assert_eq!(s.desired["vm-a"].instance.as_deref(), Some("uuid-a"));
        assert_eq!(
            s.desired["web"].instance.as_deref(),
            Some("uuid-web"),
            "a manifest naming a domain is made for that domain's UUID too"
        );
    }
}
