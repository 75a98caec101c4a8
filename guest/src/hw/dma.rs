//! A bump allocator for memory shared with devices (virtqueues and
//! buffers): a fixed region right after the guest image, handed out zeroed
//! and never freed (drivers allocate once at probe time).

/// Bytes reserved for device memory.
pub const POOL_SIZE: u64 = 4 << 20;

/// The allocator.
#[derive(Debug)]
pub struct Dma {
    next: u64,
    end: u64,
}

impl Dma {
    /// Takes ownership of `[start, start + POOL_SIZE)`.
    ///
    /// # Safety
    /// The range must be identity-mapped RAM that nothing else uses.
    pub unsafe fn new(start: u64) -> Self {
        Self {
            next: start,
            end: start + POOL_SIZE,
        }
    }

    /// One past the pool.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Allocates `size` zeroed bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<*mut u8> {
        let p = self.alloc_uninit(size, align)?;
        // SAFETY: inside the pool `new` was given exclusive use of, and
        // never handed out before (the bump pointer only grows).
        unsafe { core::ptr::write_bytes(p, 0, usize::try_from(size).ok()?) };
        Some(p)
    }

    /// Allocates `size` bytes aligned to `align` without clearing them
    /// (clearing costs about a microsecond per 8 bytes under PVM): for
    /// buffers the device fills or the driver writes before use.
    pub fn alloc_uninit(&mut self, size: u64, align: u64) -> Option<*mut u8> {
        let start = self.next.checked_next_multiple_of(align.max(1))?;
        let end = start.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(start as *mut u8)
    }
}
