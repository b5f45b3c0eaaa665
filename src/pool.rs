//! The port pool: which websocket ports may be leased, and which one to lease next.
//!
//! No I/O happens here. Whether a port can really be bound is found out by the controller
//! and passed in as "busy" ports, so the choice stays a pure, testable function.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// An inclusive range of TCP ports, written `START-END`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    start: u16,
    end: u16,
}

/// Why a `--port-range` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortRangeError {
    #[error("port range {0:?} must look like START-END, e.g. 6100-6999")]
    Syntax(String),
    #[error("port range {0:?}: {1:?} is not a port number (1-65535)")]
    Number(String, String),
    #[error("port range {0:?}: start is above end")]
    Reversed(String),
}

impl PortRange {
    /// Builds a range; `None` if `start > end` or `start` is 0.
    pub fn new(start: u16, end: u16) -> Option<Self> {
        (start != 0 && start <= end).then_some(Self { start, end })
    }

    pub fn start(&self) -> u16 {
        self.start
    }

    pub fn end(&self) -> u16 {
        self.end
    }

    /// How many ports the range holds.
    pub fn len(&self) -> usize {
        usize::from(self.end - self.start) + 1
    }

    /// Always false: a range holds at least one port. Present for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

    /// The size of the low "static" band that automatic allocation uses last.
    ///
    /// Borrowed from Kubernetes' NodePort allocator (KEP-3668): ports that users request
    /// explicitly should rarely collide with ports handed out automatically, so automatic
    /// allocation fills the upper band first.
    pub fn static_band(&self) -> usize {
        (self.len() / 32).clamp(16, 128).min(self.len())
    }
}

impl Default for PortRange {
    fn default() -> Self {
        Self {
            start: 6100,
            end: 6999,
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| PortRangeError::Syntax(s.to_owned()))?;
        let num = |x: &str| {
            x.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| PortRangeError::Number(s.to_owned(), x.to_owned()))
        };
        let (start, end) = (num(a)?, num(b)?);
        PortRange::new(start, end).ok_or_else(|| PortRangeError::Reversed(s.to_owned()))
    }
}

/// A view of the pool for one planning pass: the range and the ports that are not free.
#[derive(Debug)]
pub struct Pool {
    range: PortRange,
    taken: BTreeSet<u16>,
}

impl Pool {
    /// `taken` holds every port that must not be handed out: leased, busy or reserved.
    pub fn new(range: PortRange, taken: BTreeSet<u16>) -> Self {
        Self { range, taken }
    }

    /// Marks a port as taken for the rest of this pass.
    pub fn take(&mut self, port: u16) {
        self.taken.insert(port);
    }

    pub fn is_free(&self, port: u16) -> bool {
        self.range.contains(port) && !self.taken.contains(&port)
    }

    /// Picks the port for an automatic allocation: the lowest free port above the static
    /// band, else the lowest free port in it.
    pub fn pick(&self) -> Option<u16> {
        let band_end = self.range.start() as usize + self.range.static_band();
        let dynamic = (band_end..=self.range.end() as usize).filter_map(|p| u16::try_from(p).ok());
        let statik = (self.range.start() as usize..band_end).filter_map(|p| u16::try_from(p).ok());
        dynamic.chain(statik).find(|p| !self.taken.contains(p))
    }

    /// Ports in the range that are not taken.
    pub fn free_count(&self) -> usize {
        self.range.len()
            - self
                .taken
                .iter()
                .filter(|p| self.range.contains(**p))
                .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_names_bad_ones() {
        assert_eq!("6100-6999".parse::<PortRange>().unwrap().len(), 900);
        assert_eq!("7000-7000".parse::<PortRange>().unwrap().len(), 1);
        assert!(matches!(
            "6999-6100".parse::<PortRange>(),
            Err(PortRangeError::Reversed(_))
        ));
        assert!(matches!(
            "6100".parse::<PortRange>(),
            Err(PortRangeError::Syntax(_))
        ));
        assert!(matches!(
            "0-10".parse::<PortRange>(),
            Err(PortRangeError::Number(..))
        ));
        assert!(matches!(
            "1-70000".parse::<PortRange>(),
            Err(PortRangeError::Number(..))
        ));
        let msg = "1-x".parse::<PortRange>().unwrap_err().to_string();
        assert!(msg.contains("\"x\""), "{msg}");
    }

    #[test]
    fn automatic_allocation_fills_the_dynamic_band_first() {
        let r: PortRange = "6100-6999".parse().unwrap();
        assert_eq!(r.static_band(), 28);
        let pool = Pool::new(r, BTreeSet::new());
        assert_eq!(pool.pick(), Some(6128));
    }

    #[test]
    fn falls_back_to_the_static_band_when_the_dynamic_band_is_full() {
        let r: PortRange = "6100-6199".parse().unwrap();
        let band = r.static_band() as u16;
        let taken: BTreeSet<u16> = (6100 + band..=6199).collect();
        let pool = Pool::new(r, taken);
        assert_eq!(pool.pick(), Some(6100));
    }

    #[test]
    fn small_ranges_are_all_static_and_allocate_lowest_first() {
        let r: PortRange = "6100-6102".parse().unwrap();
        let mut pool = Pool::new(r, BTreeSet::from([6100]));
        assert_eq!(pool.pick(), Some(6101));
        pool.take(6101);
        pool.take(6102);
        assert_eq!(pool.pick(), None);
        assert_eq!(pool.free_count(), 0);
    }

    #[test]
    fn ports_outside_the_range_do_not_count_as_taken() {
        let r: PortRange = "6100-6101".parse().unwrap();
        let pool = Pool::new(r, BTreeSet::from([80, 6100]));
        assert_eq!(pool.free_count(), 1);
        assert!(!pool.is_free(80));
    }
}
