//! The Kubernetes lease store's error paths against a mock API service.
//!
//! A mock stands in for the API server here because these tests script its failures
//! (a 409 at one exact write, a 404, a call that never answers), which a real server does
//! not do on demand. The happy paths and the real conflicts are exercised against a real
//! kube-apiserver in `tests/kube.rs`; these tests add the failures in between.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use kube::client::Body;
use serde_json::{Value, json};

use super::*;
use crate::k8s::call::Metered;
use crate::session::Endpoint;

/// What the mock answers to one request.
#[derive(Clone, Debug)]
enum Reply {
    /// The object with its resourceVersion moved on (a successful write or read).
    Object,
    /// An API error status with this code.
    Status(u16),
    /// Never answers.
    Hang,
}

/// One request the mock saw: method, path (without the query) and a short name for it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    method: Method,
    path: String,
}

impl Seen {
    /// `status`, `finalizer`, `secret` or `other`, for asserting the order of writes.
    fn what(&self) -> &'static str {
        if self.path.contains("/secrets/") {
            "secret"
        } else if self.path.ends_with("/status") {
            "status"
        } else if self.method == Method::PATCH {
            "finalizer"
        } else {
            "other"
        }
    }
}

/// A mock API server: answers status writes with `status`, every other call with an
/// object (status and finalizer writes are applied to it, as the API server would), and
/// records what it saw.
struct Mock {
    seen: Arc<Mutex<Vec<Seen>>>,
}

fn object(rv: u64) -> Value {
    json!({
        "apiVersion": "vncd.io/v1alpha1",
        "kind": "VncSession",
        "metadata": {"name": "vm1", "namespace": "ns", "uid": "u-1",
                     "resourceVersion": rv.to_string(), "generation": 1},
        "spec": {"target": {"host": "127.0.0.1", "port": 5901}, "nodeName": "n1"},
    })
}

fn secret(rv: u64) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "vm1-vncd-token", "namespace": "ns",
                     "resourceVersion": rv.to_string()},
    })
}

fn reply(r: &Reply, rv: u64, secret_path: bool) -> Response<Full<Bytes>> {
    let (code, body) = match r {
        Reply::Object | Reply::Hang if secret_path => (200, secret(rv)),
        Reply::Object | Reply::Hang => (200, object(rv)),
        Reply::Status(code) => (
            *code,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "message": "scripted by the test", "reason": "Scripted", "code": code}),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp
}

impl Mock {
    /// A store whose API answers status writes with `on_status` and all else with success;
    /// API calls give up after `deadline`.
    fn store(on_status: Reply, deadline: Duration) -> (KubeStatusStore, Mock, Metered) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let state = Arc::new(Mutex::new((10u64, object(10))));
        let service = tower::service_fn(move |req: Request<Body>| {
            let log = log.clone();
            let state = state.clone();
            let on_status = on_status.clone();
            async move {
                let s = Seen {
                    method: req.method().clone(),
                    path: req.uri().path().to_owned(),
                };
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                let body: Value = body
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or(Value::Null);
                let secret_path = s.what() == "secret";
                let r = if s.what() == "status" {
                    on_status
                } else {
                    Reply::Object
                };
                log.lock().unwrap().push(s);
                if matches!(r, Reply::Hang) {
                    std::future::pending::<()>().await;
                }
                let mut guard = state.lock().unwrap();
                let (rv, obj) = &mut *guard;
                *rv += 1;
                let rv = *rv;
                let mut resp = reply(&r, rv, secret_path);
                if matches!(r, Reply::Object) && !secret_path {
                    // Apply the write to the mock's object and answer with it.
                    if let Some(st) = body.get("status") {
                        obj["status"] = st.clone();
                    }
                    if let Some(f) = body.pointer("/metadata/finalizers") {
                        obj["metadata"]["finalizers"] = f.clone();
                    }
                    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                    *resp.body_mut() = Full::new(Bytes::from(obj.to_string()));
                }
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let client = kube::Client::new(service, "default");
        let metered = Metered::default().with_timeout(deadline);
        let objects = Objects::default();
        let obj: VncSession = serde_json::from_value(object(10)).unwrap();
        objects.observe(&obj);
        objects.set_watched(&["ns/vm1".to_owned()].into());
        let store = KubeStatusStore::new(
            Api::all(client.clone()),
            Writer::new(client, metered.clone()),
            objects,
            "n1",
            UrlStyle {
                public_host: "node1.example".into(),
                web: false,
                tls: false,
            },
            Events::default(),
        );
        (store, Mock { seen }, metered)
    }

    fn order(&self) -> Vec<&'static str> {
        self.seen.lock().unwrap().iter().map(Seen::what).collect()
    }
}

fn new_lease() -> Lease {
    Lease::new(
        "ns/vm1",
        6100,
        Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: 5901,
        },
        Timestamp::now(),
    )
}

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn a_new_lease_writes_its_status_then_the_finalizer_and_no_secret() {
    run(async {
        let (mut store, mock, _) = Mock::store(Reply::Object, Duration::from_secs(5));
        let set = store
            .commit(0, vec![LeaseChange::Put(new_lease())])
            .await
            .expect("the commit succeeds");
        assert!(set.leases.contains_key("ns/vm1"));
        // The finalizer last (a failed lease write leaves no finalizer to block a
        // deletion), and no Secret: console tickets need no stored secret per session.
        assert_eq!(mock.order(), ["status", "finalizer"]);
    });
}

