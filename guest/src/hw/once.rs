//! [`BootOnce`]: a value filled in place once during single-threaded boot,
//! then only read, for boot facts too large to copy around (every copied
//! byte costs time under PVM's instruction emulator).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

/// A value written once during single-threaded boot, then only read.
pub struct BootOnce<T> {
    set: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is written once before `set` is published (Release) and
// only read after it was observed (Acquire); there is no later mutation.
unsafe impl<T: Sync> Sync for BootOnce<T> {}

impl<T> BootOnce<T> {
    /// A value not yet published, starting as `v`.
    pub const fn new(v: T) -> Self {
        Self {
            set: AtomicBool::new(false),
            value: UnsafeCell::new(v),
        }
    }

    /// Fills the value in place (it starts as the `new` value, already in
    /// the loaded image) and publishes it. Filling in
    /// place avoids copying it, which under PVM costs about a microsecond
    /// per 8 bytes.
    pub fn init_with(&self, fill: impl FnOnce(&mut T)) -> &T {
        assert!(!self.set.load(Ordering::Acquire), "boot value set twice");
        // SAFETY: not yet published, so nobody else holds a reference.
        fill(unsafe { &mut *self.value.get() });
        self.set.store(true, Ordering::Release);
        self.get().unwrap_or_else(|| unreachable!())
    }

    /// The published value, if any.
    pub fn get(&self) -> Option<&T> {
        // SAFETY: published values are never mutated again.
        self.set
            .load(Ordering::Acquire)
            .then(|| unsafe { &*self.value.get() })
    }
}
