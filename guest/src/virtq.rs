//! Split virtqueue, driver side (virtio 1.x, section 2.7): ring layout math,
//! a descriptor free list, publishing chains in the available ring and
//! reaping the used ring. The device is not trusted: used-ring entries naming
//! a descriptor that is not the head of an in-flight chain are reported as
//! errors and skipped.
//!
//! Addresses handed to the device are the queue memory's addresses as this
//! code sees them: the guest identity-maps physical memory, and the host unit
//! tests simulate the device in the same address space.

use core::sync::atomic::{Ordering, fence};

/// Descriptor continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Buffer is written by the device.
pub const DESC_F_WRITE: u16 = 2;
/// Largest queue this driver uses (small: per-queue bookkeeping is copied
/// around at boot, and under PVM every copied word costs time).
pub const MAX_QUEUE: u16 = 64;

/// Byte offsets of the three ring parts in one contiguous allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Entries.
    pub size: u16,
    /// Descriptor table offset (16-byte aligned).
    pub desc: usize,
    /// Available ring offset (2-byte aligned).
    pub avail: usize,
    /// Used ring offset (4-byte aligned).
    pub used: usize,
    /// Total bytes.
    pub total: usize,
}

impl Layout {
    /// The layout for `size` entries: a power of two in `1..=MAX_QUEUE`.
    pub fn new(size: u16) -> Option<Self> {
        if size == 0 || size > MAX_QUEUE || !size.is_power_of_two() {
            return None;
        }
        let n = usize::from(size);
        let avail = 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        Some(Self {
            size,
            desc: 0,
            avail,
            used,
            total: used + 6 + 8 * n,
        })
    }
}

/// One buffer of a chain.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (else reads it).
    pub device_writes: bool,
}

/// A completed chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index returned by [`SplitQueue::add`].
    pub id: u16,
    /// Bytes the device says it wrote.
    pub len: u32,
}

/// Queue misuse or device misbehaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// Not enough free descriptors.
    #[error("the queue has no free descriptors for a chain of {0}")]
    Full(usize),
    /// An empty chain was offered.
    #[error("a descriptor chain needs at least one buffer")]
    EmptyChain,
    /// The device returned a descriptor index we did not give it.
    #[error("the device returned descriptor {0}, which is not an in-flight chain head")]
    BadUsedId(u32),
}

/// Driver side of one split virtqueue.
#[derive(Debug)]
pub struct SplitQueue {
    layout: Layout,
    base: *mut u8,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
    chain_len: [u16; MAX_QUEUE as usize],
}

