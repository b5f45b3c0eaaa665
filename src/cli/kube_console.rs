//! `vncd kube`'s VncConsoleRequest responder: its flags and how it is started. Kept out
//! of `kube.rs` so that the controller's wiring and this one change independently.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::serve::seconds;
use crate::console::{Consoles, Minter};
use crate::k8s::call::Metered;
use crate::k8s::console::{AbortOnDrop, Responder, ResponderCounts};
use crate::k8s::console_request::Retention;
use crate::k8s::objects::Objects;

#[derive(Debug, Clone, Args)]
pub struct ConsoleRequestArgs {
    /// Seconds an answered VncConsoleRequest is kept after its ticket expired (or after it
    /// was refused) before this node's vncd deletes it.
    #[arg(long, env = "VNCD_CONSOLE_REQUEST_GRACE", value_name = "SECONDS", value_parser = seconds, default_value = "60")]
    pub console_request_grace: Duration,
}

impl ConsoleRequestArgs {
    pub fn retention(&self) -> Retention {
        Retention {
            grace: self.console_request_grace,
            ..Retention::default()
        }
    }
}

/// What the responder shares with the rest of `vncd kube`.
#[allow(missing_debug_implementations)]
pub struct ConsoleWiring<'a> {
    pub client: &'a kube::Client,
    pub namespace: Option<&'a str>,
    pub node: &'a str,
    /// This node's sessions as the API server last showed them.
    pub objects: &'a Objects,
    pub metered: &'a Metered,
    /// Mints with the node's master key and `--ticket-ttl`.
    pub minter: &'a Minter,
    /// The consoles that are up, as the controller published them after its last pass.
    pub consoles: &'a Consoles,
}

/// Starts the responder; it stops when the returned guard is dropped.
pub fn start(
    args: &ConsoleRequestArgs,
    w: &ConsoleWiring<'_>,
) -> (AbortOnDrop, Arc<ResponderCounts>) {
    let counts = Arc::new(ResponderCounts::default());
    let responder = Responder {
        client: w.client.clone(),
        namespace: w.namespace.map(str::to_owned),
        node: w.node.to_owned(),
        minter: w.minter.clone(),
        consoles: w.consoles.clone(),
        objects: w.objects.clone(),
        metered: w.metered.clone(),
        retention: args.retention(),
        counts: counts.clone(),
    };
    let span = tracing::info_span!("console_requests");
    (
        AbortOnDrop(crate::task::spawn(span, responder.run())),
        counts,
    )
}
