//! The container image, proven: the OCI archive that `scripts/build-image` writes runs
//! under podman exactly as the chart's DaemonSet would run it, against the real test API
//! server, a real QEMU VNC server and a websocket client.
//!
//! What "as the chart would run it" means here, all taken from `helm template` output
//! (parsed, not copied by hand): the container's args; its env, with the downward-API
//! fields filled in as the kubelet would (NODE_NAME, HOST_IP, POD_NAMESPACE, POD_NAME) and
//! `$(VAR)` references in args expanded the kubelet's way; its securityContext (read-only
//! root, dropped capabilities, no privilege escalation); an emptyDir-like volume at the
//! state dir; host network; the image's own default user; and in-cluster credentials of
//! the chart's ServiceAccount (a TokenRequest token, the cluster CA and the namespace in
//! /var/run/secrets/kubernetes.io/serviceaccount, KUBERNETES_SERVICE_HOST/PORT), with the
//! chart's RBAC applied for real. One departure, for the loopback-only test rule: the
//! chart's `--http 0.0.0.0:PORT` becomes `127.0.0.1:PORT`.
//!
//! Then: the sessions become Ready, the RFB banner comes through a session's port with
//! its token; the container is killed (SIGKILL, like a node losing the pod) and a new one
//! (a new pod name), rendered with `tls.secretName` and given the Secret's files where the
//! kubelet would mount them, serves the same sessions again on the same ports, now over
//! wss, and never plain ws on those ports.
//!
//! It runs only when VNCD_TEST_IMAGE names the archive (`scripts/check-image` sets it
//! after building), and skips with the reason if podman cannot run here (missing, not
//! root): a release build takes too long for every `cargo test`.
#![allow(clippy::unwrap_used)]

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cluster::cluster;
use common::{Qemu, rfb_banner};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Container;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use vncd::api::{Phase, Target, VncSession, VncSessionSpec};

/// The two tests apply the chart's RBAC, whose ClusterRoleBinding is cluster-scoped and
/// binds one namespace's ServiceAccount: they take turns, for their whole run.
static CHART_RBAC: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Why the test cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    if std::env::var_os("VNCD_TEST_IMAGE").is_none() {
        return Some(
            "VNCD_TEST_IMAGE is not set; scripts/check-image builds the image and runs this test"
                .into(),
        );
    }
    if !nix::unistd::geteuid().is_root() {
        return Some("podman here needs root (its storage and host network)".into());
    }
    match Command::new("podman").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "podman --version failed: {}",
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Some(format!(
            "podman cannot run ({e}); scripts/install-image-deps installs it"
        )),
    }
}

/// podman with the settings that work on these machines: runc (crun fails on
/// setrlimit) and no default ulimits (runc fails on `setrlimit type 7` otherwise).
struct Podman {
    conf: PathBuf,
    /// Containers this test started, removed on drop whatever happens.
    started: Vec<String>,
}

impl Podman {
    fn new(dir: &Path) -> Podman {
        let conf = dir.join("containers.conf");
        std::fs::write(&conf, "[containers]\ndefault_ulimits = []\n").unwrap();
        Podman {
            conf,
            started: Vec::new(),
        }
    }

    fn run(&self, args: &[String]) -> Output {
        Command::new("podman")
            .arg("--runtime")
            .arg("runc")
            .args(args)
            .env("CONTAINERS_CONF", &self.conf)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[String]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn logs(&self, name: &str) -> String {
        let out = self.run(&["logs".into(), name.into()]);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for name in &self.started {
            let _ = self.run(&[
                "rm".into(),
                "--force".into(),
                "--time".into(),
                "0".into(),
                name.into(),
            ]);
        }
    }
}

/// `base64 -d` (coreutils), to keep the test's dependencies as they are.
fn base64_decode(text: &str) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "base64 -d failed");
    out.stdout
}

