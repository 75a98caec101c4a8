//! Interrupts: the TSS with its two IST stacks, the IDT (static data in
//! `boot`; exceptions on IST1,
//! the LAPIC timer and spurious vector on IST2, so no interrupt ever uses the
//! interrupted code's stack), the local APIC, its periodic timer (100 Hz to
//! wake the idle shell loop, 1 kHz while the ticker runs) and the ticker
//! workload, whose per-tick part is the assembly handler in `boot`.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use super::boot::{GDT64, IDT, IDT_END, IST1_TOP, IST2_TOP, TSS_SELECTOR};
use super::clock;
use super::cpu::{self, rdmsr};
use crate::println;

/// Vector of the LAPIC timer.
pub const TIMER_VECTOR: u8 = 0x40;
/// Spurious-interrupt vector (low nibble all ones, as old APICs require).
pub const SPURIOUS_VECTOR: u8 = 0x4f;
const IDT_ENTRIES: usize = SPURIOUS_VECTOR as usize + 1;
const IDLE_PERIOD_US: u64 = 10_000;
const TICKER_PERIOD_US: u64 = 1_000;

const LAPIC_ID: u64 = 0x20;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_ICR_LO: u64 = 0x300;
const LAPIC_ICR_HI: u64 = 0x310;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INIT: u64 = 0x380;
const LAPIC_TIMER_CUR: u64 = 0x390;
const LAPIC_TIMER_DIV: u64 = 0x3e0;

#[repr(C, packed(4))]
struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

static mut TSS: Tss = Tss {
    _reserved0: 0,
    rsp: [0; 3],
    _reserved1: 0,
    ist: [0; 7],
    _reserved2: 0,
    _reserved3: 0,
    iomap_base: 104,
};

/// LAPIC registers (0: no usable LAPIC, set by [`init_lapic`]).
static LAPIC_BASE: AtomicU64 = AtomicU64::new(0);
/// Clock time the LAPIC timer calibration started (0: it did not).
static CALIBRATION_START_NS: AtomicU64 = AtomicU64::new(0);
static TIMER_HZ: AtomicU64 = AtomicU64::new(0);

// Shared with the assembly timer handler (`boot::timer_stub`).
/// LAPIC timer interrupts taken since boot.
pub static TIMER_TICKS: AtomicU64 = AtomicU64::new(0);
/// Address of the LAPIC EOI register.
pub static LAPIC_EOI_ADDR: AtomicU64 = AtomicU64::new(0xfee0_0000 + LAPIC_EOI);
/// Whether the ticker measures.
pub static TICKER_RUNNING: AtomicBool = AtomicBool::new(false);
/// TSC at the last tick.
pub static TICKER_LAST_TSC: AtomicU64 = AtomicU64::new(0);
/// Largest TSC delta between consecutive ticks.
pub static TICKER_MAX_TSC: AtomicU64 = AtomicU64::new(0);
/// Ticks while measuring.
pub static TICKER_COUNT: AtomicU64 = AtomicU64::new(0);
static TICKER_START_NS: AtomicU64 = AtomicU64::new(0);
static TICKER_STOP_NS: AtomicU64 = AtomicU64::new(0);

/// Loads the TSS and the (static) IDT. Interrupts stay disabled.
pub fn init_cpu() {
    let tss = &raw mut TSS;
    // SAFETY: single-threaded boot code; the statics are only accessed
    // through raw pointers here, and the TSS/GDT/IDT describe handlers and
    // stacks that exist for the whole run.
    unsafe {
        (*tss).ist[0] = &raw const IST1_TOP as u64;
        (*tss).ist[1] = &raw const IST2_TOP as u64;
        let base = tss as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        let lo = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89u64 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        let gdt = (&raw mut GDT64).cast::<u64>();
        gdt.add(4).write_volatile(lo);
        gdt.add(5).write_volatile(base >> 32);
        core::arch::asm!("ltr {0:x}", in(reg) TSS_SELECTOR, options(nostack, preserves_flags));

        let idt = &raw const IDT as u64;
        let len = &raw const IDT_END as u64 - idt;
        debug_assert_eq!(len, IDT_ENTRIES as u64 * 16);
        let mut ptr = [0u16; 5];
        ptr[0] = (len - 1) as u16;
        ptr[1] = idt as u16;
        ptr[2] = (idt >> 16) as u16;
        ptr[3] = (idt >> 32) as u16;
        ptr[4] = (idt >> 48) as u16;
        core::arch::asm!("lidt [{}]", in(reg) ptr.as_ptr(), options(nostack, preserves_flags));
    }
}

