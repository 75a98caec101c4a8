//! The hardware side of the test guest (bare metal only; not built for host
//! unit tests): boot code, CPU and clock, console, interrupts, firmware
//! tables, PCI, virtio drivers, workloads and the shell loop.

pub mod blk;
pub mod boot;
pub mod clock;
pub mod cpu;
pub mod dma;
pub mod intr;
pub mod machine;
pub mod nic;
pub mod once;
pub mod pci;
pub mod platform;
pub mod rng;
pub mod serial;
pub mod smp;
pub mod virtio;
pub mod workload;
