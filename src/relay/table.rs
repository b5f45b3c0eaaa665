//! The session table: what the controller declared, and converging to a new declaration.
//!
//! [`converge`] is a pure function, the relay's small `plan()`: old table + declaration ->
//! per session what to do with its listener and its connections. The caller (see
//! `state.rs`) performs it. A declaration is always the whole desired set, so a lost
//! message or a restarted controller needs no special case: the next one converges.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::proxy::conn::Target;
use crate::ticket::LeaseKey;

/// Where a session's connections are bridged to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetSpec {
    /// `HOST:PORT`, e.g. `{"tcp": "127.0.0.1:5901"}`.
    Tcp(String),
    /// A unix socket path, e.g. `{"unix": "/run/vm1/vnc.sock"}`.
    Unix(PathBuf),
}

impl TargetSpec {
    pub(crate) fn to_target(&self) -> Target {
        match self {
            TargetSpec::Tcp(a) => Target::Tcp(a.clone()),
            TargetSpec::Unix(p) => Target::Unix(p.clone()),
        }
    }
}

/// A lease key on the wire: 64 hex digits. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct WireKey(pub LeaseKey);

impl fmt::Debug for WireKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WireKey(<redacted>)")
    }
}

impl PartialEq for WireKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes() == other.0.as_bytes()
    }
}
impl Eq for WireKey {}

impl Serialize for WireKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_hex())
    }
}

impl<'de> Deserialize<'de> for WireKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        LeaseKey::from_hex(&text)
            .map(WireKey)
            .ok_or_else(|| serde::de::Error::custom("lease_key must be 64 hex digits"))
    }
}

/// What the relay enforces for a session on its own, even while the controller is away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Most authenticated (bridged) connections at once; pending ones do not count.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Unix seconds: from then on the session accepts no upgrade and its connections end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Seconds without client input after which the session's connections end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
}

fn default_max_connections() -> u32 {
    16
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: default_max_connections(),
            expires_at: None,
            idle_timeout_secs: None,
        }
    }
}

fn default_listen() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

/// One declared session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSpec {
    /// The session's name: also the name of its used-ticket directory, so a file name.
    pub name: String,
    /// The leased port.
    pub port: u16,
    /// The address to listen on [default: 127.0.0.1].
    #[serde(default = "default_listen")]
    pub listen: IpAddr,
    pub target: TargetSpec,
    /// The lease this session serves (v2 tickets name it; the gateway routes by it).
    pub lease_uid: String,
    /// The lease's ticket key, held in memory only.
    pub lease_key: WireKey,
    #[serde(default)]
    pub limits: Limits,
}

/// Why a declared session was not applied. Each message names the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeclError {
    #[error(
        "session {0:?}: the name must be NAME or NAMESPACE/NAME, each part 1-253 characters of A-Z a-z 0-9 . _ - not starting with '.'"
    )]
    BadName(String),
    #[error("session {0:?}: declared twice; the later one is ignored")]
    Duplicate(String),
    #[error("session {name:?}: port 0 cannot be leased")]
    PortZero { name: String },
    #[error("session {name:?}: {listen}:{port} is declared for session {other:?} already")]
    PortTaken {
        name: String,
        listen: IpAddr,
        port: u16,
        other: String,
    },
    #[error("session {name:?}: lease uid {uid:?} is declared for session {other:?} already")]
    LeaseTaken {
        name: String,
        uid: String,
        other: String,
    },
    #[error(
        "session {name:?}: the lease uid must be 1-{} characters of 0-9 a-z - (as v2 tickets carry it)",
        crate::ticket::MAX_LEASE_UID_LEN
    )]
    BadLeaseUid { name: String },
    #[error("session {name:?}: target {target:?}: {why}")]
    BadTarget {
        name: String,
        target: String,
        why: String,
    },
    #[error("session {name:?}: max_connections must be at least 1")]
    NoConnections { name: String },
}

/// What the relay has applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// The version of the declaration applied last (0: none yet).
    pub version: u64,
    pub sessions: BTreeMap<String, SessionSpec>,
}

