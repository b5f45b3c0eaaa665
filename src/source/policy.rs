//! Which VNC targets vncd may connect to (`--allow-target`).
//!
//! In Kubernetes mode whoever may create a VncSession picks its target, and the proxy
//! connects from the node's host network. Without a policy that is an open TCP relay: a
//! tenant could point a session at the cloud metadata service, the kubelet or etcd and
//! tunnel to it with their own console URL. A [`TargetPolicy`] refuses every target that
//! no rule allows; [`Policed`] applies it to whatever a source desires, so every source
//! (directory, Kubernetes, libvirt) is checked the same way and none of them, nor the
//! core, knows about it.
//!
//! A refused session is not desired: it is reported `Failed` with reason
//! `TargetNotAllowed`, gets no port and no proxy, and a session whose target changes to a
//! refused one loses its lease and proxy. The check runs on every snapshot, so a changed
//! target (or a restart with other rules) is checked again.
//!
//! Rules: `ADDR_OR_CIDR:PORT`, `ADDR_OR_CIDR:LO-HI` (IPv6 in brackets, `[::1]:5900`), or
//! `unix:/DIR/`, a directory whose sockets are allowed, compared after resolving symbolic
//! links on both sides. Under a policy a TCP host must be an IP address (or `localhost`,
//! checked as 127.0.0.1): a DNS name could resolve to an allowed address when checked and
//! to another when the proxy connects.
//!
//! In Kubernetes mode (`vncd kube`) every rule belongs to a namespace: `NAMESPACE=RULE`
//! allows RULE to the VncSessions of that namespace only, and `*=RULE` to every namespace
//! (an explicit choice: a rule without a namespace is refused at start, so no rule written
//! for `vncd run` silently becomes cluster-wide). Namespaces are tenants there: a target
//! allowed for namespace B (its VM's console) is refused to a session in namespace A. The
//! rules are flags rather than a cluster-scoped policy resource: vncd then needs no RBAC
//! on a new resource, nobody but whoever deploys the DaemonSet (the chart's
//! `allowTargets`) can change them, and a change is a rollout that is checked again on
//! every snapshot. `vncd run` (standalone) takes the plain rules as before and refuses a
//! namespaced one at start.

use std::fmt;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use super::{Rejected, Snapshot};
use crate::session::Endpoint;

/// The status reason of a session whose target no rule allows.
pub const TARGET_NOT_ALLOWED: &str = "TargetNotAllowed";

/// One `--allow-target` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// TCP targets in `net`/`prefix` on ports `lo..=hi`.
    Tcp {
        net: IpAddr,
        prefix: u8,
        lo: u16,
        hi: u16,
    },
    /// Unix sockets under this directory.
    Unix { dir: PathBuf },
}

/// Which sessions a Kubernetes-mode rule applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `*=RULE`: every namespace.
    All,
    /// `NS=RULE`: the sessions of namespace NS.
    Namespace(String),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::All => f.write_str("*"),
            Scope::Namespace(ns) => f.write_str(ns),
        }
    }
}

/// One `--allow-target` value as given: `RULE` or `NAMESPACE=RULE` / `*=RULE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopedRule {
    /// None: a plain rule (standalone mode).
    pub scope: Option<Scope>,
    pub rule: Rule,
}

impl FromStr for ScopedRule {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((ns, rule)) = s.split_once('=') else {
            return Ok(ScopedRule {
                scope: None,
                rule: s.parse()?,
            });
        };
        let scope = if ns == "*" {
            Scope::All
        } else if is_namespace(ns) {
            Scope::Namespace(ns.to_owned())
        } else {
            return Err(RuleError {
                rule: s.to_owned(),
                why: "the namespace before '=' is not a valid namespace name (or '*')",
            });
        };
        let rule = rule.parse().map_err(|e: RuleError| RuleError {
            rule: s.to_owned(),
            why: e.why,
        })?;
        Ok(ScopedRule {
            scope: Some(scope),
            rule,
        })
    }
}

impl fmt::Display for ScopedRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            None => write!(f, "{}", self.rule),
            Some(scope) => write!(f, "{scope}={}", self.rule),
        }
    }
}

