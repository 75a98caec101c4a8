//! Interrupts: the TSS with its two IST stacks, the IDT (exceptions on IST1,
//! the LAPIC timer and spurious vector on IST2, so no interrupt ever uses the
//! interrupted code's stack), the local APIC, its periodic timer (100 Hz to
//! wake the idle shell loop, 1 kHz while the ticker runs) and the ticker
//! workload, whose per-tick part is the assembly handler in `boot`.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use super::boot::{self, EXC_STUBS, GDT64, IST1_TOP, IST2_TOP, TSS_SELECTOR};
use super::clock;
use super::cpu::{self, mmio_read32, mmio_write32, rdmsr};
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

#[repr(C, align(16))]
struct Idt([u64; 2 * IDT_ENTRIES]);

static mut IDT: Idt = Idt([0; 2 * IDT_ENTRIES]);

static LAPIC_BASE: AtomicU64 = AtomicU64::new(0xfee0_0000);
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

fn gate(handler: u64, ist: u64) -> (u64, u64) {
    let lo = (handler & 0xffff)
        | (u64::from(0x08u16) << 16)
        | ((ist & 7) << 32)
        | (0x8eu64 << 40)
        | (((handler >> 16) & 0xffff) << 48);
    (lo, handler >> 32)
}

/// Loads the TSS and the IDT. Interrupts stay disabled.
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

        let idt = (&raw mut IDT).cast::<u64>();
        let stubs = &raw const EXC_STUBS;
        for v in 0..32 {
            let (lo, hi) = gate((*stubs)[v], 1);
            idt.add(2 * v).write(lo);
            idt.add(2 * v + 1).write(hi);
        }
        for (v, handler) in [
            (TIMER_VECTOR, boot::timer_stub as *const () as u64),
            (SPURIOUS_VECTOR, boot::spurious_stub as *const () as u64),
        ] {
            let (lo, hi) = gate(handler, 2);
            idt.add(2 * usize::from(v)).write(lo);
            idt.add(2 * usize::from(v) + 1).write(hi);
        }
        let mut ptr = [0u16; 5];
        ptr[0] = (IDT_ENTRIES * 16 - 1) as u16;
        let base = idt as u64;
        ptr[1] = base as u16;
        ptr[2] = (base >> 16) as u16;
        ptr[3] = (base >> 32) as u16;
        ptr[4] = (base >> 48) as u16;
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
    mmio_read32(LAPIC_BASE.load(Relaxed) + reg)
}

fn lapic_write(reg: u64, val: u32) {
    mmio_write32(LAPIC_BASE.load(Relaxed) + reg, val);
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

/// Enables the local APIC and starts its timer at 1 kHz, calibrated against
/// the clock over 100 µs. Returns the timer input frequency in Hz (0 if the
/// LAPIC did not count: then interrupts stay off and the shell polls).
pub fn init_lapic_timer() -> u64 {
    let base = rdmsr(0x1b) & 0x000f_ffff_ffff_f000;
    if base != 0 {
        LAPIC_BASE.store(base, Relaxed);
        LAPIC_EOI_ADDR.store(base + LAPIC_EOI, Relaxed);
    }
    lapic_write(LAPIC_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_TIMER_DIV, 0xb);
    lapic_write(LAPIC_LVT_TIMER, (1 << 16) | u32::from(TIMER_VECTOR));
    lapic_write(LAPIC_TIMER_INIT, u32::MAX);
    let t0 = clock::now_ns();
    let deadline = clock::Deadline::after_us(100);
    while !deadline.expired() {
        core::hint::spin_loop();
    }
    let cur = lapic_read(LAPIC_TIMER_CUR);
    let elapsed = clock::now_ns().saturating_sub(t0);
    lapic_write(LAPIC_TIMER_INIT, 0);
    let counted = u64::from(u32::MAX - cur);
    if cur == u32::MAX || cur == 0 || elapsed == 0 {
        return 0;
    }
    let hz = counted * 1_000_000_000 / elapsed;
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
