//! The guest's view of its RAM, from the PVH memory map: total size, the
//! checks that keep `checksum` and the workloads inside RAM, and the region
//! the workloads may use.

/// Most memory-map entries kept (extra entries are ignored).
pub const MAX_REGIONS: usize = 32;
/// PVH/e820 type of usable RAM.
pub const TYPE_RAM: u32 = 1;

/// One RAM range `[start, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl Region {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// The RAM ranges of the guest, sorted and merged.
#[derive(Clone, Copy, Debug)]
pub struct MemMap {
    regions: [Region; MAX_REGIONS],
    count: usize,
    /// Entries of any type seen in the source map.
    pub entries_seen: usize,
}

impl Default for MemMap {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl MemMap {
    /// No RAM.
    pub const EMPTY: Self = Self {
        regions: [Region { start: 0, end: 0 }; MAX_REGIONS],
        count: 0,
        entries_seen: 0,
    };

    /// Adds an entry of the source map; non-RAM and empty entries are only
    /// counted.
    pub fn add(&mut self, addr: u64, size: u64, kind: u32) {
        self.entries_seen += 1;
        if kind != TYPE_RAM || size == 0 {
            return;
        }
        let end = addr.saturating_add(size);
        if self.count == MAX_REGIONS {
            return;
        }
        let mut i = self.count;
        while i > 0 && self.regions[i - 1].start > addr {
            self.regions[i] = self.regions[i - 1];
            i -= 1;
        }
        self.regions[i] = Region { start: addr, end };
        self.count += 1;
        self.merge();
    }

    fn merge(&mut self) {
        let mut out = 0;
        for i in 0..self.count {
            let r = self.regions[i];
            if out > 0 && r.start <= self.regions[out - 1].end {
                let prev = &mut self.regions[out - 1];
                prev.end = prev.end.max(r.end);
            } else {
                self.regions[out] = r;
                out += 1;
            }
        }
        self.count = out;
    }

    /// The RAM regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions[..self.count]
    }

    /// Total RAM in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.regions().iter().map(Region::len).sum()
    }

    /// Total RAM in MiB, rounded up (the legacy hole below 1 MiB does not
    /// make a 256 MiB guest report 255).
    pub fn total_mib(&self) -> u64 {
        self.total_bytes().div_ceil(1 << 20)
    }

    /// Whether `[addr, addr + len)` lies inside one RAM region.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.regions()
            .iter()
            .any(|r| r.start <= addr && end <= r.end)
    }

    /// Whether `[addr, addr + len)` overlaps any RAM region (an overflowing
    /// range counts as overlapping).
    pub fn overlaps(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return true;
        };
        self.regions().iter().any(|r| addr < r.end && r.start < end)
    }

    /// The largest RAM range at or above `floor` and below `ceiling`.
    pub fn largest_from(&self, floor: u64, ceiling: u64) -> Option<Region> {
        self.regions()
            .iter()
            .map(|r| Region {
                start: r.start.max(floor),
                end: r.end.min(ceiling),
            })
            .filter(|r| r.start < r.end)
            .max_by_key(Region::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_like_256m() -> MemMap {
        let mut m = MemMap::default();
        m.add(0x10_0000, (256 << 20) - 0x10_0000, TYPE_RAM);
        m.add(0, 0x9fc00, TYPE_RAM);
        m.add(0x9fc00, 0x400, 2);
        m.add(0xf0000, 0x10000, 2);
        m
    }

    #[test]
    fn totals_round_up_to_the_configured_size() {
        let m = qemu_like_256m();
        assert_eq!(m.regions().len(), 2);
        assert_eq!(m.regions()[0].start, 0);
        assert_eq!(m.total_mib(), 256);
        assert_eq!(m.entries_seen, 4);
    }

    #[test]
    fn overlapping_and_adjacent_entries_merge() {
        let mut m = MemMap::default();
        m.add(0x2000, 0x1000, TYPE_RAM);
        m.add(0x1000, 0x1000, TYPE_RAM);
        m.add(0x2800, 0x2000, TYPE_RAM);
        assert_eq!(
            m.regions(),
            &[Region {
                start: 0x1000,
                end: 0x4800
            }]
        );
    }

    #[test]
    fn contains_rejects_ranges_outside_or_spanning_holes() {
        let m = qemu_like_256m();
        assert!(m.contains(0x20_0000, 0x1000));
        assert!(!m.contains(0x9f000, 0x2000));
        assert!(!m.contains(u64::MAX - 4, 10));
        assert!(!m.contains(256 << 20, 1));
        assert!(m.contains((256 << 20) - 1, 1));
    }

    #[test]
    fn overlap_detects_bars_placed_on_ram() {
        let m = qemu_like_256m();
        assert!(m.overlaps(0xff000, 0x2000));
        assert!(!m.overlaps(0xa0000, 0x10000));
        assert!(!m.overlaps(0xc000_0000, 0x4000));
        assert!(m.overlaps(u64::MAX, 2));
    }

    #[test]
    fn largest_region_respects_bounds() {
        let m = qemu_like_256m();
        let r = m.largest_from(16 << 20, 3 << 30).unwrap();
        assert_eq!(
            r,
            Region {
                start: 16 << 20,
                end: 256 << 20
            }
        );
        assert!(m.largest_from(512 << 20, 1 << 40).is_none());
    }

    #[test]
    fn too_many_entries_are_dropped_not_panicking() {
        let mut m = MemMap::default();
        for i in 0..100u64 {
            m.add(i * 0x10000, 0x1000, TYPE_RAM);
        }
        assert_eq!(m.regions().len(), MAX_REGIONS);
        assert_eq!(m.entries_seen, 100);
    }
}
