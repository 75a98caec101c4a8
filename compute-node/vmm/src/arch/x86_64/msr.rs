//! Boot-time MSR values, limited to the MSRs KVM lists as supported (PVM
//! lacks some hardware-only ones, e.g. 0x10a, so nothing is assumed).

use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::VcpuFd;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WB: u64 = 6;

/// Setting the boot MSRs failed.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// The ioctl failed outright.
    #[error("KVM refused the boot MSRs")]
    Kvm(#[source] kvm_ioctls::Error),
    /// KVM stopped at an MSR it had listed as supported.
    #[error("KVM set {set} of {total} boot MSRs; it refused MSR {index:#x}")]
    Partial {
        /// How many were set.
        set: usize,
        /// How many were asked.
        total: usize,
        /// The first one refused.
        index: u32,
    },
}

/// The boot MSR values, keeping only indices in `supported`.
pub fn boot_msrs(supported: &[u32]) -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB),
    ]
    .into_iter()
    .filter(|(index, _)| supported.contains(index))
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets the boot MSRs on `vcpu`.
pub fn setup(vcpu: &VcpuFd, supported: &[u32]) -> Result<(), MsrError> {
    let entries = boot_msrs(supported);
    if entries.is_empty() {
        return Ok(());
    }
    let msrs = Msrs::from_entries(&entries).map_err(|_| MsrError::Partial {
        set: 0,
        total: entries.len(),
        index: 0,
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Kvm)?;
    if set != entries.len() {
        return Err(MsrError::Partial {
            set,
            total: entries.len(),
            index: entries[set].index,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_msrs_are_skipped() {
        assert!(boot_msrs(&[]).is_empty());
        let only = boot_msrs(&[MSR_LSTAR, 0x10a]);
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].index, MSR_LSTAR);
    }
}
