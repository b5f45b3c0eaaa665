//! The target probe: "Ready" should mean a console works, so the relay checks that each
//! session's VNC server answers: connect, and read the 12-byte RFB banner
//! (`RFB 003.00x\n`). Rate-limited to once per session per [`PROBE_EVERY`], and skipped
//! while an authenticated client is connected (its bridge shows the target works, and a
//! probe must not disturb a server that allows few clients). Sessions due together that
//! share a target share one probe: a VNC server behind many sessions is not opened once per
//! session (QEMU drops the oldest of more than 32 connecting clients, so 800 probes at once
//! of one server left most sessions "unreachable").

use std::io;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::proxy::conn::{self, Target, TargetStream};

/// The least time between two probes of one session.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);
/// Time a probe gets to connect and read the banner.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// RFB's ProtocolVersion message is exactly this long.
pub const BANNER_LEN: usize = 12;

/// Why a target does not look like a working VNC server.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot connect to {target}: {source}")]
    Connect { target: String, source: io::Error },
    #[error("{target} sent no RFB banner within {}s", PROBE_TIMEOUT.as_secs())]
    Timeout { target: String },
    #[error("{target} closed the connection before its RFB banner")]
    Closed { target: String },
    #[error("cannot read from {target}: {source}")]
    Read { target: String, source: io::Error },
    #[error("{target} is not a VNC server: it sent {banner:?} instead of an RFB banner")]
    NotRfb { target: String, banner: String },
}

/// Whether `banner` is an RFB ProtocolVersion message: `RFB xxx.yyy\n`, digits.
pub fn is_rfb_banner(banner: &[u8; BANNER_LEN]) -> bool {
    banner.starts_with(b"RFB ")
        && banner[7] == b'.'
        && banner[11] == b'\n'
        && banner[4..7]
            .iter()
            .chain(&banner[8..11])
            .all(u8::is_ascii_digit)
}

/// Probes `target` once.
pub async fn probe(target: &Target) -> Result<(), ProbeError> {
    let name = || target.to_string();
    let run = async {
        let stream = conn::connect(target)
            .await
            .map_err(|source| ProbeError::Connect {
                target: name(),
                source,
            })?;
        let mut banner = [0u8; BANNER_LEN];
        let read = match stream {
            TargetStream::Tcp(mut s) => s.read_exact(&mut banner).await,
            TargetStream::Unix(mut s) => s.read_exact(&mut banner).await,
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(ProbeError::Closed { target: name() });
            }
            Err(source) => {
                return Err(ProbeError::Read {
                    target: name(),
                    source,
                });
            }
        }
        if is_rfb_banner(&banner) {
            Ok(())
        } else {
            Err(ProbeError::NotRfb {
                target: name(),
                banner: String::from_utf8_lossy(&banner).into_owned(),
            })
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| Err(ProbeError::Timeout { target: name() }))
}

/// What is known about a session's target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeState {
    /// When the last probe started.
    last: Option<Instant>,
    in_flight: bool,
    /// `None` until the first probe ends (or a client is bridged).
    pub reachable: Option<bool>,
    pub error: Option<String>,
}

impl ProbeState {
    /// Whether to probe now: not while a probe runs or an authenticated client is
    /// connected, and at most once per [`PROBE_EVERY`].
    pub fn due(&self, now: Instant, authenticated: usize) -> bool {
        !self.in_flight
            && authenticated == 0
            && self
                .last
                .is_none_or(|l| now.saturating_duration_since(l) >= PROBE_EVERY)
    }

    pub fn started(&mut self, now: Instant) {
        self.last = Some(now);
        self.in_flight = true;
    }

    pub fn finished(&mut self, outcome: &Result<(), ProbeError>) {
        self.in_flight = false;
        match outcome {
            Ok(()) => {
                self.reachable = Some(true);
                self.error = None;
            }
            Err(e) => {
                self.reachable = Some(false);
                self.error = Some(e.to_string());
            }
        }
    }

    /// An authenticated client is bridged: the target is known reachable.
    pub fn bridged(&mut self) {
        self.reachable = Some(true);
        self.error = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banners() {
        assert!(is_rfb_banner(b"RFB 003.008\n"));
        assert!(is_rfb_banner(b"RFB 003.003\n"));
        assert!(!is_rfb_banner(b"HTTP/1.1 200"));
        assert!(!is_rfb_banner(b"RFB 003.008 "));
        assert!(!is_rfb_banner(b"RFB 0x3.008\n"));
    }

    #[test]
    fn rate_limited_and_never_with_a_client() {
        let mut s = ProbeState::default();
        let t = Instant::now();
        assert!(s.due(t, 0), "first probe at once");
        assert!(!s.due(t, 1), "not while a client is bridged");
        s.started(t);
        assert!(!s.due(t + PROBE_EVERY * 2, 0), "not while one runs");
        s.finished(&Err(ProbeError::Closed {
            target: "127.0.0.1:1".into(),
        }));
        assert_eq!(s.reachable, Some(false));
        assert!(s.error.as_deref().unwrap().contains("127.0.0.1:1"));
        assert!(!s.due(t + Duration::from_secs(4), 0));
        assert!(s.due(t + PROBE_EVERY, 0));
        s.bridged();
        assert_eq!((s.reachable, s.error.as_deref()), (Some(true), None));
    }

    #[tokio::test]
    async fn a_dead_port_and_a_non_vnc_server_are_unreachable_with_a_reason() {
        // A port nobody listens on.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = l.local_addr().unwrap().to_string();
        drop(l);
        let e = probe(&Target::Tcp(dead.clone())).await.unwrap_err();
        assert!(matches!(e, ProbeError::Connect { .. }), "{e}");
        assert!(e.to_string().contains(&dead));
        // A server that speaks something else.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let (mut s, _) = l.accept().await.unwrap();
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9\r\n").await;
        });
        let e = probe(&Target::Tcp(addr)).await.unwrap_err();
        assert!(matches!(e, ProbeError::NotRfb { .. }), "{e}");
        // A missing unix socket.
        let e = probe(&Target::Unix("/nonexistent/vnc.sock".into()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vnc.sock"), "{e}");
    }
}
