//! `--proxy-user USER[:GROUP]`: the identity every proxy runs as, and `--proxy-uids LO-HI`:
//! a uid of its own for each websockify proxy.
//!
//! vncd itself may need root (ports below 1024, libvirt, a state directory under /var/lib),
//! but a proxy parses HTTP and websocket frames from anyone who can reach its port: it is
//! the part most exposed to attack. Run as an unprivileged user, a compromised proxy
//! cannot read vncd's state files (ticket.key, the master key every lease key derives from,
//! and leases.json and sessions.json, all 0600 root), signal vncd or other processes, or
//! write outside its own stats directory. The switch is std's `CommandExt::uid`/`gid` (no
//! `unsafe`); when vncd is root, std also drops the supplementary groups and the kernel
//! every capability. A non-root vncd with CAP_SETUID and CAP_SETGID can switch too, but std
//! then keeps vncd's supplementary groups in the proxy (it can only drop them as root): give
//! vncd's user no group the proxies should not have.
//!
//! websockify re-reads its key file by path, so it must own it. With one shared uid, a
//! compromised websockify could read every other session's key (and mint tickets for it),
//! signal the other proxies and ptrace them. [`ProxyUids`] gives each websockify proxy a
//! uid of its own, derived from its lease's port (see [`ProxyUids::uid_for`]): nothing to
//! persist, the same uid after a restart of vncd, and never one uid for two live leases
//! (their ports differ; the pool fits in the range). tests/proxy_isolation.rs proves that
//! proxy A cannot read B's key file or log, signal B, or read B's memory.

use std::fmt;
use std::path::Path;

use nix::unistd::{Gid, Group, Uid, User, chown};

/// A resolved `--proxy-user`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyUser {
    /// The name as given, for messages.
    pub spec: String,
    pub uid: u32,
    pub gid: u32,
}

/// `--proxy-uids LO-HI`: the uids websockify proxies run as, one per lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyUids {
    pub lo: u32,
    pub hi: u32,
}

/// Why a `--proxy-uids` value is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyUidsError {
    #[error("--proxy-uids {0:?}: give LO-HI, two uids (e.g. 1879048192-1879049215)")]
    Syntax(String),
    #[error("--proxy-uids {0:?}: LO must not be above HI")]
    Reversed(String),
    #[error(
        "--proxy-uids {0:?}: uid 0 (root) and 4294967295 (the kernel's \"no uid\") cannot be proxy uids"
    )]
    Reserved(String),
}

impl std::str::FromStr for ProxyUids {
    type Err = ProxyUidsError;

    fn from_str(v: &str) -> Result<Self, Self::Err> {
        let syntax = || ProxyUidsError::Syntax(v.to_owned());
        let (lo, hi) = v.trim().split_once('-').ok_or_else(syntax)?;
        let lo: u32 = lo.trim().parse().map_err(|_| syntax())?;
        let hi: u32 = hi.trim().parse().map_err(|_| syntax())?;
        if lo > hi {
            return Err(ProxyUidsError::Reversed(v.to_owned()));
        }
        if lo == 0 || hi == u32::MAX {
            return Err(ProxyUidsError::Reserved(v.to_owned()));
        }
        Ok(ProxyUids { lo, hi })
    }
}

impl fmt::Display for ProxyUids {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

impl ProxyUids {
    /// How many uids the range holds.
    pub fn count(&self) -> u64 {
        u64::from(self.hi - self.lo) + 1
    }

    /// The uid of the proxy serving `port`: `LO + port mod len`. Any `len` consecutive
    /// ports get distinct uids, so leases inside a pool no larger than the range never
    /// share one (vncd checks the pool against the range at start), and the uid follows
    /// from the lease alone: a restarted vncd knows the uids of the proxies it adopts.
    /// A lease outside the pool may map to a live proxy's uid; the supervisor refuses to
    /// start it then ([`super::SpawnError::UidInUse`]).
    pub fn uid_for(&self, port: u16) -> u32 {
        let offset = u64::from(port) % self.count();
        // offset < len <= 2^32 - 1, and lo + offset <= hi.
        self.lo + u32::try_from(offset).unwrap_or(0)
    }

