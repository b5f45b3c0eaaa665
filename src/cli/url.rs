//! `vncd url NAME`: a fresh console URL (the base URL plus a single-use ticket).
//!
//! Standalone it reads the state directory: the lease (`leases.json`), how URLs are
//! written (`config.json`) and the master key (`ticket.key`, 0600). Only the state
//! directory's owner can read the key, so only that user (or whoever may run this as that
//! user) can mint: the same people who could read the old per-lease tokens.
//!
//! With `--kube` it asks the cluster instead ([`super::url_kube`]): the user's own
//! kubeconfig and RBAC decide, through a VncConsoleRequest.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::StateArgs;
use super::serve::TICKET_KEY_FILE;
use crate::console::{ConsoleUrl, MintError, MintOptions, Minter};
use crate::runconfig::Recorded;
use crate::store::file::{StateDir, read_state};
use crate::ticket::MasterKey;

#[derive(Debug, Args)]
pub struct UrlArgs {
    /// The session.
    pub name: String,
    #[command(flatten)]
    pub state: StateArgs,
    /// Seconds the ticket stays valid while unused [default: the running vncd's
    /// --ticket-ttl, 60].
    #[arg(long, value_name = "SECONDS", value_parser = super::serve::seconds)]
    pub ttl: Option<Duration>,
    /// A console without keyboard and mouse input (not supported yet: refused).
    #[arg(long)]
    pub view_only: bool,
    /// Print `{"url": ..., "expiresAt": ...}` instead of the bare URL.
    #[arg(long)]
    pub json: bool,
    /// A URL through the relay's gateway port (`vncd run --relay --gateway`), which
    /// serves every session: `GATEWAY_URL?token=...`, with a ticket that names its lease.
    #[arg(long, conflicts_with = "kube")]
    pub gateway: bool,
    /// Kubernetes: ask the vncd serving the session through a VncConsoleRequest, with your
    /// kubeconfig (KUBECONFIG or ~/.kube/config); needs the ClusterRole vncd-console.
    #[arg(long)]
    pub kube: bool,
    /// With --kube: the session's namespace [default: the kubeconfig context's].
    #[arg(short = 'n', long, requires = "kube")]
    pub namespace: Option<String>,
    /// With --kube: seconds to wait for vncd's answer.
    #[arg(long, value_name = "SECONDS", value_parser = super::serve::seconds, default_value = "30", requires = "kube")]
    pub wait: Duration,
}

pub fn url(args: UrlArgs) -> anyhow::Result<ExitCode> {
    let opts = MintOptions {
        ttl: args.ttl,
        view_only: args.view_only,
    };
    let minted = if args.kube {
        super::url_kube::mint_kube(&super::url_kube::KubeAsk {
            name: args.name.clone(),
            namespace: args.namespace.clone(),
            opts,
            wait: args.wait,
        })
    } else if args.gateway {
        mint_gateway(&args.state.state_dir, &args.name, opts)
    } else {
        mint_standalone(&args.state.state_dir, &args.name, opts)
    };
    match minted {
        Ok(u) => {
            print_url(&u, args.json);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("vncd: {}", super::error_chain(&e));
            Ok(ExitCode::from(1))
        }
    }
}

/// Prints a minted URL: the bare URL (for scripts and `xdg-open`), or JSON.
pub(crate) fn print_url(u: &ConsoleUrl, json: bool) {
    if json {
        let v = serde_json::json!({"url": u.url, "expiresAt": u.expires_at_rfc3339()});
        super::emit(&format!("{v}\n"));
    } else {
        super::emit(&format!("{}\n", u.url));
    }
}

/// Mints a URL for `name` from the state directory of a standalone vncd.
pub(crate) fn mint_standalone(
    state_dir: &Path,
    name: &str,
    opts: MintOptions,
) -> anyhow::Result<ConsoleUrl> {
    let (minter, lease) = minter_and_lease(state_dir, name)?;
    Ok(minter.mint(&lease, opts, crate::ticket::unix_now())?)
}

/// Mints a URL for `name` through the gateway the standalone vncd recorded.
fn mint_gateway(state_dir: &Path, name: &str, opts: MintOptions) -> anyhow::Result<ConsoleUrl> {
    let recorded = Recorded::load(state_dir)?;
    let base = recorded
        .config()
        .and_then(|c| c.gateway_url.clone())
        .with_context(|| {
            format!(
                "the vncd of {} serves no gateway (start it with --relay --gateway ADDR:PORT)",
                state_dir.display()
            )
        })?;
    let (minter, lease) = minter_and_lease(state_dir, name)?;
    Ok(minter.mint_gateway(&lease, &base, opts, crate::ticket::unix_now())?)
}

/// The minter of the vncd that owns `state_dir`, and `name`'s lease if it is served.
fn minter_and_lease(state_dir: &Path, name: &str) -> anyhow::Result<(Minter, crate::lease::Lease)> {
    let recorded = Recorded::load(state_dir)?;
    let config = recorded.config().with_context(|| {
        format!(
            "no `vncd run` has recorded its settings in {} yet (config.json), so the URL \
             cannot be written",
            state_dir.display()
        )
    })?;
    let mut set = read_state(&StateDir::new(state_dir).leases())?;
    let lease = set
        .leases
        .remove(name)
        .ok_or_else(|| MintError::Unknown(name.to_owned()))?;
    if lease.process.is_none() {
        return Err(MintError::NotReady(name.to_owned()).into());
    }
    let master = MasterKey::load(&state_dir.join(TICKET_KEY_FILE))?;
    let minter = Minter::new(
        master,
        config.url_style(),
        Duration::from_secs(config.ticket_ttl_seconds),
    );
    Ok((minter, lease))
}
