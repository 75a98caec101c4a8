//! Just enough ACPI and MP-table parsing to count CPUs and find the sleep
//! (poweroff) registers. Tables come from the VMM and are parsed
//! defensively: every length is checked against the bytes available, every
//! checksum verified.

/// Most CPUs the guest tracks.
pub const MAX_CPUS: usize = 64;
/// Length of an ACPI table header.
pub const SDT_HEADER: usize = 36;

/// Byte sum modulo 256, eight bytes per step (each instruction counts when
/// the guest runs under an instruction emulator).
fn sum(b: &[u8]) -> u8 {
    let mut words = b.chunks_exact(8);
    let mut lanes = 0u64;
    let mut acc = 0u64;
    for (i, w) in words.by_ref().enumerate() {
        // `black_box` keeps this one 8-byte load: without it LLVM sees
        // through the lane arithmetic and loads the eight bytes one by one
        // (about 30 instructions per word instead of 8).
        let v = core::hint::black_box(u64::from_le_bytes([
            w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7],
        ]));
        // Even and odd bytes add into 16-bit lanes (up to 510 per word):
        // fold every 128 words, before a lane can overflow.
        lanes += (v & 0x00ff_00ff_00ff_00ff) + ((v >> 8) & 0x00ff_00ff_00ff_00ff);
        if i % 128 == 127 {
            acc = acc.wrapping_add(fold_lanes(lanes));
            lanes = 0;
        }
    }
    acc = acc.wrapping_add(fold_lanes(lanes));
    let tail = words
        .remainder()
        .iter()
        .fold(0u64, |a, &x| a + u64::from(x));
    (acc.wrapping_add(tail) & 0xff) as u8
}

fn fold_lanes(l: u64) -> u64 {
    (l & 0xffff) + ((l >> 16) & 0xffff) + ((l >> 32) & 0xffff) + (l >> 48)
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Root pointers from the RSDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rsdp {
    /// RSDT address (32-bit entries).
    pub rsdt: u32,
    /// XSDT address (64-bit entries), ACPI 2.0+.
    pub xsdt: Option<u64>,
}

/// Parses an RSDP ("RSD PTR "): 20 bytes for ACPI 1.0, 36 for 2.0+.
pub fn parse_rsdp(b: &[u8]) -> Option<Rsdp> {
    if b.get(0..8)? != b"RSD PTR " || sum(b.get(0..20)?) != 0 {
        return None;
    }
    let rsdt = le32(b, 16)?;
    let xsdt = if b[15] >= 2 && b.len() >= 36 {
        let len = usize::try_from(le32(b, 20)?).ok()?;
        (len >= 36 && len <= b.len() && sum(&b[..len]) == 0)
            .then(|| le64(b, 24))
            .flatten()
            .filter(|&x| x != 0)
    } else {
        None
    };
    Some(Rsdp { rsdt, xsdt })
}

/// Offset of a valid RSDP in a BIOS area (16-byte aligned search).
pub fn scan_rsdp(area: &[u8]) -> Option<usize> {
    (0..area.len().saturating_sub(20))
        .step_by(16)
        .find(|&off| parse_rsdp(&area[off..]).is_some())
}

/// Signature and length of a table header, if `b` holds one.
pub fn sdt_header(b: &[u8]) -> Option<([u8; 4], usize)> {
    let sig: [u8; 4] = b.get(0..4)?.try_into().ok()?;
    let len = usize::try_from(le32(b, 4)?).ok()?;
    (len >= SDT_HEADER).then_some((sig, len))
}

/// Whether `t` is exactly one complete table with a valid checksum.
pub fn table_ok(t: &[u8]) -> bool {
    matches!(sdt_header(t), Some((_, len)) if len == t.len()) && sum(t) == 0
}

/// The table addresses listed in an RSDT (`entry = 4`) or XSDT (`entry = 8`).
pub fn root_entries(t: &[u8], entry: usize) -> impl Iterator<Item = u64> + '_ {
    let body = t.get(SDT_HEADER..).unwrap_or(&[]);
    body.chunks_exact(entry).map(move |c| {
        if entry == 8 {
            le64(c, 0).unwrap_or(0)
        } else {
            u64::from(le32(c, 0).unwrap_or(0))
        }
    })
}

/// The CPUs found (local APIC ids of enabled processors).
#[derive(Clone, Copy, Debug)]
pub struct CpuList {
    ids: [u32; MAX_CPUS],
    count: usize,
    /// Enabled CPUs listed beyond [`MAX_CPUS`].
    pub dropped: usize,
}

