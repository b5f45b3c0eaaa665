//! The VncConsoleRequest responder of `vncd kube`: watches requests, answers those for
//! sessions this instance serves, and deletes requests past their retention. The
//! decisions are [`console_request::step`]; this module only reads and writes.
//!
//! Every instance watches every request (in its `--namespace`, else all namespaces): a
//! request does not say which node serves its session, and a small object per console
//! opened is cheap to fan out. Only the instance serving the session writes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::FIELD_MANAGER;
use super::call::Metered;
use super::console_request::{
    self, Here, KIND, Retention, Step, VncConsoleRequest, VncConsoleRequestStatus,
};
use super::objects::Objects;
use crate::api::{API_VERSION, Phase};
use crate::console::{Consoles, Minter};

/// How often requests are looked at again without a watch event (for deletions, and for a
/// session that becomes servable while its request waits).
const TICK: Duration = Duration::from_millis(500);

/// Writes the responder made, for the exit log and the benchmark.
#[derive(Debug, Default)]
pub struct ResponderCounts {
    /// Status writes (answers and refusals).
    pub answers: AtomicU64,
    /// Requests deleted.
    pub deletes: AtomicU64,
}

/// What the responder needs from the rest of `vncd kube`.
#[derive(Clone)]
pub struct Responder {
    pub client: Client,
    /// Watch only this namespace's requests (`vncd kube --namespace`).
    pub namespace: Option<String>,
    pub node: String,
    pub minter: Minter,
    pub consoles: Consoles,
    /// This node's sessions as the API server last showed them (for "assigned here").
    pub objects: Objects,
    pub metered: Metered,
    pub retention: Retention,
    pub counts: Arc<ResponderCounts>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("namespace", &self.namespace)
            .field("node", &self.node)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl Responder {
    fn api(&self, namespace: &str) -> Api<VncConsoleRequest> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// What this instance knows of the session `key`.
    fn here(&self, key: &str) -> Here {
        if self.consoles.get(key).is_some() {
            return Here::Served;
        }
        match self.objects.get(key) {
            Some(k) if k.watched && k.node_name.as_deref() == Some(self.node.as_str()) => {
                Here::Assigned {
                    ready: k.status.phase == Some(Phase::Ready),
                    phase: k.status.phase,
                }
            }
            _ => Here::Elsewhere,
        }
    }

    /// Runs until the task is aborted: the watch, and a pass over the requests after every
    /// watch event and every [`TICK`].
    pub async fn run(self) {
        let api: Api<VncConsoleRequest> = match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let (store, writer) = reflector::store();
        let changed = Arc::new(Notify::new());
        let notify = changed.clone();
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|o: &mut VncConsoleRequest| super::slim(&mut o.metadata))
            .reflect(writer);
        let watch = crate::task::spawn(tracing::info_span!("console_requests_watch"), async move {
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(_) => notify.notify_one(),
                    // Sessions are served regardless; only console requests wait. After an
                    // upgrade the usual cause is a CRD Helm did not install (it never
                    // upgrades crds/).
                    Err(e) => warn!(
                        error = %e,
                        "VncConsoleRequest watch failed; retrying with backoff (if the CRD is \
                         missing: `vncd crd vncconsolerequests.vncd.io | kubectl apply -f -`)"
                    ),
                }
            }
        });
        let _watch = AbortOnDrop(watch);
        let mut memory = Memory::default();
        loop {
            tokio::select! {
                () = changed.notified() => {}
                () = tokio::time::sleep(TICK) => {}
            }
            self.pass(&store, &mut memory).await;
        }
    }

    /// One look at every request.
    async fn pass(&self, store: &Store<VncConsoleRequest>, memory: &mut Memory) {
        let items = store.state();
        memory.keep_only(&items);
        let now = jiff::Timestamp::now();
        for req in items {
            let v = version(&req);
            if memory.done.contains(&v) {
                continue;
            }
            let seen_for = memory.seen_for(&v.0);
            let step =
                console_request::step(&req, &self.node, now, seen_for, self.retention, |k| {
                    self.here(k)
                });
            if matches!(step, Step::Nothing) {
                continue;
            }
            if self.act(&req, step, now).await {
                memory.done.insert(v);
            }
        }
    }

    /// Carries out one step; true if it is finished with (written or deleted).
    async fn act(&self, req: &VncConsoleRequest, step: Step, now: jiff::Timestamp) -> bool {
        let ns = req.namespace().unwrap_or_default();
        let name = req.name_any();
        let session = req.spec.session.as_str();
        let (status, expires_at) = match step {
            Step::Nothing => return false,
            Step::Delete => return self.delete(req).await,
            Step::Refuse(f) => (console_request::refused(&f, &self.node, now), None),
            Step::Mint { key, opts } => match self.consoles.mint(&self.minter, &key, opts) {
                Ok(url) => (
                    console_request::issued(&url, &self.node, now),
                    Some(url.expires_at),
                ),
                Err(e) => {
                    let f = console_request::failure_of(&e, &ns, session);
                    (console_request::refused(&f, &self.node, now), None)
                }
            },
        };
        match self.write_status(req, &status).await {
            Written::Yes => {}
            Written::Gone => return true,
            Written::Retry => return false,
        }
        // Logged once written. The URL carries the ticket: never logged.
        match (expires_at, status.failure()) {
            (Some(expires_at), _) => {
                info!(namespace = %ns, request = %name, session, expires_at, "issued a console URL");
            }
            (None, Some((reason, _))) => {
                info!(namespace = %ns, request = %name, session, reason, "refused a console request");
            }
            (None, None) => {}
        }
        true
    }

    /// Server-side apply of the whole status, if the request is still the version we read
    /// (a 409 means someone answered meanwhile, e.g. this node's previous instance).
    async fn write_status(
        &self,
        req: &VncConsoleRequest,
        status: &VncConsoleRequestStatus,
    ) -> Written {
        let ns = req.namespace().unwrap_or_default();
        let name = req.name_any();
        let body = status_apply_body(
            &ns,
            &name,
            &req.resource_version().unwrap_or_default(),
            status,
        );
        self.counts.answers.fetch_add(1, Ordering::Relaxed);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let r = self
            .metered
            .call(
                "apply",
                "VncConsoleRequest/status",
                &name,
                self.api(&ns)
                    .patch_status(&name, &params, &Patch::Apply(&body)),
            )
            .await;
        match r {
            Ok(_) => Written::Yes,
            Err(e) if super::is_not_found(&e) => Written::Gone,
            Err(e) if super::is_conflict(&e) => {
                debug!(namespace = %ns, request = %name, "console request changed before the answer; looking again");
                Written::Retry
            }
            Err(e) => {
                warn!(namespace = %ns, request = %name, error = %e, "cannot answer a console request; retrying");
                Written::Retry
            }
        }
    }

    /// Deletes a request if it is still the object we decided about (uid precondition).
    async fn delete(&self, req: &VncConsoleRequest) -> bool {
        let ns = req.namespace().unwrap_or_default();
        let name = req.name_any();
        self.counts.deletes.fetch_add(1, Ordering::Relaxed);
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: req.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let r = self
            .metered
            .call(
                "delete",
                "VncConsoleRequest",
                &name,
                self.api(&ns).delete(&name, &params),
            )
            .await;
        match r {
            Ok(_) => {
                debug!(namespace = %ns, request = %name, "deleted a console request past its retention");
                true
            }
            Err(e) if super::is_not_found(&e) => true,
            Err(e) => {
                warn!(namespace = %ns, request = %name, error = %e, "cannot delete a console request; retrying");
                false
            }
        }
    }
}

