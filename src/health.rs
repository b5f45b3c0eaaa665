//! Readiness shared by the controller, the status sinks and the HTTP endpoints.
//!
//! A neutral module so that the controller (shared by every mode) and the Kubernetes
//! status sink need not import each other, or the HTTP server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Set once a full pass has been published; `/readyz` answers 200 from then on.
#[derive(Clone, Debug, Default)]
pub struct Synced(Arc<AtomicBool>);

impl Synced {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Liveness of the controller loop: when it last completed a pass. Cheap to clone;
/// clones share the clock.
#[derive(Clone, Debug, Default)]
pub struct PassClock(Arc<Passes>);

#[derive(Debug)]
struct Passes {
    base: Instant,
    /// Milliseconds after `base` of the last completed pass, plus one; 0 = none yet.
    last: AtomicU64,
    /// Longest time without a completed pass before /healthz fails, in milliseconds.
    limit_ms: AtomicU64,
}

impl Default for Passes {
    fn default() -> Self {
        Passes {
            base: Instant::now(),
            last: AtomicU64::new(0),
            limit_ms: AtomicU64::new(ms(DEFAULT_STALE_AFTER)),
        }
    }
}

/// How long /healthz tolerates no completed pass when no resync interval was given.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(60);
/// Passes (resync intervals) that may be missed before /healthz fails.
const MISSED_PASSES: u32 = 5;
/// The least staleness limit: a slow pass over hundreds of sessions is not a hang.
const MIN_STALE_AFTER: Duration = Duration::from_secs(30);

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl PassClock {
    /// A pass completed (observe, plan, persist, act, report).
    pub fn completed(&self) {
        let p = &self.0;
        let now = ms(p.base.elapsed()).saturating_add(1);
        p.last.store(now, Ordering::Relaxed);
    }

    /// Passes come at least every `resync`: stale after `5 * resync`, at least 30 s.
    pub fn expect_every(&self, resync: Duration) {
        let limit = (resync * MISSED_PASSES).max(MIN_STALE_AFTER);
        self.0.limit_ms.store(ms(limit), Ordering::Relaxed);
    }

    /// The longest time without a completed pass before liveness fails.
    pub fn limit(&self) -> Duration {
        Duration::from_millis(self.0.limit_ms.load(Ordering::Relaxed))
    }

    /// Sets that limit directly (tests; real use derives it from the resync interval).
    #[cfg(test)]
    pub(crate) fn set_limit(&self, limit: Duration) {
        self.0.limit_ms.store(ms(limit), Ordering::Relaxed);
    }

    /// Fresh, or why not. Before the first completed pass it is always fresh.
    pub fn check(&self) -> Result<(), String> {
        let p = &self.0;
        let last = p.last.load(Ordering::Relaxed);
        if last == 0 {
            return Ok(());
        }
        let since = ms(p.base.elapsed()).saturating_sub(last - 1);
        let limit = p.limit_ms.load(Ordering::Relaxed);
        if since > limit {
            return Err(format!(
                "unhealthy: no controller pass completed for {since} ms (limit {limit} ms)\n"
            ));
        }
        Ok(())
    }
}