impl SplitQueue {
    /// Sets up a queue over `layout.total` bytes at `base`.
    ///
    /// # Safety
    /// `base` must be 16-byte aligned, valid for reads and writes of
    /// `layout.total` bytes for the queue's whole life, zeroed, and used by
    /// nothing else but the device this queue is given to.
    pub unsafe fn new(base: *mut u8, layout: Layout) -> Self {
        let mut q = Self {
            layout,
            base,
            free_head: 0,
            num_free: layout.size,
            avail_idx: 0,
            last_used: 0,
            chain_len: [0; MAX_QUEUE as usize],
        };
        for i in 0..layout.size {
            q.write_desc(i, 0, 0, 0, i.wrapping_add(1) % layout.size);
        }
        q
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Address of the descriptor table.
    pub fn desc_addr(&self) -> u64 {
        self.base as u64 + self.layout.desc as u64
    }

    /// Address of the available (driver) ring.
    pub fn avail_addr(&self) -> u64 {
        self.base as u64 + self.layout.avail as u64
    }

    /// Address of the used (device) ring.
    pub fn used_addr(&self) -> u64 {
        self.base as u64 + self.layout.used as u64
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    fn ptr<T>(&self, offset: usize) -> *mut T {
        debug_assert!(offset + core::mem::size_of::<T>() <= self.layout.total);
        // The offset stays inside the allocation (all callers index within
        // `layout`), so the pointer is in bounds.
        self.base.wrapping_add(offset).cast()
    }

    fn write_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let off = self.layout.desc + 16 * usize::from(i);
        // SAFETY: `i < size`, so the 16-byte descriptor lies inside the
        // queue memory that `new`'s contract makes valid and aligned.
        unsafe {
            self.ptr::<u64>(off).write_volatile(addr);
            self.ptr::<u32>(off + 8).write_volatile(len);
            self.ptr::<u16>(off + 12).write_volatile(flags);
            self.ptr::<u16>(off + 14).write_volatile(next);
        }
    }

    fn desc_next(&self, i: u16) -> u16 {
        let off = self.layout.desc + 16 * usize::from(i) + 14;
        // SAFETY: as in `write_desc`.
        unsafe { self.ptr::<u16>(off).read_volatile() }
    }

    /// Publishes a chain; returns its head index. The device sees it after
    /// the next notification.
    pub fn add(&mut self, bufs: &[Buf]) -> Result<u16, QueueError> {
        if bufs.is_empty() {
            return Err(QueueError::EmptyChain);
        }
        if bufs.len() > usize::from(self.num_free) {
            return Err(QueueError::Full(bufs.len()));
        }
        let head = self.free_head;
        let mut i = head;
        for (k, b) in bufs.iter().enumerate() {
            let next_free = self.desc_next(i);
            let last = k + 1 == bufs.len();
            let mut flags = if b.device_writes { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(i, b.addr, b.len, flags, if last { 0 } else { next_free });
            if last {
                self.free_head = next_free;
            }
            i = next_free;
        }
        let n = u16::try_from(bufs.len()).unwrap_or(u16::MAX);
        self.num_free -= n;
        self.chain_len[usize::from(head)] = n;
        let slot = self.layout.avail + 4 + 2 * usize::from(self.avail_idx % self.layout.size);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: the ring slot and the index field lie inside the queue
        // memory (`slot < avail + 4 + 2 * size`, index at `avail + 2`).
        unsafe {
            self.ptr::<u16>(slot).write_volatile(head);
            fence(Ordering::SeqCst);
            self.ptr::<u16>(self.layout.avail + 2)
                .write_volatile(self.avail_idx);
        }
        fence(Ordering::SeqCst);
        Ok(head)
    }

    /// Takes the next completed chain, if any, and frees its descriptors.
    pub fn pop_used(&mut self) -> Result<Option<Used>, QueueError> {
        // SAFETY: the used index lies inside the queue memory.
        let idx = unsafe { self.ptr::<u16>(self.layout.used + 2).read_volatile() };
        if idx == self.last_used {
            return Ok(None);
        }
        fence(Ordering::SeqCst);
        let slot = self.layout.used + 4 + 8 * usize::from(self.last_used % self.layout.size);
        // SAFETY: the used element lies inside the queue memory.
        let (id, len) = unsafe {
            (
                self.ptr::<u32>(slot).read_volatile(),
                self.ptr::<u32>(slot + 4).read_volatile(),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        let head = match u16::try_from(id) {
            Ok(h) if h < self.layout.size && self.chain_len[usize::from(h)] != 0 => h,
            _ => return Err(QueueError::BadUsedId(id)),
        };
        let n = core::mem::take(&mut self.chain_len[usize::from(head)]);
        // Walk our own chain (the device cannot change what `add` recorded:
        // it only reads descriptors) and return it to the free list.
        let mut tail = head;
        for _ in 1..n {
            tail = self.desc_next(tail);
        }
        let off = self.layout.desc + 16 * usize::from(tail) + 14;
        // SAFETY: `tail < size` (indices come from our free list), so the
        // field lies inside the queue memory.
        unsafe { self.ptr::<u16>(off).write_volatile(self.free_head) };
        self.free_head = head;
        self.num_free += n;
        Ok(Some(Used { id: head, len }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(4096))]
    struct Mem([u8; 8192]);

    fn queue(size: u16) -> (Box<Mem>, SplitQueue) {
        let mut mem = Box::new(Mem([0; 8192]));
        let layout = Layout::new(size).unwrap();
        assert!(layout.total <= 8192);
        // SAFETY: the box is 4096-aligned, zeroed, big enough and outlives
        // the queue in every test (returned together, queue dropped first
        // by declaration order in the callers).
        let q = unsafe { SplitQueue::new(mem.0.as_mut_ptr(), layout) };
        (mem, q)
    }

    /// A minimal device: completes every new available chain, filling
    /// device-writable buffers with `fill`, returning the written length.
    struct Device {
        last_avail: u16,
        used_idx: u16,
    }

    fn rd16(base: u64, off: usize) -> u16 {
        // SAFETY: test-only; offsets come from `Layout` of a live queue.
        unsafe { ((base as usize + off) as *const u16).read_volatile() }
    }

    impl Device {
        fn run(&mut self, q: &SplitQueue, fill: u8) -> usize {
            let l = q.layout();
            let base = q.desc_addr();
            let avail_idx = rd16(base, l.avail + 2);
            let mut done = 0;
            while self.last_avail != avail_idx {
                let head = rd16(
                    base,
                    l.avail + 4 + 2 * usize::from(self.last_avail % l.size),
                );
                self.last_avail = self.last_avail.wrapping_add(1);
                let mut i = head;
                let mut written = 0u32;
                for _ in 0..l.size {
                    let d = base as usize + 16 * usize::from(i);
                    // SAFETY: test-only; descriptor inside the table and
                    // buffer addresses point at test-owned memory.
                    unsafe {
                        let addr = (d as *const u64).read();
                        let len = ((d + 8) as *const u32).read();
                        let flags = ((d + 12) as *const u16).read();
                        if flags & DESC_F_WRITE != 0 {
                            core::ptr::write_bytes(addr as *mut u8, fill, len as usize);
                            written += len;
                        }
                        if flags & DESC_F_NEXT == 0 {
                            break;
                        }
                        i = ((d + 14) as *const u16).read();
                    }
                }
                let slot = base as usize + l.used + 4 + 8 * usize::from(self.used_idx % l.size);
                self.used_idx = self.used_idx.wrapping_add(1);
                // SAFETY: test-only; used ring inside the queue memory.
                unsafe {
                    (slot as *mut u32).write(u32::from(head));
                    ((slot + 4) as *mut u32).write(written);
                    ((base as usize + l.used + 2) as *mut u16).write(self.used_idx);
                }
                done += 1;
            }
            done
        }
    }

    #[test]
    fn layout_matches_the_spec_formulae() {
        let l = Layout::new(64).unwrap();
        assert_eq!(l.avail, 1024);
        assert_eq!(l.used, 1024 + 6 + 128 + 2);
        assert_eq!(l.total, l.used + 6 + 512);
        assert_eq!(l.used % 4, 0);
        let l = Layout::new(1).unwrap();
        assert_eq!((l.avail, l.used, l.total), (16, 24, 38));
        assert!(Layout::new(0).is_none());
        assert!(Layout::new(3).is_none());
        assert!(Layout::new(128).is_none());
    }

    #[test]
    fn chains_round_trip_through_a_device_many_times() {
        let (_mem, mut q) = queue(8);
        let mut dev = Device {
            last_avail: 0,
            used_idx: 0,
        };
        let mut hdr = [1u8; 16];
        let mut data = [0u8; 512];
        let mut status = [0xffu8; 1];
        // Enough iterations to wrap the 16-bit indices.
        for round in 0..70_000u32 {
            let fill = (round % 251) as u8;
            let head = q
                .add(&[
                    Buf {
                        addr: hdr.as_mut_ptr() as u64,
                        len: 16,
                        device_writes: false,
                    },
                    Buf {
                        addr: data.as_mut_ptr() as u64,
                        len: 512,
                        device_writes: true,
                    },
                    Buf {
                        addr: status.as_mut_ptr() as u64,
                        len: 1,
                        device_writes: true,
                    },
                ])
                .unwrap();
            assert_eq!(q.num_free(), 5);
            assert_eq!(dev.run(&q, fill), 1);
            let used = q.pop_used().unwrap().unwrap();
            assert_eq!(used, Used { id: head, len: 513 });
            assert_eq!(q.num_free(), 8);
            assert!(q.pop_used().unwrap().is_none());
            assert_eq!(data[511], fill);
            assert_eq!(status[0], fill);
        }
        assert_eq!(hdr[0], 1);
    }

    #[test]
    fn full_queue_and_empty_chain_are_refused() {
        let (_mem, mut q) = queue(4);
        let b = Buf {
            addr: 0x1000,
            len: 1,
            device_writes: true,
        };
        assert_eq!(q.add(&[]), Err(QueueError::EmptyChain));
        assert_eq!(q.add(&[b; 5]), Err(QueueError::Full(5)));
        for _ in 0..4 {
            q.add(&[b]).unwrap();
        }
        assert_eq!(q.add(&[b]), Err(QueueError::Full(1)));
    }

    #[test]
    fn out_of_order_completion_frees_the_right_chains() {
        let (_mem, mut q) = queue(4);
        let b = Buf {
            addr: 0x1000,
            len: 1,
            device_writes: false,
        };
        let a = q.add(&[b, b]).unwrap();
        let c = q.add(&[b, b]).unwrap();
        assert_ne!(a, c);
        assert_eq!(q.num_free(), 0);
        let l = q.layout();
        let base = q.desc_addr() as usize;
        // Device completes the second chain first.
        // SAFETY: test-only writes into the used ring.
        unsafe {
            ((base + l.used + 4) as *mut u32).write(u32::from(c));
            ((base + l.used + 2) as *mut u16).write(1);
        }
        assert_eq!(q.pop_used().unwrap().unwrap().id, c);
        assert_eq!(q.num_free(), 2);
        let d = q.add(&[b, b]).unwrap();
        assert_eq!(q.num_free(), 0);
        // SAFETY: as above.
        unsafe {
            ((base + l.used + 12) as *mut u32).write(u32::from(a));
            ((base + l.used + 20) as *mut u32).write(u32::from(d));
            ((base + l.used + 2) as *mut u16).write(3);
        }
        assert_eq!(q.pop_used().unwrap().unwrap().id, a);
        assert_eq!(q.pop_used().unwrap().unwrap().id, d);
        assert_eq!(q.num_free(), 4);
        for _ in 0..2 {
            q.add(&[b, b]).unwrap();
        }
    }

    #[test]
    fn bogus_used_ids_are_errors_not_corruption() {
        let (_mem, mut q) = queue(4);
        let b = Buf {
            addr: 0x1000,
            len: 1,
            device_writes: false,
        };
        let head = q.add(&[b]).unwrap();
        let l = q.layout();
        let base = q.desc_addr() as usize;
        // SAFETY: test-only writes into the used ring.
        unsafe {
            ((base + l.used + 4) as *mut u32).write(99);
            ((base + l.used + 12) as *mut u32).write(u32::from(head) + 1);
            ((base + l.used + 20) as *mut u32).write(u32::from(head));
            ((base + l.used + 28) as *mut u32).write(u32::from(head));
            ((base + l.used + 2) as *mut u16).write(4);
        }
        assert_eq!(q.pop_used(), Err(QueueError::BadUsedId(99)));
        assert_eq!(
            q.pop_used(),
            Err(QueueError::BadUsedId(u32::from(head) + 1))
        );
        assert_eq!(q.pop_used().unwrap().unwrap().id, head);
        // A second completion of the same chain is rejected.
        assert_eq!(q.pop_used(), Err(QueueError::BadUsedId(u32::from(head))));
        assert_eq!(q.num_free(), 4);
        assert!(q.pop_used().unwrap().is_none());
    }
}