/// What to do with one session to reach the declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// New: open its listener.
    Open,
    /// No longer declared: close its listener and end its connections.
    Close,
    /// Its address or port changed: close the old listener, end its connections, open anew.
    Reopen,
    /// Same listener, but its target, lease or key changed: end its connections (they
    /// belong to the old lease or target); new ones use the new spec.
    Restart,
    /// Only its lease key changed (same lease, same target, same listener): new
    /// connections need tickets of the new key, open ones stay. A controller that lost
    /// its master key (a new pod, a new emptyDir) declares the same leases with new keys,
    /// and its consoles must not end for that.
    Rekey,
    /// Only its limits changed: applied in place, connections kept.
    Update,
    /// Unchanged (or its new declaration is invalid: the old one is kept, see errors).
    Keep,
}

/// The outcome of converging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Converged {
    /// The declaration's version is not newer than the applied one: nothing changes.
    Stale {
        applied: u64,
    },
    Plan(Plan),
}

/// How to get from the old table to the new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The table once the plan is performed.
    pub table: Table,
    /// Per session (old or new) what to do.
    pub changes: BTreeMap<String, Change>,
    /// Declared sessions that were not applied, and why.
    pub errors: BTreeMap<String, DeclError>,
}

/// A session name the relay accepts: `NAME` (standalone) or `NAMESPACE/NAME` (Kubernetes
/// keys), each part 1-253 characters of `A-Z a-z 0-9 . _ -` not starting with '.'. The
/// name is also the path of its used-ticket directory under `nonces/`, so no part may be
/// `..` or empty, and there is at most one '/'.
fn name_ok(name: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 253
            && !p.starts_with('.')
            && p.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
    };
    match name.split_once('/') {
        Some((ns, n)) => part_ok(ns) && part_ok(n),
        None => part_ok(name),
    }
}

/// Checks one declared session on its own (duplicates are checked by [`converge`]).
pub fn validate(s: &SessionSpec) -> Result<(), DeclError> {
    if !name_ok(&s.name) {
        return Err(DeclError::BadName(s.name.clone()));
    }
    let name = || s.name.clone();
    if s.port == 0 {
        return Err(DeclError::PortZero { name: name() });
    }
    let uid_ok = !s.lease_uid.is_empty()
        && s.lease_uid.len() <= 128
        && s.lease_uid
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_-".contains(&c));
    if !uid_ok {
        return Err(DeclError::BadLeaseUid { name: name() });
    }
    match &s.target {
        TargetSpec::Tcp(a) => {
            crate::proxy::args::parse_host_port(a).map_err(|why| DeclError::BadTarget {
                name: name(),
                target: a.clone(),
                why,
            })?;
        }
        TargetSpec::Unix(p) => {
            if !p.is_absolute() {
                return Err(DeclError::BadTarget {
                    name: name(),
                    target: p.display().to_string(),
                    why: "a unix socket target must be an absolute path".into(),
                });
            }
        }
    }
    if s.limits.max_connections == 0 {
        return Err(DeclError::NoConnections { name: name() });
    }
    Ok(())
}

