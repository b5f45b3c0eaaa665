//! A lease's age on a clock that cannot go back.
//!
//! `maxLifetimeSeconds` must not be extended by someone stepping the wall clock back (an
//! admin, a bad NTP source, a VM restored from a snapshot). Within one boot, vncd measures
//! a lease's age on `CLOCK_BOOTTIME` (read from `/proc/uptime`, which counts suspend too
//! and only ever grows), identified by the kernel's boot id; across a reboot that clock
//! restarts from zero, so only there the wall clock decides.
//!
//! `/proc/uptime` rather than `clock_gettime`: it is what the kernel says, not what a
//! preloaded library (libfaketime in the tests, or anything else) says.

use serde::{Deserialize, Serialize};

/// A moment on one boot's `CLOCK_BOOTTIME`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootInstant {
    /// `/proc/sys/kernel/random/boot_id`: new at every boot.
    pub boot_id: String,
    /// Milliseconds since that boot.
    pub uptime_ms: u64,
}

impl BootInstant {
    /// Now, or `None` where `/proc` does not say (then ages fall back to the wall clock).
    pub fn now() -> Option<Self> {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
        Some(BootInstant {
            boot_id: boot_id.trim().to_owned(),
            uptime_ms: parse_uptime_ms(&uptime)?,
        })
    }
}

/// The first field of `/proc/uptime` (`SECONDS.HUNDREDTHS`) in milliseconds.
fn parse_uptime_ms(text: &str) -> Option<u64> {
    let first = text.split_ascii_whitespace().next()?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, "0"));
    let secs: u64 = secs.parse().ok()?;
    let frac: String = frac.chars().chain("000".chars()).take(3).collect();
    Some(secs.checked_mul(1000)? + frac.parse::<u64>().ok()?)
}

/// How old a lease allocated at `allocated_at` (wall clock) and `allocated_boot` is, now.
/// On the same boot the boot clock decides: stepping the wall clock back or forth changes
/// nothing. Across a reboot (or when either boot moment is unknown, as for leases written
/// by an older vncd) it is the wall clock's age, never negative.
pub fn lease_age_ms(
    allocated_at: jiff::Timestamp,
    allocated_boot: Option<&BootInstant>,
    wall_now: jiff::Timestamp,
    boot_now: Option<&BootInstant>,
) -> u64 {
    match (allocated_boot, boot_now) {
        (Some(then), Some(now)) if then.boot_id == now.boot_id => {
            now.uptime_ms.saturating_sub(then.uptime_ms)
        }
        _ => {
            let ms = wall_now.duration_since(allocated_at).as_millis().max(0);
            u64::try_from(ms).unwrap_or(u64::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(boot: &str, ms: u64) -> BootInstant {
        BootInstant {
            boot_id: boot.into(),
            uptime_ms: ms,
        }
    }

    #[test]
    fn uptime_parses_to_milliseconds() {
        assert_eq!(parse_uptime_ms("1520.27 700.43\n"), Some(1_520_270));
        assert_eq!(parse_uptime_ms("3.5 1.0"), Some(3_500));
        assert_eq!(parse_uptime_ms("12 1"), Some(12_000));
        assert_eq!(parse_uptime_ms("x 1"), None);
        assert_eq!(parse_uptime_ms(""), None);
    }

    #[test]
    fn this_machine_has_a_boot_clock_that_moves_forward() {
        let a = BootInstant::now().expect("/proc says the boot id and uptime");
        std::thread::sleep(std::time::Duration::from_millis(30));
        let b = BootInstant::now().unwrap();
        assert_eq!(a.boot_id, b.boot_id);
        assert!(b.uptime_ms >= a.uptime_ms);
    }

    #[test]
    fn a_wall_clock_step_does_not_change_the_age_within_one_boot() {
        let t0 = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let day = jiff::SignedDuration::from_hours(24);
        let then = at("b1", 10_000);
        let now = at("b1", 70_000);
        // One minute on the boot clock, whatever the wall clock says: stepped back a day,
        // forward a day, or not at all.
        for wall in [t0 - day, t0, t0 + day] {
            assert_eq!(lease_age_ms(t0, Some(&then), wall, Some(&now)), 60_000);
        }
    }

    #[test]
    fn across_a_reboot_or_without_a_boot_moment_the_wall_clock_decides() {
        let t0 = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let later = t0 + jiff::SignedDuration::from_secs(90);
        let then = at("b1", 10_000);
        let rebooted = at("b2", 5_000);
        assert_eq!(
            lease_age_ms(t0, Some(&then), later, Some(&rebooted)),
            90_000
        );
        assert_eq!(lease_age_ms(t0, None, later, Some(&rebooted)), 90_000);
        assert_eq!(lease_age_ms(t0, Some(&then), later, None), 90_000);
        // A wall clock before the allocation is age zero, not negative.
        assert_eq!(lease_age_ms(later, None, t0, None), 0);
    }
}
