//! Console URLs in Kubernetes mode (issue #12): `vncd url --kube` creates a
//! VncConsoleRequest with the user's own kubeconfig, the real `vncd kube` serving the
//! session answers it, and RBAC (the chart's `vncd-console` role) decides who may ask.
//! Real kube-apiserver (scripts/testcluster), real QEMU VNC servers, real proxies.
#![allow(clippy::unwrap_used)]

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cluster::{KubeVncd, VNCD, cluster};
use common::{Qemu, rfb_banner, try_banner};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use vncd::api::{Phase, Target, VncSession, VncSessionSpec};
use vncd::k8s::console_request::{VncConsoleRequest, VncConsoleRequestSpec};
use vncd::ticket::{self, MasterKey};

/// A QEMU VNC server and a running `vncd kube` for `node` (watching every namespace when
/// `namespace` is None), with answered requests kept 1 s past expiry, as the admin.
fn start(namespace: Option<&str>, lease_ns: &str, node: &str) -> (Qemu, KubeVncd) {
    let qemu = Qemu::tcp();
    let mut v = KubeVncd::new(node, namespace, lease_ns, 4);
    v.extra
        .extend(["--console-request-grace".into(), "1".into()]);
    v.start();
    (qemu, v)
}

/// [`start`], but vncd runs as the chart's ServiceAccount with the chart's RBAC (release
/// namespace `ns`), so the chart's rules are all the responder gets.
fn start_as_chart(ns: &str, node: &str) -> (Qemu, KubeVncd) {
    let c = cluster();
    c.apply_chart_rbac(ns, &[]);
    let qemu = Qemu::tcp();
    let mut v = KubeVncd::new(node, Some(ns), ns, 4);
    v.extra
        .extend(["--console-request-grace".into(), "1".into()]);
    let kubeconfig = v.tmp.path().join("sa.kubeconfig");
    c.service_account_cert_kubeconfig(ns, "vncd", &kubeconfig);
    v.start_with(v.args(), &kubeconfig, &[]);
    (qemu, v)
}

/// Held by every test that applies the chart's RBAC. The chart's ClusterRoleBinding is
/// cluster-scoped and binds the ServiceAccount of ONE release namespace: a test applying it
/// for its namespace rebinds it away from another test's, whose vncd then gets 403 on every
/// list (seen in CI: "vm1 never became Ready", every call Forbidden). The tests of this
/// binary share one API server, so they take turns.
static CHART_RBAC: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn session(api: &Api<VncSession>, name: &str, node: &str, target: Target) {
    let spec = VncSessionSpec {
        target,
        node_name: Some(node.into()),
        ..VncSessionSpec::default()
    };
    api.create(&PostParams::default(), &VncSession::new(name, spec))
        .await
        .unwrap_or_else(|e| panic!("cannot create VncSession {name}: {e}"));
}

