//! Checksums and deterministic data used by the workloads: FNV-1a 64 (memory
//! and disk checksums, easy to recompute on the host), the disk-writer block
//! pattern, and the pacing rule of the memory dirtier.

/// FNV-1a 64-bit offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// Sector size of the disk workloads.
pub const SECTOR: usize = 512;

/// Incremental FNV-1a 64 hasher.
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(FNV_OFFSET)
    }
}

impl Fnv1a {
    /// Starts a new hash.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        let mut h = self.0;
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
        self.0 = h;
    }

    /// The hash of everything fed so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// FNV-1a 64 of `data`.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h = Fnv1a::new();
    h.update(data);
    h.finish()
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills one sector with the disk-writer pattern for `(seed, lba)`: 64
/// little-endian words of splitmix64 seeded with `seed ^ (lba * golden)`.
pub fn fill_sector(buf: &mut [u8; SECTOR], seed: u64, lba: u64) {
    let mut state = seed ^ lba.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for chunk in buf.chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
}

/// Fills a sector by repeating `pattern` (an empty pattern gives zeros).
pub fn fill_repeating(buf: &mut [u8; SECTOR], pattern: &[u8]) {
    if pattern.is_empty() {
        buf.fill(0);
        return;
    }
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern[i % pattern.len()];
    }
}

/// Bytes the dirtier may have written after `elapsed_ns` at `mib_per_s`
/// (0 means unlimited).
pub fn dirty_budget(mib_per_s: u64, elapsed_ns: u64) -> u64 {
    if mib_per_s == 0 {
        return u64::MAX;
    }
    let bytes = (u128::from(mib_per_s) << 20)
        .checked_mul(u128::from(elapsed_ns))
        .map_or(u128::MAX, |b| b / 1_000_000_000);
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        let mut h = Fnv1a::new();
        h.update(b"foo");
        h.update(b"bar");
        assert_eq!(h.finish(), fnv1a64(b"foobar"));
    }

    #[test]
    fn sector_pattern_is_deterministic_and_depends_on_seed_and_lba() {
        let mut a = [0u8; SECTOR];
        let mut b = [0u8; SECTOR];
        fill_sector(&mut a, 7, 100);
        fill_sector(&mut b, 7, 100);
        assert_eq!(a, b);
        fill_sector(&mut b, 7, 101);
        assert_ne!(a, b);
        fill_sector(&mut b, 8, 100);
        assert_ne!(a, b);
        assert!(a.iter().any(|&x| x != 0));
    }

    #[test]
    fn repeating_pattern_fills_whole_sector() {
        let mut s = [1u8; SECTOR];
        fill_repeating(&mut s, b"abc");
        assert_eq!(&s[..6], b"abcabc");
        assert_eq!(s[511], b"abc"[511 % 3]);
        fill_repeating(&mut s, b"");
        assert!(s.iter().all(|&x| x == 0));
    }

    #[test]
    fn dirty_budget_scales_with_time() {
        assert_eq!(dirty_budget(0, 5), u64::MAX);
        assert_eq!(dirty_budget(1, 1_000_000_000), 1 << 20);
        assert_eq!(dirty_budget(100, 500_000_000), 50 << 20);
        assert_eq!(dirty_budget(u64::MAX, u64::MAX), u64::MAX);
    }
}
