//! A running VM: the run loop that owns the current boot, turns vCPU events
//! into poweroff (process exit 0), reboot (a fresh boot in the same process)
//! or a crash, and answers control requests ([`crate::api`]) through a
//! [`VmHandle`].
//!
//! # Fencing lease
//!
//! The node agent hands the VM a deadline (`lease`, a `CLOCK_MONOTONIC`
//! time in ms, see [`monotonic_ms`]) and renews it while the controllers
//! acknowledge the node. When a deadline passes without renewal the run
//! loop pauses every vCPU and marks the VM fenced (any running migration is
//! cancelled first): the controllers may restart the instance elsewhere
//! after that, so this copy must not run. Renewing the lease does not
//! resume a fenced VM; the agent decides (`resume` with a valid lease, or
//! `stop`).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;

use crate::api::{
    Metrics, NamedDeviceMetrics, ProbeThread, Request, Response, RunState, Status, VcpuMetrics,
};
use crate::builder::{Backends, Boot, DeviceKind, StartVmError, create_boot};
use crate::config::VmConfig;
use crate::devices::serial::Console;
use crate::migration::protocol::MigrationConfig;
use crate::migration::source::{
    self, MigrateParams, SourceContext, SourceDisk, Stopped, VmControl,
};
use crate::migration::state::{self, DevicesState, MachineState, STATE_VERSION, SaveCaps};
use crate::migration::{AlwaysSwitch, SwitchoverGate};
use crate::probe::KvmCaps;
use crate::vstate::vcpu::VcpuEvent;

/// Default grace period of a `shutdown` request.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a migrated source still answers `migrate_status`.
const MIGRATED_LINGER: Duration = Duration::from_millis(200);
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
    /// The VM was live-migrated away; it runs on the target now.
    Migrated,
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
    Migration(u64, MigrationOp),
}

/// What the migration thread asks of the run loop (for the boot it
/// started on: a reboot in between makes every op fail or do nothing).
enum MigrationOp {
    /// Pause (true) or resume; a pause answers once the vCPUs are parked.
    Throttle(bool, Option<Sender<()>>),
    StopAndSave(Sender<Result<Stopped, String>>),
    Rollback,
    Finish,
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
            Self::Migration(g, _) => write!(f, "Migration({g})"),
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
    /// The fencing lease: the vCPUs may run until then.
    lease: Option<Lease>,
    /// Paused because the lease ran out; cleared only by `resume`.
    fenced: bool,
    migration: Option<Arc<source::Shared>>,
    gate: Arc<dyn SwitchoverGate>,
    throttled: bool,
}

/// The run loop as the migration thread sees it.
struct RunLoopControl {
    tx: Sender<Message>,
    generation: u64,
}

