//! PCI memory BAR arithmetic for assigning BARs the firmware or VMM left
//! unassigned: decoding a BAR's size from its all-ones probe and placing it
//! in a window.

/// Size of a memory BAR from the value read back after writing all ones
/// (`lo`, and `hi` for the upper half of a 64-bit BAR). `None` if the BAR is
/// not implemented.
pub fn decoded_size(lo: u32, hi: Option<u32>) -> Option<u64> {
    let mask = (u64::from(hi.unwrap_or(u32::MAX)) << 32) | u64::from(lo & !0xf);
    if lo & !0xf == 0 && hi.is_none_or(|h| h == 0) {
        return None;
    }
    let size = (!mask).wrapping_add(1);
    (size != 0 && size.is_power_of_two()).then_some(size)
}

/// The address for a BAR of `size` bytes: the first multiple of `size` at
/// or above `next` whose end does not pass `end`.
pub fn place(next: u64, size: u64, end: u64) -> Option<u64> {
    let addr = next.checked_next_multiple_of(size)?;
    (addr.checked_add(size)? <= end).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_decode() {
        // 16 KiB 32-bit BAR.
        assert_eq!(decoded_size(0xffff_c000, None), Some(0x4000));
        // Type bits in the low nibble are ignored.
        assert_eq!(decoded_size(0xffff_c00c, Some(0xffff_ffff)), Some(0x4000));
        // 8 GiB 64-bit BAR.
        assert_eq!(decoded_size(0, Some(0xffff_fffe)), Some(8 << 30));
        // Unimplemented BARs read back zero.
        assert_eq!(decoded_size(0, None), None);
        assert_eq!(decoded_size(0, Some(0)), None);
        // Garbage (non-contiguous mask) is refused.
        assert_eq!(decoded_size(0xf0f0_0000, None), None);
    }

    #[test]
    fn placement_aligns_and_respects_the_window() {
        assert_eq!(place(0xc000_1000, 0x4000, 0xe000_0000), Some(0xc000_4000));
        assert_eq!(place(0xc000_0000, 0x4000, 0xe000_0000), Some(0xc000_0000));
        assert_eq!(place(0xdfff_f000, 0x4000, 0xe000_0000), None);
        assert_eq!(place(u64::MAX - 10, 0x1000, u64::MAX), None);
    }
}