impl Default for CpuList {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl CpuList {
    /// No CPUs.
    pub const EMPTY: Self = Self {
        ids: [0; MAX_CPUS],
        count: 0,
        dropped: 0,
    };

    fn push(&mut self, id: u32) {
        if self.ids[..self.count].contains(&id) {
            return;
        }
        if self.count == MAX_CPUS {
            self.dropped += 1;
        } else {
            self.ids[self.count] = id;
            self.count += 1;
        }
    }

    /// APIC ids.
    pub fn ids(&self) -> &[u32] {
        &self.ids[..self.count]
    }

    /// Number of CPUs listed (kept and dropped).
    pub fn total(&self) -> usize {
        self.count + self.dropped
    }
}

/// Parses a MADT ("APIC") into its enabled CPUs (types 0 and 9).
pub fn parse_madt(t: &[u8]) -> Option<CpuList> {
    let mut cpus = CpuList::EMPTY;
    parse_madt_into(t, &mut cpus).then_some(cpus)
}

/// [`parse_madt`] into an existing list (emptied first), which saves the
/// guest copying the list: returns whether `t` is a valid MADT.
pub fn parse_madt_into(t: &[u8], cpus: &mut CpuList) -> bool {
    cpus.count = 0;
    cpus.dropped = 0;
    if !table_ok(t) || &t[0..4] != b"APIC" || t.len() < SDT_HEADER + 8 {
        return false;
    }
    let mut off = SDT_HEADER + 8;
    while off + 2 <= t.len() {
        let (kind, len) = (t[off], usize::from(t[off + 1]));
        if len < 2 || off + len > t.len() {
            break;
        }
        let e = &t[off..off + len];
        let flags = |at| le32(e, at).unwrap_or(0);
        match kind {
            0 if len >= 8 && flags(4) & 1 != 0 => cpus.push(u32::from(e[3])),
            9 if len >= 16 && flags(8) & 1 != 0 => cpus.push(flags(4)),
            _ => {}
        }
        off += len;
    }
    true
}

/// A Generic Address Structure in I/O or memory space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gas {
    /// 0 = memory, 1 = I/O port.
    pub space: u8,
    /// Address.
    pub addr: u64,
}

/// Power-management registers from the FADT ("FACP").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fadt {
    /// PM1a control block I/O port (0 = none).
    pub pm1a_cnt: u32,
    /// Hardware-reduced ACPI sleep control register.
    pub sleep_control: Option<Gas>,
}

/// Parses the FADT fields used for poweroff.
pub fn parse_fadt(t: &[u8]) -> Option<Fadt> {
    if !table_ok(t) || &t[0..4] != b"FACP" {
        return None;
    }
    let pm1a_cnt = le32(t, 64).unwrap_or(0);
    let sleep_control = match t.get(244..256) {
        Some(g) if g[0] <= 1 => le64(g, 4)
            .filter(|&a| a != 0)
            .map(|addr| Gas { space: g[0], addr }),
        _ => None,
    };
    Some(Fadt {
        pm1a_cnt,
        sleep_control,
    })
}

/// The ECAM base of PCI segment 0 covering bus 0, from an MCFG table.
pub fn parse_mcfg(t: &[u8]) -> Option<u64> {
    if !table_ok(t) || &t[0..4] != b"MCFG" {
        return None;
    }
    t.get(SDT_HEADER + 8..)?.chunks_exact(16).find_map(|e| {
        let base = le64(e, 0)?;
        let segment = u16::from_le_bytes([e[8], e[9]]);
        (segment == 0 && e[10] == 0 && base != 0).then_some(base)
    })
}

/// Offset of a valid MP floating pointer ("_MP_") in a BIOS area; the
/// pointer's configuration table address is [`mp_config_addr`].
pub fn scan_mp(area: &[u8]) -> Option<usize> {
    (0..area.len().saturating_sub(16))
        .step_by(16)
        .find(|&off| &area[off..off + 4] == b"_MP_" && sum(&area[off..off + 16]) == 0)
}

/// The configuration table address of an MP floating pointer.
pub fn mp_config_addr(fp: &[u8]) -> Option<u32> {
    le32(fp, 4).filter(|&a| a != 0)
}

