//! The Kubernetes status sink: statuses go to each VncSession's status subresource.
//!
//! The sink writes only what differs from what the server holds, and it writes little:
//! - a change of `phase` is written at once (Ready, Failed and Terminating are what
//!   clients wait for);
//! - any other change (a message, the pid, a Pending reason) waits until it has stood for
//!   [`SETTLE`], or [`PROGRESS_SETTLE`] while the session merely makes progress
//!   (Allocating, Queued, Starting), so a proxy goes from the lease write straight to one
//!   `Ready` write even when hundreds start at once. A session stuck in Pending for a
//!   reason that needs attention (PortConflict, PoolExhausted, ...) shows it after
//!   [`SETTLE`]; a message that keeps changing (a countdown) is written at most every
//!   [`MIN_GAP`].
//!
//! With the lease store's single lease write that makes two status writes from creation to
//! Ready (plus one finalizer patch unless the creator set `vncd.io/cleanup` already).
//!
//! Each write is a server-side apply of vncd's whole status (lease fields from the lease
//! store's current set, report fields from the controller), guarded by the object's
//! `resourceVersion`. Objects this node's watch does not deliver are never written here.
//! Events for Ready, Failed and PortConflict are emitted for the transitions written.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use tracing::{debug, warn};

use super::{StatusSink, UrlStyle};
use crate::api::{Phase, VncSession, VncSessionStatus};
use crate::health::Synced;
use crate::k8s::events::{Events, Reason};
use crate::k8s::lease_fields::put_lease_fields;
use crate::k8s::objects::{Known, Objects};
use crate::k8s::writer::{Backoff, Writer};
use crate::k8s::{is_conflict, is_not_found, session_key};
use crate::lease::Lease;
use crate::reconcile::Reason as StatusReason;

/// How long a change that keeps the phase must stand before it is written.
///
/// Long enough for a proxy that starts normally (websockify needs 0.3-3 s, more when many
/// start at once) to go from its lease straight to Ready; short enough that a session
/// stuck in Pending shows its real reason (Queued, PortInUse, ...) within seconds.
pub const SETTLE: Duration = Duration::from_secs(5);
/// How long a Pending session may show its lease write's words while it merely makes
/// normal progress ([`PROGRESS`] reasons), before its current reason is written anyway.
pub const PROGRESS_SETTLE: Duration = Duration::from_secs(120);
/// Pending reasons that mean "on its way": not worth a write of their own when many
/// sessions start at once. Problems (PortConflict, PortInUse, PoolExhausted, ...) are.
pub const PROGRESS: [StatusReason; 3] = [
    StatusReason::Allocating,
    StatusReason::Queued,
    StatusReason::Starting,
];
/// Least time between two writes of one object that keep its phase.
pub const MIN_GAP: Duration = Duration::from_secs(10);
/// Writes in flight at once.
const PARALLEL_WRITES: usize = 16;

/// The key of a built status item: the object's `namespace/name`, or, for items built
/// without an object (rejected or lease-only), the name, which already is the key.
pub fn item_key(item: &VncSession) -> Option<String> {
    let name = item.metadata.name.as_deref()?;
    Some(match item.metadata.namespace.as_deref() {
        Some(ns) => session_key(ns, name),
        None => name.to_owned(),
    })
}

/// The status vncd wants on the object: report fields from `report`, lease fields from
/// `lease`, generation from the object. A condition that did not flip keeps the
/// server's transition time, so a restarted vncd rewrites nothing.
pub fn compose(
    report: &VncSessionStatus,
    lease: Option<&Lease>,
    known: &Known,
    node: &str,
    url: &UrlStyle,
) -> VncSessionStatus {
    let mut s = VncSessionStatus {
        phase: report.phase,
        reason: report.reason.clone(),
        message: report.message.clone(),
        observed_generation: known.generation,
        conditions: report.conditions.clone(),
        ..VncSessionStatus::default()
    };
    put_lease_fields(&mut s, lease, node, url);
    // The lease store records and forgets expiries; the sink carries them unchanged.
    s.expired.clone_from(&known.status.expired);
    for c in &mut s.conditions {
        c.observed_generation = known.generation;
        if let Some(old) = known
            .status
            .conditions
            .iter()
            .find(|o| o.type_ == c.type_ && o.status == c.status)
        {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }
    s
}

/// The status fields that differ between `a` and `b` (for the debug log).
pub fn differing_fields(a: &VncSessionStatus, b: &VncSessionStatus) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// Whether a write is due now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Nothing differs.
    Same,
    /// Differs; write now.
    Now,
    /// Differs, but waits (see the module docs).
    Later,
}