/// Converges `old` to the declaration `(version, declared)`. Pure: no I/O.
///
/// - A version not newer than `old.version` changes nothing ([`Converged::Stale`]).
/// - An invalid session is reported in [`Plan::errors`]; if it was applied before, its old
///   spec is kept, so bad input disturbs nothing that worked.
/// - Of two sessions with one name, address+port or lease uid, the first declared wins.
pub fn converge(old: &Table, version: u64, declared: &[SessionSpec]) -> Converged {
    if version <= old.version {
        return Converged::Stale {
            applied: old.version,
        };
    }
    let mut errors = BTreeMap::new();
    let mut next: BTreeMap<String, SessionSpec> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for s in declared {
        if !seen.insert(s.name.clone()) {
            errors.insert(s.name.clone(), DeclError::Duplicate(s.name.clone()));
            continue;
        }
        match validate(s) {
            Ok(()) => {
                next.insert(s.name.clone(), s.clone());
            }
            Err(e) => {
                if let Some(prev) = old.sessions.get(&s.name) {
                    next.insert(s.name.clone(), prev.clone());
                }
                errors.insert(s.name.clone(), e);
            }
        }
    }
    // Address and lease conflicts, in declaration order: the first one keeps it.
    let mut ports: BTreeMap<(IpAddr, u16), String> = BTreeMap::new();
    let mut leases: BTreeMap<String, String> = BTreeMap::new();
    let mut checked = BTreeSet::new();
    for s in declared {
        if !checked.insert(s.name.as_str()) {
            continue;
        }
        let Some(spec) = next.get(&s.name) else {
            continue;
        };
        if errors.contains_key(&s.name) && !old.sessions.contains_key(&s.name) {
            continue;
        }
        let conflict = if let Some(other) = ports.get(&(spec.listen, spec.port)) {
            Some(DeclError::PortTaken {
                name: s.name.clone(),
                listen: spec.listen,
                port: spec.port,
                other: other.clone(),
            })
        } else {
            leases
                .get(&spec.lease_uid)
                .map(|other| DeclError::LeaseTaken {
                    name: s.name.clone(),
                    uid: spec.lease_uid.clone(),
                    other: other.clone(),
                })
        };
        match conflict {
            Some(e) => {
                next.remove(&s.name);
                errors.entry(s.name.clone()).or_insert(e);
            }
            None => {
                ports.insert((spec.listen, spec.port), s.name.clone());
                leases.insert(spec.lease_uid.clone(), s.name.clone());
            }
        }
    }
    let mut changes = BTreeMap::new();
    for (name, prev) in &old.sessions {
        let change = match next.get(name) {
            None => Change::Close,
            Some(new) => change_of(prev, new),
        };
        changes.insert(name.clone(), change);
    }
    for name in next.keys() {
        changes.entry(name.clone()).or_insert(Change::Open);
    }
    Converged::Plan(Plan {
        table: Table {
            version,
            sessions: next,
        },
        changes,
        errors,
    })
}

