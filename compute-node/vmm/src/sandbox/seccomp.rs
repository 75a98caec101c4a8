//! Per-thread seccomp filters (seccompiler: the BPF is built here, in
//! Rust, no libseccomp).
//!
//! Each thread of the VMM installs the filter of its [`ThreadKind`] when it
//! starts ([`install`]), so a thread that a hostile guest subverts can make
//! only the system calls that kind of thread needs. The lists below say
//! why each call is there; they were derived by running the test guest's
//! workloads (boot, disk, net, reboot, pause, migration: the tests in
//! `integration-tests/tests/{test_guest,migration,sandbox}.rs`) under
//! `--seccomp log`, which allows everything but has the kernel log each
//! call that is not on the thread's list (`dmesg`: `audit: type=1326 ...
//! comm="vcpu0" ... syscall=N`).
//!
//! Filters stack: a thread spawned by a filtered thread keeps its parent's
//! filter and adds its own, so it can do only what both allow. The run loop
//! (main thread, [`ThreadKind::Vmm`]) starts vCPU and device threads again
//! on every reboot and the migration threads on `migrate`, so its list is
//! the broadest: its own needs plus everything its children need before
//! they narrow themselves.
//!
//! In `enforce` mode (the binary's default) a call off the list raises
//! `SIGSYS`; [`on_sigsys`] writes which thread made which call to stderr
//! (the VMM log the agent keeps) and ends the whole process with
//! [`EXIT_BAD_SYSCALL`]. No filter lets a thread install a `SIGSYS`
//! handler, so a subverted thread cannot catch its own violation; if
//! `SIGSYS` is blocked the kernel kills the process anyway.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit status of a VMM killed by its filter (128 + SIGSYS, as a shell
/// shows a process killed by that signal).
pub const EXIT_BAD_SYSCALL: i32 = 128 + libc::SIGSYS;

/// What the filters do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// No filters (the library's default, for tests that drive it in
    /// process).
    #[default]
    Off,
    /// Allow every call, have the kernel log the ones off the list (how
    /// the lists are derived).
    Log,
    /// Calls off the list kill the process (the binary's default).
    Enforce,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "log" => Ok(Self::Log),
            "enforce" => Ok(Self::Enforce),
            other => Err(format!(
                "unknown seccomp mode {other:?}: use off, log or enforce"
            )),
        }
    }
}

static MODE: AtomicU8 = AtomicU8::new(0);

/// Sets the mode for every thread started from now on (call once, first
/// thing in `main`). Enforce also installs the `SIGSYS` reporter.
pub fn set_mode(mode: SeccompMode) -> std::io::Result<()> {
    if mode == SeccompMode::Enforce {
        install_sigsys_handler()?;
    }
    MODE.store(mode as u8, Ordering::SeqCst);
    Ok(())
}

/// Most malloc arenas glibc creates. Set before any filter is installed:
/// without a limit, glibc computes one the first time a process needs more
/// than eight arenas (a ninth thread allocating at once, e.g. a migration's
/// extra memory streams) by reading `/sys/devices/system/cpu/online`, an
/// `openat` that no thread's filter allows, so the VMM died by SIGSYS
/// depending on how its threads happened to overlap.
const MALLOC_ARENA_MAX: libc::c_int = 8;

/// Prepares the process for filters: fixes glibc's arena limit (see
/// [`MALLOC_ARENA_MAX`]) so the allocator never reads a file later. Call
/// once, before the first [`install`].
pub fn prepare_process() {
    // SAFETY: mallopt only sets an allocator parameter; it is called before
    // the VMM starts its threads, and a refusal (0) leaves glibc's default.
    let set = unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENA_MAX) };
    if set == 0 {
        eprintln!("neph-vmm: warning: cannot limit malloc arenas; a busy VMM may hit its filter");
    }
}

/// The mode set by [`set_mode`].
pub fn mode() -> SeccompMode {
    match MODE.load(Ordering::SeqCst) {
        1 => SeccompMode::Log,
        2 => SeccompMode::Enforce,
        _ => SeccompMode::Off,
    }
}

