//! Minimal ACPI tables for the guest to find its CPUs and power off: RSDP
//! (revision 2, in the BIOS area so a scan finds it, and its address in
//! `hvm_start_info.rsdp_paddr`), XSDT, MADT (one local APIC per vCPU, the
//! IOAPIC), a hardware-reduced FADT whose sleep control register is I/O port
//! 0x600 and reset register I/O port 0x64, and a DSDT holding `\_S5_`, a
//! power button (`PNP0C0C`) and a Generic Event Device (`ACPI0013`, the
//! hardware-reduced way to signal events) whose interrupt is GSI
//! [`GED_IRQ`]: a graceful shutdown request raises it, the GED's `_EVT`
//! notifies the button with 0x80 and Linux's `button` driver reports
//! KEY_POWER (the Linux guest image runs busybox `acpid`, which powers off).
//! The AML is assembled by the few encoders below.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{APIC_START, IOAPIC_START};
use super::mptable::fix_checksum;
use crate::devices::legacy::{
    GED_IRQ, RESET_PORT, RESET_VALUE, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT,
};

const OEM_ID: &[u8; 6] = b"NEPHEL";
const OEM_TABLE_ID: &[u8; 8] = b"NEPHVMM ";

/// Writing the ACPI tables failed.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in guest memory.
    #[error("the ACPI tables do not fit in guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(36 + body.len()).unwrap_or(u32::MAX);
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&len.to_le_bytes());
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"NEPH");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    fix_checksum(&mut t, 9);
    t
}

