//! The websockify backend: how to start websockify for one session.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::{Backend, CommandLine, ProxySpec, Tls};
use crate::session::Endpoint;

/// Runs websockify. With a token, the target comes from its TokenFile plugin (one
/// entry: this session's token), so a client without the token is refused before
/// websockify connects anywhere.
#[derive(Clone, Debug)]
pub struct Websockify {
    pub program: PathBuf,
    pub tls: Option<Tls>,
}

impl Backend for Websockify {
    fn name(&self) -> &'static str {
        "websockify"
    }

    fn settings(&self) -> String {
        format!("{:?} {:?}", self.program, self.tls)
    }

    fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    fn command(&self, spec: &ProxySpec) -> CommandLine {
        let mut args = Vec::new();
        if let Some(web) = &spec.web {
            args.push("--web".to_owned());
            args.push(web.display().to_string());
            // No directory listings: serve the noVNC files, nothing that shows what else
            // the directory holds (websockify 0.11 and later; see `supports_file_only`).
            if supports_file_only(&self.program) {
                args.push("--file-only".to_owned());
            }
        }
        if let Some(tls) = &self.tls {
            args.extend([
                "--cert".to_owned(),
                tls.cert.display().to_string(),
                "--key".to_owned(),
                tls.key.display().to_string(),
                "--ssl-only".to_owned(),
            ]);
        }
        let listen = match spec.listen {
            std::net::IpAddr::V6(a) => format!("[{a}]:{}", spec.port),
            std::net::IpAddr::V4(a) => format!("{a}:{}", spec.port),
        };
        match (&spec.token_file, &spec.target) {
            (Some(file), _) => {
                args.extend([
                    "--token-plugin".to_owned(),
                    "TokenFile".to_owned(),
                    "--token-source".to_owned(),
                    file.display().to_string(),
                ]);
                args.push(listen);
            }
            (None, Endpoint::Tcp { .. }) => {
                args.push(listen);
                args.push(spec.target.to_string());
            }
            (None, Endpoint::Unix { path }) => {
                args.push(format!("--unix-target={path}"));
                args.push(listen);
            }
        }
        CommandLine {
            program: self.program.clone(),
            args,
        }
    }

    fn token_file(&self, spec: &ProxySpec) -> Option<String> {
        let token = spec.token.as_ref()?;
        let target = match &spec.target {
            Endpoint::Tcp { host, port } => format!("{host}:{port}"),
            Endpoint::Unix { path } => format!("unix_socket:{path}"),
        };
        Some(format!("{token}: {target}\n"))
    }
}

/// Whether `program` (a websockify) knows `--file-only`, which turns off directory
/// listings under `--web`. websockify 0.10 (Debian 12) does not, and exits with "no such
/// option" when given it; 0.11 and later do. Asked once per program (`--help`) and
/// remembered; `vncd run` asks at start so no spawn waits for it.
pub fn supports_file_only(program: &Path) -> bool {
    static KNOWN: OnceLock<Mutex<HashMap<PathBuf, bool>>> = OnceLock::new();
    let known = KNOWN.get_or_init(Default::default);
    if let Some(&yes) = known
        .lock()
        .ok()
        .and_then(|k| k.get(program).copied())
        .as_ref()
    {
        return yes;
    }
    let yes = std::process::Command::new(program)
        .arg("--help")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--file-only"));
    if let Ok(mut k) = known.lock() {
        k.insert(program.to_owned(), yes);
    }
    yes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(target: Endpoint, web: Option<&str>, token: Option<&str>) -> ProxySpec {
        ProxySpec {
            session: "vm1".into(),
            listen: "0.0.0.0".parse().unwrap(),
            port: 6100,
            target,
            web: web.map(PathBuf::from),
            token: token.map(str::to_owned),
            token_file: token.map(|_| PathBuf::from("/s/tokens/vm1.token")),
        }
    }

    #[test]
    fn builds_tcp_and_unix_command_lines_without_tokens() {
        // A program that cannot run knows no --file-only.
        let w = Websockify {
            program: "/nonexistent/websockify".into(),
            tls: None,
        };
        let tcp = Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: 5901,
        };
        assert_eq!(
            w.command(&spec(tcp, None, None)).args,
            ["0.0.0.0:6100", "127.0.0.1:5901"]
        );
        let unix = Endpoint::Unix {
            path: "/run/vm.sock".into(),
        };
        assert_eq!(
            w.command(&spec(unix, Some("/usr/share/novnc"), None)).args,
            [
                "--web",
                "/usr/share/novnc",
                "--unix-target=/run/vm.sock",
                "0.0.0.0:6100"
            ]
        );
    }

    #[test]
    fn file_only_is_passed_with_web_when_the_websockify_knows_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("websockify");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho '  --file-only  disallow directory listings'\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let w = Websockify {
            program: fake,
            tls: None,
        };
        let tcp = Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: 5901,
        };
        assert_eq!(
            w.command(&spec(tcp.clone(), Some("/w"), None)).args,
            [
                "--web",
                "/w",
                "--file-only",
                "0.0.0.0:6100",
                "127.0.0.1:5901"
            ]
        );
        assert_eq!(
            w.command(&spec(tcp, None, None)).args,
            ["0.0.0.0:6100", "127.0.0.1:5901"]
        );
    }

    #[test]
    fn a_token_routes_through_the_token_file_plugin() {
        let w = Websockify {
            program: "websockify".into(),
            tls: Some(Tls {
                cert: "/c".into(),
                key: "/k".into(),
            }),
        };
        let unix = Endpoint::Unix {
            path: "/run/vm.sock".into(),
        };
        let s = spec(unix, None, Some("abc"));
        assert_eq!(
            w.command(&s).args,
            [
                "--cert",
                "/c",
                "--key",
                "/k",
                "--ssl-only",
                "--token-plugin",
                "TokenFile",
                "--token-source",
                "/s/tokens/vm1.token",
                "0.0.0.0:6100"
            ]
        );
        assert_eq!(
            w.token_file(&s).as_deref(),
            Some("abc: unix_socket:/run/vm.sock\n")
        );
        let tcp = Endpoint::Tcp {
            host: "10.0.0.5".into(),
            port: 5901,
        };
        assert_eq!(
            w.token_file(&spec(tcp, None, Some("t"))).as_deref(),
            Some("t: 10.0.0.5:5901\n")
        );
    }
}
