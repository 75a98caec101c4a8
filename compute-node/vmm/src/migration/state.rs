//! Saved machine state as plain, versioned, serde-able data: each vCPU
//! (registers, special registers, FPU or XSAVE, XCRs, MSRs, LAPIC, MP state,
//! vCPU events, debug registers), the VM (PIC, IOAPIC, PIT, KVM clock) and
//! the devices (serial, each virtio-pci device with its PCI configuration,
//! MSI-X and queue positions). The kvm-bindings structures carry their own
//! serde (byte images); the rest is ours.
//!
//! A [`MachineState`] from the wire is untrusted: [`MachineState::validate`]
//! checks counts and sizes against the VM it is loaded into, and each
//! restore step checks its part again (the devices refuse state that does
//! not fit them). Saving skips only what this host's KVM does not support
//! (probed with `KVM_CHECK_EXTENSION`): XSAVE falls back to the legacy FPU
//! image, XCRs and vCPU events are left out without their capabilities.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::devices::serial::SerialSavedState;
use crate::devices::virtio::pci::VirtioPciState;

/// Version of [`MachineState`]'s layout.
pub const STATE_VERSION: u32 = 1;
/// MSR_IA32_TSC: moved forward by the time the VM spent in transit.
pub const MSR_IA32_TSC: u32 = 0x10;
/// MSRs saved per vCPU at most (KVM lists a few hundred at most).
const MAX_MSRS: usize = 1024;

/// Saving or loading machine state failed.
#[derive(Debug, thiserror::Error)]
pub enum MachineStateError {
    /// A KVM get or set ioctl failed.
    #[error("KVM refused to {what} of vCPU {id}")]
    Vcpu {
        /// Which operation.
        what: &'static str,
        /// vCPU.
        id: u8,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A VM-level ioctl failed.
    #[error("KVM refused to {0}")]
    Vm(&'static str, #[source] kvm_ioctls::Error),
    /// The state does not fit this VM.
    #[error("the saved state does not fit this VM: {0}")]
    Invalid(String),
    /// A vCPU thread did not answer.
    #[error("vCPU {0} did not hand over its state")]
    NoAnswer(u8),
}

/// The x87/SSE image without XSAVE (kvm-bindings has no serde for it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers.
    pub fpr: Vec<[u8; 16]>,
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM registers.
    pub xmm: Vec<[u8; 16]>,
    /// MXCSR.
    pub mxcsr: u32,
}

impl FpuState {
    fn from_kvm(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }

    fn to_kvm(&self) -> Option<kvm_fpu> {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        if self.fpr.len() != f.fpr.len() || self.xmm.len() != f.xmm.len() {
            return None;
        }
        f.fpr.copy_from_slice(&self.fpr);
        f.xmm.copy_from_slice(&self.xmm);
        Some(f)
    }
}

/// FPU state: XSAVE where KVM has it, else the legacy image.
#[derive(Debug, Serialize, Deserialize)]
pub enum FpuImage {
    /// `KVM_GET_XSAVE` (4 KiB).
    Xsave(Box<kvm_xsave>),
    /// `KVM_GET_FPU`.
    Legacy(FpuState),
}

/// One vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u8,
    /// MP state (running, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor table registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX.
    pub fpu: FpuImage,
    /// Extended control registers, where supported.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC page.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists and lets us read: (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs, where supported.
    pub events: Option<kvm_vcpu_events>,
    /// TSC frequency in kHz (0 if unknown).
    pub tsc_khz: u32,
}

/// VM-wide state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmWideState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// Host wall clock (ns since the epoch) when the state was taken: the
    /// target moves the KVM clock and the TSC on by the time in transit, so
    /// the guest sees the real downtime.
    pub saved_at_unix_ns: u64,
}

/// Device state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialSavedState,
    /// Every virtio-pci device, in bus order.
    pub virtio: Vec<VirtioPciState>,
}

/// Everything but memory and disks.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Whether the VM was paused by its operator (it stays paused).
    pub paused: bool,
    /// Per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide.
    pub vm: VmWideState,
    /// Devices.
    pub devices: DevicesState,
}

