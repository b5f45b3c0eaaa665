//! `vncd run --libvirt URI`: the flags of the libvirt source and how it joins the
//! manifest source. Kept apart from `run.rs` so the run command only gains two lines.
//!
//! The flags exist in every build, so a build without the `libvirt` cargo feature can
//! refuse them by name ([`LibvirtArgs::check_built_in`]) instead of clap's "unexpected
//! argument", which would not say how to get a build that has them.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tracing::{info, warn};

use crate::pool::PortRange;
use crate::source::Source;
use crate::source::libvirt::{self, LibvirtSource, qemu_conf};
use crate::source::merge::Merged;

#[derive(Debug, Clone, Args)]
pub struct LibvirtArgs {
    /// libvirt connection URI, e.g. qemu:///system: every running domain with VNC graphics
    /// gets a console, and manifests may name a domain (spec.target.libvirtDomain).
    #[arg(long = "libvirt", env = "VNCD_LIBVIRT", value_name = "URI")]
    pub libvirt_uri: Option<String>,
    /// libvirt's qemu.conf, read at start to warn when its VNC port ranges overlap the pool
    /// [default: /etc/libvirt/qemu.conf].
    #[arg(long, env = "VNCD_LIBVIRT_QEMU_CONF", value_name = "FILE")]
    pub libvirt_qemu_conf: Option<PathBuf>,
    /// Seconds between two looks at libvirt's running domains [default: 0.25].
    #[arg(long, env = "VNCD_LIBVIRT_POLL", value_name = "SECONDS", value_parser = super::serve::seconds)]
    pub libvirt_poll: Option<Duration>,
}

/// `--libvirt-qemu-conf` when not given.
const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";
/// `--libvirt-poll` when not given.
const POLL: Duration = Duration::from_millis(250);

/// A libvirt flag given to a build without the `libvirt` feature.
#[derive(Debug, thiserror::Error)]
#[error("{flag} needs libvirt support: {}", libvirt::NOT_BUILT_IN)]
pub struct NotBuiltIn {
    /// The flag, as given (`--libvirt qemu:///system`).
    pub flag: String,
}

impl LibvirtArgs {
    /// Fails, naming the flag and how to get a build with libvirt, when this build has no
    /// libvirt support and any libvirt flag (or its `VNCD_*` variable) was given.
    pub fn check_built_in(&self) -> Result<(), NotBuiltIn> {
        if libvirt::BUILT_IN {
            return Ok(());
        }
        let given = [
            self.libvirt_uri.as_ref().map(|u| format!("--libvirt {u}")),
            self.libvirt_qemu_conf
                .as_ref()
                .map(|p| format!("--libvirt-qemu-conf {}", p.display())),
            self.libvirt_poll
                .map(|d| format!("--libvirt-poll {}", d.as_secs_f64())),
        ];
        match given.into_iter().flatten().next() {
            Some(flag) => Err(NotBuiltIn { flag }),
            None => Ok(()),
        }
    }

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
        self.check_built_in()?;
        let Some(uri) = &self.libvirt_uri else {
            return Ok(Merged::new(inner, None));
        };
        let poll = self.libvirt_poll.unwrap_or(POLL);
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
        let path = self
            .libvirt_qemu_conf
            .clone()
            .unwrap_or_else(|| PathBuf::from(QEMU_CONF));
        let path = &path;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(uri: Option<&str>, poll: Option<u64>) -> LibvirtArgs {
        LibvirtArgs {
            libvirt_uri: uri.map(str::to_owned),
            libvirt_qemu_conf: None,
            libvirt_poll: poll.map(Duration::from_millis),
        }
    }

    #[test]
    fn without_the_feature_every_libvirt_flag_says_how_to_get_it() {
        assert!(args(None, None).check_built_in().is_ok());
        let uri = args(Some("qemu:///system"), None).check_built_in();
        let poll = args(None, Some(500)).check_built_in();
        if libvirt::BUILT_IN {
            assert!(uri.is_ok() && poll.is_ok());
            return;
        }
        let e = uri.expect_err("no libvirt in this build").to_string();
        assert!(
            e.starts_with("--libvirt qemu:///system needs libvirt support"),
            "{e}"
        );
        assert!(e.contains("--features libvirt"), "{e}");
        assert!(e.contains("scripts/build-deb"), "{e}");
        let e = poll.expect_err("no libvirt in this build").to_string();
        assert!(e.starts_with("--libvirt-poll 0.5 needs"), "{e}");
    }
}
