//! Pre-copy live migration of a running VM between two `neph-vmm`
//! processes over TCP.
//!
//! - [`protocol`]: the versioned wire format and its sequence diagram;
//! - [`source`]: the sending side (rounds, stop-and-copy, auto-converge,
//!   cancel, rollback), driven by the `migrate` control request;
//! - [`target`]: the receiving side (`neph-vmm --incoming HOST:PORT`);
//! - [`dirty`]: which pages and disk chunks are still to send;
//! - [`state`]: vCPU, VM and device state as plain serde data.
//!
//! Exactly one running copy: the source asks its [`SwitchoverGate`] (the
//! controllers' Raft log through the node agent: [`SocketGate`], named by
//! the `migrate` request's `gate`; [`AlwaysSwitch`] without one) once
//! pre-copy has nearly converged, while the guest still runs; only after
//! its yes does it pause the VM and send the last pages, the state and
//! `Complete`, on which the target runs the VM. Any failure before
//! `Complete` went out resumes the VM on the source (the target never runs
//! it without `Complete`); a failure after it leaves the source in doubt,
//! the VM paused, until `migrate_resolve` tells it where the VM runs (the
//! target writes its `--arrival-file` before it wakes the vCPUs, so its
//! agent can tell, see `compute-node/agent/src/migrate.rs`).
//!
//! # Where the downtime goes
//!
//! The guest's downtime is what the source's stop-and-copy and the target's
//! load take, plus what the host adds around a pause (PVM re-faulting the
//! guest's pages, scheduling). Each step is timed on both sides and reported
//! as [`MigrationStatus::switchover`] / [`MigrationStatus::target_switchover`]
//! (and in the target's own `migrate_status`); the bench prints them. What
//! keeps it small:
//! - the target builds its VM (memory, vCPUs, devices) when `--incoming`
//!   starts, from `--cpus`/`--memory`/`--no-rng` (rebuilt only if the
//!   source's differs), and starts its vCPU and device threads parked as
//!   soon as the source connects; at the switchover it loads the state on
//!   the parked threads (~0.1 ms) and the commit only wakes them;
//! - pre-copy runs until the predicted stop-and-copy is a few milliseconds
//!   (the budget, 50 ms by default, is a ceiling), and the state follows
//!   the last pages in the same burst;
//! - auto-converge throttles in 3 ms periods, so a throttled guest never
//!   sees a long pause, and the copy runs at a lower priority than the
//!   vCPUs until the switchover.
//!
//! Measured on the 2-core PVM test host (1 GiB guest, noisy: other builds
//! running), source-side stop-and-copy: idle ~0.5-1 ms, 64 MiB/s ~1-3 ms,
//! max dirtying ~4-8 ms; target load to resume ~0.2 ms. The guest's own
//! ticker adds 1-5 ms on top here, about what a plain pause/resume of the
//! same VM costs it on this host.
//!
//! # Memory streams
//!
//! Protocol version 2 can carry memory over several TCP connections
//! (`migrate` with `streams`). On the 2-core loopback test host one stream
//! is as fast as two (the copy threads, the vCPU and the target share two
//! cores), so the default is one; the code path is kept and tested for
//! hosts with cores and links to spare.

pub mod dirty;
pub mod protocol;
pub mod source;
pub mod state;
pub mod target;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Decides whether a migration may commit: the last step before the source
/// gives up its VM. The node agent will implement this with an entry in
/// the controllers' Raft log ("instance X now runs on node B"), so a
/// partitioned source can never resume a VM that has moved.
pub trait SwitchoverGate: Send + Sync + std::fmt::Debug {
    /// True to commit the switchover; false aborts the migration and the
    /// source resumes the VM.
    fn allow_switchover(&self, target: &str) -> bool;
}

/// The default gate: always yes.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysSwitch;

impl SwitchoverGate for AlwaysSwitch {
    fn allow_switchover(&self, _target: &str) -> bool {
        true
    }
}

/// A gate answered by another process on a unix socket (the node agent,
/// which asks the controllers to commit the switchover in their log).
///
/// The exchange, one connection per question: the VMM sends one JSON line
/// `{"target":"HOST:PORT"}`, the agent answers one line
/// `{"allowed":true}` (or `false`, with a `reason`). No answer within
/// [`SocketGate::TIMEOUT`], a closed socket or anything else is a no.
#[derive(Debug, Clone)]
pub struct SocketGate {
    path: PathBuf,
}

/// A gate's answer on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateAnswer {
    /// Yes: the switchover is committed.
    pub allowed: bool,
    /// Why not.
    #[serde(default)]
    pub reason: String,
}

/// A gate's question on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateQuestion {
    /// The target the VM would go to.
    pub target: String,
}

impl SocketGate {
    /// Longest wait for the answer (a Raft commit, with leader failover).
    pub const TIMEOUT: Duration = Duration::from_secs(20);

