//! Dirty tracking for pre-copy: which guest pages and which disk chunks
//! still have to be sent.
//!
//! Guest pages are dirtied by vCPUs (KVM's dirty log, turned on per memory
//! slot with `KVM_MEM_LOG_DIRTY_PAGES` and read-and-cleared with
//! `KVM_GET_DIRTY_LOG`) and by the VMM's own devices (virtio-blk reads,
//! virtio-net receive, rng, used rings: vm-memory's [`AtomicBitmap`] on each
//! region). Disk chunks are dirtied by the guest's writes, logged by the
//! block device into a [`WriteLog`].
//!
//! Where KVM offers it (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, probed, with
//! `KVM_DIRTY_LOG_INITIALLY_SET` when offered), `KVM_GET_DIRTY_LOG` only
//! reads and the pages found dirty are write-protected again with
//! `KVM_CLEAR_DIRTY_LOG` in chunks of [`CLEAR_CHUNK`] pages: KVM holds its
//! MMU lock for one chunk at a time, not for every page of the slot at
//! once, so a vCPU faulting meanwhile waits for a chunk, not for the whole
//! harvest (measured here: one plain `KVM_GET_DIRTY_LOG` of a 256 MiB guest
//! right after round 0 held the vCPU for 6.4 ms). Without the capability
//! the plain read-and-protect is used.
//!
//! The bug class this module is shaped against: a dirty bit read (and so
//! cleared) by an attempt that then fails is lost to the next attempt. Here
//! every bit harvested goes into a "still to send" set owned by the
//! attempt, and each attempt starts from "everything": [`PageTracker::start`]
//! marks all pages (and [`DiskTracker::start`] all chunks) to send, then
//! clears the logs. A failed attempt's harvest is thrown away with the
//! attempt, never leaving a page unsent by the next one.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::devices::virtio::{WRITE_LOG_CHUNK, WriteLog};
use crate::vstate::memory::{self, CreateMemoryError, GuestMemoryMmap};

/// Page size of the logs.
pub const PAGE: u64 = 4096;

/// Pages write-protected again per `KVM_CLEAR_DIRTY_LOG` (a multiple of 64,
/// as KVM wants).
pub const CLEAR_CHUNK: usize = 1024;

vmm_sys_util::ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_bindings::kvm_clear_dirty_log
);