    /// `base` with the uid of the proxy serving `port` (its group stays `base`'s).
    pub fn user_for(&self, base: &ProxyUser, port: u16) -> ProxyUser {
        let uid = self.uid_for(port);
        ProxyUser {
            spec: format!("{} uid {uid} (--proxy-uids {self})", base.spec),
            uid,
            gid: base.gid,
        }
    }
}

/// Why `--proxy-user` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProxyUserError {
    #[error("--proxy-user {spec:?}: no such user")]
    NoUser { spec: String },
    #[error("--proxy-user {spec:?}: no such group {group:?}")]
    NoGroup { spec: String, group: String },
    #[error("--proxy-user {spec:?}: cannot look it up: {source}")]
    Lookup {
        spec: String,
        #[source]
        source: nix::Error,
    },
    #[error("--proxy-user {spec:?} is root (uid 0): give an unprivileged user such as nobody")]
    Root { spec: String },
    #[error(
        "--proxy-user {spec:?} needs vncd to hold {missing} (it runs as uid {uid}): to start \
         proxies as another user (SETUID, SETGID), hand them their files (CHOWN), and still \
         identify and stop them, which means reading /proc/PID/environ and /proc/PID/fd of \
         another user's process (SYS_PTRACE, DAC_READ_SEARCH) and signalling it (KILL). Full \
         root has them all; in a container add them to securityContext.capabilities. Or drop \
         the flag to run proxies as vncd's own user"
    )]
    NotRoot {
        spec: String,
        uid: u32,
        missing: String,
    },
    #[error(
        "--proxy-user {spec:?}: vncd has ambient capabilities ({ambient:#x}), which every \
         proxy would inherit across exec (CAP_SETUID would let it become any user). Give vncd \
         the capabilities without AmbientCapabilities (run it as root with a \
         CapabilityBoundingSet instead), or drop --proxy-user"
    )]
    AmbientCapabilities { spec: String, ambient: u64 },
}

/// The capabilities supervising proxies of another uid takes, as bits of
/// /proc/self/status's capability masks, with their names.
const NEEDED_CAPS: [(u64, &str); 6] = [
    (1 << 0, "CAP_CHOWN"),
    (1 << 2, "CAP_DAC_READ_SEARCH"),
    (1 << 5, "CAP_KILL"),
    (1 << 6, "CAP_SETGID"),
    (1 << 7, "CAP_SETUID"),
    (1 << 19, "CAP_SYS_PTRACE"),
];

