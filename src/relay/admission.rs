//! Fair admission before authentication.
//!
//! Every accepted connection is *pending* until it passes its ticket check. Pending
//! connections cost a socket and a little memory each, and anyone who can reach a port
//! can open them, so they are capped:
//! - per source (an IPv4 address, or an IPv6 /64, which one host usually holds whole):
//!   past [`Config::per_source`], more from that source are refused at once;
//! - over the whole relay: at [`Config::global`], a new connection evicts the oldest
//!   pending connection of the source that holds the most, so a flood from a few sources
//!   evicts itself and not the one real client on an address of its own;
//! - a connection younger than [`Config::protect`] is never evicted, so a real client
//!   has that long to send its upgrade even while a flood comes from many sources;
//! - when every pending connection is protected, a newcomer whose source holds less than
//!   its fair share (`global / sources`) is still admitted, up to `2 * global` in all, so
//!   a flood that fills the cap within the protection window does not lock out a client
//!   on an address of its own.
//!
//! Authenticated connections are not counted here (`max_connections` per session counts
//! them). This module is pure: the time is a parameter, nothing sleeps or locks.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How long a new pending connection cannot be evicted.
pub const PROTECT: Duration = Duration::from_millis(1500);

/// The caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub per_source: usize,
    pub global: usize,
    pub protect: Duration,
}

/// Where a connection comes from, as admission groups it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    V4([u8; 4]),
    /// The first 64 bits of the address.
    V6Net([u8; 8]),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let mut net = [0u8; 8];
                    net.copy_from_slice(&v6.octets()[..8]);
                    Source::V6Net(net)
                }
            },
        }
    }
}

/// A pending connection's number.
pub type Id = u64;

/// The answer to a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Admitted as `id`; `evict`, if any, must be closed now to make room.
    Admit {
        id: Id,
        evict: Option<Id>,
    },
    Refuse(Refused),
}

/// Why a new connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its source holds [`Config::per_source`] pending connections already.
    SourceFull,
    /// The relay holds [`Config::global`] pending connections, all of them protected, and
    /// this source holds its fair share already (or the relay holds `2 * global`).
    AllProtected,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::SourceFull => "too many pending connections from this source",
            Refused::AllProtected => "too many pending connections",
        }
    }
}

/// The pending connections.
#[derive(Debug)]
pub struct Admission {
    config: Config,
    next: Id,
    /// Per source, its pending connections by id (oldest first) with their arrival.
    by_source: HashMap<Source, BTreeMap<Id, Instant>>,
    source_of: HashMap<Id, Source>,
}

impl Admission {
    pub fn new(config: Config) -> Self {
        Admission {
            config: Config {
                per_source: config.per_source.max(1),
                global: config.global.max(1),
                ..config
            },
            next: 0,
            by_source: HashMap::new(),
            source_of: HashMap::new(),
        }
    }

    /// Pending connections now.
    pub fn pending(&self) -> usize {
        self.source_of.len()
    }

    /// Pending connections from `source` now.
    pub fn pending_from(&self, source: Source) -> usize {
        self.by_source.get(&source).map_or(0, BTreeMap::len)
    }

    /// A new connection from `source` at `now`.
    pub fn admit(&mut self, source: Source, now: Instant) -> Decision {
        if self.pending_from(source) >= self.config.per_source {
            return Decision::Refuse(Refused::SourceFull);
        }
        let mut evict = None;
        if self.pending() >= self.config.global {
            match self.victim(now) {
                Some(id) => {
                    self.leave(id);
                    evict = Some(id);
                }
                None => {
                    let sources =
                        self.by_source.len() + usize::from(!self.by_source.contains_key(&source));
                    let fair = self.config.global / sources.max(1);
                    let overshoot_ok =
                        self.pending() < 2 * self.config.global && self.pending_from(source) < fair;
                    if !overshoot_ok {
                        return Decision::Refuse(Refused::AllProtected);
                    }
                }
            }
        }
        self.next += 1;
        let id = self.next;
        self.by_source.entry(source).or_default().insert(id, now);
        self.source_of.insert(id, source);
        Decision::Admit { id, evict }
    }

    /// The oldest evictable connection of the source holding the most pending ones (of
    /// the sources that have an evictable one); ties go to the older connection.
    fn victim(&self, now: Instant) -> Option<Id> {
        self.by_source
            .values()
            .filter_map(|conns| {
                let (&id, &since) = conns.first_key_value()?;
                (now.saturating_duration_since(since) >= self.config.protect)
                    .then_some((conns.len(), std::cmp::Reverse(id)))
            })
            .max()
            .map(|(_, std::cmp::Reverse(id))| id)
    }

