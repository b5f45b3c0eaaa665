//! Port leases: the durable half of vncd's actual state.
//!
//! A lease is written to its store before its proxy starts and before any URL is
//! reported, so a restart can always tell which ports are held and by whom.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::session::Endpoint;

/// Proves a process is the one we started: a pid alone can be reused by the kernel,
/// a pid plus its start time (clock ticks since boot) cannot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcRef {
    pub pid: i32,
    pub start_time: u64,
}

/// One session's hold on one port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    pub session: String,
    pub port: u16,
    pub target: Endpoint,
    /// Unique per lease. The proxy carries it in its environment, which is how an
    /// orphan search tells our processes from everyone else's, even before the pid
    /// is recorded here. It is also half of the lease's ticket key (see
    /// [`crate::ticket::MasterKey::lease_key`]): a new lease, or a retarget, gets a new
    /// uid and so invalidates every console ticket minted before. State files from
    /// before tickets carry a `token` here, which is ignored. A lease made for a target
    /// instance (a libvirt domain's UUID, [`crate::session::Desired::instance`]) ends in
    /// `-` and a digest of it ([`Lease::for_instance`]): the uid is opaque everywhere
    /// else (markers, status, key derivation), and keeping the instance inside it leaves
    /// every store and status format as it was.
    pub uid: String,
    /// The proxy process, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcRef>,
    pub allocated_at: Timestamp,
    /// When the port was leased on the boot clock, which cannot be stepped back (see
    /// [`crate::clock`]): what `maxLifetimeSeconds` is measured on within one boot.
    /// Missing in leases written by an older vncd; their age follows the wall clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_boot: Option<crate::clock::BootInstant>,
}

impl Lease {
    /// A fresh lease of `port` for a TCP target on loopback, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(session: &str, port: u16) -> Self {
        Lease::new(
            session,
            port,
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 5901,
            },
            Timestamp::now(),
        )
    }

    /// This lease, made for `instance` (see [`Lease::uid`]): its uid gets the instance's
    /// digest appended. `None` leaves it as it is.
    #[must_use]
    pub fn for_instance(mut self, instance: Option<&str>) -> Self {
        if let Some(i) = instance {
            self.uid = format!("{}-{}", self.uid, instance_tag(i));
        }
        self
    }

    /// Whether this lease was made for `instance`: a session whose target became another
    /// instance (a domain recreated under the same name, at the same address) needs a
    /// new lease uid, so that no ticket minted for the old one opens the new one.
    pub fn made_for(&self, instance: Option<&str>) -> bool {
        let tag = self.uid.split_once('-').map(|(_, t)| t);
        match (tag, instance) {
            (None, None) => true,
            (Some(t), Some(i)) => t == instance_tag(i),
            _ => false,
        }
    }

    /// A fresh lease with a random uid, allocated now on the boot clock too.
    pub fn new(session: &str, port: u16, target: Endpoint, now: Timestamp) -> Self {
        Lease {
            allocated_boot: crate::clock::BootInstant::now(),
            ..Self::at(session, port, target, now, None)
        }
    }

    /// A fresh lease with a random uid, allocated at the given moments (no clock is read).
    pub fn at(
        session: &str,
        port: u16,
        target: Endpoint,
        now: Timestamp,
        boot: Option<crate::clock::BootInstant>,
    ) -> Self {
        Lease {
            session: session.to_owned(),
            port,
            target,
            uid: random_hex(8),
            process: None,
            allocated_at: now,
            allocated_boot: boot,
        }
    }
}

/// 16 hex digits of SHA-256 over `instance`: long enough that no two instances a host
/// ever sees share one by chance (the UUIDs themselves are chosen by whoever defines the
/// domain, so the digest guards against accidents, not against a chosen UUID, which the
/// definer could simply reuse anyway).
fn instance_tag(instance: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, instance.as_bytes());
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Why and when a session expired. Kept after its lease is released, so a manifest
/// that is still present does not start the session again until its spec changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Expiry {
    /// The spec generation that expired.
    pub generation: i64,
    /// `IdleTimeout` or `MaxLifetime`.
    pub reason: String,
    pub message: String,
    pub at: Timestamp,
}

/// The system random number generator failed: no lease (and so no ticket key) can be made.
#[derive(Debug, thiserror::Error)]
#[error(
    "the system random number generator failed ({0}); refusing to make a guessable lease identity"
)]
pub struct RngError(getrandom::Error);

/// `n` random bytes as lowercase hex, or an error if the system RNG fails. There is no
/// fallback: a token derived from the time and the pid could be guessed by anyone who
/// can see when a session started.
pub fn try_random_hex(n: usize) -> Result<String, RngError> {
    hex_from(n, getrandom::fill)
}

fn hex_from(
    n: usize,
    fill: impl FnOnce(&mut [u8]) -> Result<(), getrandom::Error>,
) -> Result<String, RngError> {
    let mut buf = vec![0u8; n];
    fill(&mut buf).map_err(RngError)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// `n` random bytes as lowercase hex.
///
/// Fails closed: if the system RNG fails (the OS has no entropy source at all, or a
/// seccomp filter forbids getrandom(2)) this panics instead of making a guessable token.
/// `vncd run` and `vncd kube` check the RNG at start ([`check_rng`]), so this can only
/// happen if it breaks later.
pub fn random_hex(n: usize) -> String {
    match try_random_hex(n) {
        Ok(hex) => hex,
        Err(e) => panic!("{e}"),
    }
}

/// Fails at start, with a clear error, when the system RNG does not work.
pub fn check_rng() -> Result<(), RngError> {
    try_random_hex(16).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_knows_the_instance_it_was_made_for() {
        let plain = Lease::for_test("vm1", 6100);
        assert!(plain.made_for(None));
        assert!(!plain.made_for(Some("uuid-a")));
        let a = Lease::for_test("vm1", 6100).for_instance(Some("uuid-a"));
        assert!(a.made_for(Some("uuid-a")));
        assert!(
            !a.made_for(Some("uuid-b")),
            "a recreated domain is another instance"
        );
        assert!(!a.made_for(None));
        assert_eq!(a.uid.len(), 16 + 1 + 16, "{}", a.uid);
        // Two leases for the same instance still differ (the random half).
        let a2 = Lease::for_test("vm1", 6100).for_instance(Some("uuid-a"));
        assert_ne!(a.uid, a2.uid);
        assert!(a2.made_for(Some("uuid-a")));
    }

    #[test]
    fn a_failing_rng_is_an_error_never_a_fallback() {
        let failed = hex_from(16, |_| Err(getrandom::Error::UNSUPPORTED));
        let e = failed.expect_err("no fallback token");
        assert!(
            e.to_string().contains("random number generator failed"),
            "{e}"
        );
        let a = try_random_hex(16).expect("rng");
        let b = try_random_hex(16).expect("rng");
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(check_rng().is_ok());
    }
}
