//! Kubernetes mode: what the three adapters (source, lease store, status sink) share.
//!
//! The adapters themselves live beside their standalone siblings
//! (`source/kube.rs`, `store/kube_status.rs`, `status/kube.rs`) and plug into the very same
//! [`crate::controller::Controller`]. This module holds what they have in common: the
//! session key for namespaced objects, the cache of what the API server last told us
//! ([`objects`]), event publishing ([`events`]), the per-node writer lease
//! ([`node_lease`]), session tokens in Secrets ([`token`]) and the check that the CRD is
//! installed ([`crd`]).

pub mod crd;
pub mod events;
pub mod node_lease;
pub mod objects;
pub mod token;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = session_key("tenant-a", "vm-1.prod");
        assert_eq!(k, "tenant-a/vm-1.prod");
        assert_eq!(split_key(&k), Some(("tenant-a", "vm-1.prod")));
        assert_eq!(split_key("plain"), None);
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
