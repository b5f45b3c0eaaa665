//! The control protocol: JSON lines over a unix socket, between the controller and the relay.
//!
//! Every message is one JSON object on one line with `proto` (the protocol version, see
//! [`PROTOCOL`]) and `type`. Unknown fields are ignored, so a newer controller can add
//! fields an older relay does not know; a relay answers every message with its own `proto`.
//!
//! ```text
//! -> {"proto":1,"type":"declare","version":7,"sessions":[{"name":"vm1","port":6080,
//!      "listen":"127.0.0.1","target":{"tcp":"127.0.0.1:5901"},"lease_uid":"u1",
//!      "lease_key":"<64 hex>","limits":{"max_connections":16}}]}
//! <- {"proto":1,"type":"applied","version":7,"applied_version":7,"changed":true,"errors":{}}
//! -> {"proto":1,"type":"report"}
//! <- {"proto":1,"type":"report","relay":{"pid":..,"started_unix":..,"version":"0.1.0"},
//!      "applied_version":7,"sessions":{"vm1":{"listening":true,...}}}
//! ```
//!
//! - `declare` carries the WHOLE desired set. It is idempotent: a version lower than or
//!   equal to the applied one is acknowledged (`changed: false`) and changes nothing.
//! - Only the relay's own uid and the controller's uid may connect (SO_PEERCRED); anyone
//!   else gets one `error` line and is disconnected, and the refusal is logged.
//! - A controller that disconnects changes nothing: the relay keeps serving the last
//!   declared set.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use tracing::Instrument;

use super::serving::ServingSpec;
use super::table::{SessionSpec, TargetSpec};

/// The protocol version this relay speaks.
pub const PROTOCOL: u32 = 1;
/// The longest line accepted (a declaration of thousands of sessions fits easily).
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// A message with its protocol version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub proto: u32,
    #[serde(flatten)]
    pub body: T,
}

impl<T> Envelope<T> {
    pub fn new(body: T) -> Self {
        Envelope {
            proto: PROTOCOL,
            body,
        }
    }
}

/// From the controller.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// The whole desired state (see [`Declaration`]).
    Declare(Declaration),
    /// What the relay observes.
    Report {},
}

/// The whole desired state at `version`: every session, the gateway (absent: none is
/// served, and a served one closes) and what every listener serves besides consoles.
/// Declared rather than given on the relay's command line, so the relay's argv stays
/// fixed and a restarted controller with another `--gateway`, certificate or origin list
/// changes them without restarting the relay (which would drop its consoles).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Declaration {
    pub version: u64,
    pub sessions: Vec<SessionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::SocketAddr>,
    #[serde(default)]
    pub serving: ServingSpec,
}

/// From the relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Applied(Applied),
    Report(Report),
    /// The request could not be read, or the peer may not talk to this relay.
    Error {
        message: String,
    },
}

/// The answer to a declaration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The version that was declared.
    pub version: u64,
    /// The version in effect now (higher than `version` if that was stale).
    pub applied_version: u64,
    /// Whether this declaration changed anything (false for a stale version).
    pub changed: bool,
    /// Per session, why it is not (fully) served: invalid, port busy, ...
    #[serde(default)]
    pub errors: BTreeMap<String, String>,
    /// Why the declared gateway is not served (its address is busy, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_error: Option<String>,
    /// Why the declared serving settings are not (all) in effect (a certificate that does
    /// not load, a missing web directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_error: Option<String>,
}

/// What the relay observes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub relay: RelayInfo,
    pub applied_version: u64,
    #[serde(default)]
    pub sessions: BTreeMap<String, SessionReport>,
    /// The gateway's address, when one is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The serving settings last declared, so a controller sees whether they are its own.
    #[serde(default)]
    pub serving: ServingSpec,
    /// Why they are not (all) in effect now (a renewed certificate that does not load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_error: Option<String>,
}

/// Which relay answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    pub pid: u32,
    pub started_unix: u64,
    /// The relay's program version.
    pub version: String,
    /// Connections not yet past their ticket check, over all sessions.
    #[serde(default)]
    pub pending: usize,
}

/// One session as observed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionReport {
    pub port: u16,
    pub lease_uid: String,
    pub listening: bool,
    /// TCP connections open now, pending ones included.
    pub connections: usize,
    /// Connections that passed their ticket check and are bridged to the target.
    pub authenticated: usize,
    /// Bytes from clients to the target, and back.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Last client input or new session (unix seconds), if any.
    pub last_activity_unix: Option<u64>,
    /// `None` until the first probe (or bridged client).
    pub target_reachable: Option<bool>,
    pub target_error: Option<String>,
    /// Why the session is not served (port busy, used-ticket directory), if it is not.
    pub error: Option<String>,
    /// The target declared: with the port and lease, what `vncd cleanup --rebuild-state`
    /// needs to rebuild the session's lease from the relay. `None` from a relay too old
    /// to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetSpec>,
    /// The session's counters since the relay started serving it, the same a per-session
    /// proxy writes to its stats file: the controller exports them as its
    /// `vncd_proxy_*` metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<crate::proxy::stats::Snapshot>,
}

