//! The libvirt source is a cargo feature (off by default). A build without it refuses every
//! libvirt flag by name, says how to get a build that has it, and touches no state. With
//! the feature this file is empty: tests/libvirt.rs drives the flags against a real libvirtd.
#![cfg(not(feature = "libvirt"))]
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[test]
fn libvirt_flags_without_the_feature_say_how_to_get_it_and_touch_nothing() {
    let v = Vncd::new(2);
    let run = |extra: &[&str], env: Option<(&str, &str)>| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args([
            "run",
            "--sessions-dir",
            v.sessions.to_str().unwrap(),
            "--state-dir",
            v.state.to_str().unwrap(),
            "--port-range",
            &v.range_arg(),
        ])
        .args(extra)
        .env("VNCD_LOG", "warn");
        if let Some((k, val)) = env {
            cmd.env(k, val);
        }
        cmd.output().unwrap()
    };
    // (arguments, environment, the flag the refusal names)
    type Case<'a> = (&'a [&'a str], Option<(&'a str, &'a str)>, &'a str);
    let cases: [Case; 3] = [
        (
            &["--libvirt", "qemu:///system"],
            None,
            "--libvirt qemu:///system",
        ),
        (&[], Some(("VNCD_LIBVIRT_POLL", "1")), "--libvirt-poll 1"),
        (
            &["--libvirt-qemu-conf", "/etc/libvirt/qemu.conf"],
            None,
            "--libvirt-qemu-conf /etc/libvirt/qemu.conf",
        ),
    ];
    for (args, env, flag) in cases {
        let out = run(args, env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{flag} was accepted without the feature"
        );
        assert!(
            err.contains(&format!("{flag} needs libvirt support")),
            "{flag}: {err}"
        );
        assert!(
            err.contains("cargo build --release --features libvirt"),
            "{err}"
        );
        assert!(err.contains("scripts/build-deb"), "{err}");
        assert!(
            !v.state.exists(),
            "the refusal created {}",
            v.state.display()
        );
    }
}
