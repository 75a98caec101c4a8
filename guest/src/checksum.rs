//! Checksums and deterministic data used by the workloads: FNV-1a 64 over
//! 64-bit words (memory and disk checksums, easy to recompute on the host),
//! the disk-writer sector pattern, and the pacing rule of the memory dirtier.
//!
//! Both the checksum and the pattern work a 64-bit word at a time: under PVM
//! the guest's instructions are emulated (about a microsecond each), so
//! byte-at-a-time loops would be eight times slower.

/// FNV-1a 64-bit offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// Sector size of the disk workloads.
pub const SECTOR: usize = 512;

/// Incremental "FNV-1a 64 over words": the input is taken as
/// little-endian 64-bit words `w`, each folded in as `h = (h ^ w) * prime`
/// starting from the FNV offset basis; a final partial word is folded in
/// byte by byte the same way (classic FNV-1a). Feeding data in pieces gives
/// the same result as one call only when every piece but the last is a
/// multiple of 8 bytes long (true for all uses here: sectors and pages).
///
/// Host-side reference (Python): `h = 0xcbf29ce484222325`; for each 8-byte
/// little-endian word `w`: `h = ((h ^ w) * 0x100000001b3) % 2**64`; then for
/// each remaining byte `b`: `h = ((h ^ b) * 0x100000001b3) % 2**64`.
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
        let mut words = data.chunks_exact(8);
        for w in words.by_ref() {
            let v = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            h = (h ^ v).wrapping_mul(FNV_PRIME);
        }
        for &b in words.remainder() {
            h = (h ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
        self.0 = h;
    }

    /// The hash of everything fed so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// [`Fnv1a`] of `data` in one call.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h = Fnv1a::new();
    h.update(data);
    h.finish()
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Fills one sector with the disk-writer pattern for `(seed, lba)`: word `i`
/// (little-endian) is `base ^ ((i + 1) * 0x9e3779b97f4a7c15)` where `base` is
/// splitmix64 of `seed ^ (lba * 0x9e3779b97f4a7c15)` (wrapping arithmetic).
pub fn fill_sector(buf: &mut [u8; SECTOR], seed: u64, lba: u64) {
    let base = splitmix64(seed ^ lba.wrapping_mul(GOLDEN));
    let mut k = 0u64;
    for chunk in buf.chunks_exact_mut(8) {
        k = k.wrapping_add(GOLDEN);
        chunk.copy_from_slice(&(base ^ k).to_le_bytes());
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
    fn short_inputs_match_classic_fnv1a() {
        // Under 8 bytes there are no whole words: classic FNV-1a vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn words_are_folded_little_endian() {
        let data: Vec<u8> = (0u8..20).collect();
        let mut h = FNV_OFFSET;
        for w in data.chunks_exact(8) {
            h = (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(FNV_PRIME);
        }
        for &b in &data[16..] {
            h = (h ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
        assert_eq!(fnv1a64(&data), h);
        let mut s = Fnv1a::new();
        s.update(&data[..8]);
        s.update(&data[8..]);
        assert_eq!(s.finish(), h);
        assert_ne!(fnv1a64(&data[..16]), fnv1a64(&data[..15]));
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
