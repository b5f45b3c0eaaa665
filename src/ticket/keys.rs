//! Keys: the master key file (vncd's secret, 0600 in the state dir), lease keys derived
//! from it, and the websockify backend's key file. See the [`super`] docs for the hierarchy.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use ring::hmac;

use super::KEY_LEN;
use crate::session::Endpoint;

/// The domain-separation prefix of [`lease_key`]'s input.
pub(super) const LEASE_KEY_DOMAIN: &[u8] = b"vncd lease key v1\0";

/// The first line of a websockify key file (see [`websockify_key_file`]).
pub const KEY_FILE_MAGIC: &str = "vncd-lease-key v1";

/// Why the master key file cannot be used. Every message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error(
        "ticket master key {path} is a symbolic link; vncd only uses a regular file it can trust: \
         remove the link and vncd creates a new key (tickets already handed out stop working)"
    )]
    Symlink { path: PathBuf },
    #[error(
        "ticket master key {path} is not a regular file; remove it and vncd creates a new key \
         (tickets already handed out stop working)"
    )]
    NotRegular { path: PathBuf },
    #[error(
        "ticket master key {path} is owned by uid {owner}, but vncd runs as uid {me}; another \
         user could have written it: remove it so vncd creates its own, or chown it"
    )]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "ticket master key {path} has mode {mode:04o}, so group or others can read or change \
         it; run `chmod 600 {path}`, and if someone else may have read it, remove it instead \
         so vncd creates a new one"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "ticket master key {path} is {size} bytes, a key is exactly 32; it is damaged or not a \
         vncd key: remove it and vncd creates a new one (tickets already handed out stop working)"
    )]
    WrongSize { path: PathBuf, size: u64 },
    #[error("ticket master key {path}: cannot {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error(
        "cannot create ticket master key {path}: no random bytes from the operating system: {reason}"
    )]
    Rng { path: PathBuf, reason: String },
}

/// vncd's secret: the root of every lease key. Its `Debug` never shows the bytes.
pub struct MasterKey(pub(super) [u8; KEY_LEN]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// A key with the given bytes (tests, or a key kept somewhere other than a file).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        MasterKey(bytes)
    }

    /// The lease key of one lease: see [`lease_key`].
    pub fn lease_key(&self, session: &str, lease_uid: &str) -> LeaseKey {
        lease_key(self, session, lease_uid)
    }

    /// Loads the key at `path`, creating it (32 random bytes, mode 0600) if nothing is
    /// there. Refuses anything it cannot trust: a symlink, a non-regular file, a file of
    /// another owner, a file group or others may read or write, a file of the wrong size.
    ///
    /// Creation writes a temporary file (`O_CREAT|O_EXCL|O_NOFOLLOW`, 0600), syncs it and
    /// hard-links it to `path`, which fails if `path` exists: a crash never leaves a short
    /// key behind, and of two racing creators one wins and the other loads its key.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyFileError> {
        for _ in 0..3 {
            match Self::load(path) {
                Err(KeyFileError::Io { source, .. })
                    if source.kind() == io::ErrorKind::NotFound => {}
                other => return other,
            }
            let mut bytes = [0u8; KEY_LEN];
            getrandom::fill(&mut bytes).map_err(|e| KeyFileError::Rng {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            match create_exclusive(path, &bytes) {
                Ok(()) => return Ok(MasterKey(bytes)),
                // Someone else created it first: load theirs.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(KeyFileError::Io {
                        path: path.to_owned(),
                        action: "create it",
                        source,
                    });
                }
            }
        }
        // Appears and disappears under us three times: someone is interfering.
        Err(KeyFileError::Io {
            path: path.to_owned(),
            action: "create it",
            source: io::Error::other("the file keeps appearing and disappearing"),
        })
    }

    /// Loads an existing key, with the checks of [`MasterKey::load_or_create`].
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let io_err = |action, source| KeyFileError::Io {
            path: path.to_owned(),
            action,
            source,
        };
        // O_NOFOLLOW: a symlink is refused (ELOOP), never followed. O_NONBLOCK: a FIFO planted
        // here fails the regular-file check below instead of blocking the open.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).bits())
            .open(path);
        let mut file = match file {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
                return Err(KeyFileError::Symlink {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(io_err("open it", e)),
        };
        let meta = file.metadata().map_err(|e| io_err("stat it", e))?;
        if !meta.file_type().is_file() {
            return Err(KeyFileError::NotRegular {
                path: path.to_owned(),
            });
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(KeyFileError::Owner {
                path: path.to_owned(),
                owner: meta.uid(),
                me,
            });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() != KEY_LEN as u64 {
            return Err(KeyFileError::WrongSize {
                path: path.to_owned(),
                size: meta.len(),
            });
        }
        // Read one byte more than a key, so a file that grew since fstat is still caught.
        let mut buf = Vec::with_capacity(KEY_LEN + 1);
        (&mut file)
            .take(KEY_LEN as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| io_err("read it", e))?;
        let bytes: [u8; KEY_LEN] =
            buf.try_into()
                .map_err(|b: Vec<u8>| KeyFileError::WrongSize {
                    path: path.to_owned(),
                    size: b.len() as u64,
                })?;
        Ok(MasterKey(bytes))
    }
}

/// Writes `bytes` to a fresh temporary file beside `path` and links it to `path`;
/// `AlreadyExists` if `path` exists (even as a dangling symlink).
fn create_exclusive(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.new.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        crate::lease::random_hex(4)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
            .open(&tmp)?;
        // The umask can only clear bits; make it exactly 0600 so the loader accepts it.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::hard_link(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    let _ = fs::remove_file(&tmp);
    result
}

/// One lease's key: what its proxy holds and what vncd mints its tickets with. Its `Debug`
/// never shows the bytes.
#[derive(Clone)]
pub struct LeaseKey(pub(super) [u8; KEY_LEN]);

impl fmt::Debug for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseKey(<redacted>)")
    }
}

