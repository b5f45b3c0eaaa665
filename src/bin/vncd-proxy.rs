#![forbid(unsafe_code)]
//! `vncd-proxy`: the builtin proxy (`vncd proxy`) as an executable of its own.
//!
//! vncd runs one proxy process per session, so what each process maps matters: the full
//! `vncd` binary built with the `libvirt` feature (the .deb) links libvirt, and with it
//! some fifty shared libraries whose relocations cost every process about 2 MiB of private
//! memory before it serves a byte. This one links only the proxy, whatever the features. The supervisor uses it when it sits beside `vncd`, and falls back
//! to `vncd proxy` otherwise; both take exactly the same arguments.

use clap::Parser;

/// vncd's websocket -> VNC proxy for one session (normally started by vncd itself).
#[derive(Debug, Parser)]
#[command(name = "vncd-proxy", version, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    args: vncd::proxy::ProxyArgs,
}

fn main() -> std::process::ExitCode {
    vncd::cli::proxy_main(Cli::parse().args)
}
