//! Randomized hostile rings (the fuzz target for queue and descriptor
//! handling). cargo-fuzz needs a nightly toolchain, which this project does
//! not use, so the target is a proptest harness on stable: random descriptor
//! tables (addresses in and far outside guest memory, any length, flags and
//! `next`), random available rings and indices, and random request bytes,
//! fed to `queue::pop` and to the rng and block devices. The property: every
//! case terminates without a panic, and whatever the device accepted it
//! completed through the used ring with a length inside the buffers it was
//! given.

use std::io::Write;

use neph_vmm::devices::virtio::block::{Block, DiskBackend};
use neph_vmm::devices::virtio::queue;
use neph_vmm::devices::virtio::rng::Rng;
use neph_vmm::devices::virtio::{Activation, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt};
use neph_vmm::vstate::memory::GuestMemoryMmap;
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 0x10_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const DATA: u64 = 0x8000;

#[derive(Debug, Clone)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => DATA..DATA + 0x4000,
        1 => 0..MEM,
        1 => any::<u64>(),
        1 => Just(MEM - 8),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..600, 1 => any::<u32>(), 1 => Just(16u32), 1 => Just(1u32)]
}

fn desc() -> impl Strategy<Value = RawDesc> {
    (
        addr(),
        len(),
        0u16..8,
        prop_oneof![3 => 0u16..16, 1 => any::<u16>()],
    )
        .prop_map(|(addr, len, flags, next)| RawDesc {
            addr,
            len,
            flags,
            next,
        })
}

#[derive(Debug, Clone)]
struct Case {
    size_log2: u32,
    descs: Vec<RawDesc>,
    ring: Vec<u16>,
    avail_idx: u16,
    data: Vec<u8>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        0u32..5,
        prop::collection::vec(desc(), 16),
        prop::collection::vec(prop_oneof![3 => 0u16..16, 1 => any::<u16>()], 16),
        prop_oneof![3 => 0u16..20, 1 => any::<u16>()],
        prop::collection::vec(any::<u8>(), 0x4000),
    )
        .prop_map(|(size_log2, descs, ring, avail_idx, data)| Case {
            size_log2,
            descs,
            ring,
            avail_idx,
            data,
        })
}

fn memory(c: &Case) -> GuestMemoryMmap {
    let m =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(MEM).unwrap())]).unwrap();
    for (i, d) in c.descs.iter().enumerate() {
        let at = DESC + 16 * i as u64;
        m.write_obj(d.addr, GuestAddress(at)).unwrap();
        m.write_obj(d.len, GuestAddress(at + 8)).unwrap();
        m.write_obj(d.flags, GuestAddress(at + 12)).unwrap();
        m.write_obj(d.next, GuestAddress(at + 14)).unwrap();
    }
    m.write_obj(c.avail_idx, GuestAddress(AVAIL + 2)).unwrap();
    for (i, h) in c.ring.iter().enumerate() {
        m.write_obj(*h, GuestAddress(AVAIL + 4 + 2 * i as u64))
            .unwrap();
    }
    m.write_slice(&c.data, GuestAddress(DATA)).unwrap();
    m
}

fn make_queue(c: &Case, m: &GuestMemoryMmap) -> virtio_queue::Queue {
    let size = 1u16 << c.size_log2;
    queue::build(16, size, DESC, AVAIL, USED, m).unwrap()
}

fn used_idx(m: &GuestMemoryMmap) -> u16 {
    m.read_obj(GuestAddress(USED + 2)).unwrap()
}

/// Runs `dev` over the case; checks every used element it produced.
fn drive(mut dev: Box<dyn VirtioDevice>, c: &Case) {
    let m = memory(c);
    let q = make_queue(c, &m);
    dev.activate(Activation {
        mem: m.clone(),
        queues: vec![q],
        interrupt: VirtioInterrupt::polled(1),
        acked_features: VIRTIO_F_VERSION_1,
    });
    let result = dev.process_queue(0);
    let used = used_idx(&m);
    let size = 1u16 << c.size_log2;
    // Never more completions than a ring's worth.
    assert!(used <= size, "{used} completions in a ring of {size}");
    for i in 0..used {
        let at = USED + 4 + 8 * u64::from(i % size);
        let id: u32 = m.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = m.read_obj(GuestAddress(at + 4)).unwrap();
        assert!(id < u32::from(size), "used id {id} outside the ring");
        // A completed request wrote no more than its buffers hold.
        let total: u64 = c.descs.iter().map(|d| u64::from(d.len)).sum::<u64>().max(1);
        assert!(u64::from(len) <= total);
    }
    // After an error the device is stopped: another notification is a no-op.
    if result.is_err() {
        dev.reset();
        assert!(dev.process_queue(0).is_ok());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn pop_terminates_and_validates(c in case()) {
        let m = memory(&c);
        let mut q = make_queue(&c, &m);
        let size = 1u16 << c.size_log2;
        let mut popped = 0u32;
        while let Ok(Some(chain)) = queue::pop(&mut q, &m, 64) {
            popped += 1;
            prop_assert!(!chain.descs.is_empty() && chain.descs.len() <= 64);
            for d in &chain.descs {
                let end = d.addr().0.checked_add(u64::from(d.len()));
                prop_assert!(d.len() == 0 || end.is_some_and(|e| e <= MEM));
            }
            queue::complete(&mut q, &m, chain.head, 0).unwrap();
            prop_assert!(popped <= u32::from(size));
        }
    }

    #[test]
    fn rng_survives_hostile_rings(c in case()) {
        drive(Box::<Rng>::default(), &c);
    }

    #[test]
    fn block_survives_hostile_rings(c in case(), readonly in any::<bool>()) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0xa5; 16 * 512]).unwrap();
        let disk = DiskBackend::open(f.path(), readonly).unwrap();
        drive(Box::new(Block::new(disk)), &c);
        // The image never grows past its size.
        prop_assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 16 * 512);
    }
}
