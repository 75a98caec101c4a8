//! `neph-guest`: Nephele's bare-metal test guest. Booted through the PVH
//! entry by neph-vmm or QEMU, it brings up a serial shell, the LAPIC timer,
//! PCI and virtio-pci drivers (blk, net, rng), starts the other CPUs, prints
//! `NEPH-GUEST READY ...` and runs workloads on request. See `guest/README.md`
//! for the console protocol, and `src/lib.rs` for the host-testable logic.
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]

mod hw;

use core::arch::asm;

use neph_guest::bootcfg::BootConfig;
use neph_guest::memmap::Region;

use hw::boot::{__image_end, MAPPED_LIMIT};
use hw::once::BootOnce;
use hw::pci::BarDecodeError;
use hw::virtio::VirtioInitError;
use hw::{clock, cpu, dma::Dma, intr, machine::Machine, pci, platform, serial, smp};

/// Boot-CPU entry from the assembly (long mode, stack set, `.bss` zeroed).
pub extern "C" fn rust_main(start_info: u32) -> ! {
    let tsc_at_entry = cpu::rdtsc();
    serial::init();
    serial::put_str("NEPH-GUEST BOOT\n");
    intr::init_cpu();
    clock::init(tsc_at_entry);
    hw::boot::stage(0);
    let platform = platform::discover(u64::from(start_info));
    hw::boot::stage(1);
    let config = BootConfig::parse(platform.cmdline);
    if let Some(bad) = config.bad {
        println!("NEPH-GUEST WARN ignoring bad command-line value {bad}");
    }
    intr::init_lapic();
    hw::boot::stage(2);

    let image_end = (&raw const __image_end as u64).next_multiple_of(4096);
    if !platform.memmap.contains(image_end, hw::dma::POOL_SIZE) {
        panic!("no RAM for device memory at {image_end:#x}");
    }
    // SAFETY: the pool lies in RAM (checked) just past the image, which
    // nothing else uses: workloads start above `dma.end()`.
    let mut dma = unsafe { Dma::new(image_end) };
    let workload_floor = dma.end().next_multiple_of(2 << 20).max(16 << 20);
    let region = platform
        .memmap
        .largest_from(workload_floor, MAPPED_LIMIT)
        .unwrap_or(Region {
            start: workload_floor,
            end: workload_floor,
        });

    static PCI_BUS: BootOnce<pci::PciBus> = BootOnce::new(pci::PciBus::EMPTY);
    let pci_bus = PCI_BUS.init_with(|bus| {
        pci::enumerate(bus);
        if bus.devices().is_empty() {
            // ECAM from the MCFG table, else QEMU microvm's fixed ECAM window
            // (its ACPI tables have no MCFG) if a host bridge answers there.
            let base = platform::find_mcfg().unwrap_or(pci::QEMU_MICROVM_ECAM);
            pci::use_ecam(base);
            pci::enumerate(bus);
            if bus.devices().is_empty() {
                pci::use_ecam(0);
            }
        }
    });
    hw::boot::stage(3);
    // Built before the drivers, which fill their slots in place: moving a
    // finished `Machine` (kilobytes, mostly driver state) into place would
    // cost a microsecond per 8 bytes under PVM.
    let mut machine = Machine {
        platform,
        config,
        pci: pci_bus,
        cpus_online: 1,
        bars_assigned: 0,
        blk: None,
        nic: None,
        rng: None,
        dirtier: hw::workload::Dirtier::new(region),
        ignore_power_button: false,
    };
    let mut bars_assigned = None;
    for d in pci_bus.devices() {
        let m = &mut machine;
        let mut init = |dma: &mut Dma| match (d.vendor, d.device) {
            (0x1af4, 0x1042) if m.blk.is_none() => {
                hw::blk::Blk::init(d, dma).map(|b| m.blk = Some(b))
            }
            (0x1af4, 0x1041) if m.nic.is_none() => {
                hw::nic::Nic::init(d, dma, m.config.ip, m.config.gw).map(|n| m.nic = Some(n))
            }
            (0x1af4, 0x1044) if m.rng.is_none() => {
                hw::rng::Rng::init(d, dma).map(|r| m.rng = Some(r))
            }
            _ => Ok(()),
        };
        let mut result = init(&mut dma);
        // Unassigned BARs (QEMU microvm's firmware leaves them so): assign
        // them all once, then retry. Not done up front, because sizing
        // BARs costs VM exits that a VMM assigning them makes pointless.
        if matches!(
            result,
            Err(VirtioInitError::Bar(BarDecodeError::Unassigned(_)))
        ) && bars_assigned.is_none()
        {
            bars_assigned = Some(pci::assign_unassigned_bars(pci_bus));
            result = init(&mut dma);
        }
        if let Err(e) = result {
            println!(
                "NEPH-GUEST WARN {} at {:02x}:{:02x}.{}: {e}",
                pci::driver_name(d),
                d.bus,
                d.dev,
                d.func
            );
        }
    }
    machine.bars_assigned = bars_assigned.unwrap_or(0);

    hw::boot::stage(4);
    machine.cpus_online = smp::start_aps(machine.platform.cpus);
    // Calibrated over the boot since `init_lapic`: no spin of its own.
    intr::start_lapic_timer();
    hw::boot::stage(5);
    machine.run()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    cpu::cli();
    match info.location() {
        Some(l) => println!(
            "\nNEPH-GUEST PANIC {} at {}:{}",
            info.message(),
            l.file(),
            l.line()
        ),
        None => println!("\nNEPH-GUEST PANIC {}", info.message()),
    }
    cpu::halt_forever()
}

// The C memory functions the compiler emits calls to. String instructions
// keep them from being compiled into calls to themselves, and moving 8 bytes
// per iteration matters: under PVM every iteration goes through KVM's
// instruction emulator (about 1 µs each).

/// # Safety
/// `dst` and `src` valid for `n` bytes, not overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; DF is clear (ABI).
    unsafe {
        asm!("rep movsq", "mov ecx, {tail:e}", "rep movsb",
             tail = in(reg) n & 7,
             inout("rcx") n >> 3 => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// `dst` and `src` valid for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // Forward copy is safe: dst before src, or no overlap.
        // SAFETY: as for memcpy.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: copies backwards (DF set, then cleared again) so an overlapping
    // destination above the source is handled; the ranges are the caller's.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dst.wrapping_add(n).wrapping_sub(1) => _,
             inout("rsi") src.wrapping_add(n).wrapping_sub(1) => _, options(nostack));
    }
    dst
}

/// # Safety
/// `dst` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    let byte = u64::from(c as u8);
    // SAFETY: the caller guarantees the range; DF is clear.
    unsafe {
        asm!("rep stosq", "mov ecx, {tail:e}", "rep stosb",
             tail = in(reg) n & 7,
             inout("rcx") n >> 3 => _, inout("rdi") dst => _, in("rax") byte * 0x0101_0101_0101_0101,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// `a` and `b` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: `i < n`; volatile reads keep the loop from being turned
        // back into a memcmp call.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// `a` and `b` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
