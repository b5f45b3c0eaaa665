//! The console ticket of a websocket request: the lease key it is checked with, finding
//! it in the request, consuming it once, and keeping it out of logs.
//!
//! The checks themselves are [`crate::ticket`]'s; this module adds what a proxy process
//! needs around them: where its key comes from and where used tickets are recorded.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::ticket::{self, DirNonces, LeaseKey, MemoryNonces, NonceStore, TicketError, Verified};

/// What a websocket upgrade must present: a ticket minted for this proxy's lease, not
/// used before. Its `Debug` never shows the key.
pub struct Tickets {
    key: LeaseKey,
    /// The lease a v2 ticket must name, when known (the relay knows it; a proxy's key
    /// file does not say).
    lease_uid: Option<String>,
    nonces: Box<dyn NonceStore>,
}

impl fmt::Debug for Tickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tickets(<key redacted>)")
    }
}

/// Why a key file cannot be used.
#[derive(Debug)]
pub enum KeyFileError {
    Io(std::io::Error),
    /// Not 64 hex digits.
    Malformed,
}

impl Tickets {
    /// Tickets of the lease `lease_uid` whose key is `key`, used ones recorded in
    /// `nonces` (the relay holds keys in memory, as the controller declared them). A v2
    /// ticket naming another lease is refused even if its MAC verifies.
    pub fn for_lease(key: LeaseKey, lease_uid: &str, nonces: Box<dyn NonceStore>) -> Self {
        Tickets {
            key,
            lease_uid: Some(lease_uid.to_owned()),
            nonces,
        }
    }

    /// Reads the lease key (64 hex digits; surrounding whitespace is ignored) from `path`,
    /// or from standard input for `-`: vncd's supervisor hands a proxy that runs as another
    /// user (`--proxy-user`) its key file as stdin, already open, so the file itself stays
    /// readable by root only. Used tickets are recorded in `nonce_dir` (shared with a
    /// restarted proxy of the same lease), or in memory without one.
    pub fn load(path: &Path, nonce_dir: Option<&Path>) -> Result<Self, KeyFileError> {
        let raw = if path == Path::new("-") {
            use std::io::Read;
            let mut raw = Vec::new();
            std::io::stdin()
                .lock()
                .take(4096)
                .read_to_end(&mut raw)
                .map_err(KeyFileError::Io)?;
            raw
        } else {
            std::fs::read(path).map_err(KeyFileError::Io)?
        };
        let text = std::str::from_utf8(raw.trim_ascii()).map_err(|_| KeyFileError::Malformed)?;
        let key = LeaseKey::from_hex(text).ok_or(KeyFileError::Malformed)?;
        let nonces: Box<dyn NonceStore> = match nonce_dir {
            Some(d) => Box::new(DirNonces::new(PathBuf::from(d))),
            None => Box::new(MemoryNonces::new()),
        };
        Ok(Tickets {
            key,
            lease_uid: None,
            nonces,
        })
    }

    /// Checks format, signature and expiry of a presented ticket, without using it up:
    /// the upgrade may still be refused for another reason.
    pub fn verify(&self, presented: &[u8]) -> Result<Verified, TicketError> {
        let text = std::str::from_utf8(presented).map_err(|_| TicketError::Malformed)?;
        match &self.lease_uid {
            Some(uid) => ticket::verify_lease(&self.key, uid, text, ticket::unix_now()),
            None => ticket::verify(&self.key, text, ticket::unix_now()),
        }
    }

    /// Uses up a verified ticket: the first call succeeds, every later one is a replay.
    pub fn consume(&self, ticket: &Verified) -> Result<(), TicketError> {
        self.nonces.consume(ticket)
    }
}

/// Where a websocket request may be served from, and the token it carries.
#[derive(Debug, PartialEq, Eq)]
pub enum WsPath {
    /// `/` or `/websockify`, with the `token` query value if any (percent-decoded).
    Plain { token: Option<Vec<u8>> },
    /// `/SEG` or `/websockify/SEG`: SEG is the token (percent-decoded).
    Segment { token: Vec<u8> },
}

/// Classify the path of a websocket request. `None`: not a websocket endpoint (404), or
/// undecodable escapes.
pub fn ws_path(path: &str, query: Option<&str>) -> Option<WsPath> {
    let rest = path.strip_prefix("/websockify").unwrap_or(path);
    match rest {
        "" | "/" => {
            let token = match query.and_then(query_token) {
                Some(raw) => Some(percent_decode(raw)?),
                None => None,
            };
            Some(WsPath::Plain { token })
        }
        _ => {
            let seg = rest.strip_prefix('/')?;
            let seg = seg.strip_suffix('/').unwrap_or(seg);
            if seg.is_empty() || seg.contains('/') {
                return None;
            }
            Some(WsPath::Segment {
                token: percent_decode(seg)?,
            })
        }
    }
}

impl WsPath {
    /// The token the request presented, if any: query value first, else the path segment.
    pub fn token(&self, query: Option<&str>) -> Option<Vec<u8>> {
        match self {
            WsPath::Plain { token } => token.clone(),
            WsPath::Segment { token } => query
                .and_then(query_token)
                .and_then(percent_decode)
                .or_else(|| Some(token.clone())),
        }
    }
}