#[test]
fn a_409_on_the_status_write_is_a_conflict_and_the_lease_is_not_kept() {
    run(async {
        let (mut store, mock, metered) = Mock::store(Reply::Status(409), Duration::from_secs(5));
        let err = store
            .commit(0, vec![LeaseChange::Put(new_lease())])
            .await
            .expect_err("a conflict");
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        // Nothing of the refused write is kept, and the finalizer was never added.
        assert!(store.set.leases.is_empty());
        assert_eq!(mock.order(), ["status"]);
        assert_eq!(
            metered
                .metrics()
                .count("apply", "VncSession/status", "conflict"),
            1
        );
        // The revision moved on, so a commit planned from the old set is refused too.
        let again = store.commit(0, vec![]).await.expect_err("stale base");
        assert!(matches!(again, StoreError::Conflict { .. }));
    });
}

#[test]
fn a_404_on_the_status_write_means_the_object_went_away() {
    run(async {
        let (mut store, _, _) = Mock::store(Reply::Status(404), Duration::from_secs(5));
        let err = store
            .commit(0, vec![LeaseChange::Put(new_lease())])
            .await
            .expect_err("the object is gone");
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        assert!(store.set.leases.is_empty());
    });
}

#[test]
fn a_server_error_is_a_typed_api_error_with_its_cause() {
    run(async {
        let (mut store, _, _) = Mock::store(Reply::Status(503), Duration::from_secs(5));
        let err = store
            .commit(0, vec![LeaseChange::Put(new_lease())])
            .await
            .expect_err("a server error");
        let StoreError::Api { object, source, .. } = &err else {
            panic!("not an API error: {err}");
        };
        assert_eq!(object, "ns/vm1");
        let source = source.downcast_ref::<kube::Error>().expect("a kube error");
        assert_eq!(crate::k8s::api_code(source), Some(503));
        assert_eq!(err.metric_label(), "server_error");
        assert!(
            err.to_string().contains("write the lease of port 6100"),
            "{err}"
        );
        // The next commit waits out a backoff first.
        assert!(!store.backoff.current().is_zero());
    });
}

#[test]
fn a_status_write_that_never_answers_fails_at_its_deadline() {
    run(async {
        let deadline = Duration::from_millis(300);
        let (mut store, _, metered) = Mock::store(Reply::Hang, deadline);
        let started = Instant::now();
        // The test's own limit: without the deadline the commit would never return.
        let commit = store.commit(0, vec![LeaseChange::Put(new_lease())]);
        let err = tokio::time::timeout(Duration::from_secs(10), commit)
            .await
            .expect("the commit returns: API calls have a deadline")
            .expect_err("a timeout");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "took {took:?}");
        assert_eq!(err.metric_label(), "timeout", "{err}");
        assert!(store.set.leases.is_empty());
        assert_eq!(
            metered
                .metrics()
                .count("apply", "VncSession/status", "timeout"),
            1
        );
    });
}

#[test]
fn releasing_a_lease_clears_the_status_and_touches_no_secret() {
    run(async {
        let (mut store, mock, _) = Mock::store(Reply::Object, Duration::from_secs(5));
        store
            .commit(0, vec![LeaseChange::Put(new_lease())])
            .await
            .expect("leased");
        mock.seen.lock().unwrap().clear();
        let rev = store.set.revision;
        let set = store
            .commit(rev, vec![LeaseChange::Remove("ns/vm1".into())])
            .await
            .expect("released");
        assert!(set.leases.is_empty());
        let order = mock.order();
        assert_eq!(order.first(), Some(&"status"), "{order:?}");
        assert!(!order.contains(&"secret"), "{order:?}");
    });
}
