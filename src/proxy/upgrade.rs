//! Deciding whether a websocket upgrade request is accepted, and the 101 response.

use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::http::Request;
use super::stats::TicketRefusal;
use super::token::{Tickets, ws_path};
use crate::ticket::{TicketError, Verified};

/// An accepted upgrade.
#[derive(Debug, PartialEq, Eq)]
pub struct Accept {
    /// The 101 response head to send.
    pub response: String,
    /// The subprotocol answered, if any (`binary`).
    pub protocol: Option<&'static str>,
    /// The ticket that authorized it, still to be used up (only once every other check
    /// passed, so a malformed upgrade does not waste a good ticket).
    pub ticket: Option<Verified>,
}

/// A refused upgrade: the status and a short reason for the response body.
#[derive(Debug, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub message: &'static str,
    /// Extra raw header lines, each ending in CRLF.
    pub extra: &'static str,
    /// Refused for its ticket, and why (for the counters).
    pub ticket: Option<TicketRefusal>,
}

const fn reject(status: u16, message: &'static str) -> Reject {
    Reject {
        status,
        message,
        extra: "",
        ticket: None,
    }
}

/// The 403 for a ticket refused with `e`. The message is fixed text: it never carries
/// the ticket, and it tells a client whose ticket was good that it needs a fresh URL.
pub fn ticket_rejected(e: &TicketError) -> Reject {
    let (message, why) = match e {
        TicketError::Expired => (
            "console ticket expired: ask for a new URL",
            TicketRefusal::Expired,
        ),
        TicketError::Replayed => (
            "console ticket already used: ask for a new URL",
            TicketRefusal::Replayed,
        ),
        _ => ("missing or invalid console ticket", TicketRefusal::Invalid),
    };
    Reject {
        ticket: Some(why),
        ..reject(403, message)
    }
}

/// Check an upgrade request against the ticket and the Origin allowlist, then the websocket
/// rules. Authorization (ticket, Origin) is checked first, so a refused client learns nothing.
/// The ticket is verified here but not used up: see [`Accept::ticket`].
pub fn check(
    req: &Request,
    tickets: Option<&Tickets>,
    origins: &[String],
) -> Result<Accept, Reject> {
    let Some(endpoint) = ws_path(req.path(), req.query()) else {
        return Err(reject(404, "no websocket endpoint here"));
    };
    let ticket = match tickets {
        Some(t) => {
            let presented = endpoint.token(req.query()).unwrap_or_default();
            Some(t.verify(&presented).map_err(|e| ticket_rejected(&e))?)
        }
        None => None,
    };
    if !origin_allowed(req.header("origin"), origins) {
        return Err(reject(403, "origin not allowed"));
    }
    if req.method != "GET" {
        return Err(reject(400, "websocket upgrade must be a GET"));
    }
    if req.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(Reject {
            extra: "Sec-WebSocket-Version: 13\r\n",
            ..reject(426, "only websocket version 13 is supported")
        });
    }
    if !req.header_has("connection", "upgrade") {
        return Err(reject(400, "missing 'Connection: Upgrade'"));
    }
    let key = match req.header("sec-websocket-key").map(str::trim) {
        Some(k) if !k.is_empty() => k,
        _ => return Err(reject(400, "missing Sec-WebSocket-Key")),
    };
    if !valid_key(key) {
        return Err(reject(
            400,
            "Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455)",
        ));
    }
    if !valid_host(req) {
        return Err(reject(400, "missing or invalid Host header"));
    }
    let protocol = choose_protocol(req)?;
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n",
        derive_accept_key(key.as_bytes())
    );
    if let Some(p) = protocol {
        response.push_str("Sec-WebSocket-Protocol: ");
        response.push_str(p);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    Ok(Accept {
        response,
        protocol,
        ticket,
    })
}