const EXCEPTION_NAMES: [&str; 32] = [
    "divide-error",
    "debug",
    "nmi",
    "breakpoint",
    "overflow",
    "bound-range",
    "invalid-opcode",
    "device-not-available",
    "double-fault",
    "coprocessor-overrun",
    "invalid-tss",
    "segment-not-present",
    "stack-fault",
    "general-protection",
    "page-fault",
    "reserved-15",
    "x87-fpu",
    "alignment-check",
    "machine-check",
    "simd",
    "virtualization",
    "control-protection",
    "reserved-22",
    "reserved-23",
    "reserved-24",
    "reserved-25",
    "reserved-26",
    "reserved-27",
    "hypervisor-injection",
    "vmm-communication",
    "security",
    "reserved-31",
];

/// Common exception entry (called from the assembly stubs): reports and halts.
pub extern "C" fn exception_handler(vector: u64, error: u64, rip: u64) -> ! {
    let name = usize::try_from(vector)
        .ok()
        .and_then(|v| EXCEPTION_NAMES.get(v))
        .unwrap_or(&"unknown");
    println!(
        "\nNEPH-GUEST PANIC exception {name} vector={vector} error={error:#x} rip={rip:#x} cr2={:#x}",
        cpu::cr2()
    );
    cpu::halt_forever()
}

fn lapic_read(reg: u64) -> u32 {
    match LAPIC_BASE.load(Relaxed) {
        0 => u32::MAX,
        // SAFETY: a non-zero base passed `mmio_ok` in `init_lapic` (device
        // memory, identity mapped, no RAM); `reg` is a register offset
        // below 0x1000.
        base => unsafe { ((base + reg) as *const u32).read_volatile() },
    }
}

fn lapic_write(reg: u64, val: u32) {
    match LAPIC_BASE.load(Relaxed) {
        0 => {}
        // SAFETY: as for `lapic_read`.
        base => unsafe { ((base + reg) as *mut u32).write_volatile(val) },
    }
}

/// This CPU's APIC id.
pub fn apic_id() -> u32 {
    lapic_read(LAPIC_ID) >> 24
}

/// Sends an inter-processor interrupt; waits (bounded) for delivery.
pub fn send_ipi(dest_apic_id: u32, icr_low: u32) {
    lapic_write(LAPIC_ICR_HI, dest_apic_id << 24);
    lapic_write(LAPIC_ICR_LO, icr_low);
    let deadline = clock::Deadline::after_us(1000);
    while lapic_read(LAPIC_ICR_LO) & (1 << 12) != 0 && !deadline.expired() {
        core::hint::spin_loop();
    }
}

/// Enables the local APIC (its base from the APIC base MSR, checked once to
/// be device memory) and starts its timer counting down from the maximum,
/// masked. [`start_lapic_timer`] measures later how far it got: the
/// calibration runs during the rest of boot instead of in a spin loop.
pub fn init_lapic() {
    let base = match rdmsr(0x1b) & 0x000f_ffff_ffff_f000 {
        0 => 0xfee0_0000,
        b => b,
    };
    if !cpu::mmio_ok(base, 0x1000) {
        return;
    }
    LAPIC_BASE.store(base, Relaxed);
    LAPIC_EOI_ADDR.store(base + LAPIC_EOI, Relaxed);
    lapic_write(LAPIC_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_TIMER_DIV, 0xb);
    lapic_write(LAPIC_LVT_TIMER, (1 << 16) | u32::from(TIMER_VECTOR));
    lapic_write(LAPIC_TIMER_INIT, u32::MAX);
    CALIBRATION_START_NS.store(clock::now_ns().max(1), Relaxed);
}

/// Shortest calibration: a boot can reach [`start_lapic_timer`] sooner.
const MIN_CALIBRATION_US: u64 = 100;

