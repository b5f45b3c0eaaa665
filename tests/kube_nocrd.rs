//! `vncd kube` against a real API server that lacks the VncSession CRD: it must stop at
//! once with the command that fixes it, and that command must indeed fix it.
//! (A binary of its own: the CRD is cluster-wide, and tests/kube.rs installs it.)
#![allow(clippy::unwrap_used)]

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::time::{Duration, Instant};

use cluster::{KubeVncd, bare_cluster};

#[test]
fn without_the_crd_vncd_kube_says_how_to_install_it_and_runs_once_it_is_installed() {
    let c = bare_cluster();
    let mut v = KubeVncd::new("node-nocrd", None, "default", 3);
    let args = v.args();
    v.start_with(args.clone(), &c.kubeconfig, &[]);
    let start = Instant::now();
    let exit = loop {
        if let Some(s) = v.try_wait() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "vncd kept running without its CRD:\n{}",
            v.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(exit.code(), Some(2), "{}", v.log());
    let log = v.log();
    assert!(
        log.contains("vncsessions.vncd.io) is not installed"),
        "{log}"
    );
    assert!(log.contains("vncd crd | kubectl apply -f -"), "{log}");

    // Following the advice is enough.
    c.install_crd().unwrap();
    v.start_with(args, &c.kubeconfig, &[]);
    let start = Instant::now();
    while v.probe("/readyz") != Some(200) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "vncd not ready after the CRD was installed:\n{}",
            v.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
