//! Reading a VncSession manifest (YAML) safely.
//!
//! Used by the directory source and by `vncd apply`, so a manifest `apply` accepts is
//! one `run` accepts. Input is bounded before parsing (size, depth, aliases, nodes),
//! so a YAML bomb or a huge file costs nothing and disturbs nothing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use crate::api::{API_VERSION, KIND, VncSession, VncSessionSpec};
use crate::pool::PortRange;
use crate::session::{SpecError, Validated, validate};

/// The largest manifest read; a real one is a few hundred bytes.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is {0} bytes; the limit is {MAX_MANIFEST_BYTES}")]
    TooLarge(u64),
    #[error("manifest is not UTF-8 text")]
    NotText,
    #[error("manifest is not valid YAML: {0}")]
    Yaml(String),
    #[error("manifest is empty")]
    Empty,
    #[error("manifest must be a YAML mapping with apiVersion, kind, metadata and spec")]
    NotAMapping,
    #[error("apiVersion {0:?} is not {API_VERSION}")]
    ApiVersion(String),
    #[error("kind {0:?} is not {KIND}")]
    Kind(String),
    #[error("metadata is invalid: {0}")]
    Metadata(String),
    #[error("metadata.name is missing")]
    NoName,
    #[error("spec is missing")]
    NoSpec,
    #[error("spec is invalid: {0}")]
    SpecType(String),
    #[error("{0}")]
    Spec(#[from] SpecError),
}

/// A manifest that parsed and validated.
#[derive(Clone, Debug)]
pub struct Parsed {
    pub object: VncSession,
    /// Ready to serve, or naming a libvirt domain that a libvirt source resolves.
    pub session: Validated,
}

fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_reader_input_bytes: Some(MAX_MANIFEST_BYTES as usize),
            max_depth: 32,
            max_aliases: 64,
            max_anchors: 64,
            max_nodes: 10_000,
            max_events: 50_000,
            max_documents: 2,
            max_total_scalar_bytes: MAX_MANIFEST_BYTES as usize,
        },
    }
}

/// The name a manifest claims, if it gets that far; used to report rejected files.
pub fn claimed_name(text: &str) -> Option<String> {
    let v: Value = serde_saphyr::from_str_with_options(text, yaml_options()).ok()?;
    v.get("metadata")?.get("name")?.as_str().map(str::to_owned)
}

/// Parses raw bytes as a manifest and validates it against the pool.
pub fn parse_bytes(bytes: &[u8], pool: PortRange) -> Result<Parsed, ManifestError> {
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge(bytes.len() as u64));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| ManifestError::NotText)?;
    parse(text, pool)
}

/// Parses YAML text as a manifest and validates it against the pool.
pub fn parse(text: &str, pool: PortRange) -> Result<Parsed, ManifestError> {
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge(text.len() as u64));
    }
    if text.contains('\0') {
        return Err(ManifestError::NotText);
    }
    let docs: Vec<Value> = serde_saphyr::from_str_multiple_with_options(text, yaml_options())
        .map_err(|e| ManifestError::Yaml(first_line(&e.to_string())))?;
    let doc = match docs.as_slice() {
        [] => return Err(ManifestError::Empty),
        [one] => one,
        _ => {
            return Err(ManifestError::Yaml(
                "more than one YAML document in one file".into(),
            ));
        }
    };
    let Value::Object(map) = doc else {
        return Err(ManifestError::NotAMapping);
    };
    let api_version = map
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if api_version != API_VERSION {
        return Err(ManifestError::ApiVersion(api_version.to_owned()));
    }
    let kind = map.get("kind").and_then(Value::as_str).unwrap_or_default();
    if kind != KIND {
        return Err(ManifestError::Kind(kind.to_owned()));
    }
    let metadata: ObjectMeta =
        serde_json::from_value(map.get("metadata").cloned().unwrap_or(Value::Null))
            .map_err(|e| ManifestError::Metadata(e.to_string()))?;
    let name = metadata.name.clone().ok_or(ManifestError::NoName)?;
    let spec_value = map.get("spec").cloned().ok_or(ManifestError::NoSpec)?;
    let spec: VncSessionSpec =
        serde_json::from_value(spec_value).map_err(|e| ManifestError::SpecType(e.to_string()))?;
    let session = validate(&name, &spec, pool)?;
    let mut object = VncSession::new(&name, spec);
    object.metadata = metadata;
    Ok(Parsed { object, session })
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: vncd.io/v1alpha1\nkind: VncSession\nmetadata:\n  name: vm1\nspec:\n  target:\n    host: 127.0.0.1\n    port: 5901\n";

    fn err(text: &str) -> String {
        parse(text, PortRange::default()).unwrap_err().to_string()
    }

    #[test]
    fn parses_a_good_manifest() {
        let p = parse(GOOD, PortRange::default()).unwrap();
        assert_eq!(p.session.name(), "vm1");
        assert_eq!(p.object.metadata.name.as_deref(), Some("vm1"));
    }

    #[test]
    fn refuses_bad_manifests_with_clear_messages() {
        assert!(err("{{{").contains("not valid YAML"));
        assert!(err("").contains("empty"));
        assert!(err("- a\n- b\n").contains("mapping"));
        assert!(err(&GOOD.replace("VncSession", "Pod")).contains("kind \"Pod\""));
        assert!(err(&GOOD.replace("vncd.io/v1alpha1", "v1")).contains("apiVersion \"v1\""));
        assert!(
            err(&GOOD.replace("  name: vm1\n", "  labels: {}\n"))
                .contains("metadata.name is missing")
        );
        assert!(err(&GOOD.replace("port: 5901", "port: 99999")).contains("99999"));
        assert!(err(&GOOD.replace("port: 5901", "port: \"x\"")).contains("spec is invalid"));
        assert!(
            err(&GOOD.replace("    port: 5901\n", "    port: 5901\n    prot: 1\n"))
                .contains("prot")
        );
        assert!(err(&GOOD.replace("vm1", "../etc")).contains("not valid"));
        assert!(err(&format!("{GOOD}---\n{GOOD}")).contains("more than one"));
        assert!(err(&GOOD.replace("127.0.0.1", "a;reboot")).contains("a;reboot"));
    }

    #[test]
    fn refuses_huge_and_binary_input_without_parsing() {
        let big = vec![b'a'; (MAX_MANIFEST_BYTES + 1) as usize];
        assert_eq!(
            parse_bytes(&big, PortRange::default()).unwrap_err(),
            ManifestError::TooLarge(MAX_MANIFEST_BYTES + 1)
        );
        assert_eq!(
            parse_bytes(&[0xff, 0xfe, 0x00], PortRange::default()).unwrap_err(),
            ManifestError::NotText
        );
    }

    #[test]
    fn a_yaml_bomb_is_refused_quickly() {
        let mut bomb = String::from("a: &a [x,x,x,x,x,x,x,x,x]\n");
        for i in 1..10 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p}]\n"
            ));
        }
        let bomb = bomb.replacen("&a [", "&a0 [", 1);
        let start = std::time::Instant::now();
        assert!(parse(&bomb, PortRange::default()).is_err());
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn claimed_name_is_found_even_when_the_spec_is_bad() {
        let bad = GOOD.replace("port: 5901", "port: -1");
        assert_eq!(claimed_name(&bad).as_deref(), Some("vm1"));
    }
}
