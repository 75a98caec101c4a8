//! The local cluster's state file, `<dir>/cluster.json`: every process
//! `neph dev up` started (role, id, address, pid, log, data directory and
//! the command line that restarts it), the cluster id and the bridge it
//! made. Written after every process starts, so a failed `up` still leaves
//! a file `neph dev down` can clean up from.
//!
//! The layout of the directory:
//!
//! ```text
//! <dir>/cluster.json          this file
//! <dir>/logs/<role>-<id>.log  each process's stdout and stderr
//! <dir>/controller-<n>/       a controller's data (raft log, admin.token)
//! <dir>/node-<n>/             a node agent's data (instances, disks, sockets)
//! <dir>/images/<image-id>/    image content the agents read (kernel, ...)
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The state file's name inside the cluster directory.
pub const STATE_FILE: &str = "cluster.json";
/// Current version of the file's layout.
const VERSION: u32 = 1;

/// What a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A `neph-controller` member.
    Controller,
    /// A `neph-node` agent.
    Node,
}

impl Role {
    /// The role as shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Controller => "controller",
            Role::Node => "node",
        }
    }

    /// The executable's file name.
    pub fn binary(self) -> &'static str {
        match self {
            Role::Controller => "neph-controller",
            Role::Node => "neph-node",
        }
    }
}

/// One process of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// Controller or node.
    pub role: Role,
    /// Member id (controllers) or node id (agents).
    pub id: String,
    /// Where it serves (`host:port`).
    pub address: String,
    /// Its pid when last started (0: not running).
    pub pid: u32,
    /// Its log file.
    pub log: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// The executable.
    pub program: PathBuf,
    /// Arguments that start it again on its existing data.
    pub restart_args: Vec<String>,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Layout version.
    pub version: u32,
    /// The raft cluster id.
    pub cluster_id: u64,
    /// The bridge `up` made (removed by `down`), if any.
    pub bridge: Option<String>,
    /// The bootstrap admin token file (first controller's data directory).
    pub token_file: PathBuf,
    /// Every process, controllers first.
    pub processes: Vec<Process>,
}

/// Why the state file or directory could not be used.
#[derive(Debug, Error)]
pub enum StateFileError {
    /// Neither the flag nor the environment gives a directory.
    #[error("no directory for the local cluster: pass --dir, or set XDG_STATE_HOME or HOME")]
    NoDir,
    /// The directory cannot be made or resolved.
    #[error("cannot use {path} as the local cluster's directory: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// `read` or `write`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a state file this `neph` understands.
    #[error(
        "{path} is not a local cluster state file this neph understands ({message}); stop what it lists by hand or remove the directory"
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// The default directory: `$XDG_STATE_HOME/nephele/dev`, or
/// `~/.local/state/nephele/dev`.
fn default_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| Path::new(&h).join(".local").join("state"))
        })
        .map(|base| base.join("nephele").join("dev"))
}

/// The cluster directory, created if missing, as an absolute path without
/// symlinks (processes are recognised by it in their command lines).
pub fn resolve_dir(flag: Option<&Path>) -> Result<PathBuf, StateFileError> {
    let dir = match flag {
        Some(d) => d.to_owned(),
        None => default_dir().ok_or(StateFileError::NoDir)?,
    };
    std::fs::create_dir_all(&dir)
        .and_then(|()| dir.canonicalize())
        .map_err(|source| StateFileError::Dir { path: dir, source })
}

impl ClusterState {
    /// A new state with no process yet.
    pub fn new(cluster_id: u64, token_file: PathBuf) -> ClusterState {
        ClusterState {
            version: VERSION,
            cluster_id,
            bridge: None,
            token_file,
            processes: Vec::new(),
        }
    }

    /// Loads `<dir>/cluster.json`; `None` when there is none.
    pub fn load(dir: &Path) -> Result<Option<ClusterState>, StateFileError> {
        let path = dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateFileError::Io {
                    action: "read",
                    path,
                    source,
                });
            }
        };
        let state: ClusterState =
            serde_json::from_str(&text).map_err(|e| StateFileError::Parse {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if state.version != VERSION {
            return Err(StateFileError::Parse {
                path,
                message: format!("layout version {} is not {VERSION}", state.version),
            });
        }
        Ok(Some(state))
    }

    /// Writes `<dir>/cluster.json` atomically (a temporary file renamed).
    pub fn save(&self, dir: &Path) -> Result<(), StateFileError> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).map_err(|e| StateFileError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&tmp, text + "\n")
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| StateFileError::Io {
                action: "write",
                path,
                source,
            })
    }

    /// The controllers' addresses.
    pub fn controller_addresses(&self) -> Vec<String> {
        self.processes
            .iter()
            .filter(|p| p.role == Role::Controller)
            .map(|p| p.address.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_rejects_other_versions() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ClusterState::load(dir.path()).unwrap(), None);
        let mut st = ClusterState::new(7, dir.path().join("controller-1/admin.token"));
        st.bridge = Some("nephdev0".into());
        st.processes.push(Process {
            role: Role::Controller,
            id: "1".into(),
            address: "127.0.0.1:5".into(),
            pid: 42,
            log: dir.path().join("logs/controller-1.log"),
            data_dir: dir.path().join("controller-1"),
            program: "/bin/neph-controller".into(),
            restart_args: vec!["run".into()],
        });
        st.save(dir.path()).unwrap();
        assert_eq!(ClusterState::load(dir.path()).unwrap(), Some(st.clone()));
        assert_eq!(st.controller_addresses(), vec!["127.0.0.1:5".to_owned()]);

        let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        std::fs::write(
            dir.path().join(STATE_FILE),
            text.replace("\"version\": 1", "\"version\": 99"),
        )
        .unwrap();
        assert!(matches!(
            ClusterState::load(dir.path()),
            Err(StateFileError::Parse { .. })
        ));
        std::fs::write(dir.path().join(STATE_FILE), "{").unwrap();
        assert!(matches!(
            ClusterState::load(dir.path()),
            Err(StateFileError::Parse { .. })
        ));
    }

    #[test]
    fn the_directory_is_made_and_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let want = dir.path().join("a").join("b");
        let got = resolve_dir(Some(&want)).unwrap();
        assert!(got.is_absolute() && got.is_dir());
        assert_eq!(got, want.canonicalize().unwrap());
    }
}
