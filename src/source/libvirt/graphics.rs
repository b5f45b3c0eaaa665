//! Reading a domain's console from its live XML.
//!
//! Only the live XML (`virsh dumpxml` of a running domain) holds the truth: with
//! `autoport='yes'` the inactive XML says `port='-1'`, and QEMU picks the port at start.
//! Everything here is pure text → value, so each case of libvirt's `<graphics>` element
//! is unit-tested.

use std::collections::BTreeSet;

use crate::session::Endpoint;

/// Where a running domain's VNC server can be reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Console {
    pub endpoint: Endpoint,
}

/// Why a running domain has no usable VNC console. Messages name the domain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GraphicsError {
    #[error("domain {domain:?} has no VNC graphics device")]
    NoVnc { domain: String },
    #[error("domain {domain:?} has VNC listen type 'none': QEMU serves no console to connect to")]
    ListenNone { domain: String },
    #[error("domain {domain:?} has no VNC port yet (live XML says port {port:?})")]
    NoPort { domain: String, port: String },
    #[error("domain {domain:?}: live XML is not readable: {detail}")]
    Xml { domain: String, detail: String },
}

impl GraphicsError {
    /// True if a later look may succeed (the domain is still starting).
    pub fn is_transient(&self) -> bool {
        matches!(self, GraphicsError::NoPort { .. })
    }
}

/// What vncd needs from one running domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainGraphics {
    /// Its VNC console, or why it has none usable.
    pub console: Result<Console, GraphicsError>,
    /// Every TCP port its own graphics servers hold (VNC, VNC websocket, SPICE, SPICE
    /// TLS). libvirt hands these out from `remote_display_port_min..max`, which may
    /// overlap vncd's pool, so vncd must never lease them.
    pub ports: BTreeSet<u16>,
    /// The domain's `<uuid>`: which VM this is, beyond its name. A domain destroyed and
    /// defined again under the same name is another VM with another UUID, and its
    /// session gets a new lease (see [`crate::session::Desired::instance`]).
    pub uuid: Option<String>,
}

/// Reads the console and graphics ports of `domain` from its live XML.
pub fn parse(domain: &str, xml: &str) -> DomainGraphics {
    let doc = match roxmltree::Document::parse(xml) {
        Ok(d) => d,
        Err(e) => {
            return DomainGraphics {
                console: Err(GraphicsError::Xml {
                    domain: domain.to_owned(),
                    detail: e.to_string(),
                }),
                ports: BTreeSet::new(),
                uuid: None,
            };
        }
    };
    let uuid = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("uuid"))
        .and_then(|n| n.text())
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty());
    let graphics: Vec<_> = doc
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|d| d.children().filter(|n| n.has_tag_name("graphics")))
        .collect();
    let mut ports = BTreeSet::new();
    for g in &graphics {
        for attr in ["port", "tlsPort", "websocket"] {
            if let Some(p) = g.attribute(attr).and_then(|v| v.parse::<u16>().ok())
                && p != 0
            {
                ports.insert(p);
            }
        }
    }
    let console = match graphics.iter().find(|g| g.attribute("type") == Some("vnc")) {
        None => Err(GraphicsError::NoVnc {
            domain: domain.to_owned(),
        }),
        Some(g) => vnc_console(domain, *g),
    };
    DomainGraphics {
        console,
        ports,
        uuid,
    }
}

fn vnc_console(domain: &str, g: roxmltree::Node<'_, '_>) -> Result<Console, GraphicsError> {
    let listen = g.children().find(|n| n.has_tag_name("listen"));
    let listen_type = listen.and_then(|l| l.attribute("type"));
    if listen_type == Some("none") {
        return Err(GraphicsError::ListenNone {
            domain: domain.to_owned(),
        });
    }
    // A unix socket: `<graphics socket=...>` or `<listen type='socket' socket=...>`.
    let socket = listen
        .filter(|_| listen_type == Some("socket"))
        .and_then(|l| l.attribute("socket"))
        .or_else(|| g.attribute("socket"));
    if let Some(path) = socket {
        return Ok(Console {
            endpoint: Endpoint::Unix {
                path: path.to_owned(),
            },
        });
    }
    let raw_port = g.attribute("port").unwrap_or("");
    let port = raw_port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| GraphicsError::NoPort {
            domain: domain.to_owned(),
            port: raw_port.to_owned(),
        })?;
    // type='address' or type='network' carry the resolved address in the live XML.
    let address = listen
        .and_then(|l| l.attribute("address"))
        .or_else(|| g.attribute("listen"))
        .filter(|a| !a.is_empty());
    Ok(Console {
        endpoint: Endpoint::Tcp {
            host: connect_host(address),
            port,
        },
    })
}

