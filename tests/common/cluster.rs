//! A real kube-apiserver for the Kubernetes-mode tests and benchmarks, one per test
//! binary, plus `vncd kube` processes driven against it.
//!
//! The cluster is started once (`scripts/testcluster up DIR`, in a fresh temp DIR) and
//! stopped by a reaper: a small process in its own session that waits for this test
//! process to exit, however it exits (success, panic, SIGKILL), then runs
//! `scripts/testcluster down DIR` and removes DIR. A cluster that cannot start fails the
//! test with the reason; nothing is skipped.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

pub const VNCD: &str = env!("CARGO_BIN_EXE_vncd");

/// The running test cluster.
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// The cluster of this test binary, started on first use, with the CRD installed.
pub fn cluster() -> &'static Cluster {
    match CLUSTER.get_or_init(|| start().and_then(|c| c.install_crd().map(|()| c))) {
        Ok(c) => c,
        Err(e) => panic!("the test Kubernetes API server could not start: {e}"),
    }
}

/// The cluster of this test binary without the VncSession CRD (use either this or
/// [`cluster`] in one binary, not both).
pub fn bare_cluster() -> &'static Cluster {
    match CLUSTER.get_or_init(start) {
        Ok(c) => c,
        Err(e) => panic!("the test Kubernetes API server could not start: {e}"),
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/testcluster")
}

