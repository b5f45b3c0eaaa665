//! Command-line flags of `vncd proxy`.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Flags of `vncd proxy`: one websocket -> VNC proxy process for one console session.
///
/// Every flag can also come from an environment variable (`VNCD_PROXY_...`); the command line wins.
/// The ticket key is never a flag: argv is world-readable, so it is read from `--key-file`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct ProxyArgs {
    /// Address to listen on (IP:PORT, e.g. 127.0.0.1:6080). Bound by this very process before it
    /// reports readiness; a port already in use is a fatal error (non-zero exit).
    #[arg(long, env = "VNCD_PROXY_LISTEN", value_name = "ADDR:PORT")]
    pub listen: SocketAddr,

    /// VNC server to connect each websocket session to, as HOST:PORT.
    /// Exactly one of --target and --unix-target is required.
    #[arg(
        long,
        env = "VNCD_PROXY_TARGET",
        value_name = "HOST:PORT",
        value_parser = parse_host_port,
        conflicts_with = "unix_target",
        required_unless_present = "unix_target"
    )]
    pub target: Option<String>,

    /// VNC server listening on a unix socket (e.g. QEMU's `-vnc unix:PATH`), instead of --target.
    #[arg(long, env = "VNCD_PROXY_UNIX_TARGET", value_name = "PATH")]
    pub unix_target: Option<PathBuf>,

    /// Serve static files (noVNC's vnc.html and friends) from DIR for plain GET/HEAD requests.
    /// Static files are served WITHOUT a ticket, so that the page can load; only the
    /// websocket (the console itself) is guarded by the ticket.
    #[arg(long, env = "VNCD_PROXY_WEB", value_name = "DIR")]
    pub web: Option<PathBuf>,

    /// File holding the lease's ticket key (64 hex digits; surrounding whitespace is
    /// ignored). When given, every websocket upgrade must carry a console ticket minted
    /// with it (`vncd url`), as `?token=...` (on `/` or `/websockify`) or as the last path
    /// segment (`/TICKET`, `/websockify/TICKET`): unexpired and not used before, or it is
    /// refused with HTTP 403 before the VNC target is contacted. The file is read once, at
    /// start. `-` reads the key from standard input (how vncd passes it to a proxy run as
    /// `--proxy-user`).
    #[arg(long, env = "VNCD_PROXY_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<PathBuf>,

    /// Directory recording used tickets, one file each, so a ticket opens one connection
    /// even across a restart of this lease's proxy [default: in memory].
    #[arg(
        long,
        env = "VNCD_PROXY_NONCE_DIR",
        value_name = "DIR",
        requires = "key_file"
    )]
    pub nonce_dir: Option<PathBuf>,

    /// Allowed value of the Origin header of websocket upgrades (e.g. https://console.example).
    /// Repeatable. When any is given, an upgrade with a missing or unlisted Origin gets HTTP 403.
    /// Compared case-insensitively, ignoring a trailing '/'.
    #[arg(
        long = "origin",
        env = "VNCD_PROXY_ORIGIN",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    pub origins: Vec<String>,

    /// PEM certificate chain: serve https/wss instead of http/ws. Requires --tls-key.
    #[arg(
        long,
        env = "VNCD_PROXY_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) matching --tls-cert.
    #[arg(
        long,
        env = "VNCD_PROXY_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Keep per-session counters (connections, bytes each way) in FILE: rewritten atomically
    /// (mode 0600) when a websocket session opens, closes or is refused, and every 2 s while
    /// one is open. `vncd run` exports them on /metrics.
    #[arg(long, env = "VNCD_PROXY_STATS_FILE", value_name = "FILE")]
    pub stats_file: Option<PathBuf>,

    /// Exit 0 after SECS with no client connected, counted from start or from the moment the
    /// last client left. 0 turns it off.
    #[arg(
        long,
        env = "VNCD_PROXY_IDLE_TIMEOUT",
        value_name = "SECS",
        default_value_t = 0
    )]
    pub idle_timeout: u64,

    /// Close every connection and exit 0 once the process is SECS old, even with a live client.
    /// 0 turns it off.
    #[arg(
        long,
        env = "VNCD_PROXY_MAX_LIFETIME",
        value_name = "SECS",
        default_value_t = 0
    )]
    pub max_lifetime: u64,

    /// Most connections open at once (HTTP, websocket, or still in the TLS handshake).
    /// One more is answered 503 and closed, and counted as refused: a client that opens
    /// thousands of sockets cannot exhaust the process's descriptors or memory.
    #[arg(
        long,
        env = "VNCD_PROXY_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 16,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_connections: u32,

    /// Seconds between websocket pings to each client. A client that sends nothing (not
    /// even a pong) for twice this long is dropped, so a vanished client does not hold its
    /// session open. TCP keepalive probes the socket on the same schedule.
    #[arg(
        long,
        env = "VNCD_PROXY_PING_INTERVAL",
        value_name = "SECS",
        default_value_t = 20,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub ping_interval: u64,

    /// Refused and timed-out connections are not logged one by one (a scanner would flood
    /// the log) but summed up in one line per SECS: how many, and why.
    #[arg(
        long,
        env = "VNCD_PROXY_REFUSAL_LOG_INTERVAL",
        value_name = "SECS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub refusal_log_interval: u64,

    /// When stderr is a regular file opened for appending (as vncd's supervisor opens a
    /// proxy's log), truncate it once it grows past BYTES, so a chatty or attacked proxy
    /// cannot fill the state directory's disk. 0 turns it off.
    #[arg(
        long,
        env = "VNCD_PROXY_MAX_LOG_BYTES",
        value_name = "BYTES",
        default_value_t = 1024 * 1024
    )]
    pub max_log_bytes: u64,
}