    /// Connection `id` is no longer pending (authenticated, closed or evicted). `true` if
    /// it was pending: `false` means it was evicted before.
    pub fn leave(&mut self, id: Id) -> bool {
        let Some(source) = self.source_of.remove(&id) else {
            return false;
        };
        if let Some(conns) = self.by_source.get_mut(&source) {
            conns.remove(&id);
            if conns.is_empty() {
                self.by_source.remove(&source);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv6Addr;

    fn cfg(per_source: usize, global: usize) -> Config {
        Config {
            per_source,
            global,
            protect: PROTECT,
        }
    }

    fn v4(n: u8) -> Source {
        Source::V4([127, 0, 0, n])
    }

    #[test]
    fn sources_group_ipv4_per_address_and_ipv6_per_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::from(a), Source::from(b));
        assert_ne!(Source::from(a), Source::from(c));
        let mapped = IpAddr::V6(Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0x7f00, 2]));
        assert_eq!(Source::from(mapped), v4(2));
        assert_ne!(Source::from("127.0.0.1".parse::<IpAddr>().unwrap()), v4(2));
    }

    #[test]
    fn per_source_cap_refuses_and_leaving_makes_room() {
        let mut a = Admission::new(cfg(2, 100));
        let t = Instant::now();
        let Decision::Admit { id: first, .. } = a.admit(v4(1), t) else {
            panic!()
        };
        assert!(matches!(
            a.admit(v4(1), t),
            Decision::Admit { evict: None, .. }
        ));
        assert_eq!(a.admit(v4(1), t), Decision::Refuse(Refused::SourceFull));
        assert!(matches!(a.admit(v4(2), t), Decision::Admit { .. }));
        assert!(a.leave(first));
        assert!(!a.leave(first), "leaving twice");
        assert!(matches!(a.admit(v4(1), t), Decision::Admit { .. }));
        assert_eq!(a.pending(), 3);
    }

    #[test]
    fn at_the_global_cap_the_biggest_source_loses_its_oldest_unprotected() {
        let mut a = Admission::new(cfg(10, 4));
        let t0 = Instant::now();
        let Decision::Admit { id: real, .. } = a.admit(v4(9), t0) else {
            panic!()
        };
        let mut flood = Vec::new();
        for _ in 0..3 {
            let Decision::Admit { id, .. } = a.admit(v4(1), t0) else {
                panic!()
            };
            flood.push(id);
        }
        // Full, everyone protected: the flood's source (over its fair share) is refused,
        // a newcomer on an address of its own still gets in, over the cap.
        let soon = t0 + Duration::from_millis(100);
        assert_eq!(
            a.admit(v4(1), soon),
            Decision::Refuse(Refused::AllProtected)
        );
        assert_eq!(a.admit(v4(2), soon), Decision::Admit { id: 5, evict: None });
        assert_eq!(a.pending(), 5);
        // Later: the flood's oldest goes, never the real client (it holds one).
        let later = t0 + Duration::from_secs(2);
        assert_eq!(
            a.admit(v4(3), later),
            Decision::Admit {
                id: 6,
                evict: Some(flood[0])
            }
        );
        assert!(!a.leave(flood[0]), "an evicted connection is gone already");
        assert_eq!(a.pending_from(v4(1)), 2);
        assert!(a.leave(real), "the real client is still pending");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Connect { source: u8, after_ms: u64 },
        Leave { nth: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..10, 0u64..400).prop_map(|(source, after_ms)| Op::Connect { source, after_ms }),
            1 => (0usize..64).prop_map(|nth| Op::Leave { nth }),
        ]
    }

    proptest! {
        /// Whatever arrives: the caps hold; a victim was never younger than PROTECT; it
        /// came from a source holding at least as many pending connections as any other
        /// source with an evictable one; a lone connection of its own source is evicted
        /// only when no source holds two.
        #[test]
        fn caps_protection_and_fairness_hold(ops in proptest::collection::vec(op(), 1..300)) {
            let mut a = Admission::new(cfg(6, 20));
            let mut now = Instant::now();
            let mut open: Vec<(Id, Source, Instant)> = Vec::new();
            for op in ops {
                match op {
                    Op::Connect { source, after_ms } => {
                        now += Duration::from_millis(after_ms);
                        let src = v4(source);
                        // The counts before, of sources with an evictable connection.
                        let evictable: BTreeMap<Source, usize> = open
                            .iter()
                            .filter(|(_, _, t)| now.duration_since(*t) >= PROTECT)
                            .map(|(_, s, _)| (*s, a.pending_from(*s)))
                            .collect();
                        match a.admit(src, now) {
                            Decision::Admit { id, evict } => {
                                if let Some(victim) = evict {
                                    let i = open.iter().position(|(x, _, _)| *x == victim).unwrap();
                                    let (_, vs, vt) = open.remove(i);
                                    prop_assert!(now.duration_since(vt) >= PROTECT);
                                    let most = evictable.values().max().copied().unwrap_or(0);
                                    prop_assert_eq!(evictable[&vs], most);
                                    if most == 1 {
                                        prop_assert!(evictable.values().all(|&n| n == 1));
                                    }
                                }
                                open.push((id, src, now));
                            }
                            Decision::Refuse(Refused::SourceFull) => {
                                prop_assert_eq!(a.pending_from(src), 6);
                            }
                            Decision::Refuse(Refused::AllProtected) => {
                                prop_assert!(a.pending() >= 20);
                                prop_assert!(evictable.is_empty());
                            }
                        }
                    }
                    Op::Leave { nth } => {
                        if !open.is_empty() {
                            let (id, _, _) = open.remove(nth % open.len());
                            prop_assert!(a.leave(id));
                        }
                    }
                }
                prop_assert!(a.pending() <= 40, "never over twice the cap");
                prop_assert_eq!(a.pending(), open.len());
                for s in 0..10 {
                    prop_assert!(a.pending_from(v4(s)) <= 6);
                }
            }
        }
    }
}
