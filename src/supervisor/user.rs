//! `--proxy-user USER[:GROUP]`: the identity every proxy runs as.
//!
//! vncd itself may need root (ports below 1024, libvirt, a state directory under /var/lib),
//! but a proxy parses HTTP and websocket frames from anyone who can reach its port: it is
//! the part most exposed to attack. Run as an unprivileged user, a compromised proxy
//! cannot read vncd's state files (ticket.key, the master key every lease key derives from,
//! and leases.json and sessions.json, all 0600 root), signal vncd or other processes, or write outside its own
//! stats directory. The switch is std's `CommandExt::uid`/`gid` (no `unsafe`); when vncd
//! is root, std also drops the supplementary groups and the kernel every capability. A
//! non-root vncd with CAP_SETUID and CAP_SETGID can switch too, but std then keeps vncd's
//! supplementary groups in the proxy (it can only drop them as root): give vncd's user no
//! group the proxies should not have.

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
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(path)?;
        let mode = meta.permissions().mode();
        Ok(if meta.uid() == self.uid {
            mode & 0o400 != 0
        } else if meta.gid() == self.gid {
            mode & 0o040 != 0
        } else {
            mode & 0o004 != 0
        })
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
