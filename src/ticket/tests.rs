#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use serde_json::{Value, json};

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::format::{MAX_TICKET_LEN, encode, encode_v2};
use super::keys::LEASE_KEY_DOMAIN;
use super::*;
use crate::session::Endpoint;

const NOW: u64 = 1_800_000_000;

fn master() -> MasterKey {
    let mut b = [0u8; KEY_LEN];
    for (i, x) in b.iter_mut().enumerate() {
        *x = i as u8;
    }
    MasterKey::from_bytes(b)
}

fn key() -> LeaseKey {
    master().lease_key("vm1", "0123456789abcdef")
}

/// A clock a test can move.
fn clock(start: u64) -> (Arc<AtomicU64>, Clock) {
    let t = Arc::new(AtomicU64::new(start));
    let c = t.clone();
    (t, Arc::new(move || c.load(Ordering::SeqCst)))
}

#[test]
fn mint_and_verify_round_trip() {
    let k = key();
    let t = mint(&k, DEFAULT_TTL, NOW).unwrap();
    assert_eq!(t.expires_at, NOW + 60);
    let v = verify(&k, &t.text, NOW).unwrap();
    assert_eq!(v.expires_at, NOW + 60);
    // The shape the module docs promise, and URL-safe as is.
    let parts: Vec<&str> = t.text.split('.').collect();
    assert_eq!(parts.len(), 4);
    assert_eq!(parts[0], "v1");
    assert_eq!(parts[1], (NOW + 60).to_string());
    assert_eq!(parts[2].len(), 22);
    assert_eq!(parts[3].len(), 43);
    assert!(
        t.text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    );
    assert!(t.text.len() <= MAX_TICKET_LEN);
    assert_eq!(URL_SAFE_NO_PAD.encode(v.nonce), parts[2]);
    // Two mints never share a nonce.
    let t2 = mint(&k, DEFAULT_TTL, NOW).unwrap();
    assert_ne!(t.text, t2.text);
    // Secrets stay out of Debug output.
    assert!(!format!("{t:?}").contains(&t.text));
    assert_eq!(format!("{k:?}"), "LeaseKey(<redacted>)");
    assert_eq!(format!("{:?}", master()), "MasterKey(<redacted>)");
}

#[test]
fn ttl_rounds_up_to_whole_seconds_and_is_never_zero() {
    let k = key();
    assert_eq!(
        mint(&k, Duration::from_millis(1500), NOW)
            .unwrap()
            .expires_at,
        NOW + 2
    );
    assert_eq!(mint(&k, Duration::ZERO, NOW).unwrap().expires_at, NOW + 1);
}

#[test]
fn expiry_boundary() {
    let k = key();
    let t = mint(&k, Duration::from_secs(60), NOW).unwrap();
    assert!(verify(&k, &t.text, NOW + 59).is_ok());
    assert!(matches!(
        verify(&k, &t.text, NOW + 60),
        Err(TicketError::Expired)
    ));
    assert!(matches!(
        verify(&k, &t.text, NOW + 10_000),
        Err(TicketError::Expired)
    ));
}

/// Replaces field `i` (0 version, 1 expiry, 2 nonce, 3 mac) of a ticket.
fn with_field(text: &str, i: usize, value: &str) -> String {
    let mut parts: Vec<String> = text.split('.').map(str::to_owned).collect();
    parts[i] = value.to_owned();
    parts.join(".")
}

