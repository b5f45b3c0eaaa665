//! Kubernetes mode: what the three adapters (source, lease store, status sink) share.
//!
//! The adapters themselves live beside their standalone siblings
//! (`source/kube.rs`, `store/kube_status.rs`, `status/kube.rs`) and plug into the very same
//! [`crate::controller::Controller`]. This module holds what they have in common: the
//! session key for namespaced objects, the cache of what the API server last told us
//! ([`objects`]), event publishing ([`events`]), the per-node writer lease
//! ([`node_lease`]), the mapping of a lease to and from
//! status fields ([`lease_fields`]), API call metering and timeouts ([`call`]) and the check
//! that the CRD is installed ([`crd`]).

pub mod call;
pub mod console;
pub mod console_request;
pub mod crd;
pub mod events;
pub mod janitor;
pub mod lease_fields;
pub mod node_lease;
pub mod objects;
pub mod writer;

use k8s_openapi::api::core::v1::ObjectReference;

use crate::api::{API_VERSION, KIND};

/// The field manager of every write vncd makes; server-side apply tracks ownership by it.
pub const FIELD_MANAGER: &str = "vncd";
/// Added when a session is first leased, so that deleting it stops the proxy and
/// releases the port before the object disappears.
pub const FINALIZER: &str = "vncd.io/cleanup";

/// The session key the core works with: `namespace/name`, unique across namespaces.
///
/// Object names are checked by [`crate::session::Desired::from_spec`]; namespaces are DNS
/// labels (no `/`, no `.`), so the key splits back unambiguously and is a safe relative
/// path for the proxy's log file (`logs/NAMESPACE/NAME.log`).
pub fn session_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The namespace and name of a session key, if it is one.
pub fn split_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('/')
}

/// The session key of an object, if it has a namespace and a name.
pub fn key_of(obj: &crate::api::VncSession) -> Option<String> {
    Some(session_key(
        obj.metadata.namespace.as_deref()?,
        obj.metadata.name.as_deref()?,
    ))
}

/// The field selector that gives a node its own sessions (watch and list alike).
pub fn node_selector(node: &str) -> String {
    format!("spec.nodeName={node}")
}

/// A reference to a VncSession for events.
pub fn object_ref(namespace: &str, name: &str, uid: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some(API_VERSION.into()),
        kind: Some(KIND.into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        uid: (!uid.is_empty()).then(|| uid.to_owned()),
        ..ObjectReference::default()
    }
}

/// HTTP status of an API error, if the API server answered with one.
pub fn api_code(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// 409: a resourceVersion precondition failed or the object already exists.
pub fn is_conflict(err: &kube::Error) -> bool {
    api_code(err) == Some(409)
}

/// 404: the object (or the resource type) does not exist.
pub fn is_not_found(err: &kube::Error) -> bool {
    api_code(err) == Some(404)
}

/// The error of an API call that did not finish within its deadline
/// ([`writer::API_TIMEOUT`]): a transport failure, as kube reports a dropped connection.
pub fn timed_out(elapsed: tokio::time::error::Elapsed) -> kube::Error {
    kube::Error::Service(Box::new(elapsed))
}

/// True if the call failed because it hit its deadline.
pub fn is_timeout(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Service(e) if e.is::<tokio::time::error::Elapsed>())
}

/// A short, stable name for the kind of an API failure, for metric labels: operators
/// alert on `timeout` and `unavailable` differently from `forbidden` (RBAC) or `conflict`.
pub fn error_label(err: &kube::Error) -> &'static str {
    if is_timeout(err) {
        return "timeout";
    }
    match api_code(err) {
        Some(409) => "conflict",
        Some(404) => "not_found",
        Some(401 | 403) => "forbidden",
        Some(422 | 400) => "invalid",
        Some(429) => "throttled",
        Some(code) if code >= 500 => "server_error",
        Some(_) => "api_error",
        None => "transport",
    }
}

/// Drops what vncd never reads from an object before it enters a watch cache: its
/// managed fields and annotations. Anyone who may edit a VncSession or create a
/// VncConsoleRequest chooses the annotations (up to 256 KiB each, `kubectl apply` adds a
/// copy of the whole object), and every node caches every request, so keeping them would
/// let one tenant grow every node's memory.
pub fn slim(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_objects_keep_no_annotations_or_managed_fields() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};
        let mut meta = ObjectMeta {
            name: Some("vm1".into()),
            labels: Some([("a".to_owned(), "b".to_owned())].into()),
            annotations: Some([("big".to_owned(), "x".repeat(200_000))].into()),
            managed_fields: Some(vec![ManagedFieldsEntry::default()]),
            ..ObjectMeta::default()
        };
        slim(&mut meta);
        assert_eq!(meta.annotations, None);
        assert_eq!(meta.managed_fields, None);
        assert_eq!(meta.name.as_deref(), Some("vm1"), "identity stays");
        assert!(
            meta.labels.is_some(),
            "labels stay (selectors may use them)"
        );
    }

    #[test]
    fn keys_round_trip() {
        let k = session_key("tenant-a", "vm-1.prod");
        assert_eq!(k, "tenant-a/vm-1.prod");
        assert_eq!(split_key(&k), Some(("tenant-a", "vm-1.prod")));
        assert_eq!(split_key("plain"), None);
    }

    #[test]
    fn api_failures_are_labelled_by_kind() {
        let status = |code: u16| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..kube::core::Status::default()
            }))
        };
        assert_eq!(error_label(&status(409)), "conflict");
        assert_eq!(error_label(&status(404)), "not_found");
        assert_eq!(error_label(&status(403)), "forbidden");
        assert_eq!(error_label(&status(503)), "server_error");
        let elapsed = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(async {
                tokio::time::timeout(
                    std::time::Duration::from_millis(1),
                    std::future::pending::<()>(),
                )
                .await
            })
            .unwrap_err();
        let e = timed_out(elapsed);
        assert!(is_timeout(&e));
        assert_eq!(error_label(&e), "timeout");
    }

    #[test]
    fn references_name_the_object() {
        let r = object_ref("ns", "vm1", "u-1");
        assert_eq!(r.kind.as_deref(), Some("VncSession"));
        assert_eq!(r.api_version.as_deref(), Some("vncd.io/v1alpha1"));
        assert_eq!(r.namespace.as_deref(), Some("ns"));
        assert_eq!(r.uid.as_deref(), Some("u-1"));
        assert_eq!(object_ref("ns", "vm1", "").uid, None);
    }
}