/// The raw (still percent-encoded) value of the first `token=` item of a query string.
pub fn query_token(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .filter(|v| !v.is_empty())
}

/// Decode `%XX` escapes. `+` is kept as is. `None` for a broken escape.
pub fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// A request path safe to log: no query string, and for websocket requests no path beyond
/// `/` or `/websockify` (anything else may be a token). Static file paths are kept.
pub fn redact(target: &str, websocket: bool) -> String {
    let (path, query) = target
        .split_once('?')
        .map_or((target, None), |(p, q)| (p, Some(q)));
    let mut out = match path {
        "/" | "/websockify" | "/websockify/" => path.to_owned(),
        p if p.starts_with("/websockify/") => "/websockify/<redacted>".to_owned(),
        _ if websocket => "/<redacted>".to_owned(),
        p => p.chars().take(200).collect(),
    };
    if query.is_some() {
        out.push_str("?<redacted>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_holds_64_hex_digits_and_tickets_are_used_once() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        let key = LeaseKey::from_bytes([9; 32]);
        std::fs::write(&f, format!("{}\n", key.to_hex())).unwrap();
        std::fs::create_dir(dir.path().join("n")).unwrap();
        let t = Tickets::load(&f, Some(&dir.path().join("n"))).unwrap();
        assert_eq!(format!("{t:?}"), "Tickets(<key redacted>)");
        let minted =
            ticket::mint(&key, std::time::Duration::from_secs(60), ticket::unix_now()).unwrap();
        let v = t.verify(minted.text.as_bytes()).unwrap();
        t.consume(&v).unwrap();
        assert!(matches!(t.consume(&v), Err(TicketError::Replayed)));
        // A restarted proxy of the same lease shares the directory: still a replay.
        let again = Tickets::load(&f, Some(&dir.path().join("n"))).unwrap();
        assert!(matches!(again.consume(&v), Err(TicketError::Replayed)));
        assert!(t.verify(b"").is_err());
        assert!(t.verify(&[0xff, 0xfe]).is_err());
        for bad in ["", "abc", &"g".repeat(64)] {
            std::fs::write(&f, bad).unwrap();
            assert!(matches!(
                Tickets::load(&f, None),
                Err(KeyFileError::Malformed)
            ));
        }
        assert!(matches!(
            Tickets::load(&dir.path().join("missing"), None),
            Err(KeyFileError::Io(_))
        ));
    }

    #[test]
    fn token_from_query_or_segment() {
        let tok = |p: &str, q: Option<&str>| ws_path(p, q).and_then(|w| w.token(q));
        assert_eq!(tok("/", Some("token=abc")), Some(b"abc".to_vec()));
        assert_eq!(
            tok("/websockify", Some("x=1&token=a%2Bb&token=z")),
            Some(b"a+b".to_vec())
        );
        assert_eq!(tok("/websockify", None), None);
        assert_eq!(tok("/", Some("token=")), None);
        assert_eq!(tok("/abc", None), Some(b"abc".to_vec()));
        assert_eq!(tok("/websockify/abc", None), Some(b"abc".to_vec()));
        assert_eq!(tok("/websockify/abc/", None), Some(b"abc".to_vec()));
        assert_eq!(tok("/a%20c", None), Some(b"a c".to_vec()));
        assert_eq!(tok("/abc", Some("token=q")), Some(b"q".to_vec()));
        assert_eq!(
            ws_path("/websockify/", None),
            Some(WsPath::Plain { token: None })
        );
        assert_eq!(ws_path("/a/b", None), None);
        assert_eq!(ws_path("/websockify/a/b", None), None);
        assert_eq!(ws_path("/%zz", None), None);
        assert_eq!(ws_path("/", Some("token=%4")), None);
    }

    #[test]
    fn percent() {
        assert_eq!(percent_decode("a%2fb+c"), Some(b"a/b+c".to_vec()));
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%g1"), None);
    }

    #[test]
    fn redaction_hides_tokens() {
        assert_eq!(
            redact("/websockify?token=SECRET", true),
            "/websockify?<redacted>"
        );
        assert_eq!(redact("/?token=SECRET", true), "/?<redacted>");
        assert_eq!(redact("/SECRET", true), "/<redacted>");
        assert_eq!(redact("/SE.CRET", true), "/<redacted>");
        assert_eq!(
            redact("/websockify/SECRET", false),
            "/websockify/<redacted>"
        );
        assert_eq!(redact("/vnc.html?path=x", false), "/vnc.html?<redacted>");
        assert_eq!(redact("/app/ui.js", false), "/app/ui.js");
        assert_eq!(redact("/websockify", true), "/websockify");
        for t in [
            "/websockify?token=SECRET",
            "/SECRET",
            "/websockify/SECRET",
            "/?a=SECRET",
            "/a/SECRET.x",
        ] {
            assert!(!redact(t, true).contains("SECRET"));
        }
    }
}
