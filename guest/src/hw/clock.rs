//! Time: kvmclock when the hypervisor offers it (CPUID 0x40000001 bit 3,
//! MSR 0x4b564d01), else the TSC at a frequency from CPUID 0x15/0x16 or a
//! 1 ms PIT calibration. [`now_ns`] is safe to call from interrupt handlers.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed, fence};

use neph_guest::pvclock;

use super::cpu::{cpuid, inb, outb, rdtsc, wrmsr};

const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MODE_NONE: u8 = 0;
const MODE_KVMCLOCK: u8 = 1;
const MODE_TSC: u8 = 2;

/// The per-vCPU pvclock structure the hypervisor keeps up to date.
#[repr(C, align(64))]
struct PvClock(UnsafeCell<[u32; 8]>);

// SAFETY: written only by the hypervisor (and read with volatile loads
// under its version protocol), never through Rust references.
unsafe impl Sync for PvClock {}

static PVCLOCK: PvClock = PvClock(UnsafeCell::new([0; 8]));
static MODE: AtomicU8 = AtomicU8::new(MODE_NONE);
static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_BASE: AtomicU64 = AtomicU64::new(0);

/// Which clock is in use.
pub fn source() -> &'static str {
    match MODE.load(Relaxed) {
        MODE_KVMCLOCK => "kvmclock",
        MODE_TSC => "tsc",
        _ => "none",
    }
}

/// TSC frequency in Hz (0 if unknown).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Relaxed)
}

fn kvmclock_available() -> bool {
    let (max, b, c, d) = cpuid(0x4000_0000, 0);
    let sig = [b.to_le_bytes(), c.to_le_bytes(), d.to_le_bytes()];
    sig == [*b"KVMK", *b"VMKV", *b"M\0\0\0"]
        && max >= 0x4000_0001
        && cpuid(0x4000_0001, 0).0 & (1 << 3) != 0
}

fn read_pvclock() -> (u64, u64, u32, i8) {
    let base = PVCLOCK.0.get().cast::<u8>();
    loop {
        // SAFETY: all offsets are inside the 32-byte static, which only the
        // hypervisor writes; volatile reads with the version check give a
        // consistent snapshot.
        unsafe {
            let v1 = base.cast::<u32>().read_volatile();
            fence(core::sync::atomic::Ordering::Acquire);
            let tsc_ts = base.add(8).cast::<u64>().read_volatile();
            let sys = base.add(16).cast::<u64>().read_volatile();
            let mul = base.add(24).cast::<u32>().read_volatile();
            let shift = base.add(28).cast::<i8>().read_volatile();
            fence(core::sync::atomic::Ordering::Acquire);
            let v2 = base.cast::<u32>().read_volatile();
            if v1 & 1 == 0 && v1 == v2 {
                return (tsc_ts, sys, mul, shift);
            }
        }
        core::hint::spin_loop();
    }
}

fn pit_calibrate() -> u64 {
    // PIT channel 2, mode 0, 1193 ticks (~1 ms), gated by port 0x61 bit 0.
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xb0);
    outb(0x42, (1193 & 0xff) as u8);
    outb(0x42, (1193 >> 8) as u8);
    let t0 = rdtsc();
    while inb(0x61) & 0x20 == 0 {
        if rdtsc() - t0 > 20_000_000_000 {
            break;
        }
    }
    (rdtsc() - t0) * 1_193_182 / 1193
}

/// Starts the clock; returns the TSC frequency in Hz.
pub fn init(tsc_at_entry: u64) -> u64 {
    TSC_BASE.store(tsc_at_entry, Relaxed);
    if kvmclock_available() {
        let addr = PVCLOCK.0.get() as u64;
        // SAFETY: the hypervisor will write 32 bytes at `addr`, a static
        // reserved for exactly that; paging and segmentation are untouched.
        unsafe { wrmsr(MSR_KVM_SYSTEM_TIME_NEW, addr | 1) };
        let (_, _, mul, shift) = read_pvclock();
        TSC_HZ.store(pvclock::tsc_hz(mul, shift), Relaxed);
        MODE.store(MODE_KVMCLOCK, Relaxed);
        return tsc_hz();
    }
    let (max, ..) = cpuid(0, 0);
    let mut hz = 0;
    if max >= 0x15 {
        let (den, num, crystal, _) = cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal != 0 {
            hz = u64::from(crystal) * u64::from(num) / u64::from(den);
        }
    }
    if hz == 0 && max >= 0x16 {
        hz = u64::from(cpuid(0x16, 0).0 & 0xffff) * 1_000_000;
    }
    if hz == 0 {
        hz = pit_calibrate();
    }
    if hz > 1_000_000 {
        TSC_HZ.store(hz, Relaxed);
        MODE.store(MODE_TSC, Relaxed);
    }
    hz
}

/// Monotonic nanoseconds. With kvmclock this is the hypervisor's clock
/// (roughly time since the VM was created); with the TSC, time since entry.
pub fn now_ns() -> u64 {
    match MODE.load(Relaxed) {
        MODE_KVMCLOCK => {
            let (tsc_ts, sys, mul, shift) = read_pvclock();
            sys.wrapping_add(pvclock::scale_delta(
                rdtsc().wrapping_sub(tsc_ts),
                mul,
                shift,
            ))
        }
        MODE_TSC => pvclock::ticks_to_ns(rdtsc().wrapping_sub(TSC_BASE.load(Relaxed)), tsc_hz()),
        _ => 0,
    }
}

/// Nanoseconds since the guest's entry point (TSC based).
pub fn since_entry_ns() -> u64 {
    pvclock::ticks_to_ns(rdtsc().wrapping_sub(TSC_BASE.load(Relaxed)), tsc_hz())
}

/// Busy-waits `us` microseconds.
pub fn delay_us(us: u64) {
    let hz = tsc_hz();
    if hz == 0 {
        for _ in 0..us * 100 {
            core::hint::spin_loop();
        }
        return;
    }
    let end = rdtsc().saturating_add(us.saturating_mul(hz) / 1_000_000);
    while rdtsc() < end {
        core::hint::spin_loop();
    }
}

/// A deadline `ms` milliseconds from now, for polling loops.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(u64);

impl Deadline {
    /// Expires `us` microseconds from now.
    pub fn after_us(us: u64) -> Self {
        let hz = tsc_hz().max(1_000_000);
        Self(rdtsc().saturating_add(us.saturating_mul(hz) / 1_000_000))
    }

    /// Whether it has passed.
    pub fn expired(&self) -> bool {
        rdtsc() >= self.0
    }
}