fn start() -> Result<Cluster, String> {
    let dir = tempfile::Builder::new()
        .prefix("vncd-testcluster-")
        .tempdir()
        .map_err(|e| format!("cannot create a temp dir: {e}"))?
        .keep();
    // The reaper first, so that even a half-started cluster is stopped.
    Command::new("sh")
        .arg("-c")
        .arg(
            r#"tail --pid="$1" -f /dev/null; "$2" down "$3" >/dev/null 2>&1; [ -n "$VNCD_KEEP_TESTCLUSTER" ] || rm -rf "$3""#,
        )
        .arg("vncd-testcluster-reaper")
        .arg(std::process::id().to_string())
        .arg(script())
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the cluster reaper: {e}"))?;
    let out = Command::new(script())
        .arg("up")
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script().display()))?;
    if !out.status.success() {
        return Err(format!(
            "`scripts/testcluster up {}` failed ({}):\n{}\n{}",
            dir.display(),
            out.status,
            tail(&String::from_utf8_lossy(&out.stdout)),
            tail(&String::from_utf8_lossy(&out.stderr)),
        ));
    }
    Ok(Cluster {
        kubeconfig: dir.join("kubeconfig"),
        kubectl: dir.join("bin/kubectl"),
        dir,
    })
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Cluster {
    /// `vncd crd --all | kubectl apply -f -`, then waits until the CRDs are Established.
    pub fn install_crd(&self) -> Result<(), String> {
        let crd = Command::new(VNCD).args(["crd", "--all"]).output().unwrap();
        let applied = self.kubectl_stdin(&["apply", "-f", "-"], &crd.stdout);
        if !applied.status.success() {
            return Err(format!(
                "cannot install the CRD: {}",
                String::from_utf8_lossy(&applied.stderr)
            ));
        }
        let ok = self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/vncsessions.vncd.io",
            "crd/vncconsolerequests.vncd.io",
        ]);
        if !ok.status.success() {
            return Err(format!(
                "CRD not established: {}",
                String::from_utf8_lossy(&ok.stderr)
            ));
        }
        Ok(())
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(&self.kubectl)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn kubectl_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = Command::new(&self.kubectl)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// kubectl that must succeed; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A client for the current test's runtime.
    pub async fn client(&self) -> kube::Client {
        let kc = Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        kube::Client::try_from(cfg).unwrap()
    }

    pub fn create_namespace(&self, ns: &str) {
        self.kubectl_ok(&["create", "namespace", ns]);
    }

    /// `helm template` of the project's chart into `ns` with `values` (`--set` pairs),
    /// only the templates in `only`.
    pub fn render_chart(&self, ns: &str, values: &[&str], only: &[&str]) -> String {
        let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/vncd");
        let mut args = vec!["template", "vncd", chart, "--namespace", ns];
        args.extend(values);
        for o in only {
            args.extend(["--show-only", o]);
        }
        self.helm(&args)
    }

    /// Applies the chart's own ServiceAccount and RBAC (ClusterRole, Role and their
    /// bindings), rendered with `values`, for real.
    pub fn apply_chart_rbac(&self, ns: &str, values: &[&str]) {
        let rbac = self.render_chart(
            ns,
            values,
            &[
                "templates/serviceaccount.yaml",
                "templates/clusterrole.yaml",
                "templates/console-clusterrole.yaml",
                "templates/clusterrolebinding.yaml",
                "templates/role.yaml",
                "templates/rolebinding.yaml",
            ],
        );
        let out = self.kubectl_stdin(&["apply", "-f", "-"], rbac.as_bytes());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `helm ARGS`, which must succeed; returns stdout.
    pub fn helm(&self, args: &[&str]) -> String {
        let out = Command::new(self.dir.join("bin/helm"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A kubeconfig (client certificate) for `user` in `groups`, written to `out`.
    pub fn user_kubeconfig(&self, user: &str, groups: &[&str], out: &Path) {
        let mut cmd = Command::new(self.dir.join("bin/vncd-testcluster"));
        cmd.args(["user-kubeconfig", "--dir"])
            .arg(&self.dir)
            .args(["--user", user]);
        for g in groups {
            cmd.args(["--group", g]);
        }
        let o = cmd.arg("--out").arg(out).output().unwrap();
        assert!(
            o.status.success(),
            "user-kubeconfig failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Cluster {
    /// A kubeconfig for the ServiceAccount `sa` in `ns` (created if missing), with a
    /// bearer token from the TokenRequest API, as a CI job or in-cluster client would use.
    /// A client-certificate kubeconfig that authenticates as ServiceAccount `ns/sa` (the
    /// user name and groups the API server gives that ServiceAccount), written to `out`:
    /// how a pod running as it reaches the API, without minting a token.
    pub fn service_account_cert_kubeconfig(&self, ns: &str, sa: &str, out: &Path) {
        self.user_kubeconfig(
            &format!("system:serviceaccount:{ns}:{sa}"),
            &[
                "system:serviceaccounts",
                &format!("system:serviceaccounts:{ns}"),
            ],
            out,
        );
    }

    pub fn service_account_kubeconfig(&self, ns: &str, sa: &str, out: &Path) {
        let _ = self.kubectl(&["create", "serviceaccount", sa, "-n", ns]);
        let token = self.kubectl_ok(&["create", "token", sa, "-n", ns, "--duration", "1h"]);
        let admin = Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let cluster = &admin.clusters[0];
        let kc = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": cluster.name, "cluster": cluster.cluster}],
            "users": [{"name": sa, "user": {"token": token.trim()}}],
            "contexts": [{"name": sa, "context": {"cluster": cluster.name, "user": sa, "namespace": ns}}],
            "current-context": sa,
        });
        std::fs::write(out, serde_json::to_vec_pretty(&kc).unwrap()).unwrap();
    }
}

/// One `vncd kube` instance (started or not) with its own temp dir and port pool.
pub struct KubeVncd {
    pub node: String,
    pub namespace: Option<String>,
    pub lease_namespace: String,
    pub identity: String,
    pub range: (u16, u16),
    pub http: u16,
    /// `--resync-interval` (seconds).
    pub resync: String,
    pub extra: Vec<String>,
    /// `--allow-target` rules, `NAMESPACE=RULE` (default: `*=` loopback at the unprivileged ports where the
    /// test VNC servers listen, on ports the kernel picks).
    pub allow: Vec<String>,
    pub tmp: tempfile::TempDir,
    /// `--state-dir` (the pod's emptyDir in a DaemonSet): where the ticket master key is.
    pub state: PathBuf,
    child: Option<Child>,
}

impl KubeVncd {
    /// `size` ports from a range no other test uses.
    pub fn new(node: &str, namespace: Option<&str>, lease_namespace: &str, size: u16) -> Self {
        let base = crate::common::pool_base(size);
        Self::with_range(node, namespace, lease_namespace, (base, base + size - 1))
    }

    /// An instance sharing another's node and pool (a second instance for that node).
    pub fn with_range(
        node: &str,
        namespace: Option<&str>,
        lease_namespace: &str,
        range: (u16, u16),
    ) -> Self {
        if crate::common::backend() == "websockify" {
            crate::common::require("websockify");
        }
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        KubeVncd {
            state,
            node: node.into(),
            namespace: namespace.map(str::to_owned),
            lease_namespace: lease_namespace.into(),
            identity: format!("{node}-{}", tmp.path().display()),
            range,
            http: crate::common::free_port(),
            resync: "0.5".into(),
            extra: Vec::new(),
            allow: vec!["*=127.0.0.1:1024-65535".into()],
            tmp,
            child: None,
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.tmp.path().join("vncd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "kube".into(),
            "--node-name".into(),
            self.node.clone(),
            "--lease-namespace".into(),
            self.lease_namespace.clone(),
            "--identity".into(),
            self.identity.clone(),
            "--lease-duration".into(),
            "2".into(),
            "--state-dir".into(),
            self.state.display().to_string(),
            "--port-range".into(),
            format!("{}-{}", self.range.0, self.range.1),
            "--listen-address".into(),
            "127.0.0.1".into(),
            "--public-host".into(),
            "127.0.0.1".into(),
            "--resync-interval".into(),
            self.resync.clone(),
            // The tests check correctness, not speed, on machines shared with other
            // builds: a proxy slow to start must not be declared failed.
            "--start-timeout".into(),
            "60".into(),
            "--http".into(),
            format!("127.0.0.1:{}", self.http),
            "--backend".into(),
            crate::common::backend(),
        ];
        for rule in &self.allow {
            a.extend(["--allow-target".into(), rule.clone()]);
        }
        if let Some(ns) = &self.namespace {
            a.extend(["--namespace".into(), ns.clone()]);
        }
        a.extend(self.extra.clone());
        a
    }

    pub fn start(&mut self) {
        self.start_with(self.args(), &cluster().kubeconfig, &[]);
    }

    /// Starts `vncd ARGS` with another identity (kubeconfig) and extra environment.
    pub fn start_with(&mut self, args: Vec<String>, kubeconfig: &Path, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "already started");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(VNCD)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("VNCD_LOG", "vncd=debug")
            .env("VNCD_LOG_FORMAT", "json")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL to vncd alone; its proxies live on.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The exit status if vncd has exited (reaped); None while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("not running");
        kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM).unwrap();
        c.wait().unwrap()
    }

    /// The HTTP status of GET `path` on --http, or None if nothing answers.
    pub fn probe(&self, path: &str) -> Option<u16> {
        self.get(path).map(|(code, _)| code)
    }

    /// GET `path` from vncd's --http address: (status code, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http, path)
    }

    /// Log lines (JSON) whose message is `msg`.
    pub fn log_events(&self, msg: &str) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == msg)
            .collect()
    }
}

/// GET `path` from 127.0.0.1:`port`: (status code, body), or None if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

impl Drop for KubeVncd {
    fn drop(&mut self) {
        self.kill9();
        // The proxies of this node: every instance for a node marks them `kube:NODE`.
        for m in vncd::supervisor::scan(&format!("kube:{}", self.node)) {
            let _ = killpg(Pid::from_raw(m.pgid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(m.process.pid), Signal::SIGKILL);
        }
    }
}
