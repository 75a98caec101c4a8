//! PCI bus 0 behind configuration mechanism #1 (I/O 0xcf8 address, 0xcfc..0xcff
//! data): the host bridge at 00:00.0 and up to 31 devices, each a
//! [`PciDevice`] with a type-0 configuration space ([`PciConfig`]) whose
//! memory BARs the VMM assigns before boot and the guest may move.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Address register.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// First data port.
pub const CONFIG_DATA_PORT: u16 = 0xcfc;
/// Devices on bus 0 besides the host bridge.
pub const MAX_DEVICES: usize = 31;

const COMMAND: usize = 0x04;
const COMMAND_MEMORY: u16 = 1 << 1;
const STATUS_CAPABILITIES: u16 = 1 << 4;
const BAR0: usize = 0x10;

/// A type-0 configuration space with per-bit write masks.
#[derive(Debug, Clone)]
pub struct PciConfig {
    data: [u8; 256],
    wmask: [u8; 256],
    bar_sizes: [u64; 6],
    next_cap: usize,
    last_cap: Option<usize>,
}

/// Identity of a PCI function.
#[derive(Debug, Clone, Copy)]
pub struct PciId {
    /// Vendor.
    pub vendor: u16,
    /// Device.
    pub device: u16,
    /// Class, subclass, programming interface.
    pub class: [u8; 3],
    /// Revision.
    pub revision: u8,
    /// Subsystem vendor.
    pub subsystem_vendor: u16,
    /// Subsystem.
    pub subsystem: u16,
}

impl PciConfig {
    /// A configuration space for `id`.
    pub fn new(id: PciId) -> Self {
        let mut c = Self {
            data: [0; 256],
            wmask: [0; 256],
            bar_sizes: [0; 6],
            next_cap: 0x40,
            last_cap: None,
        };
        c.set_u16(0x00, id.vendor);
        c.set_u16(0x02, id.device);
        c.data[0x08] = id.revision;
        c.data[0x09] = id.class[2];
        c.data[0x0a] = id.class[1];
        c.data[0x0b] = id.class[0];
        c.set_u16(0x2c, id.subsystem_vendor);
        c.set_u16(0x2e, id.subsystem);
        // Command: I/O, memory, bus master, INTx disable are writable.
        c.wmask[COMMAND] = 0x07;
        c.wmask[COMMAND + 1] = 0x04;
        // Interrupt line is scratch space for the guest.
        c.wmask[0x3c] = 0xff;
        c
    }

    fn set_u16(&mut self, off: usize, v: u16) {
        self.data[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Little-endian u16 at `off`.
    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.data[off], self.data[off + 1]])
    }

    /// Little-endian u32 at `off`.
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.data[off],
            self.data[off + 1],
            self.data[off + 2],
            self.data[off + 3],
        ])
    }

    /// Declares BAR `index` (and `index + 1`) as a 64-bit memory BAR of
    /// `size` bytes (a power of two, at least 16) placed at `addr`.
    pub fn add_bar64(&mut self, index: usize, size: u64, addr: u64) {
        debug_assert!(size.is_power_of_two() && size >= 16 && index < 5);
        let off = BAR0 + 4 * index;
        self.bar_sizes[index] = size;
        let low_mask = (!(size - 1) & 0xffff_fff0) as u32;
        let high_mask = (!(size - 1) >> 32) as u32;
        self.wmask[off..off + 4].copy_from_slice(&low_mask.to_le_bytes());
        self.wmask[off + 4..off + 8].copy_from_slice(&high_mask.to_le_bytes());
        let low = (u32::try_from(addr & 0xffff_ffff).unwrap_or(0) & low_mask) | 0b100;
        self.data[off..off + 4].copy_from_slice(&low.to_le_bytes());
        self.data[off + 4..off + 8].copy_from_slice(&((addr >> 32) as u32).to_le_bytes());
    }

    /// Where BAR `index` decodes, if memory decoding is on.
    pub fn bar(&self, index: usize) -> Option<(u64, u64)> {
        let size = *self.bar_sizes.get(index)?;
        if size == 0 || self.u16_at(COMMAND) & COMMAND_MEMORY == 0 {
            return None;
        }
        let off = BAR0 + 4 * index;
        let addr = u64::from(self.u32_at(off) & !0xf) | (u64::from(self.u32_at(off + 4)) << 32);
        Some((addr, size))
    }

    /// Appends a capability with `body` (bytes after id and next pointer),
    /// `writable` giving the write mask of each body byte; returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let off = self.next_cap;
        let len = 2 + body.len();
        self.data[off] = id;
        self.data[off + 1] = 0;
        self.data[off + 2..off + len].copy_from_slice(body);
        for (i, m) in writable.iter().enumerate() {
            self.wmask[off + 2 + i] = *m;
        }
        match self.last_cap {
            Some(prev) => self.data[prev + 1] = u8::try_from(off).unwrap_or(0),
            None => {
                self.data[0x34] = u8::try_from(off).unwrap_or(0);
                let status = self.u16_at(0x06) | STATUS_CAPABILITIES;
                self.set_u16(0x06, status);
            }
        }
        self.last_cap = Some(off);
        self.next_cap = (off + len).next_multiple_of(4);
        off
    }

    /// The raw 256 bytes (for saving).
    pub fn bytes(&self) -> &[u8; 256] {
        &self.data
    }

    /// Replaces the contents with saved `bytes`, which must agree with this
    /// space on every byte the guest cannot write (identity, capabilities,
    /// BAR types): a saved space from another device is refused.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), RestorePciError> {
        if bytes.len() != self.data.len() {
            return Err(RestorePciError::Length(bytes.len()));
        }
        for (at, (&new, (&ours, &m))) in bytes
            .iter()
            .zip(self.data.iter().zip(self.wmask.iter()))
            .enumerate()
        {
            if (new ^ ours) & !m != 0 {
                return Err(RestorePciError::ReadOnly(at));
            }
        }
        self.data.copy_from_slice(bytes);
        Ok(())
    }

    /// The dword at `reg * 4`.
    pub fn read_reg(&self, reg: usize) -> u32 {
        if reg >= 64 {
            return 0xffff_ffff;
        }
        self.u32_at(reg * 4)
    }

    /// Writes `data` at byte `offset`, honouring the write masks.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let at = offset + i;
            if at >= 256 {
                return;
            }
            let m = self.wmask[at];
            self.data[at] = (self.data[at] & !m) | (v & m);
        }
    }
}