fn change_of(prev: &SessionSpec, new: &SessionSpec) -> Change {
    if prev.port != new.port || prev.listen != new.listen {
        Change::Reopen
    } else if prev.target != new.target || prev.lease_uid != new.lease_uid {
        Change::Restart
    } else if prev.lease_key != new.lease_key {
        Change::Rekey
    } else if prev.limits != new.limits {
        Change::Update
    } else {
        Change::Keep
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn spec(name: &str, port: u16) -> SessionSpec {
        SessionSpec {
            name: name.into(),
            port,
            listen: default_listen(),
            target: TargetSpec::Tcp("127.0.0.1:5901".into()),
            lease_uid: format!("uid-{name}"),
            lease_key: WireKey(LeaseKey::from_bytes([port as u8; 32])),
            limits: Limits::default(),
        }
    }

    fn plan(old: &Table, version: u64, declared: &[SessionSpec]) -> Plan {
        match converge(old, version, declared) {
            Converged::Plan(p) => p,
            other => panic!("expected a plan, got {other:?}"),
        }
    }

    fn changes(p: &Plan) -> Vec<(&str, Change)> {
        p.changes.iter().map(|(n, c)| (n.as_str(), *c)).collect()
    }

    #[test]
    fn opens_closes_keeps_and_classifies_changes() {
        let p = plan(&Table::default(), 1, &[spec("a", 7001), spec("b", 7002)]);
        assert_eq!(changes(&p), [("a", Change::Open), ("b", Change::Open)]);
        assert!(p.errors.is_empty());
        let t1 = p.table;
        assert_eq!(t1.version, 1);

        let mut moved = spec("a", 7003);
        moved.lease_key = spec("a", 7001).lease_key;
        let mut retargeted = spec("b", 7002);
        retargeted.target = TargetSpec::Unix("/run/b.sock".into());
        let p = plan(&t1, 2, &[moved, retargeted, spec("c", 7004)]);
        assert_eq!(
            changes(&p),
            [
                ("a", Change::Reopen),
                ("b", Change::Restart),
                ("c", Change::Open)
            ]
        );

        let mut rekeyed = spec("a", 7001);
        rekeyed.lease_key = WireKey(LeaseKey::from_bytes([0xee; 32]));
        let mut limited = spec("b", 7002);
        limited.limits.max_connections = 2;
        let p = plan(&t1, 2, &[rekeyed, limited]);
        assert_eq!(changes(&p), [("a", Change::Rekey), ("b", Change::Update)]);

        // Dropping b from the declaration closes only b.
        let p = plan(&t1, 3, &[spec("a", 7001)]);
        assert_eq!(changes(&p), [("a", Change::Keep), ("b", Change::Close)]);
        assert_eq!(p.table.sessions.len(), 1);
    }

    #[test]
    fn a_version_not_newer_changes_nothing() {
        let t1 = plan(&Table::default(), 5, &[spec("a", 7001)]).table;
        assert_eq!(
            converge(&t1, 5, &[]),
            Converged::Stale { applied: 5 },
            "same version: acknowledged without change"
        );
        assert_eq!(converge(&t1, 4, &[]), Converged::Stale { applied: 5 });
        // Idempotent: the same set again with a newer version keeps everything.
        let p = plan(&t1, 6, &[spec("a", 7001)]);
        assert_eq!(changes(&p), [("a", Change::Keep)]);
    }

    #[test]
    fn bad_sessions_are_reported_and_disturb_nothing_else() {
        let t1 = plan(&Table::default(), 1, &[spec("a", 7001), spec("b", 7002)]).table;
        let mut bad_a = spec("a", 7001);
        bad_a.target = TargetSpec::Tcp("no-port".into());
        let mut bad_new = spec("../x", 7005);
        bad_new.lease_uid = "u-x".into();
        let dup_port = SessionSpec {
            lease_uid: "u-d".into(),
            ..spec("d", 7002)
        };
        let dup_lease = SessionSpec {
            lease_uid: "uid-b".into(),
            ..spec("e", 7006)
        };
        let p = plan(
            &t1,
            2,
            &[
                bad_a,
                spec("b", 7002),
                bad_new,
                dup_port,
                dup_lease,
                spec("b", 7009),
            ],
        );
        // a keeps its old, working spec; b is unchanged; nothing else is applied.
        assert_eq!(changes(&p), [("a", Change::Keep), ("b", Change::Keep)]);
        assert_eq!(p.table.sessions["a"], spec("a", 7001));
        let errs: Vec<String> = p.errors.values().map(|e| e.to_string()).collect();
        assert_eq!(p.errors.len(), 5, "{errs:?}");
        assert!(matches!(p.errors["a"], DeclError::BadTarget { .. }));
        assert!(matches!(p.errors["../x"], DeclError::BadName(_)));
        assert!(matches!(p.errors["d"], DeclError::PortTaken { ref other, .. } if other == "b"));
        assert!(matches!(p.errors["e"], DeclError::LeaseTaken { ref other, .. } if other == "b"));
        assert!(matches!(p.errors["b"], DeclError::Duplicate(_)));
        assert!(p.errors["d"].to_string().contains("session \"d\""));
    }

    /// Kubernetes declares `NAMESPACE/NAME`; nothing else may add a path level or climb.
    #[test]
    fn names_are_a_name_or_a_namespaced_name_and_never_a_path() {
        for good in ["vm1", "tenant-a/vm1", "a.b/c_d-e", "ns/x.y"] {
            assert!(name_ok(good), "{good}");
        }
        for bad in [
            "",
            "/",
            "ns/",
            "/vm",
            "a/b/c",
            "../x",
            "ns/..",
            "ns/.hidden",
            ".ns/vm",
            "ns/v m",
            "ns\\vm",
        ] {
            assert!(!name_ok(bad), "{bad:?}");
        }
        assert!(!name_ok(&format!("ns/{}", "x".repeat(254))));
    }

    #[test]
    fn wire_format_round_trips_and_hides_the_key() {
        let s = spec("a", 7001);
        let json = serde_json::to_string(&s).unwrap();
        let hex = s.lease_key.0.to_hex();
        assert!(json.contains(&hex), "{json}");
        let back: SessionSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert!(!format!("{s:?}").contains(&hex));
        let minimal: SessionSpec = serde_json::from_str(&format!(
            r#"{{"name":"m","port":7000,"target":{{"unix":"/run/m.sock"}},"lease_uid":"u","lease_key":"{}"}}"#,
            "ab".repeat(32)
        ))
        .unwrap();
        assert_eq!(minimal.listen, default_listen());
        assert_eq!(minimal.limits, Limits::default());
        let bad = serde_json::from_str::<SessionSpec>(
            r#"{"name":"m","port":7000,"target":{"tcp":"h:1"},"lease_uid":"u","lease_key":"zz"}"#,
        );
        assert!(bad.unwrap_err().to_string().contains("64 hex digits"));
    }
}
