//! Port probes.

use std::net::{IpAddr, TcpListener};

/// True if a listener could bind `addr:port` right now.
///
/// The probe binds the very address the proxy will listen on (with SO_REUSEADDR, as the
/// proxies do), so a listener on any overlapping local address is seen: binding 0.0.0.0
/// fails when someone holds 127.0.0.1 on that port, and the other way round.
pub fn can_bind(addr: IpAddr, port: u16) -> bool {
    TcpListener::bind((addr, port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_port_cannot_be_bound_and_a_released_one_can() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(!can_bind("127.0.0.1".parse().unwrap(), port));
        assert!(
            !can_bind("0.0.0.0".parse().unwrap(), port),
            "wildcard overlaps loopback"
        );
        drop(l);
        assert!(can_bind("127.0.0.1".parse().unwrap(), port));
    }
}
