//! A running VM: the run loop that owns the current boot, turns vCPU events
//! into poweroff (process exit 0), reboot (a fresh boot in the same process)
//! or a crash, and answers control requests ([`crate::api`]) through a
//! [`VmHandle`].

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;

use crate::api::{Metrics, NamedDeviceMetrics, Request, Response, RunState, Status, VcpuMetrics};
use crate::builder::{Backends, Boot, DeviceKind, StartVmError, create_boot};
use crate::config::VmConfig;
use crate::devices::serial::Console;
use crate::probe::KvmCaps;
use crate::vstate::vcpu::VcpuEvent;

/// Default grace period of a `shutdown` request.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a control request waits for the run loop.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    PoweredOff,
    /// Stopped by a `stop` request.
    Stopped,
    /// A `shutdown` request's grace period ended first.
    ShutdownTimedOut,
}

/// Running the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum RunVmError {
    /// Starting a boot (the first or after a reboot) failed.
    #[error("cannot start the guest")]
    Start(#[from] StartVmError),
    /// A vCPU could not continue.
    #[error("vCPU {id} stopped: {reason}")]
    Crash {
        /// vCPU index.
        id: u8,
        /// Why.
        reason: String,
    },
}

enum Message {
    Vcpu(u64, VcpuEvent),
    Request(Request, Sender<Response>),
}

/// Sends control requests to a VM's run loop (cheap to clone).
#[derive(Debug, Clone)]
pub struct VmHandle {
    tx: Sender<Message>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Vcpu(g, e) => write!(f, "Vcpu({g}, {e:?})"),
            Self::Request(r, _) => write!(f, "Request({r:?})"),
        }
    }
}

impl VmHandle {
    /// Sends `req` and waits for the answer.
    pub fn request(&self, req: Request) -> Response {
        let (tx, rx) = channel();
        if self.tx.send(Message::Request(req, tx)).is_err() {
            return Response::error("UNAVAILABLE", "the VM has stopped");
        }
        rx.recv_timeout(REQUEST_TIMEOUT)
            .unwrap_or_else(|_| Response::error("UNAVAILABLE", "the VM did not answer"))
    }
}

/// A VM: its configuration, opened backends, and current boot.
pub struct Vm {
    config: VmConfig,
    kvm: Kvm,
    caps: KvmCaps,
    console: Arc<Console>,
    backends: Backends,
    boot: Option<Boot>,
    tx: Sender<Message>,
    rx: Receiver<Message>,
    generation: u64,
    started: Instant,
    paused: bool,
    shutdown_deadline: Option<Instant>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Vm {
    pub(crate) fn new(
        config: VmConfig,
        kvm: Kvm,
        caps: KvmCaps,
        console: Arc<Console>,
        backends: Backends,
        boot: Boot,
    ) -> Self {
        let (tx, rx) = channel();
        Self {
            config,
            kvm,
            caps,
            console,
            backends,
            boot: Some(boot),
            tx,
            rx,
            generation: 0,
            started: Instant::now(),
            paused: false,
            shutdown_deadline: None,
        }
    }

    /// A handle for control requests.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            tx: self.tx.clone(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    fn start_boot(&mut self) -> Result<(), StartVmError> {
        let tx = self.tx.clone();
        let generation = self.generation;
        let sink = Arc::new(move |e| {
            let _ = tx.send(Message::Vcpu(generation, e));
        });
        if let Some(b) = self.boot.as_mut() {
            b.start(sink)?;
        }
        Ok(())
    }

    fn stop_boot(&mut self) {
        if let Some(b) = self.boot.take() {
            b.stop();
        }
    }

