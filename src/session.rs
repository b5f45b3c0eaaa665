//! A validated session: what the reconcile core works with.
//!
//! Every source (a manifest directory, Kubernetes, libvirt) turns its objects into
//! [`Desired`] values through [`Desired::from_spec`], so validation rules are the same
//! wherever a session comes from.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::api::VncSessionSpec;
use crate::pool::PortRange;

/// Where a proxy forwards to, after validation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub enum Endpoint {
    /// A TCP VNC server.
    Tcp { host: String, port: u16 },
    /// A VNC server on a unix socket.
    Unix { path: String },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix { path } => write!(f, "unix:{path}"),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    /// Reads the [`fmt::Display`] form back: `host:port`, `[v6]:port` or `unix:PATH`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Endpoint::Unix {
                path: path.to_owned(),
            });
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} has no port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port.parse().map_err(|_| format!("{s:?} has a bad port"))?;
        Ok(Endpoint::Tcp {
            host: host.to_owned(),
            port,
        })
    }
}

/// A session as a source wants it, already validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub name: String,
    pub target: Endpoint,
    /// A port the user asked for, inside the pool.
    pub requested_port: Option<u16>,
    /// Changes whenever the spec changes; reported back as `observedGeneration`.
    pub generation: i64,
    /// End the session after this long with no client.
    pub idle_timeout_ms: Option<u64>,
    /// End the session this long after its lease.
    pub max_lifetime_ms: Option<u64>,
    /// Which thing the target is, beyond its address: a libvirt domain's UUID (`None` for
    /// plain host/port and socket targets). A lease is made for one instance (see
    /// [`crate::lease::Lease::made_for`]); when it changes, the session is retargeted to
    /// a new lease uid, so a ticket minted for a VM that was destroyed never opens the
    /// VM created under its name at the same address.
    pub instance: Option<String>,
}

/// Why a session spec was refused. Messages name the offending field and value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "name {0:?} is not valid: use 1-253 lowercase letters, digits, '-' or '.', starting and ending with a letter or digit"
    )]
    Name(String),
    #[error("spec.target needs host and port, unixSocket, or libvirtDomain")]
    NoTarget,
    #[error(
        "spec.target gives more than one of host/port, unixSocket and libvirtDomain; give only one"
    )]
    BothTargets,
    #[error("spec.target.port is missing (host {0:?} needs a port)")]
    NoTargetPort(String),
    #[error("spec.target.host is missing (port {0} needs a host)")]
    NoTargetHost(i32),
    #[error("spec.target.port {0} is out of range 1-65535")]
    TargetPort(i64),
    #[error("spec.target.host {0:?} is not an IP address or DNS name")]
    Host(String),
    #[error(
        "spec.target.unixSocket {0:?} must be an absolute path without '..' or control characters"
    )]
    UnixSocket(String),
    #[error("spec.{field} {value} must be between 1 and 315360000 seconds")]
    Timeout { field: &'static str, value: i64 },
    #[error("spec.port {port} is outside the port pool {range}")]
    PortOutsidePool { port: i64, range: PortRange },
    #[error(
        "spec.target.libvirtDomain {0:?} is not a libvirt domain name: use 1-255 characters without '/' or control characters"
    )]
    LibvirtDomain(String),
    #[error(
        "spec.target.libvirtDomain {0:?} can only be served by `vncd run --libvirt URI`, which reads the domain's live VNC address"
    )]
    NeedsLibvirt(String),
}

/// A session whose target is a libvirt domain's console. It is valid, but it can be
/// served only while the domain runs: its VNC address exists only in the live domain
/// XML, so a source that talks to libvirt resolves it into a [`Desired`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainRef {
    pub name: String,
    /// The libvirt domain name, exactly as libvirt spells it.
    pub domain: String,
    pub requested_port: Option<u16>,
    pub generation: i64,
    pub idle_timeout_ms: Option<u64>,
    pub max_lifetime_ms: Option<u64>,
}

impl DomainRef {
    /// The session, once the domain's live VNC address (and its UUID, the
    /// [`Desired::instance`]) is known.
    pub fn resolve(&self, target: Endpoint, instance: Option<String>) -> Desired {
        Desired {
            name: self.name.clone(),
            target,
            requested_port: self.requested_port,
            generation: self.generation,
            idle_timeout_ms: self.idle_timeout_ms,
            max_lifetime_ms: self.max_lifetime_ms,
            instance,
        }
    }
}

