//! The VMM's sandbox (issue 7; `docs/threat-model.md`, boundary 5): what
//! a guest that takes over a VMM thread can still do.
//!
//! - [`seccomp`]: a filter per thread kind, installed as each thread
//!   starts (`--seccomp off|log|enforce`, default enforce);
//! - [`privilege`]: after `/dev/kvm`, the taps, the disks and the sockets
//!   are open, switch to an unprivileged user, drop every capability, set
//!   no_new_privs (`--user`);
//! - [`cgroup`]: the process in its own cgroup with memory and CPU limits
//!   derived from the VM's size (`--cgroup`).

pub mod cgroup;
pub mod privilege;
pub mod seccomp;
