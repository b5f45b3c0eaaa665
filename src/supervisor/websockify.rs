//! The websockify backend: how to start websockify for one session.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::{Backend, CommandLine, ProxySpec, Tls};
use crate::session::Endpoint;

/// Runs websockify. With a ticket key, the target comes from vncd's ticket plugin
/// (`contrib/websockify/vncd_ticket.py`, installed by [`install_plugin`]), which admits a
/// client only with a valid, unused ticket, before websockify connects anywhere.
#[derive(Clone, Debug)]
pub struct Websockify {
    pub program: PathBuf,
    pub tls: Option<Tls>,
    /// The directory holding `vncd_ticket.py`, put on the proxies' `PYTHONPATH`.
    pub plugin_dir: Option<PathBuf>,
}

/// The ticket plugin, compiled into vncd so the binary and the plugin always agree on
/// the ticket format (tests/ticket_plugin.rs checks both against the same vectors).
pub const PLUGIN_SOURCE: &str = include_str!("../../contrib/websockify/vncd_ticket.py");

/// The plugin's module name, as websockify's `--token-plugin` names its class.
pub const PLUGIN_CLASS: &str = "vncd_ticket.VncdTicket";
/// The auth plugin that spends a ticket once websockify's handshake checks would pass
/// (websockify calls the token plugin before it checks the handshake; see the plugin's docs).
pub const SPEND_CLASS: &str = "vncd_ticket.VncdSpend";

/// Writes the plugin to `dir/vncd_ticket.py` (dir 0755, file 0644: the proxies, maybe
/// another user, must read it; only vncd's user can change it), replacing whatever is
/// there, and returns `dir`.
pub fn install_plugin(dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let tmp = dir.join(".vncd_ticket.py.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::write(&tmp, PLUGIN_SOURCE)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, dir.join("vncd_ticket.py"))?;
    Ok(dir.to_owned())
}

impl Backend for Websockify {
    fn name(&self) -> &'static str {
        "websockify"
    }

    fn settings(&self) -> String {
        // `tickets v1`: websockify started before console tickets (TokenFile plugin,
        // fixed token) carries another digest and is replaced; `spent last`: one that spends
        // tickets in lookup (before the handshake checks) is replaced too.
        format!("{:?} {:?} tickets v1 spent last", self.program, self.tls)
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        self.plugin_dir
            .iter()
            .map(|d| ("PYTHONPATH", d.display().to_string()))
            .collect()
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
        match (&spec.key_file, &spec.target) {
            (Some(file), _) => {
                args.extend([
                    "--token-plugin".to_owned(),
                    PLUGIN_CLASS.to_owned(),
                    "--token-source".to_owned(),
                    file.display().to_string(),
                    "--auth-plugin".to_owned(),
                    SPEND_CLASS.to_owned(),
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

    fn key_file(&self, spec: &ProxySpec) -> Option<String> {
        crate::ticket::websockify_key_file(
            &spec.session,
            spec.key.as_ref()?,
            &spec.target,
            spec.nonces.as_deref()?,
        )
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

    fn spec(target: Endpoint, web: Option<&str>, key: Option<u8>) -> ProxySpec {
        ProxySpec {
            session: "vm1".into(),
            listen: "0.0.0.0".parse().unwrap(),
            port: 6100,
            target,
            web: web.map(PathBuf::from),
            key: key.map(|b| crate::ticket::LeaseKey::from_bytes([b; 32])),
            key_file: key.map(|_| PathBuf::from("/s/keys/vm1.key")),
            nonces: key.map(|_| PathBuf::from("/s/nonces/vm1")),
        }
    }

    #[test]
    fn builds_tcp_and_unix_command_lines_without_tokens() {
        // A program that cannot run knows no --file-only.
        let w = Websockify {
            program: "/nonexistent/websockify".into(),
            tls: None,
            plugin_dir: None,
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
            plugin_dir: None,
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
    fn a_key_routes_through_the_ticket_plugin() {
        let w = Websockify {
            program: "websockify".into(),
            tls: Some(Tls {
                cert: "/c".into(),
                key: "/k".into(),
            }),
            plugin_dir: Some("/s/websockify".into()),
        };
        let unix = Endpoint::Unix {
            path: "/run/vm.sock".into(),
        };
        let s = spec(unix, None, Some(0xab));
        assert_eq!(
            w.command(&s).args,
            [
                "--cert",
                "/c",
                "--key",
                "/k",
                "--ssl-only",
                "--token-plugin",
                "vncd_ticket.VncdTicket",
                "--token-source",
                "/s/keys/vm1.key",
                "--auth-plugin",
                "vncd_ticket.VncdSpend",
                "0.0.0.0:6100"
            ]
        );
        let key = "ab".repeat(32);
        assert_eq!(
            w.key_file(&s),
            Some(format!(
                "vncd-lease-key v1\nsession vm1\nkey {key}\nunix /run/vm.sock\nnonces /s/nonces/vm1\n"
            ))
        );
        assert_eq!(w.env(), [("PYTHONPATH", "/s/websockify".to_owned())]);
        let tcp = Endpoint::Tcp {
            host: "10.0.0.5".into(),
            port: 5901,
        };
        assert!(
            w.key_file(&spec(tcp, None, Some(1)))
                .unwrap()
                .contains("\nhost 10.0.0.5\nport 5901\n")
        );
    }
}
