//! One writer per node: a `coordination.k8s.io/v1` Lease named `vncd-NODE`.
//!
//! Leases of a node's sessions live in their statuses, so two vncd instances serving one
//! node (a rolling update, a stuck pod) would hand out ports independently. Before its
//! controller starts, `vncd kube` takes this Lease; a second instance waits passively (it
//! starts no proxy and writes no session) and takes over once the holder stops renewing.
//!
//! The algorithm is client-go's: expiry is judged by how long *we* have seen the Lease
//! unchanged, never by comparing our clock with the holder's `renewTime`; every write is
//! a replace with `resourceVersion`, so of two contenders exactly one wins. A holder that
//! cannot renew for two thirds of the lease duration gives up before anyone may take over.
//! Every call has a deadline ([`super::call`]); a renewal's is what is left of the renew
//! deadline, so a hung API server cannot keep a holder believing it still holds the node.
//!
//! Why not a crate: kube-lease-manager 0.13 (the one leader-election crate that builds
//! with kube 5) judges a holder's expiry by comparing `renewTime` with the local clock,
//! with a configurable skew allowance; client-go, and this module, judge by how long the
//! Lease has been seen unchanged, which no clock skew between nodes can break. It also has
//! no per-call deadline tied to the renew deadline, which is the guarantee fencing rests on.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use super::call::Metered;
use super::{is_conflict, is_not_found};

/// Parameters of every create and replace (none: the resourceVersion is the precondition).
const POST: PostParams = PostParams {
    dry_run: false,
    field_manager: None,
};

/// Where the Lease lives and how it is held.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub node: String,
    /// Who we are in `holderIdentity`; unique per instance.
    pub identity: String,
    /// `leaseDurationSeconds`: how long others wait for a silent holder.
    pub duration: Duration,
}

impl LeaseConfig {
    /// The Lease's name for `node`.
    pub fn name(&self) -> String {
        format!("vncd-{}", self.node)
    }

    /// How often a holder renews and a waiter looks.
    pub fn retry(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(200))
    }

    /// A holder that could not renew for this long stops serving.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }
}

/// Why the Lease could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("cannot read or write Lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl LeaseError {
    /// A short, stable name for the kind of failure (see [`super::error_label`]).
    pub fn metric_label(&self) -> &'static str {
        match self {
            LeaseError::Api { source, .. } => super::error_label(source),
        }
    }
}

/// What to do about the Lease as it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// It is ours: renew it.
    Renew,
    /// Nobody holds it, or its holder went silent: take it.
    Take,
    /// Someone else holds it and renews it: wait.
    Wait { holder: String },
}

/// Decides from the Lease's spec and how long we have seen it unchanged.
pub fn decide(spec: &LeaseSpec, me: &str, unchanged_for: Duration, default: Duration) -> Decision {
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::Take;
    }
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(default, Duration::from_secs);
    if unchanged_for >= duration {
        Decision::Take
    } else {
        Decision::Wait {
            holder: holder.to_owned(),
        }
    }
}

/// A contender for the node's Lease.
#[derive(Debug)]
pub struct NodeLease {
    api: Api<Lease>,
    cfg: LeaseConfig,
    metered: Metered,
    /// The resourceVersion we last saw and when we first saw it.
    observed: Option<(String, Instant)>,
}

/// What one look at the node Lease found.
#[derive(Debug)]
pub enum Acquired {
    /// It is ours now (taken or renewed).
    Held(Box<Lease>),
    /// Someone else holds it: their identity (or what raced us).
    HeldBy(String),
}

impl NodeLease {
    /// Every call is bounded by `metered`'s deadline, or by what is left of the renew
    /// deadline while renewing, whichever is shorter.
    pub fn new(client: Client, cfg: LeaseConfig, metered: Metered) -> Self {
        let per_call = metered
            .timeout()
            .min(cfg.retry().max(Duration::from_secs(1)));
        NodeLease {
            api: Api::namespaced(client, &cfg.namespace),
            metered: metered.with_timeout(per_call),
            cfg,
            observed: None,
        }
    }

    fn err(&self, source: kube::Error) -> LeaseError {
        LeaseError::Api {
            namespace: self.cfg.namespace.clone(),
            name: self.cfg.name(),
            source,
        }
    }

