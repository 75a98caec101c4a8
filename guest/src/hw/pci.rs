//! PCI on bus 0: configuration access through mechanism #1 (ports
//! 0xcf8/0xcfc) or, when that finds nothing, ECAM (from the ACPI MCFG table,
//! else QEMU microvm's fixed window at 0xe0000000, tried only if a host
//! bridge answers there); enumeration; BAR decoding; and assigning
//! memory BARs left unassigned (QEMU microvm's firmware does not assign
//! them) from the 32-bit MMIO window. No host bridge at 00:00.0 means no
//! PCI, found with a single configuration read.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use neph_guest::pcibar;

use super::cpu::{inl, mmio_read32, mmio_write32, outl};

/// ECAM base in use (0: configuration mechanism #1).
static ECAM_BASE: AtomicU64 = AtomicU64::new(0);
/// Start of the window unassigned BARs are placed in (the VMM's and QEMU's
/// 32-bit PCI window starts at 3 GiB).
const WINDOW_START: u64 = 0xc000_0000;
/// The window ends at the IOAPIC, or at the ECAM region if that is lower.
const WINDOW_END: u64 = 0xfec0_0000;

/// ECAM base of QEMU `-M microvm,pcie=on`, which lists no MCFG table.
pub const QEMU_MICROVM_ECAM: u64 = 0xe000_0000;

/// Switches configuration access to ECAM at `base` (bus 0 only; 0 switches
/// back to configuration mechanism #1).
pub fn use_ecam(base: u64) {
    ECAM_BASE.store(base, Relaxed);
}

/// How configuration space is reached: `conf1` or `ecam`.
pub fn access_name() -> &'static str {
    if ECAM_BASE.load(Relaxed) == 0 {
        "conf1"
    } else {
        "ecam"
    }
}

/// Most functions remembered.
pub const MAX_DEVICES: usize = 64;

/// One PCI function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciDevice {
    /// Bus.
    pub bus: u8,
    /// Device.
    pub dev: u8,
    /// Function.
    pub func: u8,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code, subclass, programming interface.
    pub class: u32,
}

/// Why a BAR cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BarDecodeError {
    /// BAR index beyond 5, or the upper half of a 64-bit BAR.
    #[error("BAR {0} does not exist")]
    NoSuchBar(u8),
    /// An I/O-space BAR where memory was expected.
    #[error("BAR {0} is an I/O BAR")]
    IoBar(u8),
    /// Address 0: the firmware/VMM did not assign it.
    #[error("BAR {0} is not assigned")]
    Unassigned(u8),
}

/// Bus, device and function packed as in a configuration address:
/// `bus << 8 | dev << 3 | func`.
fn location(bus: u8, dev: u8, func: u8) -> u32 {
    (u32::from(bus) << 8) | (u32::from(dev & 0x1f) << 3) | u32::from(func & 7)
}

/// Reads the dword at `offset` (rounded down to 4) of the function at
/// `loc` (see [`location`]).
fn config_read(loc: u32, offset: u8) -> u32 {
    let offset = offset & 0xfc;
    match ECAM_BASE.load(Relaxed) {
        0 => {
            outl(0xcf8, 0x8000_0000 | (loc << 8) | u32::from(offset));
            inl(0xcfc)
        }
        base => mmio_read32(base + (u64::from(loc) << 12) + u64::from(offset)),
    }
}

impl PciDevice {
    fn location(&self) -> u32 {
        location(self.bus, self.dev, self.func)
    }
}

/// Reads the dword at `offset` (rounded down to 4) of `d`'s configuration space.
pub fn read32(d: &PciDevice, offset: u8) -> u32 {
    config_read(d.location(), offset)
}

/// Writes a dword of configuration space.
pub fn write32(d: &PciDevice, offset: u8, val: u32) {
    let (loc, offset) = (d.location(), offset & 0xfc);
    match ECAM_BASE.load(Relaxed) {
        0 => {
            outl(0xcf8, 0x8000_0000 | (loc << 8) | u32::from(offset));
            outl(0xcfc, val);
        }
        base => mmio_write32(base + (u64::from(loc) << 12) + u64::from(offset), val),
    }
}