#[test]
fn tampering_is_refused() {
    let k = key();
    let t = mint(&k, DEFAULT_TTL, NOW).unwrap();
    let parts: Vec<&str> = t.text.split('.').collect();
    // A later expiry, with the old MAC: the MAC covers the expiry.
    let later = with_field(&t.text, 1, &(NOW + 3600).to_string());
    assert!(matches!(
        verify(&k, &later, NOW),
        Err(TicketError::BadSignature)
    ));
    // Another (well-formed) nonce.
    let nonce = URL_SAFE_NO_PAD.encode([7u8; NONCE_LEN]);
    assert!(matches!(
        verify(&k, &with_field(&t.text, 2, &nonce), NOW),
        Err(TicketError::BadSignature)
    ));
    // Another (well-formed) MAC.
    let mac = URL_SAFE_NO_PAD.encode([9u8; KEY_LEN]);
    assert!(matches!(
        verify(&k, &with_field(&t.text, 3, &mac), NOW),
        Err(TicketError::BadSignature)
    ));
    // An expired ticket whose expiry was pushed forward is a forgery, not "expired".
    let old = mint(&k, DEFAULT_TTL, NOW - 3600).unwrap();
    let pushed = with_field(&old.text, 1, &(NOW + 60).to_string());
    assert!(matches!(
        verify(&k, &pushed, NOW),
        Err(TicketError::BadSignature)
    ));
    // Malformed shapes.
    for bad in [
        String::new(),
        "v1".to_owned(),
        with_field(&t.text, 0, "v2"),
        with_field(&t.text, 1, ""),
        with_field(&t.text, 1, &format!("0{}", parts[1])),
        with_field(&t.text, 1, &format!("+{}", parts[1])),
        with_field(&t.text, 1, "99999999999999999999"),
        with_field(&t.text, 2, &parts[2][..21]),
        with_field(&t.text, 2, &format!("{}=", &parts[2][..21])),
        with_field(&t.text, 3, &parts[3][..42]),
        format!("{}.", t.text),
        format!("{}.x", t.text),
        format!(".{}", t.text),
        t.text.replace('.', ":"),
        "v1.1.2.3".to_owned(),
        "x".repeat(10_000),
    ] {
        assert!(
            matches!(verify(&k, &bad, NOW), Err(TicketError::Malformed)),
            "accepted or misjudged a malformed ticket"
        );
    }
}

#[test]
fn non_canonical_base64_is_malformed() {
    // 22 base64 characters carry 132 bits; the last 4 must be zero. Flipping them would
    // decode to the same nonce with another spelling: refused before the MAC is checked.
    let k = key();
    let t = mint(&k, DEFAULT_TTL, NOW).unwrap();
    let parts: Vec<&str> = t.text.split('.').collect();
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let last = parts[2].as_bytes()[21];
    let idx = alphabet.iter().position(|&c| c == last).unwrap();
    assert_eq!(idx & 0x0f, 0, "canonical encoding has zero trailing bits");
    let mut nonce = parts[2].as_bytes().to_vec();
    nonce[21] = alphabet[idx | 1];
    let alias = with_field(&t.text, 2, std::str::from_utf8(&nonce).unwrap());
    assert!(matches!(
        verify(&k, &alias, NOW),
        Err(TicketError::Malformed)
    ));
}

#[test]
fn a_new_lease_uid_or_session_kills_earlier_tickets() {
    let m = master();
    let old = m.lease_key("vm1", "0123456789abcdef");
    let t = mint(&old, DEFAULT_TTL, NOW).unwrap();
    assert!(verify(&old, &t.text, NOW).is_ok());
    for other in [
        m.lease_key("vm1", "fedcba9876543210"),
        m.lease_key("vm2", "0123456789abcdef"),
        MasterKey::from_bytes([1; KEY_LEN]).lease_key("vm1", "0123456789abcdef"),
    ] {
        assert!(matches!(
            verify(&other, &t.text, NOW),
            Err(TicketError::BadSignature)
        ));
    }
    // Deterministic: vncd re-derives the same key after a restart.
    assert_eq!(
        old.as_bytes(),
        m.lease_key("vm1", "0123456789abcdef").as_bytes()
    );
    // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
    assert_ne!(
        m.lease_key("ab", "c").as_bytes(),
        m.lease_key("a", "bc").as_bytes()
    );
}

#[test]
fn error_messages_never_contain_the_ticket() {
    let k = key();
    let t = mint(&k, DEFAULT_TTL, NOW).unwrap();
    let store = MemoryNonces::with_clock(clock(NOW).1);
    let mut errors = vec![
        verify(&k, &t.text, NOW + 60).unwrap_err(),
        verify(&key_b(), &t.text, NOW).unwrap_err(),
        verify(&k, &format!("{}x", t.text), NOW).unwrap_err(),
    ];
    check(&k, &t.text, NOW, &store).unwrap();
    errors.push(check(&k, &t.text, NOW, &store).unwrap_err());
    let parts: Vec<&str> = t.text.split('.').collect();
    for e in errors {
        let shown = format!("{e} {e:?}");
        assert!(
            !shown.contains(parts[2]) && !shown.contains(parts[3]),
            "{shown}"
        );
    }
}

