//! Hostile rings: a descriptor table (addresses in and far outside guest
//! memory, any length, flags and `next`), an available ring and index, and
//! the bytes the buffers hold, laid out in a 1 MiB guest memory and handed
//! to `queue::pop` or to a device. The properties: every case terminates
//! without a panic, and whatever a device accepted it completed through the
//! used ring, with ids inside the ring and lengths inside the buffers.

use std::sync::OnceLock;

use neph_vmm::config::MacAddr;
use neph_vmm::devices::virtio::block::{Block, DiskBackend};
use neph_vmm::devices::virtio::net::{Net, Tap};
use neph_vmm::devices::virtio::queue;
use neph_vmm::devices::virtio::rng::Rng;
use neph_vmm::devices::virtio::{Activation, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt};
use neph_vmm::vstate::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::{Input, Seed};

/// Guest memory size.
pub const MEM_BYTES: usize = 0x10_0000;
/// Guest memory size.
pub const MEM: u64 = MEM_BYTES as u64;
/// Descriptor table.
pub const DESC: u64 = 0x1000;
/// Available ring.
pub const AVAIL: u64 = 0x2000;
/// Used ring.
pub const USED: u64 = 0x3000;
/// Where the buffers' bytes are.
pub const DATA: u64 = 0x8000;
/// Bytes of buffer data.
pub const DATA_LEN: usize = 0x4000;
/// Descriptors and ring entries written.
pub const ENTRIES: u16 = 16;

/// `VIRTQ_DESC_F_NEXT`.
pub const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
pub const F_WRITE: u16 = 2;

/// One descriptor as the guest wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDesc {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// Flags.
    pub flags: u16,
    /// Next descriptor.
    pub next: u16,
}

/// A whole hostile ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// Queue size is `1 << size_log2` (0 to 4).
    pub size_log2: u32,
    /// The descriptor table ([`ENTRIES`] of them).
    pub descs: Vec<RawDesc>,
    /// The available ring ([`ENTRIES`] heads).
    pub ring: Vec<u16>,
    /// The available index.
    pub avail_idx: u16,
    /// The buffers' bytes at [`DATA`] (at most [`DATA_LEN`]).
    pub data: Vec<u8>,
}

/// An index: small values (the top bit clear) fold into the table, others
/// stay as they are (far out of range).
fn index(raw: u16, modulo: u16) -> u16 {
    if raw & 0x8000 == 0 { raw % modulo } else { raw }
}

impl Case {
    /// Decodes any bytes into a case (see [`Case::encode`] for the layout).
    pub fn decode(data: &[u8]) -> Self {
        let mut i = Input::new(data);
        let size_log2 = u32::from(i.u8() % 5);
        let descs = (0..ENTRIES)
            .map(|_| {
                let (sel, raw) = (i.u8(), i.u64());
                let addr = match sel % 4 {
                    0 => DATA + raw % DATA_LEN as u64,
                    1 => raw % MEM,
                    2 => raw,
                    _ => MEM - 8,
                };
                let (sel, raw) = (i.u8(), i.u32());
                let len = match sel % 4 {
                    0 => raw % 600,
                    1 => raw,
                    2 => 16,
                    _ => 1,
                };
                let flags = i.u16();
                let next = index(i.u16(), ENTRIES);
                RawDesc {
                    addr,
                    len,
                    flags,
                    next,
                }
            })
            .collect();
        let ring = (0..ENTRIES).map(|_| index(i.u16(), ENTRIES)).collect();
        let avail_idx = index(i.u16(), 20);
        let rest = i.rest();
        let data = rest[..rest.len().min(DATA_LEN)].to_vec();
        Self {
            size_log2,
            descs,
            ring,
            avail_idx,
            data,
        }
    }

    /// The bytes [`Case::decode`] turns back into this case, for a case whose
    /// addresses lie in the data area, lengths are under 600 and indices
    /// small (what seeds use).
    pub fn encode(&self) -> Vec<u8> {
        let mut s = Seed::default();
        s.u8(u8::try_from(self.size_log2).unwrap_or(0));
        for d in &self.descs {
            s.u8(0).u64(d.addr - DATA).u8(0).u32(d.len);
            s.u16(d.flags).u16(d.next);
        }
        for h in &self.ring {
            s.u16(*h);
        }
        s.u16(self.avail_idx).bytes(&self.data);
        s.0
    }
}

