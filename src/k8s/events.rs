//! Kubernetes Events about sessions (`kubectl describe vncsession` shows them).
//!
//! Events are published by a background task through kube's recorder, never on the
//! control loop's path: a slow or failing events API must not delay a lease or a proxy.
//! When the queue is full an event is dropped (and logged); status stays authoritative.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// How many events may wait for the API before new ones are dropped.
const QUEUE: usize = 4096;

/// What happened to a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A port was leased.
    Allocated,
    /// The proxy listens; the console URL works.
    Ready,
    /// The session cannot be served as it stands.
    Failed,
    /// The port was given back.
    Released,
    /// The requested port is leased to another session or held by another program.
    PortConflict,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Allocated => "Allocated",
            Reason::Ready => "Ready",
            Reason::Failed => "Failed",
            Reason::Released => "Released",
            Reason::PortConflict => "PortConflict",
        }
    }

    fn event_type(self) -> EventType {
        match self {
            Reason::Failed | Reason::PortConflict => EventType::Warning,
            _ => EventType::Normal,
        }
    }
}

#[derive(Debug)]
struct Item {
    reason: Reason,
    regarding: ObjectReference,
    note: String,
}

/// A handle to publish events; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Events {
    tx: Option<mpsc::Sender<Item>>,
    published: Arc<AtomicU64>,
}

impl Events {
    /// Starts the publishing task. Events name `vncd` as the reporting controller and
    /// `vncd-NODE` as the instance.
    pub fn start(client: Client, node: &str, metered: super::call::Metered) -> Events {
        let (tx, mut rx) = mpsc::channel::<Item>(QUEUE);
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "vncd".into(),
                instance: Some(format!("vncd-{node}")),
            },
        );
        let published = Arc::new(AtomicU64::new(0));
        let count = published.clone();
        crate::task::spawn(tracing::info_span!("events"), async move {
            while let Some(item) = rx.recv().await {
                let ev = Event {
                    type_: item.reason.event_type(),
                    reason: item.reason.as_str().into(),
                    note: Some(item.note.chars().take(1000).collect()),
                    action: "Reconcile".into(),
                    secondary: None,
                };
                let name = item.regarding.name.clone().unwrap_or_default();
                let publish = recorder.publish(&ev, &item.regarding);
                match metered.call("create", "Event", &name, publish).await {
                    Ok(()) => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => debug!(
                        reason = item.reason.as_str(),
                        object = ?item.regarding.name,
                        error = %e,
                        "cannot publish event"
                    ),
                }
            }
        });
        Events {
            tx: Some(tx),
            published,
        }
    }

    /// A handle that publishes nothing (unit tests).
    pub fn disabled() -> Events {
        Events::default()
    }

    /// Queues an event about `regarding`.
    pub fn emit(&self, reason: Reason, regarding: ObjectReference, note: impl Into<String>) {
        let Some(tx) = &self.tx else { return };
        let item = Item {
            reason,
            regarding,
            note: note.into(),
        };
        if let Err(mpsc::error::TrySendError::Full(item)) = tx.try_send(item) {
            warn!(
                reason = item.reason.as_str(),
                object = ?item.regarding.name,
                "event queue full; dropping the event (status is unaffected)"
            );
        }
    }

    /// Events published so far (for the exit summary and benchmarks).
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_warnings_and_progress_is_normal() {
        assert_eq!(Reason::Failed.event_type(), EventType::Warning);
        assert_eq!(Reason::PortConflict.event_type(), EventType::Warning);
        assert_eq!(Reason::Ready.event_type(), EventType::Normal);
        assert_eq!(Reason::Allocated.as_str(), "Allocated");
        assert_eq!(Reason::Released.as_str(), "Released");
    }

    #[test]
    fn a_disabled_handle_swallows_events() {
        let e = Events::disabled();
        e.emit(Reason::Ready, ObjectReference::default(), "x");
        assert_eq!(e.published(), 0);
    }
}
