//! The first thing `vncd kube` checks: is the VncSession CRD installed?
//!
//! Without it every list and watch answers 404, which a watcher would retry forever
//! with a cryptic message. One clear error at start says what to do instead.

use kube::Api;
use kube::api::ListParams;

use crate::api::VncSession;

/// Why the VncSession resource cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error(
        "the VncSession CRD (vncsessions.vncd.io) is not installed in this cluster; install it with \
         `vncd crd | kubectl apply -f -` (or apply crds/vncsessions.vncd.io.yaml), then start vncd again"
    )]
    Missing,
    #[error(
        "vncd may not list VncSessions{scope}: {source}; grant get/list/watch/patch on vncsessions and \
         vncsessions/status (see charts/vncd/templates/clusterrole.yaml)"
    )]
    Forbidden {
        scope: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot list VncSessions{scope}: {source}")]
    Api {
        scope: String,
        #[source]
        source: kube::Error,
    },
}

/// Turns the error of a trial list into the error to show.
pub fn explain(err: kube::Error, scope: &str) -> CrdError {
    match super::api_code(&err) {
        Some(404) => CrdError::Missing,
        Some(403) => CrdError::Forbidden {
            scope: scope.to_owned(),
            source: err,
        },
        _ => CrdError::Api {
            scope: scope.to_owned(),
            source: err,
        },
    }
}

/// Lists one VncSession to prove the resource exists and may be read.
/// `scope` is appended to messages, e.g. ` in namespace "vms"`.
pub async fn check(api: &Api<VncSession>, scope: &str) -> Result<(), CrdError> {
    api.list_metadata(&ListParams::default().limit(1))
        .await
        .map(|_| ())
        .map_err(|e| explain(e, scope))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Status::failure("x", "y").with_code(code).boxed())
    }

    #[test]
    fn a_missing_resource_says_how_to_install_the_crd() {
        let msg = explain(api_error(404), "").to_string();
        assert!(msg.contains("vncd crd | kubectl apply -f -"), "{msg}");
        assert!(msg.contains("vncsessions.vncd.io"), "{msg}");
    }

    #[test]
    fn other_errors_keep_their_cause() {
        let msg = explain(api_error(403), " in namespace \"vms\"").to_string();
        assert!(
            msg.contains("may not list") && msg.contains("\"vms\""),
            "{msg}"
        );
        assert!(matches!(explain(api_error(500), ""), CrdError::Api { .. }));
    }
}
