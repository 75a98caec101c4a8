//! The virtio-pci modern transport: one 64-bit memory BAR holding the common
//! configuration, ISR, device configuration, notify area and MSI-X table and
//! PBA, each described by a vendor capability; queue notifications by
//! ioeventfd where KVM has it (else by MMIO exit); interrupts by MSI-X.
//!
//! BAR 0 layout:
//!
//! | offset | size | what |
//! |---|---|---|
//! | 0x0000 | 0x38 | common configuration |
//! | 0x1000 | 4 | ISR status |
//! | 0x2000 | 0x1000 | device configuration |
//! | 0x3000 | 4 per queue | notify (`notify_off_multiplier` 4) |
//! | 0x4000 | 16 per vector | MSI-X table |
//! | 0x5000 | 8 per 64 vectors | MSI-X PBA |

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{Activation, DeviceMetrics, VIRTIO_F_VERSION_1, VirtioDevice, queue, status};
use crate::devices::interrupt::{IrqRouter, MsiMessage, MsiVector};
use crate::devices::pci::{PciConfig, PciDevice, PciId};
use crate::vstate::memory::GuestMemoryMmap;

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
/// "No vector" for MSI-X vector registers.
pub const NO_VECTOR: u16 = 0xffff;

const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;

#[derive(Debug, Default, Clone, Copy)]
struct MsixEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

#[derive(Debug)]
struct MsixState {
    entries: Vec<MsixEntry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    queue_vectors: Vec<u16>,
    config_vector: u16,
}

/// Interrupts from one device to its driver: the ISR byte and MSI-X.
#[derive(Debug)]
pub struct VirtioInterrupt {
    router: Option<Arc<IrqRouter>>,
    vectors: Vec<MsiVector>,
    state: Mutex<MsixState>,
    isr: AtomicU8,
}

impl VirtioInterrupt {
    /// Interrupts for a device without MSI-X vectors: only the ISR byte is
    /// kept, the driver polls (unit tests and fuzzing use this).
    pub fn polled(queues: usize) -> Arc<Self> {
        Arc::new(Self::new(None, Vec::new(), queues))
    }

    /// The ISR byte (without clearing it).
    pub fn isr(&self) -> u8 {
        self.isr.load(Ordering::SeqCst)
    }

