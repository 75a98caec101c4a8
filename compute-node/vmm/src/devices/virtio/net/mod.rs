//! virtio-net backed by a tap: the MAC is offered in the device
//! configuration (`VIRTIO_NET_F_MAC`), no offloads are negotiated, so every
//! frame carries a zeroed 12-byte `virtio_net_hdr_v1` that the device strips
//! on transmit and prepends on receive. Receive is driven by the tap's
//! readiness (edge-triggered) and by the driver adding buffers; a frame that
//! finds no buffer waits for one.

pub mod tap;

use std::io::ErrorKind;
use std::os::fd::RawFd;

use super::queue::{self, QueueError};
use super::segments::Segments;
use super::{Activation, DeviceMetrics, TYPE_NET, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::config::MacAddr;
pub use tap::{OpenTapError, Tap};

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZES: &[u16] = &[256, 256];
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const HDR_LEN: usize = 12;
/// Largest frame: 64 KiB plus an Ethernet header.
const MAX_FRAME: usize = 65550;
const MAX_DESCS: usize = 64;

/// The network device.
#[derive(Debug)]
pub struct Net {
    tap: Tap,
    config: [u8; 8],
    active: Option<Activation>,
    pending: Option<Vec<u8>>,
    metrics: DeviceMetrics,
}

/// The frame a migration target writes to a tap once the VM runs there:
/// a broadcast RARP request from the guest's `mac` (what QEMU's
/// self-announce sends), so bridges and switches learn at once that the
/// guest is behind this tap rather than when it next transmits. With the
/// tap's virtio-net header in front, padded to the 60-byte minimum frame.
pub fn announce_frame(mac: MacAddr) -> Vec<u8> {
    let mut f = vec![0u8; HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac.0);
    // RARP: Ethernet, IPv4, 6-byte and 4-byte addresses, reverse request.
    f.extend_from_slice(&[0x80, 0x35, 0, 1, 0x08, 0, 6, 4, 0, 3]);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&[0; 4]);
    f.resize(HDR_LEN + 60, 0);
    f
}

