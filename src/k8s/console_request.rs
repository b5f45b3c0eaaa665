//! `VncConsoleRequest`: how a Kubernetes user asks for a console URL (docs/TICKETS.md,
//! "Who may mint in Kubernetes"), and the pure decisions of the vncd that answers it.
//!
//! The API server authenticates the user (any kubeconfig method) and RBAC decides who
//! may `create` a request in a namespace; vncd never sees the user's credentials. The
//! request names a session by its bare name, and the namespace is the request's own, so
//! a request can only ever reach a session in the namespace it was created in.
//!
//! Everything here is plain data in, plain data out; `k8s/console.rs` does the I/O.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::session_key;
use crate::console::{ConsoleUrl, MintError, MintOptions};
use crate::session::is_valid_name;

/// The kind of the request, as the status apply names it.
pub const KIND: &str = "VncConsoleRequest";
/// The ClusterRole the chart ships for users who may open consoles; errors name it.
pub const USER_ROLE: &str = "vncd-console";
/// The condition a successful answer sets (status True).
pub const ISSUED: &str = "Issued";
/// The condition a refusal sets (status True); its reason and message say why.
pub const FAILED: &str = "Failed";

/// A request for one console URL of the session `session` in this request's namespace.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "vncd.io",
    version = "v1alpha1",
    kind = "VncConsoleRequest",
    doc = "A request for a single-use console URL of the VncSession spec.session in the same namespace; the vncd serving that session answers in status.",
    namespaced,
    status = "VncConsoleRequestStatus",
    printcolumn = r#"{"name":"Session","type":"string","jsonPath":".spec.session"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".status.expiresAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VncConsoleRequestSpec {
    /// The VncSession's name, in this request's namespace (a bare name: a request never
    /// reaches another namespace).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub session: String,
    /// How long the URL's ticket is valid, instead of the node's `--ticket-ttl`
    /// (vncd refuses more than 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub ttl_seconds: Option<i64>,
    /// A console without keyboard and mouse (refused until the proxies can enforce it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view_only: Option<bool>,
}

/// vncd's answer. Only vncd writes it (users get no RBAC on the status subresource).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VncConsoleRequestStatus {
    /// The console URL with its single-use ticket. Anyone who may read this request may
    /// use it once, until expiresAt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// When the ticket stops being accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// The node whose vncd answered (it also deletes the request later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `Issued`, or `Failed` with a reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl VncConsoleRequestStatus {
    /// The refusal, if vncd refused: (reason, message).
    pub fn failure(&self) -> Option<(&str, &str)> {
        self.conditions
            .iter()
            .find(|c| c.type_ == FAILED && c.status == "True")
            .map(|c| (c.reason.as_str(), c.message.as_str()))
    }

    /// When vncd answered (either way), from its condition.
    fn answered_at(&self) -> Option<Timestamp> {
        self.conditions
            .iter()
            .find(|c| c.type_ == FAILED || c.type_ == ISSUED)
            .map(|c| c.last_transition_time.0)
    }

    /// vncd has answered: a URL or a refusal.
    pub fn is_answered(&self) -> bool {
        self.url.is_some() || self.failure().is_some()
    }
}

/// How long requests live. A request holds a credential (until it is used or expires) and
/// costs every vncd a watch event, so none is kept longer than it can be of use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// An issued request is deleted this long after its ticket expired; a refused one this
    /// long after the refusal (time enough for `vncd url` or `kubectl get` to read it).
    pub grace: Duration,
    /// A request this instance has seen unanswered for this long is deleted, not answered:
    /// whoever asked has given up (`vncd url` waits 30 s by default). Measured on this
    /// instance's own clock from when it first saw the request, never against
    /// `creationTimestamp`: a node clock minutes off the API server's must not make fresh
    /// requests look stale.
    pub answer_window: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            grace: Duration::from_secs(60),
            answer_window: Duration::from_secs(120),
        }
    }
}

/// What this instance knows of the session a request names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Here {
    /// Its lease is in this instance's store and its proxy runs: mint.
    Served,
    /// It is assigned to this node but not servable now. `ready` is what its status says:
    /// a Ready session missing from the store is a pass away from being served (wait);
    /// any other phase is a refusal.
    Assigned {
        ready: bool,
        phase: Option<crate::api::Phase>,
    },
    /// Not this node's session (another node, no node, or no such session).
    Elsewhere,
}

