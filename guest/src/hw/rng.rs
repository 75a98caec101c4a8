//! virtio-rng driver.

use neph_guest::virtq::Buf;

use super::dma::Dma;
use super::pci::PciDevice;
use super::virtio::{Queue, RequestError, Transport, VirtioInitError};

/// Most bytes per request.
pub const MAX_BYTES: usize = 4096;

/// A virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    t: Transport,
    q: Queue,
    buf: *mut u8,
}

impl Rng {
    /// Brings up the device.
    pub fn init(dev: &PciDevice, dma: &mut Dma) -> Result<Self, VirtioInitError> {
        let t = Transport::probe(dev)?;
        t.negotiate(0)?;
        let q = t.setup_queue(0, 8, dma)?;
        let buf = dma
            .alloc_uninit(MAX_BYTES as u64, 64)
            .ok_or(VirtioInitError::OutOfMemory)?;
        t.driver_ok();
        Ok(Self { t, q, buf })
    }

    /// Fills `out` (up to [`MAX_BYTES`]) with entropy; returns how many bytes
    /// the device provided.
    pub fn fill(&mut self, out: &mut [u8]) -> Result<usize, RequestError> {
        let want = out.len().min(MAX_BYTES);
        let mut got = 0;
        while got < want {
            let len = (want - got) as u32;
            let used = self.t.submit_and_wait(
                &mut self.q,
                &[Buf {
                    addr: self.buf as u64,
                    len,
                    device_writes: true,
                }],
                1000,
            )?;
            let n = (used.len.min(len)) as usize;
            // SAFETY: the device returned the buffer; `n <= MAX_BYTES`.
            let src = unsafe { core::slice::from_raw_parts(self.buf, n) };
            out[got..got + n].copy_from_slice(src);
            got += n;
            if n == 0 {
                break;
            }
        }
        Ok(got)
    }
}