impl Net {
    /// A device on `tap` with address `mac`.
    pub fn new(tap: Tap, mac: MacAddr) -> Self {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac.0);
        config[6] = 1; // VIRTIO_NET_S_LINK_UP
        Self {
            tap,
            config,
            active: None,
            pending: None,
            metrics: DeviceMetrics::default(),
        }
    }

    fn transmit(&mut self, a: &mut Activation) -> Result<(), QueueError> {
        let Some(q) = a.queues.get_mut(TX) else {
            return Ok(());
        };
        if !virtio_queue::QueueT::ready(q) {
            return Ok(());
        }
        let mut frame = vec![0u8; MAX_FRAME + HDR_LEN];
        let mut used_any = false;
        while let Some(chain) = queue::pop(q, &a.mem, MAX_DESCS)? {
            let head = chain.head;
            let (r, _) = Segments::split(&chain.descs).ok_or(QueueError::Layout {
                head,
                reason: "a device-readable buffer follows a writable one",
            })?;
            let len = usize::try_from(r.len()).unwrap_or(usize::MAX);
            if len <= HDR_LEN || len > frame.len() {
                self.metrics.dropped += 1;
            } else if !r.read(&a.mem, 0, &mut frame[..len]) {
                return Err(QueueError::Memory { head });
            } else {
                match self.tap.write_frame(&frame[HDR_LEN..len]) {
                    Ok(_) => {
                        self.metrics.write_ops += 1;
                        self.metrics.write_bytes += (len - HDR_LEN) as u64;
                    }
                    Err(_) => self.metrics.dropped += 1,
                }
            }
            queue::complete(q, &a.mem, head, 0)?;
            used_any = true;
        }
        if used_any {
            a.interrupt.notify_queue(TX);
        }
        Ok(())
    }

    fn receive(&mut self, a: &mut Activation) -> Result<(), QueueError> {
        let Some(q) = a.queues.get_mut(RX) else {
            return Ok(());
        };
        if !virtio_queue::QueueT::ready(q) {
            return Ok(());
        }
        let mut used_any = false;
        loop {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => {
                    let mut buf = vec![0u8; MAX_FRAME];
                    match self.tap.read_frame(&mut buf) {
                        Ok(n) => {
                            buf.truncate(n);
                            buf
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
            };
            let Some(chain) = queue::pop(q, &a.mem, MAX_DESCS)? else {
                // No buffer: keep the frame until the driver adds one.
                self.pending = Some(frame);
                break;
            };
            let head = chain.head;
            let (_, w) = Segments::split(&chain.descs).ok_or(QueueError::Layout {
                head,
                reason: "a device-readable buffer follows a writable one",
            })?;
            let total = HDR_LEN + frame.len();
            let used = if w.len() < total as u64 {
                self.metrics.dropped += 1;
                0
            } else {
                let mut hdr = [0u8; HDR_LEN];
                hdr[10] = 1; // num_buffers
                if !w.write(&a.mem, 0, &hdr) || !w.write(&a.mem, HDR_LEN as u64, &frame) {
                    return Err(QueueError::Memory { head });
                }
                self.metrics.read_ops += 1;
                self.metrics.read_bytes += frame.len() as u64;
                u32::try_from(total).unwrap_or(u32::MAX)
            };
            queue::complete(q, &a.mem, head, used)?;
            used_any = true;
        }
        if used_any {
            a.interrupt.notify_queue(RX);
        }
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_MAC | F_STATUS
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }
    fn activate(&mut self, activation: Activation) {
        self.active = Some(activation);
    }
    fn reset(&mut self) {
        self.active = None;
        self.pending = None;
    }
    fn process_queue(&mut self, index: usize) -> Result<(), QueueError> {
        let Some(mut a) = self.active.take() else {
            return Ok(());
        };
        let r = match index {
            RX => self.receive(&mut a),
            TX => self.transmit(&mut a),
            _ => Ok(()),
        };
        self.active = Some(a);
        r
    }
    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.tap.raw_fd())
    }
    fn process_backend(&mut self) -> Result<(), QueueError> {
        let Some(mut a) = self.active.take() else {
            // Not live: drain the tap so its edge re-arms later.
            let mut buf = vec![0u8; MAX_FRAME];
            while self.tap.read_frame(&mut buf).is_ok() {
                self.metrics.dropped += 1;
            }
            return Ok(());
        };
        let r = self.receive(&mut a);
        self.active = Some(a);
        r
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::VirtioInterrupt;
    use std::process::Command;
    use std::time::{Duration, Instant};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    /// A tap made for the test, deleted on drop.
    struct TestTap(String);

    impl TestTap {
        fn create(name: &str, cidr: &str) -> Option<Self> {
            let ip = |args: &[&str]| {
                Command::new("ip")
                    .args(args)
                    .output()
                    .is_ok_and(|o| o.status.success())
            };
            let _ = ip(&["link", "del", name]);
            if !ip(&["tuntap", "add", "dev", name, "mode", "tap"]) {
                return None;
            }
            let t = Self(name.to_owned());
            // Fewer unrelated frames (IPv6 neighbour discovery, MLD).
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
            (ip(&["addr", "add", cidr, "dev", name]) && ip(&["link", "set", name, "up"]))
                .then_some(t)
        }
    }

    impl Drop for TestTap {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).output();
        }
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn the_announce_is_a_broadcast_rarp_from_the_guest() {
        let f = announce_frame(MacAddr(MAC));
        let e = &f[HDR_LEN..];
        assert_eq!(e.len(), 60);
        assert_eq!(&e[..6], &[0xff; 6]);
        assert_eq!(&e[6..12], &MAC);
        assert_eq!(&e[12..14], &[0x80, 0x35]);
        // Operation 3 (reverse request); sender and target hardware
        // addresses are the guest's.
        assert_eq!(&e[20..22], &[0, 3]);
        assert_eq!(&e[22..28], &MAC);
        assert_eq!(&e[32..38], &MAC);
    }

    fn arp_request(target: [u8; 4], sender: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&sender);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target);
        f
    }

    #[test]
    fn arp_round_trip_through_a_real_tap() {
        let name = format!("nephut{}", std::process::id() % 100_000);
        let Some(_tap) = TestTap::create(&name, "10.213.77.1/24") else {
            eprintln!(
                "SKIP arp_round_trip_through_a_real_tap: cannot create a tap (needs root and iproute2)"
            );
            return;
        };
        let mut net = Net::new(Tap::open(&name).unwrap(), MacAddr(MAC));
        let m =
            crate::vstate::memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)])
                .unwrap();
        let rx = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        let tx = MockSplitQueue::create(&m, GuestAddress(0x8000), 16);
        // Eight rx buffers: the kernel may send other frames first (IPv6
        // router solicitations and the like).
        for i in 0..8u16 {
            let d = Descriptor::new(0x20000 + u64::from(i) * 0x1000, 2048, 2, 0);
            rx.desc_table().store(i, RawDescriptor::from(d)).unwrap();
            rx.avail().ring().ref_at(usize::from(i)).unwrap().store(i);
        }
        rx.avail().idx().store(8);
        let frame = arp_request([10, 213, 77, 1], [10, 213, 77, 2]);
        m.write_slice(&frame, GuestAddress(0x30000)).unwrap();
        let tx_desc = RawDescriptor::from(Descriptor::new(
            0x30000,
            u32::try_from(frame.len()).unwrap(),
            0,
            0,
        ));
        tx.desc_table().store(0, tx_desc).unwrap();
        tx.avail().ring().ref_at(0).unwrap().store(0);
        tx.avail().idx().store(1);
        net.activate(Activation {
            mem: m.clone(),
            queues: vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()],
            interrupt: VirtioInterrupt::polled(2),
            acked_features: VIRTIO_F_VERSION_1 | F_MAC,
        });
        net.process_queue(TX).unwrap();
        assert_eq!(tx.used().idx().load(), 1);
        assert_eq!(net.metrics().write_ops, 1);

        // The kernel answers the ARP request; it arrives on the rx queue.
        let is_reply = |i: u16| {
            let mut got = vec![0u8; HDR_LEN + 42];
            m.read_slice(&mut got, GuestAddress(0x20000 + u64::from(i) * 0x1000))
                .unwrap();
            let eth = &got[HDR_LEN..];
            got[10] == 1
                && eth[0..6] == MAC
                && eth[12..14] == [0x08, 0x06]
                && eth[20..22] == [0, 2]
                && eth[28..32] == [10, 213, 77, 1]
        };
        // The tap's carrier may come up after the first request: ask again
        // every half second.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut found = false;
        let mut next_request = Instant::now() + Duration::from_millis(500);
        while !found && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            if Instant::now() >= next_request {
                let sent = tx.avail().idx().load();
                tx.avail()
                    .ring()
                    .ref_at(usize::from(sent % 16))
                    .unwrap()
                    .store(0);
                tx.avail().idx().store(sent.wrapping_add(1));
                net.process_queue(TX).unwrap();
                next_request += Duration::from_millis(500);
            }
            net.process_backend().unwrap();
            let used = rx.used().idx().load();
            found = (0..used.min(8)).any(|k| {
                let elem = rx.used().ring().ref_at(usize::from(k)).unwrap().load();
                is_reply(u16::try_from(elem.id()).unwrap())
            });
        }
        assert!(found, "no ARP reply arrived");
        assert!(net.metrics().read_ops >= 1);
    }

    #[test]
    fn config_reads_pad_past_the_end() {
        let cfg = {
            let mut c = [0u8; 8];
            c[..6].copy_from_slice(&MAC);
            c[6] = 1;
            c
        };
        let mut out = [0u8; 8];
        crate::devices::virtio::read_config_bytes(&cfg, 0, &mut out);
        assert_eq!(out, cfg);
        let mut past = [0xffu8; 4];
        crate::devices::virtio::read_config_bytes(&cfg, 6, &mut past);
        assert_eq!(past, [1, 0, 0, 0]);
    }
}
