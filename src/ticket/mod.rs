//! Console tickets: short-lived, single-use, signed capabilities that a console URL carries.
//! Every way of asking for a URL mints one ([`crate::console::Minter`]), and both backends
//! verify them (the builtin proxy through `proxy/token.rs`, websockify through
//! contrib/websockify/vncd_ticket.py); docs/TICKETS.md has the design.
//!
//! The folder splits by job: [`format`](self::format) is the pure text format (mint,
//! verify, v1 and v2), `keys.rs` the master key file and lease keys, `nonces.rs` the
//! used-ticket stores.
//!
//! # Key hierarchy
//!
//! ```text
//! master key   32 random bytes, kept by vncd only (0600 file in the state dir standalone)
//!   └─ lease key = HMAC-SHA256(master, LEASE_KEY_INPUT(session, lease uid))
//!        given to exactly one proxy (its 0600 key file); vncd mints with it, the proxy verifies
//!        └─ ticket = "v1." EXPIRY "." NONCE "." MAC
//!                  or "v2." LEASEUID "." ROLE "." FLAGS "." EXPIRY "." NONCE "." MAC
//! ```
//!
//! The proxy never holds the master key, so a compromised proxy can mint tickets only for its
//! own lease. A new lease, or a retarget (which gets a new lease uid), derives a new lease
//! key, so every ticket minted before it stops verifying at once; no revocation list exists
//! or is needed.
//!
//! # Exact encodings (the websockify plugin, contrib/websockify/vncd_ticket.py, matches these
//! byte for byte; tests/data/ticket-vectors.json pins them)
//!
//! `LEASE_KEY_INPUT(session, uid)` is the bytes
//! `"vncd lease key v1" 0x00 || be32(len(session)) || session || be32(len(uid)) || uid`,
//! where `session` and `uid` are UTF-8 and `be32` is a 4-byte big-endian length. The domain
//! string keeps lease keys apart from any other use of the master key; the length prefixes
//! keep `("ab", "c")` and `("a", "bc")` apart.
//!
//! A ticket is ASCII, URL-safe without escaping (`A-Z a-z 0-9 - _ .`), 90 bytes or fewer:
//!
//! - `EXPIRY`: the expiry as decimal unix seconds, no sign, no leading zeros;
//! - `NONCE`: 16 random bytes, base64url (RFC 4648 §5) without padding: 22 characters;
//! - `MAC`: HMAC-SHA256(lease key, the ASCII text `"v1." EXPIRY "." NONCE`), base64url without
//!   padding: 43 characters.
//!
//! The MAC covers the ticket text as sent, so any change to the version, expiry or nonce
//! breaks it. Decoding is strict (canonical base64url only, exact lengths), so there is one
//! spelling per ticket. A ticket is valid while `now < EXPIRY` and its MAC verifies; the MAC
//! is checked (in constant time, by `ring::hmac::verify`) before the expiry, so `Expired`
//! is only ever said of an authentic ticket.
//!
//! A **v2** ticket (`v2.LEASEUID.ROLE.FLAGS.EXPIRY.NONCE.MAC`) also names its lease and what
//! it grants, all inside the MAC: `LEASEUID` is the lease uid (1-64 of `0-9 a-z -`), so a
//! gateway port can find the one lease key to check (one MAC per connection, never one per
//! lease); `ROLE` is `c` (control) or `v` (view); `FLAGS` is a canonical decimal bit set
//! whose bit 0 is *force* (close an exclusive holder) and whose other bits are reserved (a
//! ticket with one set is malformed). The MAC is HMAC-SHA256(lease key, everything before the
//! last dot). v1 tickets stay valid on session ports and mean *control, no force*.
//!
//! Every ticket's expiry must lie within [`MAX_TTL`] plus [`MAX_CLOCK_SKEW_SECS`] of the
//! verifier's clock ([`TicketError::TooFarAhead`] otherwise): no minter issues longer ones,
//! and the bound keeps every used-ticket record prunable (test:
//! `ticket::tests::an_expiry_beyond_the_longest_ttl_is_refused`).
//!
//! # Single use
//!
//! A [`NonceStore`] records each accepted ticket's `(EXPIRY, NONCE)`; the second use is
//! [`TicketError::Replayed`]. Records are forgotten [`PRUNE_GRACE_SECS`] after their ticket
//! expired, since an expired ticket is refused anyway: memory and files stay bounded by the
//! tickets minted in one TTL. To close the race "verify, stall past expiry, the record is
//! pruned, record again", a store reads the clock again *after* recording and refuses a
//! ticket that has expired by then. [`MemoryNonces`] serves a proxy that is one process (the
//! builtin); [`DirNonces`] serves proxies that fork per connection (websockify), using one
//! `O_CREAT|O_EXCL` file per ticket named `EXPIRY.NONCE` (the same names the Python plugin
//! uses, so either can consume from the same directory).
//!
//! Errors never contain ticket text, so refusals can be logged as they are.

pub mod format;
mod keys;
mod nonces;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use format::{
    Grant, MAX_LEASE_UID_LEN, Role, Ticket, Verified, check, lease_uid_of, mint, mint_v2, verify,
    verify_lease,
};
pub use keys::{KEY_FILE_MAGIC, KeyFileError, LeaseKey, MasterKey, lease_key, websockify_key_file};
pub use nonces::{Clock, DirNonces, MemoryNonces, NonceStore, system_clock, unix_now};

/// Length of the master key and of every lease key.
pub const KEY_LEN: usize = 32;
/// Random bytes per ticket: enough that two tickets never share a nonce.
pub const NONCE_LEN: usize = 16;
/// The first field of a v1 ticket.
pub const VERSION: &str = "v1";
/// The first field of a v2 ticket (it names its lease and carries a [`Grant`]).
pub const VERSION_2: &str = "v2";
/// The longest TTL vncd mints (`--ticket-ttl`, `?ttl=`, a request's `ttlSeconds`).
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// How far a minter's clock may run ahead of a verifier's: minter and verifier run on one
/// host, so a few seconds would do; 30 s forgives a clock that NTP is slewing.
pub const MAX_CLOCK_SKEW_SECS: u64 = 30;
/// `--ticket-ttl`'s default: long enough to open a URL, short enough that a leaked one is stale.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// How long a used nonce is remembered after its ticket expired. The post-record clock check
/// already refuses stragglers; the grace also covers a wall clock stepped back a little.
pub const PRUNE_GRACE_SECS: u64 = 60;

/// Why a ticket was refused. The messages name the reason only, never the ticket.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    #[error("malformed ticket")]
    Malformed,
    #[error("ticket signature does not verify (forged, altered, or minted for an earlier lease)")]
    BadSignature,
    #[error("ticket expired")]
    Expired,
    /// An authentic ticket whose expiry is further ahead than any vncd mints.
    #[error("ticket expiry lies beyond the longest ticket TTL")]
    TooFarAhead,
    #[error("ticket already used")]
    Replayed,
    /// The nonce store could not record the ticket, so it is refused (fail closed).
    #[error("cannot record ticket use in {path}: {source}")]
    NonceStore { path: PathBuf, source: io::Error },
    /// No nonce without the OS's randomness: minting fails rather than weakening tickets.
    #[error("no random bytes from the operating system: {0}")]
    Rng(String),
}

#[cfg(test)]
mod tests;
