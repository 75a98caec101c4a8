//! Pure logic of the Nephele test guest (`neph-guest`): everything that does
//! not touch hardware, so it can be unit-tested on the host with
//! `cargo test --lib` (run from `guest/`).
//!
//! The bare-metal binary (`src/main.rs` and `src/bin_support/`) owns the
//! hardware side: PVH entry, serial port, LAPIC, PCI, virtio transports and
//! the shell loop. This library owns:
//! - [`bootcfg`]: kernel command line keys (`ip=`, `gw=`, `run=`);
//! - [`shell`]: shell command grammar and the line editor;
//! - [`net`]: Ethernet/ARP/IPv4/ICMP parsing, building and the tiny stack;
//! - [`virtq`]: the split virtqueue (driver side) and its ring layout;
//! - [`acpi`]: RSDP/RSDT/XSDT/MADT/FADT and MP-table parsing;
//! - [`memmap`]: the PVH memory map summary;
//! - [`pcibar`]: sizing and placing unassigned PCI memory BARs;
//! - [`checksum`]: FNV-1a, disk patterns and the dirtying pacer;
//! - [`pvclock`]: kvmclock time scaling.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod acpi;
pub mod bootcfg;
pub mod checksum;
pub mod memmap;
pub mod net;
pub mod pcibar;
pub mod pvclock;
pub mod shell;
pub mod virtq;

/// Parses a decimal or `0x`-prefixed hexadecimal unsigned number.
pub fn parse_u64(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()
    } else {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }
}

/// Writes `v` in decimal at the end of `buf`; returns the digits. One
/// division by a constant (a multiplication) per digit, no `core::fmt`:
/// the guest's boot path prints with this (see `hw::serial`).
pub fn decimal(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[at..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{decimal, parse_u64};

    #[test]
    fn decimal_matches_display() {
        let mut buf = [0u8; 20];
        for v in [0, 1, 9, 10, 99, 100, 12345, u64::from(u32::MAX), u64::MAX] {
            assert_eq!(decimal(v, &mut buf), v.to_string().as_bytes());
        }
    }

    #[test]
    fn numbers_parse_in_decimal_and_hex() {
        assert_eq!(parse_u64("0"), Some(0));
        assert_eq!(parse_u64("1234"), Some(1234));
        assert_eq!(parse_u64("0x10"), Some(16));
        assert_eq!(parse_u64("0XfF"), Some(255));
        assert_eq!(parse_u64("0x"), None);
        assert_eq!(parse_u64(""), None);
        assert_eq!(parse_u64("-1"), None);
        assert_eq!(parse_u64("+1"), None);
        assert_eq!(parse_u64("12a"), None);
        assert_eq!(parse_u64("99999999999999999999999"), None);
    }
}