fn key_b() -> LeaseKey {
    master().lease_key("vm1", "another-lease")
}

#[test]
fn lease_key_hex_round_trip() {
    let k = key();
    let hex = k.to_hex();
    assert_eq!(hex.len(), 64);
    assert_eq!(LeaseKey::from_hex(&hex).unwrap().as_bytes(), k.as_bytes());
    assert_eq!(
        LeaseKey::from_hex(&format!("{}\n", hex.to_uppercase()))
            .unwrap()
            .as_bytes(),
        k.as_bytes()
    );
    assert!(LeaseKey::from_hex(&hex[..62]).is_none());
    assert!(LeaseKey::from_hex(&format!("{}zz", &hex[..62])).is_none());
    assert!(LeaseKey::from_hex(&format!("{}+1", &hex[..62])).is_none());
}

/// Both stores: the first use passes, the second is a replay, an expired ticket is refused.
fn replay_is_refused(store: &dyn NonceStore) {
    let k = key();
    let t = mint(&k, DEFAULT_TTL, NOW).unwrap();
    check(&k, &t.text, NOW, store).unwrap();
    assert!(matches!(
        check(&k, &t.text, NOW + 1, store),
        Err(TicketError::Replayed)
    ));
    // Another ticket of the same lease is unaffected.
    let t2 = mint(&k, DEFAULT_TTL, NOW).unwrap();
    check(&k, &t2.text, NOW, store).unwrap();
}

#[test]
fn memory_nonces_refuse_replays() {
    let (_, c) = clock(NOW);
    replay_is_refused(&MemoryNonces::with_clock(c));
}

#[test]
fn dir_nonces_refuse_replays() {
    let dir = tempfile::tempdir().unwrap();
    let (_, c) = clock(NOW);
    let store = DirNonces::with_clock(dir.path(), c);
    replay_is_refused(&store);
    // One 0600 file per used ticket, named EXPIRY.NONCE.
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2);
    for n in &names {
        let (exp, nonce) = n.split_once('.').unwrap();
        assert_eq!(exp, (NOW + 60).to_string());
        assert_eq!(nonce.len(), 22);
        let mode = fs::metadata(dir.path().join(n))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // A second store on the same directory (another forked process) sees the same uses.
    let k = key();
    let t = mint(&k, DEFAULT_TTL, NOW).unwrap();
    let other = DirNonces::with_clock(dir.path(), clock(NOW).1);
    check(&k, &t.text, NOW, &store).unwrap();
    assert!(matches!(
        check(&k, &t.text, NOW, &other),
        Err(TicketError::Replayed)
    ));
}

#[test]
fn dir_nonces_fail_closed_when_the_directory_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirNonces::with_clock(dir.path().join("missing"), clock(NOW).1);
    let k = key();
    let t = mint(&k, DEFAULT_TTL, NOW).unwrap();
    let e = check(&k, &t.text, NOW, &store).unwrap_err();
    assert!(matches!(e, TicketError::NonceStore { .. }), "{e}");
    assert!(e.to_string().contains("missing"));
}

#[test]
fn memory_nonces_forget_expired_tickets() {
    let (t, c) = clock(NOW);
    let store = MemoryNonces::with_clock(c);
    let k = key();
    for _ in 0..5 {
        check(&k, &mint(&k, DEFAULT_TTL, NOW).unwrap().text, NOW, &store).unwrap();
    }
    assert_eq!(store.len(), 5);
    // Still remembered until PRUNE_GRACE_SECS after expiry...
    t.store(NOW + 60 + PRUNE_GRACE_SECS - 1, Ordering::SeqCst);
    let now = t.load(Ordering::SeqCst);
    check(&k, &mint(&k, DEFAULT_TTL, now).unwrap().text, now, &store).unwrap();
    assert_eq!(store.len(), 6);
    // ...and forgotten from then on: only the newest one is left.
    t.store(NOW + 60 + PRUNE_GRACE_SECS, Ordering::SeqCst);
    let now = t.load(Ordering::SeqCst);
    check(&k, &mint(&k, DEFAULT_TTL, now).unwrap().text, now, &store).unwrap();
    assert_eq!(store.len(), 2);
}