/// Calibrates the LAPIC timer against the clock over the time since
/// [`init_lapic`] (at least 100 µs), starts it periodic at 100 Hz and
/// enables interrupts. Returns the timer input frequency in Hz (0 if the
/// LAPIC did not count: then interrupts stay off and the shell polls).
pub fn start_lapic_timer() -> u64 {
    let mut t0 = CALIBRATION_START_NS.load(Relaxed);
    if t0 == 0 {
        return 0;
    }
    let spin_until = |t0: u64| {
        let ran_us = clock::now_ns().saturating_sub(t0) / 1000;
        let deadline = clock::Deadline::after_us(MIN_CALIBRATION_US.saturating_sub(ran_us));
        while !deadline.expired() {
            core::hint::spin_loop();
        }
    };
    spin_until(t0);
    let mut cur = lapic_read(LAPIC_TIMER_CUR);
    let mut elapsed = clock::now_ns().saturating_sub(t0);
    if cur == 0 {
        // The count ran out (it lasts seconds): boot was held up (e.g. a
        // paused VM). Measure again, briefly.
        lapic_write(LAPIC_TIMER_INIT, u32::MAX);
        t0 = clock::now_ns();
        spin_until(t0);
        cur = lapic_read(LAPIC_TIMER_CUR);
        elapsed = clock::now_ns().saturating_sub(t0);
    }
    lapic_write(LAPIC_TIMER_INIT, 0);
    let counted = u64::from(u32::MAX - cur);
    if cur == u32::MAX || cur == 0 || elapsed == 0 {
        return 0;
    }
    let hz = u64::try_from(u128::from(counted) * 1_000_000_000 / u128::from(elapsed))
        .unwrap_or(u64::MAX);
    TIMER_HZ.store(hz, Relaxed);
    lapic_write(LAPIC_LVT_TIMER, (1 << 17) | u32::from(TIMER_VECTOR));
    set_period_us(IDLE_PERIOD_US);
    cpu::sti();
    hz
}

fn set_period_us(us: u64) {
    let count = timer_hz().saturating_mul(us) / 1_000_000;
    lapic_write(
        LAPIC_TIMER_INIT,
        u32::try_from(count).unwrap_or(u32::MAX).max(1),
    );
}

/// The LAPIC timer's input frequency (0 if it is not running).
pub fn timer_hz() -> u64 {
    TIMER_HZ.load(Relaxed)
}

/// Ticker statistics.
#[derive(Clone, Copy, Debug)]
pub struct TickerReport {
    /// Whether it is measuring.
    pub running: bool,
    /// Largest time between two consecutive ticks (TSC based), or since the
    /// last tick when that is larger (a VM that is paused right now).
    pub max_gap_ns: u64,
    /// Ticks seen.
    pub ticks: u64,
    /// Time measured (kvmclock), from `ticker start` to now or to the stop.
    pub elapsed_ns: u64,
}

/// Resets and starts the ticker (the timer runs at 1 kHz while it does).
pub fn ticker_start() {
    cpu::without_interrupts(|| {
        TICKER_START_NS.store(clock::now_ns(), Relaxed);
        TICKER_LAST_TSC.store(cpu::rdtsc(), Relaxed);
        TICKER_MAX_TSC.store(0, Relaxed);
        TICKER_COUNT.store(0, Relaxed);
        TICKER_RUNNING.store(true, Relaxed);
        set_period_us(TICKER_PERIOD_US);
    });
}

/// Reports the ticker, stopping it (and slowing the timer back down) if `stop`.
pub fn ticker_report(stop: bool) -> TickerReport {
    cpu::without_interrupts(|| {
        let running = TICKER_RUNNING.load(Relaxed);
        let mut max_tsc = TICKER_MAX_TSC.load(Relaxed);
        if running {
            max_tsc = max_tsc.max(cpu::rdtsc().saturating_sub(TICKER_LAST_TSC.load(Relaxed)));
            if stop {
                TICKER_RUNNING.store(false, Relaxed);
                TICKER_STOP_NS.store(clock::now_ns(), Relaxed);
                set_period_us(IDLE_PERIOD_US);
            }
        }
        let end = if TICKER_RUNNING.load(Relaxed) {
            clock::now_ns()
        } else {
            TICKER_STOP_NS.load(Relaxed)
        };
        TickerReport {
            running: TICKER_RUNNING.load(Relaxed),
            max_gap_ns: neph_guest::pvclock::ticks_to_ns(max_tsc, clock::tsc_hz()),
            ticks: TICKER_COUNT.load(Relaxed),
            elapsed_ns: end.saturating_sub(TICKER_START_NS.load(Relaxed)),
        }
    })
}