/// Waits until the session's phase is `phase`; returns the object.
async fn wait_phase(api: &Api<VncSession>, name: &str, phase: Phase, v: &KubeVncd) -> VncSession {
    let start = Instant::now();
    loop {
        let o = api.get(name).await.unwrap();
        if o.status.as_ref().and_then(|s| s.phase) == Some(phase) {
            return o;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{name} never became {phase}: {:?}\n{}",
            o.status,
            v.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `vncd url --kube -n NS NAME ARGS` as the user of `kubeconfig`.
fn vncd_url(kubeconfig: &Path, ns: &str, name: &str, args: &[&str]) -> Output {
    let wait: &[&str] = if args.contains(&"--wait") {
        &[]
    } else {
        &["--wait", "20"]
    };
    Command::new(VNCD)
        .args(["url", "--kube", "-n", ns, name])
        .args(wait)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .unwrap()
}

/// The URL `vncd url` printed, failing the test with its stderr otherwise.
fn url_of(out: &Output, who: &str) -> String {
    assert!(
        out.status.success(),
        "{who}: vncd url failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .trim()
        .to_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Checks `url` against the lease key vncd's master key derives for the session's lease:
/// the ticket is authentic for exactly this lease and expires `ttl` seconds from now.
fn assert_ticket_for(url: &str, v: &KubeVncd, o: &VncSession, ttl: u64) {
    let st = o.status.clone().unwrap();
    let port = st.port.unwrap();
    assert!(
        url.starts_with(&format!("ws://127.0.0.1:{port}/?token=v1.")),
        "unexpected URL shape for port {port}"
    );
    let master = MasterKey::load(&v.tmp.path().join("state/ticket.key")).unwrap();
    let key = format!("{}/{}", o.namespace().unwrap(), o.name_any());
    let lease_key = master.lease_key(&key, st.lease_uid.as_deref().unwrap());
    let text = url.split_once("?token=").unwrap().1;
    let now = ticket::unix_now();
    let verified = ticket::verify(&lease_key, text, now).expect("an authentic ticket");
    let other = master.lease_key(&key, "another-lease");
    assert!(
        ticket::verify(&other, text, now).is_err(),
        "bound to its lease"
    );
    let left = verified.expires_at.saturating_sub(now);
    assert!(
        left <= ttl && left + 10 >= ttl,
        "expires in {left} s, asked for {ttl}"
    );
}

fn bind_console_role(ns: &str, binding: &str, subject: &str) {
    cluster().kubectl_ok(&[
        "create",
        "rolebinding",
        binding,
        "-n",
        ns,
        "--clusterrole=vncd-console",
        subject,
    ]);
}

async fn requests(client: &kube::Client, ns: &str) -> Vec<VncConsoleRequest> {
    Api::<VncConsoleRequest>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
}

#[tokio::test(flavor = "multi_thread")]
async fn users_bound_to_vncd_console_get_urls_others_are_forbidden_and_requests_are_collected() {
    let c = cluster();
    let _rbac = CHART_RBAC.lock().await;
    let ns = "console-rbac";
    let node = "node-console-rbac";
    c.create_namespace(ns);
    let (qemu, v) = start_as_chart(ns, node);
    let client = c.client().await;
    let api: Api<VncSession> = Api::namespaced(client.clone(), ns);
    session(&api, "vm1", node, Target::tcp("127.0.0.1", qemu.port)).await;
    // A target outside --allow-target: the session is this node's but never Ready.
    session(&api, "vm-bad", node, Target::tcp("10.255.255.1", 5900)).await;
    let vm1 = wait_phase(&api, "vm1", Phase::Ready, &v).await;
    wait_phase(&api, "vm-bad", Phase::Failed, &v).await;

    let dir = tempfile::tempdir().unwrap();
    let alice = dir.path().join("alice.kubeconfig");
    let bob = dir.path().join("bob.kubeconfig");
    c.service_account_kubeconfig(ns, "alice", &alice);
    c.service_account_kubeconfig(ns, "bob", &bob);
    bind_console_role(ns, "alice-console", &format!("--serviceaccount={ns}:alice"));

    // A ServiceAccount (bearer token) bound to vncd-console.
    let url = url_of(&vncd_url(&alice, ns, "vm1", &[]), "alice");
    assert_ticket_for(&url, &v, &vm1, 60);
    let mut tickets = vec![url.split_once("?token=").unwrap().1.to_owned()];
    // The same ServiceAccount without the binding: a Forbidden that says what is missing.
    let out = vncd_url(&bob, ns, "vm1", &[]);
    assert!(!out.status.success(), "bob got a URL");
    let err = stderr(&out);
    for needle in [
        "Forbidden",
        "create vncconsolerequests",
        "\"console-rbac\"",
        "vncd-console",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    assert!(out.stdout.is_empty());
    // A client-certificate user (the cluster admin), with a TTL of its own.
    let url = url_of(
        &vncd_url(&c.kubeconfig, ns, "vm1", &["--ttl", "3"]),
        "admin",
    );
    assert_ticket_for(&url, &v, &vm1, 3);
    tickets.push(url.split_once("?token=").unwrap().1.to_owned());

    // Refusals come back as errors naming the session and the reason.
    let out = vncd_url(&alice, ns, "vm1", &["--ttl", "7200"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("TTLOutOfRange") && err.contains("3600"),
        "{err}"
    );
    assert!(
        err.contains("\"vm1\"") && err.contains("\"console-rbac\""),
        "{err}"
    );
    let out = vncd_url(&alice, ns, "vm1", &["--view-only"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("ViewOnlyUnsupported"),
        "{}",
        stderr(&out)
    );
    let out = vncd_url(&alice, ns, "vm-bad", &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("SessionNotReady") && err.contains("Failed"),
        "{err}"
    );

    // Collection: the 3 s ticket's request and the refusals go 1 s after expiry or refusal;
    // the 60 s ticket's request stays until its ticket expired.
    let start = Instant::now();
    loop {
        let left: Vec<_> = requests(&client, ns).await;
        let ttls: Vec<_> = left.iter().map(|r| r.spec.ttl_seconds).collect();
        if ttls == [None] {
            assert!(
                left[0]
                    .status
                    .as_ref()
                    .and_then(|s| s.url.as_ref())
                    .is_some(),
                "the request kept is alice's answered one"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "requests not collected: {ttls:?}\n{}",
            v.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = v.log();
    assert!(log.contains("issued a console URL"), "{log}");
    for t in &tickets {
        assert!(!log.contains(t.as_str()), "vncd logged a ticket:\n{log}");
    }

    assert!(
        !log.contains("Forbidden") && !log.contains("forbidden"),
        "the chart's RBAC refused vncd something:\n{log}"
    );
    // vncd's own ServiceAccount (the chart's ClusterRole) may do what the responder does,
    // and no more: no creating requests, no Secrets.
    let sa = format!("--as=system:serviceaccount:{ns}:vncd");
    for (verb, resource, allowed) in [
        ("list", "vncconsolerequests.vncd.io", "yes"),
        ("watch", "vncconsolerequests.vncd.io", "yes"),
        ("delete", "vncconsolerequests.vncd.io", "yes"),
        ("patch", "vncconsolerequests.vncd.io/status", "yes"),
        ("create", "vncconsolerequests.vncd.io", "no"),
        ("get", "secrets", "no"),
    ] {
        let (res, sub) = resource
            .split_once('/')
            .map_or((resource, None), |(r, s)| (r, Some(s)));
        let mut args = vec!["auth", "can-i", verb, res, "-n", ns, sa.as_str()];
        let sub_arg;
        if let Some(s) = sub {
            sub_arg = format!("--subresource={s}");
            args.push(&sub_arg);
        }
        let out = c.kubectl(&args);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            allowed,
            "vncd may {verb} {resource}?"
        );
    }
    drop(v);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_never_reaches_a_session_in_another_namespace() {
    let c = cluster();
    let _rbac = CHART_RBAC.lock().await;
    let (ns_a, ns_b) = ("console-iso-a", "console-iso-b");
    let node = "node-console-iso";
    c.create_namespace(ns_a);
    c.create_namespace(ns_b);
    // Watches requests in every namespace.
    let (qemu, v) = start(None, ns_a, node);
    let client = c.client().await;
    let api: Api<VncSession> = Api::namespaced(client.clone(), ns_a);
    session(&api, "vm1", node, Target::tcp("127.0.0.1", qemu.port)).await;
    wait_phase(&api, "vm1", Phase::Ready, &v).await;
    c.apply_chart_rbac(ns_a, &[]);

    // A tenant of namespace b, allowed to open consoles there only.
    let dir = tempfile::tempdir().unwrap();
    let carol = dir.path().join("carol.kubeconfig");
    c.user_kubeconfig("carol", &[], &carol);
    bind_console_role(ns_b, "carol-console", "--user=carol");
    let out = vncd_url(&carol, ns_a, "vm1", &[]);
    assert!(
        stderr(&out).contains("Forbidden"),
        "carol in namespace a: {}",
        stderr(&out)
    );
    // In her own namespace, the same name is another (absent) session: nobody answers.
    let out = vncd_url(&carol, ns_b, "vm1", &["--wait", "3"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no vncd answered"),
        "{}",
        stderr(&out)
    );
    // Naming the other namespace in spec.session is refused by the API server.
    let reqs_b: Api<VncConsoleRequest> = Api::namespaced(client.clone(), ns_b);
    let mut r = VncConsoleRequest::new(
        "cross",
        VncConsoleRequestSpec {
            session: format!("{ns_a}/vm1"),
            ttl_seconds: None,
            view_only: None,
        },
    );
    let e = reqs_b.create(&PostParams::default(), &r).await.unwrap_err();
    assert_eq!(vncd::k8s::api_code(&e), Some(422), "{e}");
    r.spec.session = "vm1".into();
    reqs_b.create(&PostParams::default(), &r).await.unwrap();
    // A request in a, created after, is answered; b's is still not (the responder looks at
    // every request on each pass, so by then it has seen b's too).
    let admin_url = url_of(&vncd_url(&c.kubeconfig, ns_a, "vm1", &[]), "admin in a");
    assert!(admin_url.contains("?token=v1."));
    tokio::time::sleep(Duration::from_secs(2)).await;
    for req in requests(&client, ns_b).await {
        assert_eq!(req.status, None, "{} was answered", req.name_any());
    }
    drop(v);
}

/// The whole path: the URL's ticket opens the console through the proxy once, and a
/// replay of the same URL is refused. Needs proxies that verify tickets (main's #12 work).
#[tokio::test(flavor = "multi_thread")]
async fn a_console_url_opens_the_console_once() {
    let c = cluster();
    let ns = "console-e2e";
    let node = "node-console-e2e";
    c.create_namespace(ns);
    let (qemu, v) = start(Some(ns), ns, node);
    let client = c.client().await;
    let api: Api<VncSession> = Api::namespaced(client.clone(), ns);
    session(&api, "vm1", node, Target::tcp("127.0.0.1", qemu.port)).await;
    wait_phase(&api, "vm1", Phase::Ready, &v).await;
    let url = url_of(&vncd_url(&c.kubeconfig, ns, "vm1", &[]), "admin");
    assert_eq!(rfb_banner(&url).await, b"RFB 003.008\n");
    assert!(
        try_banner(&url).await.is_err(),
        "a replayed URL reached the console"
    );
    // A fresh URL opens it again (--json: the URL and its expiry, as standalone prints them).
    let out = vncd_url(&c.kubeconfig, ns, "vm1", &["--json"]);
    let json: serde_json::Value = serde_json::from_str(&url_of(&out, "admin --json")).unwrap();
    let again = json["url"].as_str().unwrap().to_owned();
    let expires = json["expiresAt"].as_str().unwrap();
    let expires: jiff::Timestamp = expires.parse().unwrap();
    let left = expires.as_second() - jiff::Timestamp::now().as_second();
    assert!((50..=60).contains(&left), "expiresAt {left} s away");
    assert_ne!(again, url);
    assert_eq!(rfb_banner(&again).await, b"RFB 003.008\n");
    drop(v);
}

#[test]
fn the_chart_grants_vncd_no_secrets_and_the_console_role_aggregates_to_edit_and_admin_only() {
    let c = cluster();
    let render = |t: &str| -> ClusterRole {
        serde_saphyr::from_str(&c.render_chart("default", &[], &[t])).unwrap()
    };
    let vncd_role = render("templates/clusterrole.yaml");
    let rules = vncd_role.rules.unwrap_or_default();
    assert!(
        !rules
            .iter()
            .any(|r| r.resources.iter().flatten().any(|x| x == "secrets")),
        "vncd's ClusterRole still grants Secrets: {rules:?}"
    );
    let verbs_on = |rules: &[k8s_openapi::api::rbac::v1::PolicyRule], res: &str| -> Vec<String> {
        let mut v: Vec<String> = rules
            .iter()
            .filter(|r| r.resources.iter().flatten().any(|x| x == res))
            .flat_map(|r| r.verbs.clone())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        verbs_on(&rules, "vncconsolerequests"),
        ["delete", "get", "list", "watch"]
    );
    assert_eq!(verbs_on(&rules, "vncconsolerequests/status"), ["patch"]);

    let console = render("templates/console-clusterrole.yaml");
    assert_eq!(console.metadata.name.as_deref(), Some("vncd-console"));
    let labels = console.metadata.labels.unwrap_or_default();
    let agg = |role: &str| {
        labels
            .get(&format!("rbac.authorization.k8s.io/aggregate-to-{role}"))
            .map(String::as_str)
    };
    assert_eq!(agg("edit"), Some("true"));
    assert_eq!(agg("admin"), Some("true"));
    assert_eq!(
        agg("view"),
        None,
        "reading requests reveals URLs: never view"
    );
    let rules = console.rules.unwrap_or_default();
    assert_eq!(
        verbs_on(&rules, "vncconsolerequests"),
        ["create", "get", "watch"]
    );
    assert_eq!(
        verbs_on(&rules, "vncconsolerequests/status"),
        Vec::<String>::new(),
        "users never write status"
    );
}
