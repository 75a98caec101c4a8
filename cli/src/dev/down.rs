//! `neph dev down`: stop the local cluster and remove what it made.
//!
//! Order: the node agents first (so none restarts a VM meanwhile), then
//! every `neph-vmm` whose command line names the cluster directory (agents
//! leave their VMs running when they exit, by design), then the
//! controllers, then a last sweep for anything of ours still alive. Then the
//! bridge and the taps on it. The state file stays (with pids cleared) so
//! the next `neph dev up` restarts the same cluster on its data, unless
//! `--purge` deletes the whole directory.

use std::path::Path;
use std::time::Duration;

use thiserror::Error;

use super::bridge::{self, BridgeError};
use super::process;
use super::state::{ClusterState, Role, StateFileError};

/// How long a daemon gets to exit after SIGTERM (all of a kind stop in
/// parallel). Their stores are crash-safe, so SIGKILL after it loses
/// nothing acknowledged.
const GRACE: Duration = Duration::from_secs(5);

/// Why the local cluster could not be fully stopped or removed.
#[derive(Debug, Error)]
pub enum DevDownError {
    /// The state file.
    #[error(transparent)]
    State(#[from] StateFileError),
    /// Processes survived SIGKILL.
    #[error("these processes would not die: {0:?}")]
    Survivors(Vec<(u32, &'static str)>),
    /// The bridge.
    #[error("cannot remove the bridge: {0}")]
    Bridge(#[from] BridgeError),
    /// The directory.
    #[error("cannot delete {path}: {source}")]
    Purge {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What `stop` did.
#[derive(Debug, Default)]
pub struct Stopped {
    /// Processes stopped, by kind.
    pub agents: usize,
    /// VMs stopped.
    pub vms: usize,
    /// Controllers stopped.
    pub controllers: usize,
    /// Those that needed SIGKILL.
    pub killed: usize,
    /// Taps removed.
    pub taps: Vec<String>,
}

/// Stops every process of the cluster in `dir` and removes its bridge.
pub fn stop(dir: &Path) -> Result<Stopped, DevDownError> {
    let mut st = ClusterState::load(dir)?;
    let mut done = Stopped::default();
    let recorded = |role: Role| -> Vec<(u32, &'static str)> {
        st.as_ref()
            .map(|s| {
                s.processes
                    .iter()
                    .filter(|p| p.role == role && process::alive(p.pid, role.binary()))
                    .map(|p| (p.pid, role.binary()))
                    .collect()
            })
            .unwrap_or_default()
    };
    // Agents: the recorded ones and any other agent working in `dir`.
    let mut agents = recorded(Role::Node);
    merge(&mut agents, process::sweep(dir, &["neph-node"]));
    done.killed += process::stop_all(&agents, GRACE).len();
    done.agents = agents.len();

    let mut vms = recorded_vms(st.as_ref());
    merge(&mut vms, process::sweep(dir, &["neph-vmm"]));
    done.killed += process::stop_all(&vms, GRACE).len();
    done.vms = vms.len();

    let mut controllers = recorded(Role::Controller);
    merge(&mut controllers, process::sweep(dir, &["neph-controller"]));
    done.killed += process::stop_all(&controllers, GRACE).len();
    done.controllers = controllers.len();

    let rest = process::sweep(dir, process::BINARIES);
    process::stop_all(&rest, Duration::from_secs(2));
    let survivors = process::sweep(dir, process::BINARIES);

    if let Some(s) = st.as_mut() {
        if let Some(b) = &s.bridge {
            done.taps = bridge::remove(b)?;
        }
        for p in &mut s.processes {
            p.pid = 0;
        }
        s.save(dir)?;
    }
    if !survivors.is_empty() {
        return Err(DevDownError::Survivors(survivors));
    }
    Ok(done)
}

/// The VMs the agents recorded: `"pid"` of every
/// `<node-data>/instances/<project>/<instance>/state` (checked against
/// `/proc` before use: only a live `neph-vmm` counts).
fn recorded_vms(st: Option<&ClusterState>) -> Vec<(u32, &'static str)> {
    let mut out = Vec::new();
    let Some(st) = st else { return out };
    for p in st.processes.iter().filter(|p| p.role == Role::Node) {
        let Ok(projects) = std::fs::read_dir(p.data_dir.join("instances")) else {
            continue;
        };
        for project in projects.flatten() {
            let Ok(instances) = std::fs::read_dir(project.path()) else {
                continue;
            };
            for i in instances.flatten() {
                let pid = std::fs::read_to_string(i.path().join("state"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| v["pid"].as_u64())
                    .and_then(|pid| u32::try_from(pid).ok());
                if let Some(pid) = pid
                    && process::alive(pid, "neph-vmm")
                {
                    out.push((pid, "neph-vmm"));
                }
            }
        }
    }
    out
}

fn merge(into: &mut Vec<(u32, &'static str)>, more: Vec<(u32, &'static str)>) {
    for m in more {
        if !into.contains(&m) {
            into.push(m);
        }
    }
}

/// `neph dev down [--purge]`.
pub fn down(dir: &Path, purge: bool) -> Result<(), DevDownError> {
    let had_state = ClusterState::load(dir)?.is_some();
    let done = stop(dir)?;
    if !had_state && done.agents + done.vms + done.controllers == 0 {
        eprintln!("no local cluster in {}: nothing to stop", dir.display());
    } else {
        eprintln!(
            "stopped {} node agent(s), {} VM(s), {} controller(s){}{}",
            done.agents,
            done.vms,
            done.controllers,
            if done.killed > 0 {
                format!(" ({} needed SIGKILL)", done.killed)
            } else {
                String::new()
            },
            if done.taps.is_empty() {
                String::new()
            } else {
                format!("; removed taps {}", done.taps.join(", "))
            }
        );
    }
    if purge {
        std::fs::remove_dir_all(dir).map_err(|source| DevDownError::Purge {
            path: dir.to_owned(),
            source,
        })?;
        eprintln!("deleted {}", dir.display());
    } else if had_state {
        eprintln!(
            "kept {} (`neph dev up` restarts this cluster; `neph dev down --purge` deletes it)",
            dir.display()
        );
    }
    Ok(())
}