/// The address to connect to for a listen address. vncd runs on the hypervisor host, so
/// a wildcard listen is reached on loopback, and no listen at all means libvirt's default
/// `vnc_listen` (127.0.0.1).
fn connect_host(listen: Option<&str>) -> String {
    match listen {
        None | Some("0.0.0.0") => "127.0.0.1".into(),
        Some("::") | Some("[::]") => "::1".into(),
        Some(a) => a.trim_start_matches('[').trim_end_matches(']').to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dom(devices: &str) -> String {
        format!(
            "<domain type='qemu' id='3'><name>vm</name><devices>{devices}<video/></devices></domain>"
        )
    }

    fn tcp(host: &str, port: u16) -> Result<Console, GraphicsError> {
        Ok(Console {
            endpoint: Endpoint::Tcp {
                host: host.into(),
                port,
            },
        })
    }

    #[test]
    fn autoport_on_loopback_as_libvirt_writes_it() {
        let g = parse(
            "vm",
            &dom(
                "<graphics type='vnc' port='5901' autoport='yes' listen='127.0.0.1'>\
                 <listen type='address' address='127.0.0.1'/></graphics>",
            ),
        );
        assert_eq!(g.console, tcp("127.0.0.1", 5901));
        assert_eq!(g.ports, BTreeSet::from([5901]));
    }

    #[test]
    fn wildcard_and_missing_listen_addresses_connect_on_loopback() {
        let g = parse(
            "vm",
            &dom("<graphics type='vnc' port='5902' listen='0.0.0.0'/>"),
        );
        assert_eq!(g.console, tcp("127.0.0.1", 5902));
        let g = parse("vm", &dom("<graphics type='vnc' port='5903'/>"));
        assert_eq!(g.console, tcp("127.0.0.1", 5903));
        let g = parse("vm", &dom("<graphics type='vnc' port='5904' listen='::'/>"));
        assert_eq!(g.console, tcp("::1", 5904));
        let g = parse(
            "vm",
            &dom(
                "<graphics type='vnc' port='5905'><listen type='address' address='127.0.0.2'/></graphics>",
            ),
        );
        assert_eq!(g.console, tcp("127.0.0.2", 5905));
    }

    #[test]
    fn a_network_listen_uses_the_address_libvirt_resolved() {
        let g = parse(
            "vm",
            &dom(
                "<graphics type='vnc' port='5906' autoport='yes' listen='192.0.2.1'>\
                 <listen type='network' address='192.0.2.1' network='default'/></graphics>",
            ),
        );
        assert_eq!(g.console, tcp("192.0.2.1", 5906));
    }

    #[test]
    fn a_unix_socket_listen() {
        let want = Ok(Console {
            endpoint: Endpoint::Unix {
                path: "/var/lib/libvirt/qemu/domain-3-vm/vnc.sock".into(),
            },
        });
        let g = parse(
            "vm",
            &dom(
                "<graphics type='vnc' socket='/var/lib/libvirt/qemu/domain-3-vm/vnc.sock'>\
                 <listen type='socket' socket='/var/lib/libvirt/qemu/domain-3-vm/vnc.sock'/></graphics>",
            ),
        );
        assert_eq!(g.console, want);
        assert!(g.ports.is_empty());
        let g = parse(
            "vm",
            &dom("<graphics type='vnc' socket='/var/lib/libvirt/qemu/domain-3-vm/vnc.sock'/>"),
        );
        assert_eq!(g.console, want);
    }

    #[test]
    fn unusable_consoles_say_why_and_name_the_domain() {
        let g = parse(
            "web",
            &dom("<graphics type='vnc'><listen type='none'/></graphics>"),
        );
        let err = g.console.unwrap_err();
        assert!(matches!(err, GraphicsError::ListenNone { .. }));
        assert!(err.to_string().contains("\"web\""), "{err}");
        let g = parse(
            "web",
            &dom("<graphics type='vnc' port='-1' autoport='yes'/>"),
        );
        let err = g.console.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("-1"), "{err}");
        let g = parse(
            "web",
            &dom("<graphics type='spice' port='5910' tlsPort='5911'/>"),
        );
        assert!(matches!(g.console, Err(GraphicsError::NoVnc { .. })));
        let g = parse("web", "<domain><devices>");
        assert!(matches!(g.console, Err(GraphicsError::Xml { .. })));
        let g = parse("web", &dom(""));
        assert!(matches!(g.console, Err(GraphicsError::NoVnc { .. })));
    }

    #[test]
    fn every_graphics_port_is_reported_so_it_is_never_leased() {
        let g = parse(
            "vm",
            &dom(
                "<graphics type='spice' port='6101' tlsPort='6102' autoport='yes'/>\
                 <graphics type='vnc' port='6103' websocket='6104' listen='127.0.0.1'/>",
            ),
        );
        assert_eq!(g.console, tcp("127.0.0.1", 6103));
        assert_eq!(g.ports, BTreeSet::from([6101, 6102, 6103, 6104]));
    }

    #[test]
    fn the_first_vnc_device_is_the_console() {
        let g = parse(
            "vm",
            &dom("<graphics type='vnc' port='5901'/><graphics type='vnc' port='5902'/>"),
        );
        assert_eq!(g.console, tcp("127.0.0.1", 5901));
    }
}