/// A namespace name: an RFC 1123 label (lower-case alphanumerics and '-', at most 63).
fn is_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 63
        && ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !ns.starts_with('-')
        && !ns.ends_with('-')
}

/// Rules given in the wrong mode: refused at start, before anything is served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModeError {
    #[error(
        "--allow-target {0:?} names no namespace: in Kubernetes mode every rule belongs to a namespace (NAMESPACE=RULE, or *=RULE for every namespace)"
    )]
    Unscoped(String),
    #[error(
        "--allow-target {0:?} names a namespace: namespaced rules (NAMESPACE=RULE) apply only to vncd kube; vncd run takes plain rules"
    )]
    Scoped(String),
}

/// Why a rule does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid --allow-target rule {rule:?}: {why} (expected ADDR_OR_CIDR:PORT, ADDR_OR_CIDR:LO-HI or unix:/DIR/)"
)]
pub struct RuleError {
    rule: String,
    why: &'static str,
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| RuleError {
            rule: s.to_owned(),
            why,
        };
        if let Some(dir) = s.strip_prefix("unix:") {
            let dir = PathBuf::from(dir);
            if !dir.is_absolute() || dir.components().any(|c| c == Component::ParentDir) {
                return Err(err("the directory must be an absolute path without '..'"));
            }
            return Ok(Rule::Unix { dir });
        }
        let (addr, ports) = s.rsplit_once(':').ok_or_else(|| err("no port"))?;
        let (lo, hi) = match ports.split_once('-') {
            Some((lo, hi)) => (lo.parse::<u16>(), hi.parse::<u16>()),
            None => (ports.parse::<u16>(), ports.parse::<u16>()),
        };
        let (Ok(lo), Ok(hi)) = (lo, hi) else {
            return Err(err("the port is not a number from 1 to 65535"));
        };
        if lo == 0 || lo > hi {
            return Err(err("the port range is empty or starts at 0"));
        }
        let (addr, prefix) = match addr.split_once('/') {
            Some((a, p)) => (
                a,
                Some(p.parse::<u8>().map_err(|_| err("bad prefix length"))?),
            ),
            None => (addr, None),
        };
        let addr = addr
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            .unwrap_or(addr);
        let net: IpAddr = addr.parse().map_err(|_| err("not an IP address"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(err("prefix length too long for the address"));
        }
        Ok(Rule::Tcp {
            net,
            prefix,
            lo,
            hi,
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Unix { dir } => write!(f, "unix:{}", dir.display()),
            Rule::Tcp {
                net,
                prefix,
                lo,
                hi,
            } => {
                let ports = if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                };
                match net {
                    IpAddr::V4(_) => write!(f, "{net}/{prefix}:{ports}"),
                    IpAddr::V6(_) => write!(f, "[{net}]/{prefix}:{ports}"),
                }
            }
        }
    }
}

/// True if `addr` lies in `net`/`prefix` (same family only).
fn in_net(addr: IpAddr, net: IpAddr, prefix: u8) -> bool {
    let (a, n, bits) = match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => (u128::from(a.to_bits()), u128::from(n.to_bits()), 32),
        (IpAddr::V6(a), IpAddr::V6(n)) => (a.to_bits(), n.to_bits(), 128),
        _ => return false,
    };
    let shift = bits - u32::from(prefix);
    if shift >= bits {
        return true;
    }
    (a >> shift) == (n >> shift)
}

/// `path` with symbolic links resolved: the whole path if it exists, else its resolved
/// parent directory joined with its name (a socket that appears later). None for a path
/// that cannot be judged safely (relative, `..` in a part that does not exist).
fn resolved(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    if let Ok(p) = std::fs::canonicalize(path) {
        return Some(p);
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return None;
    }
    let parent = std::fs::canonicalize(path.parent()?)
        .unwrap_or_else(|_| path.parent().map(Path::to_path_buf).unwrap_or_default());
    Some(parent.join(path.file_name()?))
}