/// Who may use the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peers {
    pub relay_uid: u32,
    pub controller_uid: u32,
}

impl Peers {
    pub fn allows(&self, uid: u32) -> bool {
        uid == self.relay_uid || uid == self.controller_uid
    }
}

/// Why a control exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot connect to the relay's control socket {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("relay control socket: {0}")]
    Io(#[from] io::Error),
    #[error("relay control socket: a line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("relay control socket: the relay closed the connection")]
    Closed,
    #[error("relay control socket: unreadable message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the relay answered with an error: {0}")]
    Refused(String),
    #[error("the relay answered a {asked} with something else")]
    Unexpected { asked: &'static str },
}

/// Reads one line (without its newline) of at most [`MAX_LINE`] bytes; `None` at EOF.
pub(crate) async fn read_line<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    buf: &mut Vec<u8>,
) -> Result<Option<()>, ControlError> {
    buf.clear();
    let n = (&mut *r)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        Ok(Some(()))
    } else if buf.len() > MAX_LINE {
        Err(ControlError::TooLong)
    } else {
        // EOF in the middle of a line: take what came.
        Ok(Some(()))
    }
}

/// Serializes one message as a line.
impl ControlError {
    /// Whether the socket is there but its mode or owner shuts this process out.
    pub fn permission_denied(&self) -> bool {
        matches!(self, ControlError::Connect { source, .. } if source.kind() == io::ErrorKind::PermissionDenied)
    }
}

pub(crate) fn line<T: Serialize>(msg: &Envelope<T>) -> Vec<u8> {
    let mut out = serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    out
}

/// A controller's connection to a relay.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    buf: Vec<u8>,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ControlError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|source| ControlError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (r, w) = s.into_split();
        Ok(Client {
            reader: BufReader::new(r),
            writer: w,
            buf: Vec::new(),
        })
    }

    /// Declares the whole desired set at `version`, with no gateway.
    pub async fn declare(
        &mut self,
        version: u64,
        sessions: Vec<SessionSpec>,
    ) -> Result<Applied, ControlError> {
        self.declare_with_gateway(version, sessions, None).await
    }

    /// Declares the whole desired set at `version`, with the gateway at `gateway`.
    pub async fn declare_with_gateway(
        &mut self,
        version: u64,
        sessions: Vec<SessionSpec>,
        gateway: Option<std::net::SocketAddr>,
    ) -> Result<Applied, ControlError> {
        self.send(Declaration {
            version,
            sessions,
            gateway,
            serving: ServingSpec::default(),
        })
        .await
    }

    /// Declares `d`.
    pub async fn send(&mut self, d: Declaration) -> Result<Applied, ControlError> {
        match self.call(&Request::Declare(d)).await? {
            Response::Applied(a) => Ok(a),
            _ => Err(ControlError::Unexpected { asked: "declare" }),
        }
    }

    /// What the relay observes now.
    pub async fn report(&mut self) -> Result<Report, ControlError> {
        match self.call(&Request::Report {}).await? {
            Response::Report(r) => Ok(r),
            _ => Err(ControlError::Unexpected { asked: "report" }),
        }
    }

    async fn call(&mut self, req: &Request) -> Result<Response, ControlError> {
        self.writer.write_all(&line(&Envelope::new(req))).await?;
        if read_line(&mut self.reader, &mut self.buf).await?.is_none() {
            return Err(ControlError::Closed);
        }
        let env: Envelope<Response> = serde_json::from_slice(&self.buf)?;
        match env.body {
            Response::Error { message } => Err(ControlError::Refused(message)),
            other => Ok(other),
        }
    }
}

