//! Starting a relay process: hardening, descriptors, its directory (checked, so that a
//! relay that could not record used tickets never starts), the control socket, signals.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use super::args::RelayArgs;
use super::control::Peers;
use super::state::{Relay, RelayConfig};
use super::{Listeners, admission, serve};

/// Why the relay could not start. Each message names the path or address at fault and,
/// where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(
        "--take-over is not supported yet (issue 18): stop the running relay first, or start this one on another --socket"
    )]
    TakeOverUnsupported,
    #[error("state directory {}: {source}; create it (vncd run does) or pass another --state-dir", path.display())]
    StateDir { path: PathBuf, source: io::Error },
    #[error(
        "the relay (uid {uid}) cannot create or write {p}: {source}. Fix: create it owned by uid {uid} \
         (mkdir -p {p} && chown {uid} {p} && chmod 0750 {p}) and make sure every parent \
         directory is searchable (x) by uid {uid}",
        p = path.display()
    )]
    NotWritable {
        path: PathBuf,
        uid: u32,
        source: io::Error,
    },
    #[error(
        "{p} is owned by uid {owner}, not by the relay's uid {uid}: no other uid may write the relay's \
         files. Fix: chown -R {uid} {p} (or run the relay as uid {owner})",
        p = path.display()
    )]
    WrongOwner { path: PathBuf, owner: u32, uid: u32 },
    #[error("a relay already serves the control socket {}: stop it first (--take-over is not supported yet)", path.display())]
    AlreadyRunning { path: PathBuf },
    #[error("{} exists and is not a socket: remove it or pass another --socket", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot listen on the control socket {}: {source}", path.display())]
    Control { path: PathBuf, source: io::Error },
    #[error("no relay answers on {}: {why}", path.display())]
    CheckFailed { path: PathBuf, why: String },
    #[error("cannot handle {signal}: {source}")]
    Signal {
        signal: &'static str,
        source: io::Error,
    },
}

/// Runs a relay process until SIGTERM or SIGINT.
pub async fn run(args: RelayArgs) -> Result<(), RelayError> {
    if args.check {
        return check(&args.socket_path()).await;
    }
    if args.take_over {
        return Err(RelayError::TakeOverUnsupported);
    }
    no_core_dumps();
    let nofile = raise_nofile();
    let uid = nix::unistd::geteuid().as_raw();
    let dirs = prepare_dirs(&args.state_dir, uid)?;
    let controller_uid = args.controller_uid.unwrap_or(dirs.state_owner);
    let socket = args.socket_path();
    let control = bind_control(&socket)?;
    let mut term = signal(SignalKind::terminate()).map_err(|source| RelayError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| RelayError::Signal {
        signal: "SIGINT",
        source,
    })?;
    let relay = Relay::new(RelayConfig {
        nonce_root: dirs.nonces,
        admission: admission::Config {
            per_source: args.max_pending_per_source,
            global: args.max_pending,
            protect: admission::PROTECT,
        },
        ping_every: Duration::from_secs(args.ping_interval),
        nofile,
    });
    info!(
        socket = %socket.display(),
        relay_uid = uid,
        controller_uid,
        nofile = ?nofile,
        "relay ready"
    );
    let peers = Peers {
        relay_uid: uid,
        controller_uid,
    };
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM"),
            _ = int.recv() => info!("SIGINT"),
        }
    };
    serve(relay, Listeners { control }, peers, shutdown).await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// `--check`: a relay answers a report request on `socket` within 5 s. It prints the pid
/// that answered, so a script can end exactly that relay.
async fn check(socket: &Path) -> Result<(), RelayError> {
    let failed = |why: String| RelayError::CheckFailed {
        path: socket.to_owned(),
        why,
    };
    let asked = async {
        let mut c = super::Client::connect(socket).await?;
        c.report().await
    };
    match tokio::time::timeout(Duration::from_secs(5), asked).await {
        Ok(Ok(r)) => {
            info!(
                pid = r.relay.pid,
                sessions = r.sessions.len(),
                "the relay answers"
            );
            println!("pid {} sessions {}", r.relay.pid, r.sessions.len());
            Ok(())
        }
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(_) => Err(failed("no answer within 5 s".into())),
    }
}

