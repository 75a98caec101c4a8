//! The guest-physical memory map (docs/guest-platform.md): where RAM, the
//! MMIO hole and every boot structure the VMM writes live.

/// Start of the boot GDT.
pub const GDT_START: u64 = 0x500;
/// `hvm_start_info` for a PVH boot.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH module list (one entry: the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// The PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// The Linux zero page (`boot_params`) for a bzImage boot.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for a 64-bit Linux boot.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for a 64-bit Linux boot.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directories (4 pages: the first 4 GiB with 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, including its NUL.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Extended BIOS data area: reserved up to 640 KiB.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory.
pub const LOW_RAM_END: u64 = 0xa0000;
/// ACPI tables (RSDP first, as the spec searches 0xe0000..0xfffff).
pub const ACPI_START: u64 = 0xe0000;
/// The MP table (floating pointer first).
pub const MPTABLE_START: u64 = 0xf0000;
/// End of the BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// Where kernels are loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (3 GiB).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// PCI BARs are allocated from here up to [`PCI_MMIO_END`].
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
/// End of the PCI BAR window (the IOAPIC follows).
pub const PCI_MMIO_END: u64 = IOAPIC_START;
/// The IOAPIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs.
pub const APIC_START: u64 = 0xfee0_0000;
/// RAM beyond 3 GiB continues here.
pub const HIGH_RAM_START: u64 = MMIO_HOLE_END;
/// TSS for KVM on Intel (three pages below the MMIO hole's top).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Identity map page for KVM on Intel (one page below the TSS).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Guest RAM ranges `(start, length)` for `mem_bytes` of memory.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low = mem_bytes.min(MMIO_HOLE_START);
    let mut ranges = vec![(0, low)];
    if mem_bytes > MMIO_HOLE_START {
        ranges.push((HIGH_RAM_START, mem_bytes - MMIO_HOLE_START));
    }
    ranges
}

/// Kind of an entry in the e820 / PVH memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// Usable RAM (e820 type 1).
    Ram = 1,
    /// Reserved (e820 type 2).
    Reserved = 2,
}

/// One entry of the memory map given to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: MemoryKind,
}

/// The memory map reported to the guest through the PVH memmap and e820.
pub fn memory_map(mem_bytes: u64) -> Vec<MemoryMapEntry> {
    let low_end = mem_bytes.min(MMIO_HOLE_START);
    let mut map = vec![
        MemoryMapEntry {
            addr: 0,
            size: EBDA_START,
            kind: MemoryKind::Ram,
        },
        MemoryMapEntry {
            addr: EBDA_START,
            size: LOW_RAM_END - EBDA_START,
            kind: MemoryKind::Reserved,
        },
        MemoryMapEntry {
            addr: ACPI_START,
            size: BIOS_END - ACPI_START,
            kind: MemoryKind::Reserved,
        },
        MemoryMapEntry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: MemoryKind::Ram,
        },
    ];
    if mem_bytes > MMIO_HOLE_START {
        map.push(MemoryMapEntry {
            addr: HIGH_RAM_START,
            size: mem_bytes - MMIO_HOLE_START,
            kind: MemoryKind::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_ram_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        let map = memory_map(128 << 20);
        assert_eq!(map.len(), 4);
        assert_eq!(map[3].addr + map[3].size, 128 << 20);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let mem = 4u64 << 30;
        assert_eq!(
            ram_ranges(mem),
            vec![(0, MMIO_HOLE_START), (HIGH_RAM_START, 1 << 30)]
        );
        let map = memory_map(mem);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == MemoryKind::Ram)
            .map(|e| e.size)
            .sum();
        // Everything but the 640 KiB..1 MiB window is RAM.
        assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
        assert!(
            map.iter()
                .all(|e| e.addr >= MMIO_HOLE_END || e.addr + e.size <= MMIO_HOLE_START)
        );
    }
}