/// RFC 6455 4.1: the key is 16 random bytes, base64-encoded: 22 alphabet characters and
/// `==`, where the last character carries only 2 significant bits.
fn valid_key(key: &str) -> bool {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = key.as_bytes();
    if b.len() != 24 || &b[22..] != b"==" {
        return false;
    }
    let mut last = 0;
    for &c in &b[..22] {
        match ALPHABET.iter().position(|&a| a == c) {
            Some(v) => last = v,
            None => return false,
        }
    }
    last & 0x0f == 0
}

/// HTTP/1.1 requires exactly one Host header; a websocket client always sends one. Its
/// value must look like `host`, `host:port` or `[v6]:port`: no spaces, commas, slashes
/// or `@` (which would hint at a smuggled authority).
fn valid_host(req: &Request) -> bool {
    let mut hosts = req.headers.iter().filter(|(n, _)| n == "host");
    let (Some((_, host)), None) = (hosts.next(), hosts.next()) else {
        return false;
    };
    let host = host.trim();
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-._:[]".contains(&c))
}

/// `binary` if offered; none if nothing is offered; refuse anything else (e.g. `base64` only,
/// the old websockify text encoding, which this proxy does not speak).
fn choose_protocol(req: &Request) -> Result<Option<&'static str>, Reject> {
    let mut offered = req.header_items("sec-websocket-protocol").peekable();
    if offered.peek().is_none() {
        return Ok(None);
    }
    let mut base64 = false;
    for p in offered {
        if p == "binary" {
            return Ok(Some("binary"));
        }
        base64 |= p == "base64";
    }
    Err(reject(
        400,
        if base64 {
            "subprotocol base64 is not supported; offer 'binary' (or no subprotocol)"
        } else {
            "unsupported subprotocol; offer 'binary' (or no subprotocol)"
        },
    ))
}