/// The rule set of a [`TargetPolicy`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum Rules {
    /// Every target is allowed (standalone without rules; its manifests are root's).
    Any,
    /// Standalone: these rules, for every session.
    Global(Vec<Rule>),
    /// Kubernetes: each rule for its namespace (or every one).
    PerNamespace(Vec<(Scope, Rule)>),
}

/// The targets vncd may connect to. See the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetPolicy {
    rules: Rules,
}

impl TargetPolicy {
    /// Allows every target.
    pub fn allow_all() -> Self {
        TargetPolicy { rules: Rules::Any }
    }

    /// Allows only what `rules` allow (nothing, if empty), whatever the namespace.
    pub fn only(rules: Vec<Rule>) -> Self {
        TargetPolicy {
            rules: Rules::Global(rules),
        }
    }

    /// Allows a session only what the rules of its own namespace (and `*=` rules) allow;
    /// nothing, if empty.
    pub fn per_namespace(rules: Vec<(Scope, Rule)>) -> Self {
        TargetPolicy {
            rules: Rules::PerNamespace(rules),
        }
    }

    /// `vncd run`: plain rules, or every target when none are given; a namespaced rule is
    /// an error (standalone sessions have no namespace).
    pub fn standalone(given: &[ScopedRule]) -> Result<Self, ModeError> {
        if let Some(r) = given.iter().find(|r| r.scope.is_some()) {
            return Err(ModeError::Scoped(r.to_string()));
        }
        if given.is_empty() {
            return Ok(Self::allow_all());
        }
        Ok(Self::only(given.iter().map(|r| r.rule.clone()).collect()))
    }

    /// `vncd kube`: every rule names its namespace (or `*`); none allows nothing, since
    /// VncSession creators are tenants.
    pub fn kubernetes(given: &[ScopedRule]) -> Result<Self, ModeError> {
        let mut rules = Vec::new();
        for r in given {
            let Some(scope) = &r.scope else {
                return Err(ModeError::Unscoped(r.to_string()));
            };
            rules.push((scope.clone(), r.rule.clone()));
        }
        Ok(Self::per_namespace(rules))
    }

