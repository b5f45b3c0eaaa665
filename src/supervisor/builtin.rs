//! The builtin backend: vncd's own websocket -> VNC proxy.
//!
//! It runs `vncd-proxy`, built with vncd and installed beside it, which links nothing but
//! the proxy: each idle proxy costs about half a MiB instead of websockify's twenty (see
//! BENCHMARKS.md). Without it (`cargo run` builds only `vncd`) it runs `vncd proxy`, the
//! same code in the full binary, which works the same; built with the `libvirt` feature
//! (the .deb) that binary maps libvirt's fifty shared libraries into every proxy (about
//! 2.5 MiB each).

use std::path::{Path, PathBuf};

use super::{Backend, CommandLine, ProxySpec, Tls};
use crate::session::Endpoint;

/// The small proxy executable, looked for beside `vncd`.
pub const PROXY_EXE: &str = "vncd-proxy";

/// Runs `vncd-proxy --listen ADDR:PORT (--target HOST:PORT | --unix-target PATH) ...`
/// (or `vncd proxy ...`).
#[derive(Clone, Debug)]
pub struct Builtin {
    /// `vncd-proxy`, or the vncd executable.
    pub program: PathBuf,
    /// `program` is vncd itself, so the arguments start with its `proxy` subcommand.
    pub subcommand: bool,
    pub tls: Option<Tls>,
    /// Allowed Origin headers; empty allows any.
    pub origins: Vec<String>,
}

impl Builtin {
    /// The proxy beside the running `vncd` executable: `vncd-proxy` if it is there,
    /// else `vncd proxy`.
    pub fn beside(vncd: &Path, tls: Option<Tls>, origins: Vec<String>) -> Builtin {
        let small = vncd.with_file_name(PROXY_EXE);
        let (program, subcommand) = if small.is_file() {
            (small, false)
        } else {
            (vncd.to_owned(), true)
        };
        Builtin {
            program,
            subcommand,
            tls,
            origins,
        }
    }
}

impl Backend for Builtin {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn settings(&self) -> String {
        // `tickets v1`: proxies from before console tickets (which took a fixed token)
        // carry another digest and are replaced.
        format!(
            "{:?} {:?} {:?} tickets v1",
            self.program, self.tls, self.origins
        )
    }

    fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    fn command(&self, spec: &ProxySpec) -> CommandLine {
        let listen = std::net::SocketAddr::new(spec.listen, spec.port).to_string();
        let mut args = Vec::new();
        if self.subcommand {
            args.push("proxy".to_owned());
        }
        args.extend(["--listen".to_owned(), listen]);
        match &spec.target {
            Endpoint::Tcp { .. } => args.extend(["--target".to_owned(), spec.target.to_string()]),
            Endpoint::Unix { path } => args.extend(["--unix-target".to_owned(), path.clone()]),
        }
        if let Some(web) = &spec.web {
            args.extend(["--web".to_owned(), web.display().to_string()]);
        }
        if let Some(file) = &spec.key_file {
            args.extend(["--key-file".to_owned(), file.display().to_string()]);
        }
        if let Some(dir) = &spec.nonces {
            args.extend(["--nonce-dir".to_owned(), dir.display().to_string()]);
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

    fn key_file(&self, spec: &ProxySpec) -> Option<String> {
        spec.key.as_ref().map(|k| format!("{}\n", k.to_hex()))
    }

    fn stats_args(&self, path: &Path) -> Option<Vec<String>> {
        Some(vec!["--stats-file".to_owned(), path.display().to_string()])
    }

    fn key_on_stdin(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_proxy_command_line() {
        let b = Builtin {
            program: "/usr/bin/vncd".into(),
            subcommand: true,
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
            key: Some(crate::ticket::LeaseKey::from_bytes([0xab; 32])),
            key_file: Some("/s/keys/vm1.key".into()),
            nonces: None,
        };
        assert_eq!(
            b.command(&spec).args,
            [
                "proxy",
                "--listen",
                "127.0.0.1:6100",
                "--unix-target",
                "/run/vm1.sock",
                "--key-file",
                "/s/keys/vm1.key",
                "--tls-cert",
                "/c.pem",
                "--tls-key",
                "/k.pem",
                "--origin",
                "https://ui.example"
            ]
        );
        assert_eq!(b.key_file(&spec), Some(format!("{}\n", "ab".repeat(32))));
        assert_eq!(
            b.stats_args(Path::new("/s/stats/vm1.json")).unwrap(),
            ["--stats-file", "/s/stats/vm1.json"]
        );
    }

    #[test]
    fn prefers_the_small_proxy_beside_vncd() {
        let dir = tempfile::tempdir().unwrap();
        let vncd = dir.path().join("vncd");
        let alone = Builtin::beside(&vncd, None, Vec::new());
        assert_eq!(
            (alone.program.as_path(), alone.subcommand),
            (vncd.as_path(), true)
        );
        std::fs::write(dir.path().join(PROXY_EXE), b"").unwrap();
        let b = Builtin::beside(&vncd, None, Vec::new());
        assert_eq!(b.program, dir.path().join(PROXY_EXE));
        assert!(!b.subcommand);
        let spec = ProxySpec {
            session: "vm1".into(),
            listen: "127.0.0.1".parse().unwrap(),
            port: 6100,
            target: Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 5901,
            },
            web: None,
            key: None,
            key_file: None,
            nonces: None,
        };
        assert_eq!(
            b.command(&spec).args,
            ["--listen", "127.0.0.1:6100", "--target", "127.0.0.1:5901"]
        );
    }
}
