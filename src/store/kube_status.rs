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

use futures::{StreamExt, stream};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Api;
use kube::api::ListParams;
use tracing::{debug, info, warn};

use super::{LeaseChange, LeaseSet, LeaseStore, StoreError, apply_changes};
use crate::api::{ExpiredStatus, Phase, VncSession, VncSessionStatus};
use crate::k8s::events::{Events, Reason};
use crate::k8s::objects::{Known, Objects};
use crate::k8s::token::{self, TokenSecret};
use crate::k8s::writer::{Backoff, Writer};
use crate::k8s::{is_conflict, is_not_found, split_key};
use crate::lease::{Expiry, Lease, ProcRef};
use crate::reconcile::reason;
use crate::session::Endpoint;
use crate::source::kube::{key_of, node_selector};
use crate::status::UrlStyle;

/// Writes in flight at once during one commit.
const PARALLEL_WRITES: usize = 16;
/// Objects per page when listing.
const PAGE: u32 = 500;
/// Attempts to release a lease whose object keeps changing underneath.
const RELEASE_ATTEMPTS: usize = 3;
/// The reason a status shows after this node gave the session up.
pub const RELEASED: &str = "Released";

/// Writes `lease`'s fields into `status`, or clears them for `None`.
pub fn put_lease_fields(
    status: &mut VncSessionStatus,
    lease: Option<&Lease>,
    node: &str,
    url: &UrlStyle,
) {
    status.port = lease.map(|l| i32::from(l.port));
    // The token stays out of status (see `k8s::token`): the URL here is the bare one,
    // and the Secret named by `tokenSecretRef` holds the URL with the token.
    status.url = lease.map(|l| url.url(l.port, None));
    status.token_secret_ref = lease
        .filter(|l| l.token.is_some())
        .map(|l| token::secret_ref(split_key(&l.session).map_or(l.session.as_str(), |(_, n)| n)));
    status.target = lease.map(|l| l.target.to_string());
    // The API stores whole seconds; writing more would make every comparison differ.
    status.allocated_at = lease.map(|l| Time(whole_seconds(l.allocated_at)));
    status.lease_uid = lease.map(|l| l.uid.clone());
    status.node = lease.map(|_| node.to_owned());
    status.pid = lease.and_then(|l| l.process).map(|p| p.pid);
    status.process_start_time = lease
        .and_then(|l| l.process)
        .map(|p| i64::try_from(p.start_time).unwrap_or(i64::MAX));
}

/// `t` without its fraction of a second, as `metav1.Time` carries it.
pub fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// Reads the lease `node` wrote into `status`, if there is a complete one.
pub fn lease_from_status(key: &str, status: &VncSessionStatus, node: &str) -> Option<Lease> {
    if status.node.as_deref() != Some(node) {
        return None;
    }
    let port = u16::try_from(status.port?).ok().filter(|p| *p != 0)?;
    let target: Endpoint = status.target.as_deref()?.parse().ok()?;
    let process = match (status.pid, status.process_start_time) {
        (Some(pid), Some(st)) => Some(ProcRef {
            pid,
            start_time: u64::try_from(st).ok()?,
        }),
        _ => None,
    };
    Some(Lease {
        session: key.to_owned(),
        port,
        target,
        uid: status.lease_uid.clone()?,
        // The token lives in a Secret; `load` fills it in.
        token: None,
        process,
        allocated_at: status.allocated_at.as_ref()?.0,
    })
}

/// What a write does to a session's expiry record (`status.expired`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ExpiryOp {
    #[default]
    Keep,
    Set(Expiry),
    Clear,
}

impl ExpiryOp {
    fn apply(&self, status: &mut VncSessionStatus) {
        match self {
            ExpiryOp::Keep => {}
            ExpiryOp::Set(e) => {
                status.expired = Some(ExpiredStatus {
                    generation: e.generation,
                    reason: e.reason.clone(),
                    message: e.message.clone(),
                    at: Time(whole_seconds(e.at)),
                });
            }
            ExpiryOp::Clear => status.expired = None,
        }
    }
}

/// One API write a commit needs: every change of one session in one pass goes into a
/// single write, because two writes of one object in flight at once would conflict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Persist a new or changed lease.
    Lease {
        lease: Lease,
        /// The lease is new (not a retarget of an existing one).
        new: bool,
        /// The lease carries a token not yet in its Secret.
        secret: bool,
        expiry: ExpiryOp,
    },
    /// Clear a lease.
    Release { lease: Lease, expiry: ExpiryOp },
    /// Only record or forget an expiry.
    Expiry { key: String, expiry: ExpiryOp },
}