/// A capability mask of this process from /proc/self/status (`CapEff`, `CapAmb`).
fn own_caps(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

impl ProxyUser {
    /// Resolves `USER[:GROUP]` (names or numeric ids). Without a group, the user's primary
    /// group. A named user must exist; no user may be root; vncd must be able to switch
    /// (root, or CAP_SETUID and CAP_SETGID without ambient capabilities).
    pub fn resolve(spec: &str) -> Result<ProxyUser, ProxyUserError> {
        let lookup = |source| ProxyUserError::Lookup {
            spec: spec.to_owned(),
            source,
        };
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        // Numeric ids need no passwd entry (a container image may have no /etc/passwd);
        // without a group, a numeric user's group is the same number.
        let (uid, primary_gid) = match user.parse::<u32>() {
            Ok(id) => {
                let found = User::from_uid(Uid::from_raw(id)).ok().flatten();
                (Uid::from_raw(id), found.map_or(id, |u| u.gid.as_raw()))
            }
            Err(_) => {
                let found = User::from_name(user).map_err(lookup)?.ok_or_else(|| {
                    ProxyUserError::NoUser {
                        spec: spec.to_owned(),
                    }
                })?;
                (found.uid, found.gid.as_raw())
            }
        };
        let gid = match group {
            None => primary_gid,
            Some(g) => match g.parse::<u32>() {
                Ok(id) => id,
                Err(_) => Group::from_name(g)
                    .map_err(lookup)?
                    .ok_or_else(|| ProxyUserError::NoGroup {
                        spec: spec.to_owned(),
                        group: g.to_owned(),
                    })?
                    .gid
                    .as_raw(),
            },
        };
        if uid.is_root() {
            return Err(ProxyUserError::Root {
                spec: spec.to_owned(),
            });
        }
        // Without these vncd would start proxies it then cannot recognise as its own:
        // it would release their leases and start more, leaking a proxy per pass. Root
        // drops every capability when it switches the proxy to another uid. A non-root
        // vncd keeps ambient capabilities across the proxy's exec: refused below.
        let me = Uid::effective();
        let effective = own_caps("CapEff");
        let missing: Vec<&str> = NEEDED_CAPS
            .iter()
            .filter(|(bit, _)| effective & bit == 0)
            .map(|(_, name)| *name)
            .collect();
        if !missing.is_empty() {
            return Err(ProxyUserError::NotRoot {
                spec: spec.to_owned(),
                uid: me.as_raw(),
                missing: missing.join(", "),
            });
        }
        let ambient = own_caps("CapAmb");
        if ambient != 0 {
            return Err(ProxyUserError::AmbientCapabilities {
                spec: spec.to_owned(),
                ambient,
            });
        }
        Ok(ProxyUser {
            spec: spec.to_owned(),
            uid: uid.as_raw(),
            gid,
        })
    }

    /// Whether this user (uid, gid, no supplementary groups: what a proxy has) may read
    /// `path` by its permission bits, e.g. the TLS key a proxy must load.
    pub fn can_read(&self, path: &Path) -> std::io::Result<bool> {
        Ok(self.may(&std::fs::metadata(path)?, 0o4))
    }

    /// Whether this user may reach things inside `dir` by path: the search bit on `dir`
    /// and on every directory above it. A proxy opens its nonce and stats files by path,
    /// so under a parent only root can enter it refuses every ticket (403) while its port
    /// listens; vncd checks this at start instead.
    pub fn can_search(&self, dir: &Path) -> std::io::Result<bool> {
        let dir = std::fs::canonicalize(dir)?;
        for d in dir.ancestors() {
            if !self.may(&std::fs::metadata(d)?, 0o1) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether the permission bits of `meta` grant this user `bit` (4 read, 1 search).
    fn may(&self, meta: &std::fs::Metadata, bit: u32) -> bool {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let mode = meta.permissions().mode();
        if meta.uid() == self.uid {
            mode & (bit << 6) != 0
        } else if meta.gid() == self.gid {
            mode & (bit << 3) != 0
        } else {
            mode & bit != 0
        }
    }

    /// Makes `path` (a token file, the stats directory) this user's own. Its mode is left
    /// as it is (0600 or 0700), so nobody else can read it.
    pub fn give(&self, path: &Path) -> std::io::Result<()> {
        chown(
            path,
            Some(Uid::from_raw(self.uid)),
            Some(Gid::from_raw(self.gid)),
        )
        .map_err(std::io::Error::from)
    }
}

impl fmt::Display for ProxyUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (uid {}, gid {})", self.spec, self.uid, self.gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_uids_parse_and_give_distinct_uids_to_any_pool_that_fits() {
        let r: ProxyUids = "4000000-4000009".parse().expect("valid");
        assert_eq!(r.count(), 10);
        let uids: std::collections::BTreeSet<u32> = (6105..6115).map(|p| r.uid_for(p)).collect();
        assert_eq!(uids.len(), 10, "10 consecutive ports, 10 uids");
        assert!(uids.iter().all(|u| (4_000_000..=4_000_009).contains(u)));
        assert_eq!(r.uid_for(6105), r.uid_for(6105), "deterministic");
        let one: ProxyUids = "70000-70000".parse().expect("a single uid");
        assert_eq!(one.uid_for(6100), 70000);
        for (bad, want) in [
            ("5", "give LO-HI"),
            ("a-b", "give LO-HI"),
            ("9-3", "LO must not be above HI"),
            ("0-10", "uid 0"),
            ("10-4294967295", "uid 0"),
        ] {
            let e = bad.parse::<ProxyUids>().expect_err(bad).to_string();
            assert!(e.contains(want) && e.contains(bad), "{bad}: {e}");
        }
        let base = ProxyUser {
            spec: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        let u = r.user_for(&base, 6107);
        assert_eq!((u.uid, u.gid), (r.uid_for(6107), 65534));
    }

    /// The trap a state dir under a root-only parent set: the proxies could not reach
    /// their nonce files, refused every ticket, and the session still showed Ready.
    #[test]
    fn a_directory_under_a_parent_only_root_can_enter_is_out_of_reach() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o711)).unwrap();
        let nobody = ProxyUser {
            spec: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!nobody.can_search(&state).unwrap(), "through a 0700 parent");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        assert!(nobody.can_search(&state).unwrap(), "through a 0711 parent");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!nobody.can_search(&state).unwrap(), "into a 0700 directory");
    }

    #[test]
    fn resolves_names_ids_and_groups_and_refuses_root() {
        if !Uid::effective().is_root() {
            return;
        }
        let u = ProxyUser::resolve("nobody").expect("nobody exists");
        assert_eq!(u.uid, 65534);
        let by_id = ProxyUser::resolve("65534:0").expect("numeric");
        assert_eq!((by_id.uid, by_id.gid), (65534, 0));
        // No passwd entry needed for numeric ids.
        assert_eq!(
            own_caps("CapAmb"),
            0,
            "tests run without ambient capabilities"
        );
        let all: u64 = NEEDED_CAPS.iter().map(|(bit, _)| bit).sum();
        assert_eq!(own_caps("CapEff") & all, all, "tests run as full root");
        let unnamed = ProxyUser::resolve("4000123").expect("numeric without an entry");
        assert_eq!((unnamed.uid, unnamed.gid), (4000123, 4000123));
        assert!(matches!(
            ProxyUser::resolve("root"),
            Err(ProxyUserError::Root { .. })
        ));
        assert!(matches!(
            ProxyUser::resolve("no-such-user-vncd"),
            Err(ProxyUserError::NoUser { .. })
        ));
        let e = ProxyUser::resolve("nobody:no-such-group-vncd").expect_err("no group");
        assert!(e.to_string().contains("no such group"), "{e}");
        // Readability by permission bits.
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "k").expect("write");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(!u.can_read(&key).expect("stat"));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(u.can_read(&key).expect("stat"));
    }
}
