//! The sending side of a migration: runs on its own thread, started by the
//! `migrate` control request, while the VM keeps running.
//!
//! Rounds: round 0 sends every page (zero pages skipped: the target's
//! memory starts zeroed) and every non-zero disk chunk; each later round
//! sends what the dirty logs ([`super::dirty`]) collected meanwhile. Pre-copy
//! goes on while rounds shrink what is left and stops once the predicted
//! downtime (what is left over the measured throughput, plus the fixed
//! switchover cost) is within a few milliseconds, or within the budget when
//! it no longer shrinks (see [`decide`]). Then (protocol version 3) the
//! [`SwitchoverGate`] is asked while the guest still runs: its yes decides
//! the switchover, and the rounds go on until the prediction fits again
//! (the gate's round trip through the controllers is not downtime). Then
//! the VM is paused (vCPUs, then the device thread, which leaves no request
//! in flight), the rest goes with the machine state and `Complete` in the
//! same burst, the target runs the VM on `Complete` and answers `Loaded`,
//! and this process exits. Every switchover step is timed and reported in
//! `migrate_status` (`switchover`, and the target's `target_switchover`).
//! Auto-converge: when rounds stop shrinking (or the guest dirties faster
//! than half the throughput), a throttle pauses the vCPUs for a growing
//! share of every 3 ms.
//!
//! Exactly one running copy: cancel, a timeout, the gate saying no, or any
//! error before `Complete` went out resume the VM here (the target runs
//! nothing without `Complete`); after the gate's yes, cancel is refused and
//! a timeout no longer gives up (it goes to the switchover). Once
//! `Complete` went out, only the target knows whether it runs the VM: if
//! its `Loaded` does not come back, the source is in doubt
//! ([`MigrationState::InDoubt`]) and keeps the VM paused until
//! `migrate_resolve` says where it runs (see [`Shared::resolve`]). Version
//! 2 asks the gate after `Loaded` and commits with `Commit` (a commit frame
//! that cannot be sent stops the VM: [`MigrateError::CommitLost`]).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::dirty::{DirtyLogError, DiskTracker, PAGE, PageTracker};
use super::protocol::{
    self, Complete, DiskInfo, JoinInfo, Kind, MigrationConfig, ProtocolError, ReadyInfo,
    StreamsInfo,
};
use super::state::MachineState;
use super::{
    MigrationState, MigrationStatus, Phase, PhaseClock, Side, SwitchoverGate, describe_phases,
};
use crate::devices::virtio::event_loop::SharedVirtio;
use crate::vstate::memory::GuestMemoryMmap;

/// Default downtime budget.
pub const DEFAULT_MAX_DOWNTIME: Duration = Duration::from_millis(50);
/// Default time before a migration that does not converge gives up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Pages per `Pages` frame.
const PAGES_PER_FRAME: usize = 256;
/// Fixed part of the predicted downtime: pause, state, acknowledgement,
/// resume (measured here: 1 to 2.5 ms, see the `switchover` steps).
const SWITCHOVER_OVERHEAD: Duration = Duration::from_millis(2);
/// The downtime pre-copy aims at when it can: the overhead plus about a
/// millisecond of pages.
const DOWNTIME_GOAL: Duration = Duration::from_millis(3);
/// The strongest auto-converge throttle, percent.
const MAX_THROTTLE: u8 = 99;
/// The lowest throughput predictions assume, bytes per second.
const MIN_THROUGHPUT: u64 = 32 << 20;
/// How long the source waits for the target's `Loaded` after `Complete`
/// (protocol version 3) before it is in doubt. The target answers in about
/// a millisecond; a target slower than this is not wrong, only settled
/// through the controllers instead (it reports that the VM arrived).
const LOADED_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a refused connection is retried.
const CONNECT_RETRY: Duration = Duration::from_secs(5);
/// Page size, as a length.
const PAGE_BYTES: usize = protocol::PAGE_SIZE;
/// Throttle period: the longest pause a throttled guest sees is this times
/// the throttle percent, so it is kept short (the guest-visible downtime
/// bar counts throttle pauses too). Measured with `bench migration --load
/// max` on a 2-core host: the ticker's largest gap was 16 ms (median of 5)
/// with a 3 ms period and 9.7 ms with 1 ms.
const THROTTLE_PERIOD_US: u64 = 1_000;

