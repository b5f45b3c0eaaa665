//! Every Kubernetes API call vncd makes goes through [`Metered::call`]: bounded by a
//! deadline, counted by verb, kind and outcome, timed, and run in a span naming the object.
//!
//! The deadline matters most where a hung call would do harm: a node-lease renewal that
//! waits forever would let a second instance take the node while this one still writes,
//! and a status write that never returns would freeze the control loop.

use std::future::Future;
use std::time::{Duration, Instant};

use tracing::{Instrument, info_span};

use super::{error_label, timed_out};
use crate::metrics::ApiMetrics;

/// The default deadline of one API call. Reads and writes of single objects answer in
/// milliseconds; a call still open after this is treated as failed and retried later.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs API calls with a deadline and counts them. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Metered {
    metrics: ApiMetrics,
    timeout: Duration,
}

impl Default for Metered {
    fn default() -> Self {
        Metered::new(ApiMetrics::default())
    }
}

impl Metered {
    pub fn new(metrics: ApiMetrics) -> Self {
        Metered {
            metrics,
            timeout: API_TIMEOUT,
        }
    }

    /// The same metrics with another deadline per call.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Metered {
            metrics: self.metrics.clone(),
            timeout,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn metrics(&self) -> &ApiMetrics {
        &self.metrics
    }

    /// Runs `call` (verb `verb` on a `kind` named `name`) within the deadline.
    pub async fn call<T>(
        &self,
        verb: &'static str,
        kind: &'static str,
        name: &str,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, kube::Error> {
        self.call_within(self.timeout, verb, kind, name, call).await
    }

    /// [`Metered::call`] with a deadline of its own, e.g. what is left of a renew deadline.
    pub async fn call_within<T>(
        &self,
        deadline: Duration,
        verb: &'static str,
        kind: &'static str,
        name: &str,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, kube::Error> {
        let span = info_span!("kube", verb, kind, name = %name);
        let started = Instant::now();
        let result = tokio::time::timeout(deadline, call)
            .instrument(span)
            .await
            .unwrap_or_else(|elapsed| Err(timed_out(elapsed)));
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => error_label(e),
        };
        self.metrics.observe(verb, kind, outcome, started.elapsed());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_that_hangs_fails_at_its_deadline_and_is_counted() {
        let m = Metered::default().with_timeout(Duration::from_millis(50));
        let started = Instant::now();
        let r: Result<(), _> = m
            .call("get", "Lease", "vncd-n1", std::future::pending())
            .await;
        let err = r.unwrap_err();
        assert!(super::super::is_timeout(&err), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(m.metrics().count("get", "Lease", "timeout"), 1);
        let ok: Result<u8, kube::Error> = m.call("get", "Lease", "vncd-n1", async { Ok(1) }).await;
        assert_eq!(ok.unwrap(), 1);
        assert_eq!(m.metrics().count("get", "Lease", "ok"), 1);
    }
}