    /// The rule set as a message shows it.
    pub fn describe(&self) -> String {
        match &self.rules {
            Rules::Any => "any target".into(),
            Rules::Global(r) if r.is_empty() => "no target: no --allow-target rule is set".into(),
            Rules::Global(r) => r.iter().map(Rule::to_string).collect::<Vec<_>>().join(", "),
            Rules::PerNamespace(r) if r.is_empty() => {
                "no target in any namespace: no --allow-target rule is set".into()
            }
            Rules::PerNamespace(r) => r
                .iter()
                .map(|(scope, rule)| format!("{scope}={rule}"))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// Ok if some rule allows `target` to a session of `namespace` (ignored in standalone
    /// mode); else the message for its status.
    pub fn check(&self, namespace: Option<&str>, target: &Endpoint) -> Result<(), String> {
        match &self.rules {
            Rules::Any => Ok(()),
            Rules::Global(rules) => allows(rules.iter(), target).map_err(|detail| {
                format!(
                    "target {target} is not allowed{detail} (--allow-target: {})",
                    self.describe()
                )
            }),
            Rules::PerNamespace(rules) => {
                let applies = |scope: &Scope| match scope {
                    Scope::All => true,
                    Scope::Namespace(ns) => Some(ns.as_str()) == namespace,
                };
                let mine: Vec<&Rule> = rules
                    .iter()
                    .filter(|(scope, _)| applies(scope))
                    .map(|(_, rule)| rule)
                    .collect();
                allows(mine.iter().copied(), target).map_err(|detail| {
                    let ns = namespace.unwrap_or("(none)");
                    let shown = rules
                        .iter()
                        .filter(|(scope, _)| applies(scope))
                        .map(|(scope, rule)| format!("{scope}={rule}"))
                        .collect::<Vec<_>>();
                    let shown = if shown.is_empty() {
                        "none".to_owned()
                    } else {
                        shown.join(", ")
                    };
                    format!(
                        "target {target} is not allowed in namespace {ns}{detail}: no --allow-target rule {ns}=RULE (or *=RULE) allows it (rules for namespace {ns}: {shown})"
                    )
                })
            }
        }
    }

    /// Moves every desired session whose target is refused out of `snap.desired` into
    /// `snap.rejected`, reported `Failed` with reason [`TARGET_NOT_ALLOWED`].
    pub fn apply(&self, snap: &mut Snapshot) {
        if self.rules == Rules::Any {
            return;
        }
        let refused: Vec<(String, String)> = snap
            .desired
            .iter()
            .filter_map(|(name, d)| {
                let ns = namespace_of(snap, name);
                self.check(ns, &d.target).err().map(|e| (name.clone(), e))
            })
            .collect();
        for (name, error) in refused {
            snap.desired.remove(&name);
            let origin = snap
                .objects
                .get(&name)
                .and_then(|o| o.metadata.annotations.as_ref())
                .and_then(|a| a.get(crate::status::SOURCE_ANNOTATION).cloned())
                .unwrap_or_else(|| format!("session {name}"));
            snap.refused.insert(name.clone(), TARGET_NOT_ALLOWED);
            snap.rejected.push(Rejected {
                name,
                origin,
                error,
            });
        }
    }
}

/// The namespace of the session under `key`: its object's, else the key's `NS/` part
/// (Kubernetes keys are `NAMESPACE/NAME`); None for a standalone session.
pub fn namespace_of<'a>(snap: &'a Snapshot, key: &'a str) -> Option<&'a str> {
    snap.objects
        .get(key)
        .and_then(|o| o.metadata.namespace.as_deref())
        .or_else(|| key.split_once('/').map(|(ns, _)| ns))
}

/// Ok if one of `rules` allows `target`; else what to add to the refusal ("" or a detail
/// such as why a host name is never allowed).
fn allows<'a>(
    rules: impl Iterator<Item = &'a Rule> + Clone,
    target: &Endpoint,
) -> Result<(), String> {
    match target {
        Endpoint::Tcp { host, port } => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let addr = if host.eq_ignore_ascii_case("localhost") {
                IpAddr::from([127, 0, 0, 1])
            } else {
                match host.parse::<IpAddr>() {
                    Ok(a) => a,
                    Err(_) => {
                        return Err(
                            ": a host name could resolve anywhere when the proxy connects; use an IP address"
                                .into(),
                        );
                    }
                }
            };
            let ok = rules.clone().any(|r| match r {
                Rule::Tcp {
                    net,
                    prefix,
                    lo,
                    hi,
                } => in_net(addr, *net, *prefix) && (*lo..=*hi).contains(port),
                Rule::Unix { .. } => false,
            });
            if ok { Ok(()) } else { Err(String::new()) }
        }
        Endpoint::Unix { path } => {
            let Some(real) = resolved(Path::new(path)) else {
                return Err(": the socket path cannot be resolved safely".into());
            };
            let ok = rules.clone().any(|r| match r {
                Rule::Unix { dir } => {
                    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
                    real.starts_with(&dir) && real != dir
                }
                Rule::Tcp { .. } => false,
            });
            if ok {
                Ok(())
            } else if real.as_os_str() != path.as_str() {
                Err(format!(" (it resolves to {})", real.display()))
            } else {
                Err(String::new())
            }
        }
    }
}

/// A source whose snapshots pass through a [`TargetPolicy`].
pub type Policed<S> = super::filter::Filtered<S, TargetPolicy>;

impl super::filter::Admission for TargetPolicy {
    fn apply(&self, snap: &mut Snapshot) {
        TargetPolicy::apply(self, snap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Endpoint {
        Endpoint::Tcp {
            host: host.into(),
            port,
        }
    }

    fn policy(rules: &[&str]) -> TargetPolicy {
        TargetPolicy::only(rules.iter().map(|r| r.parse().unwrap()).collect())
    }

    #[test]
    fn rules_parse_and_print_back() {
        for (text, shown) in [
            ("127.0.0.1:5900", "127.0.0.1/32:5900"),
            ("127.0.0.0/8:5900-5999", "127.0.0.0/8:5900-5999"),
            ("[::1]:5900-5999", "[::1]/128:5900-5999"),
            ("[fd00::]/8:1-65535", "[fd00::]/8:1-65535"),
            ("unix:/var/run/libvirt/", "unix:/var/run/libvirt/"),
        ] {
            assert_eq!(text.parse::<Rule>().unwrap().to_string(), shown, "{text}");
        }
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:5999-5900",
            "127.0.0.1/33:5900",
            "example.com:5900",
            "unix:relative/dir",
            "unix:/var/../etc",
            "127.0.0.1:99999",
        ] {
            let e = bad.parse::<Rule>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("expected"), "{e}");
        }
    }