static PROBE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Allows the control socket's `seccomp_probe` request (`--seccomp-probe`,
/// for tests).
pub fn enable_probe() {
    PROBE.store(true, Ordering::SeqCst);
}

/// Whether [`enable_probe`] was called.
pub fn probe_enabled() -> bool {
    PROBE.load(Ordering::SeqCst)
}

/// Makes a system call no filter allows (`execve` with null arguments,
/// which fails with EFAULT if it is let through) and returns its errno.
pub fn forbidden_call() -> i32 {
    // SAFETY: execve with a null path never reads memory: the kernel
    // fails it with EFAULT (or the filter stops it first).
    let r = unsafe {
        libc::syscall(
            libc::SYS_execve,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<*const libc::c_char>(),
            std::ptr::null::<*const libc::c_char>(),
        )
    };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }
}

/// The kinds of VMM thread, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: the run loop, reboots, control requests, the
    /// migration target's receive.
    Vmm,
    /// A vCPU thread (`vcpuN`): `KVM_RUN` and the exits it handles
    /// (port and MMIO devices, the serial console, inline virtio work).
    Vcpu,
    /// The virtio event loop (`devices`): queue work on disks and taps.
    Devices,
    /// The control socket (`api`, `api-client`).
    Api,
    /// The console socket and stdin (`console`, `console-in`, `stdin`).
    Console,
    /// The migration source (`migration`, `mig-throttle`, stream senders)
    /// and the target's extra stream readers (`mig-streamN`).
    Migration,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [Self; 6] = [
        Self::Vmm,
        Self::Vcpu,
        Self::Devices,
        Self::Api,
        Self::Console,
        Self::Migration,
    ];

    /// Name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vmm => "vmm",
            Self::Vcpu => "vcpu",
            Self::Devices => "devices",
            Self::Api => "api",
            Self::Console => "console",
            Self::Migration => "migration",
        }
    }
}

/// Installing a filter failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallFilterError {
    /// The rules did not compile (a bug in this file).
    #[error("the {0} thread's seccomp filter does not compile")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    /// The kernel refused it.
    #[error("the kernel refused the {0} thread's seccomp filter")]
    Apply(&'static str, #[source] seccompiler::Error),
}

thread_local! {
    /// The calling thread's kind, for the SIGSYS report (const-initialized:
    /// reading it allocates nothing, so it is safe in a signal handler).
    static KIND: Cell<&'static str> = const { Cell::new("unfiltered") };
}

/// Installs `kind`'s filter on the calling thread in the current mode
/// (nothing when off).
pub fn install(kind: ThreadKind) -> Result<(), InstallFilterError> {
    let action = match mode() {
        SeccompMode::Off => return Ok(()),
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Enforce => SeccompAction::Trap,
    };
    let program = compile(kind, action)?;
    KIND.with(|k| k.set(kind.name()));
    seccompiler::apply_filter(&program).map_err(|e| InstallFilterError::Apply(kind.name(), e))
}

/// Installs `kind`'s filter and, if that fails while enforcing, ends the
/// process: a thread must never run unfiltered by mistake.
pub fn install_or_exit(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        let msg = crate::migration::source::error_chain(&e);
        if mode() == SeccompMode::Enforce {
            eprintln!("neph-vmm: {msg}; refusing to run without it");
            std::process::exit(1);
        }
        eprintln!("neph-vmm: warning: {msg}");
    }
}

/// Builds `kind`'s filter with `mismatch` for calls off the list.
pub fn compile(
    kind: ThreadKind,
    mismatch: SeccompAction,
) -> Result<BpfProgram, InstallFilterError> {
    let list = allowed(kind);
    // A call allowed without conditions anywhere is allowed outright (an
    // empty rule list); otherwise each entry is one alternative.
    let always: std::collections::BTreeSet<i64> = list
        .iter()
        .filter(|(_, c)| c.is_empty())
        .map(|(nr, _)| *nr)
        .collect();
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, conds) in list {
        let entry = rules.entry(nr).or_default();
        if !always.contains(&nr) {
            entry.push(
                SeccompRule::new(conds).map_err(|e| InstallFilterError::Compile(kind.name(), e))?,
            );
        }
    }
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .and_then(BpfProgram::try_from)
        .map_err(|e| InstallFilterError::Compile(kind.name(), e))
}