/// Accept `HOST:PORT` and `[V6]:PORT`; the host is resolved at connect time.
pub(crate) fn parse_host_port(s: &str) -> Result<String, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not HOST:PORT"))?;
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{s:?} has an invalid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(s.to_owned()),
        _ => Err(format!("{s:?} has an invalid port {port:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: ProxyArgs,
    }

    fn parse(v: &[&str]) -> Result<ProxyArgs, clap::Error> {
        let mut argv = vec!["x"];
        argv.extend_from_slice(v);
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn host_port() {
        assert!(parse_host_port("127.0.0.1:5900").is_ok());
        assert!(parse_host_port("vnc.local:5901").is_ok());
        assert!(parse_host_port("[::1]:5900").is_ok());
        assert!(parse_host_port("127.0.0.1").is_err());
        assert!(parse_host_port(":5900").is_err());
        assert!(parse_host_port("h:0").is_err());
        assert!(parse_host_port("h:99999").is_err());
    }

    #[test]
    fn exactly_one_target() {
        assert!(parse(&["--listen", "127.0.0.1:1"]).is_err());
        assert!(
            parse(&[
                "--listen",
                "127.0.0.1:1",
                "--target",
                "h:1",
                "--unix-target",
                "/s"
            ])
            .is_err()
        );
        let a = parse(&["--listen", "127.0.0.1:1", "--unix-target", "/s"]).expect("valid");
        assert_eq!(a.unix_target, Some(PathBuf::from("/s")));
        assert_eq!(a.idle_timeout, 0);
    }

    #[test]
    fn tls_needs_both_files() {
        let base = ["--listen", "127.0.0.1:1", "--target", "h:1"];
        let mut v = base.to_vec();
        v.extend(["--tls-cert", "c.pem"]);
        assert!(parse(&v).is_err());
        v.extend(["--tls-key", "k.pem"]);
        assert!(parse(&v).is_ok());
    }

    #[test]
    fn origins_repeat() {
        let a = parse(&[
            "--listen",
            "127.0.0.1:1",
            "--target",
            "h:1",
            "--origin",
            "http://a",
            "--origin",
            "https://b",
        ])
        .expect("valid");
        assert_eq!(a.origins, vec!["http://a", "https://b"]);
    }
}