    #[test]
    fn tcp_targets_are_allowed_only_inside_a_rule() {
        let p = policy(&["127.0.0.0/8:5900-5999", "10.1.2.3:5901"]);
        assert!(p.check(None, &tcp("127.0.0.1", 5900)).is_ok());
        assert!(p.check(None, &tcp("127.9.9.9", 5999)).is_ok());
        assert!(p.check(None, &tcp("localhost", 5901)).is_ok());
        assert!(p.check(None, &tcp("10.1.2.3", 5901)).is_ok());
        for (host, port) in [
            ("127.0.0.1", 10250),        // the kubelet
            ("169.254.169.254", 80),     // cloud metadata
            ("127.0.0.1", 2379),         // etcd
            ("10.1.2.3", 5902),          // the right host, another port
            ("10.1.2.4", 5901),          // another host
            ("::1", 5900),               // another family
            ("metadata.internal", 5900), // a name could resolve anywhere
        ] {
            let e = p.check(None, &tcp(host, port)).unwrap_err();
            assert!(e.contains("127.0.0.0/8:5900-5999"), "{e}");
        }
    }

    #[test]
    fn no_rules_allows_nothing_and_allow_all_allows_everything() {
        let none = TargetPolicy::only(Vec::new());
        let e = none.check(None, &tcp("127.0.0.1", 5900)).unwrap_err();
        assert!(e.contains("no --allow-target rule is set"), "{e}");
        assert!(
            TargetPolicy::allow_all()
                .check(None, &tcp("169.254.169.254", 80))
                .is_ok()
        );
    }

