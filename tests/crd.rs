//! The committed CRD files are generated artefacts: they must equal `vncd crd`.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn committed_crds_match_vncd_crd() {
    let out = Command::new(env!("CARGO_BIN_EXE_vncd"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    for file in [
        "crds/vncsessions.vncd.io.yaml",
        "charts/vncd/crds/vncsessions.vncd.io.yaml",
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let committed = std::fs::read_to_string(&path).unwrap();
        assert!(
            committed == generated,
            "{file} has drifted from `vncd crd`; regenerate it with `vncd crd > {file}`"
        );
    }
}
