//! Security claims stay true: every test that README.md, RELIABILITY.md and docs/ name as
//! the proof of a claim exists (a renamed or deleted test turns its claim into an unproven
//! one), every file they name exists, and sentences found false in a review do not come
//! back. Pure file reading; no component runs.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The names of every function defined in src/, tests/ and benches/.
fn defined_functions() -> BTreeSet<String> {
    let mut files = Vec::new();
    for d in ["src", "tests", "benches"] {
        rust_files(&Path::new(ROOT).join(d), &mut files);
    }
    let mut names = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for part in text.split("fn ").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

/// The backticked spans of `text`, line by line, outside fenced code blocks.
fn backticked(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.extend(line.split('`').skip(1).step_by(2));
        }
    }
    out
}

/// A span that names a test: snake_case words (at least four), optionally behind a
/// `module::path::`. Flags, fields and short identifiers are not test names.
fn test_name(span: &str) -> Option<&str> {
    let last = span.rsplit("::").next()?;
    let snake = last
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    // Metric names (`vncd_pool_free_ports`) are snake_case too, and are not tests.
    let metric = last.starts_with("vncd_") || last.ends_with("_total");
    (snake && !metric && last.split('_').filter(|w| !w.is_empty()).count() >= 4).then_some(last)
}

/// Table rows of the documents whose last column names the proof of a claim.
fn claim_documents() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for doc in [
        "README.md",
        "RELIABILITY.md",
        "docs/TICKETS.md",
        "docs/ARCHITECTURE.md",
    ] {
        let text = std::fs::read_to_string(Path::new(ROOT).join(doc)).unwrap();
        out.push((doc.to_owned(), text));
    }
    out
}

#[test]
fn every_test_a_claim_names_exists() {
    let defined = defined_functions();
    let mut missing = Vec::new();
    let mut checked = 0;
    for (doc, text) in claim_documents() {
        for span in backticked(&text) {
            if let Some(name) = test_name(span) {
                checked += 1;
                if !defined.contains(name) {
                    missing.push(format!("{doc}: `{span}`"));
                }
            }
        }
    }
    assert!(
        checked > 40,
        "only {checked} test names found: the extraction broke"
    );
    assert!(
        missing.is_empty(),
        "claims name tests that do not exist (renamed or deleted?):\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_file_a_claim_names_exists() {
    let mut missing = Vec::new();
    for (doc, text) in claim_documents() {
        for span in backticked(&text) {
            let looks_like_file = (span.starts_with("tests/")
                || span.starts_with("src/")
                || span.starts_with("scripts/"))
                && !span.contains(' ')
                && !span.contains('*');
            if looks_like_file && !Path::new(ROOT).join(span).exists() {
                missing.push(format!("{doc}: `{span}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "claims name files that do not exist:\n{}",
        missing.join("\n")
    );
}

/// Sentences a review found false. Each stays out of the tree; the reason says why.
const FALSE_CLAIMS: &[(&str, &str)] = &[
    (
        "not wired in yet",
        "tickets are wired into both backends and every minting path",
    ),
    (
        "hold every session's token",
        "leases hold no secret since tickets: lease keys are derived",
    ),
    (
        "keeps its connection open indefinitely",
        "the silence deadline ends a client that sends no whole frame",
    ),
    ("does not use tickets yet", "tickets are wired in"),
    (
        "needs no root",
        "the chart runs vncd as uid 0 with six capabilities (values.yaml securityContext)",
    ),
    (
        "system user vncd owning /var/lib/vncd",
        "/var/lib/vncd is root's, 0700 (postinst, check-deb)",
    ),
    (
        "system user `vncd` that owns `/var/lib/vncd`",
        "/var/lib/vncd is root's, 0700 (postinst, check-deb)",
    ),
    (
        "The service runs as `vncd`, not root",
        "the unit runs vncd as root with six capabilities; its proxies run as vncd",
    ),
    (
        "Run `vncd cleanup` as that user too",
        "the state directory is root's; cleanup runs as root",
    ),
];

#[test]
fn sentences_found_false_do_not_come_back() {
    let mut files = Vec::new();
    for d in [
        "src",
        "tests",
        "benches",
        "docs",
        "scripts",
        "contrib",
        "packaging",
        "charts",
    ] {
        collect(&Path::new(ROOT).join(d), &mut files);
    }
    for f in [
        "README.md",
        "RELIABILITY.md",
        "BENCHMARKS.md",
        "Containerfile",
    ] {
        files.push(Path::new(ROOT).join(f));
    }
    let me = Path::new(ROOT).join("tests/claims.rs");
    let mut found = Vec::new();
    for f in files.iter().filter(|f| **f != me) {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for (sentence, why) in FALSE_CLAIMS {
            if flat.contains(sentence) {
                found.push(format!("{}: {sentence:?} ({why})", f.display()));
            }
        }
    }
    assert!(found.is_empty(), "false claims:\n{}", found.join("\n"));
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else {
            out.push(p);
        }
    }
}
