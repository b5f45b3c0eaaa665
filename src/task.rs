//! Spawning background tasks in a span of their own.
//!
//! A task started with bare `tokio::spawn` loses the span of whoever started it, so its
//! logs carry no context: which node lease, which watch, which session. Every long-lived
//! task of vncd goes through [`spawn`], which names it.

use std::future::Future;

use tokio::task::JoinHandle;
use tracing::Instrument as _;

/// Spawns `fut` on the runtime inside `span`.
pub fn spawn<F>(span: tracing::Span, fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(fut.instrument(span))
}
