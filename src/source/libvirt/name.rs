//! Session names for libvirt domains.
//!
//! libvirt allows almost any domain name ("Web Server_1", "DB01"), but a session name
//! is a DNS-1123 subdomain, because it doubles as a Kubernetes object name and a file
//! name. The mapping is deterministic, so a domain keeps its session (and its port)
//! across vncd restarts:
//!
//! - a name that is already valid is used as it is (`web-1` → `web-1`);
//! - any other name is lowercased, every run of characters outside `[a-z0-9.-]` becomes
//!   one `-`, leading and trailing non-alphanumerics are dropped, and `-` plus eight hex
//!   digits of a hash of the *original* name are appended (`Web Server_1` →
//!   `web-server-1-` + hash), so `VM_1` and `vm-1` never share a session.

use crate::session::is_valid_name;

/// Longest session name (DNS-1123 subdomain).
const MAX_NAME: usize = 253;
/// `-` and eight hex digits.
const SUFFIX: usize = 9;

/// The session name of a libvirt domain. See the module docs.
pub fn session_name(domain: &str) -> String {
    if is_valid_name(domain) {
        return domain.to_owned();
    }
    let mut base = String::with_capacity(domain.len());
    for c in domain.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' {
            base.push(c);
        } else if !base.ends_with('-') {
            base.push('-');
        }
    }
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let mut base = base.trim_matches(|c: char| !alnum(c)).to_owned();
    base.truncate(MAX_NAME - SUFFIX);
    let base = base.trim_end_matches(|c: char| !alnum(c));
    let base = if base.is_empty() { "domain" } else { base };
    format!("{base}-{:08x}", fnv1a32(domain.as_bytes()))
}

/// FNV-1a, 32 bits: stable across Rust versions and platforms (unlike `DefaultHasher`).
fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names_map_to_themselves() {
        for n in ["web-1", "vm1", "db.prod", "a"] {
            assert_eq!(session_name(n), n);
        }
    }

    #[test]
    fn other_names_are_cleaned_and_get_a_hash_of_the_original() {
        let n = session_name("Web Server_1");
        assert!(n.starts_with("web-server-1-"), "{n}");
        assert_eq!(n.len(), "web-server-1-".len() + 8);
        assert!(is_valid_name(&n), "{n}");
        // Deterministic: a domain keeps its session across restarts.
        assert_eq!(session_name("Web Server_1"), n);
        // Names that clean up alike still differ.
        assert_ne!(session_name("VM_1"), session_name("vm_1"));
        assert_ne!(session_name("VM_1"), "vm-1");
        assert_ne!(session_name("vm 1"), session_name("vm_1"));
    }

    #[test]
    fn every_name_maps_to_a_valid_session_name() {
        let long = "X".repeat(400);
        for n in [
            "", "_", "--", "-a-", "ÜBER", "a..b", "日本", &long, "x/y", "1",
        ] {
            let s = session_name(n);
            assert!(is_valid_name(&s), "{n:?} -> {s:?}");
            assert!(s.len() <= MAX_NAME, "{n:?} -> {} chars", s.len());
        }
        assert!(session_name("日本").starts_with("domain-"));
    }
}
