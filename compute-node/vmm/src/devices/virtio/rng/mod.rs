//! virtio-rng: fills every device-writable buffer of a request with bytes
//! from the host's `getrandom(2)`.

use vm_memory::{Bytes, GuestAddress};

use super::queue::{self, QueueError};
use super::{Activation, DeviceMetrics, TYPE_RNG, VIRTIO_F_VERSION_1, VirtioDevice};

const QUEUE_SIZES: &[u16] = &[256];
/// Most bytes served per request.
const MAX_REQUEST: usize = 64 * 1024;
const MAX_DESCS: usize = 64;

/// The entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    active: Option<Activation>,
    metrics: DeviceMetrics,
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, activation: Activation) {
        self.active = Some(activation);
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn process_queue(&mut self, index: usize) -> Result<(), QueueError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let Some(q) = a.queues.get_mut(index) else {
            return Ok(());
        };
        let mut buf = vec![0u8; MAX_REQUEST];
        let mut used_any = false;
        while let Some(chain) = queue::pop(q, &a.mem, MAX_DESCS)? {
            let mut written = 0usize;
            for d in chain.descs.iter() {
                if !d.is_write_only() {
                    return Err(QueueError::Layout {
                        head: chain.head,
                        reason: "an rng request has a device-readable buffer",
                    });
                }
                let len = (d.len() as usize).min(MAX_REQUEST - written);
                if len == 0 {
                    continue;
                }
                if fill_random(&mut buf[..len]).is_err() {
                    self.metrics.io_errors += 1;
                    break;
                }
                a.mem
                    .write_slice(&buf[..len], GuestAddress(d.addr().0))
                    .map_err(|_| QueueError::Memory { head: chain.head })?;
                written += len;
            }
            self.metrics.read_ops += 1;
            self.metrics.read_bytes += written as u64;
            queue::complete(
                q,
                &a.mem,
                chain.head,
                u32::try_from(written).unwrap_or(u32::MAX),
            )?;
            used_any = true;
        }
        if used_any {
            a.interrupt.notify_queue(index);
        }
        Ok(())
    }
    fn queues(&self) -> Option<&[virtio_queue::Queue]> {
        self.active.as_ref().map(|a| a.queues.as_slice())
    }
    fn queues_mut(&mut self) -> Option<&mut [virtio_queue::Queue]> {
        self.active.as_mut().map(|a| a.queues.as_mut_slice())
    }
    fn metrics(&self) -> DeviceMetrics {
        self.metrics.clone()
    }
}
