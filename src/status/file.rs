//! The standalone status sink: `sessions.json` in the state directory, read by
//! `vncd get` and `vncd apply --wait`. Mode 0600, as before tickets, though its URLs carry no
//! credential now (a console needs a ticket from `vncd url`).

use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::StatusSink;
use crate::api::VncSession;
use crate::fsutil::write_atomic;

/// The content of `sessions.json`.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct SessionsFile {
    pub controller_pid: u32,
    pub backend: String,
    pub updated_at: Timestamp,
    pub items: Vec<VncSession>,
}

/// Why `sessions.json` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no status yet at {}: has `vncd run` been started with this --state-dir?", .0.display())]
    Missing(PathBuf),
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a status file: {source}", path.display())]
    Format {
        path: PathBuf,
        source: serde_json::Error,
    },
}

pub fn read(path: &Path) -> Result<SessionsFile, ReadError> {
    let bytes = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ReadError::Missing(path.to_owned())
        } else {
            ReadError::Io {
                path: path.to_owned(),
                source: e,
            }
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|source| ReadError::Format {
        path: path.to_owned(),
        source,
    })
}

/// Writes `sessions.json` whenever the statuses change.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    backend: String,
    last: Option<Vec<u8>>,
}

impl FileSink {
    pub fn new(path: PathBuf, backend: &str) -> Self {
        FileSink {
            path,
            backend: backend.to_owned(),
            last: None,
        }
    }
}

impl StatusSink for FileSink {
    async fn publish(&mut self, items: &[VncSession]) {
        let items_json = serde_json::to_vec(items).unwrap_or_default();
        if self.last.as_ref() == Some(&items_json) {
            return;
        }
        let file = SessionsFile {
            controller_pid: std::process::id(),
            backend: self.backend.clone(),
            updated_at: Timestamp::now(),
            items: items.to_vec(),
        };
        let bytes = match serde_json::to_vec_pretty(&file) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize statuses");
                return;
            }
        };
        let path = self.path.clone();
        let res = tokio::task::spawn_blocking(move || write_atomic(&path, &bytes, 0o600)).await;
        match res {
            Ok(Ok(())) => self.last = Some(items_json),
            Ok(Err(e)) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot write statuses")
            }
            Err(e) => tracing::warn!(error = %e, "status writer failed"),
        }
    }
}
