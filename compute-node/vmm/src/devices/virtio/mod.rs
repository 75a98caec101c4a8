//! virtio 1.x devices over the modern PCI transport.
//!
//! - [`pci`]: the transport (capabilities, common configuration, notify,
//!   ISR, device configuration, MSI-X) wrapping a [`VirtioDevice`];
//! - [`queue`]: popping descriptor chains with every guest-controlled value
//!   validated, so a hostile ring is an error, never a crash or a hang;
//! - [`event_loop`]: the thread that turns ioeventfd notifications and
//!   backend readiness (tap) into device work;
//! - one folder per device: [`block`], [`net`], [`rng`].
//!
//! A device that meets a malformed ring sets `DEVICE_NEEDS_RESET`, raises a
//! configuration interrupt and stops until the driver resets it; the other
//! devices keep running.

pub mod block;
pub mod event_loop;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;
pub mod segments;

use std::os::fd::RawFd;
use std::sync::Arc;

use serde::Serialize;

use crate::vstate::memory::GuestMemoryMmap;
pub use pci::VirtioInterrupt;
pub use queue::QueueError;

/// virtio 1.x.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device type: network card.
pub const TYPE_NET: u16 = 1;
/// Device type: block device.
pub const TYPE_BLOCK: u16 = 2;
/// Device type: entropy source.
pub const TYPE_RNG: u16 = 4;

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is done.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// The queues and memory a device works on once the driver is ready.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// One queue per `queue_max_sizes` entry (not ready ones are skipped by
    /// the device).
    pub queues: Vec<virtio_queue::Queue>,
    /// Interrupts towards the driver.
    pub interrupt: Arc<VirtioInterrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// Counters a device keeps (what applies to it; the rest stay 0).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DeviceMetrics {
    /// Bytes read from the backend for the guest (disk reads, rx).
    pub read_bytes: u64,
    /// Bytes written to the backend (disk writes, tx).
    pub write_bytes: u64,
    /// Read requests or received packets.
    pub read_ops: u64,
    /// Write requests or sent packets.
    pub write_ops: u64,
    /// Flushes honoured.
    pub flushes: u64,
    /// Requests completed with an error status.
    pub io_errors: u64,
    /// Packets dropped (no guest buffer, tap full, oversized).
    pub dropped: u64,
    /// Malformed rings met (each one stopped the device until reset).
    pub queue_errors: u64,
}

/// The device-type-specific half of a virtio device.
pub trait VirtioDevice: Send {
    /// virtio device type.
    fn device_type(&self) -> u16;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered features.
    fn features(&self) -> u64;
    /// Reads device configuration at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts work on `activation`.
    fn activate(&mut self, activation: Activation);
    /// Drops the queues and any in-flight state.
    fn reset(&mut self);
    /// The driver notified queue `index`.
    fn process_queue(&mut self, index: usize) -> Result<(), QueueError>;
    /// A backend fd to watch for readiness (edge-triggered), if any.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// The backend fd became ready.
    fn process_backend(&mut self) -> Result<(), QueueError> {
        Ok(())
    }
    /// Its counters.
    fn metrics(&self) -> DeviceMetrics;
    /// The queues it works on, once activated (for saving their positions).
    fn queues(&self) -> Option<&[virtio_queue::Queue]>;
    /// The same, to restore their positions after a migration.
    fn queues_mut(&mut self) -> Option<&mut [virtio_queue::Queue]>;
    /// Starts (`Some`) or stops recording which backend byte ranges the
    /// guest writes (block devices; others ignore it).
    fn set_write_log(&mut self, _log: Option<Arc<WriteLog>>) {}
}

/// Chunks of a backend written while a migration copies it: one bit per
/// [`WRITE_LOG_CHUNK`] bytes.
pub type WriteLog = vm_memory::bitmap::AtomicBitmap;
/// Granularity of a [`WriteLog`].
pub const WRITE_LOG_CHUNK: usize = 64 * 1024;

/// Copies `value`'s little-endian bytes at `offset` into `data` (for device
/// configuration reads of any width and alignment); bytes past the end read 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
