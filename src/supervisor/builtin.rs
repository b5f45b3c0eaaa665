//! The builtin backend: `vncd proxy`, vncd's own websocket -> VNC proxy.
//!
//! It runs the very vncd binary, so there is nothing else to install, and each idle
//! proxy costs about half a MiB instead of websockify's twenty (see BENCHMARKS.md).

use std::path::{Path, PathBuf};

use super::{Backend, CommandLine, ProxySpec, Tls};
use crate::session::Endpoint;

/// Runs `vncd proxy --listen ADDR:PORT (--target HOST:PORT | --unix-target PATH) ...`.
#[derive(Clone, Debug)]
pub struct Builtin {
    /// The vncd executable.
    pub program: PathBuf,
    pub tls: Option<Tls>,
    /// Allowed Origin headers; empty allows any.
    pub origins: Vec<String>,
}

impl Backend for Builtin {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn command(&self, spec: &ProxySpec) -> CommandLine {
        let listen = std::net::SocketAddr::new(spec.listen, spec.port).to_string();
        let mut args = vec!["proxy".to_owned(), "--listen".to_owned(), listen];
        match &spec.target {
            Endpoint::Tcp { .. } => args.extend(["--target".to_owned(), spec.target.to_string()]),
            Endpoint::Unix { path } => args.extend(["--unix-target".to_owned(), path.clone()]),
        }
        if let Some(web) = &spec.web {
            args.extend(["--web".to_owned(), web.display().to_string()]);
        }
        if let Some(file) = &spec.token_file {
            args.extend(["--token-file".to_owned(), file.display().to_string()]);
        }
        if let Some(tls) = &self.tls {
            args.extend([
                "--tls-cert".to_owned(),
                tls.cert.display().to_string(),
                "--tls-key".to_owned(),
                tls.key.display().to_string(),
            ]);
        }
        for o in &self.origins {
            args.extend(["--origin".to_owned(), o.clone()]);
        }
        CommandLine {
            program: self.program.clone(),
            args,
        }
    }

    fn token_file(&self, spec: &ProxySpec) -> Option<String> {
        spec.token.as_ref().map(|t| format!("{t}\n"))
    }

    fn stats_args(&self, path: &Path) -> Option<Vec<String>> {
        Some(vec!["--stats-file".to_owned(), path.display().to_string()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_proxy_command_line() {
        let b = Builtin {
            program: "/usr/bin/vncd".into(),
            tls: Some(Tls {
                cert: "/c.pem".into(),
                key: "/k.pem".into(),
            }),
            origins: vec!["https://ui.example".into()],
        };
        let spec = ProxySpec {
            session: "vm1".into(),
            listen: "127.0.0.1".parse().unwrap(),
            port: 6100,
            target: Endpoint::Unix {
                path: "/run/vm1.sock".into(),
            },
            web: None,
            token: Some("t0k".into()),
            token_file: Some("/s/tokens/vm1.token".into()),
        };
        assert_eq!(
            b.command(&spec).args,
            [
                "proxy",
                "--listen",
                "127.0.0.1:6100",
                "--unix-target",
                "/run/vm1.sock",
                "--token-file",
                "/s/tokens/vm1.token",
                "--tls-cert",
                "/c.pem",
                "--tls-key",
                "/k.pem",
                "--origin",
                "https://ui.example"
            ]
        );
        assert_eq!(b.token_file(&spec).as_deref(), Some("t0k\n"));
        assert_eq!(
            b.stats_args(Path::new("/s/stats/vm1.json")).unwrap(),
            ["--stats-file", "/s/stats/vm1.json"]
        );
    }
}