/// A refusal to write into a request's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub reason: &'static str,
    pub message: String,
}

/// What this instance does with one request now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Mint a URL for the session `key` and write it (or the mint's refusal).
    Mint { key: String, opts: MintOptions },
    /// Write this refusal.
    Refuse(Failure),
    /// Delete the request (its retention ended, or nobody answered it in time).
    Delete,
    /// Not ours, or nothing to do yet.
    Nothing,
}

/// The session key a request names: its own namespace and the bare name in `spec.session`.
/// None if the name is not a valid object name (e.g. `other-ns/vm1`): no session has it.
pub fn target_key(req: &VncConsoleRequest) -> Option<String> {
    let ns = req.metadata.namespace.as_deref()?;
    is_valid_name(&req.spec.session).then(|| session_key(ns, &req.spec.session))
}

/// The mint options a request asks for. A TTL that fits no `Duration` (zero or negative)
/// becomes zero, which the minter refuses with its range.
pub fn mint_options(spec: &VncConsoleRequestSpec) -> MintOptions {
    MintOptions {
        ttl: spec
            .ttl_seconds
            .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0))),
        view_only: spec.view_only.unwrap_or(false),
    }
}

/// Decides what the instance of `node` does with `req` at `now` (this node's clock, the
/// one the answer's times were written with), having seen it for `seen_for`; `here` tells
/// what it knows of a session key.
///
/// Only the instance of the session's node answers or refuses (others ignore the request);
/// an answered request is deleted by the node that answered it, even if its session has
/// gone since.
pub fn step(
    req: &VncConsoleRequest,
    node: &str,
    now: Timestamp,
    seen_for: Duration,
    retention: Retention,
    here: impl Fn(&str) -> Here,
) -> Step {
    let status = req.status.clone().unwrap_or_default();
    if status.is_answered() {
        if status.node.as_deref() != Some(node) {
            return Step::Nothing;
        }
        return match retained_until(&status, retention) {
            Some(until) if now < until => Step::Nothing,
            _ => Step::Delete,
        };
    }
    let Some(key) = target_key(req) else {
        return Step::Nothing;
    };
    let where_ = here(&key);
    if where_ == Here::Elsewhere {
        return Step::Nothing;
    }
    if seen_for > retention.answer_window {
        return Step::Delete;
    }
    match where_ {
        Here::Served => Step::Mint {
            key,
            opts: mint_options(&req.spec),
        },
        Here::Assigned { ready: true, .. } | Here::Elsewhere => Step::Nothing,
        Here::Assigned {
            ready: false,
            phase,
        } => Step::Refuse(Failure {
            reason: "SessionNotReady",
            message: format!(
                "session {:?} in namespace {:?} has no console now (phase {}); retry when it is Ready",
                req.spec.session,
                req.metadata.namespace.as_deref().unwrap_or_default(),
                phase.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
            ),
        }),
    }
}

/// When an answered request may be deleted: its ticket's expiry, or its refusal, plus the
/// grace. None if the status carries neither time (delete it now).
fn retained_until(status: &VncConsoleRequestStatus, retention: Retention) -> Option<Timestamp> {
    let from = match &status.expires_at {
        Some(t) if status.url.is_some() => t.0,
        _ => status.answered_at()?,
    };
    from.checked_add(jiff::SignedDuration::try_from(retention.grace).ok()?)
        .ok()
}

/// The reason word of a mint's refusal.
pub fn failure_of(err: &MintError, namespace: &str, session: &str) -> Failure {
    let reason = match err {
        MintError::Unknown(_) | MintError::NotReady(_) => "SessionNotReady",
        MintError::Ttl(_) => "TTLOutOfRange",
        MintError::ViewOnlyUnsupported => "ViewOnlyUnsupported",
        MintError::Ticket { .. } => "MintFailed",
    };
    let message = match err {
        MintError::Unknown(_) | MintError::NotReady(_) => format!(
            "session {session:?} in namespace {namespace:?} has no console now; retry when it is Ready"
        ),
        other => format!("session {session:?} in namespace {namespace:?}: {other}"),
    };
    Failure { reason, message }
}

fn condition(type_: &str, reason: &str, message: String, now: Timestamp) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: "True".into(),
        reason: reason.to_owned(),
        message,
        last_transition_time: Time(super::lease_fields::whole_seconds(now)),
        observed_generation: None,
    }
}