/// Reading the dirty log failed.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// Turning logging on or off.
    #[error("cannot switch KVM's dirty log")]
    Switch(#[from] CreateMemoryError),
    /// `KVM_GET_DIRTY_LOG`.
    #[error("KVM refused the dirty log of slot {0}")]
    Get(u32, #[source] kvm_ioctls::Error),
    /// `KVM_CLEAR_DIRTY_LOG`.
    #[error("KVM refused to clear the dirty log of slot {0}")]
    Clear(u32, #[source] std::io::Error),
}

/// Turns on manual dirty-log protection if KVM offers it (and with it the
/// initially-set log, so turning logging on protects nothing at once);
/// returns whether it is on.
fn enable_manual_protect(vm: &VmFd) -> bool {
    let cap = kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
    let offered =
        u64::try_from(vm.check_extension_raw(std::os::raw::c_ulong::from(cap))).unwrap_or(0);
    let enable = u64::from(kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
    if offered & enable == 0 {
        return false;
    }
    let initially_set = u64::from(kvm_bindings::KVM_DIRTY_LOG_INITIALLY_SET);
    let mut c = kvm_bindings::kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = enable | (offered & initially_set);
    vm.enable_cap(&c).is_ok()
}

/// Write-protects again (and clears in KVM's log) the pages of `slot` set
/// in `bitmap`, [`CLEAR_CHUNK`] pages per call; chunks with nothing set
/// are skipped.
fn clear_dirty(vm: &VmFd, slot: u32, pages: usize, bitmap: &mut [u64]) -> std::io::Result<()> {
    let words_per_chunk = CLEAR_CHUNK / 64;
    for (i, chunk) in bitmap.chunks_mut(words_per_chunk).enumerate() {
        if chunk.iter().all(|w| *w == 0) {
            continue;
        }
        let first = i * CLEAR_CHUNK;
        let num = CLEAR_CHUNK.min(pages.saturating_sub(first));
        if num == 0 {
            break;
        }
        let mut clear = kvm_bindings::kvm_clear_dirty_log {
            slot,
            num_pages: u32::try_from(num).unwrap_or(u32::MAX),
            first_page: first as u64,
            ..Default::default()
        };
        clear.__bindgen_anon_1.dirty_bitmap = chunk.as_mut_ptr().cast();
        // SAFETY: KVM_CLEAR_DIRTY_LOG reads `num_pages` bits from
        // `dirty_bitmap`, which points into `chunk`: live and at least
        // `num_pages` bits long (a chunk holds CLEAR_CHUNK bits, or what is
        // left of the slot's bitmap, which has a bit per page). `first_page`
        // is a multiple of 64 and `num_pages` is too, or ends the slot, as
        // KVM requires; it checks both and the slot id and fails otherwise.
        let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A growable bit set over pages or chunks.
#[derive(Debug, Clone, Default)]
pub struct BitSet {
    words: Vec<u64>,
    len: usize,
}

impl BitSet {
    /// `len` bits, all set or all clear.
    pub fn new(len: usize, all: bool) -> Self {
        let mut words = vec![if all { u64::MAX } else { 0 }; len.div_ceil(64)];
        if all
            && !len.is_multiple_of(64)
            && let Some(last) = words.last_mut()
        {
            *last = (1u64 << (len % 64)) - 1;
        }
        Self { words, len }
    }

    /// ORs `other` (a bitmap of the same layout, e.g. from KVM) in.
    pub fn or_words(&mut self, other: &[u64]) {
        for (w, o) in self.words.iter_mut().zip(other) {
            *w |= o;
        }
        self.trim();
    }

    fn trim(&mut self) {
        if !self.len.is_multiple_of(64)
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << (self.len % 64)) - 1;
        }
    }

    /// Bits set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Takes every set bit out, in order.
    pub fn drain(&mut self) -> Vec<usize> {
        let mut out = Vec::with_capacity(usize::try_from(self.count()).unwrap_or(0));
        for (i, w) in self.words.iter_mut().enumerate() {
            let mut bits = std::mem::take(w);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                out.push(i * 64 + b);
                bits &= bits - 1;
            }
        }
        out
    }

    /// Clears bit `i` (ignored past the end).
    pub fn clear(&mut self, i: usize) {
        if i < self.len {
            self.words[i / 64] &= !(1 << (i % 64));
        }
    }

    /// Sets bit `i` (ignored past the end).
    pub fn set(&mut self, i: usize) {
        if i < self.len {
            self.words[i / 64] |= 1 << (i % 64);
        }
    }
}

/// Guest pages still to send, per memory region (slot).
#[derive(Debug)]
pub struct PageTracker {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    pending: Vec<BitSet>,
    logging: bool,
    /// Manual dirty-log protection is on (see the module doc) and a
    /// harvest protects again what it found (not the last one).
    manual_clear: bool,
}

impl PageTracker {
    /// Turns KVM's log on, clears both logs and marks every page to send.
    pub fn start(vm: Arc<VmFd>, mem: GuestMemoryMmap) -> Result<Self, DirtyLogError> {
        // Before logging goes on: with the initially-set log, turning it
        // on protects nothing; the first harvest does, chunk by chunk.
        let manual = enable_manual_protect(&vm);
        memory::set_dirty_logging(&vm, &mem, true)?;
        let pending = mem
            .iter()
            .map(|r| BitSet::new(usize::try_from(r.len() / PAGE).unwrap_or(0), true))
            .collect();
        let mut t = Self {
            vm,
            mem,
            pending,
            logging: true,
            manual_clear: manual,
        };
        // Whatever was logged before this attempt is covered by "all".
        let _ = t.harvest_into(false)?;
        Ok(t)
    }

    /// Reads and clears both logs into the pending set; returns the pages
    /// newly found dirty.
    pub fn harvest(&mut self) -> Result<u64, DirtyLogError> {
        self.harvest_into(true)
    }

    /// [`Self::harvest`] with the VM stopped for good (its last pages):
    /// nothing is protected again, since no write follows.
    pub fn harvest_last(&mut self) -> Result<u64, DirtyLogError> {
        self.manual_clear = false;
        self.harvest_into(true)
    }

    fn harvest_into(&mut self, keep: bool) -> Result<u64, DirtyLogError> {
        let mut found = 0;
        for (slot, region) in self.mem.iter().enumerate() {
            let slot_id = u32::try_from(slot).unwrap_or(u32::MAX);
            let size = usize::try_from(region.len()).unwrap_or(usize::MAX);
            let mut kvm = self
                .vm
                .get_dirty_log(slot_id, size)
                .map_err(|e| DirtyLogError::Get(slot_id, e))?;
            if self.manual_clear {
                // Protected again before the pages are read for sending, so
                // a write from now on is in the next harvest.
                let pages = usize::try_from(region.len() / PAGE).unwrap_or(0);
                clear_dirty(&self.vm, slot_id, pages, &mut kvm)
                    .map_err(|e| DirtyLogError::Clear(slot_id, e))?;
            }
            let vmm: Vec<u64> = bitmap_of(region).get_and_reset();
            if !keep {
                continue;
            }
            let mut fresh = BitSet::new(self.pending[slot].len, false);
            fresh.or_words(&kvm);
            fresh.or_words(&vmm);
            found += fresh.count();
            self.pending[slot].or_words(&fresh.words);
        }
        Ok(found)
    }

    /// Pages waiting to be sent.
    pub fn pending(&self) -> u64 {
        self.pending.iter().map(BitSet::count).sum()
    }

    /// Drops from the pending set the pages the host has never backed
    /// (neither resident nor swapped, per `/proc/self/pagemap`): anonymous
    /// memory never touched reads as zero, and the target's starts zeroed,
    /// so round 0 need not read them (which would fault each one in). Call
    /// only after [`Self::start`], so a page touched after the look is in
    /// the dirty log. Without a readable pagemap nothing is dropped.
    pub fn drop_untouched(&mut self) {
        let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") else {
            return;
        };
        for (region, set) in self.mem.iter().zip(self.pending.iter_mut()) {
            let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
                continue;
            };
            let first = host as u64 / PAGE;
            let mut buf = vec![0u8; 8 * 4096];
            let mut page = 0usize;
            while page < set.len {
                let n = (set.len - page).min(4096);
                let b = &mut buf[..n * 8];
                if pagemap.read_exact_at(b, (first + page as u64) * 8).is_err() {
                    return;
                }
                for (i, e) in b.chunks_exact(8).enumerate() {
                    let entry = u64::from_le_bytes(e.try_into().unwrap_or([0xff; 8]));
                    // Bit 63: present; bit 62: swapped.
                    if entry & (3 << 62) == 0 {
                        set.clear(page + i);
                    }
                }
                page += n;
            }
        }
    }

    /// Takes the pending pages out as guest physical addresses, in order.
    pub fn take_pending(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        for (region, set) in self.mem.iter().zip(self.pending.iter_mut()) {
            let base = region.start_addr().0;
            out.extend(set.drain().into_iter().map(|p| base + p as u64 * PAGE));
        }
        out
    }

    /// Turns KVM's log off (also done on drop).
    pub fn stop(mut self) {
        self.turn_off();
    }

    fn turn_off(&mut self) {
        if self.logging {
            self.logging = false;
            let _ = memory::set_dirty_logging(&self.vm, &self.mem, false);
        }
    }
}

