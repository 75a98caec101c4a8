//! What the agent reads from the host: the `CLOCK_MONOTONIC` clock shared
//! with every `neph-vmm` (fencing leases), processes in `/proc` (liveness,
//! CPU time, resident memory), and the capacity it offers by default.

use std::path::Path;

use rustix::process::Pid;

/// `CLOCK_MONOTONIC` in milliseconds: the clock of the VMM's `lease`
/// command (the same for every process on the host).
pub fn monotonic_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(t.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// One-letter state (`R`, `S`, `Z`, ...).
    pub state: char,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Start time after boot, in clock ticks: tells a reused pid apart.
    pub start_ticks: u64,
}

/// Parses the text of `/proc/<pid>/stat` (the command name may hold
/// spaces and parentheses, so fields are counted after the last `)`).
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = text.get(text.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the man page, utime 14, stime
    // 15, starttime 22; here index = field - 3.
    let state = f.first()?.chars().next()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let start_ticks: u64 = f.get(19)?.parse().ok()?;
    Some(ProcStat {
        state,
        cpu_ticks: utime.saturating_add(stime),
        start_ticks,
    })
}

/// The stat of a live (not zombie) process.
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text).filter(|s| s.state != 'Z' && s.state != 'X')
}

/// Whether `pid` runs and is the process that started at `start_ticks`.
pub fn alive(pid: u32, start_ticks: u64) -> bool {
    proc_stat(pid).is_some_and(|s| s.start_ticks == start_ticks)
}

/// Resident memory of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(page_size()))
}

fn page_size() -> u64 {
    u64::try_from(rustix::param::page_size()).unwrap_or(4096)
}

/// Clock ticks per second (`/proc` CPU times are in ticks).
pub fn ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

/// Sends SIGKILL to `pid` (errors ignored: it may be gone already).
pub fn kill(pid: u32) {
    let _ = signal(pid, rustix::process::Signal::KILL);
}

fn signal(pid: u32, sig: rustix::process::Signal) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .is_some_and(|p| rustix::process::kill_process(p, sig).is_ok())
}

/// Stops every thread of `pid` (SIGSTOP) and waits until each one is
/// stopped (`T` in `/proc/<pid>/task/*/stat`), at most `within`: once this
/// returns true, the process runs no instruction until [`thaw`]. False if
/// it is gone or did not stop in time.
pub fn freeze(pid: u32, within: std::time::Duration) -> bool {
    if !signal(pid, rustix::process::Signal::STOP) {
        return false;
    }
    let deadline = std::time::Instant::now() + within;
    loop {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        let stopped = tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| parse_stat(&s))
                .is_none_or(|s| matches!(s.state, 'T' | 't' | 'Z' | 'X'))
        });
        if stopped {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Lets a [`freeze`]d process run again (SIGCONT).
pub fn thaw(pid: u32) {
    let _ = signal(pid, rustix::process::Signal::CONT);
}

/// Memory kept back from instances: 10% of the host, at least 1 GiB.
pub const fn memory_reserve_mib(total_mib: u64) -> u64 {
    let tenth = total_mib / 10;
    if tenth > 1024 { tenth } else { 1024 }
}

/// Disk kept back from instances in the data directory's file system.
pub const DISK_RESERVE_GIB: u64 = 2;

/// Whether this process runs as root (owner of its `/proc` entry).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The host's CPUs.
pub fn host_cpus() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| u64::try_from(n.get()).unwrap_or(1))
}

/// `MemTotal` from `/proc/meminfo`, in MiB.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo_total_kib(&text).map(|kib| kib / 1024)
}

fn parse_meminfo_total_kib(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Free space (for unprivileged users) in the file system holding `path`,
/// in GiB.
pub fn free_disk_gib(path: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(path)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize) >> 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_names() {
        let line = "4242 (neph vmm) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0 123456 1000 200 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.cpu_ticks, 12);
        assert_eq!(s.start_ticks, 123456);
        assert!(parse_stat("garbage").is_none());
        assert!(parse_stat("1 (x) S 1 2").is_none());
    }

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not() {
        let me = std::process::id();
        let s = proc_stat(me).unwrap();
        assert!(alive(me, s.start_ticks));
        assert!(!alive(me, s.start_ticks + 1));
        assert!(rss_bytes(me).unwrap() > 0);
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ms();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = monotonic_ms();
        assert!(b >= a + 20 && a > 0, "{a} {b}");
    }

    #[test]
    fn capacity_inputs() {
        assert_eq!(
            parse_meminfo_total_kib("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24_576_000)
        );
        assert_eq!(parse_meminfo_total_kib("nothing"), None);
        assert_eq!(memory_reserve_mib(2048), 1024);
        assert_eq!(memory_reserve_mib(24_000), 2400);
        assert!(host_cpus() >= 1);
        assert!(host_memory_mib().unwrap() > 0);
        assert!(free_disk_gib(Path::new("/")).is_ok());
    }
}
