//! `vncd url --kube [-n NS] NAME`: a fresh console URL through a VncConsoleRequest.
//!
//! The user's own kubeconfig does the talking (client certificates, tokens, exec plugins:
//! whatever kube-rs resolves from `KUBECONFIG` or `~/.kube/config`), so the API server
//! authenticates them and RBAC decides; vncd never sees their credentials. The command
//! creates the request, waits for the vncd serving the session to answer it, and prints
//! the URL. It needs only `create`, `get` and `watch` on the requests (ClusterRole
//! `vncd-console`).

use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{PostParams, WatchEvent, WatchParams};
use kube::{Api, Client, ResourceExt};

use crate::console::ConsoleUrl;
use crate::k8s::console_request::{
    USER_ROLE, VncConsoleRequest, VncConsoleRequestSpec, VncConsoleRequestStatus,
};

/// What `vncd url --kube` asks for.
#[derive(Debug, Clone)]
pub struct KubeAsk {
    pub name: String,
    /// None: the kubeconfig context's namespace.
    pub namespace: Option<String>,
    /// TTL (None: the serving vncd's --ticket-ttl) and view-only, as standalone.
    pub opts: crate::console::MintOptions,
    /// How long to wait for vncd's answer.
    pub wait: Duration,
}

/// Why no URL was printed. Every message names the session and its namespace.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error(
        "cannot configure a Kubernetes client (KUBECONFIG, ~/.kube/config or the in-cluster service account): {0}"
    )]
    Client(#[source] kube::Error),
    #[error(
        "Forbidden: you may not create vncconsolerequests (vncd.io) in namespace {namespace:?}, \
         which opening the console of session {session:?} takes ({reason}). \
         Opening consoles needs create, get and watch on vncconsolerequests in that namespace: \
         ask your platform to bind the ClusterRole {role} to you there \
         (e.g. `kubectl create rolebinding NAME --clusterrole={role} --user=YOU -n {namespace}`)",
        role = USER_ROLE
    )]
    Forbidden {
        namespace: String,
        session: String,
        reason: String,
    },
    #[error(
        "the VncConsoleRequest CRD (vncconsolerequests.vncd.io) is not installed in this cluster; \
         install it with the vncd chart or `vncd crd vncconsolerequests.vncd.io | kubectl apply -f -`"
    )]
    NoCrd,
    #[error(
        "cannot ask for a console URL of session {session:?} in namespace {namespace:?}: {source}"
    )]
    Api {
        namespace: String,
        session: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "no console URL for session {session:?} in namespace {namespace:?}: {reason}: {message}"
    )]
    Refused {
        namespace: String,
        session: String,
        reason: String,
        message: String,
    },
    #[error(
        "no vncd answered VncConsoleRequest {request:?} for session {session:?} in namespace \
         {namespace:?} within {wait:?}: does the session exist there, with spec.nodeName set to \
         a node whose vncd runs?"
    )]
    NoAnswer {
        namespace: String,
        session: String,
        request: String,
        wait: Duration,
    },
}

/// Asks the cluster for a URL; the URL and when its ticket expires, or why there is none.
pub fn mint_kube(ask: &KubeAsk) -> anyhow::Result<ConsoleUrl> {
    Ok(super::runtime()?.block_on(ask_api(ask))?)
}

