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
    /// is recorded here.
    pub uid: String,
    /// The session's secret: the proxy refuses websocket clients that do not present it.
    /// Kept only in files of mode 0600 (this lease file and the proxy's token file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The proxy process, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcRef>,
    pub allocated_at: Timestamp,
}

impl Lease {
    /// A fresh lease with a random uid.
    pub fn new(session: &str, port: u16, target: Endpoint, now: Timestamp) -> Self {
        Lease {
            session: session.to_owned(),
            port,
            target,
            uid: random_hex(8),
            token: Some(random_hex(16)),
            process: None,
            allocated_at: now,
        }
    }
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

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    // getrandom fails only when the OS has no entropy source at all; a time-based
    // fallback still keeps uids distinct in practice.
    if getrandom::fill(&mut buf).is_err() {
        let t = Timestamp::now().as_nanosecond().to_le_bytes();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = t[i % t.len()] ^ (std::process::id() as u8).wrapping_add(i as u8);
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