/// The guest memory a case describes.
pub fn memory(c: &Case) -> GuestMemoryMmap {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)])
        .expect("1 MiB of anonymous memory");
    for (i, d) in c.descs.iter().enumerate() {
        let at = DESC + 16 * i as u64;
        m.write_obj(d.addr, GuestAddress(at)).expect("in memory");
        m.write_obj(d.len, GuestAddress(at + 8)).expect("in memory");
        m.write_obj(d.flags, GuestAddress(at + 12))
            .expect("in memory");
        m.write_obj(d.next, GuestAddress(at + 14))
            .expect("in memory");
    }
    m.write_obj(c.avail_idx, GuestAddress(AVAIL + 2))
        .expect("in memory");
    for (i, h) in c.ring.iter().enumerate() {
        m.write_obj(*h, GuestAddress(AVAIL + 4 + 2 * i as u64))
            .expect("in memory");
    }
    m.write_slice(&c.data, GuestAddress(DATA))
        .expect("in memory");
    m
}

/// The queue a case describes.
pub fn make_queue(c: &Case, m: &GuestMemoryMmap) -> virtio_queue::Queue {
    let size = 1u16 << c.size_log2;
    queue::build(16, size, DESC, AVAIL, USED, m).expect("the rings are valid")
}

fn used_idx(m: &GuestMemoryMmap) -> u16 {
    m.read_obj(GuestAddress(USED + 2)).expect("in memory")
}

/// Pops every chain of the case's ring, checking each is inside guest
/// memory and no longer than allowed, and that no more come than the ring
/// holds.
pub fn pop_all(c: &Case) {
    let m = memory(c);
    let mut q = make_queue(c, &m);
    let size = 1u16 << c.size_log2;
    let mut popped = 0u32;
    while let Ok(Some(chain)) = queue::pop(&mut q, &m, 64) {
        popped += 1;
        assert!(!chain.descs.is_empty() && chain.descs.len() <= 64);
        for d in &chain.descs {
            let end = d.addr().0.checked_add(u64::from(d.len()));
            assert!(d.len() == 0 || end.is_some_and(|e| e <= MEM));
        }
        queue::complete(&mut q, &m, chain.head, 0).expect("the used ring is in memory");
        assert!(
            popped <= u32::from(size),
            "{popped} chains from a ring of {size}"
        );
    }
}

/// Runs `dev` over the case (its queue `index` is the case's ring, as are
/// the queues before it); checks every used element it produced.
pub fn drive(mut dev: Box<dyn VirtioDevice>, c: &Case, index: usize) {
    let m = memory(c);
    dev.activate(Activation {
        mem: m.clone(),
        queues: (0..=index).map(|_| make_queue(c, &m)).collect(),
        interrupt: VirtioInterrupt::polled(index + 1),
        acked_features: VIRTIO_F_VERSION_1,
    });
    let mut result = dev.process_queue(index);
    if index > 0 && result.is_ok() {
        result = dev.process_queue(0);
    }
    let used = used_idx(&m);
    let size = 1u16 << c.size_log2;
    // Never more completions than a ring's worth.
    assert!(used <= size, "{used} completions in a ring of {size}");
    let total: u64 = c.descs.iter().map(|d| u64::from(d.len)).sum::<u64>().max(1);
    for i in 0..used {
        let at = USED + 4 + 8 * u64::from(i % size);
        let id: u32 = m.read_obj(GuestAddress(at)).expect("in memory");
        let len: u32 = m.read_obj(GuestAddress(at + 4)).expect("in memory");
        assert!(id < u32::from(size), "used id {id} outside the ring");
        // A completed request wrote no more than its buffers hold.
        assert!(u64::from(len) <= total, "{len} bytes used of {total}");
    }
    // After an error the device is stopped: another notification is a no-op.
    if result.is_err() {
        dev.reset();
        assert!(dev.process_queue(index).is_ok());
    }
}

/// Fuzz target `virtio_queue`: the descriptor walk alone.
pub fn queue_target(data: &[u8]) {
    pop_all(&Case::decode(data));
}

/// Fuzz target `virtio_rng`.
pub fn rng_target(data: &[u8]) {
    drive(Box::<Rng>::default(), &Case::decode(data), 0);
}

/// Bytes in the block target's disk (16 sectors).
pub const DISK_BYTES: usize = 16 * 512;