/// The status that answers a request with `url`.
pub fn issued(url: &ConsoleUrl, node: &str, now: Timestamp) -> VncConsoleRequestStatus {
    let expires = i64::try_from(url.expires_at)
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok());
    VncConsoleRequestStatus {
        url: Some(url.url.clone()),
        expires_at: expires.map(Time),
        node: Some(node.to_owned()),
        conditions: vec![condition(
            ISSUED,
            ISSUED,
            "a single-use console URL was issued".into(),
            now,
        )],
    }
}

/// The status that refuses a request.
pub fn refused(failure: &Failure, node: &str, now: Timestamp) -> VncConsoleRequestStatus {
    VncConsoleRequestStatus {
        node: Some(node.to_owned()),
        conditions: vec![condition(
            FAILED,
            failure.reason,
            failure.message.clone(),
            now,
        )],
        ..VncConsoleRequestStatus::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Phase;

    const NODE: &str = "n1";

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn req(ns: &str, session: &str) -> VncConsoleRequest {
        let mut r = VncConsoleRequest::new(
            "vm1-abcde",
            VncConsoleRequestSpec {
                session: session.into(),
                ttl_seconds: None,
                view_only: None,
            },
        );
        r.metadata.namespace = Some(ns.into());
        r.metadata.creation_timestamp = Some(Time(t(0)));
        r
    }

    fn only(key: &'static str, what: Here) -> impl Fn(&str) -> Here {
        move |k| if k == key { what } else { Here::Elsewhere }
    }

    fn url(expires_at: u64) -> ConsoleUrl {
        ConsoleUrl {
            url: "ws://h:6100/?token=v1.x".into(),
            expires_at,
        }
    }

    #[test]
    fn the_instance_serving_the_session_mints_and_every_other_ignores() {
        let r = req("ns", "vm1");
        let served = only("ns/vm1", Here::Served);
        match step(&r, NODE, t(1), secs(1), Retention::default(), &served) {
            Step::Mint { key, opts } => {
                assert_eq!(key, "ns/vm1");
                assert_eq!(opts, MintOptions::default());
            }
            other => panic!("expected a mint, got {other:?}"),
        }
        let elsewhere = |_: &str| Here::Elsewhere;
        assert_eq!(
            step(&r, NODE, t(1), secs(1), Retention::default(), elsewhere),
            Step::Nothing
        );
    }

    #[test]
    fn a_request_reaches_only_its_own_namespace() {
        // vm1 is served here in namespace "a"; requests from "b" never name it.
        let served = only("a/vm1", Here::Served);
        for (ns, session) in [("b", "vm1"), ("b", "a/vm1"), ("b", "../a/vm1")] {
            let r = req(ns, session);
            assert_eq!(
                step(&r, NODE, t(1), secs(1), Retention::default(), &served),
                Step::Nothing,
                "{ns}: {session}"
            );
        }
        assert_eq!(target_key(&req("b", "a/vm1")), None);
        assert_eq!(target_key(&req("b", "vm1")).as_deref(), Some("b/vm1"));
    }

    #[test]
    fn a_session_of_this_node_that_is_not_ready_is_refused_and_a_ready_one_waited_for() {
        let r = req("ns", "vm1");
        let pending = only(
            "ns/vm1",
            Here::Assigned {
                ready: false,
                phase: Some(Phase::Pending),
            },
        );
        match step(&r, NODE, t(1), secs(1), Retention::default(), pending) {
            Step::Refuse(f) => {
                assert_eq!(f.reason, "SessionNotReady");
                assert!(
                    f.message.contains("\"vm1\" in namespace \"ns\""),
                    "{}",
                    f.message
                );
                assert!(f.message.contains("Pending"), "{}", f.message);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Ready in status but not yet in the store: the next pass publishes it.
        let lagging = only(
            "ns/vm1",
            Here::Assigned {
                ready: true,
                phase: Some(Phase::Ready),
            },
        );
        assert_eq!(
            step(&r, NODE, t(1), secs(1), Retention::default(), lagging),
            Step::Nothing
        );
    }

    #[test]
    fn ttl_and_view_only_pass_through_to_the_minter() {
        let mut r = req("ns", "vm1");
        r.spec.ttl_seconds = Some(30);
        r.spec.view_only = Some(true);
        let o = mint_options(&r.spec);
        assert_eq!(o.ttl, Some(Duration::from_secs(30)));
        assert!(o.view_only);
        r.spec.ttl_seconds = Some(-5);
        assert_eq!(mint_options(&r.spec).ttl, Some(Duration::ZERO));
    }

    #[test]
    fn mint_refusals_become_reasons_that_name_the_session() {
        let f = failure_of(&MintError::Ttl(Duration::from_secs(7200)), "ns", "vm1");
        assert_eq!(f.reason, "TTLOutOfRange");
        assert!(f.message.contains("\"vm1\" in namespace \"ns\""));
        assert!(f.message.contains("3600"), "{}", f.message);
        let f = failure_of(&MintError::ViewOnlyUnsupported, "ns", "vm1");
        assert_eq!(f.reason, "ViewOnlyUnsupported");
        let f = failure_of(&MintError::NotReady("ns/vm1".into()), "ns", "vm1");
        assert_eq!(f.reason, "SessionNotReady");
        assert!(
            !f.message.contains("vncd get"),
            "no standalone advice in Kubernetes"
        );
    }

    #[test]
    fn statuses_carry_the_url_or_the_refusal_and_the_answering_node() {
        let s = issued(&url(1_800_000_060), NODE, t(0));
        assert_eq!(s.url.as_deref(), Some("ws://h:6100/?token=v1.x"));
        assert_eq!(s.expires_at.as_ref().unwrap().0, t(60));
        assert_eq!(s.node.as_deref(), Some(NODE));
        assert!(s.is_answered() && s.failure().is_none());
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["expiresAt"], "2027-01-15T08:01:00Z");
        let f = Failure {
            reason: "TTLOutOfRange",
            message: "too long".into(),
        };
        let s = refused(&f, NODE, t(0));
        assert_eq!(s.url, None);
        assert_eq!(s.failure(), Some(("TTLOutOfRange", "too long")));
        assert!(s.is_answered());
        assert!(!VncConsoleRequestStatus::default().is_answered());
    }

    #[test]
    fn answered_requests_are_deleted_by_the_answering_node_after_their_retention() {
        let ret = Retention {
            grace: Duration::from_secs(60),
            answer_window: Duration::from_secs(120),
        };
        let gone = |_: &str| Here::Elsewhere;
        let mut r = req("ns", "vm1");
        r.status = Some(issued(&url(1_800_000_030), NODE, t(0)));
        // Kept until expiry + grace, even though the session is gone meanwhile.
        assert_eq!(step(&r, NODE, t(89), secs(89), ret, gone), Step::Nothing);
        assert_eq!(step(&r, NODE, t(90), secs(90), ret, gone), Step::Delete);
        // Another node's answer is that node's to delete.
        assert_eq!(
            step(&r, "n2", t(1000), secs(1000), ret, gone),
            Step::Nothing
        );
        // A refusal is kept for the grace after it was written.
        r.status = Some(refused(
            &Failure {
                reason: "SessionNotReady",
                message: String::new(),
            },
            NODE,
            t(10),
        ));
        assert_eq!(step(&r, NODE, t(69), secs(69), ret, gone), Step::Nothing);
        assert_eq!(step(&r, NODE, t(70), secs(70), ret, gone), Step::Delete);
        // An answer is never minted again.
        let served = only("ns/vm1", Here::Served);
        assert_eq!(step(&r, NODE, t(11), secs(11), ret, served), Step::Nothing);
    }

    #[test]
    fn unanswered_requests_past_the_answer_window_are_deleted_by_the_sessions_node_only() {
        let ret = Retention::default();
        let r = req("ns", "vm1");
        let served = only("ns/vm1", Here::Served);
        assert!(matches!(
            step(&r, NODE, t(120), secs(120), ret, &served),
            Step::Mint { .. }
        ));
        assert_eq!(
            step(&r, NODE, t(121), secs(121), ret, &served),
            Step::Delete
        );
        // A node clock an hour ahead of the API server's changes nothing: the window runs
        // from when this instance first saw the request.
        assert!(matches!(
            step(&r, NODE, t(3600), secs(1), ret, &served),
            Step::Mint { .. }
        ));
        let waiting = only(
            "ns/vm1",
            Here::Assigned {
                ready: true,
                phase: Some(Phase::Ready),
            },
        );
        assert_eq!(
            step(&r, NODE, t(121), secs(121), ret, waiting),
            Step::Delete
        );
        assert_eq!(
            step(&r, NODE, t(1000), secs(1000), ret, |_: &str| {
                Here::Elsewhere
            }),
            Step::Nothing
        );
    }
}
