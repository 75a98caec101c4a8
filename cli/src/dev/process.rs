//! Background daemons for the local cluster: started detached (own session
//! through `setsid` when present, else own process group, so that closing
//! the terminal or Ctrl-C in it does not reach them), stdout and stderr
//! appended to a log file; recognised later by pid *and* executable name
//! (a recycled pid is never signalled); stopped with SIGTERM, then SIGKILL.
//!
//! [`sweep`] finds every `neph-controller`, `neph-node` or `neph-vmm` whose
//! command line names the cluster directory: the VMs the agents started
//! (which outlive their agent by design) and anything a crashed `up` left.

use std::io::{Read as _, Seek as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use thiserror::Error;

/// Why a daemon could not be started.
#[derive(Debug, Error)]
pub enum SpawnDaemonError {
    /// The log file cannot be opened.
    #[error("cannot open the log file {path}: {source}")]
    Log {
        /// The log.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The program could not be executed.
    #[error("cannot start {program}: {source}")]
    Exec {
        /// The program.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It exited before saying it listens.
    #[error("{what} exited before it was ready; see its log {log}{tail}")]
    Exited {
        /// Which process.
        what: String,
        /// Its log.
        log: PathBuf,
        /// The end of the log, indented.
        tail: String,
    },
    /// It did not say it listens in time.
    #[error("{what} did not print `{marker}` within {waited:?}; see its log {log}{tail}")]
    Timeout {
        /// Which process.
        what: String,
        /// The line awaited.
        marker: String,
        /// How long.
        waited: Duration,
        /// Its log.
        log: PathBuf,
        /// The end of the log, indented.
        tail: String,
    },
}

/// A started daemon.
#[derive(Debug)]
pub struct Started {
    /// Its pid.
    pub pid: u32,
    /// Where it appends its output.
    pub log: PathBuf,
    /// Length of the log before it started (its own lines come after).
    pub log_start: u64,
}

/// Starts `program args` detached, its output appended to `log`.
pub fn spawn_detached(
    program: &Path,
    args: &[String],
    log: &Path,
    envs: &[(&str, &str)],
) -> Result<Started, SpawnDaemonError> {
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent).map_err(|source| SpawnDaemonError::Log {
            path: log.to_owned(),
            source,
        })?;
    }
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| SpawnDaemonError::Log {
                path: log.to_owned(),
                source,
            })
    };
    let out = open()?;
    let log_start = out.metadata().map(|m| m.len()).unwrap_or(0);
    let err = open()?;
    // `setsid PROGRAM` execs PROGRAM in a new session without forking (the
    // child is not a group leader), so the pid stays PROGRAM's.
    let mut cmd = match which("setsid") {
        Some(setsid) => {
            let mut c = Command::new(setsid);
            c.arg(program);
            c
        }
        None => {
            let mut c = Command::new(program);
            c.process_group(0);
            c
        }
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env_remove("NEPHELE_ENDPOINT")
        .env_remove("NEPHELE_TOKEN")
        // Plain log files, without terminal colours, and without backtraces
        // (a startup error's own line must stay in the tail we show).
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env("NO_COLOR", "1");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd.spawn().map_err(|source| SpawnDaemonError::Exec {
        program: program.to_owned(),
        source,
    })?;
    // The child is never waited for: once `neph` exits it is reparented and
    // reaped by init. Until then, a daemon that dies early stays a zombie,
    // which `alive` counts as dead.
    let pid = child.id();
    drop(child);
    // Until `setsid` has exec'd the program, the pid still runs `setsid`.
    let deadline = Instant::now() + Duration::from_secs(2);
    while exe_name(pid).as_deref() == Some("setsid") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(Started {
        pid,
        log: log.to_owned(),
        log_start,
    })
}

