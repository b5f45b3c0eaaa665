//! Rules applied to every snapshot of a source, whatever the source is.
//!
//! A rule (the target policy, the per-namespace share) moves desired sessions it does not
//! admit into `rejected`, with a reason; a [`Filtered`] source applies it to every
//! snapshot of the source it wraps. Neither the sources nor the reconcile core know about
//! the rules, and a new rule is one more wrapper at wiring time.

use super::{Snapshot, Source, SourceError};

/// One rule over a snapshot. It must be a pure function of the snapshot (no I/O, no
/// memory of earlier snapshots), so the same objects always give the same answer, also
/// after a restart.
pub trait Admission: Send {
    fn apply(&self, snap: &mut Snapshot);
}

/// No rule: every snapshot passes unchanged (an optional rule that is not configured).
impl<A: Admission> Admission for Option<A> {
    fn apply(&self, snap: &mut Snapshot) {
        if let Some(rule) = self {
            rule.apply(snap);
        }
    }
}

/// A source whose snapshots pass through an [`Admission`] rule.
#[derive(Debug)]
pub struct Filtered<S, A> {
    inner: S,
    rule: A,
}

impl<S: Source, A: Admission> Filtered<S, A> {
    pub fn new(inner: S, rule: A) -> Self {
        Filtered { inner, rule }
    }
}

impl<S: Source, A: Admission> Source for Filtered<S, A> {
    async fn snapshot(&mut self) -> Result<Snapshot, SourceError> {
        let mut snap = self.inner.snapshot().await?;
        self.rule.apply(&mut snap);
        Ok(snap)
    }

    async fn changed(&mut self) {
        self.inner.changed().await;
    }
}
