//! What every relay listener serves besides consoles: TLS (wss), the allowed `Origin`s, and
//! a directory of static files (noVNC).
//!
//! They are declared with the sessions ([`ServingSpec`]) rather than put on the relay's
//! command line, for the same reason as the gateway: the argv stays fixed, and a
//! controller restarted with another certificate or origin list changes what the relay
//! serves without restarting it (which would drop every console).
//!
//! The relay loads the certificate and key itself, by path, and loads them again when
//! either file changes on disk (checked every maintenance tick): a renewed certificate
//! (cert-manager, certbot, a kubelet-updated Secret mount) reaches new connections without
//! the controller, and without ending open ones. A renewal caught half-way (new key, old
//! certificate) fails to load; the previous certificate then serves on until both files
//! agree, and the error is reported. A declared certificate that never loaded leaves the
//! relay with nothing safe to serve: its connections are closed at once (never served as
//! plain ws), and every session reports not listening, so none shows Ready.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use super::session::lock;

/// Declared: what the relay's listeners serve besides consoles.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServingSpec {
    /// Serve wss (and https for `web`) with this certificate chain and key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// Allowed `Origin` headers of an upgrade; empty allows any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub origins: Vec<String>,
    /// Static files (noVNC) served without a ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web: Option<PathBuf>,
}

/// PEM files of a certificate chain and its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How a new connection starts.
#[derive(Clone)]
pub(crate) enum Tls {
    Plain,
    On(TlsAcceptor),
    /// TLS is declared but no certificate ever loaded: close the connection.
    Unusable,
}

/// What is in effect now; each connection takes it at accept and keeps it.
#[derive(Clone)]
pub(crate) struct Serving {
    pub tls: Tls,
    pub origins: Vec<String>,
    /// Canonical root of the static files.
    pub web: Option<PathBuf>,
}

impl Default for Serving {
    fn default() -> Self {
        Serving {
            tls: Tls::Plain,
            origins: Vec::new(),
            web: None,
        }
    }
}

/// Identity, size and mtime of a file's contents: a rename or a rewrite changes it.
type Stamp = Option<(u64, u64, u64, i64, i64)>;

fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

#[derive(Default)]
struct State {
    spec: ServingSpec,
    now: Arc<Serving>,
    /// The stamps of the certificate and key the last load attempt saw.
    stamps: (Stamp, Stamp),
    /// Why the declared settings are not (all) in effect.
    error: Option<String>,
}

/// The relay's serving settings, shared by every listener.
#[derive(Default)]
pub(crate) struct ServingCell {
    state: Mutex<State>,
}

impl std::fmt::Debug for ServingCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = lock(&self.state);
        f.debug_struct("ServingCell")
            .field("spec", &s.spec)
            .field("error", &s.error)
            .finish_non_exhaustive()
    }
}

impl ServingCell {
    /// What a connection accepted now gets.
    pub fn current(&self) -> Arc<Serving> {
        lock(&self.state).now.clone()
    }

    /// The declared settings.
    pub fn spec(&self) -> ServingSpec {
        lock(&self.state).spec.clone()
    }

    /// Why the declared settings are not (all) in effect, if they are not.
    pub fn error(&self) -> Option<String> {
        lock(&self.state).error.clone()
    }

    /// Whether connections are closed at once (TLS declared, never loaded).
    pub fn unusable(&self) -> bool {
        matches!(lock(&self.state).now.tls, Tls::Unusable)
    }

    /// Applies a declaration. An unchanged one changes nothing (a declaration repeats
    /// it with every session change). Returns why it is not (all) in effect.
    pub fn apply(&self, spec: ServingSpec) -> Option<String> {
        let mut s = lock(&self.state);
        if s.spec == spec {
            return s.error.clone();
        }
        s.spec = spec;
        s.stamps = (None, None);
        load(&mut s, true);
        s.error.clone()
    }

    /// Loads the certificate again if either file changed since the last attempt.
    pub fn refresh(&self) {
        let mut s = lock(&self.state);
        let Some(files) = &s.spec.tls else {
            return;
        };
        if (stamp(&files.cert), stamp(&files.key)) != s.stamps {
            load(&mut s, false);
        }
    }
}

