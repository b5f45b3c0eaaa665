//! Console tickets (issue #12): short-lived, single-use, signed capabilities that a console
//! URL carries instead of the long-lived per-lease token.
//!
//! **Groundwork, not wired in yet.** Nothing in the proxy, the supervisor, the HTTP server or
//! the CLI uses this module so far; docs/TICKETS.md lists what the wiring must change.
//!
//! # Key hierarchy
//!
//! ```text
//! master key   32 random bytes, kept by vncd only (0600 file in the state dir standalone)
//!   └─ lease key = HMAC-SHA256(master, LEASE_KEY_INPUT(session, lease uid))
//!        given to exactly one proxy (its 0600 key file); vncd mints with it, the proxy verifies
//!        └─ ticket = "v1." EXPIRY "." NONCE "." MAC
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

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nix::fcntl::OFlag;
use ring::hmac;

use crate::session::Endpoint;

/// Length of the master key and of every lease key.
pub const KEY_LEN: usize = 32;
/// Random bytes per ticket: enough that two tickets never share a nonce.
pub const NONCE_LEN: usize = 16;
/// The ticket format version, the first field of every ticket.
pub const VERSION: &str = "v1";
/// `--ticket-ttl`'s default: long enough to open a URL, short enough that a leaked one is stale.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// How long a used nonce is remembered after its ticket expired. The post-record clock check
/// already refuses stragglers; the grace also covers a wall clock stepped back a little.
pub const PRUNE_GRACE_SECS: u64 = 60;

/// The domain-separation prefix of [`lease_key`]'s input.
const LEASE_KEY_DOMAIN: &[u8] = b"vncd lease key v1\0";
/// `v1.` + 20 digits + `.` + 22 + `.` + 43. Longer input is refused before any parsing.
const MAX_TICKET_LEN: usize = 3 + 20 + 1 + 22 + 1 + 43;
const NONCE_B64_LEN: usize = 22;
const MAC_B64_LEN: usize = 43;

/// The first line of a websockify key file (see [`websockify_key_file`]).
pub const KEY_FILE_MAGIC: &str = "vncd-lease-key v1";

/// Why a ticket was refused. The messages name the reason only, never the ticket.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    #[error("malformed ticket")]
    Malformed,
    #[error("ticket signature does not verify (forged, altered, or minted for an earlier lease)")]
    BadSignature,
    #[error("ticket expired")]
    Expired,
    #[error("ticket already used")]
    Replayed,
    /// The nonce store could not record the ticket, so it is refused (fail closed).
    #[error("cannot record ticket use in {path}: {source}")]
    NonceStore { path: PathBuf, source: io::Error },
    /// No nonce without the OS's randomness: minting fails rather than weakening tickets.
    #[error("no random bytes from the operating system: {0}")]
    Rng(String),
}

/// Why the master key file cannot be used. Every message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error(
        "ticket master key {path} is a symbolic link; vncd only uses a regular file it can trust: \
         remove the link and vncd creates a new key (tickets already handed out stop working)"
    )]
    Symlink { path: PathBuf },
    #[error(
        "ticket master key {path} is not a regular file; remove it and vncd creates a new key \
         (tickets already handed out stop working)"
    )]
    NotRegular { path: PathBuf },
    #[error(
        "ticket master key {path} is owned by uid {owner}, but vncd runs as uid {me}; another \
         user could have written it: remove it so vncd creates its own, or chown it"
    )]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "ticket master key {path} has mode {mode:04o}, so group or others can read or change \
         it; run `chmod 600 {path}`, and if someone else may have read it, remove it instead \
         so vncd creates a new one"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "ticket master key {path} is {size} bytes, a key is exactly 32; it is damaged or not a \
         vncd key: remove it and vncd creates a new one (tickets already handed out stop working)"
    )]
    WrongSize { path: PathBuf, size: u64 },
    #[error("ticket master key {path}: cannot {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error(
        "cannot create ticket master key {path}: no random bytes from the operating system: {reason}"
    )]
    Rng { path: PathBuf, reason: String },
}

