//! Console URLs: a lease's base URL plus a fresh [`ticket`](crate::ticket).
//!
//! Every way of asking for a console ends here: `vncd url` (which reads the state dir),
//! `POST /v1/sessions/NAME/url` on a running vncd, `vncd apply --wait`, and in Kubernetes
//! the VncConsoleRequest responder. They differ only in who they let ask; what they hand
//! out is the same: a URL whose ticket the session's proxy accepts once, within the TTL,
//! and only for the lease it was minted for.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::lease::Lease;
use crate::status::UrlStyle;
use crate::ticket::{self, MasterKey, TicketError};

/// The longest TTL anyone may ask for: a ticket is meant to be used at once, and a
/// long one is a bearer credential by another name.
pub const MAX_TTL: Duration = crate::ticket::MAX_TTL;

/// A freshly minted console URL.
#[derive(Clone, PartialEq, Eq)]
pub struct ConsoleUrl {
    /// The URL with its ticket. A credential: print it to the asker, never log it.
    pub url: String,
    /// Unix seconds after which the ticket is refused (a connection opened before stays).
    pub expires_at: u64,
}

impl std::fmt::Debug for ConsoleUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleUrl")
            .field("url", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl ConsoleUrl {
    /// `expiresAt` as RFC 3339, the way Kubernetes writes times.
    pub fn expires_at_rfc3339(&self) -> String {
        i64::try_from(self.expires_at)
            .ok()
            .and_then(|s| jiff::Timestamp::from_second(s).ok())
            .map_or_else(String::new, |t| t.to_string())
    }
}

/// Why no URL was minted. The messages name the session and never carry a ticket.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("session {0:?} is not served here (no such session, or it has no lease)")]
    Unknown(String),
    #[error("session {0:?} has no console yet: its proxy is not running (see `vncd get {0}`)")]
    NotReady(String),
    #[error("a ticket TTL must be between 1 s and 3600 s, not {0:?}")]
    Ttl(Duration),
    #[error("--view-only is not supported yet: a ticket opens the console with full control")]
    ViewOnlyUnsupported,
    #[error("cannot mint a ticket for session {session:?}: {source}")]
    Ticket {
        session: String,
        #[source]
        source: TicketError,
    },
}

impl MintError {
    /// A short, stable label for metrics and HTTP mapping.
    pub fn metric_label(&self) -> &'static str {
        match self {
            MintError::Unknown(_) => "unknown",
            MintError::NotReady(_) => "not_ready",
            MintError::Ttl(_) => "bad_ttl",
            MintError::ViewOnlyUnsupported => "view_only",
            MintError::Ticket { .. } => "rng",
        }
    }
}

/// What a mint may ask for beyond the defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MintOptions {
    /// Instead of the configured `--ticket-ttl`.
    pub ttl: Option<Duration>,
    /// A console without keyboard and mouse: refused until the proxies can enforce it.
    pub view_only: bool,
}

/// Mints URLs with the master key. Holds the key, so it lives only in vncd (or in
/// `vncd url`, which had to read the root-only key file to build one).
#[derive(Clone)]
pub struct Minter {
    master: Arc<MasterKey>,
    urls: UrlStyle,
    ttl: Duration,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter")
            .field("urls", &self.urls)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Minter {
    pub fn new(master: MasterKey, urls: UrlStyle, ttl: Duration) -> Self {
        Minter {
            master: Arc::new(master),
            urls,
            ttl,
        }
    }

    /// A short, one-way identifier of the master key (not the key: HMAC output). A proxy
    /// started under another key cannot be served by this vncd's tickets, so the
    /// supervisor puts this in the settings digest and replaces such proxies.
    pub fn key_id(&self) -> String {
        self.master.lease_key("", "vncd key id v1").to_hex()[..16].to_owned()
    }

    /// The key a lease's proxy verifies tickets with (written to its 0600 key file).
    pub fn lease_key(&self, lease: &Lease) -> ticket::LeaseKey {
        self.master.lease_key(&lease.session, &lease.uid)
    }

    /// The ticket lifetime `opts` asks for, checked (a view-only console is refused until
    /// the proxies can enforce it).
    fn ttl_for(&self, opts: MintOptions) -> Result<Duration, MintError> {
        if opts.view_only {
            return Err(MintError::ViewOnlyUnsupported);
        }
        let ttl = opts.ttl.unwrap_or(self.ttl);
        if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
            return Err(MintError::Ttl(ttl));
        }
        Ok(ttl)
    }

    /// A URL for `lease`'s console, valid from `now` (unix seconds). The caller has
    /// checked that the lease's proxy runs; see [`Consoles::mint`].
    pub fn mint(
        &self,
        lease: &Lease,
        opts: MintOptions,
        now: u64,
    ) -> Result<ConsoleUrl, MintError> {
        let ttl = self.ttl_for(opts)?;
        let t =
            ticket::mint(&self.lease_key(lease), ttl, now).map_err(|source| MintError::Ticket {
                session: lease.session.clone(),
                source,
            })?;
        Ok(ConsoleUrl {
            url: self.urls.url(lease.port, Some(&t.text)),
            expires_at: t.expires_at,
        })
    }

