//! Crash-safe file writes shared by the lease store, the status file and `vncd apply`,
//! and the trust check of the directories they write in.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes` so that a reader (or a crash) sees either the old or
/// the new content, never a mix: write a temp file beside it, fsync it, rename it over
/// the target, then fsync the directory so the rename itself is durable.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_replacing(path, bytes, mode, true)
}

/// Like [`write_atomic`] (all or nothing for readers) but without the fsyncs, for files
/// that need not survive a power loss: a proxy's token file is rewritten from the durable
/// lease before every start, and a reboot ends the proxy that read it anyway. Starting
/// hundreds of proxies at once then costs no disk flush per proxy.
pub fn write_replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_replacing(path, bytes, mode, false)
}

fn write_replacing(path: &Path, bytes: &[u8], mode: u32, durable: bool) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> io::Result<()> {
        let mut f = match create_new(&tmp, mode) {
            // A temp file left by an earlier process with the same pid (vncd is always
            // pid 1 in a container) that crashed mid-write: ours, in our directory.
            // remove_file never follows a symlink, so whatever it is, it just goes.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_file(&tmp)?;
                create_new(&tmp, mode)?
            }
            other => other?,
        };
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        // Never leave a half-written temp file behind; the target is untouched.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `path` exclusively (O_EXCL: never an existing file, never through a symlink,
/// which O_EXCL refuses even when it dangles) with `mode`, for writing.
fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// Opens an existing file for reading without following a symlink at its last
/// component (ELOOP instead), so a symlink planted in a state directory is never read
/// through.
pub fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
}

/// A directory vncd must not keep state in.
#[derive(Debug, thiserror::Error)]
pub enum UntrustedDir {
    #[error(
        "{what} {} is writable by group or others (mode {mode:04o}): anyone who can write \
         there can plant or swap vncd's files. Fix it with `chmod 700 {}`",
        path.display(),
        path.display()
    )]
    Writable {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "{what} {} belongs to uid {owner}, not to vncd's uid {me}: that user could plant or \
         swap vncd's files. Fix it with `chown {me} {}` (or choose another directory)",
        path.display(),
        path.display()
    )]
    Owner {
        what: &'static str,
        path: PathBuf,
        owner: u32,
        me: u32,
    },
    #[error(
        "{what} {} is a symbolic link or not a directory; give the real directory",
        path.display()
    )]
    NotADirectory { what: &'static str, path: PathBuf },
    #[error(
        "{} (a parent of {what} {}) is writable by group or others and not sticky (mode \
         {mode:04o}): whoever can write there can replace the directory. Fix it with `chmod \
         go-w {}` or choose another place",
        path.display(),
        child.display(),
        path.display()
    )]
    WritableParent {
        what: &'static str,
        path: PathBuf,
        child: PathBuf,
        mode: u32,
    },
    #[error("cannot check {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Refuses a directory that someone other than vncd could write in or replace: it must
