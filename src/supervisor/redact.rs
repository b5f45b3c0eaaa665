//! Console tickets out of proxy log lines before they leave the supervisor.
//!
//! A proxy's last log line becomes part of a status message (`vncd get`, sessions.json,
//! the VncSession's `.status`, a Kubernetes Event), all of which are far more widely
//! readable than the proxy's own 0600 log. websockify logs each request line, query string
//! and all: `"GET /websockify?token=... HTTP/1.1" 101`.

/// What replaces a token.
const REDACTED: &str = "<redacted>";

/// `line` with credentials replaced: anything shaped like a console ticket wherever it
/// stands (a query value, a path segment, noVNC's `path=websockify%3Ftoken%3D...`), the
/// value of every `token=` parameter, websockify's `Token '...'`, and any run of 32 or more
/// hex digits (the shape of a lease key, and of the tokens older vncd versions made).
pub fn tokens(line: &str) -> String {
    let mut out = ticket_shapes(line);
    out = token_params(&out);
    out = quoted_after(&out, "token '");
    hex_runs(&out)
}

/// Replaces every `v1.DIGITS.` followed by 22 and 43 base64url characters (a ticket; see
/// [`crate::ticket`]), also when it runs into other text.
fn ticket_shapes(line: &str) -> String {
    let b64 = |c: &u8| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_';
    let shape_len = |rest: &[u8]| -> Option<usize> {
        let rest = rest.strip_prefix(b"v1.")?;
        let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
        let rest = rest.get(digits..)?.strip_prefix(b".")?;
        let nonce = rest.iter().take_while(|c| b64(c)).count();
        let rest = rest.get(nonce..)?.strip_prefix(b".")?;
        let mac = rest.iter().take_while(|c| b64(c)).count();
        (digits > 0 && nonce >= 22 && mac >= 43).then_some(3 + digits + 1 + nonce + 1 + mac)
    };
    let bytes = line.as_bytes();
    let mut out = String::with_capacity(line.len());
    let (mut i, mut copied) = (0, 0);
    while let Some(at) = line[i..].find("v1.") {
        let start = i + at;
        match shape_len(&bytes[start..]) {
            Some(n) => {
                out.push_str(&line[copied..start]);
                out.push_str(REDACTED);
                i = start + n;
                copied = i;
            }
            None => i = start + 3,
        }
    }
    out.push_str(&line[copied..]);
    out
}

/// Replaces what stands between `marker` (any case) and the next quote: websockify says
/// `Token '...' not found` for a token it does not know, often a mistyped real one.
fn quoted_after(line: &str, marker: &str) -> String {
    let lower = line.to_ascii_lowercase();
    let Some(i) = lower.find(marker) else {
        return line.to_owned();
    };
    let start = i + marker.len();
    let end = line[start..]
        .find('\u{27}')
        .map_or(line.len(), |e| start + e);
    format!("{}{REDACTED}{}", &line[..start], &line[end..])
}

/// Replaces the value after every `token=` (any case) up to a delimiter.
fn token_params(line: &str) -> String {
    let lower = line.to_ascii_lowercase();
    let mut out = String::with_capacity(line.len());
    let mut rest = 0;
    let mut from = 0;
    while let Some(i) = lower[from..].find("token=") {
        let start = from + i + "token=".len();
        let end = line[start..]
            .find(|c: char| c.is_whitespace() || "&\"'#;,".contains(c))
            .map_or(line.len(), |e| start + e);
        out.push_str(&line[rest..start]);
        if end > start {
            out.push_str(REDACTED);
        }
        rest = end;
        from = end;
    }
    out.push_str(&line[rest..]);
    out
}

/// Replaces runs of 32 or more ASCII hex digits.
fn hex_runs(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 32 {
            out.push_str(REDACTED);
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in line.chars() {
        if c.is_ascii_hexdigit() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_never_survive() {
        let t = "0123456789abcdef0123456789abcdef";
        let line =
            format!("127.0.0.1 - - [x] \"GET /websockify?token={t} HTTP/1.1\" 101 - and /{t}");
        let r = tokens(&line);
        assert!(!r.contains(t), "{r}");
        assert!(r.contains("token=<redacted> HTTP/1.1"), "{r}");
        // Unknown tokens: by parameter, and by shape.
        let r = tokens("GET /?a=1&TOKEN=Secret_1&b=2 x");
        assert_eq!(r, "GET /?a=1&TOKEN=<redacted>&b=2 x");
        let r = tokens(&format!("path /websockify/{t}"));
        assert_eq!(r, "path /websockify/<redacted>");
        let r = tokens("127.0.0.1: Token 'Mistyped-1' not found");
        assert_eq!(r, "127.0.0.1: Token '<redacted>' not found");
        // Ordinary lines are left alone.
        let plain = "connecting to: 127.0.0.1:5900 pid 1234 deadbeef";
        assert_eq!(tokens(plain), plain);
        assert_eq!(tokens("token="), "token=");
        assert_eq!(tokens("v1.2.3 and v1.x"), "v1.2.3 and v1.x");
    }

    #[test]
    fn tickets_never_survive_in_any_position() {
        let key = crate::ticket::LeaseKey::from_bytes([1; 32]);
        let t = crate::ticket::mint(&key, std::time::Duration::from_secs(60), 1)
            .unwrap()
            .text;
        for line in [
            format!("\"GET /websockify/{t} HTTP/1.1\" 101"),
            format!("GET /vnc.html?path=websockify%3Ftoken%3D{t} HTTP/1.1"),
            format!("x{t}y"),
            t.clone(),
        ] {
            let r = tokens(&line);
            assert!(!r.contains(&t), "{r}");
            assert!(r.contains("<redacted>"), "{r}");
        }
    }
}
