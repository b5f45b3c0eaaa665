//! Kubernetes-mode benchmarks against a real kube-apiserver (scripts/testcluster).
//!
//! ```sh
//! cargo bench --bench kube                 # both parts
//! cargo bench --bench kube -- ready        # 200 sessions to Ready (real proxies + QEMU)
//! cargo bench --bench kube -- scale        # 20 instances, 1,000 sessions
//! cargo bench --bench kube -- console      # console URLs through VncConsoleRequests
//! ```
//!
//! 1. **ready**: one `vncd kube`, 200 VncSessions created at once against one QEMU VNC
//!    server, real proxies (the builtin backend; `VNCD_TEST_BACKEND=websockify` for
//!    websockify). Times creation -> Ready (per session and for all)
//!    and counts the API writes vncd made, from the API server's own request metrics
//!    (`apiserver_request_total`), per session. Run twice: objects created without the
//!    finalizer (vncd adds it) and with `vncd.io/cleanup` already set by the creator.
//! 2. **scale**: 20 `vncd kube` instances with different `--node-name` against one API
//!    server, 1,000 sessions spread over them. Checks there are no 409 conflicts and that
//!    each instance's watch delivered only its own node's 50 objects (each instance logs
//!    what its watch delivered when it stops). The proxies are real `vncd proxy`
//!    processes (about 0.5 MiB each), a thousand of them.
//! 3. **console**: one `vncd kube` serving one Ready session; 200 console URLs asked for one
//!    after another through VncConsoleRequests (create, then watch until `status.url`),
//!    timed from the create to the answer (p50, p99), then 20 through the `vncd url --kube`
//!    process (its whole run: kubeconfig, create, watch). Counts vncd's API writes per
//!    console opened from `apiserver_request_total` (status applies and deletes of
//!    vncconsolerequests; the user's create is not vncd's), once every request is collected.
#![allow(clippy::unwrap_used, dead_code)]

