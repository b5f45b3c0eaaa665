//! The effective configuration of the `vncd run` that owns a state directory, recorded
//! as `STATE_DIR/config.json`, and how the other commands use it.
//!
//! Why: `vncd status`, `vncd get`, `vncd cleanup` (and `vncd apply` / `vncd delete`) work
//! on the same state directory as the controller, but they used to take the pool and the
//! sessions directory from their own flags and defaults. `vncd status --state-dir S` then reported a 900-port pool for a
//! controller serving 40 ports, and `vncd cleanup --once --state-dir S` read
//! `/etc/vncd/sessions` instead of the directory the controller watches; a cleanup that
//! reads the wrong directory would take every session for gone, and `vncd apply --wait`
//! writing elsewhere would wait for a session nobody serves. So `vncd run` writes down
//! what it really runs with, and the readers take it from there:
//!
//! - a flag (or its `VNCD_*` variable) that is not given takes the recorded value;
//! - a flag that agrees with the record is fine;
//! - a flag that contradicts the record is an error naming the flag, both values and the
//!   file, never a silent override (which value would the operator have meant?);
//! - with no record (a state directory that no `vncd run` of this version has used), the
//!   flags and their defaults apply as before.
//!
//! The record stays when vncd stops, so the readers work on a stopped controller too.
//! It holds no secret (the ticket master key lives in a 0600 file of its own), hence
//! mode 0644.

use std::fmt::Display;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::pool::PortRange;

/// The file name inside the state directory.
pub const FILE_NAME: &str = "config.json";

/// The format version written into the record; a reader refuses a newer one instead of
/// misreading it.
pub const FORMAT: u32 = 1;

/// What `vncd run` runs with, as it resolved its flags, environment and defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunConfig {
    /// [`FORMAT`].
    pub format: u32,
    /// The vncd version that wrote the record (for people reading the file).
    pub vncd_version: String,
    /// The watched manifest directory, made absolute.
    pub sessions_dir: PathBuf,
    #[serde(with = "as_string")]
    pub port_range: PortRange,
    pub max_sessions: usize,
    /// `builtin` or `websockify`.
    pub backend: String,
    pub listen_address: IpAddr,
    /// The host name in console URLs (after its default was applied).
    pub public_host: String,
    /// `--libvirt URI`, if the controller also serves libvirt domains.
    #[serde(default)]
    pub libvirt: Option<String>,
    /// URLs open noVNC's page (`--web`), not a bare websocket.
    #[serde(default)]
    pub web: bool,
    /// URLs are https/wss (`--tls-cert`).
    #[serde(default)]
    pub tls: bool,
    /// `--ticket-ttl` in seconds: how long `vncd url`'s tickets stay valid by default.
    #[serde(default = "default_ticket_ttl")]
    pub ticket_ttl_seconds: u64,
    /// The relay's gateway (`--gateway`), outside the pool: its address, and the URL
    /// `vncd url --gateway` prints (`--gateway-url`, default `ws://PUBLIC_HOST:PORT/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_url: Option<String>,
}

fn default_ticket_ttl() -> u64 {
    crate::ticket::DEFAULT_TTL.as_secs()
}

impl RunConfig {
    /// How the recorded controller writes console URLs.
    pub fn url_style(&self) -> crate::status::UrlStyle {
        crate::status::UrlStyle {
            public_host: self.public_host.clone(),
            web: self.web,
            tls: self.tls,
        }
    }
}

/// Why the record could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RunConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a vncd run configuration ({source}); it is rewritten by the next `vncd run`, or remove it to use flags and defaults"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path} has format {found}, newer than this vncd understands ({FORMAT}); use the vncd that wrote it"
    )]
    Newer { path: PathBuf, found: u32 },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "--{flag} {given} (or {env}) contradicts the {what} `vncd run` recorded in {path}: {recorded}; drop the flag and the variable to use the recorded value"
    )]
    Contradiction {
        flag: &'static str,
        env: &'static str,
        what: &'static str,
        given: String,
        recorded: String,
        path: PathBuf,
    },
}

