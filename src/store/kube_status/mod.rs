//! The Kubernetes lease store: each lease lives in its VncSession's `.status`.
//!
//! The API server is the only store. A lease is the status fields `port`, `node`, `pid`,
//! `processStartTime`, `leaseUid`, `target` and `allocatedAt`; [`KubeStatusStore::load`]
//! rebuilds the lease set from the statuses of this node's sessions (a LIST with the node's
//! field selector), so a restarted vncd, or the next pod of the DaemonSet, adopts every
//! lease and proxy exactly as the standalone state file would let it.
//!
//! A commit writes each changed lease with server-side apply of the status subresource
//! (field manager `vncd`) carrying `metadata.resourceVersion`; the API server refuses a
//! write based on a stale object with 409, which becomes [`StoreError::Conflict`] and
//! makes the controller reload and plan again. A new lease also gets the finalizer
//! `vncd.io/cleanup`, so deleting the session waits until vncd has stopped the proxy and
//! released the port; a release of an object being deleted removes the finalizer.
//!
//! Recording a proxy's pid (a lease change that only fills in `process`) is not written
//! at once: the status sink writes it with the session's next status change (normally
//! `Ready`), saving one write per session. Losing it in a crash is harmless, because a
//! proxy is found by the lease uid in its environment, not by its pid: the next vncd
//! adopts it and records the pid again.

use std::collections::{BTreeMap, BTreeSet};

mod writes;

use futures::{StreamExt, stream};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Api;
use kube::api::ListParams;
use tracing::{debug, info, warn};

use super::{LeaseChange, LeaseSet, LeaseStore, StoreError, apply_changes};
use crate::api::{Phase, VncSession};
use crate::k8s::events::{Events, Reason};
use crate::k8s::lease_fields::{lease_from_status, put_lease_fields, whole_seconds};
use crate::k8s::objects::{Known, Objects};
use crate::k8s::writer::{Backoff, Writer};
use crate::k8s::{is_conflict, is_not_found, key_of, node_selector, split_key};
use crate::lease::{Expiry, Lease};
use crate::reconcile::Reason as StatusReason;
use crate::status::UrlStyle;
pub use writes::{ExpiryOp, Write, plan_writes};

/// Writes in flight at once during one commit.
const PARALLEL_WRITES: usize = 16;
/// Objects per page when listing.
const PAGE: u32 = 500;
/// Attempts to release a lease whose object keeps changing underneath.
const RELEASE_ATTEMPTS: usize = 3;
/// The reason a status shows after this node gave the session up.
pub const RELEASED: &str = "Released";

/// Why one write failed.
#[derive(Debug)]
enum Failure {
    /// The object changed or vanished underneath: reload and plan again.
    Stale(String),
    /// The API server failed the call (or it timed out): back off and report it.
    Api {
        object: String,
        action: String,
        source: kube::Error,
    },
}

impl Failure {
    fn api(object: &str, action: impl Into<String>, source: kube::Error) -> Self {
        Failure::Api {
            object: object.to_owned(),
            action: action.into(),
            source,
        }
    }
}

/// The lease store. See the module docs.
#[derive(Debug)]
pub struct KubeStatusStore {
    list_api: Api<VncSession>,
    writer: Writer,
    objects: Objects,
    node: String,
    url: UrlStyle,
    events: Events,
    set: LeaseSet,
    backoff: Backoff,
}

impl KubeStatusStore {
    /// `list_api` is scoped like the watch (all namespaces, or `--namespace`).
    pub fn new(
        list_api: Api<VncSession>,
        writer: Writer,
        objects: Objects,
        node: &str,
        url: UrlStyle,
        events: Events,
    ) -> Self {
        KubeStatusStore {
            list_api,
            writer,
            objects,
            node: node.to_owned(),
            url,
            events,
            set: LeaseSet::default(),
            backoff: Backoff::default(),
        }
    }

    async fn pause_after_errors(&self) {
        let wait = self.backoff.current();
        if !wait.is_zero() {
            debug!(
                wait_ms = wait.as_millis() as u64,
                "backing off after API errors"
            );
            tokio::time::sleep(wait).await;
        }
    }

