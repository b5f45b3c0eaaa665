//! `vncd run --libvirt URI`: the flags of the libvirt source and how it joins the
//! manifest source. Kept apart from `run.rs` so the run command only gains two lines.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tracing::{info, warn};

use crate::pool::PortRange;
use crate::source::Source;
use crate::source::libvirt::{LibvirtSource, qemu_conf};
use crate::source::merge::Merged;

#[derive(Debug, Clone, Args)]
pub struct LibvirtArgs {
    /// libvirt connection URI, e.g. qemu:///system: every running domain with VNC graphics
    /// gets a console, and manifests may name a domain (spec.target.libvirtDomain).
    #[arg(long = "libvirt", env = "VNCD_LIBVIRT", value_name = "URI")]
    pub libvirt_uri: Option<String>,
    /// libvirt's qemu.conf, read at start to warn when its VNC port ranges overlap the pool.
    #[arg(
        long,
        env = "VNCD_LIBVIRT_QEMU_CONF",
        default_value = "/etc/libvirt/qemu.conf"
    )]
    pub libvirt_qemu_conf: PathBuf,
    /// Seconds between two looks at libvirt's running domains.
    #[arg(long, env = "VNCD_LIBVIRT_POLL", value_name = "SECONDS", value_parser = super::serve::seconds, default_value = "0.25")]
    pub libvirt_poll: Duration,
}

impl LibvirtArgs {
    /// `inner` alone, or `inner` merged with libvirt's running domains; warns first if
    /// libvirt's own port ranges overlap the pool.
    pub async fn source<S: Source>(&self, inner: S, pool: PortRange) -> anyhow::Result<Merged<S>> {
        if self.libvirt_uri.is_some() {
            self.check_qemu_conf(pool);
        }
        self.source_unchecked(inner).await
    }

    /// As [`LibvirtArgs::source`], without the qemu.conf check (for `vncd cleanup`).
    pub async fn source_unchecked<S: Source>(&self, inner: S) -> anyhow::Result<Merged<S>> {
        let Some(uri) = &self.libvirt_uri else {
            return Ok(Merged::new(inner, None));
        };
        let poll = self.libvirt_poll;
        anyhow::ensure!(
            !poll.is_zero(),
            "--libvirt-poll 0 is not a positive number of seconds"
        );
        let source = LibvirtSource::start(uri, poll)?;
        if !source.first_answer(Duration::from_secs(5)).await {
            warn!(uri = %uri, "libvirt has not answered within 5 s; serving nothing until it does");
        }
        info!(uri = %uri, poll_ms = poll.as_millis() as u64, "serving consoles of running libvirt domains");
        Ok(Merged::new(inner, Some(source)))
    }

    /// Warns, with the exact fix, when libvirt may put QEMU's own ports inside the pool.
    fn check_qemu_conf(&self, pool: PortRange) {
        let path = &self.libvirt_qemu_conf;
        match qemu_conf::read(path) {
            Ok(ports) => {
                for w in qemu_conf::overlap_warnings(&ports, pool, path) {
                    warn!("{w}");
                }
            }
            Err(e) => warn!(
                path = %path.display(),
                error = %e,
                "cannot read libvirt's qemu.conf; cannot check its VNC port ranges against the pool"
            ),
        }
    }
}
