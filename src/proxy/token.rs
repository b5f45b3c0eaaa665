//! The session token: loading it, finding it in a websocket request, comparing it in constant
//! time, and keeping it out of logs.

use std::fmt;
use std::path::Path;

/// The secret a websocket upgrade must present. Its `Debug` never shows the value.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Why a token file cannot be used.
#[derive(Debug)]
pub enum TokenFileError {
    Io(std::io::Error),
    Empty,
}

impl Token {
    /// Read the token from a file; surrounding ASCII whitespace (a trailing newline) is ignored.
    /// `-` reads standard input instead: vncd's supervisor hands a proxy that runs as
    /// another user (`--proxy-user`) its token file as stdin, already open, so the file
    /// itself stays readable by root only.
    pub fn from_file(path: &Path) -> Result<Self, TokenFileError> {
        let raw = if path == Path::new("-") {
            use std::io::Read;
            let mut raw = Vec::new();
            std::io::stdin()
                .lock()
                .take(64 * 1024)
                .read_to_end(&mut raw)
                .map_err(TokenFileError::Io)?;
            raw
        } else {
            std::fs::read(path).map_err(TokenFileError::Io)?
        };
        Self::from_bytes(&raw).ok_or(TokenFileError::Empty)
    }

    /// The token made of `raw` without surrounding ASCII whitespace; `None` if nothing is left.
    pub fn from_bytes(raw: &[u8]) -> Option<Self> {
        let t = raw.trim_ascii();
        (!t.is_empty()).then(|| Self(t.to_vec()))
    }

    /// Constant-time comparison with what a client presented. The time taken depends only on
    /// the length of the expected token, never on where the first difference is.
    pub fn matches(&self, presented: &[u8]) -> bool {
        ct_eq(&self.0, presented)
    }
}

/// Compare `expected` and `given` in time that depends only on `expected.len()`.
pub fn ct_eq(expected: &[u8], given: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != given.len());
    for (i, e) in expected.iter().enumerate() {
        // A missing byte differs from any byte: `!e` never equals `e`.
        diff |= e ^ given.get(i).copied().unwrap_or(!e);
    }
    std::hint::black_box(diff) == 0
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
    fn constant_time_compare() {
        let t = Token::from_bytes(b"  s3cret\n").expect("token");
        assert!(t.matches(b"s3cret"));
        assert!(!t.matches(b"s3cre"));
        assert!(!t.matches(b"s3cret!"));
        assert!(!t.matches(b"S3cret"));
        assert!(!t.matches(b""));
        assert!(Token::from_bytes(b" \n\t").is_none());
        assert!(ct_eq(b"", b""));
        assert!(!ct_eq(b"a", b""));
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
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