impl Write {
    fn key(&self) -> &str {
        match self {
            Write::Lease { lease, .. } | Write::Release { lease, .. } => &lease.session,
            Write::Expiry { key, .. } => key,
        }
    }

    fn expiry_mut(&mut self) -> &mut ExpiryOp {
        match self {
            Write::Lease { expiry, .. }
            | Write::Release { expiry, .. }
            | Write::Expiry { expiry, .. } => expiry,
        }
    }
}

/// Which changes need a write now. A change that only records the proxy process of an
/// unchanged lease is deferred to the status sink (see the module docs). Returns the
/// writes with the indices of the changes each one persists.
pub fn plan_writes(
    current: &BTreeMap<String, Lease>,
    changes: &[LeaseChange],
) -> Vec<(Vec<usize>, Write)> {
    let mut out: Vec<(Vec<usize>, Write)> = Vec::new();
    let mut slot: BTreeMap<String, usize> = BTreeMap::new();
    for (i, change) in changes.iter().enumerate() {
        let (key, write) = match change {
            LeaseChange::Put(lease) => {
                let prev = current.get(&lease.session);
                let record_only = prev.is_some_and(|p| {
                    p.uid == lease.uid
                        && p.port == lease.port
                        && p.target == lease.target
                        && p.allocated_at == lease.allocated_at
                        && p.token == lease.token
                });
                if record_only {
                    continue;
                }
                let secret = lease.token.is_some()
                    && prev.is_none_or(|p| p.uid != lease.uid || p.token != lease.token);
                let write = Write::Lease {
                    lease: lease.clone(),
                    new: prev.is_none(),
                    secret,
                    expiry: ExpiryOp::Keep,
                };
                (&lease.session, write)
            }
            LeaseChange::Remove(session) => {
                let Some(lease) = current.get(session) else {
                    continue;
                };
                let write = Write::Release {
                    lease: lease.clone(),
                    expiry: ExpiryOp::Keep,
                };
                (session, write)
            }
            LeaseChange::Expire(session, e) => {
                let op = ExpiryOp::Set(e.clone());
                let write = Write::Expiry {
                    key: session.clone(),
                    expiry: op,
                };
                (session, write)
            }
            LeaseChange::Unexpire(session) => {
                let write = Write::Expiry {
                    key: session.clone(),
                    expiry: ExpiryOp::Clear,
                };
                (session, write)
            }
        };
        match slot.get(key) {
            Some(&at) => {
                let (indices, merged) = &mut out[at];
                indices.push(i);
                match write {
                    Write::Expiry { expiry, .. } => *merged.expiry_mut() = expiry,
                    mut other => {
                        *other.expiry_mut() = std::mem::take(merged.expiry_mut());
                        *merged = other;
                    }
                }
            }
            None => {
                slot.insert(key.clone(), out.len());
                out.push((vec![i], write));
            }
        }
    }
    out
}

