//! Tokens out of proxy log lines before they leave the supervisor.
//!
//! A proxy's last log line becomes part of a status message (`vncd get`, sessions.json,
//! the VncSession's `.status`, a Kubernetes Event), all of which are far more widely
//! readable than the 0600 token files. websockify logs each request line, query string
//! and all: `"GET /websockify?token=... HTTP/1.1" 101`.

/// What replaces a token.
const REDACTED: &str = "<redacted>";

/// `line` with tokens replaced: the session's current `token` wherever it appears, the
/// value of every `token=` parameter, and any run of 32 or more hex digits (the shape of
/// the tokens vncd makes, so an older token of the session is caught too).
pub fn tokens(line: &str, token: Option<&str>) -> String {
    let mut out = match token {
        Some(t) if !t.is_empty() => line.replace(t, REDACTED),
        _ => line.to_owned(),
    };
    out = token_params(&out);
    out = quoted_after(&out, "token '");
    hex_runs(&out)
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
        let r = tokens(&line, Some(t));
        assert!(!r.contains(t), "{r}");
        assert!(r.contains("token=<redacted> HTTP/1.1"), "{r}");
        // Unknown tokens: by parameter, and by shape.
        let r = tokens("GET /?a=1&TOKEN=Secret_1&b=2 x", None);
        assert_eq!(r, "GET /?a=1&TOKEN=<redacted>&b=2 x");
        let r = tokens(&format!("path /websockify/{t}"), None);
        assert_eq!(r, "path /websockify/<redacted>");
        let r = tokens("127.0.0.1: Token 'Mistyped-1' not found", None);
        assert_eq!(r, "127.0.0.1: Token '<redacted>' not found");
        // Ordinary lines are left alone.
        let plain = "connecting to: 127.0.0.1:5900 pid 1234 deadbeef";
        assert_eq!(tokens(plain, None), plain);
        assert_eq!(tokens("token=", None), "token=");
    }
}
