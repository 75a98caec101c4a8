//! Virtio 1.x modern PCI transport (virtio spec 4.1): finding the common,
//! notify, ISR and device configuration structures through the vendor
//! capabilities, feature negotiation, queue setup and notification. Drivers
//! poll the used rings; no interrupts are used (MSI-X vectors are set to
//! NO_VECTOR).

use neph_guest::virtq::{Layout, QueueError, SplitQueue, Used};

use super::clock::Deadline;
use super::cpu::{
    mmio_ok, mmio_read8, mmio_read16, mmio_read32, mmio_write8, mmio_write16, mmio_write32,
};
use super::dma::Dma;
use super::pci::{self, BarDecodeError, PciDevice};

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_FAILED: u8 = 0x80;
const NO_VECTOR: u16 = 0xffff;

// Common configuration offsets.
const DEVICE_FEATURE_SELECT: u64 = 0;
const DEVICE_FEATURE: u64 = 4;
const DRIVER_FEATURE_SELECT: u64 = 8;
const DRIVER_FEATURE: u64 = 12;
const DEVICE_STATUS: u64 = 20;
const CONFIG_GENERATION: u64 = 21;
const QUEUE_SELECT: u64 = 22;
const QUEUE_SIZE: u64 = 24;
const QUEUE_MSIX_VECTOR: u64 = 26;
const QUEUE_ENABLE: u64 = 28;
const QUEUE_NOTIFY_OFF: u64 = 30;
const QUEUE_DESC: u64 = 32;
const QUEUE_DRIVER: u64 = 40;
const QUEUE_DEVICE: u64 = 48;

