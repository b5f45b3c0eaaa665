//! Crash-safe file writes shared by the lease store, the status file and `vncd apply`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

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
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
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
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("f");
        assert!(write_atomic(&p, b"x", 0o600).is_err());
    }
}
