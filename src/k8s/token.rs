//! Session tokens in Kubernetes mode: one Secret per session, referenced from its status.
//!
//! Status is readable by anyone who may list VncSessions, so the token never goes there.
//! The Secret `NAME-vncd-token` in the session's namespace holds `token` and `url` (the
//! console URL with the token in it); `status.tokenSecretRef` names it. Access to a
//! console is then ordinary RBAC on one Secret. The Secret is owned by the VncSession
//! (garbage-collected with it) and annotated with the lease uid it belongs to, so a
//! restarted vncd takes a token only from the Secret of the very lease it adopts, and a
//! release deletes only the Secret of the lease it releases.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::api::{API_VERSION, KIND, SecretKeyRef};

/// The Secret key holding the bare token.
pub const TOKEN_KEY: &str = "token";
/// The Secret key holding the console URL with the token in it.
pub const URL_KEY: &str = "url";
/// The annotation naming the lease a Secret's token belongs to.
pub const LEASE_UID_ANNOTATION: &str = "vncd.io/lease-uid";
/// The annotation naming the node whose vncd wrote the Secret.
pub const NODE_ANNOTATION: &str = "vncd.io/node";
const SUFFIX: &str = "-vncd-token";
/// Longest object name the API server accepts (a DNS subdomain).
const MAX_NAME: usize = 253;

/// The Secret name of session `name`: readable when it fits, hashed when it does not.
pub fn secret_name(name: &str) -> String {
    if name.len() + SUFFIX.len() <= MAX_NAME {
        format!("{name}{SUFFIX}")
    } else {
        // FNV-1a: stable across versions and platforms, which a name must be.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        format!("vncd-token-{h:016x}")
    }
}

/// What `status.tokenSecretRef` says for session `name`.
pub fn secret_ref(name: &str) -> SecretKeyRef {
    SecretKeyRef {
        name: secret_name(name),
        key: TOKEN_KEY.into(),
    }
}

/// Everything a token Secret is made from.
#[derive(Clone, Debug)]
pub struct TokenSecret<'a> {
    pub namespace: &'a str,
    /// The VncSession's name and uid (the owner reference).
    pub session: &'a str,
    pub session_uid: &'a str,
    pub node: &'a str,
    pub lease_uid: &'a str,
    pub token: &'a str,
    pub url: &'a str,
}

impl TokenSecret<'_> {
    /// The whole Secret as vncd applies it (server-side apply, field manager `vncd`).
    pub fn object(&self) -> Secret {
        let owner = (!self.session_uid.is_empty()).then(|| OwnerReference {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            name: self.session.into(),
            uid: self.session_uid.into(),
            ..OwnerReference::default()
        });
        Secret {
            metadata: ObjectMeta {
                name: Some(secret_name(self.session)),
                namespace: Some(self.namespace.into()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "vncd".to_owned(),
                )])),
                annotations: Some(BTreeMap::from([
                    (LEASE_UID_ANNOTATION.to_owned(), self.lease_uid.to_owned()),
                    (NODE_ANNOTATION.to_owned(), self.node.to_owned()),
                ])),
                owner_references: owner.map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([
                (
                    TOKEN_KEY.to_owned(),
                    ByteString(self.token.as_bytes().to_vec()),
                ),
                (URL_KEY.to_owned(), ByteString(self.url.as_bytes().to_vec())),
            ])),
            ..Secret::default()
        }
    }
}

/// The lease uid a Secret was written for.
pub fn lease_uid_of(secret: &Secret) -> Option<&str> {
    secret
        .metadata
        .annotations
        .as_ref()?
        .get(LEASE_UID_ANNOTATION)
        .map(String::as_str)
}

/// The token in `secret`, if it was written for lease `lease_uid` and holds a sane one.
pub fn token_for_lease(secret: &Secret, lease_uid: &str) -> Option<String> {
    if lease_uid_of(secret) != Some(lease_uid) {
        return None;
    }
    let raw = secret.data.as_ref()?.get(TOKEN_KEY)?;
    let token = String::from_utf8(raw.0.clone()).ok()?;
    (!token.is_empty() && token.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        TokenSecret {
            namespace: "ns",
            session: "vm1",
            session_uid: "uid-1",
            node: "n1",
            lease_uid: "lease-a",
            token: "0123abcd",
            url: "ws://h:6100/?token=0123abcd",
        }
        .object()
    }

    #[test]
    fn names_fit_the_api_limits() {
        assert_eq!(secret_name("vm1"), "vm1-vncd-token");
        let long = "a".repeat(250);
        let n = secret_name(&long);
        assert!(n.len() <= MAX_NAME && n.starts_with("vncd-token-"), "{n}");
        assert_ne!(
            n,
            secret_name(&"b".repeat(250)),
            "distinct names hash apart"
        );
        assert_eq!(n, secret_name(&long), "stable");
    }

    #[test]
    fn the_secret_holds_token_and_url_and_is_owned_by_the_session() {
        let s = secret();
        assert_eq!(s.metadata.name.as_deref(), Some("vm1-vncd-token"));
        let owner = &s.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), (KIND, "uid-1"));
        let data = s.data.as_ref().unwrap();
        assert_eq!(data[TOKEN_KEY].0, b"0123abcd");
        assert_eq!(data[URL_KEY].0, b"ws://h:6100/?token=0123abcd");
        // Serialized for an apply, the data is base64 as the API expects.
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["data"]["token"], "MDEyM2FiY2Q=");
        assert_eq!(json["kind"], "Secret");
    }

    #[test]
    fn a_token_is_taken_only_for_its_own_lease() {
        let s = secret();
        assert_eq!(token_for_lease(&s, "lease-a").as_deref(), Some("0123abcd"));
        assert_eq!(token_for_lease(&s, "lease-b"), None);
        let mut junk = s.clone();
        junk.data
            .as_mut()
            .unwrap()
            .insert(TOKEN_KEY.into(), ByteString(b"x y".to_vec()));
        assert_eq!(token_for_lease(&junk, "lease-a"), None);
    }
}
