//! What /proc says about processes and sockets. Linux only, no unsafe code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The fields of /proc/PID/stat that identity and supervision need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub ppid: i32,
    pub pgid: i32,
    /// Clock ticks after boot at which the process started.
    pub start_time: u64,
}

impl Stat {
    /// Zombies and dead tasks have exited; only their pid entry remains.
    pub fn is_alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses /proc/PID/stat. The command name may contain spaces and parentheses, so
/// fields are counted from the last ')'.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state(3) ppid(4) pgrp(5) ... starttime(22); index = field - 3.
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgid: f.get(2)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
    })
}

pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The environment a process started with. Readable for our own user (or root).
pub fn environ(pid: i32) -> Option<BTreeMap<String, String>> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter_map(|kv| {
                let s = std::str::from_utf8(kv).ok()?;
                let (k, v) = s.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect(),
    )
}

/// Every pid in /proc.
pub fn pids() -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Inodes of the sockets a process has open.
pub fn socket_inodes(pid: i32) -> BTreeSet<u64> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    rd.filter_map(|e| {
        let link = std::fs::read_link(e.ok()?.path()).ok()?;
        let s = link.to_str()?;
        s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
    })
    .collect()
}

/// Listening TCP sockets (IPv4 and IPv6) by local port: port -> socket inodes.
pub fn listening_sockets() -> BTreeMap<u16, BTreeSet<u64>> {
    let mut out: BTreeMap<u16, BTreeSet<u64>> = BTreeMap::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(Path::new(file)) {
            for (port, inode) in parse_listeners(&text) {
                out.entry(port).or_default().insert(inode);
            }
        }
    }
    out
}

/// Parses the table format of /proc/net/tcp{,6}, keeping LISTEN (0A) rows.
pub fn parse_listeners(text: &str) -> Vec<(u16, u64)> {
    parse_rows(text, "0A")
}

/// (local port, inode) of every row in `state` (hex, as the kernel writes it).
fn parse_rows(text: &str, state: &str) -> Vec<(u16, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3)? != &state {
                return None;
            }
            let port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            let inode = f.get(9)?.parse().ok()?;
            Some((port, inode))
        })
        .collect()
}

/// Established connections by local port: how many clients each listening port serves.
/// Backend-agnostic, so idle timeouts work the same for websockify and `vncd proxy`.
pub fn established_by_port() -> BTreeMap<u16, usize> {
    let mut out = BTreeMap::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(file) {
            for (port, _) in parse_rows(&text, "01") {
                *out.entry(port).or_insert(0) += 1;
            }
        }
    }
    out
}

/// Milliseconds since boot.
pub fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |secs| (secs * 1000.0) as u64)
}

/// Clock ticks per second, for converting start times.
pub fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_even_with_parentheses_in_the_name() {
        let s = "1234 (we(ird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        let st = parse_stat(s).unwrap();
        assert_eq!(
            st,
            Stat {
                state: 'S',
                ppid: 1,
                pgid: 1234,
                start_time: 98765
            }
        );
        assert!(st.is_alive());
        assert!(
            !parse_stat("1 (x) Z 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 0 0 1 0 5 0 0")
                .unwrap()
                .is_alive()
        );
    }

    #[test]
    fn reads_our_own_process() {
        let me = i32::try_from(std::process::id()).unwrap();
        let st = stat(me).unwrap();
        assert!(st.is_alive());
        assert_eq!(st.start_time, stat(me).unwrap().start_time);
        assert!(environ(me).unwrap().contains_key("PATH") || std::env::var("PATH").is_err());
    }

    #[test]
    fn finds_a_listening_socket_and_its_owner() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let inodes = listening_sockets().remove(&port).expect("listener row");
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(!socket_inodes(me).is_disjoint(&inodes));
    }

    #[test]
    fn parses_listener_rows() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                 0: 0100007F:17D4 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1\n\
                 1: 0100007F:17D5 0100007F:9999 01 00000000:00000000 00:00000000 00000000     0        0 4243 1\n";
        assert_eq!(parse_listeners(t), vec![(6100, 4242)]);
        assert_eq!(parse_rows(t, "01"), vec![(6101, 4243)]);
    }
}