/// PR_SET_DUMPABLE 0: no core dumps holding lease keys, and /proc/PID/mem of the relay
/// is closed to other processes of its uid.
fn no_core_dumps() {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        warn!(error = %e, "cannot clear PR_SET_DUMPABLE");
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit in effect.
fn raise_nofile() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                info!(
                    from = soft,
                    to = hard,
                    "raised RLIMIT_NOFILE to its hard limit"
                );
                return Some(hard);
            }
            Err(e) => warn!(error = %e, soft, hard, "cannot raise RLIMIT_NOFILE"),
        }
    }
    Some(soft)
}

/// The relay's directories, checked.
#[derive(Debug)]
pub(crate) struct Dirs {
    pub nonces: PathBuf,
    /// The owner of the state directory: the default controller uid.
    pub state_owner: u32,
}

/// Creates and checks STATE_DIR/relay (0750) and STATE_DIR/relay/nonces (0700): owned by
/// `uid`, writable by it (a file is created and removed in each, which is what recording
/// a used ticket needs). Refuses, with the fix, otherwise: a relay that cannot record
/// used tickets would refuse every ticket while looking healthy.
pub(crate) fn prepare_dirs(state_dir: &Path, uid: u32) -> Result<Dirs, RelayError> {
    let meta = std::fs::metadata(state_dir).map_err(|source| RelayError::StateDir {
        path: state_dir.to_owned(),
        source,
    })?;
    let relay_dir = state_dir.join("relay");
    let nonces = relay_dir.join("nonces");
    for (dir, mode) in [(&relay_dir, 0o750), (&nonces, 0o700)] {
        let not_writable = |source| RelayError::NotWritable {
            path: dir.clone(),
            uid,
            source,
        };
        match std::fs::DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(not_writable(e)),
        }
        let m = std::fs::symlink_metadata(dir).map_err(not_writable)?;
        if !m.is_dir() {
            return Err(not_writable(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        if m.uid() != uid {
            return Err(RelayError::WrongOwner {
                path: dir.clone(),
                owner: m.uid(),
                uid,
            });
        }
        // The set-group-ID bit the controller may have set (see
        // `supervisor::relay::hand_over_dir`) stays: it gives the socket the controller's
        // group. The relay could not set it again (the group is not its own).
        if m.mode() & 0o777 != mode {
            let keep = m.mode() & 0o2000;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | keep))
                .map_err(not_writable)?;
        }
        let probe = dir.join(format!(".write-check.{}", std::process::id()));
        std::fs::write(&probe, b"").map_err(not_writable)?;
        std::fs::remove_file(&probe).map_err(not_writable)?;
    }
    Ok(Dirs {
        nonces,
        state_owner: meta.uid(),
    })
}

/// Binds the control socket (mode 0660). A socket file left by a dead relay is replaced;
/// one that a live relay answers on is not.
pub(crate) fn bind_control(path: &Path) -> Result<UnixListener, RelayError> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            return Err(RelayError::NotASocket {
                path: path.to_owned(),
            });
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(RelayError::AlreadyRunning {
                path: path.to_owned(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let control = |source| RelayError::Control {
        path: path.to_owned(),
        source,
    };
    let l = UnixListener::bind(path).map_err(control)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(control)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirs_are_created_with_their_modes_and_a_foreign_owner_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let d = prepare_dirs(tmp.path(), uid).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&tmp.path().join("relay")), 0o750);
        assert_eq!(mode(&d.nonces), 0o700);
        // Again: idempotent, and a loosened mode is tightened.
        std::fs::set_permissions(
            tmp.path().join("relay"),
            std::fs::Permissions::from_mode(0o777),
        )
        .unwrap();
        prepare_dirs(tmp.path(), uid).unwrap();
        assert_eq!(mode(&tmp.path().join("relay")), 0o750);
        // Owned by another uid (as if the relay ran as someone else): refused with the fix.
        let e = prepare_dirs(tmp.path(), uid + 1).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, RelayError::WrongOwner { .. }), "{text}");
        assert!(text.contains("chown -R"), "{text}");
        let missing = prepare_dirs(&tmp.path().join("nope"), uid).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }

    #[tokio::test]
    async fn a_live_control_socket_is_not_taken_and_a_stale_one_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("r.sock");
        let live = bind_control(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o660);
        assert!(matches!(
            bind_control(&path),
            Err(RelayError::AlreadyRunning { .. })
        ));
        drop(live);
        bind_control(&path).expect("a stale socket is replaced");
        let file = tmp.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            bind_control(&file),
            Err(RelayError::NotASocket { .. })
        ));
    }
}
