//! Command-line flags of `vncd relay` and `vncd-proxy relay` (one struct, so the two
//! binaries take exactly the same argv).

use std::path::PathBuf;

/// Flags of the relay: one long-lived process per host that serves every builtin console
/// session. Sessions are not flags: the controller declares them over the control socket.
///
/// Every flag can also come from an environment variable (`VNCD_...`); the command line wins.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct RelayArgs {
    /// vncd's state directory. The relay keeps its own files in STATE_DIR/relay/ (created
    /// mode 0750): the control socket and the used-ticket records (nonces/SESSION/), so a
    /// restarted relay still refuses tickets spent before. The relay's uid must be able to
    /// create and write that directory; it refuses to start otherwise, saying how to fix it.
    #[arg(long, env = "VNCD_STATE_DIR", value_name = "DIR")]
    pub state_dir: PathBuf,

    /// The control socket (JSON lines; see docs/ARCHITECTURE.md) [default:
    /// STATE_DIR/relay/relay.sock].
    #[arg(long, env = "VNCD_RELAY_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Besides the relay's own uid, the one uid allowed on the control socket (checked with
    /// SO_PEERCRED; others are refused and logged) [default: the owner of --state-dir].
    #[arg(long, env = "VNCD_RELAY_CONTROLLER_UID", value_name = "UID")]
    pub controller_uid: Option<u32>,

    /// Take the listeners and connections over from a running relay on the same socket.
    /// Not supported yet (a later step): the relay refuses to start with this flag.
    #[arg(long, env = "VNCD_RELAY_TAKE_OVER")]
    pub take_over: bool,

    /// Serve nothing: ask the relay on the control socket for its report and exit 0 if it
    /// answers within 5 s, non-zero otherwise (the chart's liveness and readiness probe, run as
    /// the relay's own uid). The relay itself is not touched.
    #[arg(long)]
    pub check: bool,

    /// Most connections that have not yet passed their ticket check, per source address
    /// (IPv4 per address, IPv6 per /64); more from that source are closed at once.
    #[arg(
        long,
        env = "VNCD_RELAY_MAX_PENDING_PER_SOURCE",
        value_name = "N",
        default_value_t = 32
    )]
    pub max_pending_per_source: usize,

    /// Most connections that have not yet passed their ticket check, over all sessions.
    /// At the cap, a new connection evicts the oldest pending connection of the source that
    /// holds the most; a connection younger than 1.5 s is never evicted.
    #[arg(
        long,
        env = "VNCD_RELAY_MAX_PENDING",
        value_name = "N",
        default_value_t = 1024
    )]
    pub max_pending: usize,

    /// Seconds between websocket pings to each client; a client silent for twice as long
    /// is dropped.
    #[arg(
        long,
        env = "VNCD_RELAY_PING_INTERVAL",
        value_name = "SECS",
        default_value_t = 20,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub ping_interval: u64,
}

impl RelayArgs {
    /// The relay's own directory: STATE_DIR/relay.
    pub fn relay_dir(&self) -> PathBuf {
        self.state_dir.join("relay")
    }

    /// The control socket path.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.relay_dir().join("relay.sock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: RelayArgs,
    }

    #[test]
    fn defaults_and_paths() {
        let cli = Cli::try_parse_from(["relay", "--state-dir", "/s"]).expect("parses");
        assert_eq!(cli.args.socket_path(), PathBuf::from("/s/relay/relay.sock"));
        assert_eq!(cli.args.max_pending, 1024);
        assert!(!cli.args.take_over && !cli.args.check);
        let cli = Cli::try_parse_from(["relay", "--state-dir", "/s", "--socket", "/run/r.sock"])
            .expect("parses");
        assert_eq!(cli.args.socket_path(), PathBuf::from("/run/r.sock"));
        assert!(
            Cli::try_parse_from(["relay"]).is_err(),
            "--state-dir is required"
        );
        // The gateway is declared over the control socket, never given on the command line.
        assert!(
            Cli::try_parse_from(["relay", "--state-dir", "/s", "--gateway", "127.0.0.1:7000"])
                .is_err()
        );
    }
}
