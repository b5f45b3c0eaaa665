//! `POST /v1/sessions/NAME/url`: a fresh console URL for a VM manager, the seed's
//! "ask for a console per user request" integration point.
//!
//! It hands out credentials, so unlike the read-only views it needs one: a bearer token
//! read from `--http-token-file` (mode 0600, refused otherwise). Without that flag the
//! route does not exist (404). A request without the right token gets 401 and learns
//! nothing about sessions; the comparison takes the same time wherever it differs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::console::{Consoles, MintError, MintOptions, Minter};

/// What the route needs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ConsoleApi {
    pub minter: Minter,
    pub consoles: Consoles,
    pub token: Arc<BearerToken>,
}

/// The bearer token callers must present. Its `Debug` never shows it.
pub struct BearerToken(Vec<u8>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Why `--http-token-file` cannot be used. Each message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read --http-token-file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "--http-token-file {path} has mode {mode:04o}: group or others could read the token \
         that mints console URLs; run `chmod 600 {path}`"
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error(
        "--http-token-file {path} holds {len} bytes after trimming whitespace; a token must be \
         16 to 4096 printable characters (e.g. `openssl rand -hex 32 > {path}`)"
    )]
    Shape { path: PathBuf, len: usize },
}

impl BearerToken {
    /// Reads the token (surrounding whitespace ignored) from a file only its owner can read.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        use std::os::unix::fs::PermissionsExt;
        let read = |source| TokenFileError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TokenFileError::Mode {
                path: path.to_owned(),
                mode,
            });
        }
        let raw = std::fs::read(path).map_err(read)?;
        let t = raw.trim_ascii();
        if t.len() < 16 || t.len() > 4096 || !t.iter().all(u8::is_ascii_graphic) {
            return Err(TokenFileError::Shape {
                path: path.to_owned(),
                len: t.len(),
            });
        }
        Ok(BearerToken(t.to_vec()))
    }

    /// Whether `Authorization` carries this token, compared in time that depends only on
    /// the expected token's length.
    fn admits(&self, headers: &HeaderMap) -> bool {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or_default()
            .as_bytes();
        let mut diff = u8::from(given.len() != self.0.len());
        for (i, e) in self.0.iter().enumerate() {
            diff |= e ^ given.get(i).copied().unwrap_or(!e);
        }
        std::hint::black_box(diff) == 0
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            // A URL with a ticket must not sit in any cache.
            (header::CACHE_CONTROL, "no-store"),
        ],
        format!("{value}\n"),
    )
        .into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    json(status, &serde_json::json!({ "error": message }))
}

/// `?ttl=SECONDS`, the only query parameter.
fn options(uri: &Uri) -> Result<MintOptions, String> {
    let mut opts = MintOptions::default();
    for kv in uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|s| !s.is_empty())
    {
        match kv.split_once('=') {
            Some(("ttl", v)) => {
                let secs: u64 = v
                    .parse()
                    .map_err(|_| format!("ttl={v} is not a whole number of seconds"))?;
                opts.ttl = Some(Duration::from_secs(secs));
            }
            Some(("viewOnly", "true")) => opts.view_only = true,
            _ => return Err(format!("unknown parameter {kv:?}; known: ttl=SECONDS")),
        }
    }
    Ok(opts)
}

pub(super) async fn mint_url(
    State(state): State<AppState>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let Some(api) = &state.console else {
        return super::not_enabled();
    };
    if !api.token.admits(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token (the content of --http-token-file) is required\n",
        )
            .into_response();
    }
    let opts = match options(&uri) {
        Ok(o) => o,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    match api.consoles.mint(&api.minter, &name, opts) {
        Ok(u) => json(
            StatusCode::OK,
            &serde_json::json!({"url": u.url, "expiresAt": u.expires_at_rfc3339()}),
        ),
        Err(e @ MintError::NotReady(_)) => {
            // Known but not up (starting, failed) is a conflict; unknown is 404.
            let known = state
                .metrics
                .as_ref()
                .is_some_and(|m| m.view().sessions.contains_key(&name));
            if known {
                error(StatusCode::CONFLICT, &e.to_string())
            } else {
                error(StatusCode::NOT_FOUND, &MintError::Unknown(name).to_string())
            }
        }
        Err(e @ (MintError::Ttl(_) | MintError::ViewOnlyUnsupported)) => {
            error(StatusCode::BAD_REQUEST, &e.to_string())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn the_token_file_must_be_private_and_token_shaped() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = BearerToken::load(&f).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = BearerToken::load(&f).unwrap();
        assert_eq!(format!("{t:?}"), "BearerToken(<redacted>)");
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            t.admits(&h)
        };
        assert!(with("Bearer 0123456789abcdef0123"));
        assert!(!with("Bearer 0123456789abcdef012"));
        assert!(!with("Bearer 0123456789abcdef01234"));
        assert!(!with("Basic 0123456789abcdef0123"));
        assert!(!t.admits(&HeaderMap::new()));
        std::fs::write(&f, "short").unwrap();
        assert!(matches!(
            BearerToken::load(&f),
            Err(TokenFileError::Shape { .. })
        ));
    }

    #[test]
    fn only_ttl_is_a_known_parameter() {
        let u: Uri = "/v1/sessions/vm1/url?ttl=5".parse().unwrap();
        assert_eq!(options(&u).unwrap().ttl, Some(Duration::from_secs(5)));
        let u: Uri = "/v1/sessions/vm1/url".parse().unwrap();
        assert_eq!(options(&u).unwrap(), MintOptions::default());
        for bad in ["ttl=x", "token=abc", "ttl"] {
            let u: Uri = format!("/v1/sessions/vm1/url?{bad}").parse().unwrap();
            assert!(options(&u).is_err(), "{bad}");
        }
    }
}
