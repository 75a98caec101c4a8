//! The memory dirtier: writes one word into every 4 KiB page of a working
//! set, pass after pass, paced to a rate in MiB/s (0 = as fast as it can).
//! It runs cooperatively from the shell loop in slices of at most ~500 µs,
//! so the console and network stay responsive.

use neph_guest::checksum::dirty_budget;
use neph_guest::memmap::Region;

use super::clock::{self, Deadline};

const PAGE: u64 = 4096;
const SLICE_US: u64 = 500;
/// Pages written between two checks of the clock.
const BATCH: u64 = 64;

/// Writes `value` into the first word of `count` consecutive pages from
/// `first`, eight pages per loop iteration (every instruction counts under
/// PVM, where they are emulated).
fn touch_pages(first: u64, count: u64, value: u64) {
    let mut p = first as *mut u64;
    let words_per_page = (PAGE / 8) as usize;
    // SAFETY: the caller passes a page range inside the workload region,
    // which is RAM reserved for workloads and never handed to Rust objects.
    unsafe {
        for _ in 0..count / 8 {
            for k in 0..8 {
                p.add(k * words_per_page).write_volatile(value);
            }
            p = p.add(8 * words_per_page);
        }
        for _ in 0..count % 8 {
            p.write_volatile(value);
            p = p.add(words_per_page);
        }
    }
}

/// Dirtier state.
#[derive(Debug)]
pub struct Dirtier {
    region: Region,
    running: bool,
    mib: u64,
    mib_per_s: u64,
    start_ns: u64,
    stop_ns: u64,
    pages_written: u64,
    next_page: u64,
    passes: u64,
}

/// Why dirtying cannot start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StartDirtyError {
    /// Larger than the workload region.
    #[error("{0} MiB requested but only {1} MiB are free for workloads")]
    TooLarge(u64, u64),
}

/// A snapshot for `dirty status`.
#[derive(Clone, Copy, Debug)]
pub struct DirtyStatus {
    /// Running.
    pub running: bool,
    /// Working-set size.
    pub mib: u64,
    /// Target rate (0 = unlimited).
    pub mib_per_s: u64,
    /// MiB of pages dirtied so far.
    pub dirtied_mib: u64,
    /// Completed passes over the working set.
    pub passes: u64,
    /// Time running.
    pub elapsed_ms: u64,
    /// Achieved rate.
    pub actual_mib_per_s: u64,
    /// First byte of the working set.
    pub addr: u64,
}

impl Dirtier {
    /// A dirtier over `region` (guest RAM nothing else uses).
    pub fn new(region: Region) -> Self {
        Self {
            region,
            running: false,
            mib: 0,
            mib_per_s: 0,
            start_ns: 0,
            stop_ns: 0,
            pages_written: 0,
            next_page: 0,
            passes: 0,
        }
    }

    /// MiB available to workloads.
    pub fn capacity_mib(&self) -> u64 {
        self.region.len() >> 20
    }

    /// Starts (or restarts) dirtying.
    pub fn start(&mut self, mib: u64, mib_per_s: u64) -> Result<(), StartDirtyError> {
        if mib > self.capacity_mib() {
            return Err(StartDirtyError::TooLarge(mib, self.capacity_mib()));
        }
        *self = Self {
            running: true,
            mib,
            mib_per_s,
            start_ns: clock::now_ns(),
            ..Self::new(self.region)
        };
        Ok(())
    }

    /// Stops dirtying.
    pub fn stop(&mut self) {
        if self.running {
            self.running = false;
            self.stop_ns = clock::now_ns();
        }
    }

    /// Current statistics.
    pub fn status(&self) -> DirtyStatus {
        let end = if self.running {
            clock::now_ns()
        } else {
            self.stop_ns
        };
        let elapsed_ns = end.saturating_sub(self.start_ns);
        let bytes = self.pages_written * PAGE;
        DirtyStatus {
            running: self.running,
            mib: self.mib,
            mib_per_s: self.mib_per_s,
            dirtied_mib: bytes >> 20,
            passes: self.passes,
            elapsed_ms: elapsed_ns / 1_000_000,
            actual_mib_per_s: if elapsed_ns == 0 {
                0
            } else {
                u64::try_from((u128::from(bytes) * 1_000_000_000 / u128::from(elapsed_ns)) >> 20)
                    .unwrap_or(u64::MAX)
            },
            addr: self.region.start,
        }
    }

    /// Runs one slice; returns whether any page was written.
    pub fn step(&mut self) -> bool {
        if !self.running {
            return false;
        }
        let pages = (self.mib << 20) / PAGE;
        let deadline = Deadline::after_us(SLICE_US);
        let allowed = dirty_budget(
            self.mib_per_s,
            clock::now_ns().saturating_sub(self.start_ns),
        ) / PAGE;
        let mut wrote = false;
        while self.pages_written < allowed {
            let batch = (pages - self.next_page).min(BATCH);
            let first = self.region.start + self.next_page * PAGE;
            touch_pages(first, batch, self.passes);
            self.next_page += batch;
            self.pages_written += batch;
            if self.next_page == pages {
                self.next_page = 0;
                self.passes += 1;
            }
            wrote = true;
            if deadline.expired() {
                break;
            }
        }
        wrote
    }
}