    #[test]
    fn unix_sockets_are_compared_after_resolving_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let allowed = tmp.path().join("allowed");
        let other = tmp.path().join("other");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("secret.sock"), "").unwrap();
        // A link inside the allowed directory that points out of it.
        std::os::unix::fs::symlink(other.join("secret.sock"), allowed.join("escape.sock")).unwrap();
        let p = TargetPolicy::only(vec![Rule::Unix {
            dir: allowed.clone(),
        }]);
        let unix = |p: &Path| Endpoint::Unix {
            path: p.display().to_string(),
        };
        assert!(
            p.check(None, &unix(&allowed.join("vm1.sock"))).is_ok(),
            "not there yet, but inside"
        );
        let e = p
            .check(None, &unix(&allowed.join("escape.sock")))
            .unwrap_err();
        assert!(e.contains("resolves to"), "{e}");
        assert!(p.check(None, &unix(&other.join("secret.sock"))).is_err());
        assert!(
            p.check(None, &unix(&allowed.join("../other/x.sock")))
                .is_err()
        );
        assert!(
            p.check(None, &unix(&allowed)).is_err(),
            "the directory itself is no socket"
        );
    }

    #[test]
    fn refused_sessions_leave_the_desired_set_with_their_reason() {
        let mut snap = Snapshot::default();
        for (name, port) in [("ok", 5901), ("metadata", 80)] {
            let spec = crate::api::VncSessionSpec {
                target: crate::api::Target::tcp(
                    if port == 80 {
                        "169.254.169.254"
                    } else {
                        "127.0.0.1"
                    },
                    port,
                ),
                ..crate::api::VncSessionSpec::default()
            };
            let d =
                crate::session::Desired::from_spec(name, &spec, crate::pool::PortRange::default())
                    .unwrap();
            snap.desired.insert(name.into(), d);
        }
        policy(&["127.0.0.0/8:5900-5999"]).apply(&mut snap);
        assert_eq!(snap.desired.keys().collect::<Vec<_>>(), ["ok"]);
        assert_eq!(snap.refused.get("metadata"), Some(&TARGET_NOT_ALLOWED));
        assert_eq!(snap.rejected.len(), 1);
        assert!(snap.rejected[0].error.contains("169.254.169.254:80"));
    }

    fn given(rules: &[&str]) -> Vec<ScopedRule> {
        rules.iter().map(|r| r.parse().unwrap()).collect()
    }

    #[test]
    fn namespaced_rules_parse_and_print_back() {
        for (text, shown) in [
            ("tenant-b=127.0.0.1:5901", "tenant-b=127.0.0.1/32:5901"),
            ("*=unix:/var/run/libvirt/", "*=unix:/var/run/libvirt/"),
            ("127.0.0.1:5901", "127.0.0.1/32:5901"),
        ] {
            assert_eq!(text.parse::<ScopedRule>().unwrap().to_string(), shown);
        }
        for bad in [
            "Tenant=127.0.0.1:5901",
            "=127.0.0.1:5901",
            "a.b=127.0.0.1:5901",
            "ns=127.0.0.1",
        ] {
            let e = bad.parse::<ScopedRule>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn each_mode_refuses_the_other_modes_rules_at_start() {
        let e = TargetPolicy::kubernetes(&given(&["b=127.0.0.1:5901", "127.0.0.1:5902"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("127.0.0.1/32:5902") && e.contains("NAMESPACE=RULE"),
            "{e}"
        );
        let e = TargetPolicy::standalone(&given(&["b=127.0.0.1:5901"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("b=127.0.0.1/32:5901") && e.contains("vncd run"),
            "{e}"
        );
        assert_eq!(
            TargetPolicy::standalone(&[]).unwrap(),
            TargetPolicy::allow_all()
        );
        let none = TargetPolicy::kubernetes(&[]).unwrap();
        let e = none.check(Some("a"), &tcp("127.0.0.1", 5901)).unwrap_err();
        assert!(
            e.contains("namespace a") && e.contains("rules for namespace a: none"),
            "{e}"
        );
    }

    #[test]
    fn a_namespaces_rule_allows_its_target_to_that_namespace_only() {
        let p =
            TargetPolicy::kubernetes(&given(&["b=127.0.0.1:5901", "*=unix:/run/vms/"])).unwrap();
        assert!(p.check(Some("b"), &tcp("127.0.0.1", 5901)).is_ok());
        let e = p.check(Some("a"), &tcp("127.0.0.1", 5901)).unwrap_err();
        assert!(
            e.contains("not allowed in namespace a")
                && e.contains("a=RULE")
                && e.contains("rules for namespace a: *=unix:/run/vms/")
                && !e.contains("b=127"),
            "names the missing rule, not another tenant's: {e}"
        );
        let vm = Endpoint::Unix {
            path: "/run/vms/vm1.sock".into(),
        };
        assert!(
            p.check(Some("a"), &vm).is_ok(),
            "*= applies to every namespace"
        );
        assert!(p.check(None, &tcp("127.0.0.1", 5901)).is_err());
    }

    #[test]
    fn the_snapshot_key_names_the_namespace() {
        let mut snap = Snapshot::default();
        for key in ["a/vm", "b/vm"] {
            let spec = crate::api::VncSessionSpec {
                target: crate::api::Target::tcp("127.0.0.1", 5901),
                ..crate::api::VncSessionSpec::default()
            };
            let d =
                crate::session::Desired::from_spec("vm", &spec, crate::pool::PortRange::default())
                    .unwrap();
            snap.desired.insert(key.into(), d);
        }
        TargetPolicy::kubernetes(&given(&["b=127.0.0.1:5901"]))
            .unwrap()
            .apply(&mut snap);
        assert_eq!(snap.desired.keys().collect::<Vec<_>>(), ["b/vm"]);
        assert_eq!(snap.refused.get("a/vm"), Some(&TARGET_NOT_ALLOWED));
    }
}