/// vncd's secret: the root of every lease key. Its `Debug` never shows the bytes.
pub struct MasterKey([u8; KEY_LEN]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// A key with the given bytes (tests, or a key kept somewhere other than a file).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        MasterKey(bytes)
    }

    /// The lease key of one lease: see [`lease_key`].
    pub fn lease_key(&self, session: &str, lease_uid: &str) -> LeaseKey {
        lease_key(self, session, lease_uid)
    }

    /// Loads the key at `path`, creating it (32 random bytes, mode 0600) if nothing is
    /// there. Refuses anything it cannot trust: a symlink, a non-regular file, a file of
    /// another owner, a file group or others may read or write, a file of the wrong size.
    ///
    /// Creation writes a temporary file (`O_CREAT|O_EXCL|O_NOFOLLOW`, 0600), syncs it and
    /// hard-links it to `path`, which fails if `path` exists: a crash never leaves a short
    /// key behind, and of two racing creators one wins and the other loads its key.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyFileError> {
        for _ in 0..3 {
            match Self::load(path) {
                Err(KeyFileError::Io { source, .. })
                    if source.kind() == io::ErrorKind::NotFound => {}
                other => return other,
            }
            let mut bytes = [0u8; KEY_LEN];
            getrandom::fill(&mut bytes).map_err(|e| KeyFileError::Rng {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            match create_exclusive(path, &bytes) {
                Ok(()) => return Ok(MasterKey(bytes)),
                // Someone else created it first: load theirs.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(KeyFileError::Io {
                        path: path.to_owned(),
                        action: "create it",
                        source,
                    });
                }
            }
        }
        // Appears and disappears under us three times: someone is interfering.
        Err(KeyFileError::Io {
            path: path.to_owned(),
            action: "create it",
            source: io::Error::other("the file keeps appearing and disappearing"),
        })
    }

    /// Loads an existing key, with the checks of [`MasterKey::load_or_create`].
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let io_err = |action, source| KeyFileError::Io {
            path: path.to_owned(),
            action,
            source,
        };
        // O_NOFOLLOW: a symlink is refused (ELOOP), never followed. O_NONBLOCK: a FIFO planted
        // here fails the regular-file check below instead of blocking the open.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).bits())
            .open(path);
        let mut file = match file {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
                return Err(KeyFileError::Symlink {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(io_err("open it", e)),
        };
        let meta = file.metadata().map_err(|e| io_err("stat it", e))?;
        if !meta.file_type().is_file() {
            return Err(KeyFileError::NotRegular {
                path: path.to_owned(),
            });
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(KeyFileError::Owner {
                path: path.to_owned(),
                owner: meta.uid(),
                me,
            });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() != KEY_LEN as u64 {
            return Err(KeyFileError::WrongSize {
                path: path.to_owned(),
                size: meta.len(),
            });
        }
        // Read one byte more than a key, so a file that grew since fstat is still caught.
        let mut buf = Vec::with_capacity(KEY_LEN + 1);
        (&mut file)
            .take(KEY_LEN as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| io_err("read it", e))?;
        let bytes: [u8; KEY_LEN] =
            buf.try_into()
                .map_err(|b: Vec<u8>| KeyFileError::WrongSize {
                    path: path.to_owned(),
                    size: b.len() as u64,
                })?;
        Ok(MasterKey(bytes))
    }
}

/// Writes `bytes` to a fresh temporary file beside `path` and links it to `path`;
/// `AlreadyExists` if `path` exists (even as a dangling symlink).
fn create_exclusive(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.new.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        crate::lease::random_hex(4)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
            .open(&tmp)?;
        // The umask can only clear bits; make it exactly 0600 so the loader accepts it.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::hard_link(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    let _ = fs::remove_file(&tmp);
    result
}

/// One lease's key: what its proxy holds and what vncd mints its tickets with. Its `Debug`
/// never shows the bytes.
#[derive(Clone)]
pub struct LeaseKey([u8; KEY_LEN]);

impl fmt::Debug for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseKey(<redacted>)")
    }
}