/// Reads a byte of configuration space.
pub fn read8(d: &PciDevice, offset: u8) -> u8 {
    (read32(d, offset) >> (8 * u32::from(offset & 3))) as u8
}

/// Enumerated functions on bus 0.
#[derive(Clone, Copy, Debug)]
pub struct PciBus {
    devices: [PciDevice; MAX_DEVICES],
    count: usize,
}

impl PciBus {
    /// No functions.
    pub const EMPTY: Self = Self {
        devices: [PciDevice {
            bus: 0,
            dev: 0,
            func: 0,
            vendor: 0,
            device: 0,
            class: 0,
        }; MAX_DEVICES],
        count: 0,
    };

    /// The functions found.
    pub fn devices(&self) -> &[PciDevice] {
        &self.devices[..self.count]
    }
}

/// Whether a vendor/device dword means "no function here".
fn absent(id: u32) -> bool {
    id & 0xffff == 0xffff || id == 0
}

/// The function at `dev.func` on bus 0 whose vendor/device dword is `id`.
#[inline(never)]
fn function(dev: u8, func: u8, id: u32) -> PciDevice {
    let d = PciDevice {
        bus: 0,
        dev,
        func,
        vendor: id as u16,
        device: (id >> 16) as u16,
        class: 0,
    };
    PciDevice {
        class: read32(&d, 8) >> 8,
        ..d
    }
}

/// Scans bus 0 into `bus` (in place: the list is too large to copy cheaply
/// under PVM). Nothing at 00:00.0 (no host bridge) ends the scan at once;
/// otherwise each slot costs one configuration read (two port exits with
/// mechanism #1, and a few instructions: most slots are empty), and each
/// function found two more (class, header type).
pub fn enumerate(bus: &mut PciBus) {
    bus.count = 0;
    for dev in 0..32u8 {
        let id = config_read(location(0, dev, 0), 0);
        if absent(id) {
            if dev == 0 {
                return;
            }
            continue;
        }
        let f0 = function(dev, 0, id);
        let multi = read8(&f0, 0x0e) & 0x80 != 0;
        for func in 0..if multi { 8 } else { 1 } {
            let found = match func {
                0 => Some(f0),
                _ => {
                    let id = config_read(location(0, dev, func), 0);
                    (!absent(id)).then(|| function(dev, func, id))
                }
            };
            if let Some(d) = found {
                if bus.count == MAX_DEVICES {
                    return;
                }
                bus.devices[bus.count] = d;
                bus.count += 1;
            }
        }
    }
}

/// Decodes memory BAR `index` into its address.
pub fn bar_address(d: &PciDevice, index: u8) -> Result<u64, BarDecodeError> {
    if index > 5 {
        return Err(BarDecodeError::NoSuchBar(index));
    }
    let lo = read32(d, 0x10 + 4 * index);
    if lo & 1 != 0 {
        return Err(BarDecodeError::IoBar(index));
    }
    let addr = if (lo >> 1) & 3 == 2 {
        if index == 5 {
            return Err(BarDecodeError::NoSuchBar(index));
        }
        u64::from(lo & !0xf) | (u64::from(read32(d, 0x14 + 4 * index)) << 32)
    } else {
        u64::from(lo & !0xf)
    };
    if addr == 0 {
        return Err(BarDecodeError::Unassigned(index));
    }
    Ok(addr)
}

/// Enables memory decoding and bus mastering, disables INTx.
pub fn enable(d: &PciDevice) {
    let cmd = read32(d, 4);
    // Writing the status half back unchanged clears no sticky bits that
    // matter here.
    write32(
        d,
        4,
        (cmd & 0xffff_0000) | (cmd & 0xffff) | 0x2 | 0x4 | 0x400,
    );
}