impl MachineState {
    /// Checks what can be checked before touching the VM: version, vCPU
    /// count and order, sizes of variable parts.
    pub fn validate(&self, vcpus: u8, virtio_devices: usize) -> Result<(), MachineStateError> {
        let bad = |m: String| Err(MachineStateError::Invalid(m));
        if self.version != STATE_VERSION {
            return bad(format!(
                "state version {} is not {STATE_VERSION}",
                self.version
            ));
        }
        if self.vcpus.len() != usize::from(vcpus) {
            return bad(format!("{} vCPUs saved, {vcpus} here", self.vcpus.len()));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if usize::from(v.id) != i {
                return bad(format!("vCPU {i} is saved as vCPU {}", v.id));
            }
            if v.msrs.len() > MAX_MSRS {
                return bad(format!("vCPU {i} has {} MSRs", v.msrs.len()));
            }
            if let FpuImage::Legacy(f) = &v.fpu
                && f.to_kvm().is_none()
            {
                return bad(format!("vCPU {i} has a malformed FPU image"));
            }
        }
        if self.vm.irqchips.len() != 3 {
            return bad(format!(
                "{} irqchips saved, 3 expected",
                self.vm.irqchips.len()
            ));
        }
        for (c, want) in self.vm.irqchips.iter().zip([
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ]) {
            if c.chip_id != want {
                return bad(format!("irqchip {} where {want} was expected", c.chip_id));
            }
        }
        if self.devices.virtio.len() != virtio_devices {
            return bad(format!(
                "{} virtio devices saved, {virtio_devices} here",
                self.devices.virtio.len()
            ));
        }
        Ok(())
    }
}

/// What this host's KVM lets us save; probed once.
#[derive(Debug, Clone, Copy)]
pub struct SaveCaps {
    /// `KVM_CAP_XSAVE`.
    pub xsave: bool,
    /// `KVM_CAP_XCRS`.
    pub xcrs: bool,
    /// `KVM_CAP_VCPU_EVENTS`.
    pub vcpu_events: bool,
    /// `KVM_CAP_DEBUGREGS`.
    pub debugregs: bool,
}

impl SaveCaps {
    /// Probes `kvm`.
    pub fn probe(kvm: &Kvm) -> Self {
        Self {
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            vcpu_events: kvm.check_extension(Cap::VcpuEvents),
            debugregs: kvm.check_extension(Cap::Debugregs),
        }
    }
}

/// Saves vCPU `id` (its thread must be out of `KVM_RUN`).
pub fn save_vcpu(
    fd: &VcpuFd,
    id: u8,
    caps: SaveCaps,
    msr_list: &[u32],
) -> Result<VcpuState, MachineStateError> {
    let err = |what| move |source| MachineStateError::Vcpu { what, id, source };
    let mp_state = fd.get_mp_state().map_err(err("read the MP state"))?;
    let regs = fd.get_regs().map_err(err("read the registers"))?;
    let sregs = fd.get_sregs().map_err(err("read the special registers"))?;
    let fpu = if caps.xsave {
        FpuImage::Xsave(Box::new(fd.get_xsave().map_err(err("read XSAVE"))?))
    } else {
        FpuImage::Legacy(FpuState::from_kvm(
            &fd.get_fpu().map_err(err("read the FPU"))?,
        ))
    };
    let xcrs = if caps.xcrs {
        Some(fd.get_xcrs().map_err(err("read the XCRs"))?)
    } else {
        None
    };
    let debugregs = if caps.debugregs {
        fd.get_debug_regs()
            .map_err(err("read the debug registers"))?
    } else {
        kvm_debugregs::default()
    };
    let lapic = fd.get_lapic().map_err(err("read the LAPIC"))?;
    let msrs = read_msrs(fd, id, msr_list)?;
    let events = if caps.vcpu_events {
        Some(fd.get_vcpu_events().map_err(err("read the vCPU events"))?)
    } else {
        None
    };
    let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
    Ok(VcpuState {
        id,
        mp_state,
        regs,
        sregs,
        fpu,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
        tsc_khz,
    })
}

