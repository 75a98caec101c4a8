//! The VMM in a cgroup of its own, with memory and CPU limits.
//!
//! `--cgroup NAME` puts the whole process (every thread) into
//! `<hierarchy>/nephele/NAME` before any vCPU runs, with
//! - memory: the guest's memory plus [`OVERHEAD_MIB`] (the VMM's own heap,
//!   migration buffers, page cache of disk I/O, which the kernel reclaims
//!   first), so a runaway VMM is stopped by the OOM killer before it hurts
//!   its neighbours;
//! - CPU: one CPU's worth of time per vCPU per period (vCPU threads plus
//!   device work cannot take more of the host than the VM was sold).
//!
//! cgroup v2 is used where its `memory` and `cpu` controllers are
//! available (`cgroup.controllers` of the cgroup2 mount); on hybrid hosts
//! whose controllers are still bound to v1 hierarchies (like the
//! development machines) the v1 `memory` and `cpu` hierarchies are used
//! instead (`memory.limit_in_bytes`, `cpu.cfs_quota_us`). Where neither is
//! there [`join`] answers [`JoinCgroupError::Unavailable`] and the VMM runs
//! on with a warning. The agent removes the cgroup once the VMM has exited
//! ([`remove`]).

use std::path::{Path, PathBuf};

/// Memory allowed beyond the guest's.
pub const OVERHEAD_MIB: u64 = 256;
/// CPU quota period (µs).
const PERIOD_US: u64 = 100_000;
/// Parent of every VM's cgroup, in each hierarchy.
pub const PARENT: &str = "nephele";

/// What the cgroup allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// memory limit in bytes.
    pub memory_bytes: u64,
    /// CPU quota per [`PERIOD_US`] (µs).
    pub cpu_quota_us: u64,
}

impl Limits {
    /// The limits of a VM with `vcpus` vCPUs and `memory_mib` of memory.
    pub fn for_vm(vcpus: u8, memory_mib: u64) -> Self {
        Self {
            memory_bytes: (memory_mib + OVERHEAD_MIB) << 20,
            cpu_quota_us: u64::from(vcpus.max(1)) * PERIOD_US,
        }
    }
}

/// Where the process went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// One cgroup v2 directory.
    V2(PathBuf),
    /// The v1 memory and cpu cgroup directories.
    V1 {
        /// In the memory hierarchy.
        memory: PathBuf,
        /// In the cpu hierarchy.
        cpu: PathBuf,
    },
}

impl Placement {
    /// Every directory.
    pub fn dirs(&self) -> Vec<&Path> {
        match self {
            Self::V2(d) => vec![d],
            Self::V1 { memory, cpu } => vec![memory, cpu],
        }
    }
}

/// Joining the cgroup failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinCgroupError {
    /// The name is not a plain relative path.
    #[error("invalid cgroup name {0:?}: use letters, digits, '.', '_', '-' and '/'")]
    Name(String),
    /// This host has no usable memory and cpu controllers.
    #[error("no cgroup memory and cpu controllers on this host: {0}")]
    Unavailable(String),
    /// A cgroup file could not be written.
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// A mounted cgroup hierarchy.
#[derive(Debug)]
struct Mount {
    path: PathBuf,
    v2: bool,
    options: Vec<String>,
}

