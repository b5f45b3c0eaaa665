//! `vncd get` and `vncd status`: read-only views that work while `vncd run` runs.

use std::process::ExitCode;

use clap::{Args, ValueEnum};
use serde_json::json;

use super::{StateArgs, emit};
use crate::api::VncSession;
use crate::runconfig::{PoolFlags, Recorded};
use crate::status::SystemStatus;
use crate::store::file::read_state;
use crate::store::lock::is_held;
use crate::supervisor::{classify, scan};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Show only this session.
    pub name: Option<String>,
    #[command(flatten)]
    pub state: StateArgs,
    /// Output format. JSON and YAML print a kubectl-style List (or one object when NAME is given).
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

fn warn_if_not_running(state: &StateArgs, recorded: &Recorded) {
    let dir = state.dir();
    if !is_held(&dir.controller_lock()) {
        // The record says which controller wrote these statuses, so a stale view can be
        // traced to its sessions directory.
        let last = recorded.config().map_or_else(String::new, |c| {
            format!(
                " (last run: sessions dir {}, ports {})",
                c.sessions_dir.display(),
                c.port_range
            )
        });
        eprintln!(
            "warning: no `vncd run` holds {}; this status may be stale{last}",
            dir.controller_lock().display()
        );
    }
}

fn cell(s: Option<String>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or_else(|| "-".into())
}

fn table(items: &[VncSession]) -> String {
    let mut rows = vec![
        ["NAME", "PHASE", "PORT", "PID", "TARGET", "URL", "MESSAGE"]
            .map(String::from)
            .to_vec(),
    ];
    for i in items {
        let st = i.status.clone().unwrap_or_default();
        rows.push(vec![
            cell(i.metadata.name.clone()),
            cell(st.phase.map(|p| p.to_string())),
            cell(st.port.map(|p| p.to_string())),
            cell(st.pid.map(|p| p.to_string())),
            cell(st.target),
            cell(st.url),
            cell(st.message),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        for (c, w) in widths.iter().enumerate() {
            out.push_str(&format!("{:<w$}   ", r[c], w = *w));
        }
        out.push_str(&r[6]);
        out.push('\n');
    }
    out
}

pub fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let file = crate::status::file::read(&args.state.dir().sessions())?;
    let recorded = Recorded::load(&args.state.state_dir)?;
    warn_if_not_running(&args.state, &recorded);
    let mut items = file.items;
    if let Some(name) = &args.name {
        items.retain(|i| i.metadata.name.as_deref() == Some(name));
        if items.is_empty() {
            eprintln!("vncd: session {name:?} not found");
            return Ok(ExitCode::from(1));
        }
    }
    let value = if args.name.is_some() {
        serde_json::to_value(&items[0])?
    } else {
        json!({"apiVersion": "v1", "kind": "List", "items": items})
    };
    match args.output {
        Output::Table => emit(&table(&items)),
        Output::Json => emit(&format!("{}\n", serde_json::to_string_pretty(&value)?)),
        Output::Yaml => emit(&serde_saphyr::to_string(&value)?),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub pool: PoolFlags,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let dir = args.state.dir();
    // The pool of the `vncd run` that owns this state directory, not a default.
    let recorded = Recorded::load(dir.root())?;
    let range = recorded.port_range(args.pool.port_range)?;
    recorded.max_sessions(args.pool.max_sessions)?;
    let owner = std::fs::canonicalize(dir.root()).map_or_else(
        |_| dir.root().display().to_string(),
        |p| p.display().to_string(),
    );
    // Scan before reading leases (see supervisor::classify).
    let marked = scan(&owner);
    let set = read_state(&dir.leases())?;
    let obs = classify(marked, &set.leases);
    let running = is_held(&dir.controller_lock());
    // Sessions the relay serves (`vncd run --relay`) have no process of their own: the
    // relay says which it serves.
    let mut live =
        crate::supervisor::relay::RelayView::ask(&dir.relay_socket(), &set.leases).serving();
    live.extend(obs.proxies.keys().cloned());
    let st = SystemStatus::new(range, &set.leases, live.len(), obs.orphans.len(), running);
    let value = st.to_json();
    let (total, allocated, utilization, dead) = (
        st.total_ports,
        st.allocated_ports,
        st.utilization_percent(),
        st.dead_proxies,
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("port pool:     {range} ({total} ports)");
        println!(
            "allocated:     {allocated} ({utilization}%), free: {}",
            total - allocated
        );
        if st.outside_pool > 0 {
            println!(
                "outside pool:  {} leases (from an earlier --port-range; each moves into the pool once no console is open on it, or now with `vncd cleanup --once --repack`)",
                st.outside_pool
            );
        }
        println!(
            "proxies:       {} running, {dead} dead, {} orphaned",
            obs.proxies.len(),
            obs.orphans.len()
        );
        println!(
            "controller:    {}",
            if running { "running" } else { "not running" }
        );
        println!(
            "configuration: {}",
            if recorded.config().is_some() {
                format!("as recorded in {}", recorded.path().display())
            } else {
                format!("flags and defaults (no {})", recorded.path().display())
            }
        );
        println!(
            "health:        {}",
            value["system_health"].as_str().unwrap_or("?")
        );
    }
    Ok(ExitCode::SUCCESS)
}
