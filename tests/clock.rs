//! `maxLifetimeSeconds` against a wall clock stepped back, with the real `vncd` binary
//! under libfaketime (Debian's `faketime`): vncd's wall clock (`clock_gettime`
//! `CLOCK_REALTIME`) is moved a day back while a session runs, without touching the host's
//! clock. The session must still expire on time, because vncd measures a lease's age on the
//! boot clock (`/proc/uptime`, which libfaketime does not fake) within one boot.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Qemu, Vncd};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[test]
fn a_wall_clock_stepped_back_does_not_extend_max_lifetime() {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} is missing; run scripts/test (it installs faketime)"
    );
    let qemu = Qemu::tcp();
    let mut v = Vncd::new(4);
    let clock = v.tmp.path().join("faketime");
    // No offset yet: vncd starts on the real time.
    std::fs::write(&clock, "+0\n").unwrap();
    v.env = vec![
        ("LD_PRELOAD".into(), LIBFAKETIME.into()),
        (
            "FAKETIME_TIMESTAMP_FILE".into(),
            clock.display().to_string(),
        ),
        // Re-read the offset at every call, and leave the monotonic clock (tokio's timers)
        // alone: only the wall clock steps.
        ("FAKETIME_NO_CACHE".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    v.write_manifest(
        "vm1.yaml",
        &format!(
            "{}  maxLifetimeSeconds: 6\n",
            common::manifest("vm1", u32::from(qemu.port))
        ),
    );
    v.start();
    v.wait_ready("vm1");
    let ready_at = Instant::now();
    // A day back, as a bad NTP source or a restored snapshot would do.
    std::fs::write(&clock, "-1d\n").unwrap();
    let st = v.wait_status("vm1", "Expired", Duration::from_secs(30));
    assert_eq!(st["reason"], "MaxLifetime", "{st}");
    assert!(
        ready_at.elapsed() < Duration::from_secs(15),
        "expired only after {:?}",
        ready_at.elapsed()
    );
    // The step did reach vncd: its own log lines are stamped a day back.
    let log = v.log();
    let yesterday = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24))
        .strftime("%Y-%m-%d")
        .to_string();
    assert!(
        log.contains(&yesterday),
        "vncd's clock was not stepped back (no log line dated {yesterday}):\n{log}"
    );
}