/// A Generic Address Structure for a byte-wide I/O port.
fn gas_io_byte(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = 8; // bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&u32::try_from(APIC_START).unwrap_or(0).to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: 8259s present
    for id in 0..cpus {
        b.extend_from_slice(&[0, 8, id, id]);
        b.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    b.extend_from_slice(&[1, 12, cpus, 0]);
    b.extend_from_slice(&u32::try_from(IOAPIC_START).unwrap_or(0).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    // LINT1 of every processor is NMI.
    b.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    sdt(b"APIC", 5, &b)
}

/// AML encoders (ACPI 6.4, section 20): just what the DSDT needs.
mod aml {
    /// A package length prefixed to `body` (the length counts itself).
    pub fn pkg(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + 4);
        if body.len() + 1 < 0x40 {
            out.push((body.len() + 1).to_le_bytes()[0]);
        } else {
            // 2 to 4 bytes: the low nibble in the lead byte, then 8 bits each.
            let extra: usize = if body.len() + 2 < 0x1000 {
                1
            } else if body.len() + 3 < 0x10_0000 {
                2
            } else {
                3
            };
            let n = body.len() + 1 + extra;
            out.push((extra << 6 | (n & 0xf)).to_le_bytes()[0]);
            out.extend_from_slice(&(n >> 4).to_le_bytes()[..extra]);
        }
        out.extend_from_slice(body);
        out
    }

    /// `Name (seg, object)`.
    pub fn name(seg: &[u8; 4], object: &[u8]) -> Vec<u8> {
        let mut out = vec![0x08];
        out.extend_from_slice(seg);
        out.extend_from_slice(object);
        out
    }

    /// A string constant.
    pub fn string(s: &str) -> Vec<u8> {
        let mut out = vec![0x0d];
        out.extend_from_slice(s.as_bytes());
        out.push(0);
        out
    }

    /// A byte constant.
    pub fn byte(v: u8) -> Vec<u8> {
        vec![0x0a, v]
    }

    /// `Package () { elements }` (each element already encoded).
    pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![u8::try_from(elements.len()).unwrap_or(u8::MAX)];
        for e in elements {
            body.extend_from_slice(e);
        }
        let mut out = vec![0x12];
        out.extend(pkg(&body));
        out
    }

    /// `opcode PkgLength name head terms`: the shape of Scope, Device and
    /// Method.
    fn block(opcode: &[u8], name: &[u8], head: &[u8], terms: &[Vec<u8>]) -> Vec<u8> {
        let mut body = name.to_vec();
        body.extend_from_slice(head);
        terms.iter().for_each(|t| body.extend_from_slice(t));
        let mut out = opcode.to_vec();
        out.extend(pkg(&body));
        out
    }

    /// `Scope (path) { terms }`.
    pub fn scope(path: &[u8], terms: &[Vec<u8>]) -> Vec<u8> {
        block(&[0x10], path, &[], terms)
    }

    /// `Device (seg) { terms }`.
    pub fn device(seg: &[u8; 4], terms: &[Vec<u8>]) -> Vec<u8> {
        block(&[0x5b, 0x82], seg, &[], terms)
    }

    /// `Method (seg, args, NotSerialized) { terms }`.
    pub fn method(seg: &[u8; 4], args: u8, terms: &[Vec<u8>]) -> Vec<u8> {
        block(&[0x14], seg, &[args & 0x7], terms)
    }

    /// `Notify (path, value)`.
    pub fn notify(path: &[u8], value: u8) -> Vec<u8> {
        let mut out = vec![0x86];
        out.extend_from_slice(path);
        out.extend(byte(value));
        out
    }

    /// `ResourceTemplate () { Interrupt (ResourceConsumer, Edge,
    /// ActiveHigh, Exclusive) { gsi } }`: a buffer holding one extended
    /// interrupt descriptor and the end tag.
    pub fn edge_interrupt(gsi: u32) -> Vec<u8> {
        let mut bytes = vec![0x89, 6, 0, 0x03, 1];
        bytes.extend_from_slice(&gsi.to_le_bytes());
        bytes.extend_from_slice(&[0x79, 0]);
        let mut body = byte(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
        body.extend_from_slice(&bytes);
        let mut out = vec![0x11];
        out.extend(pkg(&body));
        out
    }
}

/// `\_SB_.PWRB` as an AML name path.
const PWRB_PATH: &[u8] = b"\\\x2e_SB_PWRB";

fn dsdt() -> Vec<u8> {
    let mut body = Vec::new();
    // Name (_S5_, Package (1) { 5 }): SLP_TYP 5 for soft-off.
    body.extend(aml::name(b"_S5_", &aml::package(&[aml::byte(5)])));
    body.extend(aml::scope(
        b"\\_SB_",
        &[
            aml::device(
                b"PWRB",
                &[
                    aml::name(b"_HID", &aml::string("PNP0C0C")),
                    aml::name(b"_UID", &[0x00]),
                ],
            ),
            aml::device(
                b"GED0",
                &[
                    aml::name(b"_HID", &aml::string("ACPI0013")),
                    aml::name(b"_UID", &[0x00]),
                    aml::name(b"_CRS", &aml::edge_interrupt(GED_IRQ)),
                    // The only event is the power button.
                    aml::method(b"_EVT", 1, &[aml::notify(PWRB_PATH, 0x80)]),
                ],
            ),
        ],
    ));
    sdt(b"DSDT", 2, &body)
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = vec![0u8; 276 - 36];
    let at = |off: usize| off - 36;
    b[at(40)..at(44)].copy_from_slice(&u32::try_from(dsdt_addr).unwrap_or(0).to_le_bytes());
    // Flags: RESET_REG_SUP (10), HW_REDUCED_ACPI (20).
    let flags: u32 = (1 << 10) | (1 << 20);
    b[at(112)..at(116)].copy_from_slice(&flags.to_le_bytes());
    b[at(116)..at(128)].copy_from_slice(&gas_io_byte(RESET_PORT));
    b[at(128)] = RESET_VALUE;
    b[at(131)] = 0; // minor version
    b[at(140)..at(148)].copy_from_slice(&dsdt_addr.to_le_bytes());
    b[at(244)..at(256)].copy_from_slice(&gas_io_byte(SLEEP_CONTROL_PORT));
    b[at(256)..at(268)].copy_from_slice(&gas_io_byte(SLEEP_STATUS_PORT));
    b[at(268)..at(276)].copy_from_slice(b"NEPHELE\0");
    sdt(b"FACP", 6, &b)
}

/// The tables laid out from `base`; returns the bytes (RSDP first).
pub fn build(cpus: u8, base: u64) -> Vec<u8> {
    let align = |v: usize| v.div_ceil(16) * 16;
    let rsdp_len = 36;
    let dsdt = dsdt();
    let dsdt_off = align(rsdp_len);
    let fadt = fadt(base + dsdt_off as u64);
    let fadt_off = align(dsdt_off + dsdt.len());
    let madt = madt(cpus);
    let madt_off = align(fadt_off + fadt.len());
    let mut xsdt_body = Vec::new();
    xsdt_body.extend_from_slice(&(base + fadt_off as u64).to_le_bytes());
    xsdt_body.extend_from_slice(&(base + madt_off as u64).to_le_bytes());
    let xsdt = sdt(b"XSDT", 1, &xsdt_body);
    let xsdt_off = align(madt_off + madt.len());

    let mut rsdp = Vec::with_capacity(rsdp_len);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0);
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2);
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&(base + xsdt_off as u64).to_le_bytes());
    rsdp.extend_from_slice(&[0; 4]);
    let mut first = rsdp[..20].to_vec();
    fix_checksum(&mut first, 8);
    rsdp[8] = first[8];
    fix_checksum(&mut rsdp, 32);

    let mut out = vec![0u8; xsdt_off + xsdt.len()];
    out[..rsdp_len].copy_from_slice(&rsdp);
    out[dsdt_off..dsdt_off + dsdt.len()].copy_from_slice(&dsdt);
    out[fadt_off..fadt_off + fadt.len()].copy_from_slice(&fadt);
    out[madt_off..madt_off + madt.len()].copy_from_slice(&madt);
    out[xsdt_off..].copy_from_slice(&xsdt);
    out
}

