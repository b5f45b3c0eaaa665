//! Readiness shared by the controller, the status sinks and the HTTP endpoints.
//!
//! A neutral module so that the controller (shared by every mode) and the Kubernetes
//! status sink need not import each other, or the HTTP server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