/// Decides whether `want` must be written over `have`, given when the difference was
/// first seen and when the object was last written.
pub fn due(
    want: &VncSessionStatus,
    have: &VncSessionStatus,
    first_seen: Option<Instant>,
    last_write: Option<Instant>,
    now: Instant,
) -> Due {
    if want == have {
        return Due::Same;
    }
    if want.phase != have.phase {
        return Due::Now;
    }
    let progress = want.phase == Some(Phase::Pending)
        && want
            .reason
            .as_deref()
            .and_then(StatusReason::parse)
            .is_some_and(|r| PROGRESS.contains(&r));
    let settle = if progress { PROGRESS_SETTLE } else { SETTLE };
    let settled = first_seen.is_some_and(|t| now.duration_since(t) >= settle);
    let gap_ok = last_write.is_none_or(|t| now.duration_since(t) >= MIN_GAP);
    if settled && gap_ok {
        Due::Now
    } else {
        Due::Later
    }
}

/// The events a written transition deserves.
pub fn transition_events(
    have: &VncSessionStatus,
    want: &VncSessionStatus,
) -> Vec<(Reason, String)> {
    let mut out = Vec::new();
    let msg = want.message.clone().unwrap_or_default();
    if want.phase == Some(Phase::Ready) && have.phase != Some(Phase::Ready) {
        let url = want.url.clone().unwrap_or_default();
        out.push((Reason::Ready, format!("console ready at {url} ({msg})")));
    }
    if want.phase == Some(Phase::Failed)
        && (have.phase != Some(Phase::Failed) || have.reason != want.reason)
    {
        out.push((Reason::Failed, msg.clone()));
    }
    let conflict = |r: &Option<String>| {
        matches!(
            r.as_deref().and_then(StatusReason::parse),
            Some(StatusReason::PortConflict | StatusReason::PortInUse)
        )
    };
    if conflict(&want.reason) && want.reason != have.reason {
        out.push((Reason::PortConflict, msg));
    }
    out
}

#[derive(Debug, Default)]
struct Track {
    first_seen: Option<Instant>,
    last_write: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Backoff,
}

/// The sink. See the module docs.
#[derive(Debug)]
pub struct KubeStatusSink {
    writer: Writer,
    objects: Objects,
    node: String,
    url: UrlStyle,
    events: Events,
    synced: Synced,
    track: BTreeMap<String, Track>,
}

enum Job {
    Status {
        key: String,
        known: Known,
        want: Box<VncSessionStatus>,
    },
    Finalizer {
        key: String,
        known: Known,
        add: bool,
    },
}

impl KubeStatusSink {
    pub fn new(
        writer: Writer,
        objects: Objects,
        node: &str,
        url: UrlStyle,
        events: Events,
        synced: Synced,
    ) -> Self {
        KubeStatusSink {
            writer,
            objects,
            node: node.to_owned(),
            url,
            events,
            synced,
            track: BTreeMap::new(),
        }
    }

    /// The writes due now, and bookkeeping for the ones that wait.
    fn jobs(&mut self, items: &[VncSession], now: Instant) -> Vec<Job> {
        let mut jobs = Vec::new();
        let mut live = std::collections::BTreeSet::new();
        for item in items {
            let Some(key) = item_key(item) else { continue };
            let Some(known) = self.objects.get(&key).filter(|k| k.watched) else {
                continue;
            };
            live.insert(key.clone());
            let report = item.status.clone().unwrap_or_default();
            let lease = self.objects.lease(&key);
            let want = compose(&report, lease.as_ref(), &known, &self.node, &self.url);
            let t = self.track.entry(key.clone()).or_default();
            match due(&want, &known.status, t.first_seen, t.last_write, now) {
                Due::Same => t.first_seen = None,
                Due::Later => {
                    t.first_seen.get_or_insert(now);
                }
                Due::Now if t.retry_at.is_some_and(|r| r > now) => {}
                Due::Now => jobs.push(Job::Status {
                    key,
                    known,
                    want: Box::new(want),
                }),
            }
        }
        // Finalizers: on every leased session of ours, off a deleting session we no
        // longer lease (a lost lease must never block a deletion).
        for known in self.objects.all() {
            if !known.watched {
                continue;
            }
            let key = known.key();
            let leased = self.objects.leased(&key);
            let add = leased && !known.deleting && !known.has_finalizer();
            let remove = !leased && known.deleting && known.has_finalizer();
            let waiting = self
                .track
                .get(&key)
                .and_then(|t| t.retry_at)
                .is_some_and(|r| r > now);
            if (add || remove) && !waiting {
                live.insert(key.clone());
                jobs.push(Job::Finalizer { key, known, add });
            }
        }
        self.track
            .retain(|k, _| live.contains(k) || self.objects.get(k).is_some());
        jobs
    }