#[path = "../tests/common/cluster.rs"]
mod cluster;
#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::{Cluster, KubeVncd, cluster};
use common::Qemu;
use futures::{StreamExt, TryStreamExt, stream};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use vncd::api::{Phase, Target, VncSession, VncSessionSpec};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --all-targets` runs bench targets too; only `cargo bench` measures.
    if !args.iter().any(|a| a == "--bench") {
        println!("kube benchmark: run it with `cargo bench --bench kube [-- ready|scale|console]`");
        return;
    }
    let parts = ["ready", "scale", "console"];
    let want =
        |p: &str| !args.iter().any(|a| parts.contains(&a.as_str())) || args.iter().any(|a| a == p);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = cluster();
        println!("kube-apiserver: {}", c.dir.display());
        if want("ready") {
            one_at_a_time(c, 10).await;
            ready(c, 200, false).await;
            ready(c, 200, true).await;
        }
        if want("scale") {
            scale(c, 20, 50).await;
        }
        if want("console") {
            console(c, 200, 20).await;
        }
    });
}

/// `apiserver_request_total` by (resource, subresource, verb, code).
type Requests = BTreeMap<(String, String, String, String), f64>;

fn requests(c: &Cluster) -> Requests {
    let text = c.kubectl_ok(&["get", "--raw", "/metrics"]);
    let mut out = Requests::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let mut l: HashMap<&str, &str> = HashMap::new();
        for kv in labels.split("\",") {
            if let Some((k, v)) = kv.split_once("=\"") {
                l.insert(k, v.trim_end_matches('"'));
            }
        }
        let key = (
            l.get("resource").copied().unwrap_or_default().to_owned(),
            l.get("subresource").copied().unwrap_or_default().to_owned(),
            l.get("verb").copied().unwrap_or_default().to_owned(),
            l.get("code").copied().unwrap_or_default().to_owned(),
        );
        *out.entry(key).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// Requests between two snapshots matching `f`.
fn delta(before: &Requests, after: &Requests, f: impl Fn(&str, &str, &str, &str) -> bool) -> f64 {
    after
        .iter()
        .filter(|((r, s, v, c), _)| f(r, s, v, c))
        .map(|(k, n)| n - before.get(k).copied().unwrap_or(0.0))
        .sum()
}

/// A write that changes an object (server-side apply is counted as verb APPLY).
fn is_write(verb: &str) -> bool {
    matches!(verb, "APPLY" | "PATCH" | "PUT")
}

/// 409s on VncSessions, by verb and subresource.
fn conflicts(before: &Requests, after: &Requests) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for ((r, s, v, c), n) in after {
        let key = (r.clone(), s.clone(), v.clone(), c.clone());
        let d = n - before.get(&key).copied().unwrap_or(0.0);
        if r == "vncsessions" && c == "409" && d > 0.0 {
            *out.entry(format!("{v} {s}")).or_default() += d;
        }
    }
    out
}

/// Writes vncd makes to VncSessions: (status applies, finalizer patches).
fn session_writes(before: &Requests, after: &Requests) -> (f64, f64) {
    (
        delta(before, after, |r, s, v, _| {
            r == "vncsessions" && s == "status" && is_write(v)
        }),
        delta(before, after, |r, s, v, _| {
            r == "vncsessions" && s.is_empty() && is_write(v)
        }),
    )
}

/// Writes anyone makes to Secrets (applies and deletes): vncd makes none since console
/// tickets replaced the per-session token Secrets, and the benchmark shows that it stays so.
fn secret_writes(before: &Requests, after: &Requests) -> f64 {
    delta(before, after, |r, s, v, _| {
        r == "secrets" && s.is_empty() && (is_write(v) || v == "DELETE")
    })
}

fn session(node: &str, target_port: u16, finalizer: bool, name: &str) -> VncSession {
    let mut o = VncSession::new(
        name,
        VncSessionSpec {
            target: Target::tcp("127.0.0.1", target_port),
            node_name: Some(node.into()),
            ..VncSessionSpec::default()
        },
    );
    if finalizer {
        o.metadata.finalizers = Some(vec!["vncd.io/cleanup".into()]);
    }
    o
}

/// Records when each object of `api` is first seen Ready.
fn track_ready(api: Api<VncSession>) -> Arc<Mutex<HashMap<String, Instant>>> {
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default()).applied_objects();
        futures::pin_mut!(stream);
        while let Ok(Some(o)) = stream.try_next().await {
            if o.status.as_ref().and_then(|st| st.phase) == Some(Phase::Ready) {
                s.lock()
                    .unwrap()
                    .entry(o.name_any())
                    .or_insert_with(Instant::now);
            }
        }
    });
    seen
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn wait_probe(v: &KubeVncd) {
    let t = Instant::now();
    while v.probe("/readyz") != Some(200) {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "vncd for {} never ready:\n{}",
            v.node,
            v.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create_all(api: &Api<VncSession>, objs: Vec<VncSession>) -> HashMap<String, Instant> {
    stream::iter(objs)
        .map(|o| {
            let api = api.clone();
            async move {
                let name = o.name_any();
                api.create(&PostParams::default(), &o).await.unwrap();
                (name, Instant::now())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

async fn ready(c: &Cluster, n: usize, finalizer: bool) {
    let label = if finalizer { "with-finalizer" } else { "plain" };
    let ns = format!("ready-{label}");
    let node = format!("bench-{label}");
    c.create_namespace(&ns);
    let qemu = Qemu::tcp();
    let mut v = KubeVncd::new(&node, Some(&ns), &ns, u16::try_from(n).unwrap() + 20);
    v.start();
    wait_probe(&v).await;
    let client = c.client().await;
    let api: Api<VncSession> = Api::namespaced(client, &ns);
    let seen = track_ready(api.clone());
    let m0 = requests(c);
    let t0 = Instant::now();
    let objs = (0..n)
        .map(|i| session(&node, qemu.port, finalizer, &format!("vm{i:03}")))
        .collect();
    let created = create_all(&api, objs).await;
    let t_created = t0.elapsed();
    loop {
        if seen.lock().unwrap().len() >= n {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(900),
            "not all Ready after 900 s:\n{}",
            v.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t_all = t0.elapsed();
    let m1 = requests(c);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m2 = requests(c);
    let mut lat: Vec<f64> = {
        let s = seen.lock().unwrap();
        created
            .iter()
            .map(|(k, at)| s[k].saturating_duration_since(*at).as_secs_f64())
            .collect()
    };
    lat.sort_by(f64::total_cmp);
    let (st1, fin1) = session_writes(&m0, &m1);
    let sec1 = secret_writes(&m0, &m1);
    let (st2, fin2) = session_writes(&m0, &m2);
    let events = delta(&m0, &m2, |r, _, v, _| {
        r == "events" && (v == "POST" || v == "PATCH")
    });

    let d0 = Instant::now();
    api.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .unwrap();
    loop {
        if api
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
        {
            break;
        }
        assert!(
            d0.elapsed() < Duration::from_secs(600),
            "objects not gone:\n{}",
            v.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t_del = d0.elapsed();
    let m3 = requests(c);
    let (st3, fin3) = session_writes(&m2, &m3);
    let sec3 = secret_writes(&m2, &m3);
    let conflicts = conflicts(&m0, &m3);
    assert!(v.terminate().success());
    let summary = v.log_events("vncd kube stopped");
    let f = summary
        .last()
        .map(|s| s["fields"].clone())
        .unwrap_or_default();
    let mut passes: Vec<f64> = v
        .log_events("pass done")
        .iter()
        .filter_map(|e| e["fields"]["elapsed_ms"].as_f64())
        .collect();
    passes.sort_by(f64::total_cmp);
    let starts = v.log_events("started proxy").len();
    let nf = n as f64;
    println!(
        "\n## ready: {n} sessions, objects created {}",
        if finalizer {
            "with the finalizer already set"
        } else {
            "without a finalizer"
        }
    );
    println!(
        "created all {n} objects in {:.2} s",
        t_created.as_secs_f64()
    );
    println!(
        "all Ready {:.2} s after the first create",
        t_all.as_secs_f64()
    );
    println!(
        "per session create->Ready: p50 {:.2} s, p95 {:.2} s, max {:.2} s",
        pct(&lat, 0.5),
        pct(&lat, 0.95),
        pct(&lat, 1.0)
    );
    println!(
        "writes until all Ready: {st1} status + {fin1} finalizer = {:.2} per session, Secret writes: {} ({:.2} per session)",
        (st1 + fin1) / nf,
        sec1 + 0.0,
        sec1 / nf + 0.0
    );
    println!(
        "writes 3 s later: {st2} status + {fin2} finalizer = {:.2} per session; {events} event writes ({:.2} per session)",
        (st2 + fin2) / nf,
        events / nf
    );
    println!(
        "delete all: gone after {:.2} s; {st3} status + {fin3} finalizer writes ({:.2} per session), Secret writes: {}",
        t_del.as_secs_f64(),
        (st3 + fin3) / nf,
        sec3 + 0.0
    );
    println!("409 conflicts on vncsessions: {conflicts:?}");
    println!(
        "controller passes: {} (p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms); proxy starts: {starts}",
        passes.len(),
        pct(&passes, 0.5),
        pct(&passes, 0.95),
        pct(&passes, 1.0)
    );
    println!(
        "vncd's own count: {} status writes, {} finalizer writes, {} conflicts, {} events",
        f["status_writes"], f["finalizer_writes"], f["conflicts"], f["events"]
    );
}

/// Sessions created one after another, each waited for: latency without a crowd.
async fn one_at_a_time(c: &Cluster, n: usize) {
    let ns = "single";
    let node = "bench-single";
    c.create_namespace(ns);
    let qemu = Qemu::tcp();
    let mut v = KubeVncd::new(node, Some(ns), ns, 20);
    v.start();
    wait_probe(&v).await;
    let api: Api<VncSession> = Api::namespaced(c.client().await, ns);
    let seen = track_ready(api.clone());
    let m0 = requests(c);
    let mut lat = Vec::new();
    for i in 0..n {
        let name = format!("one{i}");
        let t = Instant::now();
        api.create(
            &PostParams::default(),
            &session(node, qemu.port, false, &name),
        )
        .await
        .unwrap();
        while !seen.lock().unwrap().contains_key(&name) {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{name} not Ready:\n{}",
                v.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        lat.push(t.elapsed().as_secs_f64());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m1 = requests(c);
    let (st, fin) = session_writes(&m0, &m1);
    let sec = secret_writes(&m0, &m1);
    lat.sort_by(f64::total_cmp);
    assert!(v.terminate().success());
    println!("\n## one at a time: {n} sessions, each created after the previous one is Ready");
    println!(
        "create->Ready: p50 {:.2} s, max {:.2} s; writes {st} status + {fin} finalizer = {:.2} per session; Secret writes: {}",
        pct(&lat, 0.5),
        pct(&lat, 1.0),
        (st + fin) / n as f64,
        sec + 0.0
    );
}

async fn scale(c: &Cluster, nodes: usize, per_node: usize) {
    let ns = "scale";
    c.create_namespace(ns);
    let mut instances: Vec<KubeVncd> = (0..nodes)
        .map(|i| {
            let mut v = KubeVncd::new(
                &format!("scale-n{i:02}"),
                None,
                ns,
                u16::try_from(per_node).unwrap() + 10,
            );
            // Twenty instances share this machine's /proc; on a real node there is one.
            v.resync = "5".into();
            v
        })
        .collect();
    for v in &mut instances {
        v.start();
    }
    for v in &instances {
        wait_probe(v).await;
    }
    let client = c.client().await;
    let api: Api<VncSession> = Api::namespaced(client, ns);
    let seen = track_ready(api.clone());
    let m0 = requests(c);
    let t0 = Instant::now();
    let total = nodes * per_node;
    let objs = (0..total)
        .map(|i| {
            session(
                &format!("scale-n{:02}", i % nodes),
                5900,
                false,
                &format!("s{i:04}"),
            )
        })
        .collect();
    create_all(&api, objs).await;
    let t_created = t0.elapsed();
    loop {
        if seen.lock().unwrap().len() >= total {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1800),
            "not all Ready after 1800 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t_all = t0.elapsed();
    let m1 = requests(c);
    let (st, fin) = session_writes(&m0, &m1);
    let sec = secret_writes(&m0, &m1);
    let conflicts = conflicts(&m0, &m1);
    println!(
        "\n## scale: {nodes} vncd kube instances, {total} sessions ({per_node} per node), builtin proxies"
    );
    println!(
        "created all {total} objects in {:.2} s; all Ready {:.2} s after the first create",
        t_created.as_secs_f64(),
        t_all.as_secs_f64()
    );
    println!(
        "writes until all Ready: {st} status + {fin} finalizer = {:.2} per session; Secret writes: {}",
        (st + fin) / total as f64,
        sec + 0.0
    );
    println!("409 conflicts on vncsessions (API server metrics): {conflicts:?}");
    println!(
        "| node | watch events | distinct objects delivered | of another node | conflicts seen by vncd |"
    );
    println!("| --- | --- | --- | --- | --- |");
    let mut all_own = true;
    for v in &mut instances {
        assert!(v.terminate().success(), "{}", v.log());
        let s = v.log_events("vncd kube stopped");
        let f = &s.last().unwrap()["fields"];
        let distinct = f["watch_objects"].as_u64().unwrap_or(u64::MAX);
        let foreign = f["watch_foreign"].as_u64().unwrap_or(u64::MAX);
        all_own &= distinct == per_node as u64 && foreign == 0;
        println!(
            "| {} | {} | {} | {} | {} |",
            v.node, f["watch_events"], distinct, foreign, f["conflicts"]
        );
    }
    println!("every instance received only its own {per_node} objects: {all_own}");
}

/// Console URLs through VncConsoleRequests: `api_n` asked through the API one after
/// another, then `cli_n` through `vncd url --kube`; latencies and vncd's writes per console.
async fn console(c: &Cluster, api_n: usize, cli_n: usize) {
    use vncd::k8s::console_request::{VncConsoleRequest, VncConsoleRequestSpec};
    let ns = "bench-console";
    let node = "node-bench-console";
    c.create_namespace(ns);
    let qemu = Qemu::tcp();
    let mut v = KubeVncd::new(node, Some(ns), ns, 4);
    v.extra
        .extend(["--console-request-grace".into(), "1".into()]);
    v.start();
    wait_probe(&v).await;
    let client = c.client().await;
    let sessions: Api<VncSession> = Api::namespaced(client.clone(), ns);
    sessions
        .create(
            &PostParams::default(),
            &session(node, qemu.port, true, "vm1"),
        )
        .await
        .unwrap();
    let t = Instant::now();
    while sessions
        .get("vm1")
        .await
        .unwrap()
        .status
        .and_then(|s| s.phase)
        != Some(Phase::Ready)
    {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "vm1 never Ready:\n{}",
            v.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let api: Api<VncConsoleRequest> = Api::namespaced(client.clone(), ns);
    let before = requests(c);
    let mut lat = Vec::new();
    for _ in 0..api_n {
        let mut r = VncConsoleRequest::new(
            "",
            VncConsoleRequestSpec {
                session: "vm1".into(),
                ttl_seconds: Some(1),
                view_only: None,
            },
        );
        r.metadata.name = None;
        r.metadata.generate_name = Some("vm1-".into());
        let t = Instant::now();
        let created = api.create(&PostParams::default(), &r).await.unwrap();
        let name = created.name_any();
        let params = kube::api::WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(30);
        let rv = created.resource_version().unwrap();
        let mut events = api.watch(&params, &rv).await.unwrap().boxed();
        loop {
            match events.next().await {
                Some(Ok(kube::api::WatchEvent::Modified(o)))
                    if o.status.as_ref().and_then(|s| s.url.as_ref()).is_some() =>
                {
                    break;
                }
                Some(_) => {}
                None => panic!("no answer to {name} within 30 s:\n{}", v.log()),
            }
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    let mut cli = Vec::new();
    for _ in 0..cli_n {
        let t = Instant::now();
        let out = std::process::Command::new(cluster::VNCD)
            .args(["url", "--kube", "-n", ns, "vm1", "--ttl", "1"])
            .env("KUBECONFIG", &c.kubeconfig)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        cli.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    cli.sort_by(f64::total_cmp);
    // Every request is collected 1 s after its 1 s ticket expired.
    let t = Instant::now();
    while !api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty()
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "requests not collected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = requests(c);
    let n = (api_n + cli_n) as f64;
    let on = |f: fn(&str, &str) -> bool| {
        delta(&before, &after, |r, s, v, _| {
            r == "vncconsolerequests" && f(s, v)
        })
    };
    let status = on(|s, v| s == "status" && is_write(v));
    let deletes = on(|s, v| s.is_empty() && v == "DELETE");
    // abs(): a sum of nothing is -0.0.
    let other = on(|s, v| s.is_empty() && is_write(v)).abs();
    // The API server counts a create as verb POST.
    let creates = on(|s, v| s.is_empty() && v == "POST");
    let conflicts = delta(&before, &after, |r, _, _, c| {
        r == "vncconsolerequests" && c == "409"
    })
    .abs();
    println!(
        "console: {api_n} URLs through the API: create -> status.url p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "console: {cli_n} runs of `vncd url --kube`: p50 {:.1} ms, p99 {:.1} ms",
        pct(&cli, 0.5),
        pct(&cli, 0.99)
    );
    println!(
        "console: vncd writes per console {:.2} ({:.2} status applies + {:.2} deletes; other writes {other}); user creates per console {:.2}; 409s {conflicts}",
        (status + deletes + other) / n,
        status / n,
        deletes / n,
        creates / n
    );
    drop(v);
}