/// Reads every MSR of `list` KVM lets us read: one batch, skipping an
/// index KVM refuses and going on after it.
fn read_msrs(fd: &VcpuFd, id: u8, list: &[u32]) -> Result<Vec<(u32, u64)>, MachineStateError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = &list[..list.len().min(MAX_MSRS)];
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| MachineStateError::Invalid("too many MSRs".into()))?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|source| MachineStateError::Vcpu {
                what: "read the MSRs",
                id,
                source,
            })?;
        out.extend(msrs.as_slice().iter().take(n).map(|e| (e.index, e.data)));
        // Entry `n` was refused: skip it.
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Loads `state` into a vCPU that has not run (created with its CPUID),
/// moving the TSC on by `elapsed_ns` of transit.
pub fn restore_vcpu(
    fd: &VcpuFd,
    state: &VcpuState,
    elapsed_ns: u64,
) -> Result<(), MachineStateError> {
    let id = state.id;
    let err = |what| move |source| MachineStateError::Vcpu { what, id, source };
    fd.set_mp_state(state.mp_state)
        .map_err(err("set the MP state"))?;
    fd.set_regs(&state.regs).map_err(err("set the registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(err("set the special registers"))?;
    match &state.fpu {
        FpuImage::Xsave(x) => {
            // SAFETY: `x` is a complete `kvm_xsave` (4 KiB legacy area and
            // header), the size KVM_SET_XSAVE reads; KVM validates its
            // contents and refuses bad ones with EINVAL.
            unsafe { fd.set_xsave(x) }.map_err(err("set XSAVE"))?
        }
        FpuImage::Legacy(f) => {
            let f = f
                .to_kvm()
                .ok_or_else(|| MachineStateError::Invalid("malformed FPU image".into()))?;
            fd.set_fpu(&f).map_err(err("set the FPU"))?
        }
    }
    if let Some(x) = &state.xcrs {
        fd.set_xcrs(x).map_err(err("set the XCRs"))?;
    }
    fd.set_debug_regs(&state.debugregs)
        .map_err(err("set the debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(err("set the LAPIC"))?;
    let ticks = u64::from(state.tsc_khz).saturating_mul(elapsed_ns / 1_000) / 1_000;
    let entries: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data: if index == MSR_IA32_TSC {
                data.wrapping_add(ticks)
            } else {
                data
            },
            ..Default::default()
        })
        .collect();
    let mut rest = entries.as_slice();
    let mut refused = Vec::new();
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest)
            .map_err(|_| MachineStateError::Invalid("too many MSRs".into()))?;
        let n = fd.set_msrs(&msrs).map_err(err("set the MSRs"))?;
        if let Some(e) = rest.get(n) {
            refused.push(e.index);
        }
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    if !refused.is_empty() {
        // The same MSRs were readable on the source; a host that refuses
        // some is a different host. Say so, but the guest may not care.
        eprintln!(
            "neph-vmm: vCPU {id}: this host refused MSRs {}",
            refused
                .iter()
                .map(|i| format!("{i:#x}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(e) = &state.events {
        fd.set_vcpu_events(e).map_err(err("set the vCPU events"))?;
    }
    Ok(())
}

/// Wall clock now, ns since the epoch.
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Saves the VM-wide state (vCPUs paused).
pub fn save_vm(vm: &VmFd) -> Result<VmWideState, MachineStateError> {
    let mut irqchips = Vec::with_capacity(3);
    for chip_id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut c = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c)
            .map_err(|e| MachineStateError::Vm("read the irqchip", e))?;
        irqchips.push(c);
    }
    let pit = vm
        .get_pit2()
        .map_err(|e| MachineStateError::Vm("read the PIT", e))?;
    let clock = vm
        .get_clock()
        .map_err(|e| MachineStateError::Vm("read the KVM clock", e))?;
    Ok(VmWideState {
        irqchips,
        pit,
        clock,
        saved_at_unix_ns: unix_ns(),
    })
}

/// Loads VM-wide state (before the vCPUs), moving the KVM clock on by
/// `elapsed_ns` of transit.
pub fn restore_vm(
    vm: &VmFd,
    state: &VmWideState,
    elapsed_ns: u64,
) -> Result<(), MachineStateError> {
    vm.set_pit2(&state.pit)
        .map_err(|e| MachineStateError::Vm("set the PIT", e))?;
    let clock = kvm_clock_data {
        clock: state.clock.clock.wrapping_add(elapsed_ns),
        // Only the clock value is meaningful to KVM_SET_CLOCK here.
        flags: 0,
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(|e| MachineStateError::Vm("set the KVM clock", e))?;
    for c in &state.irqchips {
        vm.set_irqchip(c)
            .map_err(|e| MachineStateError::Vm("set the irqchip", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(vcpus: u8) -> MachineState {
        let chip = |chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        MachineState {
            version: STATE_VERSION,
            paused: false,
            vcpus: (0..vcpus)
                .map(|id| VcpuState {
                    id,
                    mp_state: kvm_mp_state::default(),
                    regs: kvm_regs {
                        rip: 0x1000 + u64::from(id),
                        ..Default::default()
                    },
                    sregs: kvm_sregs::default(),
                    fpu: FpuImage::Legacy(FpuState::from_kvm(&kvm_fpu::default())),
                    xcrs: None,
                    debugregs: kvm_debugregs::default(),
                    lapic: kvm_lapic_state::default(),
                    msrs: vec![(MSR_IA32_TSC, 42)],
                    events: None,
                    tsc_khz: 1_000_000,
                })
                .collect(),
            vm: VmWideState {
                irqchips: vec![
                    chip(KVM_IRQCHIP_PIC_MASTER),
                    chip(KVM_IRQCHIP_PIC_SLAVE),
                    chip(KVM_IRQCHIP_IOAPIC),
                ],
                pit: kvm_pit_state2::default(),
                clock: kvm_clock_data::default(),
                saved_at_unix_ns: 1,
            },
            devices: DevicesState {
                serial: SerialSavedState {
                    baud_divisor: [12, 0],
                    interrupt_enable: 0,
                    interrupt_identification: 1,
                    line_control: 3,
                    line_status: 0x60,
                    modem_control: 8,
                    modem_status: 0xb0,
                    scratch: 0,
                    fifo: vec![],
                    pending: vec![],
                },
                virtio: vec![],
            },
        }
    }

    #[test]
    fn state_round_trips_through_postcard_and_validates() {
        let s = sample(2);
        let bytes = postcard::to_stdvec(&s).unwrap();
        let back: MachineState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.vcpus[1].regs.rip, 0x1001);
        assert_eq!(back.vcpus[0].msrs, vec![(MSR_IA32_TSC, 42)]);
        back.validate(2, 0).unwrap();
    }

    #[test]
    fn state_that_does_not_fit_is_refused() {
        let s = sample(2);
        assert!(s.validate(1, 0).is_err());
        assert!(s.validate(2, 1).is_err());
        let mut s2 = sample(2);
        s2.vcpus[1].id = 0;
        assert!(s2.validate(2, 0).is_err());
        let mut s3 = sample(1);
        s3.vm.irqchips.pop();
        assert!(s3.validate(1, 0).is_err());
        let mut s4 = sample(1);
        s4.version = 99;
        assert!(s4.validate(1, 0).is_err());
        let mut s5 = sample(1);
        if let FpuImage::Legacy(f) = &mut s5.vcpus[0].fpu {
            f.xmm.pop();
        }
        assert!(s5.validate(1, 0).is_err());
    }

    #[test]
    fn truncated_state_does_not_decode() {
        let bytes = postcard::to_stdvec(&sample(1)).unwrap();
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(postcard::from_bytes::<MachineState>(&bytes[..cut]).is_err());
        }
    }
}
