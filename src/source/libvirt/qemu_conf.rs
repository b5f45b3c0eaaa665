//! libvirt's own port ranges (qemu.conf) against vncd's pool.
//!
//! libvirt gives every VM with `autoport='yes'` a VNC/SPICE port from
//! `remote_display_port_min..=remote_display_port_max` (default 5900-65535) and a VNC
//! websocket port from `remote_websocket_port_min..=max` (default 5700-65535). With the
//! defaults, after about 200 running VMs QEMU's own ports reach 6100 and land inside
//! vncd's default pool. vncd never leases a port a running domain holds, but a VM that
//! starts while a proxy is down can still take that proxy's port; the fix is to keep the
//! ranges apart, and vncd says exactly how at start.

use std::path::Path;

use crate::pool::PortRange;

/// The port ranges libvirt's QEMU driver hands out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QemuPorts {
    pub display: (u16, u16),
    pub websocket: (u16, u16),
}

impl Default for QemuPorts {
    /// libvirt's built-in defaults when qemu.conf does not set them.
    fn default() -> Self {
        QemuPorts {
            display: (5900, 65535),
            websocket: (5700, 65535),
        }
    }
}

/// Reads the four port settings from qemu.conf text; anything else is ignored, and a
/// setting that is absent or not a port keeps libvirt's default.
pub fn parse(text: &str) -> QemuPorts {
    let mut p = QemuPorts::default();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<u16>() else {
            continue;
        };
        match key.trim() {
            "remote_display_port_min" => p.display.0 = value,
            "remote_display_port_max" => p.display.1 = value,
            "remote_websocket_port_min" => p.websocket.0 = value,
            "remote_websocket_port_max" => p.websocket.1 = value,
            _ => {}
        }
    }
    p
}

/// Reads `path`; a missing file means libvirt's defaults (which overlap the default pool).
pub fn read(path: &Path) -> std::io::Result<QemuPorts> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(parse(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(QemuPorts::default()),
        Err(e) => Err(e),
    }
}

/// One sentence per libvirt range that overlaps `pool`, each with the exact fix.
pub fn overlap_warnings(ports: &QemuPorts, pool: PortRange, path: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for (what, key, (min, max)) in [
        ("VNC/SPICE", "remote_display_port", ports.display),
        ("VNC websocket", "remote_websocket_port", ports.websocket),
    ] {
        if max < pool.start() || min > pool.end() || min > max {
            continue;
        }
        let fix = if min < pool.start() {
            format!("set {key}_max = {} in {}", pool.start() - 1, path.display())
        } else if pool.end() < u16::MAX && max > pool.end() {
            format!("set {key}_min = {} in {}", pool.end() + 1, path.display())
        } else {
            format!(
                "move {key}_min/{key}_max in {} outside {pool}, or pass a --port-range outside {min}-{max}",
                path.display()
            )
        };
        out.push(format!(
            "libvirt gives VMs {what} ports {min}-{max} ({key}_min/max), which overlaps vncd's port pool {pool}: \
             QEMU's own ports can land inside the pool. Fix: {fix}, then restart libvirtd. \
             Until then vncd never leases a port a running domain uses, and moves a session whose port a VM took."
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_settings_and_keeps_defaults_for_the_rest() {
        let text = "# remote_display_port_min = 1\n\
                    remote_display_port_min = 5900\n\
                    remote_display_port_max = 6099   # keep clear of vncd\n\
                    vnc_listen = \"0.0.0.0\"\n\
                    remote_websocket_port_min=bogus\n";
        let p = parse(text);
        assert_eq!(p.display, (5900, 6099));
        assert_eq!(p.websocket, (5700, 65535));
        assert_eq!(parse(""), QemuPorts::default());
    }

    #[test]
    fn libvirt_defaults_overlap_the_default_pool_and_the_fix_is_exact() {
        let w = overlap_warnings(
            &QemuPorts::default(),
            PortRange::default(),
            Path::new("/etc/libvirt/qemu.conf"),
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("set remote_display_port_max = 6099 in /etc/libvirt/qemu.conf"),
            "{}",
            w[0]
        );
        assert!(
            w[0].contains("5900-65535") && w[0].contains("6100-6999"),
            "{}",
            w[0]
        );
        assert!(
            w[1].contains("set remote_websocket_port_max = 6099"),
            "{}",
            w[1]
        );
    }

    #[test]
    fn ranges_kept_apart_give_no_warning() {
        let p = QemuPorts {
            display: (5900, 6099),
            websocket: (7000, 7999),
        };
        assert!(overlap_warnings(&p, PortRange::default(), Path::new("q")).is_empty());
    }

    #[test]
    fn a_range_starting_inside_the_pool_is_told_to_start_above_it() {
        let p = QemuPorts {
            display: (6500, 65535),
            websocket: (5700, 5899),
        };
        let w = overlap_warnings(&p, PortRange::default(), Path::new("q"));
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("set remote_display_port_min = 7000 in q"),
            "{}",
            w[0]
        );
    }

    #[test]
    fn a_missing_file_means_the_defaults() {
        assert_eq!(
            read(Path::new("/nonexistent/qemu.conf")).unwrap(),
            QemuPorts::default()
        );
    }
}