type Allowed = Vec<(i64, Vec<SeccompCondition>)>;

fn any(list: &mut Allowed, calls: &[libc::c_long]) {
    list.extend(calls.iter().map(|&c| (c, Vec::new())));
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    #[allow(clippy::expect_used)] // arguments 0..=5 are always valid
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).expect("valid argument index")
}

/// Calls every thread needs.
fn common(list: &mut Allowed) {
    any(
        list,
        &[
            // Memory allocator (heap growth, large buffers, trimming).
            libc::SYS_brk,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_mprotect,
            // Mutexes, condvars, channels, thread joins.
            libc::SYS_futex,
            libc::SYS_sched_yield,
            // Console output, eventfds, sockets, error messages.
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            // Timeouts and sleeps (clock_gettime is the vDSO; this is its
            // fallback).
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            // A thread's end: std frees its alternate signal stack, glibc
            // its stack and robust list; exit_group ends the process (also
            // how the SIGSYS reporter exits).
            libc::SYS_sigaltstack,
            libc::SYS_exit,
            libc::SYS_exit_group,
            // Returning from the vCPU kick signal (SIGRTMIN) handler.
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            // Thread and process ids for messages and nice values.
            libc::SYS_gettid,
            libc::SYS_getpid,
            // std's per-thread hash map keys; the rng device's entropy.
            libc::SYS_getrandom,
            // The privilege drop: glibc makes every thread change its own
            // credentials (it signals each to make these calls). Once the
            // ids are unprivileged these can only pick among them.
            libc::SYS_setresuid,
            libc::SYS_setresgid,
            libc::SYS_setgroups,
        ],
    );
}

/// What starting a thread takes (glibc's pthread_create and std's thread
/// start, both in the parent and in the child before its own filter).
fn spawn(list: &mut Allowed) {
    any(
        list,
        &[
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_sched_getaffinity,
            // A new thread narrows itself with its own filter.
            libc::SYS_seccomp,
        ],
    );
    // std names the thread (PR_SET_NAME); seccompiler sets no_new_privs
    // before installing a filter. No other prctl.
    list.push((
        libc::SYS_prctl,
        vec![cond(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)],
    ));
    list.push((
        libc::SYS_prctl,
        vec![cond(0, SeccompCmpOp::Eq, libc::PR_SET_NO_NEW_PRIVS as u64)],
    ));
}

/// Disk and tap I/O (virtio-blk and virtio-net request handling).
fn device_io(list: &mut Allowed) {
    any(
        list,
        &[
            // Disk reads and writes at an offset, scatter-gather.
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_lseek,
            // virtio-blk FLUSH.
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            // Tap frames in and out.
            libc::SYS_readv,
            // Duplicating a disk or tap descriptor when the guest
            // activates a device (File::try_clone: F_DUPFD_CLOEXEC).
            libc::SYS_fcntl,
        ],
    );
}

/// The migration stream (TCP) and dirty logging.
fn migration(list: &mut Allowed) {
    any(
        list,
        &[
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_shutdown,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_fcntl,
            // KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG on the VM fd.
            libc::SYS_ioctl,
            // Disk copy: the source opens each disk again to read it,
            // for its size and contents.
            libc::SYS_openat,
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_newfstatat,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_lseek,
            libc::SYS_fdatasync,
            // The migration thread lowers its own nice value.
            libc::SYS_getpriority,
            libc::SYS_setpriority,
        ],
    );
}

