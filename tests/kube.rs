//! Kubernetes mode end to end: the real `vncd kube` binary against a real kube-apiserver
//! (scripts/testcluster), real websockify, a real QEMU VNC server, and a websocket
//! client reading the RFB banner through the ports vncd leased.
//!
//! One API server serves the whole binary; each test uses its own node name, namespace
//! and port pool, so tests run in parallel without seeing each other.
#![allow(clippy::unwrap_used)]

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cluster::{KubeVncd, cluster};
use common::{Client, Qemu, pid_alive, rfb_banner, try_banner};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use vncd::api::{Phase, Target, VncSession, VncSessionSpec, VncSessionStatus};

fn spec(node: Option<&str>, target_port: u16) -> VncSessionSpec {
    VncSessionSpec {
        target: Target::tcp("127.0.0.1", target_port),
        node_name: node.map(str::to_owned),
        ..VncSessionSpec::default()
    }
}

async fn create(api: &Api<VncSession>, name: &str, spec: VncSessionSpec) {
    api.create(&PostParams::default(), &VncSession::new(name, spec))
        .await
        .unwrap_or_else(|e| panic!("cannot create VncSession {name}: {e}"));
}

fn status(o: &VncSession) -> VncSessionStatus {
    o.status.clone().unwrap_or_default()
}

fn is_ready(o: &VncSession) -> bool {
    status(o).phase == Some(Phase::Ready)
}

