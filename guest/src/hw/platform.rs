//! What the VMM tells the guest about the machine: the PVH `hvm_start_info`
//! (command line, memory map, RSDP), the ACPI tables (CPUs from the MADT,
//! sleep registers from the FADT) or an MP table, and leaving the machine
//! (poweroff, reboot) and the host's shutdown request.

use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicU64, Ordering};

use neph_guest::acpi::{self, CpuList, Fadt};
use neph_guest::memmap::MemMap;

use super::cpu::{self, inb, mmio_write8, outb, outw};
use super::once::BootOnce;
use crate::println;

const START_INFO_MAGIC: u32 = 0x336e_c578;
const MAX_MEMMAP_ENTRIES: u32 = 128;
/// Bytes per `hvm_memmap_table_entry`.
const MEMMAP_ENTRY: usize = 24;
const CMDLINE_MAX: usize = 1024;
/// Largest ACPI table accepted.
const TABLE_MAX: usize = 2048;

static MEMMAP: BootOnce<MemMap> = BootOnce::new(MemMap::EMPTY);
static CPUS: BootOnce<CpuList> = BootOnce::new(CpuList::EMPTY);
static CMDLINE: BootOnce<[u8; CMDLINE_MAX]> = BootOnce::new([0; CMDLINE_MAX]);

/// The RAM map (empty before [`discover`]).
pub fn memmap() -> &'static MemMap {
    static EMPTY: MemMap = MemMap::EMPTY;
    MEMMAP.get().unwrap_or(&EMPTY)
}

/// Where the CPU list came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuSource {
    /// ACPI MADT.
    Madt,
    /// MP table.
    MpTable,
    /// Nothing found: assume one CPU.
    None,
}

impl CpuSource {
    /// Name printed by `info`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Madt => "madt",
            Self::MpTable => "mptable",
            Self::None => "none",
        }
    }
}

/// Facts gathered at boot.
#[derive(Debug)]
pub struct Platform {
    /// Kernel command line.
    pub cmdline: &'static str,
    /// RAM.
    pub memmap: &'static MemMap,
    /// CPUs listed by the firmware tables.
    pub cpus: &'static CpuList,
    /// Which table listed them.
    pub cpu_source: CpuSource,
}

/// Whether firmware data may be read at `[addr, addr + len)`: below 4 GiB,
/// outside the MMIO hole, not at address 0.
fn phys_ok(addr: u64, len: usize) -> bool {
    addr != 0
        && addr
            .checked_add(len as u64)
            .is_some_and(|end| end <= 0xc000_0000)
}

/// Copies firmware data at `addr` into `out`. Loads are plain aligned
/// 64-bit (or byte) moves: the firmware area may be emulated MMIO (e.g. a
/// ROM under PVM, which has no read-only memory slots), and the hypervisor's
/// instruction emulator cannot handle the SSE loads the compiler would
/// otherwise use.
fn read_phys(addr: u64, out: &mut [u8]) -> bool {
    if !phys_ok(addr, out.len()) {
        return false;
    }
    let mut i = 0;
    while i < out.len() {
        let a = addr + i as u64;
        if a.is_multiple_of(8) && out.len() - i >= 8 {
            // SAFETY: identity-mapped guest-physical memory below the MMIO
            // hole (checked), holding firmware data; a volatile load never
            // creates a reference to it.
            let v = unsafe { (a as *const u64).read_volatile() };
            out[i..i + 8].copy_from_slice(&v.to_le_bytes());
            i += 8;
        } else {
            // SAFETY: as above.
            out[i] = unsafe { (a as *const u8).read_volatile() };
            i += 1;
        }
    }
    true
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    u64::from(read_u32(b, at)) | (u64::from(read_u32(b, at + 4)) << 32)
}

/// Words in a [`TableBuf`]: [`TABLE_MAX`] bytes plus the partial words at
/// either end of a table that does not start 8-byte aligned.
const TABLE_WORDS: usize = TABLE_MAX / 8 + 2;

/// Firmware data copied out of guest-physical memory with aligned 8-byte
/// loads: one instruction per 8 bytes under an emulator, and one exit per
/// 8 bytes where the firmware area is emulated MMIO (a ROM under PVM). Not
/// cleared (clearing costs time under PVM): every byte handed out has been
/// written by [`TableBuf::copy`].
struct TableBuf([MaybeUninit<u64>; TABLE_WORDS]);

impl TableBuf {
    fn new() -> Self {
        Self([MaybeUninit::uninit(); TABLE_WORDS])
    }

    /// Copies `len` bytes (at most [`TABLE_MAX`]) at `addr`; returns them.
    fn copy(&mut self, addr: u64, len: usize) -> Option<&[u8]> {
        let start = addr & !7;
        let end = addr.checked_add(len as u64)?.checked_next_multiple_of(8)?;
        if len > TABLE_MAX || !phys_ok(start, (end - start) as usize) {
            return None;
        }
        let words = ((end - start) / 8) as usize;
        for (i, slot) in self.0[..words].iter_mut().enumerate() {
            // SAFETY: identity-mapped guest-physical memory below the MMIO
            // hole (checked), holding firmware data; a volatile load never
            // creates a reference to it.
            slot.write(unsafe { ((start + 8 * i as u64) as *const u64).read_volatile() });
        }
        let skip = (addr - start) as usize;
        // SAFETY: the loop wrote words covering `skip..skip + len` bytes.
        Some(unsafe { core::slice::from_raw_parts(self.0.as_ptr().cast::<u8>().add(skip), len) })
    }