    /// A URL for `lease`'s console through the relay's gateway at `base` (one port for
    /// every session): a v2 ticket, which names the lease so the gateway can route it.
    pub fn mint_gateway(
        &self,
        lease: &Lease,
        base: &str,
        opts: MintOptions,
        now: u64,
    ) -> Result<ConsoleUrl, MintError> {
        let ttl = self.ttl_for(opts)?;
        let t = ticket::mint_v2(
            &self.lease_key(lease),
            &lease.uid,
            ticket::Grant::default(),
            ttl,
            now,
        )
        .map_err(|source| MintError::Ticket {
            session: lease.session.clone(),
            source,
        })?;
        let sep = if base.contains('?') { '&' } else { '?' };
        Ok(ConsoleUrl {
            url: format!("{base}{sep}token={}", t.text),
            expires_at: t.expires_at,
        })
    }
}

/// The leases whose consoles can be opened now, as of the controller's last pass.
/// Clones share the map: the controller publishes, the HTTP API and the Kubernetes
/// responder read.
#[derive(Clone, Debug, Default)]
pub struct Consoles(Arc<RwLock<BTreeMap<String, Lease>>>);

impl Consoles {
    /// Replaces the map with `leases`: those whose proxies run, as the controller saw
    /// them at the end of its pass.
    pub fn publish<'a>(&self, leases: impl IntoIterator<Item = &'a Lease>) {
        let map = leases
            .into_iter()
            .map(|l| (l.session.clone(), l.clone()))
            .collect();
        if let Ok(mut g) = self.0.write() {
            *g = map;
        }
    }

    /// The lease of a session whose console is up.
    pub fn get(&self, session: &str) -> Option<Lease> {
        self.0.read().ok()?.get(session).cloned()
    }

    /// A URL for `session`'s console, if it is up.
    pub fn mint(
        &self,
        minter: &Minter,
        session: &str,
        opts: MintOptions,
    ) -> Result<ConsoleUrl, MintError> {
        let lease = self
            .get(session)
            .ok_or_else(|| MintError::NotReady(session.to_owned()))?;
        minter.mint(&lease, opts, ticket::unix_now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ticket::{MemoryNonces, NonceStore};

    fn minter() -> Minter {
        let urls = UrlStyle {
            public_host: "vnc.example".into(),
            web: false,
            tls: false,
        };
        Minter::new(
            MasterKey::from_bytes([7; 32]),
            urls,
            Duration::from_secs(60),
        )
    }

    fn ticket_of(url: &str) -> &str {
        url.split_once("?token=").expect("ticket in url").1
    }

    #[test]
    fn a_minted_url_carries_a_ticket_the_leases_key_accepts_and_no_other() {
        let m = minter();
        let lease = Lease::for_test("vm1", 6100);
        let now = ticket::unix_now();
        let u = m.mint(&lease, MintOptions::default(), now).unwrap();
        assert!(u.url.starts_with("ws://vnc.example:6100/?token=v1."));
        assert_eq!(u.expires_at, now + 60);
        let nonces = MemoryNonces::new();
        let v = ticket::verify(&m.lease_key(&lease), ticket_of(&u.url), now).unwrap();
        nonces.consume(&v).unwrap();
        assert!(nonces.consume(&v).is_err(), "a second use is a replay");
        // A new lease for the same session (a restart after release, or a retarget) has
        // a new uid, so the old ticket fails its MAC.
        let other = Lease::for_test("vm1", 6100);
        assert_ne!(other.uid, lease.uid);
        let e = ticket::verify(&m.lease_key(&other), ticket_of(&u.url), now).unwrap_err();
        assert!(matches!(e, TicketError::BadSignature), "{e}");
    }

    #[test]
    fn ttl_is_bounded_and_view_only_is_refused() {
        let m = minter();
        let lease = Lease::for_test("vm1", 6100);
        let ask = |ttl| MintOptions {
            ttl: Some(ttl),
            view_only: false,
        };
        let u = m.mint(&lease, ask(Duration::from_secs(5)), 1000).unwrap();
        assert_eq!(u.expires_at, 1005);
        for bad in [Duration::ZERO, MAX_TTL + Duration::from_secs(1)] {
            let e = m.mint(&lease, ask(bad), 1000).unwrap_err();
            assert_eq!(e.metric_label(), "bad_ttl", "{e}");
        }
        let e = m
            .mint(
                &lease,
                MintOptions {
                    ttl: None,
                    view_only: true,
                },
                1000,
            )
            .unwrap_err();
        assert!(e.to_string().contains("not supported yet"), "{e}");
    }

    #[test]
    fn consoles_mint_only_for_published_leases() {
        let m = minter();
        let c = Consoles::default();
        let up = Lease::for_test("up", 6100);
        c.publish([&up]);
        assert!(c.mint(&m, "up", MintOptions::default()).is_ok());
        let e = c.mint(&m, "down", MintOptions::default()).unwrap_err();
        assert!(matches!(e, MintError::NotReady(_)), "{e}");
        c.publish([]);
        assert!(c.mint(&m, "up", MintOptions::default()).is_err());
    }

    #[test]
    fn debug_output_never_shows_the_url() {
        let u = minter()
            .mint(&Lease::for_test("vm1", 6100), MintOptions::default(), 1)
            .unwrap();
        assert!(!format!("{u:?}").contains("token"));
    }
}