    async fn run(
        &self,
        job: Job,
    ) -> (
        String,
        Result<Option<(VncSessionStatus, VncSessionStatus, Known)>, kube::Error>,
    ) {
        match job {
            Job::Status { key, known, want } => {
                debug!(session = %key, fields = ?differing_fields(&known.status, &want), "writing status");
                let r = self.writer.apply_status(&known, &want).await;
                let r = r.map(|obj| {
                    self.objects.observe(&obj);
                    Some((known.status.clone(), *want, known))
                });
                (key, r)
            }
            Job::Finalizer { key, known, add } => {
                let r = self.writer.set_finalizer(&known, add).await.map(|obj| {
                    self.objects.observe(&obj);
                    None
                });
                (key, r)
            }
        }
    }
}

impl StatusSink for KubeStatusSink {
    async fn publish(&mut self, items: &[VncSession]) {
        let now = Instant::now();
        let jobs = self.jobs(items, now);
        let this = &*self;
        let results: Vec<_> = stream::iter(jobs)
            .map(|job| this.run(job))
            .buffer_unordered(PARALLEL_WRITES)
            .collect()
            .await;
        for (key, result) in results {
            let t = self.track.entry(key.clone()).or_default();
            match result {
                Ok(written) => {
                    t.backoff.succeed();
                    t.retry_at = None;
                    if let Some((have, want, known)) = written {
                        t.first_seen = None;
                        t.last_write = Some(now);
                        for (reason, note) in transition_events(&have, &want) {
                            self.events.emit(reason, known.reference(), note);
                        }
                    }
                }
                Err(e) => {
                    let wait = t.backoff.fail();
                    t.retry_at = Some(now + wait);
                    if is_conflict(&e) || is_not_found(&e) {
                        // The watch brings the newer object; the next pass uses it.
                        debug!(session = %key, error = %e, "status write raced another change; retrying");
                    } else {
                        warn!(session = %key, error = %e, retry_in_ms = wait.as_millis() as u64, "cannot write status; retrying");
                    }
                }
            }
        }
        self.synced.set();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Endpoint;
    use jiff::Timestamp;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn url() -> UrlStyle {
        UrlStyle {
            public_host: "h".into(),
            web: false,
            tls: false,
        }
    }

    fn known(status: VncSessionStatus) -> Known {
        Known {
            namespace: "ns".into(),
            name: "vm1".into(),
            uid: "u".into(),
            resource_version: "1".into(),
            generation: Some(4),
            deleting: false,
            finalizers: vec![],
            node_name: Some("n1".into()),
            status,
            watched: true,
        }
    }

    fn report(phase: Phase, why: StatusReason, ready: bool, at: Timestamp) -> VncSessionStatus {
        let why = why.as_str();
        VncSessionStatus {
            phase: Some(phase),
            reason: Some(why.into()),
            message: Some(format!("{why} message")),
            observed_generation: Some(123_456),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                reason: why.into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(at),
            }],
            ..VncSessionStatus::default()
        }
    }

    #[test]
    fn composed_statuses_carry_lease_fields_and_the_object_generation() {
        let lease = Lease::new(
            "ns/vm1",
            6100,
            Endpoint::Unix { path: "/s".into() },
            Timestamp::now(),
        );
        let k = known(VncSessionStatus::default());
        let s = compose(
            &report(Phase::Ready, StatusReason::Ready, true, Timestamp::now()),
            Some(&lease),
            &k,
            "n1",
            &url(),
        );
        assert_eq!(s.port, Some(6100));
        assert_eq!(s.lease_uid.as_deref(), Some(lease.uid.as_str()));
        assert_eq!(s.node.as_deref(), Some("n1"));
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(s.conditions[0].observed_generation, Some(4));
    }

    #[test]
    fn an_unflipped_condition_keeps_the_servers_transition_time() {
        let earlier = Timestamp::from_second(1_000_000).unwrap();
        let k = known(VncSessionStatus::default());
        let on_server = compose(
            &report(Phase::Ready, StatusReason::Ready, true, earlier),
            None,
            &k,
            "n1",
            &url(),
        );
        let k = known(on_server.clone());
        // A restarted vncd builds the same report with a fresh timestamp.
        let again = compose(
            &report(Phase::Ready, StatusReason::Ready, true, Timestamp::now()),
            None,
            &k,
            "n1",
            &url(),
        );
        assert_eq!(again, on_server, "nothing to write after a restart");
        let flipped = compose(
            &report(
                Phase::Failed,
                StatusReason::ProxyFailed,
                false,
                Timestamp::now(),
            ),
            None,
            &k,
            "n1",
            &url(),
        );
        assert_ne!(flipped.conditions[0].last_transition_time, Time(earlier));
    }

    #[test]
    fn phase_changes_are_written_at_once_and_the_rest_is_coalesced() {
        let t0 = Instant::now();
        let pending = report(
            Phase::Pending,
            StatusReason::Allocating,
            false,
            Timestamp::now(),
        );
        let starting = report(
            Phase::Pending,
            StatusReason::Starting,
            false,
            Timestamp::now(),
        );
        let ready = report(Phase::Ready, StatusReason::Ready, true, Timestamp::now());
        assert_eq!(due(&pending, &pending, None, None, t0), Due::Same);
        assert_eq!(due(&ready, &pending, None, Some(t0), t0), Due::Now);
        assert_eq!(due(&starting, &pending, None, None, t0), Due::Later);
        // Normal progress waits long; a problem shows after SETTLE.
        assert_eq!(
            due(&starting, &pending, Some(t0), None, t0 + SETTLE),
            Due::Later
        );
        assert_eq!(
            due(&starting, &pending, Some(t0), None, t0 + PROGRESS_SETTLE),
            Due::Now
        );
        let conflict = report(
            Phase::Pending,
            StatusReason::PortConflict,
            false,
            Timestamp::now(),
        );
        assert_eq!(
            due(&conflict, &pending, Some(t0), None, t0 + SETTLE / 2),
            Due::Later
        );
        assert_eq!(
            due(&conflict, &pending, Some(t0), None, t0 + SETTLE),
            Due::Now
        );
        // A message that keeps changing is written at most every MIN_GAP.
        assert_eq!(
            due(&conflict, &pending, Some(t0), Some(t0), t0 + SETTLE),
            Due::Later
        );
        assert_eq!(
            due(&conflict, &pending, Some(t0), Some(t0), t0 + MIN_GAP),
            Due::Now
        );
    }

    #[test]
    fn transitions_raise_the_right_events() {
        let at = Timestamp::now();
        let pending = report(Phase::Pending, StatusReason::Starting, false, at);
        let ready = report(Phase::Ready, StatusReason::Ready, true, at);
        let failed = report(Phase::Failed, StatusReason::ProxyFailed, false, at);
        let conflict = report(Phase::Pending, StatusReason::PortConflict, false, at);
        let kinds = |h: &VncSessionStatus, w: &VncSessionStatus| {
            transition_events(h, w)
                .into_iter()
                .map(|(r, _)| r)
                .collect::<Vec<_>>()
        };
        assert_eq!(kinds(&pending, &ready), [Reason::Ready]);
        assert_eq!(kinds(&ready, &ready), []);
        assert_eq!(kinds(&ready, &failed), [Reason::Failed]);
        assert_eq!(kinds(&failed, &failed), []);
        assert_eq!(kinds(&pending, &conflict), [Reason::PortConflict]);
        assert_eq!(kinds(&conflict, &conflict), []);
    }

    #[test]
    fn differing_fields_are_named() {
        let a = report(
            Phase::Pending,
            StatusReason::Starting,
            false,
            Timestamp::now(),
        );
        let mut b = a.clone();
        assert!(differing_fields(&a, &b).is_empty());
        b.phase = Some(Phase::Ready);
        b.port = Some(1);
        assert_eq!(differing_fields(&a, &b), ["phase", "port"]);
    }

    #[test]
    fn items_map_back_to_session_keys() {
        let mut o = VncSession::new("vm1", crate::api::VncSessionSpec::default());
        assert_eq!(item_key(&o).as_deref(), Some("vm1"));
        o.metadata.namespace = Some("ns".into());
        assert_eq!(item_key(&o).as_deref(), Some("ns/vm1"));
    }
}
