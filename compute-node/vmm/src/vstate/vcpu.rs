//! vCPUs: creation and initial state (CPUID, MSRs, FPU, LAPIC, boot
//! registers on the boot vCPU; the others wait for INIT/SIPI in the in-kernel
//! LAPIC), one thread each running `KVM_RUN` and dispatching port and MMIO
//! exits to the devices, and the pause/resume/stop handshake.
//!
//! A vCPU is kicked out of `KVM_RUN` by a real-time signal; since a signal
//! that lands just before the thread enters `KVM_RUN` would be lost, the
//! kicker repeats it until the thread reports itself parked.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::arch::{cpuid, msr, regs};
use crate::devices::Devices;
use crate::devices::legacy::MachineRequest;
use crate::vstate::memory::GuestMemoryMmap;

/// Creating or configuring a vCPU failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateVcpuError {
    /// KVM refused to create it.
    #[error("KVM refused to create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// KVM refused its CPUID.
    #[error("KVM refused the CPUID of vCPU {0}")]
    Cpuid(u8, #[source] kvm_ioctls::Error),
    /// MSRs.
    #[error("cannot set the MSRs of vCPU {0}")]
    Msr(u8, #[source] msr::MsrError),
    /// Registers.
    #[error("cannot set the registers of vCPU {0}")]
    Regs(u8, #[source] regs::RegsError),
    /// Thread.
    #[error("cannot start the thread of vCPU {0}")]
    Thread(u8, #[source] std::io::Error),
    /// Kick signal.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// What a vCPU thread tells the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset (or triple-faulted).
    Reset,
    /// The vCPU cannot continue.
    Crash {
        /// Which vCPU.
        id: u8,
        /// Why.
        reason: String,
    },
}

/// Where vCPU threads report events.
pub type EventSink = Arc<dyn Fn(VcpuEvent) + Send + Sync>;

/// Requested run state of all vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    Run,
    Pause,
    Stop,
}

/// Work run on a parked vCPU's own thread (which owns its fd), e.g. saving
/// its state for a migration.
pub type VcpuJob = Box<dyn FnOnce(&VcpuFd) + Send>;

struct Shared {
    wanted: Mutex<Wanted>,
    jobs: Mutex<Vec<Option<VcpuJob>>>,
    changed: Condvar,
    parked: Mutex<Vec<bool>>,
    parked_changed: Condvar,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// Creates vCPU `id` of `count` and sets its state; the boot vCPU (id 0)
/// also gets `boot` registers.
pub fn create(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    id: u8,
    count: u8,
    base_cpuid: &CpuId,
    supported_msrs: &[u32],
    boot: Option<(regs::EntryMode, u64)>,
) -> Result<VcpuFd, CreateVcpuError> {
    let fd = vm
        .create_vcpu(u64::from(id))
        .map_err(|e| CreateVcpuError::Create(id, e))?;
    let mut cpuid = base_cpuid.clone();
    cpuid::filter(&mut cpuid, id, count);
    fd.set_cpuid2(&cpuid)
        .map_err(|e| CreateVcpuError::Cpuid(id, e))?;
    msr::setup(&fd, supported_msrs).map_err(|e| CreateVcpuError::Msr(id, e))?;
    regs::setup_fpu(&fd).map_err(|e| CreateVcpuError::Regs(id, e))?;
    regs::setup_lint(&fd).map_err(|e| CreateVcpuError::Regs(id, e))?;
    if let Some((mode, entry)) = boot {
        regs::setup_boot_regs(&fd, mem, mode, entry).map_err(|e| CreateVcpuError::Regs(id, e))?;
    }
    Ok(fd)
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The running vCPU threads of one boot.
#[derive(Debug)]
pub struct VcpuSet {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    tids: Vec<Arc<AtomicI32>>,
}

impl VcpuSet {
    /// Starts one thread per vCPU fd.
    pub fn start(
        fds: Vec<VcpuFd>,
        devices: Arc<Devices>,
        events: EventSink,
        start_paused: bool,
    ) -> Result<Self, CreateVcpuError> {
        register_signal_handler(SIGRTMIN(), kick_handler).map_err(CreateVcpuError::Signal)?;
        let shared = Arc::new(Shared {
            wanted: Mutex::new(if start_paused {
                Wanted::Pause
            } else {
                Wanted::Run
            }),
            changed: Condvar::new(),
            jobs: Mutex::new((0..fds.len()).map(|_| None).collect()),
            parked: Mutex::new(vec![false; fds.len()]),
            parked_changed: Condvar::new(),
        });
        let mut threads = Vec::with_capacity(fds.len());
        let mut tids = Vec::with_capacity(fds.len());
        for (i, fd) in fds.into_iter().enumerate() {
            let id = u8::try_from(i).unwrap_or(u8::MAX);
            let tid = Arc::new(AtomicI32::new(0));
            let ctx = VcpuThread {
                id,
                fd,
                devices: devices.clone(),
                events: events.clone(),
                shared: shared.clone(),
                tid: tid.clone(),
            };
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .stack_size(256 * 1024)
                .spawn(move || ctx.run())
                .map_err(|e| CreateVcpuError::Thread(id, e))?;
            threads.push(t);
            tids.push(tid);
        }
        Ok(Self {
            shared,
            threads,
            tids,
        })
    }

    /// Linux thread ids of the vCPU threads (0 until a thread has started).
    pub fn tids(&self) -> Vec<i32> {
        self.tids.iter().map(|t| t.load(Ordering::SeqCst)).collect()
    }

    fn set(&self, w: Wanted) {
        *self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner()) = w;
        self.shared.changed.notify_all();
    }

    /// Stops every vCPU at its next exit and waits until all are parked.
    pub fn pause(&self) {
        self.set(Wanted::Pause);
        self.kick_until(|parked, i, t| parked[i] || t.is_finished());
    }

    /// Runs `job(id)` on every vCPU's thread while they are paused (call
    /// [`Self::pause`] first) and returns the results in vCPU order; `None`
    /// for a vCPU whose thread has ended or did not answer within `timeout`.
    pub fn on_each_paused<T: Send + 'static>(
        &self,
        job: impl Fn(u8, &VcpuFd) -> T + Send + Sync + 'static,
        timeout: Duration,
    ) -> Vec<Option<T>> {
        let job = Arc::new(job);
        let mut rxs = Vec::with_capacity(self.threads.len());
        {
            let mut jobs = self.shared.jobs.lock().unwrap_or_else(|e| e.into_inner());
            for (i, slot) in jobs.iter_mut().enumerate() {
                let (tx, rx) = std::sync::mpsc::channel();
                let job = job.clone();
                let id = u8::try_from(i).unwrap_or(u8::MAX);
                *slot = Some(Box::new(move |fd: &VcpuFd| {
                    let _ = tx.send(job(id, fd));
                }));
                rxs.push(rx);
            }
        }
        // Parked threads wait on `wanted`: wake them under its lock so none
        // misses the notification.
        {
            let _w = self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.changed.notify_all();
        }
        let deadline = std::time::Instant::now() + timeout;
        rxs.into_iter()
            .map(|rx| {
                rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                    .ok()
            })
            .collect()
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.set(Wanted::Run);
    }

    fn kick_until(&self, done: impl Fn(&[bool], usize, &JoinHandle<()>) -> bool) {
        let mut parked = self.shared.parked.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut all = true;
            for (i, t) in self.threads.iter().enumerate() {
                if !done(&parked, i, t) {
                    all = false;
                    // Repeated until acknowledged: see the module doc.
                    let _ = t.kill(SIGRTMIN());
                }
            }
            if all {
                return;
            }
            parked = self
                .shared
                .parked_changed
                .wait_timeout(parked, Duration::from_millis(2))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(self) {
        self.set(Wanted::Stop);
        self.kick_until(|_, _, t| t.is_finished());
        for t in self.threads {
            let _ = t.join();
        }
    }
}

#[allow(missing_debug_implementations)]
struct VcpuThread {
    id: u8,
    fd: VcpuFd,
    devices: Arc<Devices>,
    events: EventSink,
    shared: Arc<Shared>,
    tid: Arc<AtomicI32>,
}

enum Step {
    Continue,
    Exit(Option<VcpuEvent>),
}

impl VcpuThread {
    fn run(mut self) {
        crate::sandbox::seccomp::install_or_exit(crate::sandbox::seccomp::ThreadKind::Vcpu);
        // SAFETY: gettid has no preconditions.
        self.tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
        loop {
            if !self.wait_until_runnable() {
                return;
            }
            match self.step() {
                Step::Continue => {}
                Step::Exit(event) => {
                    if let Some(e) = event {
                        (self.events)(e);
                    }
                    // Park until the VM stops this boot.
                    self.set_parked(true);
                    let mut w = self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
                    while *w != Wanted::Stop {
                        w = self
                            .shared
                            .changed
                            .wait(w)
                            .unwrap_or_else(|e| e.into_inner());
                    }
                    return;
                }
            }
        }
    }

    fn set_parked(&self, v: bool) {
        let mut parked = self.shared.parked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = parked.get_mut(usize::from(self.id)) {
            *p = v;
        }
        self.shared.parked_changed.notify_all();
    }

    fn take_job(&self) -> Option<VcpuJob> {
        self.shared
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(usize::from(self.id))
            .and_then(Option::take)
    }

    /// Blocks while paused (running jobs handed to it meanwhile); false
    /// when asked to stop.
    fn wait_until_runnable(&self) -> bool {
        let mut w = self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
        if *w == Wanted::Run {
            return true;
        }
        drop(w);
        self.set_parked(true);
        w = self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
        while *w == Wanted::Pause {
            if let Some(job) = self.take_job() {
                drop(w);
                job(&self.fd);
                w = self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
                continue;
            }
            w = self
                .shared
                .changed
                .wait(w)
                .unwrap_or_else(|e| e.into_inner());
        }
        let run = *w == Wanted::Run;
        drop(w);
        self.set_parked(false);
        run
    }

    /// A one-line register summary for diagnostics.
    fn describe(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                r.rip, r.rsp, s.cr0, s.cr3, s.cr4, s.efer, s.cs.selector
            ),
            _ => "registers unavailable".into(),
        }
    }

    fn step(&mut self) -> Step {
        let id = self.id;
        let crash = |reason: String| Step::Exit(Some(VcpuEvent::Crash { id, reason }));
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                self.devices.pio_read(port, data);
                Step::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => match self.devices.pio_write(port, data) {
                MachineRequest::None => Step::Continue,
                MachineRequest::PowerOff => Step::Exit(Some(VcpuEvent::PowerOff)),
                MachineRequest::Reset => Step::Exit(Some(VcpuEvent::Reset)),
            },
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.devices.mmio_read(addr, data);
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.devices.mmio_write(addr, data);
                Step::Continue
            }
            Ok(VcpuExit::Shutdown) => {
                // A triple fault: worth a line on stderr, it is usually a
                // guest bug the operator wants to see.
                eprintln!(
                    "neph-vmm: vCPU {id} triple-faulted ({}); resetting",
                    self.describe()
                );
                Step::Exit(Some(VcpuEvent::Reset))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Step::Exit(Some(VcpuEvent::PowerOff)),
                KVM_SYSTEM_EVENT_RESET => Step::Exit(Some(VcpuEvent::Reset)),
                other => crash(format!("unexpected system event {other}")),
            },
            // With the in-kernel LAPIC, HLT does not exit; if it does, the
            // next KVM_RUN waits for an interrupt.
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => Step::Continue,
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                let regs = self.describe();
                crash(format!(
                    "VM entry failed (hardware reason {reason:#x}, cpu {cpu}; {regs})"
                ))
            }
            Ok(VcpuExit::InternalError) => {
                let regs = self.describe();
                crash(format!(
                    "KVM internal error, e.g. an instruction its emulator cannot run ({regs})"
                ))
            }
            Ok(other) => {
                let what = format!("{other:?}");
                let regs = self.describe();
                crash(format!("unhandled exit {what} ({regs})"))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Continue,
            Err(e) => crash(format!("KVM_RUN failed: {e}")),
        }
    }
}
