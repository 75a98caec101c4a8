//! Live migration between two `neph-vmm` processes on loopback, for tests
//! and the migration benchmark: start a target (`--incoming`), drive the
//! source's control socket (`migrate`, `migrate_status`, `migrate_cancel`)
//! and wait for the outcome.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::guest::{GuestError, GuestVm, workspace_binary};

/// Errors while driving a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationDriveError {
    #[error("control socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("the control answer is not JSON: {0}")]
    Answer(String),
    #[error(transparent)]
    Start(#[from] crate::procs::StartError),
    #[error("the migration did not finish within {0:?}; last status {1}")]
    Timeout(Duration, String),
    #[error(transparent)]
    Guest(#[from] GuestError),
}

/// Sends one control request and returns the answer (ok or not).
pub fn control(socket: &Path, request: &str) -> Result<serde_json::Value, MigrationDriveError> {
    let err = |source| MigrationDriveError::Socket {
        path: socket.display().to_string(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(err)?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(err)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(err)?;
    serde_json::from_str(&line).map_err(|_| MigrationDriveError::Answer(line))
}

/// Starts `neph-vmm --incoming 127.0.0.1:PORT` with `args`; its console
/// is its stdio, like a [`GuestVm`] started normally. The target pre-builds
/// the VM of its `--cpus`/`--memory`/`--no-rng` (defaults 1 vCPU, 256 MiB,
/// rng): give the source's, or it builds another when the source connects.
pub fn start_target(port: u16, args: &[&str]) -> Result<GuestVm, MigrationDriveError> {
    let mut cmd = Command::new(workspace_binary("neph-vmm"));
    cmd.arg("--incoming")
        .arg(format!("127.0.0.1:{port}"))
        .args(args);
    Ok(GuestVm::spawn(cmd)?)
}

/// How a migration ended, seen from the source's control socket.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `completed`, `failed` or `cancelled`.
    pub state: String,
    /// The last `migration` object seen.
    pub last: serde_json::Value,
    /// Wall time from the request to the outcome.
    pub elapsed: Duration,
}

/// Polls `migrate_status` until the migration ends. A source whose control
/// socket goes away after the migration passed its setup has exited, which
/// it does only once migrated: that is `completed`.
pub fn wait_outcome(socket: &Path, timeout: Duration) -> Result<Outcome, MigrationDriveError> {
    let start = Instant::now();
    let mut last = serde_json::Value::Null;
    while start.elapsed() < timeout {
        match control(socket, r#"{"cmd":"migrate_status"}"#) {
            // An answer without a status: the VM is going away (it does
            // once migrated); the next poll finds the socket gone.
            Ok(v) if v["migration"].is_null() => {}
            Ok(v) => {
                let m = v["migration"].clone();
                let state = m["state"].as_str().unwrap_or_default().to_owned();
                last = m;
                if matches!(state.as_str(), "completed" | "failed" | "cancelled") {
                    return Ok(Outcome {
                        state,
                        last,
                        elapsed: start.elapsed(),
                    });
                }
            }
            // The socket is gone, refuses, or closes without answering:
            // the source exited.
            Err(MigrationDriveError::Socket { .. }) if !last.is_null() => {
                return Ok(Outcome {
                    state: "completed".into(),
                    last,
                    elapsed: start.elapsed(),
                });
            }
            Err(MigrationDriveError::Answer(a)) if a.is_empty() && !last.is_null() => {
                return Ok(Outcome {
                    state: "completed".into(),
                    last,
                    elapsed: start.elapsed(),
                });
            }
            Err(e) => return Err(e),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(MigrationDriveError::Timeout(timeout, last.to_string()))
}

/// Sends `migrate` to `to` with the extra JSON fields `extra` (e.g.
/// `"verify":true`) and waits for the outcome.
pub fn migrate(
    socket: &Path,
    to: &str,
    extra: &str,
    timeout: Duration,
) -> Result<Outcome, MigrationDriveError> {
    let sep = if extra.is_empty() { "" } else { "," };
    let req = format!(r#"{{"cmd":"migrate","to":"{to}"{sep}{extra}}}"#);
    let answer = control(socket, &req)?;
    if answer["ok"] != true {
        return Ok(Outcome {
            state: "refused".into(),
            last: answer,
            elapsed: Duration::ZERO,
        });
    }
    wait_outcome(socket, timeout)
}