impl Drop for PageTracker {
    fn drop(&mut self) {
        self.turn_off();
    }
}

fn bitmap_of(region: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    // The mapping's own bitmap (not the region-relative slice).
    std::ops::Deref::deref(region).bitmap()
}

/// Disk chunks still to send, for one disk.
#[derive(Debug)]
pub struct DiskTracker {
    log: Arc<WriteLog>,
    pending: BitSet,
    capacity: u64,
}

impl DiskTracker {
    /// A tracker for a disk of `capacity` bytes, everything pending; the
    /// caller hands [`Self::log`] to the block device.
    pub fn start(capacity: u64) -> Self {
        let cap = usize::try_from(capacity).unwrap_or(usize::MAX);
        let chunks = cap.div_ceil(WRITE_LOG_CHUNK);
        let page =
            std::num::NonZeroUsize::new(WRITE_LOG_CHUNK).unwrap_or(std::num::NonZeroUsize::MIN);
        Self {
            log: Arc::new(AtomicBitmap::new(cap, page)),
            pending: BitSet::new(chunks, true),
            capacity,
        }
    }

    /// The log the block device writes into.
    pub fn log(&self) -> Arc<WriteLog> {
        self.log.clone()
    }

    /// Moves logged writes into the pending set; returns the chunks found.
    pub fn harvest(&mut self) -> u64 {
        let mut fresh = BitSet::new(self.pending.len, false);
        fresh.or_words(&self.log.get_and_reset());
        let n = fresh.count();
        self.pending.or_words(&fresh.words);
        n
    }

