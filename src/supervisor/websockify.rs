//! The websockify backend: how to start websockify for one session.

use std::path::PathBuf;

use super::{Backend, CommandLine, ProxySpec};
use crate::session::Endpoint;

/// Runs `websockify [--web DIR] [--unix-target PATH] LISTEN:PORT [HOST:PORT]`.
#[derive(Clone, Debug)]
pub struct Websockify {
    pub program: PathBuf,
}

impl Backend for Websockify {
    fn name(&self) -> &'static str {
        "websockify"
    }

    fn command(&self, spec: &ProxySpec) -> CommandLine {
        let mut args = Vec::new();
        if let Some(web) = &spec.web {
            args.push("--web".to_owned());
            args.push(web.display().to_string());
        }
        let listen = match spec.listen {
            std::net::IpAddr::V6(a) => format!("[{a}]:{}", spec.port),
            std::net::IpAddr::V4(a) => format!("{a}:{}", spec.port),
        };
        match &spec.target {
            Endpoint::Tcp { .. } => {
                args.push(listen);
                args.push(spec.target.to_string());
            }
            Endpoint::Unix { path } => {
                args.push(format!("--unix-target={path}"));
                args.push(listen);
            }
        }
        CommandLine {
            program: self.program.clone(),
            args,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(target: Endpoint, web: Option<&str>) -> ProxySpec {
        ProxySpec {
            session: "vm1".into(),
            listen: "0.0.0.0".parse().unwrap(),
            port: 6100,
            target,
            web: web.map(PathBuf::from),
        }
    }

    #[test]
    fn builds_tcp_and_unix_command_lines() {
        let w = Websockify {
            program: "websockify".into(),
        };
        let tcp = Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: 5901,
        };
        assert_eq!(
            w.command(&spec(tcp, None)).args,
            ["0.0.0.0:6100", "127.0.0.1:5901"]
        );
        let unix = Endpoint::Unix {
            path: "/run/vm.sock".into(),
        };
        assert_eq!(
            w.command(&spec(unix, Some("/usr/share/novnc"))).args,
            [
                "--web",
                "/usr/share/novnc",
                "--unix-target=/run/vm.sock",
                "0.0.0.0:6100"
            ]
        );
    }
}