    /// Copies the ACPI table at `addr` (its length from its header).
    fn table(&mut self, addr: u64) -> Option<&[u8]> {
        let (_, len) = acpi::sdt_header(self.copy(addr, acpi::SDT_HEADER)?)?;
        self.copy(addr, len)
    }
}

/// Where the ACPI tables the guest uses after boot are (0: none), found in
/// the single walk of the root table at boot.
static FADT_ADDR: AtomicU64 = AtomicU64::new(0);
static MCFG_ADDR: AtomicU64 = AtomicU64::new(0);

/// Finds a 16-byte aligned structure starting with `sig` in
/// `[start, start + len)`, reading one word per candidate.
fn scan(start: u64, len: u64, sig: &[u8]) -> Option<u64> {
    (start..start + len).step_by(16).find(|&a| {
        let mut w = [0u8; 8];
        read_phys(a, &mut w) && w.starts_with(sig)
    })
}

/// Walks the ACPI root table once: parses the MADT into `cpus` (true if
/// there was a valid one) and remembers where the FADT and MCFG are (for
/// poweroff and PCI), so no table is read twice.
fn walk_acpi(rsdp_paddr: u64, cpus: &mut CpuList) -> bool {
    walk_acpi_tables(rsdp_paddr, cpus).is_some()
}

fn walk_acpi_tables(rsdp_paddr: u64, cpus: &mut CpuList) -> Option<()> {
    let rsdp_addr = if rsdp_paddr != 0 {
        Some(rsdp_paddr)
    } else {
        scan(0xe0000, 0x20000, b"RSD PTR ")
    };
    let mut buf = TableBuf::new();
    let rsdp = acpi::parse_rsdp(buf.copy(rsdp_addr?, 36)?)?;
    let (mut xsdt_buf, mut rsdt_buf) = (TableBuf::new(), TableBuf::new());
    let xsdt = rsdp
        .xsdt
        .and_then(|x| xsdt_buf.table(x))
        .filter(|t| acpi::table_ok(t));
    let (root, entry) = match xsdt {
        Some(t) => (t, 8),
        None => (
            rsdt_buf
                .table(u64::from(rsdp.rsdt))
                .filter(|t| acpi::table_ok(t))?,
            4,
        ),
    };
    let mut madt = false;
    for addr in acpi::root_entries(root, entry) {
        let Some(sig) = buf.copy(addr, 4) else {
            continue;
        };
        match sig {
            b"APIC" if !madt => {
                madt = buf
                    .table(addr)
                    .is_some_and(|t| acpi::parse_madt_into(t, cpus));
            }
            b"FACP" => FADT_ADDR.store(addr, Ordering::Relaxed),
            b"MCFG" => MCFG_ADDR.store(addr, Ordering::Relaxed),
            _ => {}
        }
    }
    madt.then_some(())
}

/// Reads the MP table's processors into `cpus` (true if there was one).
fn find_mp_table(cpus: &mut CpuList) -> bool {
    let mut find = || {
        let fp_addr = scan(0xf0000, 0x10000, b"_MP_")?;
        let mut buf = TableBuf::new();
        let cfg = u64::from(acpi::mp_config_addr(buf.copy(fp_addr, 16)?)?);
        let len = acpi::mp_config_len(buf.copy(cfg, 8)?)?.min(TABLE_MAX);
        *cpus = acpi::parse_mp_config(buf.copy(cfg, len)?)?;
        Some(())
    };
    find().is_some()
}