/// A migration failed; the VM runs on here.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The target address does not resolve.
    #[error("cannot resolve the target address {0}")]
    Resolve(String),
    /// Connecting failed.
    #[error("cannot connect to the target {0}")]
    Connect(String, #[source] std::io::Error),
    /// The stream failed or the target answered badly.
    #[error("the migration stream failed")]
    Protocol(#[from] ProtocolError),
    /// Dirty logging.
    #[error("dirty page tracking failed")]
    Dirty(#[from] DirtyLogError),
    /// Reading guest memory or a disk.
    #[error("cannot read {0}")]
    Read(String),
    /// The VM went away or rebooted, or could not be paused and saved.
    #[error("the VM could not be stopped for the switchover: {0}")]
    Vm(String),
    /// Cancelled by `migrate_cancel`.
    #[error("the migration was cancelled")]
    Cancelled,
    /// Did not converge in time.
    #[error("the migration did not converge within {0:?}")]
    Timeout(Duration),
    /// The switchover gate said no.
    #[error("the switchover was refused by the gate")]
    GateRefused,
    /// The gate said yes (the switchover is decided) but the commit frame
    /// could not be sent: the VM stops here and is not resumed, since the
    /// target holds the complete state and may be the one copy.
    #[error("the switchover was decided but its commit could not be sent to the target")]
    CommitLost(#[source] std::io::Error),
    /// `Complete` (the commit) went out, but the target's `Loaded` did not
    /// come back: the target may run the VM, so it stays paused here until
    /// `migrate_resolve`.
    #[error("the commit went out but the target did not acknowledge it")]
    InDoubt(#[source] ProtocolError),
}

/// What the `migrate` request asks.
#[derive(Debug, Clone)]
pub struct MigrateParams {
    /// `HOST:PORT` of the target.
    pub to: String,
    /// Downtime budget.
    pub max_downtime: Duration,
    /// Give up (and resume here) after this long.
    pub timeout: Duration,
    /// Send a checksum of all memory at switchover for the target to
    /// compare (a test mode: it costs a pass over memory in the downtime).
    pub verify: bool,
    /// Memory streams (1 to [`protocol::MAX_STREAMS`]; more than the
    /// target takes, or more than 1 to a version 1 target, is cut down).
    pub streams: u8,
    /// Protocol version to speak ([`protocol::PREVIOUS_VERSION`] to
    /// [`protocol::VERSION`]).
    pub version: u32,
}

/// Default memory streams: on this project's 2-core test host one stream
/// carries as much as two (see "Memory streams" in [`super`]), so more
/// are opt-in.
pub const DEFAULT_STREAMS: u8 = 1;

/// State shared between the migration thread and the run loop.
#[derive(Debug)]
pub struct Shared {
    /// Progress.
    pub status: Mutex<MigrationStatus>,
    /// Set by `migrate_cancel`.
    pub cancel: AtomicBool,
    /// Set when the thread is done (whatever the outcome).
    pub done: AtomicBool,
    /// Set once the gate said yes: from then on cancel is refused.
    pub decided: AtomicBool,
    /// An in-doubt migration's outcome, once told (true: the VM runs on
    /// the target).
    resolution: Mutex<Option<bool>>,
    resolved: Condvar,
}

/// Why `migrate_resolve` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the migration is not in doubt (it is {0:?}); there is nothing to resolve")]
pub struct NotInDoubt(pub MigrationState);

impl Shared {
    /// A fresh migration to `to`.
    pub fn new(to: &str) -> Arc<Self> {
        Arc::new(Self {
            status: Mutex::new(MigrationStatus {
                state: MigrationState::Setup,
                to: to.to_owned(),
                round: 0,
                bytes_sent: 0,
                bytes_remaining: 0,
                dirty_rate_bps: 0,
                throughput_bps: 0,
                expected_downtime_ms: 0,
                throttle_percent: 0,
                elapsed_ms: 0,
                downtime_ms: None,
                downtime_us: None,
                error: None,
                side: Side::Source,
                switchover: Vec::new(),
                target_switchover: Vec::new(),
                streams: 1,
                decided: false,
            }),
            cancel: AtomicBool::new(false),
            done: AtomicBool::new(false),
            decided: AtomicBool::new(false),
            resolution: Mutex::new(None),
            resolved: Condvar::new(),
        })
    }

    /// A migration that has ended with `status` (a target reports the
    /// migration that brought its VM this way).
    pub fn finished(status: MigrationStatus) -> Arc<Self> {
        Arc::new(Self {
            status: Mutex::new(status),
            cancel: AtomicBool::new(false),
            done: AtomicBool::new(true),
            decided: AtomicBool::new(true),
            resolution: Mutex::new(None),
            resolved: Condvar::new(),
        })
    }

    /// Tells an in-doubt migration where its VM runs: `moved` true when the
    /// target runs it (this copy then stops for good), false when the
    /// target never will (this copy resumes). Whoever calls this must know:
    /// the node agent asks the controllers, which decide from the target's
    /// word (see `compute-node/agent/src/migrate.rs`).
    pub fn resolve(&self, moved: bool) -> Result<(), NotInDoubt> {
        let state = self.snapshot().state;
        if state != MigrationState::InDoubt {
            return Err(NotInDoubt(state));
        }
        *self.resolution.lock().unwrap_or_else(|e| e.into_inner()) = Some(moved);
        self.resolved.notify_all();
        Ok(())
    }

    /// Blocks until [`Shared::resolve`]; returns its `moved`.
    fn wait_resolution(&self) -> bool {
        let mut r = self.resolution.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(moved) = *r {
                return moved;
            }
            r = self.resolved.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Records that the switchover is decided (cancel refused from now
    /// on), in the flag and in the status `migrate_status` shows.
    fn mark_decided(&self) {
        self.decided.store(true, Ordering::SeqCst);
        self.update(|s| s.decided = true);
    }

    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// A copy of the progress.
    pub fn snapshot(&self) -> MigrationStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A VM stopped for the switchover.
#[derive(Debug)]
pub struct Stopped {
    /// Its complete state.
    pub state: MachineState,
    /// How long pausing the vCPUs and the device thread took.
    pub pause: Duration,
    /// How long saving the state took.
    pub save: Duration,
}

/// What the source needs from the VM's run loop (implemented in
/// [`crate::vm`]).
pub trait VmControl: Send + Sync {
    /// Pauses (true) or resumes (false) the vCPUs only, for auto-converge;
    /// a pause returns once the vCPUs are parked.
    fn throttle(&self, pause: bool);
    /// Pauses vCPUs and devices and saves the machine state.
    fn stop_and_save(&self) -> Result<Stopped, String>;
    /// Resumes after a failed attempt (unless the operator had paused).
    fn rollback(&self);
    /// The target has the VM: stop it here and end the process.
    fn finish(&self);
}

/// One disk as the source copies it.
#[derive(Debug)]
pub struct SourceDisk {
    /// Path of the image (opened again read-only for copying).
    pub path: PathBuf,
    /// Size.
    pub capacity: u64,
    /// Read-only.
    pub readonly: bool,
    /// Its virtio device, which logs writes while the copy runs.
    pub device: SharedVirtio,
}

/// Everything the migration thread needs.
pub struct SourceContext {
    /// The KVM VM (for the dirty log).
    pub vm: Arc<VmFd>,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// What the target builds.
    pub config: MigrationConfig,
    /// Disks.
    pub disks: Vec<SourceDisk>,
    /// The run loop.
    pub control: Arc<dyn VmControl>,
    /// The switchover gate.
    pub gate: Arc<dyn SwitchoverGate>,
}

impl std::fmt::Debug for SourceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceContext")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Nice value of the migration thread during pre-copy: copying yields the
/// CPU to the vCPUs, which a busy host would otherwise starve for
/// milliseconds at a time (the guest sees that as downtime). The switchover
/// runs at the thread's old priority: then the guest waits on it.
const MIGRATION_NICE: i32 = 10;

/// Sets the calling thread's nice value (best effort: a host that refuses,
/// e.g. raising it back without `CAP_SYS_NICE`, leaves it as it was).
/// Returns the value it had.
pub(crate) fn set_thread_nice(nice: i32) -> i32 {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let Ok(who) = libc::id_t::try_from(tid) else {
        return nice;
    };
    // SAFETY: getpriority only reads its integer arguments; PRIO_PROCESS
    // with a thread id names that one thread (Linux semantics). -1 is also
    // a valid nice value, which is fine for a best-effort restore.
    let old = unsafe { libc::getpriority(libc::PRIO_PROCESS, who) };
    // SAFETY: as above; setpriority changes only that thread's nice value.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, who, nice) };
    old
}

/// Runs a migration to its end; the outcome is in `shared`'s status. On
/// success the VM has been handed over ([`VmControl::finish`]).
pub fn run(ctx: SourceContext, params: MigrateParams, shared: Arc<Shared>) {
    // The throttle and stream threads inherit this filter.
    crate::sandbox::seccomp::install_or_exit(crate::sandbox::seccomp::ThreadKind::Migration);
    let nice = set_thread_nice(MIGRATION_NICE);
    let started = Instant::now();
    let mut m = Migration {
        ctx: &ctx,
        params: &params,
        shared: &shared,
        nice,
        started,
        bytes_sent: 0,
        work_time: Duration::ZERO,
        last_rate: None,
        pages_sent: 0,
    };
    let result = m.migrate();
    for d in &ctx.disks {
        d.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_write_log(None);
    }
    match result {
        Ok(downtime) => {
            let st = shared.snapshot();
            eprintln!(
                "neph-vmm: migrated to {} in {} ms, downtime {} us (source side), {} bytes sent",
                params.to,
                st.elapsed_ms,
                downtime.as_micros(),
                m.bytes_sent
            );
            shared.done.store(true, Ordering::SeqCst);
            ctx.control.finish();
        }
        Err(e @ MigrateError::InDoubt(_)) => {
            let msg = error_chain(&e);
            eprintln!(
                "neph-vmm: migration to {}: {msg}; the VM stays paused here until migrate_resolve says where it runs",
                params.to
            );
            shared.update(|s| {
                s.state = MigrationState::InDoubt;
                s.error = Some(msg.clone());
                s.throttle_percent = 0;
                s.elapsed_ms = ms(started.elapsed());
            });
            let moved = shared.wait_resolution();
            eprintln!(
                "neph-vmm: the in-doubt migration was resolved: the VM runs {}",
                if moved { "on the target" } else { "here" }
            );
            shared.update(|s| {
                if moved {
                    s.state = MigrationState::Completed;
                    s.error = None;
                } else {
                    s.state = MigrationState::Failed;
                    s.error = Some(format!("{msg}; resolved: the target does not run the VM"));
                }
            });
            shared.done.store(true, Ordering::SeqCst);
            if moved {
                ctx.control.finish();
            } else {
                ctx.control.rollback();
            }
        }
        Err(e @ MigrateError::CommitLost(_)) => {
            let msg = error_chain(&e);
            eprintln!(
                "neph-vmm: migration to {}: {msg}; the VM stops here",
                params.to
            );
            shared.update(|s| {
                s.state = MigrationState::Failed;
                s.error = Some(msg);
                s.throttle_percent = 0;
                s.elapsed_ms = ms(started.elapsed());
            });
            shared.done.store(true, Ordering::SeqCst);
            ctx.control.finish();
        }
        Err(e) => {
            let cancelled = matches!(e, MigrateError::Cancelled);
            let msg = error_chain(&e);
            eprintln!(
                "neph-vmm: migration to {} failed: {msg}; the VM runs here",
                params.to
            );
            ctx.control.rollback();
            shared.update(|s| {
                s.state = if cancelled {
                    MigrationState::Cancelled
                } else {
                    MigrationState::Failed
                };
                s.error = Some(msg);
                s.throttle_percent = 0;
                s.elapsed_ms = ms(started.elapsed());
            });
            shared.done.store(true, Ordering::SeqCst);
        }
    }
}

/// An error with its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The next auto-converge step from `current` percent towards `want`:
/// 20 first, then at least 10 more, at most 99.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn next_throttle(current: u8, want: f64) -> u8 {
    let floor = if current == 0 {
        20
    } else {
        current.saturating_add(10)
    };
    let want = want.clamp(0.0, 99.0) as u8;
    floor.max(want).min(99)
}

/// What a round found, for [`decide`].
#[derive(Debug, Clone, Copy)]
struct RoundFacts {
    /// Predicted downtime if the VM stopped now.
    expected: Duration,
    /// The migration's downtime budget.
    budget: Duration,
    /// Bytes still to send.
    remaining: u64,
    /// Bytes still to send after the round before (after round 0: what it
    /// sent).
    previous: Option<u64>,
    /// Auto-converge throttle now, percent.
    throttle: u8,
    /// Guest dirty rate over the round, bytes per second.
    dirty_rate: u64,
    /// Link throughput, bytes per second.
    throughput: u64,
    /// Half the migration's timeout has passed.
    late: bool,
    /// Rounds since the prediction first fitted the budget (0 before).
    rounds_fitting: u32,
}

/// Rounds pre-copy may go on chasing [`DOWNTIME_GOAL`] once the budget
/// fits (a loaded host's round trips can keep the goal out of reach).
const MAX_ROUNDS_FITTING: u32 = 4;

/// What to do after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Stop the VM and send the rest.
    Switchover,
    /// Another round, as things are.
    Round,
    /// Another round, with the vCPUs throttled to this percent.
    Throttle(u8),
}

/// Decides after each round. The budget is a ceiling, not a target: the
/// guest sees the pause plus what the host adds around it, so pre-copy
/// goes on while rounds still shrink what is left, and switches over once
/// the prediction is within [`DOWNTIME_GOAL`] (or the budget, when rounds
/// no longer shrink it and throttling cannot do more). When the guest
/// dirties faster than rounds can drain (the remainder stopped shrinking
/// or the dirty rate is over half the throughput), auto-converge throttles
/// the vCPUs harder, by at least 10 points a step.
fn decide(f: &RoundFacts) -> Next {
    let goal = f.budget.min(DOWNTIME_GOAL);
    if f.expected <= goal {
        return Next::Switchover;
    }
    // Shrinking: the remainder fell by a quarter or more.
    let shrinking = f
        .previous
        .is_none_or(|p| f.remaining.saturating_mul(4) < p.saturating_mul(3));
    let fits = f.expected <= f.budget;
    if shrinking && !f.late {
        return Next::Round;
    }
    // Stalled (or late). Near the goal, out of levers, or chasing the goal
    // for long enough: take it if it fits. A guest that does not outpace
    // the link is not throttled just to shave a budget-sized downtime.
    let outpaces = f.dirty_rate.saturating_mul(2) > f.throughput;
    if fits
        && (f.expected <= goal * 2
            || f.throttle >= MAX_THROTTLE
            || f.late
            || !outpaces
            || f.rounds_fitting >= MAX_ROUNDS_FITTING)
    {
        return Next::Switchover;
    }
    if f.throttle < MAX_THROTTLE {
        // Aim at a dirty rate under half the throughput, and at a
        // remainder a quarter of this one next round: with the guest
        // running a share (1 - t) of the time, the remainder scales with
        // it, so from a ratio r now, 1 - t' = (1 - t) / (4r). Quartering
        // (not halving) converges in fewer of the long rounds a guest that
        // rewrites its whole working set makes, at the price of a harder
        // but shorter throttle. (The measured dirty rate alone
        // underestimates such a guest.)
        let by_rate = 100.0 - 50.0 * f.throughput as f64 / f.dirty_rate.max(1) as f64;
        let ratio = f
            .previous
            .map_or(1.0, |p| f.remaining as f64 / p.max(1) as f64)
            .max(1e-3);
        let by_ratio = 100.0 - (100.0 - f64::from(f.throttle)) / (4.0 * ratio);
        return Next::Throttle(next_throttle(f.throttle, by_rate.max(by_ratio)));
    }
    Next::Round
}

/// Bytes per second (saturating; rates are estimates).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn rate(bytes: u64, secs: f64) -> u64 {
    (bytes as f64 / secs.max(1e-6)) as u64
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

struct Migration<'a> {
    ctx: &'a SourceContext,
    /// The thread's nice value before pre-copy lowered it.
    nice: i32,
    params: &'a MigrateParams,
    shared: &'a Shared,
    started: Instant,
    bytes_sent: u64,
    /// Time spent reading, scanning and sending (what the link and this
    /// host's copying can do, without the time between rounds).
    work_time: Duration,
    /// Bytes and time of the last round that carried enough to measure.
    last_rate: Option<u64>,
    pages_sent: u64,
}

/// Pauses the vCPUs a share of each throttle period while it lives.
struct Throttle {
    percent: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    /// With `stop`: end with the vCPUs paused.
    hold: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Throttle {
    /// Starts the throttle thread at nice value `nice` (the migration
    /// thread's own before it lowered it: a throttle that oversleeps its
    /// run share does not throttle).
    fn start(control: Arc<dyn VmControl>, nice: i32) -> Self {
        let percent = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(AtomicBool::new(false));
        let (p, s, h) = (percent.clone(), stop.clone(), hold.clone());
        let thread = std::thread::Builder::new()
            .name("mig-throttle".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                set_thread_nice(nice);
                // The guest runs on while a pause takes effect: that time
                // counts against its run share, or a loaded host (where the
                // pause takes longer than the share) would hardly throttle.
                let mut pausing = Duration::ZERO;
                loop {
                    let pct = u64::from(p.load(Ordering::SeqCst).min(MAX_THROTTLE));
                    if s.load(Ordering::SeqCst) {
                        if pct > 0 && h.load(Ordering::SeqCst) {
                            control.throttle(true);
                        }
                        return;
                    }
                    if pct == 0 {
                        std::thread::sleep(Duration::from_micros(THROTTLE_PERIOD_US));
                        continue;
                    }
                    let run = Duration::from_micros(THROTTLE_PERIOD_US * (100 - pct) / 100);
                    std::thread::sleep(run.saturating_sub(pausing));
                    let t = Instant::now();
                    control.throttle(true);
                    pausing = t.elapsed();
                    std::thread::sleep(Duration::from_micros(THROTTLE_PERIOD_US * pct / 100));
                    if s.load(Ordering::SeqCst) && h.load(Ordering::SeqCst) {
                        return;
                    }
                    control.throttle(false);
                }
            })
            .ok();
        Self {
            percent,
            stop,
            hold,
            thread,
        }
    }

    /// Ends throttling for the switchover: a throttled guest is left
    /// paused (the stop that follows then finds its vCPUs parked instead
    /// of kicking them out of a run share, which a busy host can delay by
    /// tens of milliseconds). A failed switchover resumes it as usual.
    fn end_paused(self) {
        self.hold.store(true, Ordering::SeqCst);
        drop(self);
    }

    fn set(&self, pct: u8) {
        self.percent.store(pct, Ordering::SeqCst);
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A page of zeros to compare with (a slice comparison is a `bcmp`, fast
/// even in unoptimised builds).
static ZERO_PAGE: [u8; PAGE_BYTES] = [0; PAGE_BYTES];

fn is_zero(data: &[u8]) -> bool {
    data.chunks(ZERO_PAGE.len())
        .all(|c| c == &ZERO_PAGE[..c.len()])
}

/// A checksum of all guest memory, in region order (the target computes
/// the same). std's SipHash with its fixed default keys: the same on both
/// sides as long as both run the same build, which is what the test mode
/// that uses it needs.
pub fn memory_checksum(mem: &GuestMemoryMmap) -> u64 {
    use std::hash::Hasher;
    let mut h = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for region in mem.iter() {
        let base = region.start_addr().0;
        let len = region.len();
        let mut off = 0;
        while off < len {
            let n = usize::try_from((len - off).min(buf.len() as u64)).unwrap_or(0);
            if mem
                .read_slice(&mut buf[..n], GuestAddress(base + off))
                .is_err()
            {
                return 0;
            }
            h.write(&buf[..n]);
            off += n as u64;
        }
    }
    h.finish()
}

/// Groups sorted page addresses into runs of consecutive pages, at most
/// `max` pages each.
fn runs(pages: &[u64], max: usize) -> Vec<(u64, usize)> {
    let mut out: Vec<(u64, usize)> = Vec::new();
    for &gpa in pages {
        match out.last_mut() {
            Some((start, n)) if *n < max && *start + (*n as u64) * PAGE == gpa => *n += 1,
            _ => out.push((gpa, 1)),
        }
    }
    out
}

/// Writes `pages` to `w` as `Pages` frames (and, unless `first`, the zero
/// ones as `ZeroPages`); `progress(bytes so far)` runs after each full
/// frame and may stop the copy. Returns (bytes written, pages sent).
fn write_pages(
    mem: &GuestMemoryMmap,
    w: &mut BufWriter<TcpStream>,
    pages: &[u64],
    first: bool,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(u64) -> Result<(), MigrateError>,
) -> Result<(u64, u64), MigrateError> {
    let mut payload = Vec::with_capacity(PAGES_PER_FRAME * protocol::PAGE_RECORD);
    let mut zeros = Vec::new();
    let mut block = vec![0u8; PAGES_PER_FRAME * PAGE_BYTES];
    let (mut bytes, mut sent) = (0u64, 0u64);
    let mut frame = |w: &mut BufWriter<TcpStream>, kind, payload: &[u8]| {
        protocol::write_frame(w, kind, payload).map_err(ProtocolError::Io)?;
        bytes += 5 + payload.len() as u64;
        Ok::<_, MigrateError>(bytes)
    };
    for (start, n) in runs(pages, PAGES_PER_FRAME) {
        let data = &mut block[..n * PAGE_BYTES];
        mem.read_slice(data, GuestAddress(start))
            .map_err(|e| MigrateError::Read(format!("guest pages at {start:#x}: {e}")))?;
        for (i, page) in data.chunks_exact(PAGE_BYTES).enumerate() {
            let gpa = start + i as u64 * PAGE;
            if is_zero(page) {
                if !first {
                    zeros.extend_from_slice(&gpa.to_le_bytes());
                }
                continue;
            }
            payload.extend_from_slice(&gpa.to_le_bytes());
            payload.extend_from_slice(page);
            sent += 1;
            if payload.len() >= PAGES_PER_FRAME * protocol::PAGE_RECORD {
                let so_far = frame(w, Kind::Pages, &payload)?;
                payload.clear();
                if cancel.load(Ordering::SeqCst) {
                    return Err(MigrateError::Cancelled);
                }
                progress(so_far)?;
            }
        }
    }
    if !payload.is_empty() {
        frame(w, Kind::Pages, &payload)?;
    }
    for z in zeros.chunks(64 * 1024) {
        frame(w, Kind::ZeroPages, z)?;
    }
    Ok((bytes, sent))
}

impl Migration<'_> {
    /// Whether the gate said yes: cancel and the timeout no longer apply.
    fn decided(&self) -> bool {
        self.shared.decided.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<(), MigrateError> {
        if self.decided() {
            return Ok(());
        }
        if self.shared.cancel.load(Ordering::SeqCst) {
            return Err(MigrateError::Cancelled);
        }
        if self.started.elapsed() > self.params.timeout {
            return Err(MigrateError::Timeout(self.params.timeout));
        }
        Ok(())
    }

    /// Connects, retrying refused connections for a few seconds: a target
    /// started just before the request may not listen yet.
    fn connect(&self) -> Result<TcpStream, MigrateError> {
        let addrs: Vec<SocketAddr> = self
            .params
            .to
            .to_socket_addrs()
            .map_err(|_| MigrateError::Resolve(self.params.to.clone()))?
            .collect();
        let deadline = Instant::now() + CONNECT_RETRY;
        loop {
            let mut last = None;
            for a in &addrs {
                match TcpStream::connect_timeout(a, Duration::from_secs(5)) {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            let e = last.unwrap_or_else(|| std::io::Error::other("no address"));
            if e.kind() != std::io::ErrorKind::ConnectionRefused || Instant::now() > deadline {
                return Err(MigrateError::Connect(self.params.to.clone(), e));
            }
            self.check()?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Opens extra memory stream `index` of session `session`.
    fn join(
        &self,
        version: u32,
        session: u64,
        index: u8,
    ) -> Result<BufWriter<TcpStream>, MigrateError> {
        let stream = self.connect()?;
        let _ = stream.set_nodelay(true);
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(ProtocolError::Io)?;
        let mut w = BufWriter::with_capacity(4 << 20, stream);
        protocol::write_header(&mut w, version).map_err(ProtocolError::Io)?;
        protocol::write_value(&mut w, Kind::Join, &JoinInfo { session, index })
            .map_err(ProtocolError::Io)?;
        w.flush().map_err(ProtocolError::Io)?;
        Ok(w)
    }

    fn frame(
        &mut self,
        w: &mut BufWriter<TcpStream>,
        kind: Kind,
        payload: &[u8],
    ) -> Result<(), MigrateError> {
        protocol::write_frame(w, kind, payload).map_err(ProtocolError::Io)?;
        self.bytes_sent += 5 + payload.len() as u64;
        Ok(())
    }

    /// Throughput (bytes per second) for predictions: the last round that
    /// carried at least 1 MiB (a smaller one measures round trips and
    /// scanning, not the link), else everything so far; at least
    /// [`MIN_THROUGHPUT`], so a loaded host's slow first round cannot keep
    /// a nearly idle guest from ever fitting its budget.
    fn throughput(&self) -> u64 {
        let all = || {
            let secs = self.work_time.as_secs_f64().max(1e-3);
            rate(self.bytes_sent, secs)
        };
        self.last_rate.unwrap_or_else(all).max(MIN_THROUGHPUT)
    }

    /// Sends `pages`; round 0 skips zero pages, later rounds send them as
    /// `ZeroPages`. With extra streams, each takes an equal share of the
    /// list (in address order) and ends it with a `Sync`; this stream
    /// sends the first share.
    fn send_pages(
        &mut self,
        w: &mut BufWriter<TcpStream>,
        extras: &mut [BufWriter<TcpStream>],
        pages: &[u64],
        first: bool,
        check: bool,
    ) -> Result<(), MigrateError> {
        let t = Instant::now();
        let share = pages.len().div_ceil(extras.len() + 1).max(1);
        let mut parts = pages.chunks(share);
        let mine = parts.next().unwrap_or(&[]);
        let mem = &self.ctx.mem;
        let cancel = &self.shared.cancel;
        let (sent, pages_sent) = std::thread::scope(|scope| {
            let others: Vec<_> = extras
                .iter_mut()
                .map(|ew| {
                    let part = parts.next().unwrap_or(&[]);
                    scope.spawn(move || -> Result<(u64, u64), MigrateError> {
                        let r = write_pages(mem, ew, part, first, cancel, &mut |_| Ok(()))?;
                        protocol::write_frame(ew, Kind::Sync, b"").map_err(ProtocolError::Io)?;
                        ew.flush().map_err(ProtocolError::Io)?;
                        Ok((r.0 + 5, r.1))
                    })
                })
                .collect();
            let base = self.bytes_sent;
            let mine = write_pages(mem, w, mine, first, cancel, &mut |bytes| {
                if check {
                    self.check()?;
                    self.shared.update(|s| s.bytes_sent = base + bytes);
                }
                Ok(())
            });
            let mut total = (0u64, 0u64);
            let mut err = None;
            for h in others {
                match h.join() {
                    Ok(Ok((b, p))) => {
                        total.0 += b;
                        total.1 += p;
                    }
                    Ok(Err(e)) => err = Some(e),
                    Err(_) => {
                        err = Some(MigrateError::Read("a memory stream's thread failed".into()))
                    }
                }
            }
            let (b, p) = mine?;
            if let Some(e) = err {
                return Err(e);
            }
            Ok::<_, MigrateError>((total.0 + b, total.1 + p))
        })?;
        self.bytes_sent += sent;
        self.pages_sent += pages_sent;
        self.work_time += t.elapsed();
        Ok(())
    }

    fn send_disk(
        &mut self,
        w: &mut BufWriter<TcpStream>,
        files: &[File],
        disk: usize,
        chunks: &[(u64, u64)],
        first: bool,
        check: bool,
    ) -> Result<(), MigrateError> {
        let mut buf = Vec::new();
        let t = Instant::now();
        for &(off, len) in chunks {
            buf.resize(usize::try_from(len).unwrap_or(0), 0);
            files[disk].read_exact_at(&mut buf, off).map_err(|e| {
                MigrateError::Read(format!(
                    "disk {} at {off}: {e}",
                    self.ctx.disks[disk].path.display()
                ))
            })?;
            if first && is_zero(&buf) {
                continue;
            }
            let payload = protocol::disk_chunk(u32::try_from(disk).unwrap_or(u32::MAX), off, &buf);
            self.frame(w, Kind::DiskChunk, &payload)?;
            if check {
                self.check()?;
            }
        }
        self.work_time += t.elapsed();
        Ok(())
    }

    fn migrate(&mut self) -> Result<Duration, MigrateError> {
        let stream = self.connect()?;
        let _ = stream.set_nodelay(true);
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(ProtocolError::Io)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(ProtocolError::Io)?;
        let mut reader = stream.try_clone().map_err(ProtocolError::Io)?;
        let mut w = BufWriter::with_capacity(4 << 20, stream);
        let result = self.migrate_on(&mut w, &mut reader);
        if result
            .as_ref()
            .is_err_and(|e| !matches!(e, MigrateError::InDoubt(_)))
        {
            // Best effort: the target may be gone already.
            let _ = protocol::write_frame(&mut w, Kind::Abort, b"the source gave up");
            let _ = w.flush();
        }
        result
    }

    fn migrate_on(
        &mut self,
        w: &mut BufWriter<TcpStream>,
        reader: &mut TcpStream,
    ) -> Result<Duration, MigrateError> {
        let mut buf = Vec::new();
        let version = self.params.version;
        protocol::write_header(w, version).map_err(ProtocolError::Io)?;
        protocol::write_value(w, Kind::Config, &self.ctx.config).map_err(ProtocolError::Io)?;
        w.flush().map_err(ProtocolError::Io)?;
        expect(reader, &mut buf, Kind::Ready, "Ready")?;
        self.check()?;
        let mut extras = Vec::new();
        if version >= 2 && self.params.streams > 1 {
            let ready: ReadyInfo = protocol::decode(Kind::Ready, &buf)?;
            let count = self
                .params
                .streams
                .min(ready.max_streams)
                .min(protocol::MAX_STREAMS);
            if count > 1 {
                protocol::write_value(w, Kind::Streams, &StreamsInfo { count })
                    .map_err(ProtocolError::Io)?;
                w.flush().map_err(ProtocolError::Io)?;
                for index in 1..count {
                    extras.push(self.join(version, ready.session, index)?);
                }
            }
        }
        let streams = u8::try_from(extras.len() + 1).unwrap_or(u8::MAX);
        self.shared.update(|s| s.streams = streams);

        let files = self
            .ctx
            .disks
            .iter()
            .map(|d| {
                File::open(&d.path)
                    .map_err(|e| MigrateError::Read(format!("disk {}: {e}", d.path.display())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut disks: Vec<DiskTracker> = Vec::with_capacity(self.ctx.disks.len());
        for d in &self.ctx.disks {
            let t = DiskTracker::start(d.capacity);
            d.device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_write_log(Some(t.log()));
            disks.push(t);
        }
        let mut pages = PageTracker::start(self.ctx.vm.clone(), self.ctx.mem.clone())?;
        pages.drop_untouched();
        self.shared.update(|s| s.state = MigrationState::Precopy);

        let throttle = Throttle::start(self.ctx.control.clone(), self.nice);
        let mut throttle_pct: u8 = 0;
        let mut round: u32 = 0;
        let mut previous_remaining: Option<u64> = None;
        let mut rounds_fitting: u32 = 0;
        // How long the version 3 gate took (the guest ran meanwhile).
        let mut gate_us: u64 = 0;
        loop {
            let round_start = Instant::now();
            let sent_before = self.bytes_sent;
            let list = pages.take_pending();
            self.send_pages(w, &mut extras, &list, round == 0, true)?;
            for (i, t) in disks.iter_mut().enumerate() {
                let chunks = t.take_pending();
                self.send_disk(w, &files, i, &chunks, round == 0, true)?;
            }
            protocol::write_frame(w, Kind::Sync, b"").map_err(ProtocolError::Io)?;
            w.flush().map_err(ProtocolError::Io)?;
            expect(reader, &mut buf, Kind::Synced, "Synced")?;
            self.check()?;
            let took = round_start.elapsed().max(Duration::from_micros(100));
            let sent = self.bytes_sent - sent_before;
            if sent >= 1 << 20 {
                // End to end: the round ends when the target has applied it.
                self.last_rate = Some(rate(sent, took.as_secs_f64()));
            }
            let dirty_pages = pages.harvest()?;
            let dirty_chunks: u64 = disks.iter_mut().map(DiskTracker::harvest).sum();
            let dirty_bytes =
                dirty_pages * PAGE + dirty_chunks * crate::devices::virtio::WRITE_LOG_CHUNK as u64;
            let remaining = pages.pending() * protocol::PAGE_RECORD as u64
                + disks.iter().map(DiskTracker::pending).sum::<u64>()
                    * crate::devices::virtio::WRITE_LOG_CHUNK as u64;
            let throughput = self.throughput();
            let expected =
                Duration::from_secs_f64(remaining as f64 / throughput as f64) + SWITCHOVER_OVERHEAD;
            let dirty_rate = rate(dirty_bytes, took.as_secs_f64());
            self.shared.update(|s| {
                s.round = round;
                s.bytes_sent = self.bytes_sent;
                s.bytes_remaining = remaining;
                s.dirty_rate_bps = dirty_rate;
                s.throughput_bps = throughput;
                s.expected_downtime_ms = ms(expected);
                s.throttle_percent = throttle_pct;
                s.elapsed_ms = ms(self.started.elapsed());
            });
            // Decided and out of time: stop and copy whatever is left (a
            // longer pause rather than a switchover that never comes).
            let overdue = self.decided() && self.started.elapsed() > self.params.timeout;
            let next = decide(&RoundFacts {
                expected,
                budget: self.params.max_downtime,
                remaining,
                // Round 0 compares with what it sent: a guest that dirtied
                // most of it meanwhile will not converge unthrottled.
                previous: previous_remaining.or(Some(sent)),
                throttle: throttle_pct,
                dirty_rate,
                throughput,
                late: self.started.elapsed() > self.params.timeout / 2,
                rounds_fitting,
            });
            if expected <= self.params.max_downtime || rounds_fitting > 0 {
                rounds_fitting = rounds_fitting.saturating_add(1);
            }
            previous_remaining = Some(remaining);
            match next {
                // Version 3: decide now, while the guest runs; what it
                // dirtied during the gate's round trip goes in the next
                // round(s), until the prediction fits again.
                Next::Switchover if version >= 3 && !self.decided() => {
                    let t = Instant::now();
                    if !self.ctx.gate.allow_switchover(&self.params.to) {
                        return Err(MigrateError::GateRefused);
                    }
                    self.shared.mark_decided();
                    gate_us = super::micros(t.elapsed());
                }
                Next::Switchover => break,
                _ if overdue => break,
                Next::Round => {}
                Next::Throttle(pct) => {
                    throttle_pct = pct;
                    throttle.set(pct);
                }
            }
            round = round.saturating_add(1);
        }
        throttle.end_paused();

        // Stop and copy: every step is timed (the guest's downtime is
        // their sum plus the target's resume).
        self.shared
            .update(|s| s.state = MigrationState::StopAndCopy);
        // From here the guest waits on this thread: full priority again.
        set_thread_nice(self.nice);
        let mut clock = PhaseClock::new();
        let stopped = self.ctx.control.stop_and_save().map_err(MigrateError::Vm)?;
        let handoff = clock.total().saturating_sub(stopped.pause + stopped.save);
        clock.lap("stop");
        let mut phases = vec![
            Phase {
                name: "handoff".into(),
                us: super::micros(handoff),
            },
            Phase {
                name: "pause".into(),
                us: super::micros(stopped.pause),
            },
            Phase {
                name: "save".into(),
                us: super::micros(stopped.save),
            },
        ];
        pages.harvest_last()?;
        for t in disks.iter_mut() {
            t.harvest();
        }
        clock.lap("harvest");
        let list = pages.take_pending();
        let last_pages = list.len();
        self.send_pages(w, &mut extras, &list, false, false)?;
        for (i, t) in disks.iter_mut().enumerate() {
            let chunks = t.take_pending();
            self.send_disk(w, &files, i, &chunks, false, false)?;
        }
        clock.lap("last_pages");
        let state_bytes = postcard::to_stdvec(&stopped.state)
            .map_err(|e| MigrateError::Vm(format!("cannot encode the state: {e}")))?;
        self.frame(w, Kind::State, &state_bytes)?;
        let checksum = self.params.verify.then(|| memory_checksum(&self.ctx.mem));
        if checksum.is_some() {
            clock.lap("checksum");
        }
        let complete = Complete {
            memory_checksum: checksum,
            pages_sent: self.pages_sent,
        };
        let bytes = postcard::to_stdvec(&complete)
            .map_err(|e| MigrateError::Vm(format!("cannot encode the last frame: {e}")))?;
        let target_phases = if version >= 3 {
            // `Complete` is the commit: from its first byte on, the target
            // may run the VM, so a failure leaves this side in doubt. An
            // `Error` answer is definite: the target did not run it.
            let sent = self
                .frame(w, Kind::Complete, &bytes)
                .and_then(|()| w.flush().map_err(|e| ProtocolError::Io(e).into()));
            if let Err(e) = sent {
                return Err(match e {
                    MigrateError::Protocol(p) => MigrateError::InDoubt(p),
                    other => other,
                });
            }
            clock.lap("send_state");
            let _ = reader.set_read_timeout(Some(LOADED_TIMEOUT));
            match expect(reader, &mut buf, Kind::Loaded, "Loaded") {
                Ok(()) => {}
                Err(e @ MigrateError::Protocol(ProtocolError::Peer(_))) => return Err(e),
                Err(MigrateError::Protocol(p)) => return Err(MigrateError::InDoubt(p)),
                Err(e) => return Err(e),
            }
            clock.lap("target_resume");
            // The VM runs there: a garbled report is only a missing figure.
            protocol::decode_loaded(&buf).unwrap_or_default()
        } else {
            self.frame(w, Kind::Complete, &bytes)?;
            w.flush().map_err(ProtocolError::Io)?;
            clock.lap("send_state");
            expect(reader, &mut buf, Kind::Loaded, "Loaded")?;
            clock.lap("target_load");
            let target_phases = protocol::decode_loaded(&buf)?;
            if !self.ctx.gate.allow_switchover(&self.params.to) {
                return Err(MigrateError::GateRefused);
            }
            self.shared.mark_decided();
            clock.lap("gate");
            // From here on the source never resumes: the switchover is decided.
            protocol::write_frame(w, Kind::Commit, b"")
                .and_then(|()| w.flush())
                .map_err(MigrateError::CommitLost)?;
            clock.lap("commit");
            target_phases
        };
        // Done: recorded before the log is switched off, which takes a
        // while under PVM while the guest already runs on the target.
        let downtime = clock.total();
        phases.extend(clock.phases().iter().skip(1).cloned());
        eprintln!(
            "neph-vmm: switchover: {last_pages} last pages; source {}; target {}{}",
            describe_phases(&phases),
            describe_phases(&target_phases),
            if version >= 3 {
                format!("; the gate took {gate_us}us before the pause")
            } else {
                String::new()
            }
        );
        let bytes_sent = self.bytes_sent;
        self.shared.update(|s| {
            s.state = MigrationState::Completed;
            s.downtime_ms = Some(ms(downtime));
            s.downtime_us = Some(super::micros(downtime));
            s.elapsed_ms = ms(self.started.elapsed());
            s.bytes_sent = bytes_sent;
            s.bytes_remaining = 0;
            s.expected_downtime_ms = 0;
            s.switchover = phases;
            s.target_switchover = target_phases;
        });
        pages.stop();
        Ok(downtime)
    }
}

fn expect(
    reader: &mut TcpStream,
    buf: &mut Vec<u8>,
    want: Kind,
    name: &'static str,
) -> Result<(), MigrateError> {
    match protocol::read_frame(reader, buf)? {
        k if k == want => Ok(()),
        Kind::Error => Err(ProtocolError::Peer(String::from_utf8_lossy(buf).into_owned()).into()),
        got => Err(ProtocolError::Unexpected {
            got,
            expected: name,
        }
        .into()),
    }
}

/// The target-facing description of a disk.
pub fn disk_info(d: &SourceDisk) -> DiskInfo {
    DiskInfo {
        capacity: d.capacity,
        readonly: d.readonly,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_recognised() {
        let mut p = [0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        assert!(!is_zero(&[0, 0, 1]));
    }

    #[test]
    fn throttle_steps_up_and_stops_at_99() {
        assert_eq!(next_throttle(0, 5.0), 20);
        assert_eq!(next_throttle(20, 5.0), 30);
        assert_eq!(next_throttle(30, 75.0), 75);
        assert_eq!(next_throttle(95, 120.0), 99);
        assert_eq!(next_throttle(99, f64::NAN), 99);
    }

    fn facts() -> RoundFacts {
        RoundFacts {
            expected: Duration::from_millis(20),
            budget: Duration::from_millis(50),
            remaining: 10 << 20,
            previous: Some(40 << 20),
            throttle: 0,
            dirty_rate: 600 << 20,
            throughput: 1 << 30,
            late: false,
            rounds_fitting: 1,
        }
    }

    #[test]
    fn rounds_go_on_while_they_shrink_and_stop_at_the_goal() {
        // Fits the budget but still shrinking: one more round.
        assert_eq!(decide(&facts()), Next::Round);
        // Within the goal: stop.
        let f = RoundFacts {
            expected: Duration::from_millis(3),
            ..facts()
        };
        assert_eq!(decide(&f), Next::Switchover);
        // A smaller budget than the goal is the goal.
        let f = RoundFacts {
            expected: Duration::from_millis(2),
            budget: Duration::from_millis(1),
            ..facts()
        };
        assert_eq!(decide(&f), Next::Round);
        // Stalled near the goal: stop.
        let f = RoundFacts {
            expected: Duration::from_millis(5),
            remaining: 39 << 20,
            ..facts()
        };
        assert_eq!(decide(&f), Next::Switchover);
    }

    #[test]
    fn a_stalled_migration_throttles_then_settles_for_the_budget() {
        let stalled = RoundFacts {
            remaining: 39 << 20,
            dirty_rate: 2 << 30,
            ..facts()
        };
        // By rate: 100 - 50 * 1/2 = 75; by ratio (39/40): 100 - 100 / 3.9 = 74.
        assert_eq!(decide(&stalled), Next::Throttle(75));
        // A remainder over budget that does not shrink at all from 60%:
        // 100 - 40 / 4 = 90.
        let f = RoundFacts {
            throttle: 60,
            remaining: 40 << 20,
            dirty_rate: 1 << 20,
            expected: Duration::from_millis(80),
            ..stalled
        };
        assert_eq!(decide(&f), Next::Throttle(90));
        let f = RoundFacts {
            throttle: 99,
            ..stalled
        };
        assert_eq!(decide(&f), Next::Switchover);
        let f = RoundFacts {
            throttle: 99,
            expected: Duration::from_millis(80),
            ..stalled
        };
        assert_eq!(decide(&f), Next::Round, "over budget: wait for the timeout");
        let f = RoundFacts {
            late: true,
            ..facts()
        };
        assert_eq!(decide(&f), Next::Switchover, "late and within budget");
        // Stalled within budget: a guest slower than the link is not
        // throttled, and the goal is chased only for a few rounds.
        let slow = RoundFacts {
            remaining: 39 << 20,
            dirty_rate: 100 << 20,
            ..facts()
        };
        assert_eq!(decide(&slow), Next::Switchover);
        let fast = RoundFacts {
            remaining: 39 << 20,
            expected: Duration::from_millis(20),
            ..facts()
        };
        assert!(matches!(decide(&fast), Next::Throttle(_)));
        let long = RoundFacts {
            rounds_fitting: MAX_ROUNDS_FITTING,
            ..fast
        };
        assert_eq!(decide(&long), Next::Switchover);
        // Round 0 throttles when the guest dirtied most of what it sent.
        let f = RoundFacts {
            expected: Duration::from_millis(80),
            previous: Some(40 << 20),
            ..stalled
        };
        assert_eq!(decide(&f), Next::Throttle(75));
    }

    #[test]
    fn consecutive_pages_group_into_runs() {
        let p = [0x1000, 0x2000, 0x3000, 0x5000, 0x6000];
        assert_eq!(runs(&p, 256), vec![(0x1000, 3), (0x5000, 2)]);
        assert_eq!(runs(&p, 2), vec![(0x1000, 2), (0x3000, 1), (0x5000, 2)]);
        assert!(runs(&[], 4).is_empty());
    }

    #[test]
    fn checksum_changes_with_memory() {
        let mem = crate::vstate::memory::create(128 << 20).unwrap();
        let a = memory_checksum(&mem);
        mem.write_obj(5u8, GuestAddress(0x12345)).unwrap();
        assert_ne!(memory_checksum(&mem), a);
    }
}
