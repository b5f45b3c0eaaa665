//! The committed CRD files are exactly what `vncd crd` prints, so the chart and
//! `kubectl apply -f crds/` never drift from the types vncd reads and writes.

use std::path::Path;
use std::process::Command;

#[test]
fn committed_crds_match_vncd_crd() {
    let out = Command::new(env!("CARGO_BIN_EXE_vncd"))
        .arg("crd")
        .output()
        .expect("run vncd crd");
    assert!(out.status.success(), "vncd crd failed");
    let generated = String::from_utf8(out.stdout).expect("utf-8");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in [
        "crds/vncsessions.vncd.io.yaml",
        "charts/vncd/crds/vncsessions.vncd.io.yaml",
    ] {
        let committed = std::fs::read_to_string(root.join(file))
            .unwrap_or_else(|e| panic!("cannot read {file}: {e}"));
        assert!(
            committed == generated,
            "{file} differs from `vncd crd`; regenerate it with `cargo run -- crd > {file}`"
        );
    }
}

#[test]
fn committed_console_request_crds_match_vncd_crd() {
    let out = Command::new(env!("CARGO_BIN_EXE_vncd"))
        .args(["crd", "vncconsolerequests.vncd.io"])
        .output()
        .expect("run vncd crd vncconsolerequests.vncd.io");
    assert!(out.status.success(), "vncd crd failed");
    let generated = String::from_utf8(out.stdout).expect("utf-8");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in [
        "crds/vncconsolerequests.vncd.io.yaml",
        "charts/vncd/crds/vncconsolerequests.vncd.io.yaml",
    ] {
        let committed = std::fs::read_to_string(root.join(file))
            .unwrap_or_else(|e| panic!("cannot read {file}: {e}"));
        assert!(
            committed == generated,
            "{file} differs from `vncd crd vncconsolerequests.vncd.io`; regenerate it with \
             `cargo run -- crd vncconsolerequests.vncd.io > {file}`"
        );
    }
    // The request CRD is namespaced with a status users cannot write, and its session is a
    // bare object name (never NAMESPACE/NAME).
    for needle in [
        "scope: Namespaced",
        "subresources:\n      status: {}",
        "pattern: ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        "name: Session",
        "name: Expires",
        "name: Age",
    ] {
        assert!(
            generated.contains(needle),
            "the CRD lacks {needle:?}:\n{generated}"
        );
    }
    let all = Command::new(env!("CARGO_BIN_EXE_vncd"))
        .args(["crd", "--all"])
        .output()
        .expect("run vncd crd --all");
    let all = String::from_utf8(all.stdout).expect("utf-8");
    let sessions = std::fs::read_to_string(root.join("crds/vncsessions.vncd.io.yaml")).unwrap();
    assert_eq!(
        all,
        format!("{sessions}---\n{generated}"),
        "--all prints both, in order"
    );
}

#[test]
fn the_crd_declares_what_kubernetes_mode_relies_on() {
    let out = Command::new(env!("CARGO_BIN_EXE_vncd"))
        .arg("crd")
        .output()
        .expect("run vncd crd");
    let crd = String::from_utf8(out.stdout).expect("utf-8");
    for needle in [
        // The node's field selector needs the full path, .spec included.
        "selectableFields:\n    - jsonPath: .spec.nodeName",
        "x-kubernetes-validations:",
        "exactly one of host+port, unixSocket or libvirtDomain",
        "subresources:\n      status: {}",
        "maximum: 65535.0",
        "minimum: 1.0",
        "shortNames:\n    - vnc",
    ] {
        assert!(crd.contains(needle), "the CRD lacks {needle:?}:\n{crd}");
    }
}
