//! The ticket format, pure: minting and verifying text against a lease key. No I/O but
//! the OS's randomness for nonces.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;

use super::{
    KEY_LEN, LeaseKey, MAX_CLOCK_SKEW_SECS, MAX_TTL, NONCE_LEN, NonceStore, TicketError, VERSION,
    VERSION_2,
};

/// `v1.` + 20 digits + `.` + 22 + `.` + 43. Longer input is refused before any parsing.
pub(super) const MAX_TICKET_LEN: usize = 3 + 20 + 1 + 22 + 1 + 43;
pub(super) const NONCE_B64_LEN: usize = 22;
pub(super) const MAC_B64_LEN: usize = 43;

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

/// What a ticket lets its holder do on the console. Inside the MAC, so a holder cannot
/// change it. A v1 ticket is always [`Role::Control`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Input reaches the VM: keyboard, pointer, clipboard.
    #[default]
    Control,
    /// The screen only: the proxy drops every input message.
    View,
}

impl Role {
    /// The one-letter field of a v2 ticket.
    fn letter(self) -> &'static str {
        match self {
            Role::Control => "c",
            Role::View => "v",
        }
    }

    fn from_letter(s: &str) -> Option<Self> {
        match s {
            "c" => Some(Role::Control),
            "v" => Some(Role::View),
            _ => None,
        }
    }

    /// The name statuses, metrics and URLs use.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Control => "control",
            Role::View => "view",
        }
    }
}

/// What a ticket grants beyond admission: its role and whether it may close an exclusive
/// holder (`--force`). Both are inside the MAC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    pub role: Role,
    pub force: bool,
}

/// The FLAGS bit of a v2 ticket that carries [`Grant::force`]. Every other bit is
/// reserved: a ticket with one set is refused as malformed, so a later flag cannot be
/// ignored by an older verifier.
const FLAG_FORCE: u8 = 1;

/// What a verified ticket says: its nonce (for the [`super::NonceStore`]), its expiry and
/// what it grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    pub nonce: [u8; NONCE_LEN],
    pub expires_at: u64,
    pub grant: Grant,
}

/// The longest a lease uid in a v2 ticket may be. vncd's uids are 16 hex digits.
pub const MAX_LEASE_UID_LEN: usize = 64;
/// `v2.` UID `.` ROLE `.` FLAGS `.` EXPIRY `.` NONCE `.` MAC at their longest.
const MAX_V2_LEN: usize = 3 + MAX_LEASE_UID_LEN + 1 + 1 + 1 + 3 + 1 + 20 + 1 + 22 + 1 + 43;

/// Rounds `ttl` up to whole seconds (at least one) and adds it to `now`.
fn expiry(ttl: Duration, now: u64) -> u64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    now.saturating_add(secs.max(1))
}

fn random_nonce() -> Result<[u8; NONCE_LEN], TicketError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| TicketError::Rng(e.to_string()))?;
    Ok(nonce)
}

/// Mints a v1 ticket for the lease whose key is `key`, valid from `now` (unix seconds) for
/// `ttl` rounded up to whole seconds (at least one). Fails only if the OS has no randomness.
pub fn mint(key: &LeaseKey, ttl: Duration, now: u64) -> Result<Ticket, TicketError> {
    let expires_at = expiry(ttl, now);
    Ok(Ticket {
        text: encode(key, expires_at, &random_nonce()?),
        expires_at,
    })
}

/// Mints a v2 ticket: it names its lease (so a gateway port can route it to its session and
/// compute one MAC, never one per lease) and carries a [`Grant`]. `lease_uid` must be 1 to
/// [`MAX_LEASE_UID_LEN`] characters of `0-9 a-z -`, else [`TicketError::Malformed`].
pub fn mint_v2(
    key: &LeaseKey,
    lease_uid: &str,
    grant: Grant,
    ttl: Duration,
    now: u64,
) -> Result<Ticket, TicketError> {
    if !valid_uid(lease_uid) {
        return Err(TicketError::Malformed);
    }
    let expires_at = expiry(ttl, now);
    Ok(Ticket {
        text: encode_v2(key, lease_uid, grant, expires_at, &random_nonce()?),
        expires_at,
    })
}

fn valid_uid(uid: &str) -> bool {
    (1..=MAX_LEASE_UID_LEN).contains(&uid.len())
        && uid
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
}

/// The ticket text for a given expiry and nonce (deterministic: the test vectors use it).
pub(super) fn encode(key: &LeaseKey, expires_at: u64, nonce: &[u8; NONCE_LEN]) -> String {
    sign(
        key,
        format!("{VERSION}.{expires_at}.{}", URL_SAFE_NO_PAD.encode(nonce)),
    )
}