fn mounts() -> Vec<Mount> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let path = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let options = r.nth(1).unwrap_or("");
            (fstype == "cgroup" || fstype == "cgroup2").then(|| Mount {
                path: PathBuf::from(path),
                v2: fstype == "cgroup2",
                options: options.split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}

fn valid(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && name.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

fn write(path: &Path, value: &str) -> Result<(), JoinCgroupError> {
    std::fs::write(path, value).map_err(|e| JoinCgroupError::Write(path.to_owned(), e))
}

fn mkdir(path: &Path) -> Result<(), JoinCgroupError> {
    std::fs::create_dir_all(path).map_err(|e| JoinCgroupError::Write(path.to_owned(), e))
}

/// Where the host's memory and cpu controllers are.
#[derive(Debug)]
enum Hierarchy {
    V2(PathBuf),
    V1 { memory: PathBuf, cpu: PathBuf },
}

fn hierarchy() -> Result<Hierarchy, JoinCgroupError> {
    let mounts = mounts();
    let mut why = Vec::new();
    for m in mounts.iter().filter(|m| m.v2) {
        let controllers =
            std::fs::read_to_string(m.path.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        if has("memory") && has("cpu") {
            return Ok(Hierarchy::V2(m.path.clone()));
        }
        why.push(format!(
            "cgroup2 at {} offers only [{}]",
            m.path.display(),
            controllers.trim()
        ));
    }
    let v1 = |c: &str| {
        mounts
            .iter()
            .find(|m| !m.v2 && m.options.iter().any(|o| o == c))
            .map(|m| m.path.clone())
    };
    match (v1("memory"), v1("cpu")) {
        (Some(memory), Some(cpu)) => Ok(Hierarchy::V1 { memory, cpu }),
        _ => {
            why.push("no cgroup v1 memory and cpu hierarchies either".into());
            Err(JoinCgroupError::Unavailable(why.join("; ")))
        }
    }
}

/// Whether this host can give a VMM its cgroup (the reason if not).
pub fn unavailable() -> Option<String> {
    hierarchy().err().map(|e| e.to_string())
}

/// Where `nephele/<name>` is on this host (whether or not it exists).
pub fn placement(name: &str) -> Result<Placement, JoinCgroupError> {
    if !valid(name) {
        return Err(JoinCgroupError::Name(name.to_owned()));
    }
    Ok(match hierarchy()? {
        Hierarchy::V2(root) => Placement::V2(root.join(PARENT).join(name)),
        Hierarchy::V1 { memory, cpu } => Placement::V1 {
            memory: memory.join(PARENT).join(name),
            cpu: cpu.join(PARENT).join(name),
        },
    })
}

/// Puts this process into `nephele/<name>` with `limits`.
pub fn join(name: &str, limits: Limits) -> Result<Placement, JoinCgroupError> {
    join_pid(name, limits, std::process::id())
}

/// Puts process `pid` into `nephele/<name>` with `limits`.
pub fn join_pid(name: &str, limits: Limits, pid: u32) -> Result<Placement, JoinCgroupError> {
    if !valid(name) {
        return Err(JoinCgroupError::Name(name.to_owned()));
    }
    match hierarchy()? {
        Hierarchy::V2(root) => {
            let dir = root.join(PARENT).join(name);
            mkdir(&dir)?;
            // Each level down to the VM's delegates the two controllers.
            let mut level = root.clone();
            for c in Path::new(PARENT).join(name).components() {
                write(&level.join("cgroup.subtree_control"), "+memory +cpu")?;
                level.push(c);
            }
            write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
            write(
                &dir.join("cpu.max"),
                &format!("{} {PERIOD_US}", limits.cpu_quota_us),
            )?;
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
            Ok(Placement::V2(dir))
        }
        Hierarchy::V1 { memory, cpu } => {
            let memory = memory.join(PARENT).join(name);
            let cpu = cpu.join(PARENT).join(name);
            mkdir(&memory)?;
            mkdir(&cpu)?;
            write(
                &memory.join("memory.limit_in_bytes"),
                &limits.memory_bytes.to_string(),
            )?;
            write(&cpu.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            write(
                &cpu.join("cpu.cfs_quota_us"),
                &limits.cpu_quota_us.to_string(),
            )?;
            write(&memory.join("cgroup.procs"), &pid.to_string())?;
            write(&cpu.join("cgroup.procs"), &pid.to_string())?;
            Ok(Placement::V1 { memory, cpu })
        }
    }
}

/// Removes `nephele/<name>` once no process is left in it (a VMM's cgroup
/// after it exited); missing is fine.
pub fn remove(name: &str) -> std::io::Result<()> {
    let Ok(p) = placement(name) else {
        return Ok(());
    };
    for d in p.dirs() {
        match std::fs::remove_dir(d) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_flavor() {
        let l = Limits::for_vm(2, 512);
        assert_eq!(l.memory_bytes, (512 + OVERHEAD_MIB) << 20);
        assert_eq!(l.cpu_quota_us, 200_000);
    }

    #[test]
    fn names_stay_inside_the_parent() {
        assert!(valid("vm-1"));
        assert!(valid("project/vm_1.a"));
        for bad in ["", "/abs", "../up", "a/../b", "a//b", "a b", "a/./b"] {
            assert!(!valid(bad), "{bad:?} accepted");
        }
        assert!(matches!(
            join("../escape", Limits::for_vm(1, 128)),
            Err(JoinCgroupError::Name(_))
        ));
    }
}
