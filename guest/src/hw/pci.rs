//! PCI configuration mechanism #1 (ports 0xcf8/0xcfc), bus 0: enumeration
//! and BAR decoding. No host bridge at 00:00.0 (all-ones reads, as on QEMU
//! `-M microvm`) means no PCI, found with a single configuration read.

use super::cpu::{inl, outl};

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

fn address(d: &PciDevice, offset: u8) -> u32 {
    0x8000_0000
        | (u32::from(d.bus) << 16)
        | (u32::from(d.dev) << 11)
        | (u32::from(d.func) << 8)
        | u32::from(offset & 0xfc)
}

/// Reads the dword at `offset` (rounded down to 4) of `d`'s configuration space.
pub fn read32(d: &PciDevice, offset: u8) -> u32 {
    outl(0xcf8, address(d, offset));
    inl(0xcfc)
}

/// Writes a dword of configuration space.
pub fn write32(d: &PciDevice, offset: u8, val: u32) {
    outl(0xcf8, address(d, offset));
    outl(0xcfc, val);
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
    /// The functions found.
    pub fn devices(&self) -> &[PciDevice] {
        &self.devices[..self.count]
    }
}

fn probe(bus: u8, dev: u8, func: u8) -> Option<PciDevice> {
    let mut d = PciDevice {
        bus,
        dev,
        func,
        ..PciDevice::default()
    };
    let id = read32(&d, 0);
    if id & 0xffff == 0xffff || id == 0 {
        return None;
    }
    d.vendor = id as u16;
    d.device = (id >> 16) as u16;
    d.class = read32(&d, 8) >> 8;
    Some(d)
}

/// Scans bus 0.
pub fn enumerate() -> PciBus {
    let mut bus = PciBus {
        devices: [PciDevice::default(); MAX_DEVICES],
        count: 0,
    };
    if probe(0, 0, 0).is_none() {
        return bus;
    }
    'scan: for dev in 0..32u8 {
        let Some(f0) = probe(0, dev, 0) else { continue };
        let multi = read8(&f0, 0x0e) & 0x80 != 0;
        for func in 0..if multi { 8 } else { 1 } {
            let found = if func == 0 {
                Some(f0)
            } else {
                probe(0, dev, func)
            };
            if let Some(d) = found {
                if bus.count == MAX_DEVICES {
                    break 'scan;
                }
                bus.devices[bus.count] = d;
                bus.count += 1;
            }
        }
    }
    bus
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