/// Polls the objects until `done` holds, or panics with the objects and vncd's log.
async fn wait_objects(
    api: &Api<VncSession>,
    what: &str,
    timeout: Duration,
    logs: &[&KubeVncd],
    done: impl Fn(&[VncSession]) -> bool,
) -> Vec<VncSession> {
    let start = Instant::now();
    loop {
        let items = api.list(&ListParams::default()).await.unwrap().items;
        if done(&items) {
            return items;
        }
        if start.elapsed() > timeout {
            let summary: Vec<String> = items
                .iter()
                .map(|o| format!("{} {:?}", o.name_any(), o.status))
                .collect();
            let log: String = logs
                .iter()
                .map(|v| v.log())
                .collect::<Vec<_>>()
                .join("\n---\n");
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            panic!(
                "timed out after {timeout:?} waiting for {what}\nobjects:\n{}\nvncd log (last lines, newest first):\n{}",
                summary.join("\n"),
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_ready(api: &Api<VncSession>, n: usize, logs: &[&KubeVncd]) -> Vec<VncSession> {
    wait_objects(
        api,
        &format!("{n} sessions Ready"),
        Duration::from_secs(180),
        logs,
        |items| items.len() == n && items.iter().all(is_ready),
    )
    .await
}

async fn wait_probe(v: &KubeVncd, path: &str, code: u16) {
    let start = Instant::now();
    while v.probe(path) != Some(code) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{path} of vncd for {} never answered {code} (last {:?})\n{}",
            v.node,
            v.probe(path),
            v.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Events by reason about objects in `ns`.
async fn event_counts(client: &kube::Client, ns: &str) -> BTreeMap<String, BTreeSet<String>> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in api.list(&ListParams::default()).await.unwrap().items {
        let obj = e.regarding.and_then(|r| r.name).unwrap_or_default();
        out.entry(e.reason.unwrap_or_default())
            .or_default()
            .insert(obj);
    }
    out
}

async fn wait_events(client: &kube::Client, ns: &str, reason: &str, n: usize) {
    let start = Instant::now();
    loop {
        let got = event_counts(client, ns).await;
        let have = got.get(reason).map_or(0, BTreeSet::len);
        if have >= n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "only {have} of {n} sessions got a {reason} event: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A console URL for `o`, with a ticket minted from the master key in `v`'s state dir, as
/// the instance serving it would mint one: its status's base URL plus the ticket of its
/// lease (`leaseUid`). (tests/kube_console.rs gets URLs the users' way, through
/// VncConsoleRequests and RBAC.)
fn console_url(v: &KubeVncd, o: &VncSession) -> String {
    let st = status(o);
    let key = vncd::ticket::MasterKey::load(&v.state.join("ticket.key"))
        .unwrap()
        .lease_key(
            &format!("{}/{}", o.namespace().unwrap(), o.name_any()),
            st.lease_uid.as_deref().expect("a lease"),
        );
    let t = vncd::ticket::mint(&key, Duration::from_secs(60), vncd::ticket::unix_now()).unwrap();
    format!("{}?token={}", st.url.unwrap(), t.text)
}

/// Secrets in `ns`: vncd writes none (console tickets need no stored secret).
async fn token_secrets(client: &kube::Client, ns: &str) -> Vec<String> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|s| s.name_any())
        .collect()
}

/// What most tests start from: a namespace and node of their own, a QEMU VNC server and
/// a running `vncd kube` (a pool of 5 ports) serving that node in that namespace.
struct Single {
    qemu: Qemu,
    v: KubeVncd,
    client: kube::Client,
    api: Api<VncSession>,
}

async fn single(ns: &str, node: &str) -> Single {
    let c = cluster();
    c.create_namespace(ns);
    let qemu = Qemu::tcp();
    let mut v = KubeVncd::new(node, Some(ns), ns, 5);
    // These tests also read the seed's /v1/* views, which Kubernetes mode serves only
    // when asked to.
    v.extra.push("--http-api".into());
    v.start();
    let client = c.client().await;
    let api = Api::namespaced(client.clone(), ns);
    Single {
        qemu,
        v,
        client,
        api,
    }
}

fn port_of(o: &VncSession) -> u16 {
    u16::try_from(status(o).port.expect("a Ready session has a port")).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_sessions_become_ready_on_unique_ports_serve_rfb_and_are_cleaned_up_on_delete() {
    let c = cluster();
    let ns = "fifty";
    c.create_namespace(ns);
    let qemu = Qemu::tcp();
    let mut v = KubeVncd::new("node-fifty", Some(ns), ns, 60);
    v.start();
    let client = c.client().await;
    let api: Api<VncSession> = Api::namespaced(client.clone(), ns);
    for i in 0..50 {
        create(
            &api,
            &format!("vm{i:02}"),
            spec(Some("node-fifty"), qemu.port),
        )
        .await;
    }
    let items = wait_ready(&api, 50, &[&v]).await;

    let ports: BTreeSet<u16> = items.iter().map(port_of).collect();
    assert_eq!(ports.len(), 50, "every session has its own port");
    assert!(ports.iter().all(|p| (v.range.0..=v.range.1).contains(p)));
    let mut pids = Vec::new();
    for o in &items {
        let st = status(o);
        assert_eq!(st.node.as_deref(), Some("node-fifty"));
        assert!(st.lease_uid.is_some() && st.allocated_at.is_some());
        assert_eq!(
            st.target.as_deref(),
            Some(format!("127.0.0.1:{}", qemu.port).as_str())
        );
        // Status carries the bare URL; a console needs a ticket.
        assert_eq!(st.url, Some(format!("ws://127.0.0.1:{}/", port_of(o))));
        assert_eq!(st.observed_generation, o.metadata.generation);
        assert!(
            o.finalizers().iter().any(|f| f == "vncd.io/cleanup"),
            "{} has no finalizer",
            o.name_any()
        );
        let pid = st.pid.expect("pid recorded");
        assert!(pid_alive(i64::from(pid)));
        pids.push(pid);
        assert_eq!(
            rfb_banner(&console_url(&v, o)).await,
            b"RFB 003.008\n",
            "{}",
            o.name_any()
        );
    }
    // Without a ticket (the URL status shows) the proxy refuses the client.
    let bare = status(&items[0]).url.unwrap();
    assert!(
        try_banner(&bare).await.is_err(),
        "a client without a ticket got through {bare}"
    );
    assert_eq!(token_secrets(&client, ns).await, Vec::<String>::new());
    wait_events(&client, ns, "Allocated", 50).await;
    wait_events(&client, ns, "Ready", 50).await;

    api.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .unwrap();
    wait_objects(
        &api,
        "every object gone (finalizers removed)",
        Duration::from_secs(120),
        &[&v],
        |items| items.is_empty(),
    )
    .await;
    for pid in pids {
        assert!(
            !pid_alive(i64::from(pid)),
            "proxy {pid} outlived its session"
        );
    }
    for p in ports {
        std::net::TcpListener::bind(("127.0.0.1", p))
            .unwrap_or_else(|e| panic!("port {p} not free after delete: {e}"));
    }
    wait_events(&client, ns, "Released", 50).await;
    assert_eq!(
        token_secrets(&client, ns).await,
        Vec::<String>::new(),
        "no Secrets"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_and_restart_adopts_every_proxy_with_no_lease_lost_and_clients_connected() {
    let c = cluster();
    let ns = "adopt";
    c.create_namespace(ns);
    let qemu = Qemu::tcp();
    let mut v = KubeVncd::new("node-adopt", Some(ns), ns, 10);
    v.start();
    let kc = c.client().await;
    let api: Api<VncSession> = Api::namespaced(kc.clone(), ns);
    for i in 0..5 {
        create(&api, &format!("vm{i}"), spec(Some("node-adopt"), qemu.port)).await;
    }
    let before = wait_ready(&api, 5, &[&v]).await;
    let url0 = console_url(&v, &before[0]);
    // Minted before the kill, used after the restart: the key survives in the state dir.
    let unused = console_url(&v, &before[0]);
    let mut client = Client::connect(&url0).await;
    assert_eq!(client.read(12).await, b"RFB 003.008\n");

    v.kill9();
    for o in &before {
        assert!(
            pid_alive(i64::from(status(o).pid.unwrap())),
            "proxy died with vncd"
        );
    }
    let log_len = v.log().len();
    v.start();
    wait_probe(&v, "/readyz", 200).await;
    // A few passes later nothing may have moved.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = wait_ready(&api, 5, &[&v]).await;
    let key = |o: &VncSession| {
        let s = status(o);
        (
            o.name_any(),
            s.port,
            s.pid,
            s.process_start_time,
            s.lease_uid,
        )
    };
    assert_eq!(
        after.iter().map(key).collect::<Vec<_>>(),
        before.iter().map(key).collect::<Vec<_>>(),
        "same ports, pids and leases after the restart"
    );
    let second_run = &v.log()[log_len..];
    assert!(
        !second_run.contains("started proxy") && !second_run.contains("lease allocated"),
        "the restarted vncd started or leased something:\n{second_run}"
    );
    // The client connected before the kill still talks to the VNC server.
    let (w, h) = client.handshake().await;
    assert!(w > 0 && h > 0);
    // A ticket minted before the kill opens the console after the restart, and the
    // one already used stays used.
    assert_eq!(rfb_banner(&unused).await, b"RFB 003.008\n");
    assert!(
        try_banner(&url0).await.is_err(),
        "a used ticket opened again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_instance_for_the_node_stays_passive_and_takes_over_on_shutdown() {
    let c = cluster();
    let ns = "passive";
    c.create_namespace(ns);
    let qemu = Qemu::tcp();
    let node = "node-passive";
    let mut a = KubeVncd::new(node, Some(ns), ns, 10);
    a.start();
    let kc = c.client().await;
    let api: Api<VncSession> = Api::namespaced(kc.clone(), ns);
    create(&api, "vm1", spec(Some(node), qemu.port)).await;
    wait_ready(&api, 1, &[&a]).await;
    wait_probe(&a, "/readyz", 200).await;

    let mut b = KubeVncd::with_range(node, Some(ns), ns, a.range);
    // The same emptyDir, as a restarted container of the pod would see it: the same
    // ticket key, so the proxies it adopts keep their consoles.
    b.state = a.state.clone();
    b.start();
    wait_probe(&b, "/healthz", 200).await;
    assert_eq!(b.probe("/readyz"), Some(503), "a standby is not ready");
    create(&api, "vm2", spec(Some(node), qemu.port)).await;
    let items = wait_ready(&api, 2, &[&a, &b]).await;
    let holder = c.kubectl_ok(&[
        "get",
        "lease",
        "-n",
        ns,
        &format!("vncd-{node}"),
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(holder, a.identity);
    assert!(b.log().contains("waiting passively"), "{}", b.log());
    for msg in [
        "lease allocated",
        "started proxy",
        "loaded leases; adopting running proxies",
    ] {
        assert!(
            b.log_events(msg).is_empty(),
            "the standby did {msg:?}:\n{}",
            b.log()
        );
    }

    // A graceful stop keeps the proxies and hands the node over at once.
    assert!(
        a.terminate().success(),
        "vncd exited with an error:\n{}",
        a.log()
    );
    for o in &items {
        assert!(
            pid_alive(i64::from(status(o).pid.unwrap())),
            "SIGTERM stopped a proxy"
        );
    }
    wait_probe(&b, "/readyz", 200).await;
    create(&api, "vm3", spec(Some(node), qemu.port)).await;
    let after = wait_ready(&api, 3, &[&b]).await;
    for o in &items {
        let now = after.iter().find(|x| x.name_any() == o.name_any()).unwrap();
        assert_eq!(
            status(now).pid,
            status(o).pid,
            "{} was not adopted",
            o.name_any()
        );
    }
    assert_eq!(b.log_events("started proxy").len(), 1, "b started only vm3");
    assert_eq!(
        rfb_banner(&console_url(&b, &after[2])).await,
        b"RFB 003.008\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_objects_are_refused_by_the_schema_or_reported_in_status() {
    let c = cluster();
    let ns = "invalid";
    c.create_namespace(ns);
    let qemu = Qemu::tcp();
    let node = "node-invalid";
    let mut v = KubeVncd::new(node, Some(ns), ns, 5);
    v.start();
    let apply = |body: &str| {
        let doc = format!(
            "apiVersion: vncd.io/v1alpha1\nkind: VncSession\nmetadata: {{name: x, namespace: {ns}}}\nspec: {{nodeName: {node}, {body}}}\n"
        );
        c.kubectl_stdin(&["apply", "-f", "-"], doc.as_bytes())
    };
    for (body, says) in [
        (
            "target: {host: 127.0.0.1, port: 5901, unixSocket: /run/x.sock}",
            "exactly one of host+port, unixSocket or libvirtDomain",
        ),
        (
            "target: {host: 127.0.0.1}",
            "exactly one of host+port, unixSocket or libvirtDomain",
        ),
        (
            "target: {}",
            "exactly one of host+port, unixSocket or libvirtDomain",
        ),
        (
            "target: {libvirtDomain: web, unixSocket: /s}",
            "exactly one of host+port, unixSocket or libvirtDomain",
        ),
        ("target: {host: 127.0.0.1, port: 70000}", "65535"),
        ("target: {unixSocket: /s}, port: 0", "spec.port"),
        ("target: {unixSocket: /s}, extra: 1", "unknown field"),
    ] {
        let out = apply(body);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the API server accepted {body}");
        assert!(err.contains(says), "{body}: {err}");
    }

    // Valid for the schema, invalid for this node: reported in status, nothing leased.
    let api: Api<VncSession> = Api::namespaced(c.client().await, ns);
    let mut outside = spec(Some(node), qemu.port);
    outside.port = Some(80);
    create(&api, "outside-pool", outside).await;
    let mut bad_host = spec(Some(node), qemu.port);
    bad_host.target.host = Some("bad host!".into());
    create(&api, "bad-host", bad_host).await;
    create(&api, "good", spec(Some(node), qemu.port)).await;
    let items = wait_objects(
        &api,
        "two Failed and one Ready",
        Duration::from_secs(60),
        &[&v],
        |items| {
            let phase = |n: &str| {
                items
                    .iter()
                    .find(|o| o.name_any() == n)
                    .and_then(|o| status(o).phase)
            };
            phase("outside-pool") == Some(Phase::Failed)
                && phase("bad-host") == Some(Phase::Failed)
                && phase("good") == Some(Phase::Ready)
        },
    )
    .await;
    for (name, says) in [
        ("outside-pool", "outside the port pool"),
        ("bad-host", "not an IP address or DNS name"),
    ] {
        let o = items.iter().find(|o| o.name_any() == name).unwrap();
        let st = status(o);
        assert_eq!(st.reason.as_deref(), Some("InvalidManifest"), "{name}");
        assert!(
            st.message.as_deref().unwrap_or_default().contains(says),
            "{name}: {st:?}"
        );
        assert_eq!(st.port, None, "{name} got a port");
        assert!(o.finalizers().is_empty(), "{name} got a finalizer");
        assert_eq!(
            st.conditions.first().map(|c| c.status.as_str()),
            Some("False")
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_get_shows_node_port_phase_age_and_wide_adds_target_and_url() {
    let c = cluster();
    let ns = "columns";
    let node = "node-columns";
    let Single { qemu, v, api, .. } = single(ns, node).await;
    create(&api, "vm1", spec(Some(node), qemu.port)).await;
    let items = wait_ready(&api, 1, &[&v]).await;
    let port = port_of(&items[0]).to_string();

    let table = c.kubectl_ok(&["get", "vncsessions", "-n", ns]);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["NAME", "NODE", "PORT", "PHASE", "AGE"], "{table}");
    assert_eq!(
        &rows[1][..4],
        ["vm1", node, port.as_str(), "Ready"],
        "{table}"
    );

    let wide = c.kubectl_ok(&["get", "vnc", "-n", ns, "-o", "wide"]);
    let rows: Vec<Vec<&str>> = wide
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        ["NAME", "NODE", "PORT", "PHASE", "AGE", "TARGET", "URL"],
        "{wide}"
    );
    let target = format!("127.0.0.1:{}", qemu.port);
    let url = format!("ws://127.0.0.1:{port}/");
    assert_eq!(&rows[1][5..], [target.as_str(), url.as_str()], "{wide}");

    // The field selector the controller relies on, as the API server serves it.
    let mine = c.kubectl_ok(&[
        "get",
        "vnc",
        "-A",
        "--field-selector",
        &format!("spec.nodeName={node}"),
        "-o",
        "name",
    ]);
    assert_eq!(mine.trim(), "vncsession.vncd.io/vm1");

    // The same HTTP API as standalone mode: metrics and the seed's session map.
    let (code, metrics) = v.get("/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "{metrics}");
    let sample = |name: &str| {
        metrics
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
    };
    assert_eq!(sample("vncd_pool_leased_ports"), Some(1.0), "{metrics}");
    assert_eq!(
        sample(r#"vncd_sessions{phase="Ready"}"#),
        Some(1.0),
        "{metrics}"
    );
    // Every API write is counted by verb, kind and outcome: the lease reached status with
    // at least one successful apply, and the node lease was taken by a create or replace.
    let status_applies = sample(
        r#"vncd_kube_api_requests_total{verb="apply",kind="VncSession/status",outcome="ok"}"#,
    );
    assert!(status_applies.is_some_and(|n| n >= 1.0), "{metrics}");
    let lease_writes: f64 = ["create", "replace"]
        .iter()
        .filter_map(|verb| {
            sample(&format!(
                r#"vncd_kube_api_requests_total{{verb="{verb}",kind="Lease",outcome="ok"}}"#
            ))
        })
        .sum();
    assert!(lease_writes >= 1.0, "{metrics}");
    assert!(
        metrics.contains("vncd_kube_api_request_duration_seconds_bucket"),
        "{metrics}"
    );
    let (code, body) = v.get("/v1/sessions").expect("GET /v1/sessions");
    assert_eq!(code, 200, "{body}");
    let sessions: serde_json::Value = serde_json::from_str(&body).unwrap();
    let vm1 = &sessions[format!("{ns}/vm1")];
    assert_eq!(vm1["ws_port"].to_string(), port, "{body}");
    assert_eq!(vm1["vnc_port"], u64::from(qemu.port), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn only_this_nodes_sessions_reach_it_in_any_namespace_and_unscheduled_ones_are_untouched() {
    let c = cluster();
    let (ns_a, ns_b) = ("filter-a", "filter-b");
    c.create_namespace(ns_a);
    c.create_namespace(ns_b);
    let qemu = Qemu::tcp();
    let node = "node-filter";
    // No --namespace: all namespaces.
    let mut v = KubeVncd::new(node, None, ns_a, 10);
    v.start();
    let client = c.client().await;
    let a: Api<VncSession> = Api::namespaced(client.clone(), ns_a);
    let b: Api<VncSession> = Api::namespaced(client.clone(), ns_b);
    create(&a, "mine", spec(Some(node), qemu.port)).await;
    create(&b, "mine-too", spec(Some(node), qemu.port)).await;
    for i in 0..3 {
        create(
            &a,
            &format!("other{i}"),
            spec(Some("node-elsewhere"), qemu.port),
        )
        .await;
    }
    create(&b, "unscheduled", spec(None, qemu.port)).await;

    let all: Api<VncSession> = Api::all(client.clone());
    let is_mine = |o: &VncSession| o.spec.node_name.as_deref() == Some(node);
    wait_objects(
        &all,
        "both of this node's sessions Ready",
        Duration::from_secs(60),
        &[&v],
        |items| items.iter().filter(|o| is_mine(o) && is_ready(o)).count() == 2,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for api in [&a, &b] {
        for o in api.list(&ListParams::default()).await.unwrap().items {
            if !is_mine(&o) {
                assert!(
                    o.status.is_none(),
                    "{} got a status: {:?}",
                    o.name_any(),
                    o.status
                );
                assert!(
                    o.finalizers().is_empty(),
                    "{} got a finalizer",
                    o.name_any()
                );
            }
        }
    }
    assert!(v.terminate().success());
    let summary = v.log_events("vncd kube stopped");
    let f = &summary.last().expect("exit summary logged")["fields"];
    assert_eq!(
        f["watch_objects"], 2,
        "the watch delivered other nodes' objects: {f}"
    );
    assert_eq!(f["watch_foreign"], 0, "{f}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_charts_arguments_and_rbac_are_enough_to_serve_a_node() {
    use k8s_openapi::api::apps::v1::DaemonSet;
    let c = cluster();
    let ns = "chart";
    c.create_namespace(ns);
    let qemu = Qemu::tcp();
    let node = "node-chart";
    let mut v = KubeVncd::new(node, Some(ns), ns, 5);
    let range = format!("portRange={}-{}", v.range.0, v.range.1);
    let http = format!("http.port={}", v.http);
    // The chart allows no target by default: allow exactly the test VNC server's port, to
    // this namespace (and prove the chart passes the rule through).
    let allow = format!("allowTargets={{{ns}=127.0.0.1:{}}}", qemu.port);
    // The chart serves /metrics on loopback by default, away from the probes on the
    // node's addresses; this test moves it to a free loopback port.
    let defaults: DaemonSet =
        serde_saphyr::from_str(&c.render_chart(ns, &[], &["templates/daemonset.yaml"])).unwrap();
    let default_args = defaults.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    let at = default_args.iter().position(|a| a == "--metrics");
    let metrics_default = at.map(|i| default_args[i + 1].clone()).unwrap_or_default();
    assert!(
        metrics_default.starts_with("127.0.0.1:"),
        "the chart's default /metrics address is not loopback: {default_args:?}"
    );
    let metrics_port = common::free_port();
    let metrics = format!("metrics.address=127.0.0.1:{metrics_port}");
    let values = [
        "--set",
        "listenAddress=127.0.0.1",
        "--set",
        "publicHost=127.0.0.1",
        "--set",
        &range,
        "--set",
        &http,
        "--set",
        "leaseDuration=2",
        "--set",
        &allow,
        "--set",
        &metrics,
        "--set",
        "maxSessionsPerNamespace=3",
    ];
    // The chart's own ServiceAccount and RBAC, applied for real.
    c.apply_chart_rbac(ns, &values);
    let kubeconfig = v.tmp.path().join("sa.kubeconfig");
    c.service_account_cert_kubeconfig(ns, "vncd", &kubeconfig);

    // The DaemonSet's container arguments, with the downward-API variables the kubelet
    // would expand. The chart binds --http on 0.0.0.0; tests stay on loopback.
    let ds: DaemonSet =
        serde_saphyr::from_str(&c.render_chart(ns, &values, &["templates/daemonset.yaml"]))
            .unwrap();
    let container = &ds.spec.unwrap().template.spec.unwrap().containers[0];
    let state = v.tmp.path().join("state").display().to_string();
    let mut args: Vec<String> = container
        .args
        .clone()
        .unwrap()
        .into_iter()
        .map(|a| {
            a.replace("$(NODE_NAME)", node)
                .replace("$(HOST_IP)", "127.0.0.1")
                .replace("$(POD_NAMESPACE)", ns)
                .replace("0.0.0.0:", "127.0.0.1:")
                .replace("/var/lib/vncd", &state)
        })
        .collect();
    args.extend([
        "--namespace".into(),
        ns.into(),
        "--start-timeout".into(),
        "60".into(),
    ]);
    v.start_with(
        args.clone(),
        &kubeconfig,
        &[("POD_NAME", "vncd-abcde"), ("POD_NAMESPACE", ns)],
    );

    let client = c.client().await;
    let api: Api<VncSession> = Api::namespaced(client.clone(), ns);
    create(&api, "vm1", spec(Some(node), qemu.port)).await;
    let items = wait_ready(&api, 1, &[&v]).await;
    assert_eq!(
        rfb_banner(&console_url(&v, &items[0])).await,
        b"RFB 003.008\n"
    );
    wait_probe(&v, "/readyz", 200).await;
    // The probes answer on --http; /metrics does not, only on the loopback --metrics.
    assert_eq!(
        v.probe("/metrics"),
        Some(404),
        "/metrics is served with the probes"
    );
    let scraped = cluster::http_get(metrics_port, "/metrics");
    assert!(
        scraped
            .as_ref()
            .is_some_and(|(code, body)| *code == 200 && body.contains("vncd_sessions")),
        "no metrics on the --metrics address: {scraped:?}"
    );
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--max-sessions-per-namespace" && w[1] == "3"),
        "the chart passes maxSessionsPerNamespace: {args:?}"
    );
    let holder = c.kubectl_ok(&[
        "get",
        "lease",
        "-n",
        ns,
        &format!("vncd-{node}"),
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(holder, "vncd-abcde", "the pod name is the lease identity");
    wait_events(&client, ns, "Ready", 1).await;
    api.delete("vm1", &DeleteParams::default()).await.unwrap();
    wait_objects(&api, "vm1 gone", Duration::from_secs(60), &[&v], |i| {
        i.is_empty()
    })
    .await;
    assert!(
        !v.log().contains("Forbidden") && !v.log().contains("forbidden"),
        "the chart's RBAC refused something:\n{}",
        v.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_taken_off_the_node_is_released_and_stays_deletable() {
    use kube::api::{Patch, PatchParams};
    let ns = "moved";
    let node = "node-moved";
    let Single { qemu, v, api, .. } = single(ns, node).await;
    create(&api, "unassigned", spec(Some(node), qemu.port)).await;
    create(&api, "elsewhere", spec(Some(node), qemu.port)).await;
    let before = wait_ready(&api, 2, &[&v]).await;

    // One loses its node (unscheduled), the other moves to a node with no vncd.
    let merge =
        |node: serde_json::Value| Patch::Merge(serde_json::json!({"spec": {"nodeName": node}}));
    api.patch(
        "unassigned",
        &PatchParams::default(),
        &merge(serde_json::Value::Null),
    )
    .await
    .unwrap();
    api.patch(
        "elsewhere",
        &PatchParams::default(),
        &merge("node-gone".into()),
    )
    .await
    .unwrap();
    let after = wait_objects(
        &api,
        "both released by this node",
        Duration::from_secs(60),
        &[&v],
        |items| {
            items.len() == 2
                && items.iter().all(|o| {
                    let st = status(o);
                    st.port.is_none()
                        && st.lease_uid.is_none()
                        && st.reason.as_deref() == Some("Released")
                        && o.finalizers().is_empty()
                })
        },
    )
    .await;
    for o in &before {
        let pid = status(o).pid.unwrap();
        assert!(
            !pid_alive(i64::from(pid)),
            "proxy {pid} of {} still runs",
            o.name_any()
        );
    }
    assert_eq!(status(&after[0]).phase, Some(Phase::Pending));
    // Nothing blocks their deletion.
    api.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .unwrap();
    wait_objects(&api, "both deleted", Duration::from_secs(30), &[&v], |i| {
        i.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_that_loses_its_node_lease_stops_writing_and_exits() {
    let c = cluster();
    let ns = "fenced";
    let node = "node-fenced";
    let Single {
        qemu, mut v, api, ..
    } = single(ns, node).await;
    create(&api, "vm1", spec(Some(node), qemu.port)).await;
    let items = wait_ready(&api, 1, &[&v]).await;

    // Someone else takes the node's Lease (as a new holder would after a partition).
    c.kubectl_ok(&[
        "patch",
        "lease",
        "-n",
        ns,
        &format!("vncd-{node}"),
        "--type=merge",
        "-p",
        r#"{"spec":{"holderIdentity":"intruder"}}"#,
    ]);
    let start = Instant::now();
    let exit = loop {
        if let Some(s) = v.try_wait() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "vncd kept serving without its lease:\n{}",
            v.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!exit.success(), "losing the lease must be an error exit");
    assert!(v.log().contains("lost the node lease"), "{}", v.log());
    // Like any exit, it leaves the proxy to whoever serves the node next.
    assert!(pid_alive(i64::from(status(&items[0]).pid.unwrap())));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_session_stays_down_across_restarts_until_its_spec_changes() {
    let ns = "expiry";
    let node = "node-expiry";
    let Single {
        qemu,
        mut v,
        client: kc,
        api,
    } = single(ns, node).await;
    let mut s = spec(Some(node), qemu.port);
    s.max_lifetime_seconds = Some(3);
    create(&api, "vm1", s).await;
    let ready = wait_ready(&api, 1, &[&v]).await;
    let port = port_of(&ready[0]);
    let pid = status(&ready[0]).pid.unwrap();

    let expired =
        |items: &[VncSession]| items.len() == 1 && status(&items[0]).phase == Some(Phase::Expired);
    let items = wait_objects(&api, "vm1 Expired", Duration::from_secs(60), &[&v], expired).await;
    let st = status(&items[0]);
    assert_eq!(st.reason.as_deref(), Some("MaxLifetime"), "{st:?}");
    assert_eq!(st.port, None, "the port is released: {st:?}");
    assert_eq!(
        st.expired.as_ref().map(|e| e.generation),
        items[0].metadata.generation,
        "the expiry is recorded for this generation: {st:?}"
    );
    assert!(!pid_alive(i64::from(pid)), "the proxy is gone");
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
    assert_eq!(token_secrets(&kc, ns).await, Vec::<String>::new());

    // A new vncd reads the expiry from status and does not bring the session back.
    v.kill9();
    let log_len = v.log().len();
    v.start();
    wait_probe(&v, "/readyz", 200).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let items = api.list(&ListParams::default()).await.unwrap().items;
    assert!(
        expired(&items),
        "restarted vncd revived it: {:?}",
        items[0].status
    );
    let second_run = &v.log()[log_len..];
    assert!(!second_run.contains("started proxy"), "{second_run}");

    // A changed spec starts it again, and forgets the expiry.
    let patch = serde_json::json!({"spec": {"maxLifetimeSeconds": 3600}});
    api.patch(
        "vm1",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .unwrap();
    let items = wait_ready(&api, 1, &[&v]).await;
    assert_eq!(status(&items[0]).expired, None);
    assert_eq!(
        rfb_banner(&console_url(&v, &items[0])).await,
        b"RFB 003.008\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_cannot_point_a_session_at_the_nodes_other_services() {
    let c = cluster();
    let ns = "tenant";
    c.create_namespace(ns);
    let qemu = Qemu::tcp();
    let node = "node-tenant";
    let mut v = KubeVncd::new(node, Some(ns), ns, 5);
    // The chart's default rules, plus the test VNC server's own port.
    v.allow = vec![
        "tenant=127.0.0.0/8:5900-5999".into(),
        format!("tenant=127.0.0.1:{}", qemu.port),
        "tenant=unix:/var/run/libvirt/".into(),
    ];
    v.start();
    let api: Api<VncSession> = Api::namespaced(c.client().await, ns);
    let target = |host: &str, port: u16| VncSessionSpec {
        target: Target::tcp(host, port),
        node_name: Some(node.into()),
        ..VncSessionSpec::default()
    };
    create(&api, "good", spec(Some(node), qemu.port)).await;
    create(&api, "kubelet", target("127.0.0.1", 10250)).await;
    create(&api, "metadata", target("169.254.169.254", 80)).await;
    create(&api, "by-name", target("localhost.localdomain", 5901)).await;
    let unix = VncSessionSpec {
        target: Target::unix("/etc/shadow"),
        node_name: Some(node.into()),
        ..VncSessionSpec::default()
    };
    create(&api, "file", unix).await;
    let refused = ["kubelet", "metadata", "by-name", "file"];
    // Without --http-api the unauthenticated /v1/* views are not served in Kubernetes
    // mode (the probes and /metrics are).
    wait_probe(&v, "/healthz", 200).await;
    for (path, code) in [
        ("/v1/sessions", 404),
        ("/v1/status", 404),
        ("/metrics", 200),
    ] {
        let (got, body) = v.get(path).expect("GET");
        assert_eq!(got, code, "{path}: {body}");
    }
    let items = wait_objects(
        &api,
        "one Ready and four TargetNotAllowed",
        Duration::from_secs(60),
        &[&v],
        |items| {
            items.len() == 5
                && items.iter().all(|o| {
                    let st = status(o);
                    if o.name_any() == "good" {
                        st.phase == Some(Phase::Ready)
                    } else {
                        st.reason.as_deref() == Some("TargetNotAllowed")
                    }
                })
        },
    )
    .await;
    for o in items
        .iter()
        .filter(|o| refused.contains(&o.name_any().as_str()))
    {
        let st = status(o);
        assert_eq!(st.phase, Some(Phase::Failed), "{st:?}");
        assert_eq!(st.port, None, "a refused session holds no port: {st:?}");
        assert_eq!(st.pid, None, "and no proxy: {st:?}");
        let msg = st.message.unwrap_or_default();
        assert!(
            msg.contains("127.0.0.0/8:5900-5999"),
            "the message names the rules: {msg}"
        );
    }
    // The good session's port never carried a refused target: its proxy is the only one.
    let good = items.iter().find(|o| o.name_any() == "good").unwrap();
    assert_eq!(rfb_banner(&console_url(&v, good)).await, b"RFB 003.008\n");

    // Retargeting a served session at the kubelet takes its port and proxy away.
    let pid = status(good).pid.unwrap();
    let patch = serde_json::json!({"spec": {"target": {"host": "127.0.0.1", "port": 10250}}});
    api.patch(
        "good",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .unwrap();
    wait_objects(
        &api,
        "the retargeted session refused",
        Duration::from_secs(60),
        &[&v],
        |items| {
            items.iter().any(|o| {
                o.name_any() == "good"
                    && status(o).reason.as_deref() == Some("TargetNotAllowed")
                    && status(o).port.is_none()
            })
        },
    )
    .await;
    let start = Instant::now();
    while pid_alive(i64::from(pid)) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "proxy {pid} still runs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_of_a_node_that_is_gone_can_be_deleted() {
    let c = cluster();
    let ns = "gone";
    c.create_namespace(ns);
    let qemu = Qemu::tcp();
    let grace = ["--node-gone-grace".to_string(), "2".to_string()];
    // The node that will vanish: it serves two sessions, then its vncd dies for good.
    // (The test API server has no Node objects at all, so every node here is "gone" as
    // far as Nodes go; only a node Lease that keeps being renewed keeps a node alive.)
    let mut dead = KubeVncd::new("node-vanished", Some(ns), ns, 4);
    dead.extra = vec!["--node-gone-grace".into(), "0".into()];
    dead.start();
    let api: Api<VncSession> = Api::namespaced(c.client().await, ns);
    create(&api, "deleted", spec(Some("node-vanished"), qemu.port)).await;
    create(&api, "kept", spec(Some("node-vanished"), qemu.port)).await;
    wait_ready(&api, 2, &[&dead]).await;
    dead.kill9();
    // A live node, whose instance also runs the janitor.
    let mut live = KubeVncd::new("node-alive", Some(ns), ns, 4);
    live.extra = grace.to_vec();
    live.start();
    create(&api, "alive", spec(Some("node-alive"), qemu.port)).await;
    api.delete("deleted", &DeleteParams::default())
        .await
        .unwrap();
    wait_objects(
        &api,
        "the gone node's deleted session to disappear and the other to say NodeGone",
        Duration::from_secs(60),
        &[&live],
        |items| {
            let get = |n: &str| items.iter().find(|o| o.name_any() == n);
            get("deleted").is_none()
                && get("kept").is_some_and(|o| {
                    status(o).reason.as_deref() == Some("NodeGone") && o.finalizers().is_empty()
                })
                && get("alive").is_some_and(is_ready)
        },
    )
    .await;
    // A node whose vncd renews its lease keeps its finalizers, however long it runs.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let alive = api.get("alive").await.unwrap();
    assert!(
        alive.finalizers().iter().any(|f| f == "vncd.io/cleanup"),
        "{alive:?}"
    );
    assert!(is_ready(&alive));
    let kept = api.get("kept").await.unwrap();
    let st = status(&kept);
    assert_eq!(st.port, None, "{st:?}");
    assert!(
        st.message
            .unwrap_or_default()
            .contains("node node-vanished is gone"),
        "{kept:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_allowed_for_namespace_b_is_refused_to_namespace_a() {
    let c = cluster();
    let (a, b) = ("tenant-a", "tenant-b");
    c.create_namespace(a);
    c.create_namespace(b);
    // Tenant B's VM console; only namespace B may reach it.
    let qemu = Qemu::tcp();
    let node = "node-tenant-ab";
    let mut v = KubeVncd::new(node, None, b, 5);
    v.allow = vec![format!("{b}=127.0.0.1:{}", qemu.port)];
    v.start();
    let client = c.client().await;
    let api_a: Api<VncSession> = Api::namespaced(client.clone(), a);
    let api_b: Api<VncSession> = Api::namespaced(client.clone(), b);
    create(&api_a, "steal", spec(Some(node), qemu.port)).await;
    create(&api_b, "mine", spec(Some(node), qemu.port)).await;
    let mine = wait_ready(&api_b, 1, &[&v]).await;
    assert_eq!(
        rfb_banner(&console_url(&v, &mine[0])).await,
        b"RFB 003.008\n"
    );
    let refused = wait_objects(
        &api_a,
        "A's session refused",
        Duration::from_secs(60),
        &[&v],
        |items| items.len() == 1 && status(&items[0]).reason.as_deref() == Some("TargetNotAllowed"),
    )
    .await;
    let st = status(&refused[0]);
    assert_eq!(st.phase, Some(Phase::Failed), "{st:?}");
    assert_eq!(st.port, None, "a refused session holds no port: {st:?}");
    let msg = st.message.unwrap_or_default();
    assert!(
        msg.contains("namespace tenant-a") && msg.contains("tenant-a=RULE"),
        "the message names the missing namespace rule: {msg}"
    );
    assert!(!msg.contains("tenant-b="), "and not B's rules: {msg}");

    // A rule without a namespace stops vncd kube at start with a clear error.
    let mut bad = KubeVncd::new("node-tenant-unscoped", None, b, 1);
    bad.allow = vec!["127.0.0.1:5901".into()];
    bad.start();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = bad.try_wait() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "vncd kube kept running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    let log = bad.log();
    assert!(
        log.contains("names no namespace") && log.contains("NAMESPACE=RULE"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_past_its_share_waits_newest_first_and_converges_when_one_goes() {
    let c = cluster();
    let (a, b) = ("share-a", "share-b");
    c.create_namespace(a);
    c.create_namespace(b);
    let qemu = Qemu::tcp();
    let node = "node-share";
    // A pool of 5 ports: without a share namespace A would take 4 of them.
    let mut v = KubeVncd::new(node, None, a, 5);
    v.allow = vec![format!("*=127.0.0.1:{}", qemu.port)];
    v.extra
        .extend(["--max-sessions-per-namespace".into(), "2".into()]);
    v.start();
    let client = c.client().await;
    let api_a: Api<VncSession> = Api::namespaced(client.clone(), a);
    let api_b: Api<VncSession> = Api::namespaced(client.clone(), b);
    // Names sort against creation order ("vm-z" is the oldest), and a second apart, since
    // creation times have whole seconds: a rule that ordered by name would fail here.
    for name in ["vm-z", "vm-y", "vm-x", "vm-w"] {
        create(&api_a, name, spec(Some(node), qemu.port)).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    create(&api_b, "other", spec(Some(node), qemu.port)).await;
    let shared = |items: &[VncSession]| {
        let by: BTreeMap<String, VncSessionStatus> =
            items.iter().map(|o| (o.name_any(), status(o))).collect();
        let ready = |n: &str| by.get(n).is_some_and(|s| s.phase == Some(Phase::Ready));
        let waits = |n: &str| {
            by.get(n).is_some_and(|s| {
                s.phase == Some(Phase::Pending)
                    && s.reason.as_deref() == Some("NamespaceQuotaExceeded")
                    && s.port.is_none()
            })
        };
        ready("vm-z") && ready("vm-y") && waits("vm-x") && waits("vm-w")
    };
    let before = wait_objects(
        &api_a,
        "2 Ready, 2 waiting",
        Duration::from_secs(60),
        &[&v],
        shared,
    )
    .await;
    let st = before
        .iter()
        .find(|o| o.name_any() == "vm-x")
        .map(status)
        .unwrap();
    let msg = st.message.unwrap_or_default();
    assert!(
        msg.contains("namespace share-a") && msg.contains("--max-sessions-per-namespace"),
        "the message says which share is full: {msg}"
    );
    // Namespace B is not held back by A.
    let other = wait_ready(&api_b, 1, &[&v]).await;
    assert_eq!(
        rfb_banner(&console_url(&v, &other[0])).await,
        b"RFB 003.008\n"
    );

    // A restart changes nothing: the same two serve on the same ports, the same two wait.
    let ports = |items: &[VncSession]| -> BTreeMap<String, Option<i32>> {
        items
            .iter()
            .map(|o| (o.name_any(), status(o).port))
            .collect()
    };
    v.terminate();
    v.start();
    wait_probe(&v, "/readyz", 200).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = wait_objects(
        &api_a,
        "unchanged after restart",
        Duration::from_secs(60),
        &[&v],
        shared,
    )
    .await;
    assert_eq!(
        ports(&after),
        ports(&before),
        "a restart reordered the share"
    );

    // The oldest goes: the oldest waiting one (vm-x, not vm-w) takes its place.
    api_a
        .delete("vm-z", &DeleteParams::default())
        .await
        .unwrap();
    let moved = wait_objects(
        &api_a,
        "vm-x served after vm-z went",
        Duration::from_secs(60),
        &[&v],
        |items| {
            let get = |n: &str| items.iter().find(|o| o.name_any() == n).map(status);
            items.len() == 3
                && get("vm-x").is_some_and(|s| s.phase == Some(Phase::Ready))
                && get("vm-w")
                    .is_some_and(|s| s.reason.as_deref() == Some("NamespaceQuotaExceeded"))
        },
    )
    .await;
    let x = moved.iter().find(|o| o.name_any() == "vm-x").unwrap();
    assert_eq!(rfb_banner(&console_url(&v, x)).await, b"RFB 003.008\n");
}

/// A node relay as the chart's relay DaemonSet runs it: `vncd-proxy relay --state-dir DIR
/// --socket PATH`, a process of its own that no vncd starts or stops.
struct NodeRelay {
    child: std::process::Child,
}

impl NodeRelay {
    fn start(state: &std::path::Path, socket: &std::path::Path) -> NodeRelay {
        let log = state.join(format!("relay-{}.log", std::process::id()));
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_vncd-proxy"))
            .arg("relay")
            .arg("--state-dir")
            .arg(state)
            .arg("--socket")
            .arg(socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the relay did not open {}: {}",
                socket.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        NodeRelay { child }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeRelay {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn through_the_node_relay_consoles_outlive_the_controller_and_a_dead_relay_is_not_ready() {
    let c = cluster();
    let ns = "relayed";
    c.create_namespace(ns);
    let qemu = Qemu::tcp();
    let node = "node-relayed";
    let mut v = KubeVncd::new(node, Some(ns), ns, 5);
    // The relay's own directory, as the chart's hostPath would be: the relay keeps its
    // used-ticket records there, and its socket is the only thing vncd knows of it.
    let relay_dir = v.tmp.path().join("relay-state");
    std::fs::create_dir(&relay_dir).unwrap();
    let socket = relay_dir.join("relay.sock");
    let mut relay = NodeRelay::start(&relay_dir, &socket);
    v.extra.extend([
        "--relay".into(),
        "--relay-socket".into(),
        socket.display().to_string(),
    ]);
    // The relay is the builtin data plane: this test is about it under every
    // VNCD_TEST_BACKEND.
    let builtin = |v: &KubeVncd| {
        let mut a = v.args();
        if let Some(i) = a.iter().position(|x| x == "--backend") {
            a[i + 1] = "builtin".into();
        }
        a
    };
    let kubeconfig = c.kubeconfig.clone();
    v.start_with(builtin(&v), &kubeconfig, &[]);
    let client = c.client().await;
    let api: Api<VncSession> = Api::namespaced(client.clone(), ns);
    for name in ["vm1", "vm2"] {
        create(&api, name, spec(Some(node), qemu.port)).await;
    }
    let before = wait_ready(&api, 2, &[&v]).await;
    for o in &before {
        assert_eq!(
            status(o).pid,
            Some(relay.pid()),
            "{} is served by the relay, not a process of its own",
            o.name_any()
        );
    }
    let mut console = Client::connect(&console_url(&v, &before[0])).await;
    assert_eq!(console.read(12).await, b"RFB 003.008\n");

    // The controller goes (a DaemonSet rollout): the open console stays, and the new
    // controller adopts the relay's sessions on the same ports. Its pod is new, and so is
    // its emptyDir: it comes up with a new master key, so it declares the same leases
    // with new keys, which must not end the open console.
    v.kill9();
    let (w, h) = console.handshake().await;
    assert!(w > 0 && h > 0, "the console stopped with its controller");
    let key = v.state.join("ticket.key");
    let old_key = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap();
    v.start_with(builtin(&v), &kubeconfig, &[]);
    wait_probe(&v, "/readyz", 200).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = wait_ready(&api, 2, &[&v]).await;
    let ports = |items: &[VncSession]| items.iter().map(port_of).collect::<Vec<_>>();
    assert_eq!(
        ports(&after),
        ports(&before),
        "same ports after the controller restart"
    );
    assert_ne!(
        std::fs::read(&key).unwrap(),
        old_key,
        "the new controller has a new key"
    );
    // A console URL minted with the new key opens a second console.
    assert_eq!(
        rfb_banner(&console_url(&v, &after[1])).await,
        b"RFB 003.008\n"
    );
    // The same connection still carries RFB: the rest of ServerInit, then a frame.
    console.request_frame(w, h).await;
    assert_eq!(
        console.read(1).await,
        [0],
        "a FramebufferUpdate after the controller restart"
    );

    // The relay dies: the sessions are no longer Ready (no console opens), and vncd kube
    // starts no relay of its own.
    relay.kill9();
    wait_objects(
        &api,
        "not Ready without the relay",
        Duration::from_secs(60),
        &[&v],
        |items| items.len() == 2 && items.iter().all(|o| !is_ready(o)),
    )
    .await;
    assert!(
        try_banner(&console_url(&v, &after[0])).await.is_err(),
        "a console opened with no relay running"
    );
    assert!(
        v.log().contains("no relay answers on"),
        "vncd kube does not say why: {}",
        v.log()
    );
    // The relay comes back (the DaemonSet restarts it): the sessions return on their ports.
    let _relay = NodeRelay::start(&relay_dir, &socket);
    let back = wait_ready(&api, 2, &[&v]).await;
    assert_eq!(
        ports(&back),
        ports(&before),
        "same ports after the relay restart"
    );
    assert_eq!(
        rfb_banner(&console_url(&v, &back[1])).await,
        b"RFB 003.008\n"
    );
    drop(relay);
}
