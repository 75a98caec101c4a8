//! virtio-blk driver: read, write and flush, one request at a time through
//! a bounce buffer of [`MAX_SECTORS`] sectors.

use neph_guest::checksum::SECTOR;
use neph_guest::virtq::Buf;

use super::dma::Dma;
use super::pci::PciDevice;
use super::virtio::{RequestError, Transport, VirtioInitError};

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
/// Sectors per request.
pub const MAX_SECTORS: usize = 128;
const TIMEOUT_MS: u64 = 10_000;

/// Why a block request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlkRequestError {
    /// The request did not complete.
    #[error("{0}")]
    Request(#[from] RequestError),
    /// The device reported an I/O error.
    #[error("the device reported an I/O error")]
    Io,
    /// The device does not support the request.
    #[error("the device does not support this request")]
    Unsupported,
    /// Unknown status byte.
    #[error("the device returned status {0}")]
    BadStatus(u8),
    /// Beyond the end of the disk.
    #[error("sectors {0}..{1} are beyond the disk's {2} sectors")]
    OutOfRange(u64, u64, u64),
    /// Writing a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// Buffer not a whole number of sectors or too large.
    #[error("a request must be 1 to {MAX_SECTORS} whole sectors")]
    BadLength,
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Blk {
    t: Transport,
    q: super::virtio::Queue,
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// VIRTIO_BLK_F_FLUSH.
    pub flush: bool,
    hdr: *mut u8,
    data: *mut u8,
    status: *mut u8,
}

impl Blk {
    /// Brings up the device.
    pub fn init(dev: &PciDevice, dma: &mut Dma) -> Result<Self, VirtioInitError> {
        let t = Transport::probe(dev)?;
        let features = t.negotiate(F_RO | F_FLUSH)?;
        let q = t.setup_queue(0, 64, dma)?;
        let oom = VirtioInitError::OutOfMemory;
        let hdr = dma.alloc(16, 16).ok_or(oom)?;
        let status = dma.alloc(1, 1).ok_or(oom)?;
        let data = dma
            .alloc_uninit((MAX_SECTORS * SECTOR) as u64, 4096)
            .ok_or(oom)?;
        t.driver_ok();
        let capacity = t.config_u64(0);
        Ok(Self {
            t,
            q,
            capacity,
            read_only: features & F_RO != 0,
            flush: features & F_FLUSH != 0,
            hdr,
            data,
            status,
        })
    }

    fn check_range(&self, lba: u64, sectors: usize) -> Result<(), BlkRequestError> {
        let end = lba.saturating_add(sectors as u64);
        if end > self.capacity {
            return Err(BlkRequestError::OutOfRange(lba, end, self.capacity));
        }
        Ok(())
    }

    fn request(&mut self, kind: u32, lba: u64, bytes: usize) -> Result<(), BlkRequestError> {
        // SAFETY: `hdr` and `status` are this driver's DMA buffers (16 and 1
        // bytes); no request is in flight, so the device is not using them.
        unsafe {
            self.hdr.cast::<u32>().write_volatile(kind);
            self.hdr.add(4).cast::<u32>().write_volatile(0);
            self.hdr.add(8).cast::<u64>().write_volatile(lba);
            self.status.write_volatile(0xff);
        }
        let header = Buf {
            addr: self.hdr as u64,
            len: 16,
            device_writes: false,
        };
        let status = Buf {
            addr: self.status as u64,
            len: 1,
            device_writes: true,
        };
        let data = Buf {
            addr: self.data as u64,
            len: u32::try_from(bytes).map_err(|_| BlkRequestError::BadLength)?,
            device_writes: kind == T_IN,
        };
        let chain_with_data = [header, data, status];
        let chain_without = [header, status];
        let chain: &[Buf] = if bytes == 0 {
            &chain_without
        } else {
            &chain_with_data
        };
        self.t.submit_and_wait(&mut self.q, chain, TIMEOUT_MS)?;
        // SAFETY: the device returned the chain, so it is done with `status`.
        match unsafe { self.status.read_volatile() } {
            0 => Ok(()),
            1 => Err(BlkRequestError::Io),
            2 => Err(BlkRequestError::Unsupported),
            s => Err(BlkRequestError::BadStatus(s)),
        }
    }

    /// Reads `out.len() / 512` sectors at `lba` into `out`.
    pub fn read(&mut self, lba: u64, out: &mut [u8]) -> Result<(), BlkRequestError> {
        let sectors = out.len() / SECTOR;
        if !out.len().is_multiple_of(SECTOR) || sectors == 0 || sectors > MAX_SECTORS {
            return Err(BlkRequestError::BadLength);
        }
        self.check_range(lba, sectors)?;
        self.request(T_IN, lba, out.len())?;
        // SAFETY: the bounce buffer holds MAX_SECTORS sectors and the device
        // is done with it.
        let src = unsafe { core::slice::from_raw_parts(self.data, out.len()) };
        out.copy_from_slice(src);
        Ok(())
    }

    /// Writes `data` (whole sectors) at `lba`.
    pub fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), BlkRequestError> {
        let sectors = data.len() / SECTOR;
        if !data.len().is_multiple_of(SECTOR) || sectors == 0 || sectors > MAX_SECTORS {
            return Err(BlkRequestError::BadLength);
        }
        if self.read_only {
            return Err(BlkRequestError::ReadOnly);
        }
        self.check_range(lba, sectors)?;
        // SAFETY: the bounce buffer holds MAX_SECTORS sectors and no request
        // is in flight.
        let dst = unsafe { core::slice::from_raw_parts_mut(self.data, data.len()) };
        dst.copy_from_slice(data);
        self.request(T_OUT, lba, data.len())
    }

    /// Flushes the device's write cache (a no-op success if the device has
    /// no flush feature, i.e. is write-through).
    pub fn flush(&mut self) -> Result<(), BlkRequestError> {
        if !self.flush {
            return Ok(());
        }
        self.request(T_FLUSH, 0, 0)
    }
}