/// Why a virtio device could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VirtioInitError {
    /// A required capability is absent.
    #[error("the device has no {0} capability")]
    MissingCapability(&'static str),
    /// A capability points at an unusable BAR.
    #[error("capability BAR: {0}")]
    Bar(#[from] BarDecodeError),
    /// A capability region overlaps RAM or lies outside the mapped range.
    #[error("capability region {0:#x} is not usable MMIO")]
    BadRegion(u64),
    /// Reset did not complete.
    #[error("the device did not finish resetting")]
    ResetTimeout,
    /// VIRTIO_F_VERSION_1 not offered (legacy-only device).
    #[error("the device does not offer VIRTIO_F_VERSION_1")]
    NotModern,
    /// FEATURES_OK not accepted.
    #[error("the device rejected the negotiated features")]
    FeaturesRejected,
    /// Queue absent.
    #[error("queue {0} is not available")]
    NoQueue(u16),
    /// Out of device memory.
    #[error("out of DMA memory")]
    OutOfMemory,
}

/// Why a request did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The device did not answer in time.
    #[error("the device did not complete the request within {0} ms")]
    Timeout(u64),
    /// Ring misuse or a misbehaving device.
    #[error("virtqueue: {0}")]
    Queue(#[from] QueueError),
}

#[derive(Clone, Copy, Debug)]
struct CapRegion {
    addr: u64,
    notify_mul: u32,
}

/// A virtio-pci device with its configuration structures located.
#[derive(Debug)]
pub struct Transport {
    common: u64,
    notify: u64,
    notify_mul: u32,
    device_cfg: Option<u64>,
}

/// A virtqueue of a device.
#[derive(Debug)]
pub struct Queue {
    /// Ring state.
    pub vq: SplitQueue,
    index: u16,
    notify_addr: u64,
}

impl Transport {
    /// Finds the capabilities of `dev` and enables it on the bus.
    pub fn probe(dev: &PciDevice) -> Result<Self, VirtioInitError> {
        let (mut common, mut notify, mut device_cfg) = (None, None, None);
        if pci::read32(dev, 4) & (1 << 20) != 0 {
            let mut ptr = pci::read8(dev, 0x34) & 0xfc;
            for _ in 0..48 {
                // A capability is at most 20 bytes and must lie in the
                // 256-byte configuration space after the standard header.
                if !(0x40..=0xec).contains(&ptr) {
                    break;
                }
                let head = pci::read32(dev, ptr);
                let (id, next) = (head as u8, (head >> 8) as u8 & 0xfc);
                if id == 0x09 {
                    let cfg_type = (head >> 24) as u8;
                    let bar = pci::read8(dev, ptr + 4);
                    let offset = pci::read32(dev, ptr + 8);
                    let length = pci::read32(dev, ptr + 12);
                    let region = || -> Result<CapRegion, VirtioInitError> {
                        let base = pci::bar_address(dev, bar)?;
                        let addr = base + u64::from(offset);
                        if !mmio_ok(addr, u64::from(length.max(1))) {
                            return Err(VirtioInitError::BadRegion(addr));
                        }
                        let notify_mul = if cfg_type == 2 {
                            pci::read32(dev, ptr + 16)
                        } else {
                            0
                        };
                        Ok(CapRegion { addr, notify_mul })
                    };
                    match cfg_type {
                        1 if common.is_none() => common = Some(region()?),
                        2 if notify.is_none() => notify = Some(region()?),
                        4 if device_cfg.is_none() => device_cfg = Some(region()?),
                        _ => {}
                    }
                }
                ptr = next;
            }
        }
        let common = common.ok_or(VirtioInitError::MissingCapability("common configuration"))?;
        let notify = notify.ok_or(VirtioInitError::MissingCapability("notification"))?;
        pci::enable(dev);
        Ok(Self {
            common: common.addr,
            notify: notify.addr,
            notify_mul: notify.notify_mul,
            device_cfg: device_cfg.map(|c| c.addr),
        })
    }

    fn status(&self) -> u8 {
        mmio_read8(self.common + DEVICE_STATUS)
    }

    fn set_status(&self, s: u8) {
        mmio_write8(self.common + DEVICE_STATUS, s);
    }

    /// Resets the device and negotiates `wanted & offered` features (with
    /// VIRTIO_F_VERSION_1 required). Returns the negotiated set.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, VirtioInitError> {
        self.set_status(0);
        let deadline = Deadline::after_us(1_000_000);
        while self.status() != 0 {
            if deadline.expired() {
                return Err(VirtioInitError::ResetTimeout);
            }
            core::hint::spin_loop();
        }
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            mmio_write32(self.common + DEVICE_FEATURE_SELECT, sel);
            offered |= u64::from(mmio_read32(self.common + DEVICE_FEATURE)) << (32 * sel);
        }
        if offered & F_VERSION_1 == 0 {
            self.set_status(STATUS_FAILED);
            return Err(VirtioInitError::NotModern);
        }
        let features = offered & (wanted | F_VERSION_1);
        for sel in 0..2u32 {
            mmio_write32(self.common + DRIVER_FEATURE_SELECT, sel);
            mmio_write32(
                self.common + DRIVER_FEATURE,
                (features >> (32 * sel)) as u32,
            );
        }
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            self.set_status(STATUS_FAILED);
            return Err(VirtioInitError::FeaturesRejected);
        }
        Ok(features)
    }

    /// Sets up queue `index` with at most `max` entries.
    pub fn setup_queue(
        &self,
        index: u16,
        max: u16,
        dma: &mut Dma,
    ) -> Result<Queue, VirtioInitError> {
        mmio_write16(self.common + QUEUE_SELECT, index);
        let dev_max = mmio_read16(self.common + QUEUE_SIZE);
        if dev_max == 0 || dev_max == u16::MAX {
            return Err(VirtioInitError::NoQueue(index));
        }
        let mut size = max.min(dev_max);
        size = 1 << (15 - size.leading_zeros().min(15));
        let layout = Layout::new(size).ok_or(VirtioInitError::NoQueue(index))?;
        let mem = dma
            .alloc(layout.total as u64, 4096)
            .ok_or(VirtioInitError::OutOfMemory)?;
        // SAFETY: fresh, zeroed, page-aligned DMA memory of `layout.total`
        // bytes owned by this queue for the rest of the run.
        let vq = unsafe { SplitQueue::new(mem, layout) };
        mmio_write16(self.common + QUEUE_SIZE, size);
        mmio_write16(self.common + QUEUE_MSIX_VECTOR, NO_VECTOR);
        for (reg, addr) in [
            (QUEUE_DESC, vq.desc_addr()),
            (QUEUE_DRIVER, vq.avail_addr()),
            (QUEUE_DEVICE, vq.used_addr()),
        ] {
            mmio_write32(self.common + reg, addr as u32);
            mmio_write32(self.common + reg + 4, (addr >> 32) as u32);
        }
        let off = mmio_read16(self.common + QUEUE_NOTIFY_OFF);
        mmio_write16(self.common + QUEUE_ENABLE, 1);
        Ok(Queue {
            vq,
            index,
            notify_addr: self.notify + u64::from(off) * u64::from(self.notify_mul),
        })
    }

    /// Tells the device the driver is ready.
    pub fn driver_ok(&self) {
        let s = self.status();
        self.set_status(s | STATUS_DRIVER_OK);
    }

    /// Reads a consistent 64-bit value from device configuration.
    pub fn config_u64(&self, offset: u64) -> u64 {
        let Some(cfg) = self.device_cfg else { return 0 };
        loop {
            let gen1 = mmio_read8(self.common + CONFIG_GENERATION);
            let lo = mmio_read32(cfg + offset);
            let hi = mmio_read32(cfg + offset + 4);
            if mmio_read8(self.common + CONFIG_GENERATION) == gen1 {
                return u64::from(lo) | (u64::from(hi) << 32);
            }
        }
    }

    /// Reads a byte of device configuration.
    pub fn config_u8(&self, offset: u64) -> u8 {
        self.device_cfg.map_or(0, |cfg| mmio_read8(cfg + offset))
    }

    /// Notifies the device that `q` has new buffers.
    pub fn notify(&self, q: &Queue) {
        mmio_write16(q.notify_addr, q.index);
    }

    /// Publishes `bufs`, notifies, and polls until the device returns the
    /// chain (or `timeout_ms` passes).
    pub fn submit_and_wait(
        &self,
        q: &mut Queue,
        bufs: &[neph_guest::virtq::Buf],
        timeout_ms: u64,
    ) -> Result<Used, RequestError> {
        let head = q.vq.add(bufs)?;
        self.notify(q);
        let deadline = Deadline::after_us(timeout_ms * 1000);
        loop {
            match q.vq.pop_used()? {
                Some(u) if u.id == head => return Ok(u),
                Some(_) => {}
                None if deadline.expired() => return Err(RequestError::Timeout(timeout_ms)),
                None => core::hint::spin_loop(),
            }
        }
    }
}