impl RunConfig {
    /// `STATE_DIR/config.json`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE_NAME)
    }

    /// Writes the record atomically (temp file, fsync, rename), mode 0644.
    pub fn write(&self, state_dir: &Path) -> Result<(), RunConfigError> {
        let path = Self::path(state_dir);
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| RunConfigError::Write {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        bytes.push(b'\n');
        crate::fsutil::write_atomic(&path, &bytes, 0o644)
            .map_err(|source| RunConfigError::Write { path, source })
    }

    /// The record in `state_dir`, or `None` if there is none.
    pub fn read(state_dir: &Path) -> Result<Option<RunConfig>, RunConfigError> {
        let path = Self::path(state_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RunConfigError::Read { path, source }),
        };
        // The format first, so a newer record is reported as such rather than as corrupt.
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let head: Head =
            serde_json::from_slice(&bytes).map_err(|source| RunConfigError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if head.format > FORMAT {
            return Err(RunConfigError::Newer {
                path,
                found: head.format,
            });
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| RunConfigError::Corrupt { path, source })
    }
}

/// A path made comparable: resolved if it exists, else absolute.
pub fn normalize(p: &Path) -> PathBuf {
    std::fs::canonicalize(p)
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_owned())
}

/// The record of one state directory, and the rule that merges it with flags.
#[derive(Debug, Clone)]
pub struct Recorded {
    path: PathBuf,
    config: Option<RunConfig>,
}

impl Recorded {
    /// Loads `STATE_DIR/config.json` (absent is fine; unreadable or corrupt is an error).
    pub fn load(state_dir: &Path) -> Result<Self, RunConfigError> {
        Ok(Recorded {
            path: RunConfig::path(state_dir),
            config: RunConfig::read(state_dir)?,
        })
    }

    /// The record itself, if `vncd run` wrote one.
    pub fn config(&self) -> Option<&RunConfig> {
        self.config.as_ref()
    }

    /// The file the record lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The one rule: given and recorded must agree; either alone wins; neither gives
    /// the default. `same` decides agreement (paths compare normalized).
    #[allow(clippy::too_many_arguments)]
    fn pick<T: Display + Clone>(
        &self,
        flag: &'static str,
        env: &'static str,
        what: &'static str,
        given: Option<T>,
        recorded: Option<T>,
        same: impl Fn(&T, &T) -> bool,
        default: impl FnOnce() -> T,
    ) -> Result<T, RunConfigError> {
        match (given, recorded) {
            (Some(g), Some(r)) if !same(&g, &r) => Err(RunConfigError::Contradiction {
                flag,
                env,
                what,
                given: g.to_string(),
                recorded: r.to_string(),
                path: self.path.clone(),
            }),
            (Some(g), _) => Ok(g),
            (None, Some(r)) => Ok(r),
            (None, None) => Ok(default()),
        }
    }

    pub fn port_range(&self, given: Option<PortRange>) -> Result<PortRange, RunConfigError> {
        self.pick(
            "port-range",
            "VNCD_PORT_RANGE",
            "port range",
            given,
            self.config.as_ref().map(|c| c.port_range),
            PartialEq::eq,
            PortRange::default,
        )
    }

    pub fn max_sessions(&self, given: Option<usize>) -> Result<usize, RunConfigError> {
        self.pick(
            "max-sessions",
            "VNCD_MAX_SESSIONS",
            "session limit",
            given,
            self.config.as_ref().map(|c| c.max_sessions),
            PartialEq::eq,
            || DEFAULT_MAX_SESSIONS,
        )
    }

