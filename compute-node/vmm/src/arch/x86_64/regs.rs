//! Initial register state of the boot vCPU: 32-bit protected mode for a PVH
//! entry, 64-bit long mode with identity-mapped page tables for the Linux
//! boot protocol; the FPU and the local APIC's LINT pins for every vCPU.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{
    BOOT_STACK_POINTER, GDT_START, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, `EBX` = `hvm_start_info`.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, `RSI` = zero page.
    Linux64,
}

/// Setting a vCPU's registers failed.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM ioctl failed.
    #[error("KVM refused the {0} registers")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The GDT or page tables do not fit in guest memory.
    #[error("the boot GDT or page tables do not fit in guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// A GDT descriptor from its flags, base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (base, limit, flags) = (u64::from(base), u64::from(limit), u64::from(flags));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM segment a GDT descriptor describes, at GDT slot `index`.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let g = bit(55);
    let raw_limit = u32::try_from((entry & 0xffff) | ((entry >> 32) & 0xf_0000)).unwrap_or(0);
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn write_gdt<M: GuestMemory>(mem: &M, gdt: &[u64]) -> Result<(), RegsError> {
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(RegsError::Memory)?;
    }
    Ok(())
}

fn write_page_tables<M: GuestMemory>(mem: &M) -> Result<(), RegsError> {
    let w = |v: u64, a: u64| mem.write_obj(v, GuestAddress(a)).map_err(RegsError::Memory);
    w(PDPTE_START | 0x03, PML4_START)?;
    for i in 0..4u64 {
        w((PDE_START + i * 0x1000) | 0x03, PDPTE_START + i * 8)?;
    }
    // 2048 2 MiB pages: the first 4 GiB, identity-mapped.
    let mut pdes = vec![0u8; 2048 * 8];
    for (i, chunk) in pdes.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&(((i as u64) << 21) | 0x83).to_le_bytes());
    }
    mem.write_slice(&pdes, GuestAddress(PDE_START))
        .map_err(RegsError::Memory)
}

/// Sets the boot vCPU's general, special and FPU registers for `mode`.
pub fn setup_boot_regs<M: GuestMemory>(
    vcpu: &VcpuFd,
    mem: &M,
    mode: EntryMode,
    entry: u64,
) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(|e| RegsError::Kvm("special", e))?;
    let code = match mode {
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff),
    };
    let gdt = [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0xfffff),
    ];
    write_gdt(mem, &gdt)?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = u16::try_from(gdt.len() * 8 - 1).unwrap_or(u16::MAX);
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = segment_from_gdt(gdt[1], 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);

    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = PVH_INFO_START;
        }
        EntryMode::Linux64 => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("special", e))?;
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Kvm("general", e))?;
    Ok(())
}

/// Sets the x87/SSE control words every vCPU starts with.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| RegsError::Kvm("FPU", e))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, off: usize) -> u32 {
    let b = &state.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        state.regs[off + i] = *byte as _;
    }
}

/// Wires LINT0 to ExtINT (the 8259) and LINT1 to NMI, as firmware would.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(|e| RegsError::Kvm("LAPIC", e))?;
    let delivery = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(&lapic, APIC_LVT0);
    set_lapic_reg(&mut lapic, APIC_LVT0, delivery(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(&mut lapic, APIC_LVT1, delivery(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_segments_decode() {
        let code32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.base, code32.limit), (0, 0xffff_ffff));
        assert_eq!(
            (code32.db, code32.l, code32.type_, code32.selector),
            (1, 0, 0xb, 8)
        );
        assert_eq!(
            (code32.present, code32.s, code32.g, code32.unusable),
            (1, 1, 1, 0)
        );
        let code64 = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code64.db, code64.l), (0, 1));
        let tss = segment_from_gdt(gdt_entry(0x008b, 0x1000, 0x67), 3);
        assert_eq!((tss.base, tss.limit, tss.g, tss.s), (0x1000, 0x67, 0, 0));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }
}
