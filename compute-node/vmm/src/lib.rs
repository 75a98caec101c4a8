//! `neph-vmm`, the Nephele hypervisor: one KVM virtual machine per process.
//! It owns vCPU threads, guest memory, the serial console and the virtio-pci
//! devices, and is the only crate in the workspace allowed `unsafe`.