/// The in-cluster credentials of ServiceAccount `sa` in `ns` as the kubelet writes them into
/// `dir` (a TokenRequest token, the cluster CA, the namespace); returns the API server's
/// host and port (KUBERNETES_SERVICE_HOST/PORT).
async fn credentials(c: &cluster::Cluster, ns: &str, sa: &str, dir: &Path) -> (String, String) {
    std::fs::create_dir(dir).unwrap();
    let token = c.kubectl_ok(&["create", "token", sa, "-n", ns, "--duration", "1h"]);
    std::fs::write(dir.join("token"), token.trim()).unwrap();
    std::fs::write(dir.join("namespace"), ns).unwrap();
    let kc = kube::config::Kubeconfig::read_from(&c.kubeconfig).unwrap();
    let cl = kc.clusters[0].cluster.clone().unwrap();
    let ca = match (&cl.certificate_authority_data, &cl.certificate_authority) {
        (Some(data), _) => base64_decode(data),
        (None, Some(file)) => std::fs::read(file).unwrap(),
        _ => panic!("the test kubeconfig has no CA"),
    };
    std::fs::write(dir.join("ca.crt"), ca).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    (
        cfg.cluster_url.host().unwrap().to_owned(),
        cfg.cluster_url.port_u16().unwrap_or(443).to_string(),
    )
}

fn s(v: &str) -> String {
    v.to_owned()
}

/// The kubelet's `$(VAR)` expansion of container args: known names are replaced,
/// `$$` escapes, unknown references stay as written.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some(v) = env.get(&inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment as the kubelet would set it for a pod named `pod` on
/// `node` in `ns` (the downward-API fields the chart uses; anything else fails the test
/// so a chart change cannot slip past unproven).
fn pod_env(c: &Container, node: &str, ns: &str, pod: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in c.env.clone().unwrap_or_default() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => expand(v, &env),
            (None, Some(from)) => {
                let path = &from
                    .field_ref
                    .as_ref()
                    .unwrap_or_else(|| panic!("env {} is not a fieldRef", e.name))
                    .field_path;
                match path.as_str() {
                    "spec.nodeName" => node.into(),
                    "status.hostIP" => "127.0.0.1".into(),
                    "metadata.namespace" => ns.into(),
                    "metadata.name" => pod.into(),
                    other => panic!("env {} uses fieldRef {other}, unknown to this test", e.name),
                }
            }
            (None, None) => String::new(),
        };
        env.insert(e.name.clone(), value);
    }
    env
}

/// The `podman run` options (up to, not including, the image) that start `container` as
/// the kubelet would: detached, host network, its securityContext (read-only root, no
/// privilege escalation, capabilities, runAsUser/runAsGroup), its command as the
/// entrypoint, its env, and each volume mount from `dirs` (volume name -> host directory;
/// read-only where the mount says so).
fn run_args(
    name: &str,
    container: &Container,
    env: &BTreeMap<String, String>,
    dirs: &BTreeMap<String, PathBuf>,
) -> Vec<String> {
    let mut run = vec![
        s("run"),
        s("--detach"),
        s("--pull"),
        s("never"),
        s("--name"),
        name.to_owned(),
        s("--network"),
        s("host"),
    ];
    let sc = container.security_context.clone().unwrap_or_default();
    if sc.read_only_root_filesystem == Some(true) {
        run.push(s("--read-only"));
    }
    if sc.allow_privilege_escalation == Some(false) {
        run.extend([s("--security-opt"), s("no-new-privileges")]);
    }
    let caps = sc.capabilities.clone().unwrap_or_default();
    for cap in caps.drop.unwrap_or_default() {
        run.extend([s("--cap-drop"), cap.to_lowercase()]);
    }
    for cap in caps.add.unwrap_or_default() {
        run.extend([s("--cap-add"), cap.to_lowercase()]);
    }
    match (sc.run_as_user, sc.run_as_group) {
        (Some(u), Some(g)) => run.extend([s("--user"), format!("{u}:{g}")]),
        (Some(u), None) => run.extend([s("--user"), u.to_string()]),
        _ => {}
    }
    if let Some(cmd) = container.command.as_ref().and_then(|c| c.first()) {
        run.extend([s("--entrypoint"), cmd.clone()]);
    }
    for m in container.volume_mounts.clone().unwrap_or_default() {
        let dir = dirs
            .get(&m.name)
            .unwrap_or_else(|| panic!("no host directory for volume {}", m.name));
        let ro = if m.read_only == Some(true) { ":ro" } else { "" };
        run.extend([
            s("--volume"),
            format!("{}:{}{ro}", dir.display(), m.mount_path),
        ]);
    }
    for (k, v) in env {
        run.extend([s("--env"), format!("{k}={v}")]);
    }
    run
}

