//! `vncd apply` and `vncd delete`: how a VM manager asks for and gives back a console.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use super::StateArgs;
use crate::api::Phase;
use crate::fsutil::write_atomic;
use crate::manifest;
use crate::runconfig::{PoolFlags, Recorded, SessionsFlag};
use crate::store::file::read_state;

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The manifest to apply, or `-` for standard input.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    #[command(flatten)]
    pub sessions: SessionsFlag,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub pool: PoolFlags,
    /// Wait until the session is Ready and print a fresh console URL (with a ticket, as
    /// `vncd url` prints it).
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait with --wait.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The session to remove.
    pub name: String,
    #[command(flatten)]
    pub sessions: SessionsFlag,
    #[command(flatten)]
    pub state: StateArgs,
    /// Wait until its port is released.
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait with --wait.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

/// Manifest files in `dir` that claim session `name`.
fn files_claiming(dir: &Path, name: &str) -> anyhow::Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read sessions directory {}", dir.display()))?;
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let path = entry.path();
        let fname = entry.file_name().to_string_lossy().into_owned();
        let is_manifest = fname.ends_with(".yaml") || fname.ends_with(".yml");
        if fname.starts_with('.') || !is_manifest || !path.is_file() {
            continue;
        }
        let small = entry
            .metadata()
            .is_ok_and(|m| m.len() <= manifest::MAX_MANIFEST_BYTES);
        let text = if small {
            std::fs::read_to_string(&path).unwrap_or_default()
        } else {
            String::new()
        };
        let stem = fname.rsplit_once('.').map_or(fname.as_str(), |(s, _)| s);
        if manifest::claimed_name(&text).as_deref() == Some(name) || stem == name {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

pub fn apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let mut bytes = Vec::new();
    if args.file.as_os_str() == "-" {
        std::io::stdin()
            .take(manifest::MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut bytes)
            .context("cannot read standard input")?;
    } else {
        let f = std::fs::File::open(&args.file)
            .with_context(|| format!("cannot open {}", args.file.display()))?;
        f.take(manifest::MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read {}", args.file.display()))?;
    }
    // The directory and pool of the `vncd run` that owns the state directory: a manifest
    // written anywhere else would never be served, and `--wait` would only time out.
    let recorded = Recorded::load(&args.state.state_dir)?;
    let range = recorded.port_range(args.pool.port_range)?;
    let dir = &recorded.sessions_dir(args.sessions.sessions_dir.clone())?;
    let parsed = manifest::parse_bytes(&bytes, range)
        .with_context(|| format!("{} was not applied", args.file.display()))?;
    let name = parsed.session.name().to_owned();
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let existing = files_claiming(dir, &name)?;
    let target = existing
        .first()
        .cloned()
        .unwrap_or_else(|| dir.join(format!("{name}.yaml")));
    let unchanged = std::fs::read(&target).is_ok_and(|old| old == bytes);
    if !unchanged {
        write_atomic(&target, &bytes, 0o644)
            .with_context(|| format!("cannot write {}", target.display()))?;
    }
    println!(
        "vncsession/{name} {}",
        if unchanged { "unchanged" } else { "configured" }
    );
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let sessions = args.state.dir().sessions();
    let mut last = String::from("no status yet");
    while Instant::now() < deadline {
        if let Ok(file) = crate::status::file::read(&sessions)
            && let Some(item) = file
                .items
                .iter()
                .find(|i| i.metadata.name.as_deref() == Some(&name))
            && let Some(st) = &item.status
        {
            last = format!(
                "{} ({})",
                st.phase.map_or("-".into(), |p| p.to_string()),
                st.message.clone().unwrap_or_default()
            );
            if st.observed_generation == Some(parsed.session.generation())
                && st.phase == Some(Phase::Ready)
            {
                let u = super::url::mint_standalone(
                    &args.state.state_dir,
                    &name,
                    crate::console::MintOptions::default(),
                )?;
                super::url::print_url(&u, false);
                return Ok(ExitCode::SUCCESS);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "vncd: session {name:?} not Ready after {}s: {last}",
        args.timeout
    );
    Ok(ExitCode::from(1))
}

pub fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let recorded = Recorded::load(&args.state.state_dir)?;
    let dir = &recorded.sessions_dir(args.sessions.sessions_dir.clone())?;
    let files = files_claiming(dir, &args.name)?;
    if files.is_empty() {
        eprintln!(
            "vncd: no manifest for session {:?} in {}",
            args.name,
            dir.display()
        );
        return Ok(ExitCode::from(1));
    }
    for f in &files {
        std::fs::remove_file(f).with_context(|| format!("cannot remove {}", f.display()))?;
    }
    println!("vncsession/{} deleted", args.name);
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let leases = args.state.dir().leases();
    while Instant::now() < deadline {
        match read_state(&leases) {
            Ok(set) if !set.leases.contains_key(&args.name) => return Ok(ExitCode::SUCCESS),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "vncd: port of session {:?} not released after {}s",
        args.name, args.timeout
    );
    Ok(ExitCode::from(1))
}