/// The v2 ticket text (deterministic, for the test vectors).
pub(super) fn encode_v2(
    key: &LeaseKey,
    lease_uid: &str,
    grant: Grant,
    expires_at: u64,
    nonce: &[u8; NONCE_LEN],
) -> String {
    let flags = if grant.force { FLAG_FORCE } else { 0 };
    sign(
        key,
        format!(
            "{VERSION_2}.{lease_uid}.{}.{flags}.{expires_at}.{}",
            grant.role.letter(),
            URL_SAFE_NO_PAD.encode(nonce)
        ),
    )
}

fn sign(key: &LeaseKey, signed: String) -> String {
    let tag = hmac::sign(&key.hmac(), signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// The lease uid a v2 ticket names, read without verifying anything: what a gateway
/// routes by before it computes the one MAC of that lease. `None` for v1 and for text
/// that is not shaped like a v2 ticket.
pub fn lease_uid_of(text: &str) -> Option<&str> {
    if text.len() > MAX_V2_LEN {
        return None;
    }
    let mut fields = text.split('.');
    if fields.next()? != VERSION_2 {
        return None;
    }
    fields.next().filter(|uid| valid_uid(uid))
}

/// Checks a presented ticket (v1 or v2) against the lease key: format, MAC (constant
/// time), then expiry (`now` in unix seconds): refused once expired, and refused when its
/// expiry lies further ahead than any vncd mints ([`MAX_TTL`] plus [`MAX_CLOCK_SKEW_SECS`]),
/// so a holder of a lease key cannot make a ticket that lives for years, and every
/// used-ticket record can be pruned within that bound. Does not consume it; see
/// [`super::NonceStore`] and [`check`].
pub fn verify(key: &LeaseKey, text: &str, now: u64) -> Result<Verified, TicketError> {
    if text.starts_with("v2.") {
        return verify_v2(key, None, text, now);
    }
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
    check_expiry(expires_at, now)?;
    Ok(Verified {
        nonce,
        expires_at,
        grant: Grant::default(),
    })
}

/// [`verify`], and a v2 ticket must name `lease_uid`: a key is only ever used for its own
/// lease, so a ticket that names another lease is refused even if its MAC verifies. (v1
/// names no lease; its MAC alone binds it.)
pub fn verify_lease(
    key: &LeaseKey,
    lease_uid: &str,
    text: &str,
    now: u64,
) -> Result<Verified, TicketError> {
    if text.starts_with("v2.") {
        verify_v2(key, Some(lease_uid), text, now)
    } else {
        verify(key, text, now)
    }
}

fn verify_v2(
    key: &LeaseKey,
    lease_uid: Option<&str>,
    text: &str,
    now: u64,
) -> Result<Verified, TicketError> {
    if text.len() > MAX_V2_LEN {
        return Err(TicketError::Malformed);
    }
    let (signed, mac_b64) = text.rsplit_once('.').ok_or(TicketError::Malformed)?;
    let f: Vec<&str> = signed.split('.').collect();
    let [version, uid, role, flags, expiry, nonce_b64] = f[..] else {
        return Err(TicketError::Malformed);
    };
    if version != VERSION_2 || !valid_uid(uid) {
        return Err(TicketError::Malformed);
    }
    let role = Role::from_letter(role).ok_or(TicketError::Malformed)?;
    let flags = parse_decimal(flags)
        .and_then(|f| u8::try_from(f).ok())
        .filter(|f| f & !FLAG_FORCE == 0)
        .ok_or(TicketError::Malformed)?;
    let expires_at = parse_decimal(expiry).ok_or(TicketError::Malformed)?;
    let nonce: [u8; NONCE_LEN] = decode_exact(nonce_b64, NONCE_B64_LEN)?;
    let mac: [u8; KEY_LEN] = decode_exact(mac_b64, MAC_B64_LEN)?;
    hmac::verify(&key.hmac(), signed.as_bytes(), &mac).map_err(|_| TicketError::BadSignature)?;
    if lease_uid.is_some_and(|want| want != uid) {
        return Err(TicketError::BadSignature);
    }
    check_expiry(expires_at, now)?;
    Ok(Verified {
        nonce,
        expires_at,
        grant: Grant {
            role,
            force: flags & FLAG_FORCE != 0,
        },
    })
}

fn check_expiry(expires_at: u64, now: u64) -> Result<(), TicketError> {
    if now >= expires_at {
        return Err(TicketError::Expired);
    }
    let limit = now
        .saturating_add(MAX_TTL.as_secs())
        .saturating_add(MAX_CLOCK_SKEW_SECS);
    if expires_at > limit {
        return Err(TicketError::TooFarAhead);
    }
    Ok(())
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
pub(super) fn parse_decimal(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical { s.parse().ok() } else { None }
}

/// Strict base64url without padding, of exactly `chars` characters decoding to `N` bytes.
/// The engine refuses non-zero trailing bits, so each value has one spelling.
pub(super) fn decode_exact<const N: usize>(s: &str, chars: usize) -> Result<[u8; N], TicketError> {
    if s.len() != chars {
        return Err(TicketError::Malformed);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| TicketError::Malformed)?;
    bytes.try_into().map_err(|_| TicketError::Malformed)
}
