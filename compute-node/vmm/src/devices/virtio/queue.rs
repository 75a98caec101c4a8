//! Popping descriptor chains with every guest-controlled value checked: the
//! available index (no more than a queue's worth ahead), the head index, the
//! `next` links (a chain that loops or points outside the table ends early,
//! which is detected), the number of descriptors, and each buffer's address
//! and length against guest memory.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::vstate::memory::GuestMemoryMmap;

/// A malformed ring or descriptor chain.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// virtio-queue rejected the ring (e.g. an available index more than a
    /// queue ahead, or a used ring it cannot write).
    #[error("the ring is malformed")]
    Ring(#[source] virtio_queue::Error),
    /// The head index does not name a readable descriptor.
    #[error("chain head {head} does not name a descriptor in the table")]
    BadHead {
        /// Head index.
        head: u16,
    },
    /// The chain loops, links outside the table, or exceeds 4 GiB.
    #[error("chain {head} loops, links outside the descriptor table or exceeds 4 GiB")]
    Truncated {
        /// Head index.
        head: u16,
    },
    /// More descriptors than the device accepts in one request.
    #[error("chain {head} has more than {max} descriptors")]
    TooLong {
        /// Head index.
        head: u16,
        /// The limit.
        max: usize,
    },
    /// A buffer lies outside guest memory.
    #[error("chain {head} has a {len}-byte buffer at {addr:#x}, outside guest memory")]
    OutOfMemory {
        /// Head index.
        head: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The chain's layout does not fit the device's request format.
    #[error("chain {head} is malformed: {reason}")]
    Layout {
        /// Head index.
        head: u16,
        /// What is wrong.
        reason: &'static str,
    },
    /// A buffer could not be accessed.
    #[error("chain {head}: guest memory access failed")]
    Memory {
        /// Head index.
        head: u16,
    },
}

/// A validated descriptor chain.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Head index (to return through the used ring).
    pub head: u16,
    /// Its descriptors, in order.
    pub descs: Vec<Descriptor>,
}

impl Chain {
    /// Total length of the device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.descs
            .iter()
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum()
    }
}

/// Pops the next chain of `queue`, validated, or `None` when the driver has
/// made nothing more available. At most `max_descs` descriptors.
pub fn pop(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    max_descs: usize,
) -> Result<Option<Chain>, QueueError> {
    let chain = {
        let mut iter = queue.iter(mem).map_err(QueueError::Ring)?;
        match iter.next() {
            Some(c) => c,
            None => return Ok(None),
        }
    };
    let head = chain.head_index();
    let mut descs: Vec<Descriptor> = Vec::new();
    for d in chain {
        if descs.len() == max_descs {
            return Err(QueueError::TooLong {
                head,
                max: max_descs,
            });
        }
        if d.len() > 0
            && !GuestMemoryBackend::check_range(mem, GuestAddress(d.addr().0), d.len() as usize)
        {
            return Err(QueueError::OutOfMemory {
                head,
                addr: d.addr().0,
                len: d.len(),
            });
        }
        descs.push(d);
    }
    match descs.last() {
        None => Err(QueueError::BadHead { head }),
        Some(last) if last.has_next() => Err(QueueError::Truncated { head }),
        Some(_) => Ok(Some(Chain { head, descs })),
    }
}

/// Returns `head` to the driver with `len` bytes written.
pub fn complete(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), QueueError> {
    queue.add_used(mem, head, len).map_err(QueueError::Ring)
}

