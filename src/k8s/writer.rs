//! The writes vncd makes to VncSessions, in one place so they are counted and shaped alike.
//!
//! - status: server-side apply of the status subresource with field manager `vncd`,
//!   `force`, and `metadata.resourceVersion` as a precondition (409 if the object changed
//!   since we read it). The apply always carries vncd's whole status: under server-side
//!   apply, a field the manager owned and leaves out is removed.
//! - finalizer: a merge patch of `metadata.finalizers`, also with `resourceVersion`, so it
//!   neither clobbers a finalizer someone else added meanwhile nor depends on who added ours.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use super::call::Metered;
use super::objects::Known;
use super::{FIELD_MANAGER, FINALIZER};
use crate::api::{API_VERSION, KIND, VncSession, VncSessionStatus};

/// Writes made so far, by kind.
#[derive(Debug, Default)]
pub struct WriteCounts {
    pub status: AtomicU64,
    pub finalizer: AtomicU64,
    /// Writes the API server refused with 409 (a newer object exists).
    pub conflicts: AtomicU64,
}

impl WriteCounts {
    /// Status and finalizer writes, and conflicts.
    pub fn summary(&self) -> (u64, u64, u64) {
        (
            self.status.load(Ordering::Relaxed),
            self.finalizer.load(Ordering::Relaxed),
            self.conflicts.load(Ordering::Relaxed),
        )
    }
}

/// Performs and counts writes, each bounded and metered by [`Metered`]. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    client: Client,
    counts: Arc<WriteCounts>,
    metered: Metered,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("counts", &self.counts)
            .finish()
    }
}

/// The body of a status apply: identity, precondition and the whole status vncd owns.
pub fn status_apply_body(known: &Known, status: &VncSessionStatus) -> serde_json::Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": known.name,
            "namespace": known.namespace,
            "resourceVersion": known.resource_version,
        },
        "status": status,
    })
}

/// The finalizer list with ours added (`true`) or removed (`false`), order kept.
pub fn finalizers_with(current: &[String], ours: bool) -> Vec<String> {
    let mut out: Vec<String> = current
        .iter()
        .filter(|f| f.as_str() != FINALIZER)
        .cloned()
        .collect();
    if ours {
        out.push(FINALIZER.to_owned());
    }
    out
}

impl Writer {
    pub fn new(client: Client, metered: Metered) -> Self {
        Writer {
            client,
            counts: Arc::default(),
            metered,
        }
    }

    pub fn counts(&self) -> Arc<WriteCounts> {
        self.counts.clone()
    }

    fn api(&self, namespace: &str) -> Api<VncSession> {
        Api::namespaced(self.client.clone(), namespace)
    }

    fn note(&self, r: &Result<VncSession, kube::Error>) {
        if let Err(e) = r
            && super::is_conflict(e)
        {
            self.counts.conflicts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Applies `status` as the object's whole vncd-owned status, if it is still at
    /// `known.resource_version`.
    pub async fn apply_status(
        &self,
        known: &Known,
        status: &VncSessionStatus,
    ) -> Result<VncSession, kube::Error> {
        self.counts.status.fetch_add(1, Ordering::Relaxed);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let body = status_apply_body(known, status);
        let api = self.api(&known.namespace);
        let r = self
            .metered
            .call(
                "apply",
                "VncSession/status",
                &known.name,
                api.patch_status(&known.name, &params, &Patch::Apply(&body)),
            )
            .await;
        self.note(&r);
        r
    }

    /// Adds (`true`) or removes (`false`) vncd's finalizer, if the object is still at
    /// `known.resource_version`.
    pub async fn set_finalizer(
        &self,
        known: &Known,
        ours: bool,
    ) -> Result<VncSession, kube::Error> {
        self.counts.finalizer.fetch_add(1, Ordering::Relaxed);
        let body = json!({
            "metadata": {
                "resourceVersion": known.resource_version,
                "finalizers": finalizers_with(&known.finalizers, ours),
            }
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let api = self.api(&known.namespace);
        let r = self
            .metered
            .call(
                "patch",
                "VncSession/finalizers",
                &known.name,
                api.patch(&known.name, &params, &Patch::Merge(&body)),
            )
            .await;
        self.note(&r);
        r
    }

    /// Reads one object; None if it is gone.
    pub async fn get(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<VncSession>, kube::Error> {
        let api = self.api(namespace);
        self.metered
            .call("get", "VncSession", name, api.get_opt(name))
            .await
    }

    /// Lists VncSessions (one page), bounded and metered like every other call.
    pub async fn list(
        &self,
        api: &Api<VncSession>,
        params: &kube::api::ListParams,
    ) -> Result<kube::core::ObjectList<VncSession>, kube::Error> {
        self.metered
            .call("list", "VncSession", "", api.list(params))
            .await
    }
}

/// Exponential backoff after API errors: 200 ms doubling to 5 s, reset by a success.
/// Capped low because the control loop awaits it and should stay responsive to SIGTERM.
#[derive(Clone, Copy, Debug, Default)]
pub struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(200);
    pub const MAX: Duration = Duration::from_secs(5);

    /// Records a failure; returns how long to wait before the next attempt.
    pub fn fail(&mut self) -> Duration {
        let d = self.next.map_or(Self::FIRST, |d| (d * 2).min(Self::MAX));
        self.next = Some(d);
        d
    }

    pub fn succeed(&mut self) {
        self.next = None;
    }

    /// The wait owed before the next attempt (zero after a success).
    pub fn current(&self) -> Duration {
        self.next.unwrap_or(Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Known {
        Known {
            namespace: "ns".into(),
            name: "vm1".into(),
            uid: "u".into(),
            resource_version: "42".into(),
            generation: Some(1),
            deleting: false,
            finalizers: vec!["other.io/x".into()],
            node_name: Some("n1".into()),
            status: VncSessionStatus::default(),
            watched: true,
        }
    }

    #[test]
    fn status_applies_carry_the_resource_version_precondition() {
        let st = VncSessionStatus {
            port: Some(6100),
            ..VncSessionStatus::default()
        };
        let body = status_apply_body(&known(), &st);
        assert_eq!(body["metadata"]["resourceVersion"], "42");
        assert_eq!(body["metadata"]["namespace"], "ns");
        assert_eq!(body["kind"], "VncSession");
        assert_eq!(body["status"]["port"], 6100);
        assert!(
            body["status"].get("pid").is_none(),
            "absent fields are left out"
        );
    }

    #[test]
    fn finalizer_edits_keep_other_finalizers() {
        let k = known();
        assert_eq!(
            finalizers_with(&k.finalizers, true),
            ["other.io/x", "vncd.io/cleanup"]
        );
        let with = finalizers_with(&k.finalizers, true);
        assert_eq!(finalizers_with(&with, false), ["other.io/x"]);
        assert_eq!(finalizers_with(&with, true), with, "adding twice adds once");
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff::default();
        assert_eq!(b.current(), Duration::ZERO);
        assert_eq!(b.fail(), Duration::from_millis(200));
        assert_eq!(b.fail(), Duration::from_millis(400));
        for _ in 0..10 {
            b.fail();
        }
        assert_eq!(b.current(), Backoff::MAX);
        b.succeed();
        assert_eq!(b.current(), Duration::ZERO);
    }
}