/// A validated spec: either ready to serve, or naming a libvirt domain to resolve first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Validated {
    Ready(Desired),
    Domain(DomainRef),
}

impl Validated {
    pub fn name(&self) -> &str {
        match self {
            Validated::Ready(d) => &d.name,
            Validated::Domain(d) => &d.name,
        }
    }

    pub fn generation(&self) -> i64 {
        match self {
            Validated::Ready(d) => d.generation,
            Validated::Domain(d) => d.generation,
        }
    }
}

/// libvirt refuses '/' in domain names; control characters would garble logs and status.
fn is_valid_domain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.contains('/')
        && !name.chars().any(char::is_control)
}

/// DNS-1123 subdomain: the rule Kubernetes applies to object names.
pub fn is_valid_name(name: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(ok_char)
        && name.starts_with(alnum)
        && name.ends_with(alnum)
}

fn is_valid_host(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok() {
        return true;
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    host.len() <= 253 && host.split('.').all(label_ok)
}

fn is_valid_socket_path(path: &str) -> bool {
    path.starts_with('/')
        && path.len() <= 107
        && !path.split('/').any(|c| c == "..")
        && !path.chars().any(char::is_control)
}

/// A stable 63-bit hash of the spec, so standalone manifests get a generation like
/// Kubernetes objects do, and `vncd apply --wait` can tell when its change was seen.
pub fn spec_generation(spec: &VncSessionSpec) -> i64 {
    // FNV-1a over the canonical JSON form of the spec.
    let json = serde_json::to_vec(spec).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in json {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    i64::try_from(h >> 1).unwrap_or(i64::MAX)
}

impl Desired {
    /// Validates a spec under `name` against the pool it will be served from. A spec
    /// naming a libvirt domain is refused with [`SpecError::NeedsLibvirt`]; sources that
    /// can resolve domains call [`validate`] instead.
    pub fn from_spec(
        name: &str,
        spec: &VncSessionSpec,
        pool: PortRange,
    ) -> Result<Self, SpecError> {
        match validate(name, spec, pool)? {
            Validated::Ready(d) => Ok(d),
            Validated::Domain(d) => Err(SpecError::NeedsLibvirt(d.domain)),
        }
    }
}

/// Validates a spec under `name` against the pool it will be served from.
pub fn validate(
    name: &str,
    spec: &VncSessionSpec,
    pool: PortRange,
) -> Result<Validated, SpecError> {
    if !is_valid_name(name) {
        return Err(SpecError::Name(name.to_owned()));
    }
    let t = &spec.target;
    if let Some(domain) = &t.libvirt_domain {
        if t.host.is_some() || t.port.is_some() || t.unix_socket.is_some() {
            return Err(SpecError::BothTargets);
        }
        if !is_valid_domain_name(domain) {
            return Err(SpecError::LibvirtDomain(domain.clone()));
        }
        return Ok(Validated::Domain(DomainRef {
            name: name.to_owned(),
            domain: domain.clone(),
            requested_port: requested_port(spec, pool)?,
            generation: spec_generation(spec),
            idle_timeout_ms: timeout_ms("idleTimeoutSeconds", spec.idle_timeout_seconds)?,
            max_lifetime_ms: timeout_ms("maxLifetimeSeconds", spec.max_lifetime_seconds)?,
        }));
    }
    Desired::from_endpoint_spec(name, spec, pool).map(Validated::Ready)
}

fn requested_port(spec: &VncSessionSpec, pool: PortRange) -> Result<Option<u16>, SpecError> {
    let Some(p) = spec.port else {
        return Ok(None);
    };
    u16::try_from(p)
        .ok()
        .filter(|p| pool.contains(*p))
        .map(Some)
        .ok_or(SpecError::PortOutsidePool {
            port: i64::from(p),
            range: pool,
        })
}

impl Desired {
    fn from_endpoint_spec(
        name: &str,
        spec: &VncSessionSpec,
        pool: PortRange,
    ) -> Result<Self, SpecError> {
        let t = &spec.target;
        let target = match (&t.host, t.port, &t.unix_socket) {
            (None, None, None) => return Err(SpecError::NoTarget),
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => return Err(SpecError::BothTargets),
            (None, None, Some(path)) => {
                if !is_valid_socket_path(path) {
                    return Err(SpecError::UnixSocket(path.clone()));
                }
                Endpoint::Unix { path: path.clone() }
            }
            (Some(host), None, None) => return Err(SpecError::NoTargetPort(host.clone())),
            (None, Some(port), None) => return Err(SpecError::NoTargetHost(port)),
            (Some(host), Some(port), None) => {
                let port = u16::try_from(port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or(SpecError::TargetPort(i64::from(port)))?;
                if !is_valid_host(host) {
                    return Err(SpecError::Host(host.clone()));
                }
                Endpoint::Tcp {
                    host: host.clone(),
                    port,
                }
            }
        };
        Ok(Desired {
            name: name.to_owned(),
            target,
            requested_port: requested_port(spec, pool)?,
            generation: spec_generation(spec),
            idle_timeout_ms: timeout_ms("idleTimeoutSeconds", spec.idle_timeout_seconds)?,
            max_lifetime_ms: timeout_ms("maxLifetimeSeconds", spec.max_lifetime_seconds)?,
            instance: None,
        })
    }
}

fn timeout_ms(field: &'static str, v: Option<i64>) -> Result<Option<u64>, SpecError> {
    match v {
        None => Ok(None),
        Some(s) if (1..=315_360_000).contains(&s) => Ok(Some(s.unsigned_abs() * 1000)),
        Some(value) => Err(SpecError::Timeout { field, value }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Target;

    fn spec(host: Option<&str>, port: Option<i32>, sock: Option<&str>) -> VncSessionSpec {
        VncSessionSpec {
            target: Target {
                host: host.map(str::to_owned),
                port,
                unix_socket: sock.map(str::to_owned),
                libvirt_domain: None,
            },
            port: None,
            idle_timeout_seconds: None,
            max_lifetime_seconds: None,
            node_name: None,
        }
    }

    fn check(s: &VncSessionSpec) -> Result<Desired, SpecError> {
        Desired::from_spec("vm1", s, PortRange::default())
    }

    #[test]
    fn accepts_tcp_and_unix_targets() {
        let d = check(&spec(Some("127.0.0.1"), Some(5901), None)).unwrap();
        assert_eq!(d.target.to_string(), "127.0.0.1:5901");
        let d = check(&spec(Some("::1"), Some(5901), None)).unwrap();
        assert_eq!(d.target.to_string(), "[::1]:5901");
        let d = check(&spec(None, None, Some("/run/vm1.sock"))).unwrap();
        assert_eq!(d.target.to_string(), "unix:/run/vm1.sock");
        assert!(check(&spec(Some("vnc-host.example"), Some(1), None)).is_ok());
    }

    #[test]
    fn refuses_bad_targets_with_the_field_named() {
        assert_eq!(check(&spec(None, None, None)), Err(SpecError::NoTarget));
        assert_eq!(
            check(&spec(Some("h"), Some(1), Some("/s"))),
            Err(SpecError::BothTargets)
        );
        assert_eq!(
            check(&spec(Some("h"), Some(0), None)),
            Err(SpecError::TargetPort(0))
        );
        assert_eq!(
            check(&spec(Some("h"), Some(70000), None)),
            Err(SpecError::TargetPort(70000))
        );
        assert_eq!(
            check(&spec(Some("h; rm -rf /"), Some(1), None)),
            Err(SpecError::Host("h; rm -rf /".into()))
        );
        assert!(matches!(
            check(&spec(Some("$(id)"), Some(1), None)),
            Err(SpecError::Host(_))
        ));
        assert!(matches!(
            check(&spec(None, None, Some("rel/path"))),
            Err(SpecError::UnixSocket(_))
        ));
        assert!(matches!(
            check(&spec(None, None, Some("/a/../b"))),
            Err(SpecError::UnixSocket(_))
        ));
        assert!(matches!(
            check(&spec(Some("h"), None, None)),
            Err(SpecError::NoTargetPort(_))
        ));
        let msg = check(&spec(Some("h"), Some(-5), None))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("-5"), "{msg}");
    }

    #[test]
    fn requested_port_must_lie_in_the_pool() {
        let mut s = spec(Some("h"), Some(5900), None);
        s.port = Some(6500);
        assert_eq!(check(&s).unwrap().requested_port, Some(6500));
        s.port = Some(80);
        let err = check(&s).unwrap_err();
        assert!(
            err.to_string().contains("outside the port pool 6100-6999"),
            "{err}"
        );
        s.port = Some(-1);
        assert!(check(&s).is_err());
    }

    #[test]
    fn a_libvirt_domain_target_is_valid_but_needs_resolving() {
        let mut s = spec(None, None, None);
        s.target.libvirt_domain = Some("Web Server_1".into());
        s.port = Some(6200);
        let pool = PortRange::default();
        let Validated::Domain(r) = validate("web", &s, pool).unwrap() else {
            panic!("a domain target must not resolve by itself");
        };
        assert_eq!(r.domain, "Web Server_1");
        assert_eq!(r.requested_port, Some(6200));
        assert_eq!(r.generation, spec_generation(&s));
        let d = r.resolve(
            Endpoint::Unix {
                path: "/run/vnc.sock".into(),
            },
            Some("5f0c2b52-8c2e-4a55-9b8d-0c6a3f2e1d00".into()),
        );
        assert_eq!((d.name.as_str(), d.requested_port), ("web", Some(6200)));
        assert_eq!(
            d.instance.as_deref(),
            Some("5f0c2b52-8c2e-4a55-9b8d-0c6a3f2e1d00")
        );
        // Callers that cannot resolve domains get a clear refusal.
        let err = Desired::from_spec("web", &s, pool).unwrap_err();
        assert_eq!(err, SpecError::NeedsLibvirt("Web Server_1".into()));
        assert!(err.to_string().contains("--libvirt"), "{err}");
    }

    #[test]
    fn a_libvirt_domain_target_excludes_other_targets_and_bad_names() {
        let pool = PortRange::default();
        let mut s = spec(Some("127.0.0.1"), Some(5900), None);
        s.target.libvirt_domain = Some("vm".into());
        assert_eq!(validate("vm", &s, pool), Err(SpecError::BothTargets));
        let mut s = spec(None, None, Some("/run/s"));
        s.target.libvirt_domain = Some("vm".into());
        assert_eq!(validate("vm", &s, pool), Err(SpecError::BothTargets));
        for bad in ["", "a/b", "a\nb", &"x".repeat(256)] {
            let mut s = spec(None, None, None);
            s.target.libvirt_domain = Some(bad.to_owned());
            assert!(
                matches!(validate("vm", &s, pool), Err(SpecError::LibvirtDomain(_))),
                "{bad:?}"
            );
        }
        let mut s = spec(None, None, None);
        s.target.libvirt_domain = Some("vm".into());
        s.port = Some(80);
        assert!(matches!(
            validate("vm", &s, pool),
            Err(SpecError::PortOutsidePool { .. })
        ));
    }

    #[test]
    fn endpoints_round_trip_through_text() {
        for e in [
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 5901,
            },
            Endpoint::Tcp {
                host: "::1".into(),
                port: 1,
            },
            Endpoint::Unix {
                path: "/run/a b.sock".into(),
            },
        ] {
            assert_eq!(e.to_string().parse::<Endpoint>().unwrap(), e);
        }
        assert!("nope".parse::<Endpoint>().is_err());
    }

    #[test]
    fn timeouts_are_validated_and_converted() {
        let mut s = spec(Some("h"), Some(1), None);
        s.idle_timeout_seconds = Some(30);
        s.max_lifetime_seconds = Some(3600);
        let d = check(&s).unwrap();
        assert_eq!(
            (d.idle_timeout_ms, d.max_lifetime_ms),
            (Some(30_000), Some(3_600_000))
        );
        s.idle_timeout_seconds = Some(0);
        assert!(
            check(&s)
                .unwrap_err()
                .to_string()
                .contains("spec.idleTimeoutSeconds 0")
        );
        s.idle_timeout_seconds = None;
        s.max_lifetime_seconds = Some(-3);
        assert!(
            check(&s)
                .unwrap_err()
                .to_string()
                .contains("spec.maxLifetimeSeconds -3")
        );
    }

    #[test]
    fn names_follow_dns_rules() {
        assert!(is_valid_name("vm-1.prod"));
        for bad in [
            "",
            "VM1",
            "a/b",
            "../x",
            "-a",
            "a-",
            "a_b",
            &"a".repeat(254),
        ] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn generation_changes_with_the_spec() {
        let a = spec(Some("h"), Some(1), None);
        let b = spec(Some("h"), Some(2), None);
        assert_eq!(spec_generation(&a), spec_generation(&a.clone()));
        assert_ne!(spec_generation(&a), spec_generation(&b));
        assert!(spec_generation(&a) >= 0);
    }
}