/// A queue built from what the driver programmed, if it is usable.
pub fn build(
    max: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    mem: &GuestMemoryMmap,
) -> Result<Queue, &'static str> {
    let mut q = Queue::new(max).map_err(|_| "bad maximum size")?;
    q.try_set_size(size)
        .map_err(|_| "size is not a power of two up to the maximum")?;
    q.try_set_desc_table_address(GuestAddress(desc))
        .map_err(|_| "descriptor table is misaligned")?;
    q.try_set_avail_ring_address(GuestAddress(avail))
        .map_err(|_| "available ring is misaligned")?;
    q.try_set_used_ring_address(GuestAddress(used))
        .map_err(|_| "used ring is misaligned")?;
    q.set_ready(true);
    if !q.is_valid(mem) {
        return Err("rings lie outside guest memory");
    }
    Ok(q)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    pub(crate) const F_NEXT: u16 = 1;
    pub(crate) const F_WRITE: u16 = 2;

    pub(crate) fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    pub(crate) fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// A queue of `size` at 0x1000 with `descs` in its table and `heads`
    /// made available.
    pub(crate) fn setup(m: &GuestMemoryMmap, descs: &[RawDescriptor], heads: &[u16]) -> Queue {
        let mock = MockSplitQueue::create(m, GuestAddress(0x1000), 16);
        for (i, d) in descs.iter().enumerate() {
            mock.desc_table()
                .store(u16::try_from(i).unwrap(), *d)
                .unwrap();
        }
        for (i, h) in heads.iter().enumerate() {
            mock.avail().ring().ref_at(i).unwrap().store(u16::to_le(*h));
        }
        mock.avail()
            .idx()
            .store(u16::to_le(u16::try_from(heads.len()).unwrap()));
        mock.create_queue().unwrap()
    }

    #[test]
    fn good_chain_pops() {
        let m = mem();
        let mut q = setup(
            &m,
            &[raw(0x8000, 16, F_NEXT, 1), raw(0x9000, 1, F_WRITE, 0)],
            &[0],
        );
        let c = pop(&mut q, &m, 8).unwrap().unwrap();
        assert_eq!((c.head, c.descs.len(), c.writable_len()), (0, 2, 1));
        complete(&mut q, &m, c.head, 1).unwrap();
        assert!(pop(&mut q, &m, 8).unwrap().is_none());
    }

    #[test]
    fn loop_is_detected() {
        let m = mem();
        let mut q = setup(
            &m,
            &[raw(0x8000, 16, F_NEXT, 1), raw(0x9000, 16, F_NEXT, 0)],
            &[0],
        );
        assert!(matches!(
            pop(&mut q, &m, 64),
            Err(QueueError::Truncated { head: 0 })
        ));
    }

    #[test]
    fn next_outside_table_is_detected() {
        let m = mem();
        let mut q = setup(&m, &[raw(0x8000, 16, F_NEXT, 999)], &[0]);
        assert!(matches!(
            pop(&mut q, &m, 64),
            Err(QueueError::Truncated { .. })
        ));
    }

    #[test]
    fn bad_head_is_detected() {
        let m = mem();
        let mut q = setup(&m, &[raw(0x8000, 16, 0, 0)], &[500]);
        assert!(matches!(
            pop(&mut q, &m, 64),
            Err(QueueError::BadHead { head: 500 })
        ));
    }

    #[test]
    fn buffer_outside_memory_is_detected() {
        let m = mem();
        let mut q = setup(&m, &[raw(0xffff_0000, 16, 0, 0)], &[0]);
        assert!(matches!(
            pop(&mut q, &m, 64),
            Err(QueueError::OutOfMemory { .. })
        ));
        let mut q = setup(&m, &[raw(0xff000, 0x2000, 0, 0)], &[0]);
        assert!(matches!(
            pop(&mut q, &m, 64),
            Err(QueueError::OutOfMemory { .. })
        ));
    }

    #[test]
    fn oversized_chain_is_detected() {
        let m = mem();
        let descs: Vec<_> = (0..8)
            .map(|i| raw(0x8000, 4, F_NEXT, i + 1))
            .chain([raw(0x8000, 4, 0, 0)])
            .collect();
        let mut q = setup(&m, &descs, &[0]);
        assert!(matches!(
            pop(&mut q, &m, 4),
            Err(QueueError::TooLong { max: 4, .. })
        ));
    }

    #[test]
    fn avail_index_far_ahead_is_detected() {
        let m = mem();
        let mut q = setup(&m, &[raw(0x8000, 16, 0, 0)], &[0]);
        // The driver claims 1000 new buffers in a 16-entry ring.
        let avail_idx = q.avail_ring() + 2;
        m.write_obj(1000u16, GuestAddress(avail_idx)).unwrap();
        assert!(matches!(pop(&mut q, &m, 4), Err(QueueError::Ring(_))));
    }
}
