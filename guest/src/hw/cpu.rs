//! CPU primitives: port I/O, MSRs, CPUID, the TSC, halting, interrupt flag,
//! and MMIO accessors.
//!
//! Port I/O and MMIO are exposed as safe functions: this guest has no Rust
//! memory behind any I/O port, and MMIO addresses are checked to lie in the
//! identity-mapped range outside RAM (see [`mmio_ok`]), so neither can break
//! memory safety by itself. The only DMA-capable devices are the virtio
//! devices, programmed solely with buffers their drivers own.

use core::arch::asm;
use core::arch::x86_64::{__cpuid_count, _rdtsc};

use super::boot::MAPPED_LIMIT;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, val: u8) {
    // SAFETY: port I/O touches no memory (see the module doc).
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a word to an I/O port.
pub fn outw(port: u16, val: u16) {
    // SAFETY: port I/O touches no memory.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") val, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a dword to an I/O port.
pub fn outl(port: u16, val: u32) {
    // SAFETY: port I/O touches no memory.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O touches no memory.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads a dword from an I/O port.
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: port I/O touches no memory.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads an MSR. An MSR the hypervisor does not know raises #GP, which the
/// exception handler reports as a fatal error.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading an MSR has no memory effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes an MSR.
///
/// # Safety
/// The write must not change paging, segmentation or anything else the
/// running Rust code relies on, and any memory address it hands to the
/// hypervisor must stay reserved for that use.
pub unsafe fn wrmsr(msr: u32, val: u64) {
    // SAFETY: the caller upholds the contract above.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") val as u32, in("edx") (val >> 32) as u32, options(nostack, preserves_flags))
    }
}

/// CPUID leaf/subleaf as (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86_64 CPU and has no side effects.
    let r = unsafe { __cpuid_count(leaf, sub) };
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    #[allow(unused_unsafe)]
    // SAFETY: RDTSC has no side effects.
    unsafe {
        _rdtsc()
    }
}

/// Reads CR2 (the faulting address of the last page fault).
pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Enables interrupts.
pub fn sti() {
    // SAFETY: every vector that can fire has an IST-stack handler that saves
    // all state it clobbers (see `intr`), so interrupts cannot corrupt the
    // interrupted code, its red zone or its SSE registers.
    unsafe { asm!("sti", options(nomem, nostack)) }
}

/// Disables interrupts.
pub fn cli() {
    // SAFETY: masking interrupts has no memory effects.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

/// Whether interrupts are enabled.
pub fn interrupts_enabled() -> bool {
    let flags: u64;
    // SAFETY: reads RFLAGS through the stack, touching nothing else.
    unsafe { asm!("pushfq", "pop {}", out(reg) flags, options(nomem, preserves_flags)) }
    flags & (1 << 9) != 0
}

/// Runs `f` with interrupts masked.
pub fn without_interrupts<R>(f: impl FnOnce() -> R) -> R {
    let was = interrupts_enabled();
    cli();
    let r = f();
    if was {
        sti();
    }
    r
}

/// Waits for the next interrupt (returns at once if one is pending).
pub fn wait_for_interrupt() {
    if interrupts_enabled() {
        // SAFETY: HLT with interrupts enabled just idles until the next one.
        unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) }
    } else {
        core::hint::spin_loop();
    }
}

/// Stops this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: masking interrupts and halting has no memory effects.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Whether `[addr, addr + len)` may be used as MMIO: inside the identity
/// map and not RAM.
pub fn mmio_ok(addr: u64, len: u64) -> bool {
    let ram = super::platform::memmap();
    addr.checked_add(len)
        .is_some_and(|end| end <= MAPPED_LIMIT && !ram.overlaps(addr, len))
}

macro_rules! mmio_rw {
    ($read:ident, $write:ident, $t:ty) => {
        /// Reads a device register; addresses failing [`mmio_ok`] read as all ones.
        pub fn $read(addr: u64) -> $t {
            if !mmio_ok(addr, core::mem::size_of::<$t>() as u64)
                || addr % core::mem::size_of::<$t>() as u64 != 0
            {
                return <$t>::MAX;
            }
            // SAFETY: checked to be an aligned, identity-mapped address
            // outside RAM, so no Rust object lives there.
            unsafe { (addr as *const $t).read_volatile() }
        }

        /// Writes a device register; addresses failing [`mmio_ok`] are ignored.
        pub fn $write(addr: u64, val: $t) {
            if !mmio_ok(addr, core::mem::size_of::<$t>() as u64)
                || addr % core::mem::size_of::<$t>() as u64 != 0
            {
                return;
            }
            // SAFETY: as for the read.
            unsafe { (addr as *mut $t).write_volatile(val) }
        }
    };
}

mmio_rw!(mmio_read8, mmio_write8, u8);
mmio_rw!(mmio_read16, mmio_write16, u16);
mmio_rw!(mmio_read32, mmio_write32, u32);