    /// Runs the guest until it powers off or is stopped; reboots happen
    /// inside.
    pub fn run(mut self) -> Result<VmExit, RunVmError> {
        self.started = Instant::now();
        if let Err(e) = self.start_boot() {
            self.stop_boot();
            return Err(e.into());
        }
        loop {
            let msg = match self.shutdown_deadline {
                Some(d) => match self
                    .rx
                    .recv_timeout(d.saturating_duration_since(Instant::now()))
                {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        self.stop_boot();
                        return Ok(VmExit::ShutdownTimedOut);
                    }
                    Err(RecvTimeoutError::Disconnected) => unreachable_disconnect(),
                },
                // `self.tx` keeps the channel open.
                None => match self.rx.recv() {
                    Ok(m) => m,
                    Err(_) => unreachable_disconnect(),
                },
            };
            match msg {
                Message::Vcpu(g, _) if g != self.generation => {}
                Message::Vcpu(_, VcpuEvent::PowerOff) => {
                    self.stop_boot();
                    return Ok(VmExit::PoweredOff);
                }
                Message::Vcpu(_, VcpuEvent::Reset) => {
                    self.stop_boot();
                    self.generation += 1;
                    self.paused = false;
                    let boot = create_boot(
                        &self.config,
                        &self.kvm,
                        &self.caps,
                        &self.backends,
                        &self.console,
                    )?;
                    self.boot = Some(boot);
                    if let Err(e) = self.start_boot() {
                        self.stop_boot();
                        return Err(e.into());
                    }
                }
                Message::Vcpu(_, VcpuEvent::Crash { id, reason }) => {
                    self.stop_boot();
                    return Err(RunVmError::Crash { id, reason });
                }
                Message::Request(req, reply) => {
                    let (response, exit) = self.handle_request(req);
                    let _ = reply.send(response);
                    if let Some(exit) = exit {
                        self.stop_boot();
                        return Ok(exit);
                    }
                }
            }
        }
    }

    fn handle_request(&mut self, req: Request) -> (Response, Option<VmExit>) {
        let Some(boot) = self.boot.as_ref() else {
            return (
                Response::error("UNAVAILABLE", "the VM is between boots"),
                None,
            );
        };
        match req {
            Request::Status => {
                let mut r = Response::ok();
                r.status = Some(self.status());
                (r, None)
            }
            Request::Pause if self.paused => (
                Response::error("INVALID_STATE", "the VM is already paused"),
                None,
            ),
            Request::Pause => {
                boot.pause();
                self.paused = true;
                (Response::ok(), None)
            }
            Request::Resume if !self.paused => (
                Response::error("INVALID_STATE", "the VM is not paused"),
                None,
            ),
            Request::Resume => {
                boot.resume();
                self.paused = false;
                (Response::ok(), None)
            }
            Request::Shutdown { timeout_ms } => {
                if self.paused {
                    boot.resume();
                    self.paused = false;
                }
                boot.devices.legacy.press_power_button();
                let timeout = timeout_ms.map_or(DEFAULT_SHUTDOWN_TIMEOUT, Duration::from_millis);
                let deadline = Instant::now() + timeout;
                self.shutdown_deadline = Some(match self.shutdown_deadline {
                    Some(d) => d.min(deadline),
                    None => deadline,
                });
                (Response::ok(), None)
            }
            Request::Stop => (Response::ok(), Some(VmExit::Stopped)),
            Request::Metrics => {
                let mut r = Response::ok();
                r.metrics = Some(self.metrics(boot));
                (r, None)
            }
        }
    }

    fn status(&self) -> Status {
        Status {
            state: if self.shutdown_deadline.is_some() {
                RunState::ShuttingDown
            } else if self.paused {
                RunState::Paused
            } else {
                RunState::Running
            },
            boots: self.generation + 1,
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            pid: std::process::id(),
        }
    }

    fn metrics(&self, boot: &Boot) -> Metrics {
        let tids = boot.vcpus.as_ref().map(|v| v.tids()).unwrap_or_default();
        let vcpus = tids
            .iter()
            .enumerate()
            .map(|(i, &tid)| {
                let (user_ms, system_ms) = thread_cpu_ms(tid).unwrap_or((0, 0));
                VcpuMetrics {
                    id: u8::try_from(i).unwrap_or(u8::MAX),
                    tid,
                    user_ms,
                    system_ms,
                }
            })
            .collect();
        let mut disks = Vec::new();
        let mut nets = Vec::new();
        for (dev, kind, backend) in &boot.virtio {
            let d = dev.lock().unwrap_or_else(|e| e.into_inner());
            let m = NamedDeviceMetrics {
                name: d.name().to_owned(),
                backend: backend.clone(),
                counters: d.metrics(),
            };
            match kind {
                DeviceKind::Block => disks.push(m),
                DeviceKind::Net => nets.push(m),
                DeviceKind::Rng => {}
            }
        }
        Metrics {
            vcpus,
            rss_bytes: rss_bytes().unwrap_or(0),
            guest_memory_bytes: self.config.memory_bytes(),
            console_bytes: self.console.bytes_out(),
            disks,
            nets,
        }
    }
}

fn unreachable_disconnect() -> ! {
    // The VM holds a sender of its own channel, so it never disconnects.
    unreachable!("the VM's own channel cannot disconnect")
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// User and system CPU time of thread `tid` of this process, in ms.
fn thread_cpu_ms(tid: i32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = clock_ticks_per_sec();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime * 1000 / ticks, stime * 1000 / ticks))
}

/// Resident set size of this process.
pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).unwrap_or(4096))
}