/// Why one write failed.
#[derive(Debug)]
enum Failure {
    /// The object changed or vanished underneath: reload and plan again.
    Stale(String),
    Api(String),
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
            let page = self.list_api.list(&params).await?;
            out.extend(page.items);
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(out),
            }
        }
    }

    async fn perform(&self, write: &Write) -> Result<(), Failure> {
        match write {
            Write::Lease {
                lease,
                new,
                secret,
                expiry,
            } => self.put(lease, *new, *secret, expiry).await,
            Write::Release { lease, expiry } => self.release(lease, expiry).await,
            Write::Expiry { key, expiry } => self.set_expiry(key, expiry).await,
        }
    }

    /// Writes the token Secret of `lease`, before its lease reaches status, so that a
    /// status naming a Secret always names one that exists.
    async fn write_secret(&self, known: &Known, lease: &Lease) -> Result<(), Failure> {
        let Some(token) = lease.token.as_deref() else {
            return Ok(());
        };
        let url = self.url.url(lease.port, Some(token));
        let secret = TokenSecret {
            namespace: &known.namespace,
            session: &known.name,
            session_uid: &known.uid,
            node: &self.node,
            lease_uid: &lease.uid,
            token,
            url: &url,
        }
        .object();
        self.writer
            .apply_secret(&secret)
            .await
            .map(drop)
            .map_err(|e| {
                Failure::Api(format!(
                    "{}: cannot write token Secret {}: {e}",
                    lease.session,
                    token::secret_name(&known.name)
                ))
            })
    }

    /// Deletes the token Secret of `lease`, unless it was rewritten for another lease
    /// since. A Secret left behind holds a dead token and goes with its VncSession.
    async fn delete_secret(&self, lease: &Lease) {
        let Some((ns, name)) = split_key(&lease.session) else {
            return;
        };
        let secret_name = token::secret_name(name);
        let result = match self.writer.get_secret(ns, &secret_name).await {
            Ok(Some(secret)) if token::lease_uid_of(&secret) == Some(lease.uid.as_str()) => {
                let rv = secret.metadata.resource_version.unwrap_or_default();
                self.writer.delete_secret(ns, &secret_name, &rv).await
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            warn!(session = %lease.session, secret = %secret_name, error = %e, "cannot delete the token Secret; it holds a dead token and goes with its VncSession");
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
            Err(e) => Err(Failure::Api(format!(
                "{key}: cannot record the expiry: {e}"
            ))),
        }
    }

    async fn put(
        &self,
        lease: &Lease,
        new: bool,
        secret: bool,
        expiry: &ExpiryOp,
    ) -> Result<(), Failure> {
        let key = &lease.session;
        let Some(known) = self.objects.get(key) else {
            return Err(Failure::Stale(format!("{key} is no longer known")));
        };
        if secret {
            self.write_secret(&known, lease).await?;
        }
        let mut status = known.status.clone();
        put_lease_fields(&mut status, Some(lease), &self.node, &self.url);
        expiry.apply(&mut status);
        if status.phase.is_none() {
            // The words the plan reports for this pass, so the sink's first status adds
            // nothing but the pid, which waits for the Ready write.
            let message = format!("leasing port {}", lease.port);
            status.phase = Some(Phase::Pending);
            status.reason = Some(reason::ALLOCATING.into());
            status.message = Some(message.clone());
            status.observed_generation = known.generation;
            status.conditions = vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: reason::ALLOCATING.into(),
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
                return Err(Failure::Api(format!(
                    "{key}: cannot write lease of port {}: {e}",
                    lease.port
                )));
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
                    Err(e) => return Err(Failure::Api(format!("{key}: {e}"))),
                },
            };
            let holds = k.status.lease_uid.as_deref() == Some(lease.uid.as_str());
            let free = k.status.lease_uid.is_none();
            if !holds && !free {
                // Another node leased it since: nothing of ours is left on the object.
                return self.released(lease, Some(&k)).await;
            }
            let result = if k.deleting || (!holds && !k.watched) {
                // Being deleted: only the finalizer matters, the object is going away.
                if k.has_finalizer() {
                    self.writer.set_finalizer(&k, false).await
                } else {
                    return self.released(lease, Some(&k)).await;
                }
            } else if holds {
                // A status that keeps saying Ready without a port would be a lie; the sink
                // writes the next state if this node still serves the session.
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
                self.writer.apply_status(&k, &status).await
            } else {
                return self.released(lease, Some(&k)).await;
            };
            match result {
                Ok(obj) => {
                    self.objects.observe(&obj);
                    if let Some(k) = self.objects.get(key)
                        && !k.watched
                        && !k.deleting
                        && k.has_finalizer()
                    {
                        // Not ours any more: another node adds its own finalizer.
                        match self.writer.set_finalizer(&k, false).await {
                            Ok(obj) => {
                                self.objects.observe(&obj);
                            }
                            Err(e) => debug!(session = %key, error = %e, "cannot drop finalizer"),
                        }
                    }
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
                    return Err(Failure::Api(format!(
                        "{key}: cannot release port {}: {e}",
                        lease.port
                    )));
                }
            }
        }
        Err(Failure::Stale(format!(
            "{key}: kept changing while port {} was released",
            lease.port
        )))
    }

    async fn released(&self, lease: &Lease, known: Option<&Known>) -> Result<(), Failure> {
        self.delete_secret(lease).await;
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

impl KubeStatusStore {
    /// Gives each lease read from status its token, from memory when this vncd wrote it,
    /// else from its Secret. A lease whose Secret is gone or was written for another
    /// lease is dropped: vncd never serves a console without its token, so the proxy is
    /// replaced (as an orphan) under a new lease and a new Secret.
    async fn with_tokens(&mut self, found: Vec<Lease>) -> Result<Vec<Lease>, StoreError> {
        let known = &self.set.leases;
        let writer = &self.writer;
        let results: Vec<(Lease, Result<Option<String>, kube::Error>)> = stream::iter(found)
            .map(|mut l| async move {
                if let Some(mine) = known.get(&l.session).filter(|m| m.uid == l.uid) {
                    l.token.clone_from(&mine.token);
                }
                if l.token.is_some() {
                    return (l, Ok(None));
                }
                let Some((ns, name)) = split_key(&l.session) else {
                    return (l, Ok(None));
                };
                let got = writer.get_secret(ns, &token::secret_name(name)).await;
                let token = got.map(|s| s.and_then(|s| token::token_for_lease(&s, &l.uid)));
                (l, token)
            })
            .buffer_unordered(PARALLEL_WRITES)
            .collect()
            .await;
        let mut out = Vec::with_capacity(results.len());
        for (mut l, token) in results {
            match token {
                Ok(t) => {
                    if t.is_some() {
                        l.token = t;
                    }
                    if l.token.is_some() {
                        out.push(l);
                    } else {
                        warn!(session = %l.session, port = l.port, secret = %token::secret_name(split_key(&l.session).map_or("", |(_, n)| n)), "the token Secret of this lease is missing or belongs to another lease; its proxy will be replaced under a new token");
                    }
                }
                Err(e) => {
                    self.backoff.fail();
                    return Err(StoreError::Api {
                        object: l.session.clone(),
                        detail: format!("cannot read the token Secret: {e}"),
                    });
                }
            }
        }
        Ok(out)
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
                return Err(StoreError::Api {
                    object: format!("list (spec.nodeName={})", self.node),
                    detail: e.to_string(),
                });
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
        let mut found = self.with_tokens(found).await?;
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
        let this = &*self;
        let results: Vec<(Vec<usize>, &'static str, Result<(), Failure>)> = stream::iter(writes)
            .map(|(i, w)| async move {
                let kind = match &w {
                    Write::Lease { .. } => "lease",
                    Write::Release { .. } => "release",
                    Write::Expiry { .. } => "expiry",
                };
                debug!(session = %w.key(), kind, "writing");
                (i, kind, this.perform(&w).await)
            })
            .buffer_unordered(PARALLEL_WRITES)
            .collect()
            .await;
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
        let mut stale = None;
        let mut api = None;
        for (_, kind, r) in results {
            match r {
                Err(Failure::Stale(d)) => stale = Some(format!("{kind} {d}")),
                Err(Failure::Api(d)) => api = Some(d),
                Ok(()) => {}
            }
        }
        if let Some(detail) = api {
            let wait = self.backoff.fail();
            warn!(
                retry_in_ms = wait.as_millis() as u64,
                "API error while writing leases; backing off"
            );
            return Err(StoreError::Api {
                object: detail.split(':').next().unwrap_or_default().to_owned(),
                detail,
            });
        }
        debug!(detail = ?stale, "a session changed underneath; reloading");
        Err(StoreError::Conflict {
            expected: base,
            found: self.set.revision,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(session: &str, port: u16) -> Lease {
        Lease::new(
            session,
            port,
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 5901,
            },
            Timestamp::now(),
        )
    }

    fn url() -> UrlStyle {
        UrlStyle {
            public_host: "node1.example".into(),
            web: false,
            tls: false,
        }
    }

    #[test]
    fn a_lease_round_trips_through_the_status() {
        let mut l = lease("ns/vm1", 6100);
        // The API keeps whole seconds of allocatedAt.
        l.allocated_at = whole_seconds(l.allocated_at);
        l.process = Some(ProcRef {
            pid: 42,
            start_time: 12345,
        });
        let mut st = VncSessionStatus::default();
        put_lease_fields(&mut st, Some(&l), "n1", &url());
        assert_eq!(st.port, Some(6100));
        assert_eq!(st.url.as_deref(), Some("ws://node1.example:6100/"));
        assert_eq!(st.node.as_deref(), Some("n1"));
        assert_eq!(st.target.as_deref(), Some("127.0.0.1:5901"));
        assert_eq!(st.process_start_time, Some(12345));
        // Everything but the token, which the Secret holds (`load` adds it).
        let without_token = Lease {
            token: None,
            ..l.clone()
        };
        assert_eq!(lease_from_status("ns/vm1", &st, "n1"), Some(without_token));
        // Another node's lease is not ours to adopt.
        assert_eq!(lease_from_status("ns/vm1", &st, "n2"), None);
        // Without a process the lease still stands (the proxy is found by its uid).
        st.pid = None;
        let back = lease_from_status("ns/vm1", &st, "n1").unwrap();
        assert_eq!(back.process, None);
        assert_eq!(back.uid, l.uid);
    }

    #[test]
    fn written_times_are_whole_seconds_like_the_api_stores_them() {
        let l = lease("ns/vm1", 6100);
        let mut st = VncSessionStatus::default();
        put_lease_fields(&mut st, Some(&l), "n1", &url());
        let json = serde_json::to_value(&st).unwrap();
        let back: VncSessionStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, st, "a status survives the API's round trip unchanged");
    }

    #[test]
    fn clearing_removes_every_lease_field() {
        let mut st = VncSessionStatus::default();
        put_lease_fields(&mut st, Some(&lease("ns/vm1", 6100)), "n1", &url());
        st.phase = Some(Phase::Ready);
        put_lease_fields(&mut st, None, "n1", &url());
        assert_eq!(
            st,
            VncSessionStatus {
                phase: Some(Phase::Ready),
                ..VncSessionStatus::default()
            }
        );
    }

    #[test]
    fn incomplete_statuses_hold_no_lease() {
        let mut st = VncSessionStatus::default();
        put_lease_fields(&mut st, Some(&lease("ns/vm1", 6100)), "n1", &url());
        for broken in [
            VncSessionStatus {
                port: Some(70000),
                ..st.clone()
            },
            VncSessionStatus {
                lease_uid: None,
                ..st.clone()
            },
            VncSessionStatus {
                target: Some("nonsense".into()),
                ..st.clone()
            },
            VncSessionStatus {
                allocated_at: None,
                ..st.clone()
            },
        ] {
            assert_eq!(
                lease_from_status("ns/vm1", &broken, "n1"),
                None,
                "{broken:?}"
            );
        }
    }

    #[test]
    fn recording_a_pid_is_deferred_but_lease_changes_are_written() {
        let old = lease("ns/a", 6100);
        let current = BTreeMap::from([("ns/a".to_owned(), old.clone())]);
        let mut recorded = old.clone();
        recorded.process = Some(ProcRef {
            pid: 7,
            start_time: 1,
        });
        let mut retargeted = old.clone();
        retargeted.target = Endpoint::Unix { path: "/s".into() };
        let fresh = lease("ns/b", 6101);
        let changes = vec![
            LeaseChange::Put(recorded),
            LeaseChange::Put(fresh.clone()),
            LeaseChange::Remove("ns/gone".into()),
        ];
        let w = plan_writes(&current, &changes);
        assert_eq!(
            w,
            vec![(
                vec![1],
                Write::Lease {
                    lease: fresh,
                    new: true,
                    secret: true,
                    expiry: ExpiryOp::Keep,
                }
            )]
        );
        // A retarget keeps the lease's token: no new Secret.
        let w = plan_writes(&current, &[LeaseChange::Put(retargeted.clone())]);
        assert_eq!(
            w,
            vec![(
                vec![0],
                Write::Lease {
                    lease: retargeted,
                    new: false,
                    secret: false,
                    expiry: ExpiryOp::Keep,
                }
            )]
        );
    }

    #[test]
    fn changes_of_one_session_become_one_write() {
        let old = lease("ns/a", 6100);
        let current = BTreeMap::from([("ns/a".to_owned(), old.clone())]);
        let expiry = Expiry {
            generation: 2,
            reason: "IdleTimeout".into(),
            message: "no client for 60 s".into(),
            at: Timestamp::now(),
        };
        // Expired with no proxy left: expiry and release go in the same write.
        let w = plan_writes(
            &current,
            &[
                LeaseChange::Expire("ns/a".into(), expiry.clone()),
                LeaseChange::Remove("ns/a".into()),
            ],
        );
        assert_eq!(
            w,
            vec![(
                vec![0, 1],
                Write::Release {
                    lease: old,
                    expiry: ExpiryOp::Set(expiry),
                }
            )]
        );
        // A changed spec: the expiry is forgotten in the write of the new lease.
        let fresh = lease("ns/b", 6101);
        let w = plan_writes(
            &current,
            &[
                LeaseChange::Unexpire("ns/b".into()),
                LeaseChange::Put(fresh.clone()),
                LeaseChange::Unexpire("ns/gone".into()),
            ],
        );
        assert_eq!(
            w,
            vec![
                (
                    vec![0, 1],
                    Write::Lease {
                        lease: fresh,
                        new: true,
                        secret: true,
                        expiry: ExpiryOp::Clear,
                    }
                ),
                (
                    vec![2],
                    Write::Expiry {
                        key: "ns/gone".into(),
                        expiry: ExpiryOp::Clear,
                    }
                ),
            ]
        );
    }

    #[test]
    fn status_names_the_token_secret_but_never_holds_the_token() {
        let l = lease("ns/vm1", 6100);
        let token = l.token.clone().unwrap();
        let mut st = VncSessionStatus::default();
        put_lease_fields(&mut st, Some(&l), "n1", &url());
        let json = serde_json::to_string(&st).unwrap();
        assert!(!json.contains(&token), "{json}");
        let r = st.token_secret_ref.unwrap();
        assert_eq!(
            (r.name.as_str(), r.key.as_str()),
            ("vm1-vncd-token", "token")
        );
    }
}
