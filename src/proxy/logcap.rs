//! Keeps the proxy's own log bounded while it runs.
//!
//! vncd's supervisor points a proxy's stdout and stderr at `STATE/logs/NAME.log`, opened
//! with O_APPEND, and only trims that file when it starts the proxy. A proxy that runs for
//! weeks, or one that a client makes log a lot, would otherwise grow the file until the
//! state directory's disk is full, and a full state disk stops vncd from committing leases.
//! With O_APPEND every write goes to the current end of the file, so truncating it to zero
//! is safe: the next line simply starts the file again.

use std::os::fd::AsFd;
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::sync::watch;
use tracing::warn;

/// How often the log's size is checked.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The size of stderr if it is a regular file opened for appending; `None` for a pipe, a
/// terminal or a file written at an offset (truncating that would leave a hole).
fn appended_log_size() -> Option<u64> {
    let stderr = std::io::stderr();
    let fd = stderr.as_fd();
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).ok()?);
    if !flags.contains(OFlag::O_APPEND) {
        return None;
    }
    let st = nix::sys::stat::fstat(fd).ok()?;
    let is_file = (st.st_mode & nix::libc::S_IFMT) == nix::libc::S_IFREG;
    is_file.then(|| u64::try_from(st.st_size).unwrap_or(0))
}

/// Truncates stderr to zero whenever it grows past `max` bytes, until `stop`.
pub async fn watch_stderr(max: u64, mut stop: watch::Receiver<bool>) {
    if appended_log_size().is_none() {
        return;
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep(CHECK_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Some(size) = appended_log_size()
            && size > max
        {
            let stderr = std::io::stderr();
            if nix::unistd::ftruncate(stderr.as_fd(), 0).is_ok() {
                warn!(size, max, "log truncated: it grew past --max-log-bytes");
            }
        }
    }
}