#[test]
fn dir_nonces_prune_only_their_own_expired_files() {
    let dir = tempfile::tempdir().unwrap();
    let (t, c) = clock(NOW);
    let store = DirNonces::with_clock(dir.path(), c);
    let k = key();
    check(&k, &mint(&k, DEFAULT_TTL, NOW).unwrap().text, NOW, &store).unwrap();
    fs::write(dir.path().join("README"), "not a nonce").unwrap();
    fs::write(dir.path().join("1.short"), "not a nonce").unwrap();
    let count = || fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(count(), 3);
    t.store(NOW + 60 + PRUNE_GRACE_SECS - 1, Ordering::SeqCst);
    assert_eq!(store.prune().unwrap(), 0);
    t.store(NOW + 60 + PRUNE_GRACE_SECS, Ordering::SeqCst);
    assert_eq!(store.prune().unwrap(), 1);
    assert_eq!(count(), 2, "foreign files are kept");
    // consume prunes on its own too.
    t.store(NOW, Ordering::SeqCst);
    check(&k, &mint(&k, DEFAULT_TTL, NOW).unwrap().text, NOW, &store).unwrap();
    assert_eq!(count(), 3);
    t.store(NOW + 1000, Ordering::SeqCst);
    check(
        &k,
        &mint(&k, DEFAULT_TTL, NOW + 1000).unwrap().text,
        NOW + 1000,
        &store,
    )
    .unwrap();
    assert_eq!(count(), 3, "the old record went, the new one came");
}

/// The race the post-record clock check closes: a replay verified before expiry, delayed
/// until its first use was pruned, must still be refused.
#[test]
fn a_replay_delayed_past_pruning_is_refused_in_memory() {
    let k = key();
    let t = mint(&k, DEFAULT_TTL, NOW).unwrap();
    let late = NOW + 60 + PRUNE_GRACE_SECS;
    // consume prunes under its lock, then must notice the expiry.
    let (time, c) = clock(NOW);
    let mem = MemoryNonces::with_clock(c);
    check(&k, &t.text, NOW, &mem).unwrap();
    let v = verify(&k, &t.text, NOW + 1).unwrap();
    time.store(late, Ordering::SeqCst);
    assert!(matches!(mem.consume(&v), Err(TicketError::Expired)));
}

#[test]
fn a_replay_delayed_past_pruning_is_refused_in_a_directory() {
    let k = key();
    let t = mint(&k, DEFAULT_TTL, NOW).unwrap();
    let late = NOW + 60 + PRUNE_GRACE_SECS;
    // Another process prunes the record while the replay stalls.
    let dir = tempfile::tempdir().unwrap();
    let (time, c) = clock(NOW);
    let files = DirNonces::with_clock(dir.path(), c);
    check(&k, &t.text, NOW, &files).unwrap();
    let v = verify(&k, &t.text, NOW + 1).unwrap();
    time.store(late, Ordering::SeqCst);
    assert_eq!(files.prune().unwrap(), 1);
    assert!(matches!(files.consume(&v), Err(TicketError::Expired)));
}

#[test]
fn master_key_is_created_0600_and_loaded_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ticket.key");
    let a = MasterKey::load_or_create(&path).unwrap();
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(meta.len(), 32);
    let b = MasterKey::load_or_create(&path).unwrap();
    assert_eq!(a.0, b.0, "the same key after a restart");
    assert_ne!(a.0, [0u8; KEY_LEN]);
    // No temporary files left behind.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    // Another directory, another key.
    let other = tempfile::tempdir().unwrap();
    let c = MasterKey::load_or_create(&other.path().join("ticket.key")).unwrap();
    assert_ne!(a.0, c.0);
}

#[test]
fn master_key_creation_races_end_with_one_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ticket.key");
    let keys: Vec<[u8; KEY_LEN]> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| s.spawn(|| MasterKey::load_or_create(&path).unwrap().0))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(keys.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(fs::read(&path).unwrap(), keys[0]);
}

