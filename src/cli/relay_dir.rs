//! `vncd relay-dir`: hands a relay its directory before it starts under a uid of its own.
//!
//! The relay has no capabilities, so it cannot create `STATE_DIR/relay` in a state
//! directory it does not own (in the chart, a hostPath the kubelet creates as root). This
//! command does that one step and exits: in the chart it is the relay pod's init
//! container, the only part of the relay's pod with a capability (CAP_CHOWN). It does what
//! `vncd run --relay --proxy-user` does before starting its relay.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::supervisor::ProxyUser;

#[derive(Debug, Args)]
pub struct RelayDirArgs {
    /// The relay's --state-dir; STATE_DIR/relay is created (mode 0750) and handed over.
    #[arg(long, env = "VNCD_STATE_DIR", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// The relay's uid and gid, numeric (`UID:GID`): STATE_DIR/relay and what an earlier
    /// relay wrote in it become theirs.
    #[arg(long, value_name = "UID:GID", value_parser = numeric_user)]
    pub relay_user: (u32, u32),
    /// The group of STATE_DIR/relay: the controller's, so it reaches the control socket
    /// [default: the relay's gid].
    #[arg(long, value_name = "GID")]
    pub group: Option<u32>,
}

fn numeric_user(v: &str) -> Result<(u32, u32), String> {
    let (u, g) = v
        .split_once(':')
        .ok_or_else(|| format!("{v:?} is not UID:GID"))?;
    let parse = |x: &str, what: &str| {
        x.parse::<u32>()
            .map_err(|_| format!("{v:?}: the {what} {x:?} is not a number"))
    };
    let (u, g) = (parse(u, "uid")?, parse(g, "gid")?);
    if u == 0 {
        return Err(format!(
            "{v:?}: the relay never runs as root; give it a uid of its own"
        ));
    }
    Ok((u, g))
}

pub fn relay_dir(args: &RelayDirArgs) -> anyhow::Result<ExitCode> {
    let (uid, gid) = args.relay_user;
    let user = ProxyUser {
        spec: format!("{uid}:{gid}"),
        uid,
        gid,
    };
    let dir = args.state_dir.join("relay");
    crate::supervisor::relay::hand_over_dir(&dir, &user, args.group.unwrap_or(gid))
        .with_context(|| format!("cannot hand {} to the relay's user {user}", dir.display()))?;
    tracing::info!(dir = %dir.display(), relay = %user, "relay directory ready");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_user_is_numeric_and_never_root() {
        assert_eq!(numeric_user("65531:65532"), Ok((65531, 65532)));
        for bad in ["65531", "nobody:1", "1:x", "0:0", ""] {
            assert!(numeric_user(bad).is_err(), "{bad}");
        }
    }
}