/// Builds what is in effect from `s.spec`, keeping the previous certificate if the new
/// one does not load.
fn load(s: &mut State, declared: bool) {
    let mut errors = Vec::new();
    let web = s.spec.web.as_ref().and_then(|dir| {
        crate::proxy::web_root(dir)
            .map_err(|e| errors.push(e.to_string()))
            .ok()
    });
    let tls = match &s.spec.tls {
        None => Tls::Plain,
        Some(files) => {
            s.stamps = (stamp(&files.cert), stamp(&files.key));
            match crate::proxy::tls::acceptor(&files.cert, &files.key) {
                Ok(a) => {
                    if !declared {
                        info!(cert = %files.cert.display(), "loaded the renewed TLS certificate");
                    }
                    Tls::On(a)
                }
                Err(e) => {
                    errors.push(e.to_string());
                    match &s.now.tls {
                        // A renewal caught half-way, or a broken one: the old one serves on.
                        Tls::On(old) => Tls::On(old.clone()),
                        Tls::Plain | Tls::Unusable => Tls::Unusable,
                    }
                }
            }
        }
    };
    s.error = (!errors.is_empty()).then(|| errors.join("; "));
    if let Some(e) = &s.error {
        warn!(error = %e, "serving settings not (all) in effect");
    }
    s.now = Arc::new(Serving {
        tls,
        origins: s.spec.origins.clone(),
        web,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_cert(dir: &Path, name: &str) -> TlsFiles {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        TlsFiles { cert, key }
    }

    #[test]
    fn a_certificate_that_never_loaded_makes_the_relay_unusable_not_plain() {
        let dir = tempfile::tempdir().unwrap();
        let cell = ServingCell::default();
        let err = cell.apply(ServingSpec {
            tls: Some(TlsFiles {
                cert: dir.path().join("missing.crt"),
                key: dir.path().join("missing.key"),
            }),
            ..ServingSpec::default()
        });
        assert!(err.unwrap().contains("missing.crt"));
        assert!(cell.unusable());
    }

    #[test]
    fn a_broken_renewal_keeps_the_old_certificate_and_a_good_one_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_cert(dir.path(), "a");
        let cell = ServingCell::default();
        assert_eq!(
            cell.apply(ServingSpec {
                tls: Some(files.clone()),
                ..ServingSpec::default()
            }),
            None
        );
        assert!(matches!(cell.current().tls, Tls::On(_)));
        // Half a renewal: a key that does not match the certificate.
        let other = write_cert(dir.path(), "b");
        std::fs::rename(&other.key, &files.key).unwrap();
        cell.refresh();
        assert!(cell.error().is_some(), "the mismatch is reported");
        assert!(
            matches!(cell.current().tls, Tls::On(_)),
            "the old one serves on"
        );
        // The certificate follows: both agree again.
        std::fs::rename(&other.cert, &files.cert).unwrap();
        cell.refresh();
        assert_eq!(cell.error(), None);
        assert!(matches!(cell.current().tls, Tls::On(_)));
    }

    #[test]
    fn an_unchanged_declaration_is_not_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ServingSpec {
            origins: vec!["https://console.example".into()],
            web: Some(dir.path().to_owned()),
            ..ServingSpec::default()
        };
        let cell = ServingCell::default();
        assert_eq!(cell.apply(spec.clone()), None);
        let first = cell.current();
        assert_eq!(cell.apply(spec), None);
        assert!(Arc::ptr_eq(&first, &cell.current()));
        assert_eq!(first.origins, ["https://console.example"]);
        assert!(first.web.is_some());
    }

    #[test]
    fn a_web_directory_that_is_missing_is_reported_with_its_path() {
        let cell = ServingCell::default();
        let err = cell
            .apply(ServingSpec {
                web: Some("/nonexistent/novnc".into()),
                ..ServingSpec::default()
            })
            .unwrap();
        assert!(err.contains("/nonexistent/novnc"), "{err}");
        assert!(cell.current().web.is_none());
    }
}