/// Creates the request and waits for its answer; the URL, or why there is none.
async fn ask_api(args: &KubeAsk) -> Result<ConsoleUrl, UrlError> {
    let client = Client::try_default().await.map_err(UrlError::Client)?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let session = args.name.clone();
    let api: Api<VncConsoleRequest> = Api::namespaced(client, &namespace);
    let mut req = VncConsoleRequest::new(
        "",
        VncConsoleRequestSpec {
            session: session.clone(),
            // Whole seconds, rounded up: a fraction never shortens what was asked for.
            ttl_seconds: args.opts.ttl.map(|d| {
                i64::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0)).unwrap_or(i64::MAX)
            }),
            view_only: args.opts.view_only.then_some(true),
        },
    );
    req.metadata.name = None;
    req.metadata.generate_name = Some(format!("{session}-"));
    let api_err = |source: kube::Error| match crate::k8s::api_code(&source) {
        Some(403) => UrlError::Forbidden {
            namespace: namespace.clone(),
            session: session.clone(),
            reason: match &source {
                kube::Error::Api(s) => s.message.clone(),
                other => other.to_string(),
            },
        },
        Some(404) => UrlError::NoCrd,
        _ => UrlError::Api {
            namespace: namespace.clone(),
            session: session.clone(),
            source,
        },
    };
    let created = api
        .create(&PostParams::default(), &req)
        .await
        .map_err(api_err)?;
    let name = created.name_any();
    let deadline = Instant::now() + args.wait;
    let mut version = created.resource_version().unwrap_or_default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(UrlError::NoAnswer {
                namespace,
                session,
                request: name,
                wait: args.wait,
            });
        }
        // A watch of this one object from the version we hold; `get` only after the watch
        // ends early, so the usual case is one create and one watch.
        let params = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(u32::try_from(left.as_secs().max(1)).unwrap_or(u32::MAX));
        let mut stream = api.watch(&params, &version).await.map_err(api_err)?.boxed();
        while let Ok(Some(ev)) = tokio::time::timeout(left, stream.next()).await {
            match ev {
                Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => {
                    if let Some(answer) = answer_of(&o, &namespace, &session) {
                        return answer;
                    }
                    version = o.resource_version().unwrap_or(version);
                }
                Ok(WatchEvent::Deleted(_)) => break,
                // A bookmark or an expired version: re-read below.
                Ok(_) | Err(_) => break,
            }
        }
        let now = api.get(&name).await.map_err(api_err)?;
        if let Some(answer) = answer_of(&now, &namespace, &session) {
            return answer;
        }
        version = now.resource_version().unwrap_or_default();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The URL or the refusal a request's status holds, if vncd has answered.
fn answer_of(
    req: &VncConsoleRequest,
    namespace: &str,
    session: &str,
) -> Option<Result<ConsoleUrl, UrlError>> {
    let st: VncConsoleRequestStatus = req.status.clone()?;
    if let Some(url) = st.url.clone() {
        let expires_at = st
            .expires_at
            .as_ref()
            .and_then(|t| u64::try_from(t.0.as_second()).ok())
            .unwrap_or(0);
        return Some(Ok(ConsoleUrl { url, expires_at }));
    }
    let (reason, message) = st.failure()?;
    Some(Err(UrlError::Refused {
        namespace: namespace.to_owned(),
        session: session.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::console_request::{Failure, issued, refused};

    fn req(status: Option<VncConsoleRequestStatus>) -> VncConsoleRequest {
        let mut r = VncConsoleRequest::new(
            "vm1-abcde",
            VncConsoleRequestSpec {
                session: "vm1".into(),
                ttl_seconds: None,
                view_only: None,
            },
        );
        r.status = status;
        r
    }

    #[test]
    fn an_answer_is_a_url_with_its_expiry_or_a_refusal_naming_the_session() {
        let now = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        assert!(answer_of(&req(None), "ns", "vm1").is_none());
        let url = ConsoleUrl {
            url: "ws://h:6100/?token=v1.x".into(),
            expires_at: 1_800_000_060,
        };
        let got = answer_of(&req(Some(issued(&url, "n1", now))), "ns", "vm1")
            .unwrap()
            .unwrap();
        assert_eq!(got, url);
        let f = Failure {
            reason: "SessionNotReady",
            message: "not now".into(),
        };
        let err = answer_of(&req(Some(refused(&f, "n1", now))), "ns", "vm1")
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"vm1\" in namespace \"ns\""), "{err}");
        assert!(err.contains("SessionNotReady: not now"), "{err}");
    }

    #[test]
    fn forbidden_says_what_is_missing() {
        let e = UrlError::Forbidden {
            namespace: "vms".into(),
            session: "vm1".into(),
            reason: "User \"bob\" cannot create resource".into(),
        }
        .to_string();
        for needle in [
            "Forbidden",
            "create vncconsolerequests",
            "\"vms\"",
            "vncd-console",
        ] {
            assert!(e.contains(needle), "{needle:?} missing: {e}");
        }
    }
}