/// Reads `hvm_start_info` at `start_info` and the firmware tables. A
/// missing or malformed start info or memory map is fatal (panics with a
/// `NEPH-GUEST PANIC` line): the guest cannot know its RAM without it.
pub fn discover(start_info: u64) -> Platform {
    let mut si = [0u8; 56];
    if !read_phys(start_info, &mut si) {
        panic!("hvm_start_info at {start_info:#x} is not readable");
    }
    let magic = read_u32(&si, 0);
    if magic != START_INFO_MAGIC {
        panic!("hvm_start_info has bad magic {magic:#x} (is this a PVH boot?)");
    }
    let version = read_u32(&si, 4);
    let cmdline_paddr = read_u64(&si, 24);
    let rsdp_paddr = read_u64(&si, 32);

    let mut len = 0;
    let cmd_bytes = CMDLINE.init_with(|buf| {
        if cmdline_paddr == 0 {
            return;
        }
        // Eight bytes per read (one exit each if the loader put the command
        // line in emulated memory), stopping at the terminating NUL.
        let mut word = [0u8; 8];
        'copy: while len + 8 < CMDLINE_MAX && read_phys(cmdline_paddr + len as u64, &mut word) {
            for b in word {
                if b == 0 {
                    break 'copy;
                }
                buf[len] = b;
                len += 1;
            }
        }
    });
    let cmd_bytes = &cmd_bytes[..len];
    let cmdline = match core::str::from_utf8(cmd_bytes) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&cmd_bytes[..e.valid_up_to()]).unwrap_or(""),
    };

    let memmap_paddr = read_u64(&si, 40);
    let entries = read_u32(&si, 48);
    if version < 1 || memmap_paddr == 0 || entries == 0 {
        panic!("hvm_start_info (version {version}) has no memory map");
    }
    let memmap = MEMMAP.init_with(|map| {
        // Copied in table-sized chunks of whole entries, 8 bytes per load.
        const PER_CHUNK: u32 = (TABLE_MAX / MEMMAP_ENTRY) as u32;
        let mut buf = TableBuf::new();
        let total = entries.min(MAX_MEMMAP_ENTRIES);
        for first in (0..total).step_by(PER_CHUNK as usize) {
            let n = (total - first).min(PER_CHUNK);
            let at = memmap_paddr + u64::from(first) * MEMMAP_ENTRY as u64;
            let Some(chunk) = buf.copy(at, n as usize * MEMMAP_ENTRY) else {
                panic!("memory map entries {first}.. at {at:#x} are not readable");
            };
            for e in chunk.chunks_exact(MEMMAP_ENTRY) {
                map.add(read_u64(e, 0), read_u64(e, 8), read_u32(e, 16));
            }
        }
    });
    if memmap.total_bytes() == 0 {
        panic!("the memory map lists no RAM");
    }

    let mut cpu_source = CpuSource::None;
    let cpus = CPUS.init_with(|cpus| {
        if walk_acpi(rsdp_paddr, cpus) && cpus.total() > 0 {
            cpu_source = CpuSource::Madt;
        } else if find_mp_table(cpus) && cpus.total() > 0 {
            cpu_source = CpuSource::MpTable;
        } else {
            *cpus = CpuList::EMPTY;
        }
    });
    Platform {
        cmdline,
        memmap,
        cpus,
        cpu_source,
    }
}

/// The ECAM base from the ACPI MCFG table, if there is one.
pub fn find_mcfg() -> Option<u64> {
    let addr = MCFG_ADDR.load(Ordering::Relaxed);
    if addr == 0 {
        return None;
    }
    TableBuf::new().table(addr).and_then(acpi::parse_mcfg)
}

/// Whether the host asks for a graceful shutdown (neph-vmm: I/O port 0x602
/// reads 0x01, "power button pressed"; it stays set until acknowledged by
/// writing 0x01, which this does). Elsewhere the port reads 0xff or 0.
pub fn shutdown_requested() -> bool {
    if inb(SHUTDOWN_PORT) == 0x01 {
        outb(SHUTDOWN_PORT, 0x01);
        return true;
    }
    false
}

const SHUTDOWN_PORT: u16 = 0x602;

/// Powers the machine off: the VMM's ACPI sleep port 0x600, then the FADT's
/// hardware-reduced sleep register, then PM1a_CNT with SLP_TYP 0 (QEMU's
/// S5). Halts with a panic line if none of them worked.
pub fn poweroff() -> ! {
    const S5: u8 = (5 << 2) | (1 << 5);
    outb(0x600, S5);
    let fadt_addr = FADT_ADDR.load(Ordering::Relaxed);
    let fadt: Option<Fadt> = match fadt_addr {
        0 => None,
        a => TableBuf::new().table(a).and_then(acpi::parse_fadt),
    };
    if let Some(fadt) = fadt {
        if let Some(gas) = fadt.sleep_control {
            match (gas.space, u16::try_from(gas.addr)) {
                (1, Ok(port)) => outb(port, S5),
                (0, _) => mmio_write8(gas.addr, S5),
                _ => {}
            }
        }
        if let Ok(port) = u16::try_from(fadt.pm1a_cnt)
            && port != 0
        {
            outw(port, 1 << 13);
        }
    }
    super::clock::delay_us(100_000);
    println!("NEPH-GUEST PANIC poweroff had no effect");
    cpu::halt_forever()
}

/// Resets the machine: i8042 pulse, PCI reset register, then a triple fault.
pub fn reboot() -> ! {
    outb(0x64, 0xfe);
    super::clock::delay_us(10_000);
    outb(0xcf9, 0x06);
    super::clock::delay_us(10_000);
    let null_idt = [0u16; 5];
    // SAFETY: deliberately loads an empty IDT and raises #GP with a
    // non-canonical load (not `int3`, which KVM's instruction emulator cannot
    // run under PVM); the fault escalates to a triple fault, the
    // architectural reset of last resort. Nothing runs afterwards.
    unsafe {
        core::arch::asm!(
            "lidt [{idt}]",
            "mov {tmp}, 0x8000000000000000",
            "mov {tmp}, qword ptr [{tmp}]",
            idt = in(reg) null_idt.as_ptr(),
            tmp = out(reg) _,
            options(nostack),
        );
    }
    cpu::halt_forever()
}