/// Length of an MP configuration table from its header.
pub fn mp_config_len(b: &[u8]) -> Option<usize> {
    if b.get(0..4)? != b"PCMP" {
        return None;
    }
    Some(usize::from(u16::from_le_bytes(
        b.get(4..6)?.try_into().ok()?,
    )))
}

/// Parses an MP configuration table ("PCMP") into its enabled processors.
pub fn parse_mp_config(t: &[u8]) -> Option<CpuList> {
    let len = mp_config_len(t)?;
    if len < 44 || len > t.len() || sum(&t[..len]) != 0 {
        return None;
    }
    let mut cpus = CpuList::default();
    let mut off = 44;
    while off < len {
        let size = match t[off] {
            0 => 20,
            1..=4 => 8,
            _ => break,
        };
        if off + size > len {
            break;
        }
        if t[off] == 0 && t[off + 3] & 1 != 0 {
            cpus.push(u32::from(t[off + 1]));
        }
        off += size;
    }
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fix_checksum(t: &mut [u8], at: usize) {
        t[at] = 0;
        t[at] = 0u8.wrapping_sub(sum(t));
    }

    fn table(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8; SDT_HEADER];
        t[0..4].copy_from_slice(sig);
        t.extend_from_slice(body);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        fix_checksum(&mut t, 9);
        t
    }

    fn madt(cpus: &[(u8, bool)]) -> Vec<u8> {
        let mut body = vec![0u8; 8];
        body[0..4].copy_from_slice(&0xfee0_0000u32.to_le_bytes());
        for &(id, enabled) in cpus {
            body.extend_from_slice(&[0, 8, id, id, u8::from(enabled), 0, 0, 0]);
        }
        // An IOAPIC entry, ignored.
        body.extend_from_slice(&[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]);
        // An x2APIC entry.
        body.extend_from_slice(&[9, 16, 0, 0, 0x00, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        table(b"APIC", &body)
    }

    #[test]
    fn word_sum_matches_byte_sum() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 3) as u8).collect();
        for len in [0, 1, 7, 8, 9, 100, 2039, 2040, 2041, 5000] {
            let want = data[..len].iter().fold(0u8, |a, &x| a.wrapping_add(x));
            assert_eq!(sum(&data[..len]), want, "len {len}");
        }
        assert_eq!(sum(&[0xff; 4096]), (4096u32 * 255 % 256) as u8);
    }

    #[test]
    fn madt_lists_enabled_cpus() {
        let t = madt(&[(0, true), (1, true), (2, false), (1, true)]);
        let cpus = parse_madt(&t).unwrap();
        assert_eq!(cpus.ids(), &[0, 1, 256]);
        assert_eq!(cpus.total(), 3);
    }

    #[test]
    fn madt_rejects_bad_checksum_and_survives_bad_entries() {
        let mut t = madt(&[(0, true)]);
        t[40] ^= 1;
        assert!(parse_madt(&t).is_none());
        // Entry with length 0 and one running past the end.
        for bad_len in [0u8, 1, 200] {
            let mut t = madt(&[(0, true), (1, true)]);
            t[SDT_HEADER + 8 + 1] = bad_len;
            fix_checksum(&mut t, 9);
            let cpus = parse_madt(&t).unwrap();
            assert!(cpus.ids().is_empty());
        }
        assert!(parse_madt(&t[..20]).is_none());
    }

    #[test]
    fn many_cpus_are_counted_even_beyond_the_cap() {
        let list: Vec<_> = (0..=255u8).map(|i| (i, true)).collect();
        let mut body = vec![0u8; 8];
        for &(id, _) in &list {
            body.extend_from_slice(&[0, 8, id, id, 1, 0, 0, 0]);
        }
        let t = table(b"APIC", &body);
        let cpus = parse_madt(&t).unwrap();
        assert_eq!(cpus.ids().len(), MAX_CPUS);
        assert_eq!(cpus.total(), 256);
    }

    #[test]
    fn rsdp_v1_and_v2_parse_and_scan() {
        let mut r = vec![0u8; 36];
        r[0..8].copy_from_slice(b"RSD PTR ");
        r[15] = 2;
        r[16..20].copy_from_slice(&0x1234u32.to_le_bytes());
        r[20..24].copy_from_slice(&36u32.to_le_bytes());
        r[24..32].copy_from_slice(&0x5678u64.to_le_bytes());
        fix_checksum(&mut r[..20], 8);
        fix_checksum(&mut r, 32);
        assert_eq!(
            parse_rsdp(&r),
            Some(Rsdp {
                rsdt: 0x1234,
                xsdt: Some(0x5678)
            })
        );
        let mut area = vec![0u8; 256];
        area[64..100].copy_from_slice(&r);
        assert_eq!(scan_rsdp(&area), Some(64));
        r[15] = 0;
        fix_checksum(&mut r[..20], 8);
        assert_eq!(
            parse_rsdp(&r),
            Some(Rsdp {
                rsdt: 0x1234,
                xsdt: None
            })
        );
        r[3] = b'x';
        assert_eq!(parse_rsdp(&r), None);
        assert_eq!(scan_rsdp(&[0u8; 10]), None);
    }

    #[test]
    fn root_tables_list_entries() {
        let mut body = Vec::new();
        body.extend_from_slice(&0x1000u64.to_le_bytes());
        body.extend_from_slice(&0x2000u64.to_le_bytes());
        body.push(7); // trailing garbage shorter than an entry
        let t = table(b"XSDT", &body);
        assert_eq!(root_entries(&t, 8).collect::<Vec<_>>(), [0x1000, 0x2000]);
        assert_eq!(root_entries(&t[..10], 4).count(), 0);
    }

    #[test]
    fn fadt_gives_sleep_registers() {
        let mut body = vec![0u8; 276 - SDT_HEADER];
        body[64 - SDT_HEADER..68 - SDT_HEADER].copy_from_slice(&0x604u32.to_le_bytes());
        body[244 - SDT_HEADER] = 1;
        body[248 - SDT_HEADER..256 - SDT_HEADER].copy_from_slice(&0x600u64.to_le_bytes());
        let t = table(b"FACP", &body);
        assert_eq!(
            parse_fadt(&t),
            Some(Fadt {
                pm1a_cnt: 0x604,
                sleep_control: Some(Gas {
                    space: 1,
                    addr: 0x600
                })
            })
        );
        let short = table(b"FACP", &body[..100]);
        assert_eq!(
            parse_fadt(&short),
            Some(Fadt {
                pm1a_cnt: 0x604,
                sleep_control: None
            })
        );
    }

    #[test]
    fn mcfg_gives_the_segment_0_bus_0_base() {
        let mut body = vec![0u8; 8];
        let mut entry = |base: u64, seg: u16, start: u8| {
            let mut e = vec![0u8; 16];
            e[0..8].copy_from_slice(&base.to_le_bytes());
            e[8..10].copy_from_slice(&seg.to_le_bytes());
            e[10] = start;
            e[11] = 255;
            body.extend_from_slice(&e);
        };
        entry(0x1_0000_0000, 1, 0);
        entry(0xe000_0000, 0, 0);
        let t = table(b"MCFG", &body);
        assert_eq!(parse_mcfg(&t), Some(0xe000_0000));
        let short = table(b"MCFG", &body[..20]);
        assert_eq!(parse_mcfg(&short), None);
        assert_eq!(parse_mcfg(&table(b"APIC", &body)), None);
    }

    #[test]
    fn mp_tables_parse() {
        let mut fp = vec![0u8; 16];
        fp[0..4].copy_from_slice(b"_MP_");
        fp[4..8].copy_from_slice(&0x9fc00u32.to_le_bytes());
        fix_checksum(&mut fp, 10);
        let mut area = vec![0u8; 64];
        area[32..48].copy_from_slice(&fp);
        assert_eq!(scan_mp(&area), Some(32));
        assert_eq!(mp_config_addr(&fp), Some(0x9fc00));
        let mut t = vec![0u8; 44];
        t[0..4].copy_from_slice(b"PCMP");
        for (id, flags) in [(0u8, 3u8), (1, 1), (2, 0)] {
            let mut e = vec![0u8; 20];
            e[1] = id;
            e[3] = flags;
            t.extend_from_slice(&e);
        }
        t.extend_from_slice(&[2, 0, 0x11, 1, 0, 0, 0xc0, 0xfe]);
        let len = t.len() as u16;
        t[4..6].copy_from_slice(&len.to_le_bytes());
        fix_checksum(&mut t, 7);
        assert_eq!(mp_config_len(&t), Some(t.len()));
        assert_eq!(parse_mp_config(&t).unwrap().ids(), &[0, 1]);
        t[50] ^= 1;
        assert!(parse_mp_config(&t).is_none());
    }
}
