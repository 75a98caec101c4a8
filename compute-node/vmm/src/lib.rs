//! `neph-vmm`, the Nephele hypervisor: one KVM virtual machine per process.
//! It owns vCPU threads, guest memory, the serial console and the virtio-pci
//! devices, and is the only crate in the workspace allowed `unsafe`.
//!
//! Map:
//!
//! - [`config`]: [`VmConfig`], the command-line forms and their validation;
//! - [`builder`]: [`VmConfig`] to a [`Vm`] (KVM VM, memory, tables, kernel,
//!   devices, vCPUs); [`vm`]: the run loop (poweroff, reboot, control);
//! - [`vstate`]: guest memory and vCPU threads;
//! - [`arch`]: x86_64 layout, registers, CPUID, MSRs, MP table, ACPI, loader;
//! - [`devices`]: serial, legacy ports, PCI, virtio (`virtio/<device>/`);
//! - [`api`]: the control socket protocol and the console socket;
//! - [`probe`]: the KVM capability report (`neph-vmm --probe`);
//! - [`sandbox`]: seccomp filters per thread, privilege drop, cgroup limits;
//! - [`migration`]: pre-copy live migration (source, target, wire
//!   protocol, dirty tracking, saved state).
//!
//! The guest-facing contract is `docs/guest-platform.md`.
//!
//! Driving the library (needs `/dev/kvm`):
//!
//! ```no_run
//! use neph_vmm::{VmConfig, devices::serial::Console};
//! let mut config = VmConfig::new("guest.elf");
//! config.vcpus = 2;
//! let console = Console::new(Box::new(std::io::stdout()));
//! let vm = neph_vmm::build(config, console)?;
//! let handle = vm.handle(); // for control requests from other threads
//! let exit = vm.run()?;
//! # let _ = (handle, exit);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod migration;
pub mod probe;
pub mod sandbox;
pub mod terminal;
pub mod vm;
pub mod vstate;

pub use builder::{StartVmError, build};
pub use config::VmConfig;
pub use vm::{RunVmError, Vm, VmExit, VmHandle};
