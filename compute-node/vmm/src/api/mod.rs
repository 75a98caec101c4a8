//! The control endpoint (`--api-socket PATH`) and the console socket
//! (`--console-socket PATH`).
//!
//! # Control protocol
//!
//! A unix stream socket; each request is one line of JSON, each answer one
//! line of JSON, in order; a client may send many requests on a connection.
//!
//! ```text
//! client                                   neph-vmm
//!   {"cmd":"status"}\n              ──►
//!                                   ◄──   {"ok":true,"status":{...}}\n
//!   {"cmd":"shutdown","timeout_ms":5000}\n ──►
//!                                   ◄──   {"ok":true}\n   (guest asked; stopped after 5 s)
//! ```
//!
//! | `cmd` | effect | answer |
//! |---|---|---|
//! | `status` | none | `status`: `state` (`running`, `paused`, `shutting_down`), `boots`, `uptime_ms`, `vcpus`, `memory_mib`, `pid`, `fenced` (paused because the lease ran out), `lease_until_ms` (when a lease was given) |
//! | `pause` | vCPUs stop (devices idle with them) | `ok` |
//! | `resume` | vCPUs run again (a fenced VM only with an unexpired lease; clears `fenced`) | `ok` |
//! | `lease` | sets the fencing lease to `until_ms`, a `CLOCK_MONOTONIC` time in ms; when it passes without a newer `lease` the vCPUs pause and `fenced` is set. A later `lease` does not resume a fenced VM | `ok` |
//! | `shutdown` | asks the guest to power off (power button: I/O port 0x602 reads 1, see `devices::legacy`); stops it after `timeout_ms` (default 10000); refused while fenced | `ok` at once; the process exits 0 when the guest powers off or the timeout ends it |
//! | `stop` | stops the VM now; the process exits 0 | `ok` |
//! | `metrics` | none | `metrics`: `vcpus` (`id`, `tid`, `user_ms`, `system_ms`), `rss_bytes`, `guest_memory_bytes`, `console_bytes`, `disks` and `nets` (device counters) |
//! | `migrate` | starts a live migration to `to` (`HOST:PORT` of a `neph-vmm --incoming`); optional `max_downtime_ms` (default 50), `timeout_ms` (default 120000), `verify` (test mode: memory checksum compared by the target), `streams` (memory TCP streams, 1 to 8, default 1), `protocol` (wire version, default the newest; 2 for an older target), `gate` (a unix socket asked before the switchover, see `migration::SocketGate`) | `ok` and `migration` at once; on success the process exits 0 after printing `migrated` on stderr |
//! | `migrate_status` | none | `migration`: `state` (`setup`, `precopy`, `stop_and_copy`, `in_doubt`, `completed`, `failed`, `cancelled`), `to`, `round`, `bytes_sent`, `bytes_remaining`, `dirty_rate_bps`, `throughput_bps`, `expected_downtime_ms`, `throttle_percent`, `elapsed_ms`, `downtime_ms`, `downtime_us`, `error`, `side` (`source`; a target that received its VM answers with `target`), `switchover` (each stop-and-copy step, `{name, us}`, in order), `target_switchover` (the target's steps up to its acknowledgement), `streams`, `decided` (the gate said yes) |
//! | `migrate_cancel` | stops the running migration before the gate's yes; the VM runs on here; refused (`INVALID_STATE`) once the switchover is decided | `ok` |
//! | `migrate_resolve` | only `in_doubt` (the commit went out, no acknowledgement came back): `moved` true, the target runs the VM and this process exits as migrated; false, the target never will and the VM resumes here. The caller must know (the node agent asks the controllers) | `ok` |
//! | `seccomp_probe` | tests only, refused (`FAILED_PRECONDITION`) unless started with `--seccomp-probe`: `thread` (`vmm` or `vcpu`) makes a system call its filter forbids; under `--seccomp enforce` the process exits 159 | none under enforce; `FAILED` naming the mode otherwise |
//!
//! Errors are `{"ok":false,"error":{"code":CODE,"message":TEXT}}` with
//! `CODE` one of `BAD_REQUEST` (not JSON, unknown `cmd`, line over 64 KiB),
//! `INVALID_STATE` (e.g. `resume` while running), `UNAVAILABLE` (the VM is
//! going away). Example: `echo '{"cmd":"pause"}' | socat - UNIX:vm.sock`.
//!
//! # Console socket
//!
//! A unix stream socket carrying the raw serial console both ways: bytes a
//! client writes go to the guest's UART, every client receives the guest's
//! output from the moment it connects. A client that does not read loses
//! output rather than stalling the guest; the log file (or stdout) has all of
//! it.

pub mod console;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::devices::virtio::DeviceMetrics;
use crate::migration::MigrationStatus;