    /// The gate served at `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    fn ask(&self, target: &str) -> Result<GateAnswer, String> {
        let mut s = UnixStream::connect(&self.path)
            .map_err(|e| format!("cannot reach the gate {}: {e}", self.path.display()))?;
        s.set_read_timeout(Some(Self::TIMEOUT))
            .and_then(|()| s.set_write_timeout(Some(Self::TIMEOUT)))
            .map_err(|e| format!("gate socket: {e}"))?;
        let mut q = serde_json::to_string(&GateQuestion {
            target: target.to_owned(),
        })
        .map_err(|e| e.to_string())?;
        q.push('\n');
        s.write_all(q.as_bytes())
            .map_err(|e| format!("cannot ask the gate: {e}"))?;
        let mut line = String::new();
        BufReader::new(std::io::Read::take(s, 4096))
            .read_line(&mut line)
            .map_err(|e| format!("no answer from the gate: {e}"))?;
        serde_json::from_str(&line).map_err(|e| format!("bad answer from the gate: {e}"))
    }
}

impl SwitchoverGate for SocketGate {
    fn allow_switchover(&self, target: &str) -> bool {
        match self.ask(target) {
            Ok(a) if a.allowed => true,
            Ok(a) => {
                eprintln!("neph-vmm: the switchover gate said no: {}", a.reason);
                false
            }
            Err(e) => {
                eprintln!("neph-vmm: the switchover gate did not say yes: {e}");
                false
            }
        }
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// Connecting and sending the configuration.
    Setup,
    /// Copying memory and disks while the guest runs.
    Precopy,
    /// The VM is paused, the last pages and the state are going.
    StopAndCopy,
    /// The commit went out but the target's acknowledgement did not come
    /// back: the VM stays paused here until `migrate_resolve`.
    InDoubt,
    /// The target runs the VM; this process exits.
    Completed,
    /// Failed (or timed out); the VM runs here again.
    Failed,
    /// Cancelled; the VM runs here again.
    Cancelled,
}

/// Progress of the current (or last) migration, as `migrate_status`
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// State.
    pub state: MigrationState,
    /// Target address.
    pub to: String,
    /// Round: 0 is the full pass, then one per dirty round.
    pub round: u32,
    /// Bytes sent so far (memory, disks, state; framing included).
    pub bytes_sent: u64,
    /// Estimated bytes still to send (dirty pages and chunks now).
    pub bytes_remaining: u64,
    /// Guest dirty rate measured in the last round, bytes per second.
    pub dirty_rate_bps: u64,
    /// Link throughput measured so far, bytes per second.
    pub throughput_bps: u64,
    /// Predicted downtime if the VM stopped now, ms.
    pub expected_downtime_ms: u64,
    /// Auto-converge throttle: percent of each 3 ms the vCPUs are paused.
    pub throttle_percent: u8,
    /// Since the migration started, ms.
    pub elapsed_ms: u64,
    /// Measured downtime (VM paused on the source until the target
    /// acknowledged), once known, ms.
    pub downtime_ms: Option<u64>,
    /// The same, microseconds (from the stop request to the commit sent).
    #[serde(default)]
    pub downtime_us: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    /// Which end of the migration this status describes.
    #[serde(default)]
    pub side: Side,
    /// The switchover step by step on this side, in order: how long each
    /// step took (empty until the switchover starts).
    #[serde(default)]
    pub switchover: Vec<Phase>,
    /// The target's steps up to its acknowledgement, as it reported them
    /// (protocol version 2 and later; its resume comes after and is in
    /// the target's own `migrate_status`).
    #[serde(default)]
    pub target_switchover: Vec<Phase>,
    /// Memory streams in use.
    #[serde(default)]
    pub streams: u8,
    /// The gate said yes: the switchover is decided and can no longer be
    /// cancelled.
    #[serde(default)]
    pub decided: bool,
}

/// Which end a [`MigrationStatus`] describes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The sending VMM.
    #[default]
    Source,
    /// The receiving VMM (`--incoming`).
    Target,
}

/// One step of a switchover and how long it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    /// What the step did (`pause`, `save`, `last_pages`, `restore`, ...).
    pub name: String,
    /// Its duration, microseconds.
    pub us: u64,
}

/// Times consecutive steps: each [`PhaseClock::lap`] closes the step that
/// began at the previous one.
#[derive(Debug)]
pub struct PhaseClock {
    start: Instant,
    last: Instant,
    phases: Vec<Phase>,
}

impl Default for PhaseClock {
    fn default() -> Self {
        Self::new()
    }
}

impl PhaseClock {
    /// Starts timing now.
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
            phases: Vec::new(),
        }
    }

    /// Closes the current step as `name`.
    pub fn lap(&mut self, name: &str) {
        let now = Instant::now();
        self.phases.push(Phase {
            name: name.to_owned(),
            us: micros(now - self.last),
        });
        self.last = now;
    }

    /// Since [`PhaseClock::new`].
    pub fn total(&self) -> std::time::Duration {
        self.start.elapsed()
    }

    /// The steps so far.
    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }
}

/// A duration in whole microseconds (saturating).
pub fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The steps as one line, e.g. `pause 120us, save 800us`.
pub fn describe_phases(phases: &[Phase]) -> String {
    phases
        .iter()
        .map(|p| format!("{} {}us", p.name, p.us))
        .collect::<Vec<_>>()
        .join(", ")
}
