//! Application-processor bring-up: copies the real-mode trampoline to
//! 0x8000, sends INIT and two STARTUP IPIs to every CPU the firmware tables
//! list, and counts the CPUs that reach long mode. APs then halt for good
//! (the workloads run on the boot CPU). Bounded: CPUs that never answer
//! (e.g. where the hypervisor cannot run real mode) are reported, not waited
//! for.

use core::sync::atomic::{AtomicU32, Ordering::SeqCst};

use neph_guest::acpi::CpuList;

use super::boot::{AP_TRAMPOLINE_END, AP_TRAMPOLINE_START, MAX_APS, TRAMPOLINE_ADDR};
use super::clock::{Deadline, delay_us};
use super::cpu;
use super::intr::{apic_id, send_ipi};
use super::platform::memmap;

static APS_ONLINE: AtomicU32 = AtomicU32::new(0);

/// Entry of each AP in long mode (from the assembly trampoline).
pub extern "C" fn ap_main(_index: u32) -> ! {
    APS_ONLINE.fetch_add(1, SeqCst);
    cpu::halt_forever()
}

/// Starts the APs in `cpus`; returns the CPUs online, boot CPU included.
pub fn start_aps(cpus: &CpuList) -> u32 {
    let me = apic_id();
    let targets = cpus
        .ids()
        .iter()
        .copied()
        .filter(|&id| id != me && id < 255);
    let expected = u32::try_from(targets.clone().count())
        .unwrap_or(u32::MAX)
        .min(MAX_APS);
    if expected == 0 {
        return 1;
    }
    let start = &raw const AP_TRAMPOLINE_START as usize;
    let len = &raw const AP_TRAMPOLINE_END as usize - start;
    if len > 4096 || !memmap().contains(TRAMPOLINE_ADDR, 4096) {
        return 1;
    }
    // SAFETY: 0x8000..0x9000 is RAM (checked) that nothing else uses after
    // boot (the start info and firmware tables have been read already); the
    // source is the trampoline in our read-only image.
    unsafe {
        core::ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE_ADDR as *mut u8, len);
    }
    let vector = (TRAMPOLINE_ADDR >> 12) as u32;
    for id in targets.clone().take(MAX_APS as usize) {
        send_ipi(id, 0x4500);
    }
    delay_us(100);
    for id in targets.clone().take(MAX_APS as usize) {
        send_ipi(id, 0x4600 | vector);
    }
    let wait = |us| {
        let d = Deadline::after_us(us);
        while APS_ONLINE.load(SeqCst) < expected && !d.expired() {
            core::hint::spin_loop();
        }
    };
    wait(2_000);
    if APS_ONLINE.load(SeqCst) < expected {
        for id in targets.take(MAX_APS as usize) {
            send_ipi(id, 0x4600 | vector);
        }
        wait(50_000);
    }
    1 + APS_ONLINE.load(SeqCst)
}
