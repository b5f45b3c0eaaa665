//! `vncd kube`'s VncConsoleRequest responder: its flags and how it is started. Kept out
//! of `kube.rs` so that the controller's wiring and this one change independently.

use std::path::Path;
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
    pub objects: &'a Objects,
    pub metered: &'a Metered,
    pub url: &'a crate::status::UrlStyle,
    pub state_dir: &'a Path,
}

/// Starts the responder; it stops when the returned guard is dropped.
///
/// STAND-IN until main's `vncd kube` has them (issue #12 wiring by the other branch):
/// the master key (`MasterKey::load_or_create(STATE_DIR/ticket.key)`), `--ticket-ttl`
/// and the controller publishing [`Consoles`] after each pass. Here the key is loaded the
/// same way, the TTL is the 60 s default, and `Consoles` is published from the lease store's
/// view of this node's Ready sessions. Replace all three with main's when merging.
pub fn start(
    args: &ConsoleRequestArgs,
    w: &ConsoleWiring<'_>,
) -> anyhow::Result<(AbortOnDrop, AbortOnDrop, Arc<ResponderCounts>)> {
    let key_path = w.state_dir.join("ticket.key");
    let master = crate::ticket::MasterKey::load_or_create(&key_path)?;
    let minter = Minter::new(master, w.url.clone(), Duration::from_secs(60));
    let consoles = Consoles::default();
    let publisher = AbortOnDrop(tokio::spawn(publish_from_objects(
        w.objects.clone(),
        w.node.to_owned(),
        consoles.clone(),
    )));
    // END STAND-IN
    let counts = Arc::new(ResponderCounts::default());
    let responder = Responder {
        client: w.client.clone(),
        namespace: w.namespace.map(str::to_owned),
        node: w.node.to_owned(),
        minter,
        consoles,
        objects: w.objects.clone(),
        metered: w.metered.clone(),
        retention: args.retention(),
        counts: counts.clone(),
    };
    Ok((
        AbortOnDrop(tokio::spawn(responder.run())),
        publisher,
        counts,
    ))
}

/// STAND-IN (see [`start`]): publishes the leases of this node's sessions whose status
/// says Ready, as the lease store last committed them.
async fn publish_from_objects(objects: Objects, node: String, consoles: Consoles) {
    loop {
        let leases: Vec<_> = objects
            .all()
            .into_iter()
            .filter(|k| {
                k.watched
                    && k.node_name.as_deref() == Some(node.as_str())
                    && k.status.phase == Some(crate::api::Phase::Ready)
            })
            .filter_map(|k| objects.lease(&k.key()))
            .collect();
        consoles.publish(leases.iter());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