#[test]
fn master_key_refuses_what_it_cannot_trust() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let msg = |r: Result<MasterKey, KeyFileError>| r.unwrap_err().to_string();

    // Readable by others: names the file and the chmod.
    fs::write(p("open.key"), [5u8; 32]).unwrap();
    fs::set_permissions(p("open.key"), fs::Permissions::from_mode(0o644)).unwrap();
    let m = msg(MasterKey::load_or_create(&p("open.key")));
    assert!(m.contains(&p("open.key").display().to_string()), "{m}");
    assert!(m.contains("chmod 600") && m.contains("0644"), "{m}");
    // Group-writable only is refused too.
    fs::set_permissions(p("open.key"), fs::Permissions::from_mode(0o620)).unwrap();
    assert!(matches!(
        MasterKey::load(&p("open.key")),
        Err(KeyFileError::Permissions { mode: 0o620, .. })
    ));
    // It was not replaced.
    assert_eq!(fs::read(p("open.key")).unwrap(), [5u8; 32]);

    // Wrong size, including empty (a crash of some other writer).
    for (name, len) in [("short.key", 31usize), ("long.key", 33), ("empty.key", 0)] {
        fs::write(p(name), vec![1u8; len]).unwrap();
        fs::set_permissions(p(name), fs::Permissions::from_mode(0o600)).unwrap();
        let e = MasterKey::load_or_create(&p(name)).unwrap_err();
        assert!(
            matches!(e, KeyFileError::WrongSize { size, .. } if size == len as u64),
            "{e}"
        );
        assert!(e.to_string().contains("remove it"), "{e}");
        assert_eq!(fs::read(p(name)).unwrap().len(), len, "never overwritten");
    }

    // A directory.
    fs::create_dir(p("dir.key")).unwrap();
    assert!(matches!(
        MasterKey::load_or_create(&p("dir.key")),
        Err(KeyFileError::NotRegular { .. })
    ));

    // A FIFO: refused without blocking.
    nix::unistd::mkfifo(
        &p("fifo.key"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    assert!(matches!(
        MasterKey::load_or_create(&p("fifo.key")),
        Err(KeyFileError::NotRegular { .. })
    ));

    // A symlink to a good key, and a dangling one: refused, never followed or written through.
    fs::write(p("real.key"), [3u8; 32]).unwrap();
    fs::set_permissions(p("real.key"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(p("real.key"), p("link.key")).unwrap();
    std::os::unix::fs::symlink(p("nowhere"), p("dangling.key")).unwrap();
    for name in ["link.key", "dangling.key"] {
        let e = MasterKey::load_or_create(&p(name)).unwrap_err();
        assert!(matches!(e, KeyFileError::Symlink { .. }), "{e}");
        assert!(e.to_string().contains(name), "{e}");
    }
    assert!(!p("nowhere").exists(), "nothing created through the link");

    // A missing directory: an I/O error naming the file.
    let e = MasterKey::load_or_create(&p("no/such/dir.key")).unwrap_err();
    assert!(matches!(e, KeyFileError::Io { .. }), "{e}");
    assert!(e.to_string().contains("no/such/dir.key"), "{e}");
}

#[test]
fn master_key_of_another_owner_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        // Only root can give a file away; the check itself is the same for everyone.
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("theirs.key");
    fs::write(&path, [5u8; 32]).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let e = MasterKey::load_or_create(&path).unwrap_err();
    assert!(matches!(e, KeyFileError::Owner { owner: 65534, .. }), "{e}");
}

#[test]
fn websockify_key_file_format() {
    let k = LeaseKey::from_bytes([0xab; KEY_LEN]);
    let tcp = Endpoint::Tcp {
        host: "::1".into(),
        port: 5901,
    };
    let text = websockify_key_file("vm1", &k, &tcp, Path::new("/s/nonces/vm1")).unwrap();
    assert_eq!(
        text,
        format!(
            "vncd-lease-key v1\nsession vm1\nkey {}\nhost ::1\nport 5901\nnonces /s/nonces/vm1\n",
            "ab".repeat(32)
        )
    );
    let unix = Endpoint::Unix {
        path: "/run/a b.sock".into(),
    };
    let text = websockify_key_file("vm1", &k, &unix, Path::new("/n")).unwrap();
    assert!(text.contains("\nunix /run/a b.sock\n"));
    let evil = Endpoint::Unix {
        path: "/x\nunix /y".into(),
    };
    assert!(websockify_key_file("vm1", &k, &evil, Path::new("/n")).is_none());
    assert!(websockify_key_file("vm1\nkey 00", &k, &unix, Path::new("/n")).is_none());
}

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/ticket-vectors.json"
);

/// The known-answer vectors, computed by this code. The Python plugin's test reads the same
/// file, so both implementations are pinned to one set of bytes.
fn vectors() -> Value {
    let master_bytes: [u8; KEY_LEN] = std::array::from_fn(|i| i as u8);
    let m = MasterKey::from_bytes(master_bytes);
    let cases: [(&str, &str, u64, [u8; NONCE_LEN], bool); 5] = [
        ("vm1", "0123456789abcdef", 4_102_444_800, [0u8; 16], true),
        ("vm1", "0123456789abcdef", 4_102_444_800, [0xff; 16], true),
        (
            "vm1",
            "fedcba9876543210",
            4_102_444_800,
            std::array::from_fn(|i| (i * 17) as u8),
            true,
        ),
        (
            "web-frontend-07",
            "c0ffee00c0ffee00",
            9_999_999_999,
            std::array::from_fn(|i| (255 - i * 3) as u8),
            true,
        ),
        // Expired long ago: authentic but refused.
        (
            "vm1",
            "0123456789abcdef",
            1_000_000_000,
            std::array::from_fn(|i| i as u8),
            false,
        ),
    ];
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let items: Vec<Value> = cases
        .iter()
        .map(|(session, uid, exp, nonce, valid)| {
            let lk = m.lease_key(session, uid);
            json!({
                "session": session,
                "lease_uid": uid,
                "lease_key_hex": lk.to_hex(),
                "expires_at": exp,
                "nonce_hex": hex(nonce),
                "ticket": encode(&lk, *exp, nonce),
                "valid_now": valid,
            })
        })
        .collect();
    json!({
        "about": "Known-answer vectors for vncd console tickets (src/ticket/mod.rs module docs). \
                  Generated by `VNCD_WRITE_TICKET_VECTORS=1 cargo test --lib ticket::tests::known_answer_vectors`; \
                  contrib/websockify/vncd_ticket.py must reproduce them byte for byte.",
        "master_key_hex": hex(&master_bytes),
        "lease_key_input_example": {
            "session": "vm1",
            "lease_uid": "0123456789abcdef",
            "hex": hex(&[LEASE_KEY_DOMAIN, &3u32.to_be_bytes(), b"vm1", &16u32.to_be_bytes(), b"0123456789abcdef"].concat()),
        },
        "vectors": items,
    })
}

#[test]
fn known_answer_vectors() {
    let expected = vectors();
    if std::env::var_os("VNCD_WRITE_TICKET_VECTORS").is_some() {
        let mut text = serde_json::to_string_pretty(&expected).unwrap();
        text.push('\n');
        fs::write(VECTORS, text).unwrap();
    }
    let stored: Value = serde_json::from_str(&fs::read_to_string(VECTORS).unwrap()).unwrap();
    assert_eq!(
        stored, expected,
        "the ticket encoding changed; if on purpose, bump the version and regenerate"
    );
    // And each stored ticket verifies (or is refused as expired) under its stored lease key.
    for v in stored["vectors"].as_array().unwrap() {
        let k = LeaseKey::from_hex(v["lease_key_hex"].as_str().unwrap()).unwrap();
        let exp = v["expires_at"].as_u64().unwrap();
        if v["valid_now"].as_bool().unwrap() {
            // Valid a minute before it expires; on today's clock its expiry is too far ahead.
            let r = verify(&k, v["ticket"].as_str().unwrap(), exp - 60);
            assert_eq!(r.unwrap().expires_at, exp);
            let r = verify(&k, v["ticket"].as_str().unwrap(), unix_now());
            assert!(matches!(r, Err(TicketError::TooFarAhead)));
        } else {
            let r = verify(&k, v["ticket"].as_str().unwrap(), unix_now());
            assert!(matches!(r, Err(TicketError::Expired)));
        }
    }
}

/// One edit of a ticket string: replace, insert or delete a character, or swap two.
#[derive(Clone, Debug)]
enum Mutation {
    Replace(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Swap(usize, usize),
}

fn apply(text: &[u8], m: &Mutation) -> Vec<u8> {
    let mut b = text.to_vec();
    let n = b.len();
    match *m {
        Mutation::Replace(i, c) => b[i % n] = c,
        Mutation::Insert(i, c) => b.insert(i % (n + 1), c),
        Mutation::Delete(i) => {
            b.remove(i % n);
        }
        Mutation::Swap(i, j) => b.swap(i % n, j % n),
    }
    b
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Mostly characters of the ticket alphabet, where a mutation is hardest to notice.
    let ch = prop_oneof![
        3 => proptest::sample::select(
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.".to_vec()
        ),
        1 => any::<u8>().prop_filter("ascii", |c| c.is_ascii()),
    ];
    prop_oneof![
        (any::<usize>(), ch.clone()).prop_map(|(i, c)| Mutation::Replace(i, c)),
        (any::<usize>(), ch).prop_map(|(i, c)| Mutation::Insert(i, c)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), any::<usize>()).prop_map(|(i, j)| Mutation::Swap(i, j)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// No edit of a valid ticket that changes its text verifies, under the right key or any
    /// other lease's key.
    #[test]
    fn no_mutation_of_a_valid_ticket_verifies(
        muts in proptest::collection::vec(mutation(), 1..4),
        nonce in any::<[u8; NONCE_LEN]>(),
        ttl in 1u64..3600,
    ) {
        let k = key();
        let text = encode(&k, NOW + ttl, &nonce);
        prop_assert!(verify(&k, &text, NOW).is_ok());
        let mut bytes = text.as_bytes().to_vec();
        for m in &muts {
            if bytes.is_empty() {
                break;
            }
            bytes = apply(&bytes, m);
        }
        let Ok(mutated) = String::from_utf8(bytes) else { return Ok(()) };
        prop_assert!(verify(&key_b(), &text, NOW).is_err());
        if mutated != text {
            prop_assert!(verify(&k, &mutated, NOW).is_err());
        }
    }
}

#[test]
fn an_expiry_beyond_the_longest_ttl_is_refused() {
    let k = key();
    let bound = MAX_TTL.as_secs() + MAX_CLOCK_SKEW_SECS;
    let nonce = [5u8; NONCE_LEN];
    // At the bound: accepted. One second past it, or ten years ahead: refused, in v1 and v2.
    assert!(verify(&k, &encode(&k, NOW + bound, &nonce), NOW).is_ok());
    for exp in [NOW + bound + 1, NOW + 10 * 365 * 86_400, u64::MAX] {
        for text in [
            encode(&k, exp, &nonce),
            encode_v2(&k, "0123456789abcdef", Grant::default(), exp, &nonce),
        ] {
            assert!(
                matches!(verify(&k, &text, NOW), Err(TicketError::TooFarAhead)),
                "expiry {exp} accepted"
            );
        }
    }
    // A forged far-future ticket is still a bad signature first: the MAC is checked first.
    let forged = encode(&key_b(), NOW + 10 * 365 * 86_400, &nonce);
    assert!(matches!(
        verify(&k, &forged, NOW),
        Err(TicketError::BadSignature)
    ));
    // Nothing vncd mints is refused for it.
    let t = mint(&k, MAX_TTL, NOW).unwrap();
    assert!(verify(&k, &t.text, NOW).is_ok());
}

#[test]
fn v2_tickets_name_their_lease_and_carry_their_grant() {
    let k = key();
    let uid = "0123456789abcdef";
    for grant in [
        Grant::default(),
        Grant {
            role: Role::View,
            force: false,
        },
        Grant {
            role: Role::Control,
            force: true,
        },
    ] {
        let t = mint_v2(&k, uid, grant, DEFAULT_TTL, NOW).unwrap();
        assert!(t.text.starts_with("v2.0123456789abcdef."), "{}", t.text);
        assert_eq!(lease_uid_of(&t.text), Some(uid));
        let v = verify(&k, &t.text, NOW).unwrap();
        assert_eq!(v.grant, grant);
        assert_eq!(v.expires_at, NOW + 60);
        assert_eq!(verify_lease(&k, uid, &t.text, NOW).unwrap().grant, grant);
        // Another lease's key, or this key for a lease the ticket does not name: refused.
        assert!(matches!(
            verify(&key_b(), &t.text, NOW),
            Err(TicketError::BadSignature)
        ));
        assert!(matches!(
            verify_lease(&k, "fedcba9876543210", &t.text, NOW),
            Err(TicketError::BadSignature)
        ));
        // Single use holds across versions: the nonce store sees the same record shape.
        let store = MemoryNonces::with_clock(clock(NOW).1);
        store.consume(&v).unwrap();
        assert!(matches!(store.consume(&v), Err(TicketError::Replayed)));
    }
    // v1 grants control without force, and names no lease.
    let t1 = mint(&k, DEFAULT_TTL, NOW).unwrap();
    assert_eq!(verify(&k, &t1.text, NOW).unwrap().grant, Grant::default());
    assert_eq!(lease_uid_of(&t1.text), None);
}

#[test]
fn a_v2_role_flag_or_lease_cannot_be_changed() {
    let k = key();
    let view = Grant {
        role: Role::View,
        force: false,
    };
    let t = mint_v2(&k, "0123456789abcdef", view, DEFAULT_TTL, NOW).unwrap();
    // Fields: 0 v2, 1 uid, 2 role, 3 flags, 4 expiry, 5 nonce, 6 mac.
    for (i, value) in [(2, "c"), (3, "1"), (1, "0123456789abcdee"), (0, "v1")] {
        let changed = with_field(&t.text, i, value);
        assert!(verify(&k, &changed, NOW).is_err(), "field {i} -> {value}");
    }
    // Malformed: unknown role, reserved flag bits, non-canonical flags, bad uid, extra field.
    for (i, value) in [
        (2, "x"),
        (3, "2"),
        (3, "01"),
        (3, "256"),
        (1, "ABC"),
        (1, ""),
        (1, &"a".repeat(65)),
    ] {
        let changed = with_field(&t.text, i, value);
        assert!(
            matches!(verify(&k, &changed, NOW), Err(TicketError::Malformed)),
            "field {i} -> {value}"
        );
    }
    assert!(matches!(
        verify(&k, &format!("{}.x", t.text), NOW),
        Err(TicketError::Malformed)
    ));
    assert!(matches!(
        mint_v2(&k, "Bad.Uid", view, DEFAULT_TTL, NOW),
        Err(TicketError::Malformed)
    ));
    assert_eq!(lease_uid_of("v2.ABC.c.0.1.x.y"), None);
    assert_eq!(lease_uid_of(&"v2.".repeat(100)), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// No edit of a valid v2 ticket verifies with a grant other than the one minted, and
    /// no edit that changes the text verifies at all.
    #[test]
    fn no_mutation_of_a_v2_ticket_verifies(
        muts in proptest::collection::vec(mutation(), 1..4),
        nonce in any::<[u8; NONCE_LEN]>(),
        ttl in 1u64..3600,
        view in any::<bool>(),
        force in any::<bool>(),
    ) {
        let k = key();
        let grant = Grant { role: if view { Role::View } else { Role::Control }, force };
        let text = encode_v2(&k, "0123456789abcdef", grant, NOW + ttl, &nonce);
        prop_assert_eq!(verify(&k, &text, NOW).unwrap().grant, grant);
        let mut bytes = text.as_bytes().to_vec();
        for m in &muts {
            if bytes.is_empty() {
                break;
            }
            bytes = apply(&bytes, m);
        }
        let Ok(mutated) = String::from_utf8(bytes) else { return Ok(()) };
        if mutated != text {
            prop_assert!(verify(&k, &mutated, NOW).is_err());
        }
    }
}