    async fn list_all(&self) -> Result<Vec<VncSession>, kube::Error> {
        let mut out = Vec::new();
        let mut params = ListParams::default()
            .fields(&node_selector(&self.node))
            .limit(PAGE);
        loop {
            let page = self.writer.list(&self.list_api, &params).await?;
            out.extend(page.items);
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(out),
            }
        }
    }

    async fn perform(&self, write: &Write) -> Result<(), Failure> {
        match write {
            Write::Lease { lease, new, expiry } => self.put(lease, *new, expiry).await,
            Write::Release { lease, expiry } => self.release(lease, expiry).await,
            Write::Expiry { key, expiry } => self.set_expiry(key, expiry).await,
        }
    }

    async fn set_expiry(&self, key: &str, expiry: &ExpiryOp) -> Result<(), Failure> {
        let Some(known) = self.objects.get(key) else {
            // Gone: nothing to remember or forget.
            return Ok(());
        };
        let mut status = known.status.clone();
        expiry.apply(&mut status);
        if status == known.status || known.deleting {
            return Ok(());
        }
        match self.writer.apply_status(&known, &status).await {
            Ok(obj) => {
                self.objects.observe(&obj);
                Ok(())
            }
            Err(e) if is_conflict(&e) || is_not_found(&e) => {
                Err(Failure::Stale(format!("{key}: {e}")))
            }
            Err(e) => Err(Failure::api(key, "record the expiry", e)),
        }
    }

    async fn put(&self, lease: &Lease, new: bool, expiry: &ExpiryOp) -> Result<(), Failure> {
        let key = &lease.session;
        let Some(known) = self.objects.get(key) else {
            return Err(Failure::Stale(format!("{key} is no longer known")));
        };
        let mut status = known.status.clone();
        put_lease_fields(&mut status, Some(lease), &self.node, &self.url);
        expiry.apply(&mut status);
        if status.phase.is_none() {
            // The words the plan reports for this pass, so the sink's first status adds
            // nothing but the pid, which waits for the Ready write.
            let message = format!("leasing port {}", lease.port);
            status.phase = Some(Phase::Pending);
            status.reason = Some(StatusReason::Allocating.as_str().into());
            status.message = Some(message.clone());
            status.observed_generation = known.generation;
            status.conditions = vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: StatusReason::Allocating.as_str().into(),
                message,
                observed_generation: known.generation,
                last_transition_time: Time(whole_seconds(Timestamp::now())),
            }];
        }
        match self.writer.apply_status(&known, &status).await {
            Ok(obj) => {
                self.objects.observe(&obj);
            }
            Err(e) if is_conflict(&e) || is_not_found(&e) => {
                return Err(Failure::Stale(format!("{key}: {e}")));
            }
            Err(e) => {
                return Err(Failure::api(
                    key,
                    format!("write the lease of port {}", lease.port),
                    e,
                ));
            }
        }
        if new {
            self.events.emit(
                Reason::Allocated,
                known.reference(),
                format!(
                    "port {} leased on node {} for {}",
                    lease.port, self.node, lease.target
                ),
            );
        }
        // The finalizer goes on after the lease: if this write fails, a deletion simply
        // finds no finalizer, the watch reports it, and the lease is released anyway.
        if let Some(k) = self.objects.get(key)
            && !k.has_finalizer()
            && !k.deleting
        {
            match self.writer.set_finalizer(&k, true).await {
                Ok(obj) => {
                    self.objects.observe(&obj);
                }
                Err(e) => warn!(session = %key, error = %e, "cannot add finalizer; will retry"),
            }
        }
        Ok(())
    }

    async fn release(&self, lease: &Lease, expiry: &ExpiryOp) -> Result<(), Failure> {
        let key = &lease.session;
        let Some((ns, name)) = split_key(key) else {
            return Ok(());
        };
        let mut known = self.objects.get(key);
        for _ in 0..RELEASE_ATTEMPTS {
            let k = match known.take() {
                Some(k) => k,
                None => match self.writer.get(ns, name).await {
                    Ok(Some(obj)) => {
                        self.objects.observe(&obj);
                        match self.objects.get(key) {
                            Some(k) => k,
                            None => return Ok(()),
                        }
                    }
                    Ok(None) => {
                        self.objects.forget(key);
                        return self.released(lease, None).await;
                    }
                    Err(e) => return Err(Failure::api(key, "read the object", e)),
                },
            };
            let Some(result) = self.release_write(&k, lease, expiry).await else {
                return self.released(lease, Some(&k)).await;
            };
            match result {
                Ok(obj) => {
                    self.objects.observe(&obj);
                    self.drop_foreign_finalizer(key).await;
                    return self.released(lease, Some(&k)).await;
                }
                Err(e) if is_not_found(&e) => {
                    self.objects.forget(key);
                    return self.released(lease, Some(&k)).await;
                }
                Err(e) if is_conflict(&e) => {
                    debug!(session = %key, "object changed while releasing; reading it again");
                    known = None;
                }
                Err(e) => {
                    return Err(Failure::api(key, format!("release port {}", lease.port), e));
                }
            }
        }
        Err(Failure::Stale(format!(
            "{key}: kept changing while port {} was released",
            lease.port
        )))
    }

    /// The one write a release needs on `k` as it stands, or None if nothing of ours is
    /// left on it: being deleted, only the finalizer matters; holding our lease, the lease
    /// fields are cleared (the sink writes the next state if this node still serves it).
    async fn release_write(
        &self,
        k: &Known,
        lease: &Lease,
        expiry: &ExpiryOp,
    ) -> Option<Result<VncSession, kube::Error>> {
        let holds = k.status.lease_uid.as_deref() == Some(lease.uid.as_str());
        let free = k.status.lease_uid.is_none();
        if !holds && !free {
            // Another node leased it since: nothing of ours is left on the object.
            return None;
        }
        if k.deleting || (!holds && !k.watched) {
            if !k.has_finalizer() {
                return None;
            }
            return Some(self.writer.set_finalizer(k, false).await);
        }
        if !holds {
            return None;
        }
        // A status that keeps saying Ready without a port would be a lie.
        let mut status = k.status.clone();
        put_lease_fields(&mut status, None, &self.node, &self.url);
        status.phase = Some(Phase::Pending);
        status.reason = Some(RELEASED.into());
        status.message = Some(if k.watched {
            format!("node {} released port {}", self.node, lease.port)
        } else {
            format!(
                "node {} released port {}: the session is no longer assigned to it",
                self.node, lease.port
            )
        });
        status.conditions.clear();
        expiry.apply(&mut status);
        Some(self.writer.apply_status(k, &status).await)
    }

    /// After a release of a session no longer assigned to this node: its finalizer goes
    /// too (the node it moved to adds its own).
    async fn drop_foreign_finalizer(&self, key: &str) {
        let Some(k) = self.objects.get(key) else {
            return;
        };
        if k.watched || k.deleting || !k.has_finalizer() {
            return;
        }
        match self.writer.set_finalizer(&k, false).await {
            Ok(obj) => {
                self.objects.observe(&obj);
            }
            Err(e) => debug!(session = %key, error = %e, "cannot drop finalizer"),
        }
    }

    async fn released(&self, lease: &Lease, known: Option<&Known>) -> Result<(), Failure> {
        if let Some(k) = known {
            self.events.emit(
                Reason::Released,
                k.reference(),
                format!("port {} released on node {}", lease.port, self.node),
            );
        }
        Ok(())
    }
}