    pub fn sessions_dir(&self, given: Option<PathBuf>) -> Result<PathBuf, RunConfigError> {
        self.pick(
            "sessions-dir",
            "VNCD_SESSIONS_DIR",
            "sessions directory",
            given.map(Shown),
            self.config.as_ref().map(|c| Shown(c.sessions_dir.clone())),
            |a, b| normalize(&a.0) == normalize(&b.0),
            || Shown(PathBuf::from(DEFAULT_SESSIONS_DIR)),
        )
        .map(|s| s.0)
    }

    /// `--libvirt`: a record without libvirt counts as "none", so `--libvirt URI` against
    /// a controller that serves no domains is a contradiction too.
    pub fn libvirt(&self, given: Option<String>) -> Result<Option<String>, RunConfigError> {
        let Some(config) = &self.config else {
            return Ok(given);
        };
        let shown = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
        self.pick(
            "libvirt",
            "VNCD_LIBVIRT",
            "libvirt URI",
            given.map(|g| shown(&Some(g))),
            Some(shown(&config.libvirt)),
            PartialEq::eq,
            String::new,
        )
        .map(|_| config.libvirt.clone())
    }
}

/// `vncd run`'s default for `--max-sessions` (see `cli::PoolArgs`).
pub const DEFAULT_MAX_SESSIONS: usize = 800;
/// `vncd run`'s default for `--sessions-dir` (see `cli::SessionsArgs`).
pub const DEFAULT_SESSIONS_DIR: &str = "/etc/vncd/sessions";

/// A path that prints itself (for the contradiction message).
#[derive(Debug, Clone)]
struct Shown(PathBuf);

impl Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.display().fmt(f)
    }
}

/// The pool flags of the commands that read a state directory. Unlike `vncd run`'s they
/// have no clap default, so "not given" can be told apart from "given the default".
#[derive(Debug, Clone, Default, Args)]
pub struct PoolFlags {
    /// Websocket ports of the pool, inclusive [default: what `vncd run` recorded in
    /// STATE_DIR/config.json, else 6100-6999]. Must agree with the record.
    #[arg(long, env = "VNCD_PORT_RANGE")]
    pub port_range: Option<PortRange>,
    /// Most sessions served at once [default: recorded, else 800]. Must agree with the record.
    #[arg(long, env = "VNCD_MAX_SESSIONS")]
    pub max_sessions: Option<usize>,
}

/// `--sessions-dir` for the commands that read a state directory (no clap default; see
/// [`PoolFlags`]).
#[derive(Debug, Clone, Default, Args)]
pub struct SessionsFlag {
    /// Directory of VncSession manifests [default: what `vncd run` recorded in
    /// STATE_DIR/config.json, else /etc/vncd/sessions]. Must agree with the record.
    #[arg(long, env = "VNCD_SESSIONS_DIR")]
    pub sessions_dir: Option<PathBuf>,
}

/// Serde for types that are written as their `Display` form and parsed with `FromStr`.
mod as_string {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sample(dir: &Path) -> RunConfig {
        RunConfig {
            format: FORMAT,
            vncd_version: "0.1.0".into(),
            sessions_dir: dir.join("sessions"),
            port_range: "16100-16139".parse().unwrap(),
            max_sessions: 40,
            backend: "builtin".into(),
            listen_address: "127.0.0.1".parse().unwrap(),
            public_host: "console.example.test".into(),
            libvirt: None,
            web: false,
            tls: false,
            ticket_ttl_seconds: 60,
            gateway: None,
            gateway_url: None,
        }
    }