impl LeaseKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        LeaseKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Lowercase hex, the form key files carry.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (either case; surrounding ASCII whitespace ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let t = text.trim_ascii().as_bytes();
        // Digits only: `from_str_radix` alone would take a sign ("+1").
        if t.len() != 2 * KEY_LEN || !t.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let mut out = [0u8; KEY_LEN];
        for (o, pair) in out.iter_mut().zip(t.chunks_exact(2)) {
            *o = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(LeaseKey(out))
    }

    fn hmac(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.0)
    }
}

/// The key of the lease `lease_uid` of `session`: HMAC-SHA256 under the master key of the
/// domain-separated, length-prefixed input described in the module docs.
pub fn lease_key(master: &MasterKey, session: &str, lease_uid: &str) -> LeaseKey {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &master.0);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(LEASE_KEY_DOMAIN);
    for part in [session.as_bytes(), lease_uid.as_bytes()] {
        // Session names (DNS names) and uids (hex) are short: 4 GiB never occurs. Were it
        // to, the saturated prefix would still be followed by all the bytes.
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        ctx.update(&len.to_be_bytes());
        ctx.update(part);
    }
    let tag = ctx.sign();
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(tag.as_ref());
    LeaseKey(out)
}

/// A freshly minted ticket. Its `Debug` never shows the text.
#[derive(Clone)]
pub struct Ticket {
    /// What goes into the URL (`?token=...`): already URL-safe.
    pub text: String,
    /// Unix seconds; the ticket is refused from this second on.
    pub expires_at: u64,
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("text", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// What a verified ticket says: its nonce (for the [`NonceStore`]) and its expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    pub nonce: [u8; NONCE_LEN],
    pub expires_at: u64,
}

/// Mints a ticket for the lease whose key is `key`, valid from `now` (unix seconds) for
/// `ttl` rounded up to whole seconds (at least one). Fails only if the OS has no randomness.
pub fn mint(key: &LeaseKey, ttl: Duration, now: u64) -> Result<Ticket, TicketError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| TicketError::Rng(e.to_string()))?;
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    let expires_at = now.saturating_add(secs.max(1));
    Ok(Ticket {
        text: encode(key, expires_at, &nonce),
        expires_at,
    })
}