/// `kind`'s allow-list: syscall number, and conditions on its arguments
/// (all must hold; a call listed twice is allowed if either entry holds;
/// no conditions: always).
pub fn allowed(kind: ThreadKind) -> Allowed {
    let mut l = Allowed::new();
    common(&mut l);
    match kind {
        ThreadKind::Vcpu => {
            // KVM_RUN and the register/state ioctls of its exits and of
            // migration's state capture (run on the paused vCPU's thread);
            // KVM_IRQ_LINE / KVM_SIGNAL_MSI when a device raises an
            // interrupt from an MMIO exit.
            any(&mut l, &[libc::SYS_ioctl]);
            // Serial output to console socket clients (std writes to a
            // Unix stream with send(MSG_NOSIGNAL)).
            any(&mut l, &[libc::SYS_sendto]);
            // Virtio work done inline when ioeventfd is missing.
            device_io(&mut l);
        }
        ThreadKind::Devices => {
            any(
                &mut l,
                &[
                    // The event loop itself.
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_epoll_ctl,
                    // Interrupt injection without irqfd (KVM_IRQ_LINE) and
                    // tap offload settings.
                    libc::SYS_ioctl,
                ],
            );
            device_io(&mut l);
        }
        ThreadKind::Api | ThreadKind::Console => {
            // Clients of the socket, each on its own thread.
            spawn(&mut l);
            any(
                &mut l,
                &[
                    libc::SYS_accept4,
                    libc::SYS_accept,
                    libc::SYS_recvfrom,
                    libc::SYS_sendto,
                    libc::SYS_fcntl,
                    // UnixStream::try_clone.
                    libc::SYS_dup,
                    libc::SYS_dup3,
                    libc::SYS_poll,
                ],
            );
        }
        ThreadKind::Migration => {
            // Throttle thread and parallel stream senders.
            spawn(&mut l);
            migration(&mut l);
        }
        ThreadKind::Vmm => {
            spawn(&mut l);
            migration(&mut l);
            device_io(&mut l);
            any(
                &mut l,
                &[
                    // A reboot reads the kernel and initrd again.
                    libc::SYS_open,
                    libc::SYS_openat,
                    libc::SYS_fstat,
                    libc::SYS_statx,
                    libc::SYS_newfstatat,
                    libc::SYS_readlink,
                    // The lock a disk is opened with (a migration target's
                    // VM built when the source connects).
                    libc::SYS_flock,
                    // ... builds a new KVM VM, vCPUs, irqfds, eventfds,
                    // memory slots, and the device event loop.
                    libc::SYS_eventfd2,
                    libc::SYS_epoll_create1,
                    libc::SYS_epoll_ctl,
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_dup,
                    libc::SYS_dup3,
                    libc::SYS_memfd_create,
                    libc::SYS_ftruncate,
                    // Kicking vCPUs out of KVM_RUN (SIGRTMIN to a thread).
                    libc::SYS_tgkill,
                    // The migration target's listener.
                    libc::SYS_bind,
                    libc::SYS_listen,
                    libc::SYS_accept4,
                    libc::SYS_accept,
                    // The socket files removed at exit.
                    libc::SYS_unlink,
                    libc::SYS_unlinkat,
                    // Host memory check of a rebuilt target VM.
                    libc::SYS_sysinfo,
                ],
            );
            // The vCPU kick handler is registered again for every boot:
            // any signal but SIGSYS, whose reporter nobody may replace.
            l.push((
                libc::SYS_rt_sigaction,
                vec![cond(0, SeccompCmpOp::Ne, libc::SIGSYS as u64)],
            ));
        }
    }
    l
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid value (no flags, empty mask);
    // the fields that matter are set below.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler that only reads the siginfo it is given
    // and a const-initialized thread local, and makes the async-signal-safe
    // calls write(2) and _exit(2).
    let r = unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The SIGSYS fields of a `siginfo_t` on x86_64 (`_sigsys` in the kernel's
/// union: after signo, errno, code and padding, the address of the call,
/// the syscall number and the audit arch).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: usize,
    syscall: i32,
    arch: u32,
}

/// `si_code` of a seccomp trap.
const SYS_SECCOMP: i32 = 1;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers;
    // SigsysInfo describes its layout for SIGSYS on x86_64 and is no
    // larger than siginfo_t (128 bytes).
    let si = unsafe { &*info.cast::<SigsysInfo>() };
    let kind = KIND.with(Cell::get);
    let mut buf = [0u8; 256];
    let mut n = 0;
    let mut put = |s: &[u8]| {
        for &b in s {
            if n < buf.len() {
                buf[n] = b;
                n += 1;
            }
        }
    };
    put(b"neph-vmm: the ");
    put(kind.as_bytes());
    put(b" thread made system call ");
    let mut digits = [0u8; 12];
    let mut d = digits.len();
    let mut v = if si.code == SYS_SECCOMP {
        si.syscall.unsigned_abs()
    } else {
        0
    };
    loop {
        d -= 1;
        digits[d] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 || d == 0 {
            break;
        }
    }
    put(&digits[d..]);
    put(b", which its seccomp filter forbids: the VMM stops (a bug, or a guest escaping)\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; buf is valid
    // for n bytes.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        libc::_exit(EXIT_BAD_SYSCALL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles() {
        for kind in ThreadKind::ALL {
            compile(kind, SeccompAction::Trap).unwrap();
            compile(kind, SeccompAction::Log).unwrap();
        }
    }

    #[test]
    fn no_kind_may_exec_or_replace_the_sigsys_reporter() {
        for kind in ThreadKind::ALL {
            let list = allowed(kind);
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_setuid,
                libc::SYS_capset,
                libc::SYS_mount,
                libc::SYS_process_vm_writev,
            ] {
                assert!(
                    list.iter().all(|(nr, _)| *nr != forbidden),
                    "{} allows {forbidden}",
                    kind.name()
                );
            }
            for (nr, conds) in &list {
                if *nr == libc::SYS_rt_sigaction {
                    assert!(!conds.is_empty(), "{} may replace SIGSYS", kind.name());
                }
            }
        }
    }

    /// Runs `body` in a forked child under `kind`'s enforcing filter and
    /// returns its exit status.
    fn in_filtered_child(kind: ThreadKind, body: fn()) -> i32 {
        // Compiled before the fork: the child only makes async-signal-safe
        // calls (prctl, seccomp, sigaction, the body, _exit).
        let program = compile(kind, SeccompAction::Trap).unwrap();
        // SAFETY: fork has no preconditions; the child below allocates
        // nothing and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            if install_sigsys_handler().is_err() || seccompiler::apply_filter(&program).is_err() {
                // SAFETY: ends the child.
                unsafe { libc::_exit(2) };
            }
            KIND.with(|k| k.set(kind.name()));
            body();
            // SAFETY: ends the child.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        assert!(libc::WIFEXITED(status), "child ended by a signal: {status}");
        libc::WEXITSTATUS(status)
    }

    #[test]
    fn a_forbidden_call_stops_every_kind_of_thread() {
        for kind in ThreadKind::ALL {
            let status = in_filtered_child(kind, || {
                forbidden_call();
            });
            assert_eq!(status, EXIT_BAD_SYSCALL, "{}", kind.name());
        }
    }

    #[test]
    fn allowed_calls_go_through_and_socket_is_refused_to_vcpus() {
        for kind in ThreadKind::ALL {
            let status = in_filtered_child(kind, || {
                // SAFETY: calls without memory arguments.
                unsafe {
                    libc::getpid();
                    libc::sched_yield();
                }
            });
            assert_eq!(status, 0, "{}", kind.name());
        }
        // A vCPU cannot open a network connection.
        let status = in_filtered_child(ThreadKind::Vcpu, || {
            // SAFETY: integer arguments only.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        });
        assert_eq!(status, EXIT_BAD_SYSCALL);
    }

    #[test]
    fn modes_parse() {
        assert_eq!("enforce".parse::<SeccompMode>(), Ok(SeccompMode::Enforce));
        assert_eq!("log".parse::<SeccompMode>(), Ok(SeccompMode::Log));
        assert_eq!("off".parse::<SeccompMode>(), Ok(SeccompMode::Off));
        assert!("strict".parse::<SeccompMode>().is_err());
    }
}