/// Serves one control connection: checks the peer, then answers each line until the peer
/// disconnects. Nothing the peer does (or fails to do) changes the served sessions except
/// a valid, newer declaration.
pub(crate) async fn serve_peer(relay: super::Relay, stream: UnixStream, peers: Peers) {
    let cred = stream.peer_cred();
    let (uid, pid) = match &cred {
        Ok(c) => (Some(c.uid()), c.pid()),
        Err(_) => (None, None),
    };
    let (r, mut w) = stream.into_split();
    if !uid.is_some_and(|u| peers.allows(u)) {
        tracing::warn!(
            uid = ?uid,
            pid = ?pid,
            relay_uid = peers.relay_uid,
            controller_uid = peers.controller_uid,
            "control connection refused: only the relay's and the controller's uid may talk to the relay"
        );
        let msg = Envelope::new(Response::Error {
            message: format!(
                "uid {} may not control this relay (only uids {} and {})",
                uid.map_or_else(|| "?".to_owned(), |u| u.to_string()),
                peers.relay_uid,
                peers.controller_uid
            ),
        });
        let _ = w.write_all(&line(&msg)).await;
        let _ = w.shutdown().await;
        // Read what the peer sent before closing: closing a unix socket with unread data
        // resets the peer's connection, and it would never read the refusal.
        let mut r = r;
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
        return;
    }
    let span = tracing::info_span!("control", uid = ?uid, pid = ?pid);
    async move {
        tracing::debug!("controller connected");
        let mut reader = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            let answer = match read_line(&mut reader, &mut buf).await {
                Ok(None) => break,
                Ok(Some(())) if buf.iter().all(u8::is_ascii_whitespace) => continue,
                Ok(Some(())) => match serde_json::from_slice::<Envelope<Request>>(&buf) {
                    Ok(env) => match env.body {
                        Request::Declare(d) => Response::Applied(relay.declare(d).await),
                        Request::Report {} => Response::Report(relay.report()),
                    },
                    Err(e) => Response::Error {
                        message: format!("cannot read the request: {e}"),
                    },
                },
                Err(e) => {
                    let msg = Envelope::new(Response::Error {
                        message: e.to_string(),
                    });
                    let _ = w.write_all(&line(&msg)).await;
                    break;
                }
            };
            if w.write_all(&line(&Envelope::new(answer))).await.is_err() {
                break;
            }
        }
        tracing::debug!("controller disconnected; the declared sessions stay served");
    }
    .instrument(span)
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::table::tests::spec;

    #[test]
    fn every_message_carries_proto_and_type() {
        let req = Envelope::new(Request::Declare(Declaration {
            version: 3,
            sessions: vec![spec("a", 7001)],
            ..Declaration::default()
        }));
        let text = String::from_utf8(line(&req)).unwrap();
        assert!(text.ends_with('\n') && !text.trim_end().contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["proto"], PROTOCOL);
        assert_eq!(v["type"], "declare");
        assert_eq!(v["sessions"][0]["target"]["tcp"], "127.0.0.1:5901");
        let back: Envelope<Request> = serde_json::from_str(&text).unwrap();
        assert!(
            matches!(back.body, Request::Declare(Declaration { version: 3, ref sessions, gateway: None, .. }) if sessions.len() == 1)
        );

        let r: Envelope<Request> = serde_json::from_str(r#"{"proto":1,"type":"report"}"#).unwrap();
        assert!(matches!(r.body, Request::Report {}));
        // A newer controller's extra fields are ignored.
        let r: Envelope<Request> =
            serde_json::from_str(r#"{"proto":2,"type":"report","verbose":true}"#).unwrap();
        assert_eq!(r.proto, 2);
        assert!(
            serde_json::from_str::<Envelope<Request>>(r#"{"proto":1,"type":"explode"}"#).is_err()
        );

        let a = Envelope::new(Response::Applied(Applied {
            version: 3,
            applied_version: 3,
            changed: true,
            gateway_error: None,
            serving_error: None,
            errors: BTreeMap::from([("b".into(), "port busy".into())]),
        }));
        let v: serde_json::Value = serde_json::from_slice(&line(&a)).unwrap();
        assert_eq!(
            (v["proto"].as_u64(), v["type"].as_str()),
            (Some(1), Some("applied"))
        );
        assert_eq!(v["errors"]["b"], "port busy");
    }

    #[test]
    fn serving_settings_travel_with_the_declaration_and_default_to_plain() {
        let old: Envelope<Request> =
            serde_json::from_str(r#"{"proto":1,"type":"declare","version":1,"sessions":[]}"#)
                .unwrap();
        let Request::Declare(d) = old.body else {
            panic!("not a declaration")
        };
        assert_eq!(d.serving, ServingSpec::default());
        let text = r#"{"proto":1,"type":"declare","version":2,"sessions":[],
            "serving":{"tls":{"cert":"/etc/vncd/tls.crt","key":"/etc/vncd/tls.key"},
            "origins":["https://console.example"],"web":"/usr/share/novnc"}}"#;
        let Request::Declare(d) = serde_json::from_str::<Envelope<Request>>(text)
            .unwrap()
            .body
        else {
            panic!("not a declaration")
        };
        assert_eq!(
            d.serving.tls.as_ref().map(|t| t.cert.clone()),
            Some("/etc/vncd/tls.crt".into())
        );
        assert_eq!(d.serving.origins, ["https://console.example"]);
        assert_eq!(d.serving.web, Some("/usr/share/novnc".into()));
    }

    #[test]
    fn only_the_relay_and_the_controller_uid_are_allowed() {
        let p = Peers {
            relay_uid: 998,
            controller_uid: 0,
        };
        assert!(p.allows(998) && p.allows(0));
        assert!(!p.allows(65534));
    }
}