impl LeaseKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        LeaseKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Lowercase hex, the form key files carry.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (either case; surrounding ASCII whitespace ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let t = text.trim_ascii().as_bytes();
        // Digits only: `from_str_radix` alone would take a sign ("+1").
        if t.len() != 2 * KEY_LEN || !t.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let mut out = [0u8; KEY_LEN];
        for (o, pair) in out.iter_mut().zip(t.chunks_exact(2)) {
            *o = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(LeaseKey(out))
    }

    pub(super) fn hmac(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.0)
    }
}

/// The key of the lease `lease_uid` of `session`: HMAC-SHA256 under the master key of the
/// domain-separated, length-prefixed input described in the module docs.
pub fn lease_key(master: &MasterKey, session: &str, lease_uid: &str) -> LeaseKey {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &master.0);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(LEASE_KEY_DOMAIN);
    for part in [session.as_bytes(), lease_uid.as_bytes()] {
        // Session names (DNS names) and uids (hex) are short: 4 GiB never occurs. Were it
        // to, the saturated prefix would still be followed by all the bytes.
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        ctx.update(&len.to_be_bytes());
        ctx.update(part);
    }
    let tag = ctx.sign();
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(tag.as_ref());
    LeaseKey(out)
}

/// The websockify plugin's key file (`--token-source`; written 0600): the lease key, the
/// target and the nonce directory. Line-based so the plugin needs no parser:
///
/// ```text
/// vncd-lease-key v1
/// session NAME
/// key 64-HEX-DIGITS
/// host HOST          and  port PORT     (a TCP target)
/// unix PATH                             (a unix-socket target)
/// nonces DIR
/// ```
///
/// Each line after the first is `NAME VALUE`, split at the first space. `None` if a value
/// contains a line break or NUL, or the nonce directory is not UTF-8: the format cannot
/// carry those, and a value with a line break could smuggle in a line of its own.
pub fn websockify_key_file(
    session: &str,
    key: &LeaseKey,
    target: &Endpoint,
    nonce_dir: &Path,
) -> Option<String> {
    let dir = nonce_dir.to_str()?;
    let mut lines = vec![
        KEY_FILE_MAGIC.to_owned(),
        format!("session {session}"),
        format!("key {}", key.to_hex()),
    ];
    match target {
        Endpoint::Tcp { host, port } => {
            lines.push(format!("host {host}"));
            lines.push(format!("port {port}"));
        }
        Endpoint::Unix { path } => lines.push(format!("unix {path}")),
    }
    lines.push(format!("nonces {dir}"));
    let bad = |l: &String| l.contains(['\n', '\r', '\0']);
    if lines.iter().any(bad) {
        return None;
    }
    let mut text = lines.join("\n");
    text.push('\n');
    Some(text)
}