/// A saved configuration space does not fit this device.
#[derive(Debug, thiserror::Error)]
pub enum RestorePciError {
    /// Not 256 bytes.
    #[error("a saved PCI configuration space has {0} bytes instead of 256")]
    Length(usize),
    /// A read-only byte differs.
    #[error("the saved PCI configuration space differs at read-only byte {0:#x}")]
    ReadOnly(usize),
}

/// A function on the bus.
pub trait PciDevice: Send {
    /// Its configuration space.
    fn config(&self) -> &PciConfig;
    /// Reads dword register `reg`.
    fn config_read(&self, reg: usize) -> u32 {
        self.config().read_reg(reg)
    }
    /// Writes `data` at config byte `offset`.
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// An access to BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// An access to BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The host bridge at 00:00.0.
#[derive(Debug)]
pub struct HostBridge {
    config: PciConfig,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self {
            config: PciConfig::new(PciId {
                vendor: 0x8086,
                device: 0x0d57,
                class: [0x06, 0x00, 0x00],
                revision: 0,
                subsystem_vendor: 0,
                subsystem: 0,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
}

/// A shared device on the bus.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Bus 0.
pub struct PciBus {
    address: AtomicU32,
    devices: Vec<SharedPciDevice>,
    /// `(base, size, device, bar)` of every decoding BAR.
    windows: RwLock<Vec<(u64, u64, usize, usize)>>,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus")
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

fn lock(d: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciBus {
    /// A bus with the host bridge at slot 0 and `devices` from slot 1.
    pub fn new(devices: Vec<SharedPciDevice>) -> Self {
        let mut all: Vec<SharedPciDevice> = vec![Arc::new(Mutex::new(HostBridge::default()))];
        all.extend(devices);
        let bus = Self {
            address: AtomicU32::new(0),
            devices: all,
            windows: RwLock::new(Vec::new()),
        };
        bus.refresh_windows();
        bus
    }

    fn refresh_windows(&self) {
        let mut w = Vec::new();
        for (slot, dev) in self.devices.iter().enumerate() {
            let d = lock(dev);
            for bar in 0..6 {
                if let Some((base, size)) = d.config().bar(bar) {
                    w.push((base, size, slot, bar));
                }
            }
        }
        *self.windows.write().unwrap_or_else(|e| e.into_inner()) = w;
    }

    /// Whether `port` belongs to the configuration mechanism.
    pub fn handles(port: u16) -> bool {
        (CONFIG_ADDRESS_PORT..CONFIG_ADDRESS_PORT + 8).contains(&port)
    }

    fn selected(&self) -> Option<(&SharedPciDevice, usize)> {
        let a = self.address.load(Ordering::SeqCst);
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        let dev = ((a >> 11) & 0x1f) as usize;
        let func = (a >> 8) & 0x7;
        let reg = ((a >> 2) & 0x3f) as usize;
        if !enabled || bus != 0 || func != 0 {
            return None;
        }
        self.devices.get(dev).map(|d| (d, reg))
    }

    /// An I/O read at `port`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if port == CONFIG_ADDRESS_PORT && data.len() == 4 {
            data.copy_from_slice(&self.address.load(Ordering::SeqCst).to_le_bytes());
            return;
        }
        let Some(off) = port.checked_sub(CONFIG_DATA_PORT).map(usize::from) else {
            data.fill(0xff);
            return;
        };
        let v = match self.selected() {
            Some((d, reg)) => lock(d).config_read(reg),
            None => 0xffff_ffff,
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(off + i).copied().unwrap_or(0xff);
        }
    }

    /// An I/O write at `port`.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if port == CONFIG_ADDRESS_PORT && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.address.store(v, Ordering::SeqCst);
            return;
        }
        let Some(off) = port.checked_sub(CONFIG_DATA_PORT).map(usize::from) else {
            return;
        };
        if off + data.len() > 4 {
            return;
        }
        if let Some((d, reg)) = self.selected() {
            lock(d).config_write(reg * 4 + off, data);
            // Command or BAR writes may move or (un)map a window.
            if reg == 1 || (4..10).contains(&reg) {
                self.refresh_windows();
            }
        }
    }

    fn find(&self, addr: u64) -> Option<(usize, usize, u64)> {
        let w = self.windows.read().unwrap_or_else(|e| e.into_inner());
        w.iter()
            .find(|(base, size, _, _)| addr >= *base && addr - base < *size)
            .map(|(base, _, slot, bar)| (*slot, *bar, addr - base))
    }

    /// An MMIO read; false when no BAR decodes `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((slot, bar, off)) => {
                lock(&self.devices[slot]).bar_read(bar, off, data);
                true
            }
            None => false,
        }
    }

    /// An MMIO write; false when no BAR decodes `addr`.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((slot, bar, off)) => {
                lock(&self.devices[slot]).bar_write(bar, off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_read(bus: &PciBus, dev: u32, reg: u32) -> u32 {
        bus.pio_write(
            0xcf8,
            &(0x8000_0000 | (dev << 11) | (reg << 2)).to_le_bytes(),
        );
        let mut b = [0u8; 4];
        bus.pio_read(0xcfc, &mut b);
        u32::from_le_bytes(b)
    }

    fn cfg_write(bus: &PciBus, dev: u32, reg: u32, v: u32) {
        bus.pio_write(
            0xcf8,
            &(0x8000_0000 | (dev << 11) | (reg << 2)).to_le_bytes(),
        );
        bus.pio_write(0xcfc, &v.to_le_bytes());
    }

    struct Dummy(PciConfig, Vec<u64>);
    impl PciDevice for Dummy {
        fn config(&self) -> &PciConfig {
            &self.0
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.0.write(offset, data)
        }
        fn bar_read(&mut self, _: usize, off: u64, data: &mut [u8]) {
            self.1.push(off);
            data.fill(0xab);
        }
        fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
    }

    #[test]
    fn enumeration_bar_sizing_and_moves() {
        let mut cfg = PciConfig::new(PciId {
            vendor: 0x1af4,
            device: 0x1042,
            class: [1, 0x80, 0],
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        cfg.add_bar64(0, 0x4000, 0xc000_0000);
        let dev = Arc::new(Mutex::new(Dummy(cfg, vec![])));
        let bus = PciBus::new(vec![dev.clone()]);
        assert_eq!(cfg_read(&bus, 0, 0), 0x0d57_8086);
        assert_eq!(cfg_read(&bus, 1, 0), 0x1042_1af4);
        assert_eq!(cfg_read(&bus, 2, 0), 0xffff_ffff);
        // Not decoding until memory space is enabled.
        let mut b = [0u8; 4];
        assert!(!bus.mmio_read(0xc000_0000, &mut b));
        cfg_write(&bus, 1, 1, 0x2);
        assert!(bus.mmio_read(0xc000_0010, &mut b));
        assert_eq!(dev.lock().unwrap().1, vec![0x10]);
        // Sizing.
        cfg_write(&bus, 1, 4, 0xffff_ffff);
        assert_eq!(cfg_read(&bus, 1, 4), 0xffff_c004);
        // Move.
        cfg_write(&bus, 1, 4, 0xd000_0000);
        assert!(bus.mmio_read(0xd000_0000, &mut b));
        assert!(!bus.mmio_read(0xc000_0000, &mut b));
        // Out-of-range register and disabled address read all ones.
        bus.pio_write(0xcf8, &0u32.to_le_bytes());
        bus.pio_read(0xcfc, &mut b);
        assert_eq!(b, [0xff; 4]);
    }
}
