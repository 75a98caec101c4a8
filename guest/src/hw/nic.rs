//! virtio-net driver: a receive queue kept full of 2 KiB buffers, a
//! one-frame-at-a-time transmit path, and the guest's [`NetStack`] on top
//! (answers ARP and pings, and sends pings for the `ping` command).

use neph_guest::net::{ETH_MAX, Ipv4Addr, Ipv4Cidr, MacAddr, NetStack};
use neph_guest::virtq::Buf;

use super::dma::Dma;
use super::pci::PciDevice;
use super::virtio::{Queue, RequestError, Transport, VirtioInitError};

const F_MAC: u64 = 1 << 5;
/// virtio_net_hdr with VERSION_1 (num_buffers included).
const HDR: usize = 12;
const BUF: usize = 2048;
const RX_BUFS: u16 = 16;

/// Why a frame was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The device did not take it.
    #[error("{0}")]
    Request(#[from] RequestError),
    /// Larger than a buffer.
    #[error("frame of {0} bytes is too large")]
    TooLarge(usize),
}

/// A virtio-net device and the IP endpoint on it.
#[derive(Debug)]
pub struct Nic {
    t: Transport,
    rx: Queue,
    tx: Queue,
    rx_mem: *mut u8,
    rx_slot_of_head: [u16; neph_guest::virtq::MAX_QUEUE as usize],
    tx_mem: *mut u8,
    /// The IP endpoint.
    pub stack: NetStack,
    /// Frames received.
    pub rx_frames: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Receive-ring errors (bad used entries from the device).
    pub rx_errors: u64,
}

impl Nic {
    /// Brings up the device with the given IP configuration.
    pub fn init(
        dev: &PciDevice,
        dma: &mut Dma,
        ip: Option<Ipv4Cidr>,
        gw: Option<Ipv4Addr>,
    ) -> Result<Self, VirtioInitError> {
        let t = Transport::probe(dev)?;
        let features = t.negotiate(F_MAC)?;
        let rx = t.setup_queue(0, RX_BUFS, dma)?;
        let tx = t.setup_queue(1, 8, dma)?;
        let oom = VirtioInitError::OutOfMemory;
        let n = rx.vq.layout().size;
        let rx_mem = dma
            .alloc_uninit(u64::from(n) * BUF as u64, 4096)
            .ok_or(oom)?;
        let tx_mem = dma.alloc_uninit(BUF as u64, 4096).ok_or(oom)?;
        let mut mac = [0u8; 6];
        if features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = t.config_u8(i as u64);
            }
        } else {
            // Locally administered, derived from the PCI slot.
            mac = [0x02, 0x4e, 0x45, 0x50, dev.dev, dev.func];
        }
        let mut nic = Self {
            t,
            rx,
            tx,
            rx_mem,
            rx_slot_of_head: [0; neph_guest::virtq::MAX_QUEUE as usize],
            tx_mem,
            stack: NetStack::new(MacAddr(mac), ip, gw),
            rx_frames: 0,
            tx_frames: 0,
            rx_errors: 0,
        };
        for slot in 0..n {
            nic.post_rx(slot).map_err(|_| VirtioInitError::NoQueue(0))?;
        }
        nic.t.driver_ok();
        nic.t.notify(&nic.rx);
        Ok(nic)
    }

    fn post_rx(&mut self, slot: u16) -> Result<(), neph_guest::virtq::QueueError> {
        let addr = self.rx_mem as u64 + u64::from(slot) * BUF as u64;
        let head = self.rx.vq.add(&[Buf {
            addr,
            len: BUF as u32,
            device_writes: true,
        }])?;
        self.rx_slot_of_head[usize::from(head)] = slot;
        Ok(())
    }

    /// Sends one Ethernet frame (without the virtio header).
    pub fn send(&mut self, frame_len: usize) -> Result<(), SendError> {
        if frame_len > ETH_MAX {
            return Err(SendError::TooLarge(frame_len));
        }
        // SAFETY: the transmit buffer is this driver's and idle (sends are
        // synchronous); the header occupies its first HDR bytes.
        unsafe { core::ptr::write_bytes(self.tx_mem, 0, HDR) };
        let len = (HDR + frame_len) as u32;
        self.t.submit_and_wait(
            &mut self.tx,
            &[Buf {
                addr: self.tx_mem as u64,
                len,
                device_writes: false,
            }],
            1000,
        )?;
        self.tx_frames += 1;
        Ok(())
    }

    fn tx_frame<'a>(tx_mem: *mut u8) -> &'a mut [u8] {
        // SAFETY: callers pass this driver's transmit buffer (BUF bytes of
        // DMA memory), idle between synchronous sends, and drop the slice
        // before the next send.
        unsafe { core::slice::from_raw_parts_mut(tx_mem.add(HDR), BUF - HDR) }
    }

    /// Broadcasts an ARP request for `target` (no-op without an address).
    pub fn send_arp_request(&mut self, target: Ipv4Addr) -> Result<(), SendError> {
        match self.stack.arp_request(Self::tx_frame(self.tx_mem), target) {
            Some(n) => self.send(n),
            None => Ok(()),
        }
    }

    /// Sends an ICMP echo request; `Ok(false)` if it could not be built
    /// (no address configured).
    pub fn send_echo_request(
        &mut self,
        dst: Ipv4Addr,
        dst_mac: MacAddr,
        id: u16,
        seq: u16,
        payload: &[u8],
    ) -> Result<bool, SendError> {
        match self
            .stack
            .echo_request(Self::tx_frame(self.tx_mem), dst, dst_mac, id, seq, payload)
        {
            Some(n) => self.send(n).map(|()| true),
            None => Ok(false),
        }
    }

    /// Processes every received frame: answers ARP/pings, returns the last
    /// echo reply addressed to us (source, id, seq), if any.
    pub fn poll(&mut self) -> Option<(Ipv4Addr, u16, u16)> {
        let mut echo = None;
        let mut reposted = false;
        loop {
            let used = match self.rx.vq.pop_used() {
                Ok(Some(u)) => u,
                Ok(None) => break,
                Err(_) => {
                    self.rx_errors += 1;
                    continue;
                }
            };
            let slot = self.rx_slot_of_head[usize::from(used.id)];
            let len = (used.len as usize).min(BUF);
            self.rx_frames += 1;
            if len > HDR {
                let addr = self.rx_mem as usize + usize::from(slot) * BUF;
                // SAFETY: the device returned this receive buffer (BUF bytes
                // of driver-owned DMA memory) and will not touch it until it
                // is posted again below; the transmit buffer is disjoint.
                let frame =
                    unsafe { core::slice::from_raw_parts((addr + HDR) as *const u8, len - HDR) };
                let out = Self::tx_frame(self.tx_mem);
                let h = self.stack.handle(frame, out);
                if let Some(n) = h.reply_len {
                    let _ = self.send(n);
                }
                if h.echo_reply.is_some() {
                    echo = h.echo_reply;
                }
            }
            if self.post_rx(slot).is_err() {
                self.rx_errors += 1;
            }
            reposted = true;
        }
        if reposted {
            self.t.notify(&self.rx);
        }
        echo
    }
}