/// Whether `origin` passes the allowlist (an empty list allows everything).
pub fn origin_allowed(origin: Option<&str>, allowed: &[String]) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = origin else {
        return false;
    };
    let norm = |s: &str| s.trim().trim_end_matches('/').to_ascii_lowercase();
    let origin = norm(origin);
    allowed.iter().any(|a| norm(a) == origin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::http::parse_head;

    fn req(target: &str, extra: &str) -> Request {
        let s = format!(
            "GET {target} HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        );
        match parse_head(s.as_bytes()) {
            Ok(Some((r, _))) => r,
            other => panic!("{other:?}"),
        }
    }

    fn status(r: Result<Accept, Reject>) -> u16 {
        r.map_or_else(|e| e.status, |_| 101)
    }

    #[test]
    fn rfc_accept_key_and_protocols() {
        let a = check(
            &req("/", "Sec-WebSocket-Protocol: binary, base64\r\n"),
            None,
            &[],
        )
        .expect("accepted");
        assert!(
            a.response
                .contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n")
        );
        assert_eq!(a.protocol, Some("binary"));
        assert!(a.response.contains("Sec-WebSocket-Protocol: binary\r\n"));

        let a = check(&req("/websockify", ""), None, &[]).expect("accepted");
        assert_eq!(a.protocol, None);
        assert!(!a.response.contains("Sec-WebSocket-Protocol"));

        let e =
            check(&req("/", "Sec-WebSocket-Protocol: base64\r\n"), None, &[]).expect_err("refused");
        assert_eq!(e.status, 400);
        assert!(e.message.contains("base64"));
        assert_eq!(
            status(check(
                &req("/", "Sec-WebSocket-Protocol: chat\r\n"),
                None,
                &[]
            )),
            400
        );
    }

    #[test]
    fn a_valid_ticket_is_required_when_configured() {
        use crate::ticket::{LeaseKey, mint, unix_now};
        let dir = tempfile::tempdir().unwrap();
        let key = LeaseKey::from_bytes([3; 32]);
        std::fs::write(dir.path().join("k"), key.to_hex()).unwrap();
        let t = Tickets::load(&dir.path().join("k"), None).unwrap();
        let t = Some(&t);
        let now = unix_now();
        let tok = mint(&key, std::time::Duration::from_secs(60), now)
            .unwrap()
            .text;
        let old = mint(&key, std::time::Duration::from_secs(1), now - 10)
            .unwrap()
            .text;
        let other = mint(
            &LeaseKey::from_bytes([4; 32]),
            std::time::Duration::from_secs(60),
            now,
        )
        .unwrap()
        .text;
        let refused = |path: &str| check(&req(path, ""), t, &[]).expect_err("refused");
        assert_eq!(refused("/").ticket, Some(TicketRefusal::Invalid));
        assert_eq!(refused("/?token=bad").ticket, Some(TicketRefusal::Invalid));
        let r = refused(&format!("/?token={other}"));
        assert_eq!((r.status, r.ticket), (403, Some(TicketRefusal::Invalid)));
        let r = refused(&format!("/?token={old}"));
        assert_eq!((r.status, r.ticket), (403, Some(TicketRefusal::Expired)));
        assert!(r.message.contains("expired"));
        for ok in [
            format!("/websockify?token={tok}"),
            format!("/?a=b&token={tok}"),
            format!("/{tok}"),
            format!("/websockify/{tok}"),
        ] {
            let a = check(&req(&ok, ""), t, &[]).expect("accepted");
            // Verified, not yet used up: that is the caller's last step.
            assert_eq!(a.ticket.map(|v| v.expires_at), Some(now + 60), "{ok}");
        }
        assert_eq!(status(check(&req("/websockify/bad", ""), t, &[])), 403);
        assert_eq!(status(check(&req(&format!("/x/{tok}"), ""), t, &[])), 404);
        // The ticket is checked before anything else about the request.
        assert_eq!(
            status(check(
                &req("/", "Sec-WebSocket-Protocol: base64\r\n"),
                t,
                &[]
            )),
            403
        );
    }

    #[test]
    fn origin_allowlist() {
        let allowed = vec!["https://Console.example/".to_owned()];
        assert_eq!(status(check(&req("/", ""), None, &allowed)), 403);
        assert_eq!(
            status(check(
                &req("/", "Origin: https://evil.example\r\n"),
                None,
                &allowed
            )),
            403
        );
        assert_eq!(
            status(check(
                &req("/", "Origin: https://console.example\r\n"),
                None,
                &allowed
            )),
            101
        );
        assert!(origin_allowed(None, &[]));
    }

    #[test]
    fn websocket_rules() {
        let mut r = req("/", "");
        r.headers.retain(|(n, _)| n != "sec-websocket-version");
        assert_eq!(status(check(&r, None, &[])), 426);
        let mut r = req("/", "");
        r.headers.retain(|(n, _)| n != "sec-websocket-key");
        assert_eq!(status(check(&r, None, &[])), 400);
        for bad in [
            "abc",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZR==",
            "dGhlIHNh!XBsZSBub25jZQ==",
        ] {
            let mut r = req("/", "");
            for (n, v) in &mut r.headers {
                if n == "sec-websocket-key" {
                    *v = bad.into();
                }
            }
            let e = check(&r, None, &[]).expect_err(bad);
            assert_eq!(e.status, 400, "{bad}");
            assert!(e.message.contains("16 bytes"), "{bad}");
        }
        let mut r = req("/", "");
        r.headers.retain(|(n, _)| n != "host");
        assert_eq!(status(check(&r, None, &[])), 400, "no Host");
        assert_eq!(
            status(check(&req("/", "Host: other\r\n"), None, &[])),
            400,
            "two Hosts"
        );
        for bad in ["", "a b", "evil@h", "h/x", "a,b"] {
            let mut r = req("/", "");
            for (n, v) in &mut r.headers {
                if n == "host" {
                    *v = bad.into();
                }
            }
            assert_eq!(status(check(&r, None, &[])), 400, "Host {bad:?}");
        }
        assert_eq!(status(check(&req("/", ""), None, &[])), 101);
        let mut r = req("/", "");
        r.method = "POST".into();
        assert_eq!(status(check(&r, None, &[])), 400);
        assert_eq!(status(check(&req("/a/b/c", ""), None, &[])), 404);
    }
}
