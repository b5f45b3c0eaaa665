//! Refused and timed-out connections, summed up instead of logged one by one.
//!
//! A port scanner, a slowloris client or someone guessing tokens makes thousands of
//! connections; one log line each would fill the proxy's log (and the disk under vncd's
//! state directory) and bury everything else. Each refusal is recorded under a short,
//! fixed reason (status and message, never a path or query, so never a token), and a
//! reporter task writes at most one line per interval:
//! `refused N connections in the last 10s: 403 missing or wrong token x3, ...`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

/// Distinct reasons kept per interval; more are counted under "other".
const MAX_REASONS: usize = 16;

/// Refusals since the last report, by reason.
#[derive(Debug, Default)]
pub struct Refusals {
    by_reason: Mutex<BTreeMap<String, u64>>,
}

impl Refusals {
    /// Counts one refusal. `reason` must not carry anything the client sent.
    pub fn record(&self, reason: &str) {
        let Ok(mut m) = self.by_reason.lock() else {
            return;
        };
        let key = if m.contains_key(reason) || m.len() < MAX_REASONS {
            reason
        } else {
            "other"
        };
        *m.entry(key.to_owned()).or_default() += 1;
    }

    /// The refusals since the last call: their number and a one-line summary, or `None`.
    pub fn take(&self) -> Option<(u64, String)> {
        let m = std::mem::take(&mut *self.by_reason.lock().ok()?);
        let total: u64 = m.values().sum();
        if total == 0 {
            return None;
        }
        let mut by_count: Vec<(&String, &u64)> = m.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let reasons = by_count
            .iter()
            .map(|(r, n)| format!("{r} x{n}"))
            .collect::<Vec<_>>()
            .join(", ");
        Some((total, reasons))
    }
}

/// Writes one summary line per `every` while refusals happen, and a last one on stop.
pub async fn reporter(refusals: Arc<Refusals>, every: Duration, mut stop: watch::Receiver<bool>) {
    let secs = every.as_secs();
    let report = |refusals: &Refusals| {
        if let Some((n, reasons)) = refusals.take() {
            warn!(
                refused = n,
                interval_secs = secs,
                "refused {n} connections in the last {secs}s: {reasons}"
            );
        }
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => report(&refusals),
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    report(&refusals);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason_and_bounds_the_reasons() {
        let r = Refusals::default();
        assert_eq!(r.take(), None);
        for _ in 0..3 {
            r.record("403 missing or wrong token");
        }
        r.record("408 no request in time");
        assert_eq!(
            r.take(),
            Some((
                4,
                "403 missing or wrong token x3, 408 no request in time x1".into()
            ))
        );
        assert_eq!(r.take(), None, "a report empties the counts");
        for i in 0..100 {
            r.record(&format!("reason {i}"));
        }
        let (n, line) = r.take().expect("refusals");
        assert_eq!(n, 100);
        assert!(line.contains("other x84"), "{line}");
    }
}
