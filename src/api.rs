//! The `VncSession` type, defined once for every source.
//!
//! Standalone manifests and Kubernetes custom resources deserialize into the very same
//! struct, so a manifest that works on a bare host works unchanged as a custom resource.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group and version every VncSession carries.
pub const API_VERSION: &str = "vncd.io/v1alpha1";
/// The kind every VncSession carries.
pub const KIND: &str = "VncSession";

/// The CEL rule on `spec.target`: exactly one of `host`+`port`, `unixSocket` or
/// `libvirtDomain`.
pub const TARGET_RULE: &str = "has(self.host) == has(self.port) && \
    (has(self.host) ? 1 : 0) + (has(self.unixSocket) ? 1 : 0) + (has(self.libvirtDomain) ? 1 : 0) == 1";
/// What the API server answers when [`TARGET_RULE`] fails.
pub const TARGET_RULE_MESSAGE: &str =
    "spec.target needs exactly one of host+port, unixSocket or libvirtDomain";

/// What a console session wants: a VNC server to expose on a websocket port.
#[derive(
    CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema,
)]
#[kube(
    group = "vncd.io",
    version = "v1alpha1",
    kind = "VncSession",
    doc = "A VM console: a VNC server exposed on a websocket port by the vncd of spec.nodeName.",
    namespaced,
    status = "VncSessionStatus",
    shortname = "vnc",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Port","type":"integer","jsonPath":".status.port"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Target","type":"string","priority":1,"jsonPath":".status.target"}"#,
    printcolumn = r#"{"name":"URL","type":"string","priority":1,"jsonPath":".status.url"}"#,
    selectable = ".spec.nodeName"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VncSessionSpec {
    /// The VNC server this session exposes.
    pub target: Target,
    /// A websocket port to use instead of one picked from the pool; it must lie inside the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// End the session after this many seconds with no client connected (phase Expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 315_360_000))]
    pub idle_timeout_seconds: Option<i64>,
    /// End the session this many seconds after its port was leased, even with a client
    /// connected (phase Expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 315_360_000))]
    pub max_lifetime_seconds: Option<i64>,
    /// The node whose vncd serves this session (Kubernetes mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// Where the VNC server listens: exactly one of `host`+`port`, `unixSocket` or
/// `libvirtDomain`.
///
/// The CEL rule lets the API server refuse a target vncd could never serve at admission,
/// so `kubectl apply` fails at once instead of leaving a Failed object behind.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new(TARGET_RULE).message(TARGET_RULE_MESSAGE))]
pub struct Target {
    /// Host name or IP address of a TCP VNC server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// TCP port of the VNC server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Absolute path of a unix socket VNC server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_socket: Option<String>,
    /// A libvirt domain whose VNC console is the target, read from its live XML while it
    /// runs (needs `vncd run --libvirt URI`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_domain: Option<String>,
}

impl Target {
    /// A TCP VNC server at `host:port`.
    pub fn tcp(host: &str, port: u16) -> Target {
        Target {
            host: Some(host.to_owned()),
            port: Some(i32::from(port)),
            ..Target::default()
        }
    }

    /// A VNC server on the unix socket at `path`.
    pub fn unix(path: &str) -> Target {
        Target {
            unix_socket: Some(path.to_owned()),
            ..Target::default()
        }
    }
}

/// Where a session is in its life; the values a VM manager waits on.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Accepted, but no ready proxy yet (allocating, starting, waiting for a port).
    Pending,
    /// The proxy is alive and its port accepts connections.
    Ready,
    /// The session cannot be served as it stands; `reason` and `message` say why.
    Failed,
    /// The session is going away; its proxy is being stopped.
    Terminating,
    /// The session ended by its idle timeout or maximum lifetime; its port is released.
    /// It starts again only when its spec changes.
    Expired,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Phase::Pending => "Pending",
            Phase::Ready => "Ready",
            Phase::Failed => "Failed",
            Phase::Terminating => "Terminating",
            Phase::Expired => "Expired",
        };
        f.write_str(s)
    }
}

/// What vncd reports about a session. Only vncd writes it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VncSessionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The leased websocket port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// Where a browser reaches the console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The proxy's process id on its host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// The VNC server the proxy forwards to, as `host:port` or `unix:PATH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// A machine-readable word for the current state, e.g. `PoolExhausted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A sentence for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the port was leased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_at: Option<Time>,
    /// The boot of the node when the port was leased (its `/proc/sys/kernel/random/boot_id`;
    /// Kubernetes mode): with `allocatedUptimeMs`, the lease's age on a clock that cannot be
    /// stepped back, so `maxLifetimeSeconds` holds whatever the wall clock does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_boot_id: Option<String>,
    /// Milliseconds since that boot when the port was leased (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_uptime_ms: Option<i64>,
    /// The node whose vncd holds the lease (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The lease's unique id; the proxy carries it in its environment (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_uid: Option<String>,
    /// The proxy's start time in clock ticks since its host booted; with `pid` it proves
    /// the process is still the one vncd started (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_start_time: Option<i64>,
    /// Set when the session expired (Kubernetes mode): it stays down until its spec
    /// changes, even across vncd restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired: Option<ExpiredStatus>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Which spec generation expired, why and when.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExpiredStatus {
    pub generation: i64,
    /// `IdleTimeout` or `MaxLifetime`.
    pub reason: String,
    pub message: String,
    pub at: Time,
}