impl LeaseStore for KubeStatusStore {
    async fn load(&mut self) -> Result<LeaseSet, StoreError> {
        self.pause_after_errors().await;
        let objs = match self.list_all().await {
            Ok(o) => {
                self.backoff.succeed();
                o
            }
            Err(e) => {
                self.backoff.fail();
                return Err(api_error(
                    format!("list ({})", node_selector(&self.node)),
                    "list this node's sessions".into(),
                    e,
                ));
            }
        };
        let mut found: Vec<Lease> = Vec::new();
        let mut listed = BTreeSet::new();
        let mut expired = BTreeMap::new();
        for obj in &objs {
            let Some(key) = key_of(obj) else { continue };
            self.objects.observe(obj);
            listed.insert(key.clone());
            let Some(status) = obj.status.as_ref() else {
                continue;
            };
            if let Some(l) = lease_from_status(&key, status, &self.node) {
                found.push(l);
            }
            if let Some(e) = &status.expired {
                expired.insert(
                    key.clone(),
                    Expiry {
                        generation: e.generation,
                        reason: e.reason.clone(),
                        message: e.message.clone(),
                        at: e.at.0,
                    },
                );
            }
        }
        // Oldest lease first, so of two objects claiming one port the first keeps it.
        found.sort_by(|a, b| (a.allocated_at, &a.session).cmp(&(b.allocated_at, &b.session)));
        // Leases of objects that left this node's list while we held them: keep them
        // until released, so the release clears the object and its finalizer.
        found.extend(
            self.set
                .leases
                .values()
                .filter(|l| !listed.contains(&l.session))
                .cloned(),
        );
        let mut leases = BTreeMap::new();
        let mut ports: BTreeMap<u16, String> = BTreeMap::new();
        for l in found {
            if let Some(holder) = ports.get(&l.port) {
                warn!(session = %l.session, port = l.port, holder = %holder, "two sessions claim one port; the older lease keeps it");
                continue;
            }
            ports.insert(l.port, l.session.clone());
            leases.insert(l.session.clone(), l);
        }
        self.set = LeaseSet {
            revision: self.set.revision + 1,
            leases,
            expired,
        };
        self.objects.set_leases(&self.set.leases);
        info!(objects = objs.len(), leases = self.set.leases.len(), node = %self.node, "loaded leases from VncSession statuses");
        Ok(self.set.clone())
    }