    fn new(router: Option<Arc<IrqRouter>>, vectors: Vec<MsiVector>, queues: usize) -> Self {
        let n = vectors.len();
        Self {
            router,
            vectors,
            state: Mutex::new(MsixState {
                entries: vec![
                    MsixEntry {
                        control: 1,
                        ..Default::default()
                    };
                    n
                ],
                pending: vec![false; n],
                enabled: false,
                function_masked: false,
                queue_vectors: vec![NO_VECTOR; queues],
                config_vector: NO_VECTOR,
            }),
            isr: AtomicU8::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MsixState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the driver that queue `index` has used buffers.
    pub fn notify_queue(&self, index: usize) {
        self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        let mut st = self.lock();
        let v = st.queue_vectors.get(index).copied().unwrap_or(NO_VECTOR);
        self.fire(&mut st, v);
    }

    /// Tells the driver that the configuration (or status) changed.
    pub fn notify_config(&self) {
        self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        let mut st = self.lock();
        let v = st.config_vector;
        self.fire(&mut st, v);
    }

    fn fire(&self, st: &mut MsixState, v: u16) {
        let i = usize::from(v);
        if v == NO_VECTOR || i >= self.vectors.len() || !st.enabled {
            // Without MSI-X (no INTx here) the driver polls.
            return;
        }
        if st.function_masked || st.entries[i].control & 1 != 0 {
            st.pending[i] = true;
            return;
        }
        // A failed injection is lost; the driver still sees the used ring.
        if let Some(r) = &self.router {
            let _ = r.trigger(&self.vectors[i]);
        }
    }

    fn fire_pending(&self, st: &mut MsixState) {
        for i in 0..self.vectors.len() {
            if st.pending[i] && !st.function_masked && st.entries[i].control & 1 == 0 {
                st.pending[i] = false;
                if let Some(r) = &self.router {
                    let _ = r.trigger(&self.vectors[i]);
                }
            }
        }
    }

    fn table_read(&self, offset: u64, data: &mut [u8]) {
        let st = self.lock();
        let (i, field) = ((offset / 16) as usize, (offset % 16) as usize);
        let Some(e) = st.entries.get(i) else {
            data.fill(0);
            return;
        };
        let words = [e.addr_lo, e.addr_hi, e.data, e.control];
        let mut bytes = [0u8; 16];
        for (k, w) in words.iter().enumerate() {
            bytes[k * 4..k * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        for (k, b) in data.iter_mut().enumerate() {
            *b = bytes.get(field + k).copied().unwrap_or(0);
        }
    }

    fn table_write(&self, offset: u64, data: &[u8]) {
        let mut st = self.lock();
        let (i, field) = ((offset / 16) as usize, (offset % 16) as usize);
        let Some(e) = st.entries.get_mut(i) else {
            return;
        };
        let mut bytes = [0u8; 16];
        for (k, w) in [e.addr_lo, e.addr_hi, e.data, e.control].iter().enumerate() {
            bytes[k * 4..k * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        for (k, b) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(field + k) {
                *slot = *b;
            }
        }
        let word =
            |k: usize| u32::from_le_bytes([bytes[k], bytes[k + 1], bytes[k + 2], bytes[k + 3]]);
        e.addr_lo = word(0);
        e.addr_hi = word(4);
        e.data = word(8);
        e.control = word(12) & 1;
        let msg = MsiMessage {
            addr_lo: e.addr_lo,
            addr_hi: e.addr_hi,
            data: e.data,
        };
        let route = (msg.addr_lo != 0).then_some(msg);
        if let Some(r) = &self.router {
            let _ = r.update(&self.vectors[i], route);
        }
        self.fire_pending(&mut st);
    }

    fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let st = self.lock();
        for (k, b) in data.iter_mut().enumerate() {
            let byte = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .saturating_add(k);
            *b = (0..8)
                .filter(|bit| st.pending.get(byte * 8 + bit).copied().unwrap_or(false))
                .fold(0u8, |acc, bit| acc | (1 << bit));
        }
    }

    fn set_control(&self, control: u16) {
        let mut st = self.lock();
        st.enabled = control & MSIX_ENABLE != 0;
        st.function_masked = control & MSIX_FUNCTION_MASK != 0;
        if st.enabled {
            self.fire_pending(&mut st);
        }
    }

    fn reset_vectors(&self) {
        let mut st = self.lock();
        st.queue_vectors.fill(NO_VECTOR);
        st.config_vector = NO_VECTOR;
        self.isr.store(0, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct QueueSetup {
    max: u16,
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    name: String,
    config: PciConfig,
    msix_cap: usize,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    vm: Arc<VmFd>,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueSetup>,
    ioeventfds: Vec<EventFd>,
    ioevents_at: Option<u64>,
    use_ioeventfd: bool,
    queue_errors: u64,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("name", &self.name)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Saved state of one queue: the driver's setup and the device's ring
/// positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSavedState {
    /// Size the driver chose.
    pub size: u16,
    /// Enabled by the driver.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Next available index the device will read.
    pub next_avail: u16,
    /// Next used index the device will write.
    pub next_used: u16,
}

/// Saved MSI-X state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixSavedState {
    /// Table entries: address low, address high, data, vector control.
    pub entries: Vec<[u32; 4]>,
    /// Pending bits.
    pub pending: Vec<bool>,
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_masked: bool,
    /// Vector of each queue.
    pub queue_vectors: Vec<u16>,
    /// Configuration change vector.
    pub config_vector: u16,
}

/// Saved state of a virtio-pci device (transport and queues). Untrusted
/// on load: [`VirtioPciDevice::restore_state`] checks it against the
/// device it is loaded into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// virtio device type, which must match.
    pub device_type: u16,
    /// PCI configuration space (256 bytes).
    pub config_space: Vec<u8>,
    /// Device status.
    pub status: u8,
    /// Common configuration registers.
    pub device_feature_select: u32,
    /// Common configuration registers.
    pub driver_feature_select: u32,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// Configuration generation.
    pub config_generation: u8,
    /// Selected queue.
    pub queue_select: u16,
    /// Every queue.
    pub queues: Vec<QueueSavedState>,
    /// MSI-X.
    pub msix: MsixSavedState,
    /// ISR byte.
    pub isr: u8,
}

/// Loading saved state into a virtio-pci device failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreVirtioError {
    /// Another device type.
    #[error("saved state of a type {saved} virtio device cannot load into a type {ours} device")]
    DeviceType {
        /// In the state.
        saved: u16,
        /// This device.
        ours: u16,
    },
    /// Counts disagree.
    #[error("saved state has {saved} {what}, this device has {ours}")]
    Count {
        /// What is counted.
        what: &'static str,
        /// In the state.
        saved: usize,
        /// This device.
        ours: usize,
    },
    /// The configuration space.
    #[error("cannot restore the PCI configuration space")]
    Config(#[from] crate::devices::pci::RestorePciError),
    /// A queue's setup is invalid.
    #[error("saved queue {index} is invalid: {reason}")]
    Queue {
        /// Queue.
        index: usize,
        /// Why.
        reason: &'static str,
    },
    /// A vector register names no vector.
    #[error("saved vector {0} is out of range")]
    Vector(u16),
}

/// Creating a virtio-pci device failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateVirtioPciError {
    /// Interrupt vectors.
    #[error("cannot set up the device's MSI-X vectors")]
    Interrupt(#[source] crate::devices::interrupt::InterruptError),
    /// Notify eventfds.
    #[error("cannot create a queue notification eventfd")]
    EventFd(#[source] std::io::Error),
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() { 20 } else { 16 };
    let mut b = vec![len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&u32::try_from(offset).unwrap_or(0).to_le_bytes());
    b.extend_from_slice(&u32::try_from(length).unwrap_or(0).to_le_bytes());
    if let Some(x) = extra {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

impl VirtioPciDevice {
    /// Wraps `device`, BAR 0 at `bar_addr`.
    pub fn new(
        name: String,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        vm: Arc<VmFd>,
        router: Arc<IrqRouter>,
        bar_addr: u64,
        use_ioeventfd: bool,
    ) -> Result<Self, CreateVirtioPciError> {
        let nq = device.queue_max_sizes().len();
        let nvec = nq + 1;
        let dtype = device.device_type();
        let class = match dtype {
            super::TYPE_NET => [0x02, 0x00, 0x00],
            super::TYPE_BLOCK => [0x01, 0x80, 0x00],
            _ => [0xff, 0x00, 0x00],
        };
        let mut config = PciConfig::new(PciId {
            vendor: 0x1af4,
            device: 0x1040 + dtype,
            class,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.add_bar64(0, BAR_SIZE, bar_addr);
        let no_writes = [0u8; 18];
        for (t, off, len, extra) in [
            (CFG_COMMON, COMMON_OFFSET, COMMON_SIZE, None),
            (CFG_ISR, ISR_OFFSET, 4, None),
            (CFG_DEVICE, DEVICE_OFFSET, DEVICE_SIZE, None),
            (
                CFG_NOTIFY,
                NOTIFY_OFFSET,
                (nq as u64) * u64::from(NOTIFY_MULTIPLIER),
                Some(NOTIFY_MULTIPLIER),
            ),
        ] {
            let body = vendor_cap(t, off, len, extra);
            config.add_capability(CAP_VENDOR, &body, &no_writes[..body.len()]);
        }
        let mut msix = Vec::new();
        msix.extend_from_slice(&u16::try_from(nvec - 1).unwrap_or(0).to_le_bytes());
        msix.extend_from_slice(&u32::try_from(MSIX_TABLE_OFFSET).unwrap_or(0).to_le_bytes());
        msix.extend_from_slice(&u32::try_from(MSIX_PBA_OFFSET).unwrap_or(0).to_le_bytes());
        let msix_cap = config.add_capability(CAP_MSIX, &msix, &[0, 0xc0]);

        let vectors = router
            .allocate(nvec)
            .map_err(CreateVirtioPciError::Interrupt)?;
        let interrupt = Arc::new(VirtioInterrupt::new(Some(router), vectors, nq));
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueSetup {
                max,
                size: max,
                ..Default::default()
            })
            .collect();
        let ioeventfds = (0..nq)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(CreateVirtioPciError::EventFd)?;
        Ok(Self {
            name,
            config,
            msix_cap,
            device,
            mem,
            interrupt,
            vm,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
            ioeventfds,
            ioevents_at: None,
            use_ioeventfd,
            queue_errors: 0,
        })
    }

    /// Name for logs and metrics (e.g. `block0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The eventfds the event loop should watch, one per queue (empty when
    /// notifications come by MMIO exit).
    pub fn notify_eventfds(&self) -> Vec<(usize, EventFd)> {
        if !self.use_ioeventfd {
            return Vec::new();
        }
        self.ioeventfds
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.try_clone().ok().map(|e| (i, e)))
            .collect()
    }

    /// The backend fd to watch, if any.
    pub fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.backend_fd()
    }

    /// Counters, with the transport's.
    pub fn metrics(&self) -> DeviceMetrics {
        let mut m = self.device.metrics();
        m.queue_errors += self.queue_errors;
        m
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Starts or stops logging backend writes (see [`super::WriteLog`]).
    pub fn set_write_log(&mut self, log: Option<Arc<super::WriteLog>>) {
        self.device.set_write_log(log);
    }

    /// Saves the transport and queue state. The device thread must be
    /// paused (or stopped) so no request is half done: requests are handled
    /// synchronously, so a paused device has none in flight.
    pub fn save_state(&self) -> VirtioPciState {
        let st = self.interrupt.lock();
        let positions: Vec<(u16, u16)> = self
            .device
            .queues()
            .map(|qs| qs.iter().map(|q| (q.next_avail(), q.next_used())).collect())
            .unwrap_or_default();
        VirtioPciState {
            device_type: self.device.device_type(),
            config_space: self.config.bytes().to_vec(),
            status: self.status,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            config_generation: self.config_generation,
            queue_select: self.queue_select,
            queues: self
                .queues
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    let (next_avail, next_used) = positions.get(i).copied().unwrap_or((0, 0));
                    QueueSavedState {
                        size: q.size,
                        ready: q.ready,
                        desc: q.desc,
                        avail: q.avail,
                        used: q.used,
                        next_avail,
                        next_used,
                    }
                })
                .collect(),
            msix: MsixSavedState {
                entries: st
                    .entries
                    .iter()
                    .map(|e| [e.addr_lo, e.addr_hi, e.data, e.control])
                    .collect(),
                pending: st.pending.clone(),
                enabled: st.enabled,
                function_masked: st.function_masked,
                queue_vectors: st.queue_vectors.clone(),
                config_vector: st.config_vector,
            },
            isr: self.interrupt.isr(),
        }
    }

    /// Loads `state` saved by [`Self::save_state`] on another host into
    /// this freshly created, never activated device: everything is checked
    /// before anything is changed, then interrupt routes and notification
    /// eventfds are set up again and an active device is reactivated with
    /// its ring positions.
    pub fn restore_state(&mut self, state: &VirtioPciState) -> Result<(), RestoreVirtioError> {
        let ours = self.device.device_type();
        if state.device_type != ours {
            return Err(RestoreVirtioError::DeviceType {
                saved: state.device_type,
                ours,
            });
        }
        let count = |what, saved: usize, ours: usize| {
            if saved == ours {
                Ok(())
            } else {
                Err(RestoreVirtioError::Count { what, saved, ours })
            }
        };
        let nvec = self.interrupt.vectors.len();
        count("queues", state.queues.len(), self.queues.len())?;
        count("MSI-X entries", state.msix.entries.len(), nvec)?;
        count("MSI-X pending bits", state.msix.pending.len(), nvec)?;
        count(
            "queue vectors",
            state.msix.queue_vectors.len(),
            self.queues.len(),
        )?;
        for &v in state
            .msix
            .queue_vectors
            .iter()
            .chain(std::iter::once(&state.msix.config_vector))
        {
            if v != NO_VECTOR && usize::from(v) >= nvec {
                return Err(RestoreVirtioError::Vector(v));
            }
        }
        for (index, (q, ours)) in state.queues.iter().zip(&self.queues).enumerate() {
            if q.ready {
                queue::build(ours.max, q.size, q.desc, q.avail, q.used, &self.mem)
                    .map_err(|reason| RestoreVirtioError::Queue { index, reason })?;
            } else if q.size > ours.max {
                return Err(RestoreVirtioError::Queue {
                    index,
                    reason: "size above the maximum",
                });
            }
        }
        let mut config = self.config.clone();
        config.restore(&state.config_space)?;

        // Checked: apply.
        self.config = config;
        self.status = state.status;
        self.device_feature_select = state.device_feature_select;
        self.driver_feature_select = state.driver_feature_select;
        self.driver_features = state.driver_features;
        self.config_generation = state.config_generation;
        self.queue_select = state.queue_select;
        for (q, s) in self.queues.iter_mut().zip(&state.queues) {
            q.size = s.size;
            q.ready = s.ready;
            q.desc = s.desc;
            q.avail = s.avail;
            q.used = s.used;
        }
        {
            let mut st = self.interrupt.lock();
            for (e, w) in st.entries.iter_mut().zip(&state.msix.entries) {
                e.addr_lo = w[0];
                e.addr_hi = w[1];
                e.data = w[2];
                e.control = w[3] & 1;
            }
            st.pending.clone_from(&state.msix.pending);
            st.enabled = state.msix.enabled;
            st.function_masked = state.msix.function_masked;
            st.queue_vectors.clone_from(&state.msix.queue_vectors);
            st.config_vector = state.msix.config_vector;
            if let Some(r) = &self.interrupt.router {
                for (e, v) in st.entries.iter().zip(&self.interrupt.vectors) {
                    let msg = MsiMessage {
                        addr_lo: e.addr_lo,
                        addr_hi: e.addr_hi,
                        data: e.data,
                    };
                    let _ = r.update(v, (msg.addr_lo != 0).then_some(msg));
                }
            }
        }
        self.interrupt.isr.store(state.isr, Ordering::SeqCst);
        self.sync_ioeventfds();
        if self.active() && self.status & status::FEATURES_OK != 0 {
            self.activate();
            if let Some(qs) = self.device.queues_mut() {
                for (q, s) in qs.iter_mut().zip(&state.queues) {
                    if s.ready {
                        q.set_next_avail(s.next_avail);
                        q.set_next_used(s.next_used);
                    }
                }
            }
        }
        Ok(())
    }

    fn active(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::DEVICE_NEEDS_RESET == 0
    }

    fn fail(&mut self, err: &super::QueueError) {
        eprintln!("neph-vmm: {}: {err}; the device needs a reset", self.name);
        self.queue_errors += 1;
        self.device.reset();
        self.status |= status::DEVICE_NEEDS_RESET;
        self.interrupt.notify_config();
    }

    /// Queue `index` was notified.
    pub fn notify(&mut self, index: usize) {
        if !self.active() || index >= self.queues.len() {
            return;
        }
        if let Err(e) = self.device.process_queue(index) {
            self.fail(&e);
        }
    }

    /// The backend fd is ready.
    pub fn backend_ready(&mut self) {
        if !self.active() {
            return;
        }
        if let Err(e) = self.device.process_backend() {
            self.fail(&e);
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueSetup {
                max: q.max,
                size: q.max,
                ..Default::default()
            };
        }
        self.interrupt.reset_vectors();
    }

    fn activate(&mut self) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, s) in self.queues.iter().enumerate() {
            let q = if s.ready {
                match queue::build(s.max, s.size, s.desc, s.avail, s.used, &self.mem) {
                    Ok(q) => q,
                    Err(reason) => {
                        eprintln!("neph-vmm: {}: queue {i}: {reason}", self.name);
                        self.queue_errors += 1;
                        self.status |= status::DEVICE_NEEDS_RESET;
                        self.interrupt.notify_config();
                        return;
                    }
                }
            } else {
                match <virtio_queue::Queue as virtio_queue::QueueT>::new(s.max) {
                    Ok(q) => q,
                    Err(_) => return,
                }
            };
            queues.push(q);
        }
        self.device.activate(Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
        });
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = v | (old & status::DEVICE_NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                new &= !status::FEATURES_OK;
            }
        }
        self.status = new;
        if new & status::DRIVER_OK != 0
            && old & status::DRIVER_OK == 0
            && new & status::FEATURES_OK != 0
        {
            self.activate();
        }
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let q = self.queues.get(usize::from(self.queue_select));
        let st = self.interrupt.lock();
        let v: u64 = match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(st.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => st
                .queue_vectors
                .get(usize::from(self.queue_select))
                .map_or(u64::from(NO_VECTOR), |v| u64::from(*v)),
            0x1c => q.map_or(0, |q| u64::from(q.ready)),
            0x1e => u64::from(self.queue_select),
            0x20 => q.map_or(0, |q| q.desc),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.avail),
            0x2c => q.map_or(0, |q| q.avail >> 32),
            0x30 => q.map_or(0, |q| q.used),
            0x34 => q.map_or(0, |q| q.used >> 32),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    // Registers are narrower than the access value: truncation is the point.
    #[allow(clippy::cast_possible_truncation)]
    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(bytes);
        let v32 = v as u32;
        let v16 = v as u16;
        let nvec = self.interrupt.vectors.len();
        let checked_vector = |v: u16| if usize::from(v) < nvec { v } else { NO_VECTOR };
        let qi = usize::from(self.queue_select);
        // Queue setup is frozen once the queue or the driver is live.
        let editable =
            self.status & status::DRIVER_OK == 0 && self.queues.get(qi).is_some_and(|q| !q.ready);
        match offset {
            0x00 => self.device_feature_select = v32,
            0x08 => self.driver_feature_select = v32,
            0x0c if self.status & status::FEATURES_OK == 0 => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v32),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v32) << 32)
                }
                _ => {}
            },
            0x10 => self.interrupt.lock().config_vector = checked_vector(v16),
            0x14 => self.set_status(data.first().copied().unwrap_or(0)),
            0x16 => self.queue_select = v16,
            0x18 if editable => {
                if let Some(q) = self.queues.get_mut(qi) {
                    q.size = v16;
                }
            }
            0x1a => {
                let mut st = self.interrupt.lock();
                if let Some(slot) = st.queue_vectors.get_mut(qi) {
                    *slot = checked_vector(v16);
                }
            }
            0x1c if editable && v16 == 1 => {
                if let Some(q) = self.queues.get_mut(qi) {
                    q.ready = true;
                }
            }
            0x20..=0x37 if editable => {
                let Some(q) = self.queues.get_mut(qi) else {
                    return;
                };
                let field = match offset & !7 {
                    0x20 => &mut q.desc,
                    0x28 => &mut q.avail,
                    _ => &mut q.used,
                };
                if offset.is_multiple_of(8) && data.len() == 8 {
                    *field = v;
                } else if offset.is_multiple_of(8) {
                    *field = (*field & !0xffff_ffff) | u64::from(v32);
                } else {
                    *field = (*field & 0xffff_ffff) | (u64::from(v32) << 32);
                }
            }
            _ => {}
        }
    }

    fn sync_ioeventfds(&mut self) {
        if !self.use_ioeventfd {
            return;
        }
        let want = self.config.bar(0).map(|(base, _)| base);
        if want == self.ioevents_at {
            return;
        }
        if let Some(old) = self.ioevents_at.take() {
            for (i, evt) in self.ioeventfds.iter().enumerate() {
                let addr = old + NOTIFY_OFFSET + (i as u64) * u64::from(NOTIFY_MULTIPLIER);
                let _ = self
                    .vm
                    .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch);
            }
        }
        if let Some(base) = want {
            for (i, evt) in self.ioeventfds.iter().enumerate() {
                let addr = base + NOTIFY_OFFSET + (i as u64) * u64::from(NOTIFY_MULTIPLIER);
                if let Err(e) =
                    self.vm
                        .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
                {
                    eprintln!(
                        "neph-vmm: {}: ioeventfd refused ({e}); notifications by MMIO exit",
                        self.name
                    );
                    self.use_ioeventfd = false;
                    return;
                }
            }
            self.ioevents_at = Some(base);
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let ctl = self.msix_cap + 2;
        if offset <= ctl + 1 && offset + data.len() > ctl {
            self.interrupt.set_control(self.config.u16_at(ctl));
        }
        self.sync_ioeventfds();
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != 0 {
            data.fill(0xff);
            return;
        }
        match offset {
            o if o < COMMON_SIZE => self.common_read(o, data),
            o if (ISR_OFFSET..ISR_OFFSET + 4).contains(&o) => {
                data.fill(0);
                if o == ISR_OFFSET {
                    // Reading the ISR clears it.
                    data[0] = self.interrupt.isr.swap(0, Ordering::SeqCst);
                }
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.device.read_config(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.interrupt.table_read(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                self.interrupt.pba_read(o - MSIX_PBA_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_SIZE => self.common_write(o, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                let index = usize::try_from((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER))
                    .unwrap_or(usize::MAX);
                self.notify(index);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.interrupt.table_write(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }
}