/// What the responder remembers between passes, for the requests the watch still holds.
#[derive(Debug, Default)]
struct Memory {
    /// Versions (uid, resourceVersion) this instance answered or deleted, so a request is
    /// not minted for twice while the watch still shows the version it answered.
    done: BTreeSet<(String, String)>,
    /// When this instance first saw each request (by uid), on its monotonic clock.
    first_seen: BTreeMap<String, Instant>,
}

impl Memory {
    fn keep_only(&mut self, items: &[Arc<VncConsoleRequest>]) {
        let versions: BTreeSet<_> = items.iter().map(|r| version(r)).collect();
        let uids: BTreeSet<&str> = versions.iter().map(|(u, _)| u.as_str()).collect();
        self.done.retain(|v| versions.contains(v));
        self.first_seen.retain(|uid, _| uids.contains(uid.as_str()));
    }

    fn seen_for(&mut self, uid: &str) -> Duration {
        self.first_seen
            .entry(uid.to_owned())
            .or_insert_with(Instant::now)
            .elapsed()
    }
}

fn version(r: &VncConsoleRequest) -> (String, String) {
    (
        r.uid().unwrap_or_default(),
        r.resource_version().unwrap_or_default(),
    )
}

/// How a status write ended.
enum Written {
    Yes,
    /// The request was deleted meanwhile: nothing left to do.
    Gone,
    /// A conflict or an API failure: look again on the next pass.
    Retry,
}

/// The body of a status apply: identity, the resourceVersion precondition, the status.
pub fn status_apply_body(
    namespace: &str,
    name: &str,
    resource_version: &str,
    status: &VncConsoleRequestStatus,
) -> serde_json::Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": resource_version,
        },
        "status": status,
    })
}

/// A background task that ends with its owner.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_apply_names_the_request_and_its_version() {
        let st = VncConsoleRequestStatus {
            node: Some("n1".into()),
            ..VncConsoleRequestStatus::default()
        };
        let b = status_apply_body("ns", "vm1-x", "7", &st);
        assert_eq!(b["kind"], "VncConsoleRequest");
        assert_eq!(b["apiVersion"], "vncd.io/v1alpha1");
        assert_eq!(b["metadata"]["resourceVersion"], "7");
        assert_eq!(b["metadata"]["namespace"], "ns");
        assert_eq!(b["status"]["node"], "n1");
        assert!(b["status"].get("url").is_none());
    }
}