/// The ticket text for a given expiry and nonce (deterministic: the test vectors use it).
fn encode(key: &LeaseKey, expires_at: u64, nonce: &[u8; NONCE_LEN]) -> String {
    let signed = format!("{VERSION}.{expires_at}.{}", URL_SAFE_NO_PAD.encode(nonce));
    let tag = hmac::sign(&key.hmac(), signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// Checks a presented ticket against the lease key: format, MAC (constant time), then
/// expiry (`now` in unix seconds). Does not consume it; see [`NonceStore`] and [`check`].
pub fn verify(key: &LeaseKey, text: &str, now: u64) -> Result<Verified, TicketError> {
    if text.len() > MAX_TICKET_LEN {
        return Err(TicketError::Malformed);
    }
    let (signed, mac_b64) = text.rsplit_once('.').ok_or(TicketError::Malformed)?;
    let mut fields = signed.split('.');
    let (Some(version), Some(expiry), Some(nonce_b64), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(TicketError::Malformed);
    };
    if version != VERSION {
        return Err(TicketError::Malformed);
    }
    let expires_at = parse_decimal(expiry).ok_or(TicketError::Malformed)?;
    let nonce: [u8; NONCE_LEN] = decode_exact(nonce_b64, NONCE_B64_LEN)?;
    let mac: [u8; KEY_LEN] = decode_exact(mac_b64, MAC_B64_LEN)?;
    hmac::verify(&key.hmac(), signed.as_bytes(), &mac).map_err(|_| TicketError::BadSignature)?;
    if now >= expires_at {
        return Err(TicketError::Expired);
    }
    Ok(Verified { nonce, expires_at })
}

/// Verifies a ticket and consumes it in `store`: what a proxy does with every upgrade.
pub fn check(
    key: &LeaseKey,
    text: &str,
    now: u64,
    store: &dyn NonceStore,
) -> Result<Verified, TicketError> {
    let v = verify(key, text, now)?;
    store.consume(&v)?;
    Ok(v)
}

/// A canonical decimal u64: digits only, no leading zero (except "0" itself).
fn parse_decimal(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical { s.parse().ok() } else { None }
}

/// Strict base64url without padding, of exactly `chars` characters decoding to `N` bytes.
/// The engine refuses non-zero trailing bits, so each value has one spelling.
fn decode_exact<const N: usize>(s: &str, chars: usize) -> Result<[u8; N], TicketError> {
    if s.len() != chars {
        return Err(TicketError::Malformed);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| TicketError::Malformed)?;
    bytes.try_into().map_err(|_| TicketError::Malformed)
}

/// Unix seconds now; 0 if the clock is before 1970 (tickets minted then expire at once
/// on any sane clock, which fails closed).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where a nonce store reads the time: the system clock, or a test's.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock as a [`Clock`].
pub fn system_clock() -> Clock {
    Arc::new(unix_now)
}

/// Remembers which tickets were used, so each is accepted once.
pub trait NonceStore: Send + Sync {
    /// Records the use of a verified ticket. `Ok` the first time; [`TicketError::Replayed`]
    /// after that; [`TicketError::Expired`] if the ticket expired by the time it was recorded
    /// (this store's clock, read after recording); [`TicketError::NonceStore`] if the record
    /// cannot be written (the ticket is then refused).
    fn consume(&self, ticket: &Verified) -> Result<(), TicketError>;
}

/// An in-process nonce store, for a proxy that is a single process (the builtin proxy).
/// It forgets a nonce [`PRUNE_GRACE_SECS`] after its ticket expired, so it holds at most
/// the tickets used in one TTL plus the grace.
pub struct MemoryNonces {
    used: Mutex<BTreeSet<(u64, [u8; NONCE_LEN])>>,
    clock: Clock,
}

impl fmt::Debug for MemoryNonces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryNonces")
            .field("remembered", &self.len())
            .finish()
    }
}

impl Default for MemoryNonces {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryNonces {
    pub fn new() -> Self {
        Self::with_clock(system_clock())
    }

    pub fn with_clock(clock: Clock) -> Self {
        MemoryNonces {
            used: Mutex::new(BTreeSet::new()),
            clock,
        }
    }

    /// How many used tickets are remembered.
    pub fn len(&self) -> usize {
        self.used.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl NonceStore for MemoryNonces {
    fn consume(&self, ticket: &Verified) -> Result<(), TicketError> {
        // A poisoned lock still holds a consistent set (every operation on it is one call).
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        // Read under the lock: nothing can prune between this check and the insert.
        let now = (self.clock)();
        if now >= ticket.expires_at {
            return Err(TicketError::Expired);
        }
        if let Some(limit) = now.checked_sub(PRUNE_GRACE_SECS) {
            // Keep entries whose expiry is after `limit`; ordered by expiry, so one split.
            *used = used.split_off(&(limit + 1, [0u8; NONCE_LEN]));
        }
        if used.insert((ticket.expires_at, ticket.nonce)) {
            Ok(())
        } else {
            Err(TicketError::Replayed)
        }
    }
}

/// A nonce store of one file per used ticket in a directory, for proxies that fork per
/// connection (websockify with contrib/websockify/vncd_ticket.py, which uses the same
/// names). The file `EXPIRY.NONCE` (NONCE in base64url, as in the ticket) is created with
/// `O_CREAT|O_EXCL`, which the kernel makes atomic: of two connections with one ticket,
/// exactly one creates it. Files are not synced: single use across a power loss within
/// one TTL is not worth a disk flush per connection.
#[derive(Clone)]
pub struct DirNonces {
    dir: PathBuf,
    clock: Clock,
}

impl fmt::Debug for DirNonces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirNonces").field("dir", &self.dir).finish()
    }
}

impl DirNonces {
    /// A store in `dir`, which must exist (vncd creates it 0700 beside the key file).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self::with_clock(dir, system_clock())
    }