    /// Chunks waiting.
    pub fn pending(&self) -> u64 {
        self.pending.count()
    }

    /// Takes the pending chunks out as (offset, length) byte ranges.
    pub fn take_pending(&mut self) -> Vec<(u64, u64)> {
        let chunk = WRITE_LOG_CHUNK as u64;
        self.pending
            .drain()
            .into_iter()
            .map(|c| {
                let off = c as u64 * chunk;
                (off, chunk.min(self.capacity - off))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitset_counts_drains_and_trims() {
        let mut b = BitSet::new(70, true);
        assert_eq!(b.count(), 70);
        let all = b.drain();
        assert_eq!(all.len(), 70);
        assert_eq!(b.count(), 0);
        b.or_words(&[0b101, u64::MAX]);
        // Bits past 70 are not part of the set.
        assert_eq!(b.count(), 2 + 6);
        assert_eq!(b.drain()[..2], [0, 2]);
        b.set(69);
        b.set(500);
        assert_eq!(b.drain(), vec![69]);
    }

    #[test]
    fn disk_tracker_starts_full_and_collects_logged_writes() {
        let cap = 3 * WRITE_LOG_CHUNK as u64 + 512;
        let mut t = DiskTracker::start(cap);
        assert_eq!(t.pending(), 4);
        let ranges = t.take_pending();
        assert_eq!(ranges.last(), Some(&(3 * WRITE_LOG_CHUNK as u64, 512)));
        assert_eq!(t.pending(), 0);
        t.log().set_addr_range(WRITE_LOG_CHUNK + 10, 1);
        assert_eq!(t.harvest(), 1);
        assert_eq!(
            t.take_pending(),
            vec![(WRITE_LOG_CHUNK as u64, WRITE_LOG_CHUNK as u64)]
        );
        // A harvested write stays pending until taken, however often the
        // log is read again.
        t.log().set_addr_range(0, 1);
        t.harvest();
        t.harvest();
        assert_eq!(t.pending(), 1);
    }

    #[test]
    fn vmm_writes_reach_the_page_bitmap() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = crate::vstate::memory::create(128 << 20).unwrap();
        let region = mem.iter().next().unwrap();
        let _ = bitmap_of(region).get_and_reset();
        mem.write_obj(1u64, GuestAddress(5 * PAGE + 8)).unwrap();
        let mut set = BitSet::new(usize::try_from(region.len() / PAGE).unwrap(), false);
        set.or_words(&bitmap_of(region).get_and_reset());
        assert_eq!(set.drain(), vec![5]);
    }

    #[test]
    fn pagemap_tells_untouched_memory_apart() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = crate::vstate::memory::create(128 << 20).unwrap();
        mem.write_obj(1u64, GuestAddress(7 * PAGE)).unwrap();
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: no /dev/kvm for a VM to track");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        crate::vstate::memory::register(&vm, &mem).unwrap();
        let mut t = PageTracker::start(vm, mem).unwrap();
        t.drop_untouched();
        // Only the written page is left (unless pagemap is unreadable
        // here, when nothing is dropped).
        let left = t.take_pending();
        assert!(
            left == vec![7 * PAGE] || left.len() == (128 << 20) / 4096,
            "{}",
            left.len()
        );
    }
}
