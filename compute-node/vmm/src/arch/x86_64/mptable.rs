//! The Intel MultiProcessor Specification 1.4 table: a floating pointer
//! (`_MP_`) in the BIOS area and a configuration table listing the CPUs, one
//! ISA bus, the IOAPIC and the identity-mapped legacy interrupts. Guests that
//! do not read ACPI find their CPUs here.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{APIC_START, IOAPIC_START, MPTABLE_START};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REV: u8 = 4;
const LEGACY_IRQS: u8 = 16;

/// Writing the MP table failed.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// The table does not fit in guest memory.
    #[error("the MP table does not fit in guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
    /// vCPU count out of what the table can describe.
    #[error("an MP table describes 1 to 254 CPUs, not {0}")]
    Cpus(u8),
}

/// Fixes the checksum byte at `at` so all of `bytes` sums to 0.
pub(crate) fn fix_checksum(bytes: &mut [u8], at: usize) {
    bytes[at] = 0;
    let sum = bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    bytes[at] = 0u8.wrapping_sub(sum);
}

/// The bytes of the floating pointer and configuration table, to be placed at
/// `base` (the configuration table follows the 16-byte floating pointer).
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MpTableError::Cpus(cpus));
    }
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = if id == 0 { 0b11 } else { 0b01 }; // enabled, BSP
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x0000_0600u32.to_le_bytes()); // family 6
        entries.extend_from_slice(&0x0000_0201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&u32::try_from(IOAPIC_START).unwrap_or(0).to_le_bytes());
    count += 1;
    for irq in 0..LEGACY_IRQS {
        // I/O interrupt: INT, conforming polarity and trigger, ISA bus.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: LINT0 is ExtINT, LINT1 is NMI, on every LAPIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&u16::try_from(table_len).unwrap_or(u16::MAX).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum
    table.extend_from_slice(b"NEPHELE ");
    table.extend_from_slice(b"NEPH-VMM    ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&u32::try_from(APIC_START).unwrap_or(0).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table
    table.extend_from_slice(&[0, 0]);
    table.extend_from_slice(&entries);
    fix_checksum(&mut table, 7);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    let table_addr = u32::try_from(base + 16).map_err(|_| MpTableError::Cpus(cpus))?;
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fix_checksum(&mut out, 10);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `cpus` CPUs at [`MPTABLE_START`].
pub fn setup<M: GuestMemory>(mem: &M, cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts_are_right() {
        for cpus in [1u8, 2, 16] {
            let b = build(cpus, MPTABLE_START).unwrap();
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(sum(&b[..16]), 0);
            let table = &b[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = usize::from(u16::from_le_bytes([table[4], table[5]]));
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let procs = table[44..].chunks(20).take(usize::from(cpus));
            assert!(procs.clone().all(|p| p[0] == 0));
            assert_eq!(table[44 + 3] & 2, 2, "first CPU is the BSP");
        }
        assert!(build(0, MPTABLE_START).is_err());
    }
}