impl VmControl for RunLoopControl {
    fn throttle(&self, pause: bool) {
        // A pause is waited for (the throttle times the run share from
        // when the vCPUs are really parked); a resume is not.
        let (tx, rx) = channel();
        let sent = self.tx.send(Message::Migration(
            self.generation,
            MigrationOp::Throttle(pause, pause.then_some(tx)),
        ));
        if pause && sent.is_ok() {
            let _ = rx.recv_timeout(REQUEST_TIMEOUT);
        }
    }
    fn stop_and_save(&self) -> Result<Stopped, String> {
        let (tx, rx) = channel();
        self.tx
            .send(Message::Migration(
                self.generation,
                MigrationOp::StopAndSave(tx),
            ))
            .map_err(|_| "the VM has stopped".to_owned())?;
        rx.recv_timeout(REQUEST_TIMEOUT)
            .map_err(|_| "the VM did not answer".to_owned())?
    }
    fn rollback(&self) {
        let _ = self
            .tx
            .send(Message::Migration(self.generation, MigrationOp::Rollback));
    }
    fn finish(&self) {
        let _ = self
            .tx
            .send(Message::Migration(self.generation, MigrationOp::Finish));
    }
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
            lease: None,
            fenced: false,
            migration: None,
            gate: Arc::new(AlwaysSwitch),
            throttled: false,
        }
    }

    /// Replaces the switchover gate migrations ask before they commit
    /// (default: [`AlwaysSwitch`]).
    pub fn set_switchover_gate(&mut self, gate: Arc<dyn SwitchoverGate>) {
        self.gate = gate;
    }

    /// The current boot (a migration target loads state into it).
    pub(crate) fn boot(&self) -> Option<&Boot> {
        self.boot.as_ref()
    }

    /// Continues the source's boot count and run state (migration target).
    pub(crate) fn continue_from(&mut self, boots: u64, paused: bool) {
        self.generation = boots.saturating_sub(1);
        self.paused = paused;
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
        self.start_boot_with(false)
    }

    fn start_boot_with(&mut self, paused: bool) -> Result<(), StartVmError> {
        let tx = self.tx.clone();
        let generation = self.generation;
        let sink = Arc::new(move |e| {
            let _ = tx.send(Message::Vcpu(generation, e));
        });
        if let Some(b) = self.boot.as_mut() {
            b.start(sink, paused)?;
        }
        Ok(())
    }

    /// Migration target: starts the vCPU and device threads parked, before
    /// any state arrives (the state is loaded on the parked threads), so
    /// the commit only has to [`Self::resume_incoming`]. `boots` is the
    /// source's boot count, which this boot continues.
    pub(crate) fn start_incoming_paused(&mut self, boots: u64) -> Result<(), StartVmError> {
        self.generation = boots.saturating_sub(1);
        self.start_boot_with(true)
    }

    /// Migration target: drops a VM whose stream failed, stopping the
    /// threads [`Self::start_incoming_paused`] started.
    pub(crate) fn discard(mut self) {
        self.stop_boot();
    }

    /// Migration target: lets the boot started by
    /// [`Self::start_incoming_paused`] run, unless the source had it
    /// paused. [`Self::run`] then takes over.
    pub(crate) fn resume_incoming(&self) {
        if !self.paused
            && let Some(b) = &self.boot
        {
            b.resume();
        }
    }

    /// Migration target, once the VM runs here: tells the network where
    /// the guest is now, one announce frame per interface
    /// ([`crate::devices::virtio::net::announce_frame`]). Best effort: a
    /// failed write only delays what the guest's next frame teaches.
    pub(crate) fn announce(&mut self) {
        for (tap, mac) in &mut self.backends.nets {
            let frame = crate::devices::virtio::net::announce_frame(*mac);
            if let Err(e) = tap.write_frame(&frame) {
                eprintln!("neph-vmm: cannot announce {mac} after the migration: {e}");
            }
        }
    }

    /// Migration target: the kernel, initrd and command line the source
    /// booted (used by reboots), and its configuration otherwise.
    pub(crate) fn adopt_boot_files(&mut self, from: &VmConfig) {
        self.config.kernel = from.kernel.clone();
        self.config.initrd = from.initrd.clone();
        self.config.cmdline = from.cmdline.clone();
    }

    /// The capacity of each disk, in order.
    pub(crate) fn disk_capacities(&self) -> Vec<u64> {
        self.backends.disks.iter().map(|d| d.capacity).collect()
    }

    /// Migration target: what `migrate_status` reports once the VM has
    /// arrived.
    pub(crate) fn set_incoming_status(&mut self, status: crate::migration::MigrationStatus) {
        self.migration = Some(source::Shared::finished(status));
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
        let started = self.boot.as_ref().is_some_and(Boot::started);
        if !started && let Err(e) = self.start_boot() {
            self.stop_boot();
            return Err(e.into());
        }
        if self.paused
            && let Some(b) = &self.boot
        {
            b.pause();
        }
        loop {
            // Checked on every turn, so a stream of requests cannot keep a
            // lapsed lease from fencing the VM.
            self.fence_if_lapsed();
            let lease = self.lease.filter(|_| !self.fenced).map(|l| l.deadline);
            let wake = match (self.shutdown_deadline, lease) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let msg = match wake {
                Some(d) => match self
                    .rx
                    .recv_timeout(d.saturating_duration_since(Instant::now()))
                {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        if self.shutdown_deadline.is_some_and(|d| d <= Instant::now()) {
                            self.stop_boot();
                            return Ok(VmExit::ShutdownTimedOut);
                        }
                        continue;
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
                    if let Some(m) = &self.migration {
                        // Its memory and state are gone with this boot.
                        m.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    self.throttled = false;
                    self.stop_boot();
                    self.generation += 1;
                    // A fenced VM stays paused across a reboot.
                    self.paused = self.fenced;
                    let boot = create_boot(
                        &self.config,
                        &self.kvm,
                        &self.caps,
                        &self.backends,
                        &self.console,
                        true,
                    )?;
                    self.boot = Some(boot);
                    if let Err(e) = self.start_boot() {
                        self.stop_boot();
                        return Err(e.into());
                    }
                    if self.fenced
                        && let Some(b) = &self.boot
                    {
                        b.pause();
                    }
                }
                Message::Vcpu(_, VcpuEvent::Crash { id, reason }) => {
                    self.stop_boot();
                    return Err(RunVmError::Crash { id, reason });
                }
                Message::Migration(g, op) => {
                    if self.migration_op(g, op) {
                        self.stop_boot();
                        self.linger_after_migration();
                        return Ok(VmExit::Migrated);
                    }
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

    /// After the switchover, answers `migrate_status` (and `status`) for a
    /// short while, so whoever drives the migration can read its final
    /// figures before the process exits.
    fn linger_after_migration(&mut self) {
        let until = Instant::now() + MIGRATED_LINGER;
        while let Ok(msg) = self
            .rx
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            if let Message::Request(req, reply) = msg {
                let r = match (req, &self.migration) {
                    (Request::MigrateStatus, Some(m)) => {
                        let mut r = Response::ok();
                        r.migration = Some(m.snapshot());
                        r
                    }
                    _ => Response::error("UNAVAILABLE", "the VM has migrated away"),
                };
                let _ = reply.send(r);
            }
        }
    }

    /// Runs a migration op; true when the VM has moved away.
    fn migration_op(&mut self, generation: u64, op: MigrationOp) -> bool {
        let current = generation == self.generation;
        let Some(boot) = self.boot.as_ref().filter(|_| current) else {
            if let MigrationOp::StopAndSave(reply) = op {
                let _ = reply.send(Err("the guest rebooted during the migration".into()));
            }
            return false;
        };
        match op {
            MigrationOp::Throttle(pause, done) => {
                // An operator's pause wins over the throttle.
                if !self.paused && pause != self.throttled {
                    if let Some(v) = &boot.vcpus {
                        if pause { v.pause() } else { v.resume() }
                    }
                    self.throttled = pause;
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
                false
            }
            MigrationOp::StopAndSave(reply) => {
                if self.throttled {
                    self.throttled = false;
                }
                let t = Instant::now();
                boot.pause();
                let pause = t.elapsed();
                let state = self.save_state(boot);
                let save = t.elapsed() - pause;
                let _ = reply.send(state.map(|state| Stopped { state, pause, save }));
                false
            }
            MigrationOp::Rollback => {
                self.throttled = false;
                if !self.paused {
                    boot.resume();
                }
                false
            }
            MigrationOp::Finish => true,
        }
    }

    /// Saves the machine state of a paused boot.
    fn save_state(&self, boot: &Boot) -> Result<MachineState, String> {
        let Some(vcpus) = &boot.vcpus else {
            return Err("the vCPUs are not running".into());
        };
        let caps = SaveCaps::probe(&self.kvm);
        let msrs = Arc::new(self.caps.msrs.clone());
        let results = vcpus.on_each_paused(
            move |id, fd| state::save_vcpu(fd, id, caps, &msrs),
            REQUEST_TIMEOUT,
        );
        let mut saved = Vec::with_capacity(results.len());
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Some(Ok(v)) => saved.push(v),
                Some(Err(e)) => return Err(source::error_chain(&e)),
                None => return Err(format!("vCPU {i} did not hand over its state")),
            }
        }
        let vm = state::save_vm(&boot.vm).map_err(|e| source::error_chain(&e))?;
        let serial = boot
            .devices
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save_state();
        let virtio = boot
            .virtio
            .iter()
            .map(|(d, _, _)| d.lock().unwrap_or_else(|e| e.into_inner()).save_state())
            .collect();
        Ok(MachineState {
            version: STATE_VERSION,
            paused: self.paused,
            vcpus: saved,
            vm,
            devices: DevicesState { serial, virtio },
        })
    }

    fn migration_running(&self) -> bool {
        self.migration
            .as_ref()
            .is_some_and(|m| !m.done.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn start_migration(
        &mut self,
        params: MigrateParams,
        gate: Arc<dyn SwitchoverGate>,
    ) -> Response {
        if self.migration_running() {
            return Response::error("INVALID_STATE", "a migration is already running");
        }
        if self.shutdown_deadline.is_some() {
            return Response::error("INVALID_STATE", "the VM is shutting down");
        }
        let Some(boot) = self.boot.as_ref() else {
            return Response::error("UNAVAILABLE", "the VM is between boots");
        };
        let mut disks = Vec::new();
        let blocks = boot
            .virtio
            .iter()
            .filter(|(_, k, _)| *k == DeviceKind::Block)
            .map(|(d, _, _)| d.clone());
        for ((cfg, backend), device) in self
            .config
            .disks
            .iter()
            .zip(&self.backends.disks)
            .zip(blocks)
        {
            disks.push(SourceDisk {
                path: cfg.path.clone(),
                capacity: backend.capacity,
                readonly: backend.readonly,
                device,
            });
        }
        let config = MigrationConfig {
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            disks: disks.iter().map(source::disk_info).collect(),
            nets: self.backends.nets.iter().map(|(_, mac)| mac.0).collect(),
            rng: self.config.rng,
            kernel: self.config.kernel.display().to_string(),
            initrd: self.config.initrd.as_ref().map(|p| p.display().to_string()),
            cmdline: self.config.cmdline.clone(),
            boots: self.generation + 1,
        };
        let ctx = SourceContext {
            vm: boot.vm.clone(),
            mem: boot.mem.clone(),
            config,
            disks,
            control: Arc::new(RunLoopControl {
                tx: self.tx.clone(),
                generation: self.generation,
            }),
            gate,
        };
        let shared = source::Shared::new(&params.to);
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || source::run(ctx, params, s));
        if let Err(e) = spawned {
            return Response::error("UNAVAILABLE", format!("cannot start the migration: {e}"));
        }
        self.migration = Some(shared.clone());
        let mut r = Response::ok();
        r.migration = Some(shared.snapshot());
        r
    }

    /// Pauses the VM for good if its lease has run out.
    fn fence_if_lapsed(&mut self) {
        if self.fenced || self.lease.is_none_or(|l| l.deadline > Instant::now()) {
            return;
        }
        if let Some(m) = &self.migration
            && self.migration_running()
        {
            // Rolling back will not resume a paused VM.
            m.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.throttled = false;
        if let Some(b) = &self.boot {
            b.pause();
        }
        self.paused = true;
        self.fenced = true;
        eprintln!("neph-vmm: the lease ran out without renewal; the vCPUs are paused (fenced)");
    }

    fn handle_request(&mut self, req: Request) -> (Response, Option<VmExit>) {
        match req {
            Request::Lease { until_ms } => {
                self.lease = Some(Lease::until(until_ms));
                return (Response::ok(), None);
            }
            Request::Resume if self.fenced && !self.lease_valid() => {
                return (
                    Response::error(
                        "INVALID_STATE",
                        "the VM is fenced and its lease has run out; renew the lease before resuming",
                    ),
                    None,
                );
            }
            Request::Shutdown { .. } if self.fenced => {
                return (
                    Response::error(
                        "INVALID_STATE",
                        "the VM is fenced; resume it with a valid lease first, or stop it",
                    ),
                    None,
                );
            }
            Request::Migrate {
                to,
                max_downtime_ms,
                timeout_ms,
                verify,
                streams,
                protocol,
                gate,
            } => {
                let version = protocol.unwrap_or(crate::migration::protocol::VERSION);
                let versions = crate::migration::protocol::PREVIOUS_VERSION
                    ..=crate::migration::protocol::VERSION;
                if !versions.contains(&version) {
                    return (
                        Response::error(
                            "BAD_REQUEST",
                            format!("protocol version {version} is not spoken here"),
                        ),
                        None,
                    );
                }
                let streams = streams.unwrap_or(source::DEFAULT_STREAMS);
                if !(1..=crate::migration::protocol::MAX_STREAMS).contains(&streams) {
                    return (
                        Response::error(
                            "BAD_REQUEST",
                            format!(
                                "streams must be 1 to {}",
                                crate::migration::protocol::MAX_STREAMS
                            ),
                        ),
                        None,
                    );
                }
                let params = MigrateParams {
                    to,
                    max_downtime: max_downtime_ms
                        .map_or(source::DEFAULT_MAX_DOWNTIME, Duration::from_millis),
                    timeout: timeout_ms.map_or(source::DEFAULT_TIMEOUT, Duration::from_millis),
                    verify,
                    streams,
                    version,
                };
                let gate: Arc<dyn SwitchoverGate> = match gate {
                    Some(path) => Arc::new(crate::migration::SocketGate::new(path)),
                    None => self.gate.clone(),
                };
                return (self.start_migration(params, gate), None);
            }
            Request::MigrateStatus => {
                return match &self.migration {
                    Some(m) => {
                        let mut r = Response::ok();
                        r.migration = Some(m.snapshot());
                        (r, None)
                    }
                    None => (
                        Response::error("INVALID_STATE", "no migration has been started"),
                        None,
                    ),
                };
            }
            Request::MigrateCancel => {
                return match &self.migration {
                    Some(m)
                        if self.migration_running()
                            && m.decided.load(std::sync::atomic::Ordering::SeqCst) =>
                    {
                        (
                            Response::error(
                                "INVALID_STATE",
                                "the switchover is decided; the migration can no longer be cancelled",
                            ),
                            None,
                        )
                    }
                    Some(m) if self.migration_running() => {
                        m.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                        (Response::ok(), None)
                    }
                    _ => (
                        Response::error("INVALID_STATE", "no migration is running"),
                        None,
                    ),
                };
            }
            Request::MigrateResolve { moved } => {
                return match &self.migration {
                    Some(m) => match m.resolve(moved) {
                        Ok(()) => (Response::ok(), None),
                        Err(e) => (Response::error("INVALID_STATE", e.to_string()), None),
                    },
                    None => (
                        Response::error("INVALID_STATE", "no migration has been started"),
                        None,
                    ),
                };
            }
            Request::Pause | Request::Resume if self.migration_running() => {
                return (
                    Response::error("INVALID_STATE", "a migration is running"),
                    None,
                );
            }
            _ => {}
        }
        self.handle_vm_request(req)
    }

    fn handle_vm_request(&mut self, req: Request) -> (Response, Option<VmExit>) {
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
                self.throttled = false;
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
                self.fenced = false;
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
            Request::SeccompProbe { thread } => (self.seccomp_probe(boot, thread), None),
            Request::Migrate { .. }
            | Request::MigrateStatus
            | Request::MigrateCancel
            | Request::MigrateResolve { .. }
            | Request::Lease { .. } => (Response::error("BAD_REQUEST", "not a VM request"), None),
        }
    }

    /// Makes a forbidden system call on `thread` (see
    /// [`Request::SeccompProbe`]); answers only if it was not stopped.
    fn seccomp_probe(&self, boot: &Boot, thread: ProbeThread) -> Response {
        use crate::sandbox::seccomp;
        if !seccomp::probe_enabled() {
            return Response::error(
                "FAILED_PRECONDITION",
                "the seccomp probe is off: start neph-vmm with --seccomp-probe",
            );
        }
        let errno = match thread {
            ProbeThread::Vmm => Some(seccomp::forbidden_call()),
            ProbeThread::Vcpu => {
                let Some(vcpus) = &boot.vcpus else {
                    return Response::error("UNAVAILABLE", "the vCPUs are not running");
                };
                if !self.paused {
                    boot.pause();
                }
                let r = vcpus.on_each_paused(
                    |id, _| (id == 0).then(seccomp::forbidden_call),
                    REQUEST_TIMEOUT,
                );
                if !self.paused {
                    boot.resume();
                }
                r.into_iter().flatten().flatten().next()
            }
        };
        Response::error(
            "FAILED",
            format!(
                "the forbidden call was allowed (errno {}): seccomp is {:?}",
                errno.unwrap_or(0),
                seccomp::mode()
            ),
        )
    }

    fn status(&self) -> Status {
        Status {
            state: if self.shutdown_deadline.is_some() {
                RunState::ShuttingDown
            } else if self.paused || self.paused_for_switchover() {
                RunState::Paused
            } else {
                RunState::Running
            },
            boots: self.generation + 1,
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            pid: std::process::id(),
            fenced: self.fenced,
            lease_until_ms: self.lease.map(|l| l.until_ms),
        }
    }

    /// Paused by a migration's stop-and-copy (or held there in doubt).
    fn paused_for_switchover(&self) -> bool {
        use crate::migration::MigrationState as M;
        self.migration_running()
            && self
                .migration
                .as_ref()
                .is_some_and(|m| matches!(m.snapshot().state, M::StopAndCopy | M::InDoubt))
    }

    fn lease_valid(&self) -> bool {
        self.lease.is_some_and(|l| l.deadline > Instant::now())
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

/// A fencing lease: the deadline as given and as an [`Instant`].
#[derive(Debug, Clone, Copy)]
struct Lease {
    until_ms: u64,
    deadline: Instant,
}

impl Lease {
    /// `until_ms` on [`monotonic_ms`]'s clock. [`Instant`] reads the same
    /// clock on Linux, but cannot be built from a raw value, so the
    /// deadline is taken relative to now.
    fn until(until_ms: u64) -> Self {
        // Far enough to mean "no deadline", near enough not to overflow.
        const MAX_AHEAD_MS: u64 = 10 * 365 * 24 * 3600 * 1000;
        let ahead = until_ms.saturating_sub(monotonic_ms()).min(MAX_AHEAD_MS);
        Self {
            until_ms,
            deadline: Instant::now() + Duration::from_millis(ahead),
        }
    }
}

/// `CLOCK_MONOTONIC` in milliseconds: the clock of the `lease` command,
/// shared by every process on the host.
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux, so the call only writes `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
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