    async fn commit(
        &mut self,
        base: u64,
        changes: Vec<LeaseChange>,
    ) -> Result<LeaseSet, StoreError> {
        if base != self.set.revision {
            return Err(StoreError::Conflict {
                expected: base,
                found: self.set.revision,
            });
        }
        let mut next = self.set.clone();
        apply_changes(&mut next, changes.clone())?;
        self.pause_after_errors().await;
        let writes = plan_writes(&self.set.leases, &changes);
        let results = self.perform_all(writes).await;
        let failed: BTreeSet<usize> = results
            .iter()
            .filter(|(_, _, r)| r.is_err())
            .flat_map(|(i, _, _)| i.iter().copied())
            .collect();
        if failed.is_empty() {
            self.backoff.succeed();
            self.set = next;
            self.objects.set_leases(&self.set.leases);
            return Ok(self.set.clone());
        }
        // Keep exactly what reached the API server, and move the revision on so the
        // controller's next commit (planned from the old set) is refused and it reloads.
        let kept: Vec<LeaseChange> = changes
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !failed.contains(i))
            .map(|(_, c)| c)
            .collect();
        let mut persisted = self.set.clone();
        apply_changes(&mut persisted, kept)?;
        self.set = persisted;
        self.objects.set_leases(&self.set.leases);
        Err(self.failure_of(base, results))
    }
}

/// One write's result: the indices of the changes it carried, its kind, and how it went.
type Performed = (Vec<usize>, &'static str, Result<(), Failure>);

impl KubeStatusStore {
    /// Performs `writes`, up to [`PARALLEL_WRITES`] at once (one write per object, so two
    /// writes in flight never touch the same object).
    async fn perform_all(&self, writes: Vec<(Vec<usize>, Write)>) -> Vec<Performed> {
        stream::iter(writes)
            .map(|(i, w)| async move {
                let kind = match &w {
                    Write::Lease { .. } => "lease",
                    Write::Release { .. } => "release",
                    Write::Expiry { .. } => "expiry",
                };
                debug!(session = %w.key(), kind, "writing");
                (i, kind, self.perform(&w).await)
            })
            .buffer_unordered(PARALLEL_WRITES)
            .collect()
            .await
    }

    /// What a partly failed commit answers: an API error (and a backoff) if the server
    /// failed a call, else a conflict so the controller reloads and plans again.
    fn failure_of(&mut self, base: u64, results: Vec<Performed>) -> StoreError {
        let mut stale = None;
        let mut api = None;
        for (_, kind, r) in results {
            match r {
                Err(Failure::Stale(d)) => stale = Some(format!("{kind} {d}")),
                Err(Failure::Api {
                    object,
                    action,
                    source,
                }) => {
                    api = Some(api_error(object, action, source));
                }
                Ok(()) => {}
            }
        }
        if let Some(error) = api {
            let wait = self.backoff.fail();
            warn!(
                retry_in_ms = wait.as_millis() as u64,
                "API error while writing leases; backing off"
            );
            return error;
        }
        debug!(detail = ?stale, "a session changed underneath; reloading");
        StoreError::Conflict {
            expected: base,
            found: self.set.revision,
        }
    }
}

#[cfg(test)]
mod tests;

/// A failed API call as the store's neutral error, labelled here where the client is known.
fn api_error(object: String, action: String, source: kube::Error) -> StoreError {
    StoreError::Api {
        object,
        action,
        label: crate::k8s::error_label(&source),
        source: Box::new(source),
    }
}