/// Runs the block device on `c` over a fresh 8 KiB image.
pub fn block_case(c: &Case, readonly: bool) {
    let mut f = tempfile::NamedTempFile::new().expect("a temporary file");
    std::io::Write::write_all(&mut f, &[0xa5; DISK_BYTES]).expect("writing the image");
    let disk = DiskBackend::open(f.path(), readonly).expect("opening the image");
    drive(Box::new(Block::new(disk)), c, 0);
    // The image never grows past its size.
    let len = std::fs::metadata(f.path()).expect("the image").len();
    assert_eq!(len, DISK_BYTES as u64, "the image changed size");
}

/// Fuzz target `virtio_block`: the first byte's low bit makes the disk
/// read-only.
pub fn block_target(data: &[u8]) {
    let (readonly, rest) = data
        .split_first()
        .map_or((false, data), |(b, r)| (b & 1 == 1, r));
    block_case(&Case::decode(rest), readonly);
}

/// The environment variable naming the tap the net target writes to.
pub const TAP_ENV: &str = "NEPH_FUZZ_TAP";

/// The tap named by [`TAP_ENV`], opened once per process.
pub fn tap() -> Option<&'static Tap> {
    static TAP: OnceLock<Option<Tap>> = OnceLock::new();
    TAP.get_or_init(|| Tap::open(&std::env::var(TAP_ENV).ok()?).ok())
        .as_ref()
}

/// Runs the net device on `c` (its transmit queue, then its receive
/// queue) over `tap`.
pub fn net_case(c: &Case, tap: &Tap) {
    let tap = tap.try_clone().expect("a second handle on the tap");
    let net = Net::new(tap, MacAddr([0x52, 0x54, 0, 0xf0, 0x22, 0x01]));
    drive(Box::new(net), c, 1);
}

/// Fuzz target `virtio_net`: needs the tap named by [`TAP_ENV`] and does
/// nothing without it (the runners check for it first).
pub fn net_target(data: &[u8]) {
    if let Some(tap) = tap() {
        net_case(&Case::decode(data), tap);
    }
}

/// Which device a seed is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// Chains of writable buffers.
    Rng,
    /// Requests: header, data, status.
    Block,
    /// Frames to transmit.
    Net,
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDesc {
    RawDesc {
        addr,
        len,
        flags,
        next,
    }
}

fn case_of(descs: Vec<RawDesc>, heads: &[u16], data: Vec<u8>) -> Case {
    let mut descs = descs;
    descs.resize(usize::from(ENTRIES), desc(DATA, 0, 0, 0));
    let mut ring = heads.to_vec();
    ring.resize(usize::from(ENTRIES), 0);
    Case {
        size_log2: 4,
        descs,
        ring,
        avail_idx: u16::try_from(heads.len()).unwrap_or(0),
        data,
    }
}

fn block_request(kind: u32, sector: u64) -> Vec<u8> {
    let mut data = vec![0u8; DATA_LEN];
    data[..4].copy_from_slice(&kind.to_le_bytes());
    data[8..16].copy_from_slice(&sector.to_le_bytes());
    data
}

/// Well-formed rings for `device` (encoded for [`Case::decode`]).
pub fn seeds(device: Device) -> Vec<Vec<u8>> {
    let cases = match device {
        Device::Rng => vec![
            case_of(vec![desc(DATA, 64, F_WRITE, 0)], &[0], vec![0; 64]),
            case_of(
                vec![
                    desc(DATA, 16, F_WRITE | F_NEXT, 1),
                    desc(DATA + 0x100, 32, F_WRITE, 0),
                    desc(DATA + 0x200, 8, F_WRITE, 0),
                ],
                &[0, 2],
                vec![0; 0x300],
            ),
        ],
        Device::Block => {
            let request = |kind: u32, data_flags: u16| {
                case_of(
                    vec![
                        desc(DATA, 16, F_NEXT, 1),
                        desc(DATA + 0x200, 512, data_flags | F_NEXT, 2),
                        desc(DATA + 0x1000, 1, F_WRITE, 0),
                    ],
                    &[0],
                    block_request(kind, 1),
                )
            };
            vec![
                // Read (IN), write (OUT), flush, get id.
                request(0, F_WRITE),
                request(1, 0),
                request(4, 0),
                request(8, F_WRITE),
            ]
        }
        Device::Net => vec![case_of(
            vec![
                desc(DATA, 12 + 60, 0, 0),
                desc(DATA + 0x100, 12 + 1514, 0, 0),
            ],
            &[0, 1],
            vec![0x11; 0x800],
        )],
    };
    cases
        .iter()
        .map(|c| {
            let bytes = c.encode();
            if device == Device::Block {
                [&[0u8][..], &bytes].concat()
            } else {
                bytes
            }
        })
        .collect()
}