    fn spec_now(&self, prev: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        let ours =
            prev.and_then(|p| p.holder_identity.as_deref()) == Some(self.cfg.identity.as_str());
        let transitions = prev.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.cfg.duration_secs()),
            acquire_time: if ours {
                prev.and_then(|p| p.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if ours || prev.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }
    }

    /// One look at the Lease: takes or renews it if we may.
    pub async fn try_acquire(&mut self) -> Result<Acquired, LeaseError> {
        let name = self.cfg.name();
        let current = match self
            .metered
            .call("get", "Lease", &name, self.api.get_opt(&name))
            .await
        {
            Ok(c) => c,
            Err(e) => return Err(self.err(e)),
        };
        let Some(current) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec_now(None)),
            };
            let create = self.api.create(&POST, &lease);
            return match self.metered.call("create", "Lease", &name, create).await {
                Ok(l) => Ok(Acquired::Held(Box::new(l))),
                Err(e) if is_conflict(&e) => {
                    Ok(Acquired::HeldBy("another instance (just created)".into()))
                }
                Err(e) => Err(self.err(e)),
            };
        };
        let rv = current
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
        let unchanged_for = match &self.observed {
            Some((seen, at)) if *seen == rv => at.elapsed(),
            _ => {
                self.observed = Some((rv, Instant::now()));
                Duration::ZERO
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        match decide(&spec, &self.cfg.identity, unchanged_for, self.cfg.duration) {
            Decision::Wait { holder } => Ok(Acquired::HeldBy(holder)),
            Decision::Take | Decision::Renew => {
                let mut next = current.clone();
                next.spec = Some(self.spec_now(Some(&spec)));
                let replace = self.api.replace(&name, &POST, &next);
                match self.metered.call("replace", "Lease", &name, replace).await {
                    Ok(l) => Ok(Acquired::Held(Box::new(l))),
                    Err(e) if is_conflict(&e) => {
                        Ok(Acquired::HeldBy("another instance (raced us)".into()))
                    }
                    Err(e) => Err(self.err(e)),
                }
            }
        }
    }

    /// Waits (passively) until the Lease is ours, then keeps renewing it in the
    /// background. Cancel-safe: drop the future to stop waiting.
    pub async fn acquire(mut self) -> HeldLease {
        let mut last_holder = String::new();
        loop {
            match self.try_acquire().await {
                Ok(Acquired::Held(lease)) => {
                    info!(lease = %self.cfg.name(), namespace = %self.cfg.namespace, identity = %self.cfg.identity, "holding the node lease");
                    return HeldLease::start(self, *lease);
                }
                Ok(Acquired::HeldBy(holder)) => {
                    if holder != last_holder {
                        info!(lease = %self.cfg.name(), holder = %holder, "another vncd serves this node; waiting passively");
                        last_holder = holder;
                    }
                }
                Err(e) => warn!(error = %e, "cannot take the node lease; retrying"),
            }
            tokio::time::sleep(self.cfg.retry()).await;
        }
    }

    /// Renews `lease` (which we hold). `Ok(false)`: someone else holds it now. Each call
    /// gives up after `left` (what remains of the renew deadline), so a hung API server
    /// cannot keep this instance believing it holds the node past its deadline.
    async fn renew(&self, lease: &mut Lease, left: Duration) -> Result<bool, kube::Error> {
        let name = self.cfg.name();
        let mut next = lease.clone();
        next.spec = Some(self.spec_now(lease.spec.as_ref()));
        let m = &self.metered;
        let within = left.min(m.timeout());
        let replace = self.api.replace(&name, &POST, &next);
        match m
            .call_within(within, "replace", "Lease", &name, replace)
            .await
        {
            Ok(l) => {
                *lease = l;
                Ok(true)
            }
            Err(e) if is_conflict(&e) || is_not_found(&e) => {
                // Someone wrote it: look whether it is still ours.
                let get = self.api.get_opt(&name);
                match m.call_within(within, "get", "Lease", &name, get).await? {
                    Some(l)
                        if l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                            == Some(self.cfg.identity.as_str()) =>
                    {
                        *lease = l;
                        Err(e)
                    }
                    _ => Ok(false),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up so a waiting instance takes over at once.
    async fn release(&self, lease: &Lease) {
        let mut next = lease.clone();
        if let Some(spec) = next.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = Some(MicroTime(Timestamp::now()));
        }
        let name = self.cfg.name();
        let replace = self.api.replace(&name, &POST, &next);
        match self.metered.call("replace", "Lease", &name, replace).await {
            Ok(_) => info!(lease = %self.cfg.name(), "released the node lease"),
            Err(e) => {
                warn!(lease = %self.cfg.name(), error = %e, "cannot release the node lease; it expires on its own")
            }
        }
    }
}

/// A Lease we hold, renewed by a background task until released or lost.
#[derive(Debug)]
pub struct HeldLease {
    lost: watch::Receiver<Option<String>>,
    stop: Option<oneshot::Sender<oneshot::Sender<()>>>,
}

impl HeldLease {
    fn start(contender: NodeLease, mut lease: Lease) -> HeldLease {
        let (lost_tx, lost) = watch::channel(None);
        let (stop, mut stop_rx) = oneshot::channel::<oneshot::Sender<()>>();
        let span = tracing::info_span!("node_lease", lease = %contender.cfg.name());
        crate::task::spawn(span, async move {
            let mut last_ok = Instant::now();
            loop {
                tokio::select! {
                    done = &mut stop_rx => {
                        contender.release(&lease).await;
                        if let Ok(done) = done {
                            let _ = done.send(());
                        }
                        return;
                    }
                    () = tokio::time::sleep(contender.cfg.retry()) => {}
                }
                let left = contender
                    .cfg
                    .renew_deadline()
                    .saturating_sub(last_ok.elapsed())
                    .max(Duration::from_millis(100));
                match contender.renew(&mut lease, left).await {
                    Ok(true) => last_ok = Instant::now(),
                    Ok(false) => {
                        let _ = lost_tx.send(Some(format!(
                            "node lease {}/{} is held by another instance now",
                            contender.cfg.namespace,
                            contender.cfg.name()
                        )));
                        return;
                    }
                    Err(e) if last_ok.elapsed() >= contender.cfg.renew_deadline() => {
                        let _ = lost_tx.send(Some(format!(
                            "could not renew node lease {}/{} for {:?}: {e}",
                            contender.cfg.namespace,
                            contender.cfg.name(),
                            last_ok.elapsed()
                        )));
                        return;
                    }
                    Err(e) => debug!(error = %e, "node lease renewal failed; retrying"),
                }
            }
        });
        HeldLease {
            lost,
            stop: Some(stop),
        }
    }

    /// Resolves with the reason once the Lease is lost (never, while we renew it).
    pub async fn lost(&self) -> String {
        let mut rx = self.lost.clone();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                // The renewer ended without a reason: it was released.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops renewing and gives the Lease up.
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let (done, wait) = oneshot::channel();
            if stop.send(done).is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, secs: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: secs,
            ..LeaseSpec::default()
        }
    }

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn our_own_lease_is_renewed() {
        assert_eq!(
            decide(&spec(Some("me"), Some(15)), "me", Duration::ZERO, D),
            Decision::Renew
        );
    }

    #[test]
    fn a_free_lease_is_taken() {
        assert_eq!(
            decide(&spec(None, None), "me", Duration::ZERO, D),
            Decision::Take
        );
        assert_eq!(
            decide(&spec(Some(""), Some(15)), "me", Duration::ZERO, D),
            Decision::Take
        );
    }

    #[test]
    fn a_renewing_holder_is_left_alone_until_it_goes_silent() {
        let s = spec(Some("other"), Some(3));
        assert_eq!(
            decide(&s, "me", Duration::from_secs(2), D),
            Decision::Wait {
                holder: "other".into()
            }
        );
        assert_eq!(decide(&s, "me", Duration::from_secs(3), D), Decision::Take);
        // Without a stated duration our own default applies.
        let s = spec(Some("other"), None);
        assert!(matches!(
            decide(&s, "me", Duration::from_secs(14), D),
            Decision::Wait { .. }
        ));
    }

    #[test]
    fn timings_leave_a_margin_between_giving_up_and_taking_over() {
        let c = LeaseConfig {
            namespace: "kube-system".into(),
            node: "n1".into(),
            identity: "me".into(),
            duration: D,
        };
        assert_eq!(c.name(), "vncd-n1");
        assert!(c.renew_deadline() < c.duration);
        assert!(c.retry() < c.renew_deadline());
        assert_eq!(c.duration_secs(), 15);
    }
}