/// Writes the tables at `base`; the RSDP is at `base`.
pub fn setup<M: GuestMemory>(mem: &M, cpus: u8, base: u64) -> Result<(), AcpiError> {
    mem.write_slice(&build(cpus, base), GuestAddress(base))
        .map_err(AcpiError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn tables_chain_and_checksum() {
        let base = 0xe0000;
        let t = build(4, base);
        assert_eq!(&t[..8], b"RSD PTR ");
        assert_eq!(sum(&t[..20]), 0);
        assert_eq!(sum(&t[..36]), 0);
        let xsdt = usize::try_from(u64_at(&t, 24) - base).unwrap();
        assert_eq!(&t[xsdt..xsdt + 4], b"XSDT");
        let len = u32::from_le_bytes(t[xsdt + 4..xsdt + 8].try_into().unwrap()) as usize;
        assert_eq!(sum(&t[xsdt..xsdt + len]), 0);
        let sigs: Vec<&[u8]> = (0..(len - 36) / 8)
            .map(|i| {
                let off = usize::try_from(u64_at(&t, xsdt + 36 + 8 * i) - base).unwrap();
                let l = u32::from_le_bytes(t[off + 4..off + 8].try_into().unwrap()) as usize;
                assert_eq!(sum(&t[off..off + l]), 0);
                &t[off..off + 4]
            })
            .collect();
        assert_eq!(sigs, vec![&b"FACP"[..], &b"APIC"[..]]);
        let madt = usize::try_from(u64_at(&t, xsdt + 44) - base).unwrap();
        let lapics = t[madt + 44..].chunks(8).take_while(|e| e[0] == 0).count();
        assert_eq!(lapics, 4);
    }

    #[test]
    fn package_lengths_count_themselves() {
        assert_eq!(aml::pkg(&[7; 10])[0], 11);
        let two = aml::pkg(&[0; 100]);
        assert_eq!(two.len(), 102);
        assert_eq!(usize::from(two[0] & 0xf) | usize::from(two[1]) << 4, 102);
        assert_eq!(two[0] >> 6, 1);
        let three = aml::pkg(&vec![0; 5000]);
        assert_eq!(three[0] >> 6, 2);
        let n =
            usize::from(three[0] & 0xf) | usize::from(three[1]) << 4 | usize::from(three[2]) << 12;
        assert_eq!(n, three.len());
    }

    #[test]
    fn dsdt_has_s5_power_button_and_ged() {
        let t = dsdt();
        assert_eq!(sum(&t), 0);
        let body = &t[36..];
        // Name (_S5_, Package (1) { 5 }).
        assert_eq!(
            &body[..10],
            &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x04, 0x01, 0x0a, 0x05]
        );
        // Scope (\_SB_) spans the rest of the table.
        assert_eq!(body[10], 0x10);
        let scope = &body[11..];
        let len = usize::from(scope[0] & 0xf) | usize::from(scope[1]) << 4;
        assert_eq!(scope[0] >> 6, 1);
        assert_eq!(len, scope.len());
        let find = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"PNP0C0C\0"));
        assert!(find(b"ACPI0013\0"));
        assert!(find(&[0x5b, 0x82]));
        // The GED's interrupt is GSI GED_IRQ, edge, active high, consumer.
        let mut irq = vec![0x89, 6, 0, 0x03, 1];
        irq.extend_from_slice(&GED_IRQ.to_le_bytes());
        irq.extend_from_slice(&[0x79, 0]);
        assert!(find(&irq));
        // _EVT notifies \_SB_.PWRB with 0x80.
        let mut notify = vec![0x86];
        notify.extend_from_slice(PWRB_PATH);
        notify.extend_from_slice(&[0x0a, 0x80]);
        assert!(find(&notify));
    }
}
