#![forbid(unsafe_code)]
//! `vncd-proxy`: the builtin proxy (`vncd proxy`) and the node relay (`vncd relay`) as an
//! executable of their own.
//!
//! vncd runs one proxy process per session, so what each process maps matters: the full
//! `vncd` binary built with the `libvirt` feature (the .deb) links libvirt, and with it
//! some fifty shared libraries whose relocations cost every process about 2 MiB of private
//! memory before it serves a byte. This one links only the data plane, whatever the
//! features. The supervisor uses it when it sits beside `vncd`, and falls back to
//! `vncd proxy` otherwise; both take exactly the same arguments.
//!
//! `vncd-proxy relay ARGS` runs the relay instead, with exactly the arguments of
//! `vncd relay ARGS`.

use clap::Parser;

/// vncd's websocket -> VNC proxy for one session (normally started by vncd itself).
///
/// `vncd-proxy relay --state-dir DIR [--socket PATH] [--take-over]` runs the node relay
/// instead (see `vncd-proxy relay --help`).
#[derive(Debug, Parser)]
#[command(name = "vncd-proxy", version, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    args: vncd::proxy::ProxyArgs,
}

/// The node relay: one process that serves every declared console session of this host,
/// told what to serve over its control socket. The same as `vncd relay`.
#[derive(Debug, Parser)]
#[command(name = "vncd-proxy relay", version, max_term_width = 100)]
struct RelayCli {
    #[command(flatten)]
    args: vncd::relay::RelayArgs,
}

fn main() -> std::process::ExitCode {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "relay") {
        // `vncd-proxy relay ...`: the proxy's own flags never include a bare `relay`.
        argv.remove(1);
        return vncd::cli::relay_main(RelayCli::parse_from(argv).args);
    }
    vncd::cli::proxy_main(Cli::parse_from(argv).args)
}