/// Waits until the daemon's log (from its start) holds a line beginning
/// with `marker`, and returns the rest of that line.
pub async fn wait_for_line(
    started: &Started,
    binary: &str,
    marker: &str,
    what: &str,
    within: Duration,
) -> Result<String, SpawnDaemonError> {
    let deadline = Instant::now() + within;
    loop {
        let text = read_from(&started.log, started.log_start);
        if let Some(rest) = text.lines().find_map(|l| l.strip_prefix(marker)) {
            return Ok(rest.trim().to_owned());
        }
        if !alive(started.pid, binary) {
            return Err(SpawnDaemonError::Exited {
                what: what.to_owned(),
                log: started.log.clone(),
                tail: tail(&text),
            });
        }
        if Instant::now() > deadline {
            return Err(SpawnDaemonError::Timeout {
                what: what.to_owned(),
                marker: marker.to_owned(),
                waited: within,
                log: started.log.clone(),
                tail: tail(&text),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The log's content from `offset` (lossy; empty if unreadable).
pub fn read_from(path: &Path, offset: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path)
        && f.seek(std::io::SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last lines of a log, indented, for error messages.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(8);
    if lines.is_empty() {
        return String::new();
    }
    let mut out = String::from(":");
    for l in &lines[from..] {
        out.push_str("\n    ");
        out.push_str(l);
    }
    out
}

/// Whether `pid` is a live (not zombie) process running the executable
/// named `binary`.
pub fn alive(pid: u32, binary: &str) -> bool {
    if pid == 0 {
        return false;
    }
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // `pid (comm) S ...`: the state follows the last `)`.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if matches!(state, Some('Z' | 'X') | None) {
        return false;
    }
    exe_name(pid).as_deref() == Some(binary)
}

/// The file name of the executable `pid` runs (without a ` (deleted)`
/// suffix, which a rebuilt binary shows).
fn exe_name(pid: u32) -> Option<String> {
    let exe = std::fs::read_link(Path::new("/proc").join(pid.to_string()).join("exe")).ok()?;
    let name = exe.file_name()?.to_string_lossy().into_owned();
    Some(name.trim_end_matches(" (deleted)").to_owned())
}

fn signal(pid: u32, sig: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        // Already gone is fine: that is what we want.
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Stops every `(pid, binary)` that is still alive: SIGTERM, then SIGKILL
/// for those still up after `grace`. Returns the pids that had to be
/// killed.
pub fn stop_all(procs: &[(u32, &str)], grace: Duration) -> Vec<u32> {
    let live: Vec<(u32, &str)> = procs
        .iter()
        .copied()
        .filter(|(pid, bin)| alive(*pid, bin))
        .collect();
    for (pid, _) in &live {
        signal(*pid, Signal::TERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && live.iter().any(|(p, b)| alive(*p, b)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut killed = Vec::new();
    for (pid, bin) in &live {
        if alive(*pid, bin) {
            signal(*pid, Signal::KILL);
            killed.push(*pid);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && live.iter().any(|(p, b)| alive(*p, b)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    killed
}

/// The executables a local cluster runs.
pub const BINARIES: &[&str] = &["neph-controller", "neph-node", "neph-vmm"];

/// Every live process running one of `binaries` whose command line names
/// something inside `dir`, as `(pid, binary)`.
pub fn sweep(dir: &Path, binaries: &[&'static str]) -> Vec<(u32, &'static str)> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let own = std::process::id();
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Some(name) = exe_name(pid) else { continue };
        let Some(bin) = binaries.iter().find(|b| **b == name) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let names_dir = cmdline
            .split(|b| *b == 0)
            .any(|arg| names_inside(arg, needle));
        if names_dir && alive(pid, bin) {
            out.push((pid, *bin));
        }
    }
    out
}

/// Whether the argument is `dir` itself or mentions a path inside it
/// (`--data-dir=<dir>/x`, `path=<dir>/x,...`).
fn names_inside(arg: &[u8], dir: &[u8]) -> bool {
    if arg == dir {
        return true;
    }
    arg.windows(dir.len() + 1)
        .any(|w| w.starts_with(dir) && w.last() == Some(&b'/'))
}

/// The path of `program` on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_name_paths_inside_the_directory_only() {
        let dir = b"/s/dev";
        assert!(names_inside(b"/s/dev", dir));
        assert!(names_inside(b"/s/dev/node-1", dir));
        assert!(names_inside(b"--data-dir=/s/dev/x", dir));
        assert!(names_inside(b"path=/s/dev/a.raw,readonly", dir));
        assert!(!names_inside(b"/s/dev2/x", dir));
        assert!(!names_inside(b"/s/de", dir));
    }

    #[test]
    fn a_detached_process_is_seen_alive_then_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("logs").join("sleep.log");
        let sleep = which("sleep").expect("sleep on PATH");
        let started = spawn_detached(&sleep, &["30".to_owned()], &log, &[]).unwrap();
        assert!(alive(started.pid, "sleep"));
        // A recycled pid running something else is not ours.
        assert!(!alive(started.pid, "neph-node"));
        let killed = stop_all(&[(started.pid, "sleep")], Duration::from_secs(5));
        assert!(killed.is_empty(), "sleep should stop on SIGTERM");
        assert!(!alive(started.pid, "sleep"));
        assert!(!alive(0, "sleep"));
    }

    #[test]
    fn the_log_tail_is_indented_and_short() {
        let text: String = (0..20).map(|i| format!("line {i}\n")).collect();
        let t = tail(&text);
        assert!(t.starts_with(":\n    line 12"));
        assert!(t.ends_with("line 19"));
        assert_eq!(tail(""), "");
    }
}