/// One memory BAR as found: index, address (0 if unassigned), 64-bit.
fn memory_bars(d: &PciDevice) -> impl Iterator<Item = (u8, u64, bool)> + '_ {
    let mut index = 0u8;
    core::iter::from_fn(move || {
        while index < 6 {
            let i = index;
            let lo = read32(d, 0x10 + 4 * i);
            let is64 = lo & 1 == 0 && (lo >> 1) & 3 == 2 && i < 5;
            index += if is64 { 2 } else { 1 };
            if lo & 1 != 0 {
                continue;
            }
            let hi = if is64 {
                u64::from(read32(d, 0x14 + 4 * i)) << 32
            } else {
                0
            };
            return Some((i, hi | u64::from(lo & !0xf), is64));
        }
        None
    })
}

/// Assigns every unassigned memory BAR of the type-0 functions in `bus`,
/// above the highest BAR already assigned in the 32-bit window. Returns how
/// many were assigned; a BAR that does not fit stays unassigned (its driver
/// then reports it).
pub fn assign_unassigned_bars(bus: &PciBus) -> u32 {
    let ecam = ECAM_BASE.load(Relaxed);
    let end = if ecam > WINDOW_START && ecam < WINDOW_END {
        ecam
    } else {
        WINDOW_END
    };
    let mut next = WINDOW_START;
    let type0 = |d: &&PciDevice| read8(d, 0x0e) & 0x7f == 0;
    for d in bus.devices().iter().filter(type0) {
        for (i, addr, is64) in memory_bars(d) {
            if addr >= WINDOW_START && addr < end {
                let hi = if is64 {
                    Some(read32(d, 0x14 + 4 * i))
                } else {
                    None
                };
                let size = probe_size(d, i, hi.is_some()).unwrap_or(0);
                next = next.max(addr.saturating_add(size));
            }
        }
    }
    let mut assigned = 0;
    for d in bus.devices().iter().filter(type0) {
        for (i, addr, is64) in memory_bars(d) {
            if addr != 0 {
                continue;
            }
            let Some(size) = probe_size(d, i, is64) else {
                continue;
            };
            let Some(at) = pcibar::place(next, size, end) else {
                continue;
            };
            write32(d, 0x10 + 4 * i, at as u32);
            if is64 {
                write32(d, 0x14 + 4 * i, (at >> 32) as u32);
            }
            next = at + size;
            assigned += 1;
        }
    }
    assigned
}

/// Sizes memory BAR `i` (all-ones probe with decoding off), restoring it.
fn probe_size(d: &PciDevice, i: u8, is64: bool) -> Option<u64> {
    let cmd = read32(d, 4);
    write32(d, 4, cmd & 0xffff_fffc);
    let lo_off = 0x10 + 4 * i;
    let old_lo = read32(d, lo_off);
    write32(d, lo_off, u32::MAX);
    let lo = read32(d, lo_off);
    write32(d, lo_off, old_lo);
    let hi = if is64 {
        let old_hi = read32(d, lo_off + 4);
        write32(d, lo_off + 4, u32::MAX);
        let hi = read32(d, lo_off + 4);
        write32(d, lo_off + 4, old_hi);
        Some(hi)
    } else {
        None
    };
    write32(d, 4, cmd & 0xffff);
    pcibar::decoded_size(lo, hi)
}

/// A short name for `pci` output.
pub fn driver_name(d: &PciDevice) -> &'static str {
    match (d.vendor, d.device) {
        (0x1af4, 0x1041) => "virtio-net",
        (0x1af4, 0x1042) => "virtio-blk",
        (0x1af4, 0x1044) => "virtio-rng",
        (0x1af4, 0x1000..=0x103f) => "virtio-legacy(unsupported)",
        (0x1af4, _) => "virtio(other)",
        _ if d.class >> 8 == 0x0600 => "host-bridge",
        _ => "none",
    }
}