/// be a real directory (no symlink when `follow` is false), owned by vncd's effective
/// uid, not writable by group or others; and (with `parents`) every directory above it
/// must be owned by root or vncd and not writable by group or others unless sticky
/// (like /tmp, where nobody can rename another user's entry).
pub fn check_trusted_dir(
    what: &'static str,
    path: &Path,
    follow: bool,
    parents: bool,
) -> Result<(), UntrustedDir> {
    let io = |source| UntrustedDir::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let meta = if follow {
        fs::metadata(path)
    } else {
        fs::symlink_metadata(path)
    }
    .map_err(io)?;
    if !meta.is_dir() {
        return Err(UntrustedDir::NotADirectory {
            what,
            path: path.to_owned(),
        });
    }
    let me = nix::unistd::Uid::effective().as_raw();
    if meta.uid() != me {
        return Err(UntrustedDir::Owner {
            what,
            path: path.to_owned(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(UntrustedDir::Writable {
            what,
            path: path.to_owned(),
            mode,
        });
    }
    if parents {
        let real = fs::canonicalize(path).map_err(io)?;
        for parent in real.ancestors().skip(1) {
            let m = fs::metadata(parent).map_err(|source| UntrustedDir::Io {
                what,
                path: parent.to_owned(),
                source,
            })?;
            let pmode = m.permissions().mode() & 0o7777;
            let sticky = pmode & 0o1000 != 0;
            let owner_ok = m.uid() == 0 || m.uid() == me;
            if !owner_ok || (pmode & 0o022 != 0 && !sticky) {
                return Err(UntrustedDir::WritableParent {
                    what,
                    path: parent.to_owned(),
                    child: path.to_owned(),
                    mode: pmode,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn both_writers_replace_content_with_the_given_mode_and_leave_no_temp_file() {
        for write in [write_atomic, write_replace] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("f.json");
            write(&p, b"one", 0o600).unwrap();
            write(&p, b"two", 0o600).unwrap();
            assert_eq!(fs::read(&p).unwrap(), b"two");
            assert_eq!(
                fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
            assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        }
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        for write in [write_atomic, write_replace] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("f.json");
            write(&p, b"old content", 0o600).unwrap();
            // Make this write fail half-way: its temp file cannot be created (a
            // directory is in the way and cannot be cleared away like a stale file).
            let tmp = dir
                .path()
                .join(format!(".f.json.tmp.{}", std::process::id()));
            fs::create_dir(&tmp).unwrap();
            fs::write(tmp.join("x"), b"x").unwrap();
            assert!(write(&p, b"new content", 0o600).is_err());
            // The target is whole, old, with its mode; a write in place would have
            // changed or emptied it.
            assert_eq!(fs::read(&p).unwrap(), b"old content");
            assert_eq!(
                fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
            fs::remove_dir_all(&tmp).unwrap();
            write(&p, b"new content", 0o600).unwrap();
            assert_eq!(fs::read(&p).unwrap(), b"new content");
        }
    }

    #[test]
    fn symlinks_are_replaced_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::write(&outside, b"precious").unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        // A symlink at the target is replaced by the new file.
        let p = state.join("leases.json");
        std::os::unix::fs::symlink(&outside, &p).unwrap();
        write_atomic(&p, b"{}", 0o600).unwrap();
        assert_eq!(fs::read(&outside).unwrap(), b"precious");
        assert!(fs::symlink_metadata(&p).unwrap().is_file());
        // A symlink planted at the temp name (a stale one) is removed, not followed.
        let tmp = state.join(format!(".leases.json.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&outside, &tmp).unwrap();
        write_atomic(&p, b"{\"a\":1}", 0o600).unwrap();
        assert_eq!(fs::read(&outside).unwrap(), b"precious");
        assert_eq!(fs::read(&p).unwrap(), b"{\"a\":1}");
        // Reading refuses a symlink.
        fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&outside, &p).unwrap();
        assert!(open_nofollow(&p).is_err());
    }

    #[test]
    fn untrusted_directories_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("state");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        check_trusted_dir("state directory", &d, true, true).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_trusted_dir("state directory", &d, true, true).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("chmod 700 {}", d.display())),
            "{e}"
        );
        fs::set_permissions(&d, fs::Permissions::from_mode(0o770)).unwrap();
        assert!(check_trusted_dir("state directory", &d, true, true).is_err());
        fs::set_permissions(&d, fs::Permissions::from_mode(0o711)).unwrap();
        check_trusted_dir("state directory", &d, true, true).unwrap();
        // A symlinked subdirectory is refused when links are not followed.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(matches!(
            check_trusted_dir("logs directory", &link, false, false),
            Err(UntrustedDir::NotADirectory { .. })
        ));
        // Another owner (needs root to arrange).
        if nix::unistd::Uid::effective().is_root() {
            nix::unistd::chown(&d, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let e = check_trusted_dir("state directory", &d, true, true).unwrap_err();
            assert!(e.to_string().contains("chown 0 "), "{e}");
            nix::unistd::chown(&d, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
            // A parent writable by others, not sticky.
            let parent = dir.path().join("open");
            let inner = parent.join("state");
            fs::create_dir_all(&inner).unwrap();
            fs::set_permissions(&inner, fs::Permissions::from_mode(0o700)).unwrap();
            fs::set_permissions(&parent, fs::Permissions::from_mode(0o777)).unwrap();
            let e = check_trusted_dir("state directory", &inner, true, true).unwrap_err();
            assert!(matches!(e, UntrustedDir::WritableParent { .. }), "{e}");
            fs::set_permissions(&parent, fs::Permissions::from_mode(0o1777)).unwrap();
            check_trusted_dir("state directory", &inner, true, true).unwrap();
        }
    }
}