    pub fn with_clock(dir: impl Into<PathBuf>, clock: Clock) -> Self {
        DirNonces {
            dir: dir.into(),
            clock,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file name recording the use of `ticket`.
    pub fn file_name(ticket: &Verified) -> String {
        format!(
            "{}.{}",
            ticket.expires_at,
            URL_SAFE_NO_PAD.encode(ticket.nonce)
        )
    }

    /// Removes the records of tickets that expired at least [`PRUNE_GRACE_SECS`] ago;
    /// returns how many. Files of other names are left alone.
    pub fn prune(&self) -> io::Result<usize> {
        let now = (self.clock)();
        let Some(limit) = now.checked_sub(PRUNE_GRACE_SECS) else {
            return Ok(0);
        };
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some((expiry, nonce)) = name.to_str().and_then(|n| n.split_once('.')) else {
                continue;
            };
            let ours = nonce.len() == NONCE_B64_LEN && URL_SAFE_NO_PAD.decode(nonce).is_ok();
            match parse_decimal(expiry) {
                Some(e) if ours && e <= limit => match fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    // A concurrent pruner got it first.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                },
                _ => {}
            }
        }
        Ok(removed)
    }
}

impl NonceStore for DirNonces {
    fn consume(&self, ticket: &Verified) -> Result<(), TicketError> {
        let path = self.dir.join(Self::file_name(ticket));
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
            .open(&path);
        match created {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(TicketError::Replayed);
            }
            Err(source) => {
                return Err(TicketError::NonceStore {
                    path: self.dir.clone(),
                    source,
                });
            }
        }
        // After recording: if a pruner could have removed an earlier record of this ticket,
        // the ticket has expired by now, so a replay that raced the pruner is refused here.
        if (self.clock)() >= ticket.expires_at {
            return Err(TicketError::Expired);
        }
        // Pruning is housekeeping: a failure must not refuse a good ticket, and the next
        // consume tries again.
        let _ = self.prune();
        Ok(())
    }
}

/// The websockify plugin's key file (`--token-source`; written 0600): the lease key, the
/// target and the nonce directory. Line-based so the plugin needs no parser:
///
/// ```text
/// vncd-lease-key v1
/// session NAME
/// key 64-HEX-DIGITS
/// host HOST          and  port PORT     (a TCP target)
/// unix PATH                             (a unix-socket target)
/// nonces DIR
/// ```
///
/// Each line after the first is `NAME VALUE`, split at the first space. `None` if a value
/// contains a line break or NUL, or the nonce directory is not UTF-8: the format cannot
/// carry those, and a value with a line break could smuggle in a line of its own.
pub fn websockify_key_file(
    session: &str,
    key: &LeaseKey,
    target: &Endpoint,
    nonce_dir: &Path,
) -> Option<String> {
    let dir = nonce_dir.to_str()?;
    let mut lines = vec![
        KEY_FILE_MAGIC.to_owned(),
        format!("session {session}"),
        format!("key {}", key.to_hex()),
    ];
    match target {
        Endpoint::Tcp { host, port } => {
            lines.push(format!("host {host}"));
            lines.push(format!("port {port}"));
        }
        Endpoint::Unix { path } => lines.push(format!("unix {path}")),
    }
    lines.push(format!("nonces {dir}"));
    let bad = |l: &String| l.contains(['\n', '\r', '\0']);
    if lines.iter().any(bad) {
        return None;
    }
    let mut text = lines.join("\n");
    text.push('\n');
    Some(text)
}

#[cfg(test)]
mod tests;