    #[test]
    fn the_record_round_trips_with_mode_0644() {
        let tmp = tempfile::tempdir().unwrap();
        let c = sample(tmp.path());
        c.write(tmp.path()).unwrap();
        assert_eq!(RunConfig::read(tmp.path()).unwrap(), Some(c));
        let path = RunConfig::path(tmp.path());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"portRange\": \"16100-16139\""), "{text}");
    }

    #[test]
    fn no_record_means_flags_then_defaults() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Recorded::load(tmp.path()).unwrap();
        assert!(r.config().is_none());
        assert_eq!(r.port_range(None).unwrap(), PortRange::default());
        assert_eq!(r.max_sessions(None).unwrap(), 800);
        assert_eq!(
            r.sessions_dir(None).unwrap(),
            PathBuf::from("/etc/vncd/sessions")
        );
        assert_eq!(r.libvirt(None).unwrap(), None);
        let given: PortRange = "7000-7009".parse().unwrap();
        assert_eq!(r.port_range(Some(given)).unwrap(), given);
        assert_eq!(
            r.libvirt(Some("qemu:///system".into())).unwrap().as_deref(),
            Some("qemu:///system")
        );
    }

    #[test]
    fn the_record_fills_what_is_not_given_and_agreeing_flags_pass() {
        let tmp = tempfile::tempdir().unwrap();
        let c = sample(tmp.path());
        std::fs::create_dir(&c.sessions_dir).unwrap();
        c.write(tmp.path()).unwrap();
        let r = Recorded::load(tmp.path()).unwrap();
        assert_eq!(r.port_range(None).unwrap(), c.port_range);
        assert_eq!(r.port_range(Some(c.port_range)).unwrap(), c.port_range);
        assert_eq!(r.max_sessions(None).unwrap(), 40);
        assert_eq!(r.max_sessions(Some(40)).unwrap(), 40);
        assert_eq!(r.sessions_dir(None).unwrap(), c.sessions_dir);
        // The same directory written another way agrees.
        let other_spelling = tmp.path().join("sessions/../sessions/.");
        assert!(r.sessions_dir(Some(other_spelling)).is_ok());
        assert_eq!(r.libvirt(None).unwrap(), None);
    }

    #[test]
    fn a_contradicting_flag_names_the_flag_both_values_and_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = sample(tmp.path());
        c.libvirt = Some("qemu:///system".into());
        c.write(tmp.path()).unwrap();
        let r = Recorded::load(tmp.path()).unwrap();
        let msg = r
            .port_range(Some(PortRange::default()))
            .unwrap_err()
            .to_string();
        for part in [
            "--port-range 6100-6999",
            "VNCD_PORT_RANGE",
            "16100-16139",
            &RunConfig::path(tmp.path()).display().to_string(),
        ] {
            assert!(msg.contains(part), "{part:?} missing in {msg:?}");
        }
        assert!(r.max_sessions(Some(800)).is_err());
        let msg = r
            .sessions_dir(Some("/etc/vncd/sessions".into()))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("--sessions-dir /etc/vncd/sessions"), "{msg}");
        assert!(r.libvirt(Some("qemu:///session".into())).is_err());
        assert_eq!(
            r.libvirt(None).unwrap().as_deref(),
            Some("qemu:///system"),
            "the recorded URI is used when none is given"
        );
        // A record without libvirt contradicts --libvirt.
        let mut c = sample(tmp.path());
        c.libvirt = None;
        c.write(tmp.path()).unwrap();
        let r = Recorded::load(tmp.path()).unwrap();
        let msg = r
            .libvirt(Some("qemu:///system".into()))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("(none)"), "{msg}");
    }

    #[test]
    fn a_corrupt_or_newer_record_is_an_error_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = RunConfig::path(tmp.path());
        std::fs::write(&path, b"{\"format\": 1, \"portRange\": ").unwrap();
        let msg = Recorded::load(tmp.path()).unwrap_err().to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        std::fs::write(&path, b"{\"format\": 99}").unwrap();
        let err = Recorded::load(tmp.path()).unwrap_err();
        assert!(
            matches!(err, RunConfigError::Newer { found: 99, .. }),
            "{err}"
        );
        let mut v = serde_json::to_value(sample(tmp.path())).unwrap();
        v["portRange"] = "7000-6000".into();
        std::fs::write(&path, v.to_string()).unwrap();
        assert!(matches!(
            Recorded::load(tmp.path()).unwrap_err(),
            RunConfigError::Corrupt { .. }
        ));
    }
}
