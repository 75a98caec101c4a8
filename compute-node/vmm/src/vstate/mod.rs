//! The VM's mutable hardware state: guest memory and vCPUs.

pub mod memory;
pub mod vcpu;
