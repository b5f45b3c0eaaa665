//! Minimal HTTP/1.1 server side: read and parse one request head, write simple responses.
//!
//! Only what a websocket upgrade and static files need. Bodies of requests are not supported
//! (GET/HEAD only), so a request is its head.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest accepted request head (request line plus headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers accepted in one request.
const MAX_HEADERS: usize = 64;

/// A parsed request head. Header names are lower-case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The raw request-target, e.g. `/websockify?token=abc`.
    pub target: String,
    /// Minor HTTP version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// First value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// All comma-separated, trimmed, non-empty items of every instance of a header.
    pub fn header_items<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    /// Whether a comma-separated header contains `token` (case-insensitive).
    pub fn header_has(&self, name: &str, token: &str) -> bool {
        self.header_items(name)
            .any(|t| t.eq_ignore_ascii_case(token))
    }

    /// The path part of the request-target (before `?`).
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// The query part of the request-target (after `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// Whether the client asked for a websocket (`Upgrade: websocket`).
    pub fn wants_websocket(&self) -> bool {
        self.header_has("upgrade", "websocket")
    }

    /// Whether the connection may carry another request after this one.
    pub fn keep_alive(&self) -> bool {
        self.minor_version >= 1 && !self.header_has("connection", "close")
    }
}

/// Why a request head could not be read.
#[derive(Debug)]
pub enum HeadError {
    /// The head is larger than [`MAX_HEAD`] or has too many headers: answer 431.
    TooLarge,
    /// Not HTTP, or broken HTTP: answer 400.
    Malformed(&'static str),
    /// The client sent nothing (more) in time.
    Timeout,
    Io(io::Error),
}

/// Parse a request head at the start of `buf`. `Ok(None)` means more bytes are needed.
/// On success also returns the length of the head, so the caller can keep what follows.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            if len > MAX_HEAD {
                return Err(HeadError::TooLarge);
            }
            let target = req.path.unwrap_or_default();
            if !target.starts_with('/') {
                return Err(HeadError::Malformed("request target must start with '/'"));
            }
            let headers = req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            Ok(Some((
                Request {
                    method: req.method.unwrap_or_default().to_owned(),
                    target: target.to_owned(),
                    minor_version: req.version.unwrap_or(0),
                    headers,
                },
                len,
            )))
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => Err(HeadError::Malformed("not HTTP/1.x")),
        Err(_) => Err(HeadError::Malformed("malformed request head")),
    }
}

/// Read one request head from `stream`, starting with whatever is already in `buf`.
///
/// On success the head is removed from `buf` and whatever the client sent after it stays there.
/// `Ok(None)`: the client closed the connection before sending anything (more).
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    wait: Duration,
) -> Result<Option<Request>, HeadError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if !buf.is_empty()
            && let Some((req, len)) = parse_head(buf)?
        {
            buf.drain(..len);
            return Ok(Some(req));
        }
        // Never buffer more than MAX_HEAD + 1 bytes: one past the limit proves it is exceeded.
        let room = MAX_HEAD + 1 - buf.len();
        buf.reserve(room.min(4096));
        let mut limited = (&mut *stream).take(room as u64);
        let n = match tokio::time::timeout_at(deadline, limited.read_buf(buf)).await {
            Err(_) => return Err(HeadError::Timeout),
            Ok(Err(e)) => return Err(HeadError::Io(e)),
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(HeadError::Malformed(
                    "connection closed inside the request head",
                ))
            };
        }
    }
}

/// Reason phrase of the status codes this server uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

/// Write a complete short plain-text response and flush it. `extra` is raw header lines, each
/// ending in CRLF.
pub async fn write_plain<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    message: &str,
    extra: &str,
    keep_alive: bool,
) -> io::Result<()> {
    let body = format!("{status} {}: {message}\n", reason(status));
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: {}\r\n{extra}\r\n",
        reason(status),
        body.len(),
        if keep_alive { "keep-alive" } else { "close" },
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    stream.write_all(&out).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Request {
        match parse_head(s.as_bytes()) {
            Ok(Some((r, len))) => {
                assert_eq!(len, s.len());
                r
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn parses_upgrade_request() {
        let r = parse(
            "GET /websockify?token=abc HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\n\
             Connection: keep-alive, Upgrade\r\nSec-WebSocket-Protocol: base64, binary\r\n\r\n",
        );
        assert_eq!(r.method, "GET");
        assert_eq!(r.path(), "/websockify");
        assert_eq!(r.query(), Some("token=abc"));
        assert!(r.wants_websocket());
        assert!(r.header_has("connection", "upgrade"));
        assert_eq!(
            r.header_items("sec-websocket-protocol").collect::<Vec<_>>(),
            ["base64", "binary"]
        );
        assert_eq!(r.header("host"), Some("h"));
    }

    #[test]
    fn plain_get_and_keep_alive() {
        let r = parse("GET /vnc.html HTTP/1.1\r\nHost: h\r\n\r\n");
        assert!(!r.wants_websocket());
        assert!(r.keep_alive());
        assert_eq!(r.query(), None);
        let r = parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(!r.keep_alive());
        let r = parse("GET / HTTP/1.0\r\n\r\n");
        assert!(!r.keep_alive());
    }

    #[test]
    fn partial_and_oversized() {
        assert!(matches!(parse_head(b"GET / HTTP/1.1\r\nHo"), Ok(None)));
        let mut big = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert!(matches!(parse_head(&big), Err(HeadError::TooLarge)));
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..100 {
            many.push_str(&format!("X-{i}: y\r\n"));
        }
        many.push_str("\r\n");
        assert!(matches!(
            parse_head(many.as_bytes()),
            Err(HeadError::TooLarge)
        ));
    }

    #[test]
    fn malformed() {
        for bad in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"[..],
            b"GET / FTP/1.1\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(bad), Err(HeadError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn read_head_keeps_trailing_bytes() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        a.write_all(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n\x82\x80")
            .await
            .expect("write");
        let mut buf = Vec::new();
        let r = read_head(&mut b, &mut buf, Duration::from_secs(5))
            .await
            .expect("head")
            .expect("request");
        assert!(r.wants_websocket());
        assert_eq!(buf, b"\x82\x80");
    }

    #[tokio::test]
    async fn read_head_limits_size_and_time() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let mut junk = b"GET / HTTP/1.1\r\nX: ".to_vec();
        junk.resize(40 * 1024, b'z');
        a.write_all(&junk).await.expect("write");
        let mut buf = Vec::new();
        let r = read_head(&mut b, &mut buf, Duration::from_secs(5)).await;
        assert!(matches!(r, Err(HeadError::TooLarge)), "{r:?}");
        assert!(buf.len() <= MAX_HEAD + 1);

        let (_a, mut b) = tokio::io::duplex(1024);
        let mut buf = Vec::new();
        let r = read_head(&mut b, &mut buf, Duration::from_millis(20)).await;
        assert!(matches!(r, Err(HeadError::Timeout)));
    }
}