/// A control request. Unknown fields of `shutdown` are rejected; the
/// commands without arguments ignore extra fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Report the run state.
    Status,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Set the fencing lease (see `crate::vm`'s fencing lease section).
    Lease {
        /// Deadline on `CLOCK_MONOTONIC`, in milliseconds.
        until_ms: u64,
    },
    /// Ask the guest to shut down, stop it after the timeout.
    Shutdown {
        /// Milliseconds before the VM is stopped anyway (default 10000).
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Stop now.
    Stop,
    /// Report counters.
    Metrics,
    /// Live-migrate the VM to a `neph-vmm --incoming` at `to`.
    Migrate {
        /// `HOST:PORT` of the target.
        to: String,
        /// Downtime budget in ms (default 50).
        #[serde(default)]
        max_downtime_ms: Option<u64>,
        /// Give up and resume here after this many ms (default 120000).
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// Test mode: the target compares a checksum of all guest memory
        /// at switchover (costs a pass over memory in the downtime).
        #[serde(default)]
        verify: bool,
        /// Memory streams, 1 to 8 (default 1).
        #[serde(default)]
        streams: Option<u8>,
        /// Wire protocol version to speak (default the newest; 2 for an
        /// older target).
        #[serde(default)]
        protocol: Option<u32>,
        /// A unix socket whose server decides the switchover
        /// ([`crate::migration::SocketGate`]); default: the VMM's own gate.
        #[serde(default)]
        gate: Option<std::path::PathBuf>,
    },
    /// Progress of the current or last migration.
    MigrateStatus,
    /// Cancel the running migration (before its switchover is decided).
    MigrateCancel,
    /// Settle an in-doubt migration: where the VM runs.
    MigrateResolve {
        /// True: the target runs it; false: it never will.
        moved: bool,
    },
    /// Test probe: make a system call the `thread`'s seccomp filter
    /// forbids, so enforce mode kills the VMM. Refused unless the VMM was
    /// started with `--seccomp-probe` (it can do nothing a `stop` cannot).
    SeccompProbe {
        /// Which thread makes the call.
        thread: ProbeThread,
    },
}

/// The thread a [`Request::SeccompProbe`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeThread {
    /// The run loop (main thread).
    Vmm,
    /// vCPU 0 (the VM is paused for it).
    Vcpu,
}

/// Run state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
    /// Shutdown asked, waiting for the guest.
    ShuttingDown,
}

/// `status` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Run state.
    pub state: RunState,
    /// Boots so far (1 + reboots).
    pub boots: u64,
    /// Since the process started the first boot.
    pub uptime_ms: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory.
    pub memory_mib: u64,
    /// This process.
    pub pid: u32,
    /// Paused because the fencing lease ran out.
    #[serde(default)]
    pub fenced: bool,
    /// The current lease deadline (`CLOCK_MONOTONIC` ms), if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until_ms: Option<u64>,
}

/// Per-vCPU CPU time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuMetrics {
    /// vCPU index.
    pub id: u8,
    /// Linux thread id.
    pub tid: i32,
    /// User time.
    pub user_ms: u64,
    /// System time (includes time in the guest).
    pub system_ms: u64,
}

/// Counters of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamedDeviceMetrics {
    /// `block0`, `net0`, ...
    pub name: String,
    /// Backing file or tap.
    pub backend: String,
    /// Counters.
    #[serde(flatten)]
    pub counters: DeviceMetrics,
}

/// `metrics` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Metrics {
    /// Per vCPU.
    pub vcpus: Vec<VcpuMetrics>,
    /// Resident set of the whole process.
    pub rss_bytes: u64,
    /// Configured guest memory.
    pub guest_memory_bytes: u64,
    /// Console bytes the guest wrote.
    pub console_bytes: u64,
    /// Disks.
    pub disks: Vec<NamedDeviceMetrics>,
    /// Network interfaces.
    pub nets: Vec<NamedDeviceMetrics>,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable code.
    pub code: String,
    /// Human-readable.
    pub message: String,
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// For `status`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// For `metrics`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// For `migrate` and `migrate_status`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    /// On failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl Response {
    /// Plain success.
    pub fn ok() -> Self {
        Self {
            ok: true,
            status: None,
            metrics: None,
            migration: None,
            error: None,
        }
    }

    /// A failure.
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Self {
            ok: false,
            status: None,
            metrics: None,
            migration: None,
            error: Some(ApiError {
                code: code.to_owned(),
                message: message.into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        let r: Request = serde_json::from_str(r#"{"cmd":"shutdown","timeout_ms":5}"#).unwrap();
        assert_eq!(
            r,
            Request::Shutdown {
                timeout_ms: Some(5)
            }
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"shutdown"}"#).unwrap();
        assert_eq!(r, Request::Shutdown { timeout_ms: None });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
        let r: Request =
            serde_json::from_str(r#"{"cmd":"migrate","to":"10.0.0.2:7000","max_downtime_ms":20}"#)
                .unwrap();
        assert_eq!(
            r,
            Request::Migrate {
                to: "10.0.0.2:7000".into(),
                max_downtime_ms: Some(20),
                timeout_ms: None,
                verify: false,
                streams: None,
                protocol: None,
                gate: None,
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"migrate"}"#).is_err());
        let r: Request = serde_json::from_str(r#"{"cmd":"lease","until_ms":123}"#).unwrap();
        assert_eq!(r, Request::Lease { until_ms: 123 });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"lease"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"lease","until_ms":-1}"#).is_err());
        // A misspelt argument is an error, not a silent default.
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"shutdown","timeout":1}"#).is_err());
        let s = serde_json::to_string(&Response::error("BAD_REQUEST", "no")).unwrap();
        assert_eq!(
            s,
            r#"{"ok":false,"error":{"code":"BAD_REQUEST","message":"no"}}"#
        );
    }
}