fn is_ready(o: &VncSession) -> bool {
    o.status.as_ref().and_then(|s| s.phase) == Some(Phase::Ready)
}

async fn wait_ready(api: &Api<VncSession>, n: usize, what: &str, logs: impl Fn() -> String) {
    let start = Instant::now();
    loop {
        let items = api.list(&ListParams::default()).await.unwrap().items;
        if items.len() == n && items.iter().all(is_ready) {
            return;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let summary: Vec<String> = items
                .iter()
                .map(|o| format!("{} {:?}", o.name_any(), o.status))
                .collect();
            panic!(
                "{what}: not all {n} sessions Ready after 120 s\n{}\ncontainer log:\n{}",
                summary.join("\n"),
                logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each session's port and a console URL with a fresh ticket, minted with the master key
/// the container created in its state volume (`state`), as that vncd would mint it.
async fn urls(api: &Api<VncSession>, state: &Path) -> BTreeMap<String, (i64, String)> {
    // A copy of our own: the key refuses to load from a file another uid owns (in relay
    // mode the controller runs as 65532), and this test mints as that vncd would.
    let copy = tempfile::tempdir().unwrap();
    let key = copy.path().join("ticket.key");
    std::fs::write(&key, std::fs::read(state.join("ticket.key")).unwrap()).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let master = vncd::ticket::MasterKey::load(&key).unwrap();
    let mut out = BTreeMap::new();
    for o in api.list(&ListParams::default()).await.unwrap().items {
        let st = o.status.clone().unwrap();
        let key = master.lease_key(
            &format!("{}/{}", o.namespace().unwrap(), o.name_any()),
            st.lease_uid.as_deref().unwrap(),
        );
        let t =
            vncd::ticket::mint(&key, Duration::from_secs(60), vncd::ticket::unix_now()).unwrap();
        let url = format!("{}?token={}", st.url.unwrap(), t.text);
        out.insert(o.name_any(), (i64::from(st.port.unwrap()), url));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_image_serves_sessions_as_the_chart_runs_it_and_a_new_container_serves_them_again() {
    if let Some(why) = skip_reason() {
        eprintln!("image test skipped: {why}");
        return;
    }
    let _turn = CHART_RBAC.lock().await;
    let archive = PathBuf::from(std::env::var_os("VNCD_TEST_IMAGE").unwrap());
    assert!(
        archive.is_file(),
        "VNCD_TEST_IMAGE={} is not a file",
        archive.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut podman = Podman::new(tmp.path());

    // The image from the archive, under the name the chart's values give it.
    let image = load_image(&podman, &archive);

    let c = cluster();
    let ns = "image";
    let node = "node-image";
    c.create_namespace(ns);
    let base = common::pool_base(5);
    let http = common::free_port();
    let range = format!("portRange={base}-{}", base + 4);
    let http_port = format!("http.port={http}");
    // The test's VNC server listens where the kernel put it, outside the chart's default
    // allowTargets (none): allow exactly that port, to this test's namespace.
    let qemu = Qemu::tcp();
    let allow = format!("allowTargets={{{ns}=127.0.0.1:{}}}", qemu.port);
    let metrics = format!("metrics.address=127.0.0.1:{}", common::free_port());
    let values = [
        "--set",
        "listenAddress=127.0.0.1",
        "--set",
        &range,
        "--set",
        &http_port,
        "--set",
        "leaseDuration=2",
        "--set",
        &allow,
        "--set",
        &metrics,
    ];
    // The chart's own ServiceAccount and RBAC, applied for real.
    c.apply_chart_rbac(ns, &values);
    let ds: DaemonSet =
        serde_saphyr::from_str(&c.render_chart(ns, &values, &["templates/daemonset.yaml"]))
            .unwrap();
    let pod_spec = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod_spec.host_network,
        Some(true),
        "the chart runs on the host network"
    );
    let container = pod_spec.containers[0].clone();
    let rendered_image = container.image.clone().unwrap();
    assert_eq!(
        image.trim_start_matches("localhost/"),
        rendered_image,
        "values.yaml's image is what scripts/build-image makes"
    );
    let sa = pod_spec.service_account_name.clone().unwrap();
    // The same chart with a kubernetes.io/tls Secret: what the second pod runs (an upgrade
    // that turns TLS on).
    let mut tls_values = values.to_vec();
    tls_values.extend(["--set", "tls.secretName=vncd-console-tls"]);
    let ds_tls: DaemonSet =
        serde_saphyr::from_str(&c.render_chart(ns, &tls_values, &["templates/daemonset.yaml"]))
            .unwrap();
    let tls_spec = ds_tls.spec.unwrap().template.spec.unwrap();
    let tls_container = tls_spec.containers[0].clone();
    let tls_volumes = tls_spec.volumes.clone().unwrap_or_default();
    let secret_volume = tls_volumes
        .iter()
        .find_map(|v| v.secret.as_ref())
        .expect("tls.secretName mounts a Secret volume");
    assert_eq!(
        secret_volume.secret_name.as_deref(),
        Some("vncd-console-tls")
    );
    // The Secret's files as the kubelet writes them (tls.crt, tls.key, the volume's mode),
    // for a certificate that names this "node" (the pod's HOST_IP is 127.0.0.1).
    let tls_dir = tmp.path().join("tls");
    std::fs::create_dir(&tls_dir).unwrap();
    let ck = common::self_signed();
    std::fs::write(tls_dir.join("tls.crt"), ck.cert.pem()).unwrap();
    std::fs::write(tls_dir.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = u32::try_from(secret_volume.default_mode.unwrap_or(0o644)).unwrap();
        for f in ["tls.crt", "tls.key"] {
            std::fs::set_permissions(tls_dir.join(f), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
    }

    // In-cluster credentials of the chart's ServiceAccount, where the kubelet puts them.
    let secrets = tmp.path().join("serviceaccount");
    let (api_host, api_port) = credentials(c, ns, &sa, &secrets).await;
    // The chart mounts them itself (automount off), with the projected volume's mode.
    assert_eq!(
        pod_spec.automount_service_account_token,
        Some(false),
        "the chart must not use the default automount (mode 0644, readable by every proxy)"
    );
    let volumes = pod_spec.volumes.clone().unwrap_or_default();
    let mode = volumes
        .iter()
        .find_map(|v| v.projected.as_ref()?.default_mode)
        .expect("a projected volume for the API credentials");
    for f in ["token", "namespace", "ca.crt"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = u32::try_from(mode).unwrap();
        std::fs::set_permissions(secrets.join(f), std::fs::Permissions::from_mode(mode)).unwrap();
    }

    let client = c.client().await;
    let api: Api<VncSession> = Api::namespaced(client.clone(), ns);
    for name in ["vm1", "vm2"] {
        let spec = VncSessionSpec {
            target: Target::tcp("127.0.0.1", qemu.port),
            node_name: Some(node.into()),
            ..VncSessionSpec::default()
        };
        api.create(&PostParams::default(), &VncSession::new(name, spec))
            .await
            .unwrap();
    }

    // One "pod": a container started the way the kubelet would start the chart's.
    let start_pod = |podman: &mut Podman,
                     pod: &str,
                     container: &Container,
                     volumes: &[k8s_openapi::api::core::v1::Volume]|
     -> String {
        let env = pod_env(container, node, ns, pod);
        let args: Vec<String> = container
            .args
            .clone()
            .unwrap()
            .iter()
            .map(|a| expand(a, &env).replace("0.0.0.0:", "127.0.0.1:"))
            .collect();
        let state = tmp.path().join(format!("{pod}-state"));
        std::fs::create_dir(&state).unwrap();
        {
            // An emptyDir is world-writable; the image's user writes into it.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let name = format!("vncd-image-test-{}-{pod}", std::process::id());
        // The chart's volumes as the kubelet would provide them: its emptyDir is a fresh
        // directory, its projected volume the ServiceAccount credentials (read-only).
        let mut dirs = BTreeMap::new();
        for v in volumes {
            let dir = if v.projected.is_some() {
                secrets.clone()
            } else if v.secret.is_some() {
                tls_dir.clone()
            } else {
                state.clone()
            };
            dirs.insert(v.name.clone(), dir);
        }
        let mut run = run_args(&name, container, &env, &dirs);
        run.extend([
            s("--env"),
            format!("KUBERNETES_SERVICE_HOST={api_host}"),
            s("--env"),
            format!("KUBERNETES_SERVICE_PORT={api_port}"),
        ]);
        run.push(rendered_image.clone());
        run.extend(args);
        podman.started.push(name.clone());
        podman.ok(&run);
        name
    };

    let first = start_pod(&mut podman, "vncd-aaaaa", &container, &volumes);
    wait_ready(&api, 2, "first container", || podman.logs(&first)).await;
    let before = urls(&api, &tmp.path().join("vncd-aaaaa-state")).await;
    for (name, (port, url)) in &before {
        assert!(
            (i64::from(base)..=i64::from(base) + 4).contains(port),
            "{name} port {port}"
        );
        assert_eq!(rfb_banner(url).await, b"RFB 003.008\n", "{name} via {url}");
    }
    // vncd runs as root with only the chart's six capabilities; every proxy, which parses
    // untrusted input, runs as the chart's proxyUser (65534), not root.
    let status = proc_status(&podman, &first);
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(
        field("Uid:").split_whitespace().nth(1),
        Some("0"),
        "vncd: {}",
        field("Uid:")
    );
    // CAP_CHOWN(0) DAC_READ_SEARCH(2) KILL(5) SETGID(6) SETUID(7) SYS_PTRACE(19).
    let want: u64 = (1 << 0) | (1 << 2) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 19);
    let bounding =
        u64::from_str_radix(field("CapBnd:").split_whitespace().nth(1).unwrap(), 16).unwrap();
    assert_eq!(
        bounding,
        want,
        "vncd's capability bounding set: {}",
        field("CapBnd:")
    );
    // What a proxy's user cannot read, shown by vncd-proxy run as that user in the
    // container failing to load it as its key file: the ServiceAccount token (vncd, root,
    // read it to get this far) and the node's ticket master key, from which every
    // console's key derives.
    let state_mount = container
        .volume_mounts
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|m| !m.mount_path.contains("serviceaccount"))
        .expect("the state volume")
        .mount_path;
    for secret in [
        "/var/run/secrets/kubernetes.io/serviceaccount/token".to_owned(),
        format!("{state_mount}/ticket.key"),
    ] {
        let out = podman.run(&[
            s("exec"),
            s("--user"),
            s("65534:65534"),
            first.clone(),
            s("/usr/bin/vncd-proxy"),
            s("--listen"),
            s("127.0.0.1:1"),
            s("--target"),
            s("127.0.0.1:1"),
            s("--key-file"),
            secret.clone(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("cannot read ticket key file"),
            "the proxy user could read {secret}: {err}"
        );
    }
    let top = podman.ok(&[s("top"), first.clone(), s("user"), s("args")]);
    let proxies: Vec<&str> = top.lines().filter(|l| l.contains("vncd-proxy")).collect();
    assert_eq!(proxies.len(), 2, "{top}");
    for p in proxies {
        let user = p.split_whitespace().next().unwrap_or_default();
        assert!(
            user == "65534" || user == "nobody",
            "a proxy runs as {user}, not the chart's proxyUser: {top}"
        );
    }

    // The node loses the pod: SIGKILL, and the container (with every proxy in it) is gone.
    podman.ok(&[s("kill"), s("--signal"), s("KILL"), first.clone()]);
    podman.ok(&[s("rm"), s("--force"), first.clone()]);
    let gone = Instant::now();
    while before.values().any(|(port, _)| {
        std::net::TcpStream::connect(("127.0.0.1", u16::try_from(*port).unwrap())).is_ok()
    }) {
        assert!(
            gone.elapsed() < Duration::from_secs(10),
            "the old proxies still listen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A new pod serves the same sessions again on the same ports, after taking over the
    // node lease the dead pod held. Its emptyDir is new, so is its ticket key: consoles
    // need fresh URLs, minted with it.
    // The new pod runs the chart with tls.secretName: the same sessions, now over wss.
    let second = start_pod(&mut podman, "vncd-bbbbb", &tls_container, &tls_volumes);
    let second_state = tmp.path().join("vncd-bbbbb-state");
    let deadline = Instant::now() + Duration::from_secs(120);
    for (name, (port, _)) in &before {
        loop {
            let fresh = if second_state.join("ticket.key").exists() {
                urls(&api, &second_state).await.remove(name)
            } else {
                None
            };
            let got = match &fresh {
                Some((_, url)) if url.starts_with("wss://") => {
                    match common::wss_open(url, ck.cert.der()).await {
                        Ok(mut ws) => Ok(common::wss_read(&mut ws, 12).await),
                        Err(e) => Err(e),
                    }
                }
                Some((_, url)) => Err(format!("not a wss URL yet: {url}")),
                None => Err("no key or lease yet".into()),
            };
            match got {
                Ok(b) if b == b"RFB 003.008\n" => break,
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "{name} not served again on port {port}: {other:?}\ncontainer log:\n{}",
                        podman.logs(&second)
                    );
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }
    wait_ready(&api, 2, "second container", || podman.logs(&second)).await;
    let ports = |m: &BTreeMap<String, (i64, String)>| {
        m.iter()
            .map(|(n, (p, _))| (n.clone(), *p))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ports(&urls(&api, &second_state).await),
        ports(&before),
        "same ports after the new pod"
    );
    // Never plain ws on a TLS port: a plain upgrade gets no RFB banner.
    for (name, (_, url)) in urls(&api, &second_state).await {
        let plain = url.replacen("wss://", "ws://", 1);
        assert!(
            common::try_banner(&plain).await.is_err(),
            "{name}: plain ws served on a TLS port"
        );
    }
    let log = podman.logs(&second);
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "RBAC refused something:\n{log}"
    );
}

/// `podman load` of the archive; the image name it reports.
fn load_image(podman: &Podman, archive: &Path) -> String {
    let loaded = podman.ok(&[
        s("load"),
        s("--quiet"),
        s("--input"),
        archive.display().to_string(),
    ]);
    loaded
        .lines()
        .find_map(|l| {
            l.strip_prefix("Loaded image: ")
                .or_else(|| l.strip_prefix("Loaded image(s): "))
        })
        .unwrap_or_else(|| panic!("podman load said: {loaded}"))
        .trim()
        .to_owned()
}

/// A pod's one container from a rendered DaemonSet (`template` of the chart).
fn rendered(
    c: &cluster::Cluster,
    ns: &str,
    values: &[&str],
    template: &str,
) -> k8s_openapi::api::core::v1::PodSpec {
    let ds: DaemonSet = serde_saphyr::from_str(&c.render_chart(ns, values, &[template])).unwrap();
    ds.spec.unwrap().template.spec.unwrap()
}

/// /proc/PID/status of a container's first process.
fn proc_status(podman: &Podman, name: &str) -> String {
    let pid = podman.ok(&[
        s("inspect"),
        s("--format"),
        s("{{.State.Pid}}"),
        name.to_owned(),
    ]);
    std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap()
}

/// The effective capabilities and uid of a container's first process.
fn caps_and_uid(podman: &Podman, name: &str) -> (u64, String) {
    let status = proc_status(podman, name);
    let field = |f: &str| {
        status
            .lines()
            .find(|l| l.starts_with(f))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_default()
            .to_owned()
    };
    (
        u64::from_str_radix(&field("CapEff:"), 16).unwrap(),
        field("Uid:"),
    )
}

/// The chart with `relay.enabled`: its relay DaemonSet (init container, then the relay
/// with no capability under uid 65531) and its controller (uid 65532, no capability) run
/// under podman as the kubelet would run them, sharing the hostPath directory. Consoles
/// open through the relay, and replacing the controller pod (kill, then a new pod with a
/// new emptyDir and so a new master key) leaves an open console streaming.
#[tokio::test(flavor = "multi_thread")]
async fn the_charts_relay_pod_keeps_consoles_open_while_the_controller_pod_is_replaced() {
    use std::os::unix::fs::PermissionsExt;
    if let Some(why) = skip_reason() {
        eprintln!("image test skipped: {why}");
        return;
    }
    let _turn = CHART_RBAC.lock().await;
    let archive = PathBuf::from(std::env::var_os("VNCD_TEST_IMAGE").unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let mut podman = Podman::new(tmp.path());
    let image = load_image(&podman, &archive);

    let c = cluster();
    let (ns, node) = ("image-relay", "node-image-relay");
    c.create_namespace(ns);
    let qemu = Qemu::tcp();
    let base = common::pool_base(5);
    // The hostPath as the kubelet creates it (DirectoryOrCreate: root, 0755).
    let host = tmp.path().join("hostpath");
    std::fs::create_dir(&host).unwrap();
    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o755)).unwrap();
    let set = [
        "listenAddress=127.0.0.1".to_owned(),
        format!("portRange={base}-{}", base + 4),
        format!("http.port={}", common::free_port()),
        "leaseDuration=2".to_owned(),
        format!("allowTargets={{{ns}=127.0.0.1:{}}}", qemu.port),
        format!("metrics.address=127.0.0.1:{}", common::free_port()),
        "relay.enabled=true".to_owned(),
        format!("relay.hostPath={}", host.display()),
    ];
    let values: Vec<&str> = set.iter().flat_map(|v| ["--set", v.as_str()]).collect();
    c.apply_chart_rbac(ns, &values);
    let ctl = rendered(c, ns, &values, "templates/daemonset.yaml");
    let rel = rendered(c, ns, &values, "templates/relay-daemonset.yaml");
    let controller = ctl.containers[0].clone();
    let relay = rel.containers[0].clone();
    let init = rel.init_containers.clone().unwrap()[0].clone();
    let rendered_image = controller.image.clone().unwrap();
    assert_eq!(image.trim_start_matches("localhost/"), rendered_image);
    // What the chart promises about the two pods.
    assert!(
        relay.ports.is_none(),
        "the relay pod declares no containerPorts"
    );
    for (what, cont) in [("relay", &relay), ("controller", &controller)] {
        let caps = cont.security_context.clone().unwrap().capabilities.unwrap();
        assert!(caps.add.is_none(), "the {what} adds capabilities: {caps:?}");
    }
    assert_eq!(rel.automount_service_account_token, Some(false));
    let args = controller.args.clone().unwrap();
    assert!(
        !args.iter().any(|a| a == "--proxy-user"),
        "no proxy user with the relay: {args:?}"
    );
    let relay_uid = relay.security_context.clone().unwrap().run_as_user.unwrap();
    let ctl_uid = controller
        .security_context
        .clone()
        .unwrap()
        .run_as_user
        .unwrap();
    assert_ne!(relay_uid, ctl_uid, "the relay has a uid of its own");

    // The controller's credentials, 0400 and owned by its runAsUser (the kubelet gives a
    // projected token to the pod's uid when every container runs as that uid).
    let secrets = tmp.path().join("serviceaccount");
    let sa = ctl.service_account_name.clone().unwrap();
    let (api_host, api_port) = credentials(c, ns, &sa, &secrets).await;
    let mode = ctl
        .volumes
        .clone()
        .unwrap()
        .iter()
        .find_map(|v| v.projected.as_ref()?.default_mode)
        .unwrap();
    for f in ["token", "namespace", "ca.crt"] {
        let p = secrets.join(f);
        std::fs::set_permissions(
            &p,
            std::fs::Permissions::from_mode(u32::try_from(mode).unwrap()),
        )
        .unwrap();
        std::os::unix::fs::chown(&p, Some(u32::try_from(ctl_uid).unwrap()), None).unwrap();
    }

    let pid = std::process::id();
    let dirs_of = |spec: &k8s_openapi::api::core::v1::PodSpec, state: &Path| {
        let mut dirs = BTreeMap::new();
        for v in spec.volumes.clone().unwrap_or_default() {
            let dir = if v.host_path.is_some() {
                host.clone()
            } else if v.projected.is_some() {
                secrets.clone()
            } else {
                state.to_owned()
            };
            dirs.insert(v.name, dir);
        }
        dirs
    };
    // The relay pod: its init container runs to completion, then the relay.
    let empty = tmp.path().join("unused");
    let relay_pod = "vncd-relay-aaaaa";
    let init_name = format!("vncd-image-test-{pid}-{relay_pod}-init");
    let mut run = run_args(
        &init_name,
        &init,
        &pod_env(&init, node, ns, relay_pod),
        &dirs_of(&rel, &empty),
    );
    run.push(rendered_image.clone());
    run.extend(init.args.clone().unwrap());
    podman.started.push(init_name.clone());
    podman.ok(&run);
    let code = podman.ok(&[s("wait"), init_name.clone()]);
    assert_eq!(
        code,
        "0",
        "the init container failed: {}",
        podman.logs(&init_name)
    );
    let relay_name = format!("vncd-image-test-{pid}-{relay_pod}");
    let mut run = run_args(
        &relay_name,
        &relay,
        &pod_env(&relay, node, ns, relay_pod),
        &dirs_of(&rel, &empty),
    );
    run.push(rendered_image.clone());
    run.extend(relay.args.clone().unwrap());
    podman.started.push(relay_name.clone());
    podman.ok(&run);

    let start_controller = |podman: &mut Podman, pod: &str| -> (String, PathBuf) {
        let state = tmp.path().join(format!("{pod}-state"));
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        let env = pod_env(&controller, node, ns, pod);
        let name = format!("vncd-image-test-{pid}-{pod}");
        let mut run = run_args(&name, &controller, &env, &dirs_of(&ctl, &state));
        run.extend([
            s("--env"),
            format!("KUBERNETES_SERVICE_HOST={api_host}"),
            s("--env"),
            format!("KUBERNETES_SERVICE_PORT={api_port}"),
        ]);
        run.push(rendered_image.clone());
        run.extend(
            controller
                .args
                .clone()
                .unwrap()
                .iter()
                .map(|a| expand(a, &env).replace("0.0.0.0:", "127.0.0.1:")),
        );
        podman.started.push(name.clone());
        podman.ok(&run);
        (name, state)
    };
    let (first, first_state) = start_controller(&mut podman, "vncd-aaaaa");

    let client = c.client().await;
    let api: Api<VncSession> = Api::namespaced(client.clone(), ns);
    for name in ["vm1", "vm2"] {
        let spec = VncSessionSpec {
            target: Target::tcp("127.0.0.1", qemu.port),
            node_name: Some(node.into()),
            ..VncSessionSpec::default()
        };
        api.create(&PostParams::default(), &VncSession::new(name, spec))
            .await
            .unwrap();
    }
    let logs = || {
        format!(
            "controller:\n{}\nrelay:\n{}",
            podman.logs(&first),
            podman.logs(&relay_name)
        )
    };
    wait_ready(&api, 2, "through the relay pod", logs).await;
    let before = urls(&api, &first_state).await;
    let mut console = common::Client::connect(&before["vm1"].1).await;
    assert_eq!(console.read(12).await, b"RFB 003.008\n");
    let (w, h) = console.handshake().await;
    // The relay pod's probe command, as the kubelet would exec it in the container.
    let probe = relay
        .liveness_probe
        .clone()
        .and_then(|p| p.exec)
        .and_then(|e| e.command)
        .expect("the relay pod has an exec liveness probe");
    assert_eq!(
        relay
            .readiness_probe
            .clone()
            .and_then(|p| p.exec)
            .and_then(|e| e.command),
        Some(probe.clone())
    );
    let mut exec = vec![s("exec"), relay_name.clone()];
    exec.extend(probe);
    podman.ok(&exec);
    // Both run as the chart says, with no capability at all.
    assert_eq!(
        caps_and_uid(&podman, &relay_name),
        (0, relay_uid.to_string())
    );
    assert_eq!(caps_and_uid(&podman, &first), (0, ctl_uid.to_string()));

    // The controller pod goes; the console keeps streaming.
    podman.ok(&[s("kill"), s("--signal"), s("KILL"), first.clone()]);
    podman.ok(&[s("rm"), s("--force"), first.clone()]);
    let (second, second_state) = start_controller(&mut podman, "vncd-bbbbb");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let fresh = if second_state.join("ticket.key").exists() {
            urls(&api, &second_state).await.remove("vm2")
        } else {
            None
        };
        if let Some((_, url)) = fresh
            && common::try_banner(&url).await.is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new controller pod never served vm2:\n{}",
            podman.logs(&second)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_ready(&api, 2, "second controller pod", || podman.logs(&second)).await;
    let ports =
        |m: &BTreeMap<String, (i64, String)>| m.values().map(|(p, _)| *p).collect::<Vec<_>>();
    assert_eq!(ports(&urls(&api, &second_state).await), ports(&before));
    console.request_frame(w, h).await;
    assert_eq!(
        console.read(1).await,
        [0],
        "a FramebufferUpdate after the controller pod was replaced"
    );
    let log = podman.logs(&second);
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "RBAC refused something:\n{log}"
    );
}
