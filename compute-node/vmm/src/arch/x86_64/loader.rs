//! Loading the kernel (PVH ELF, plain 64-bit ELF, or bzImage), the initrd and
//! the command line, and writing the boot information the entry protocol
//! expects: `hvm_start_info` with its memory map and module list for PVH, the
//! `boot_params` zero page with its e820 table for the Linux protocol.

use std::fs::File;
use std::path::Path;

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader, KernelLoaderResult};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_HOLE_START, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START, memory_map,
};
use super::regs::EntryMode;
use crate::vstate::memory::GuestMemoryMmap;

const PVH_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE: u64 = 4096;
const XLF_KERNEL_64: u16 = 1;

/// Loading the kernel or writing boot information failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadKernelError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        /// Kernel path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Neither an ELF nor a bzImage.
    #[error("{path} is neither an ELF kernel nor a bzImage: {reason}")]
    BadKernel {
        /// Kernel path.
        path: String,
        /// What the loaders said.
        reason: String,
    },
    /// The initrd cannot be opened or read.
    #[error("cannot read initrd {path}")]
    Initrd {
        /// Initrd path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit below its limit.
    #[error("the initrd ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooBig {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Boot information could not be written.
    #[error("cannot write the {0} into guest memory")]
    Write(&'static str),
}

/// Where and how the boot vCPU enters the loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Entry protocol.
    pub mode: EntryMode,
    /// Entry address.
    pub entry: u64,
}

struct Initrd {
    addr: u64,
    size: u64,
}

fn bad(path: &Path, reason: String) -> LoadKernelError {
    LoadKernelError::BadKernel {
        path: path.display().to_string(),
        reason,
    }
}

/// Loads `kernel` (and `initrd`) into `mem`, writes the command line and the
/// boot information for `mem_bytes` of RAM; `rsdp` is the ACPI RSDP address.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<LoadedKernel, LoadKernelError> {
    let mut file = File::open(kernel).map_err(|source| LoadKernelError::OpenKernel {
        path: kernel.display().to_string(),
        source,
    })?;
    let (result, mode, entry) =
        match Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
            Ok(r) => match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (r, EntryMode::Pvh, addr.0),
                _ => {
                    let entry = r.kernel_load.0;
                    (r, EntryMode::Linux64, entry)
                }
            },
            Err(linux_loader::loader::Error::Elf(
                linux_loader::loader::elf::Error::InvalidElfMagicNumber,
            )) => {
                let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                    .map_err(|e| bad(kernel, format!("not an ELF, and as a bzImage: {e}")))?;
                if r.setup_header
                    .is_none_or(|h| h.xloadflags & XLF_KERNEL_64 == 0)
                {
                    return Err(bad(kernel, "the bzImage has no 64-bit entry point".into()));
                }
                // 64-bit entry point: 0x200 past the protected-mode code.
                let entry = r.kernel_load.0 + 0x200;
                (r, EntryMode::Linux64, entry)
            }
            Err(e) => return Err(bad(kernel, e.to_string())),
        };
    // `kernel_end` is the guest address just past the image, for both loaders.
    let kernel_end = result.kernel_end;
    if kernel_end >= mem_bytes.min(MMIO_HOLE_START) {
        return Err(bad(kernel, "it does not fit in guest memory".into()));
    }

    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    if cmd.len() > CMDLINE_MAX_SIZE {
        return Err(LoadKernelError::Write("command line"));
    }
    mem.write_slice(&cmd, GuestAddress(CMDLINE_START))
        .map_err(|_| LoadKernelError::Write("command line"))?;

    let initrd_limit = match &result.setup_header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        _ => DEFAULT_INITRD_ADDR_MAX,
    };
    let initrd = match initrd {
        Some(path) => Some(load_initrd(mem, mem_bytes, path, kernel_end, initrd_limit)?),
        None => None,
    };

    match mode {
        EntryMode::Pvh => write_start_info(mem, mem_bytes, initrd.as_ref(), rsdp)?,
        EntryMode::Linux64 => write_zero_page(mem, mem_bytes, &result, cmd.len(), initrd.as_ref())?,
    }
    Ok(LoadedKernel { mode, entry })
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<Initrd, LoadKernelError> {
    let err = |source| LoadKernelError::Initrd {
        path: path.display().to_string(),
        source,
    };
    let mut f = File::open(path).map_err(err)?;
    let size = f.metadata().map_err(err)?.len();
    let top = mem_bytes.min(MMIO_HOLE_START).min(limit.saturating_add(1));
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(PAGE - 1))
        .filter(|a| *a >= kernel_end.next_multiple_of(PAGE))
        .ok_or(LoadKernelError::InitrdTooBig { size, limit: top })?;
    let len =
        usize::try_from(size).map_err(|_| LoadKernelError::InitrdTooBig { size, limit: top })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    Ok(Initrd { addr, size })
}

fn write_start_info(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    initrd: Option<&Initrd>,
    rsdp: u64,
) -> Result<(), LoadKernelError> {
    let map = memory_map(mem_bytes);
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(|_| LoadKernelError::Write("PVH memory map"))?;
    }
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: u32::try_from(map.len()).unwrap_or(0),
        ..Default::default()
    };
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(|_| LoadKernelError::Write("PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(|_| LoadKernelError::Write("PVH start info"))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    result: &KernelLoaderResult,
    cmdline_len: usize,
    initrd: Option<&Initrd>,
) -> Result<(), LoadKernelError> {
    let mut params = boot_params::default();
    match result.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).unwrap_or(0);
    params.hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(0);
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = u32::try_from(initrd.addr).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(initrd.size).unwrap_or(0);
    }
    let map = memory_map(mem_bytes);
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = u8::try_from(map.len().min(params.e820_table.len())).unwrap_or(0);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| LoadKernelError::Write("zero page"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::{CMDLINE_START, MemoryKind};
    use std::io::Write;
    use vm_memory::Bytes;

    const MEM: u64 = 256 << 20;

    fn mem() -> GuestMemoryMmap {
        crate::vstate::memory::create(MEM).unwrap()
    }

    fn fake_bzimage() -> tempfile::NamedTempFile {
        let mut img = vec![0u8; 1024 + 4096];
        img[0x1f1] = 1; // setup_sects: setup is 2 sectors
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 1; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
        img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
        img[1024..1028].copy_from_slice(&[0xf4, 0xeb, 0xfd, 0x90]);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&img).unwrap();
        f
    }

    #[test]
    fn bzimage_gets_zero_page_e820_cmdline_and_initrd() {
        let m = mem();
        let kernel = fake_bzimage();
        let mut initrd = tempfile::NamedTempFile::new().unwrap();
        initrd.write_all(&[7u8; 8192]).unwrap();
        let k = load(
            &m,
            MEM,
            kernel.path(),
            Some(initrd.path()),
            "console=ttyS0",
            0xe0000,
        )
        .unwrap();
        assert_eq!((k.mode, k.entry), (EntryMode::Linux64, 0x10_0200));
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.cmd_line_ptr }, u32::try_from(CMDLINE_START).unwrap());
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.ramdisk_size }, 8192);
        let rd = u64::from(hdr.ramdisk_image);
        assert_eq!(rd % PAGE, 0);
        assert!(rd + 8192 <= MEM && rd > 0x10_1000);
        assert_eq!(m.read_obj::<u8>(GuestAddress(rd + 8191)).unwrap(), 7);
        assert_eq!(p.e820_entries, 4);
        let last = p.e820_table[3];
        assert_eq!(
            ({ last.addr } + { last.size }, { last.r#type }),
            (MEM, MemoryKind::Ram as u32)
        );
        let mut cmd = [0u8; 14];
        m.read_slice(&mut cmd, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&cmd, b"console=ttyS0\0");
    }

    #[test]
    fn bzimage_without_64_bit_entry_is_refused() {
        let kernel = fake_bzimage();
        let mut img = std::fs::read(kernel.path()).unwrap();
        img[0x236] = 0;
        std::fs::write(kernel.path(), &img).unwrap();
        let e = load(&mem(), MEM, kernel.path(), None, "", 0).unwrap_err();
        assert!(e.to_string().contains("64-bit entry"), "{e}");
    }

    #[test]
    fn initrd_that_does_not_fit_is_refused() {
        let kernel = fake_bzimage();
        let big = tempfile::NamedTempFile::new().unwrap();
        big.as_file().set_len(MEM).unwrap();
        let e = load(&mem(), MEM, kernel.path(), Some(big.path()), "", 0).unwrap_err();
        assert!(matches!(e, LoadKernelError::InitrdTooBig { .. }), "{e}");
    }

    fn pvh_elf() -> tempfile::NamedTempFile {
        let mut e = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        for (v, n) in [
            (2u64, 2),
            (62, 2),
            (1, 4),
            (0x10_0000, 8),
            (64, 8),
            (0, 8),
            (0, 4),
        ] {
            e.extend_from_slice(&v.to_le_bytes()[..n]);
        }
        for v in [64u16, 56, 2, 64, 0, 0] {
            e.extend_from_slice(&v.to_le_bytes());
        }
        let ph = |e: &mut Vec<u8>, kind: u32, off: u64, addr: u64, len: u64| {
            e.extend_from_slice(&kind.to_le_bytes());
            e.extend_from_slice(&4u32.to_le_bytes());
            for v in [off, addr, addr, len, len, 4] {
                e.extend_from_slice(&v.to_le_bytes());
            }
        };
        ph(&mut e, 1, 0x100, 0x10_0000, 3);
        ph(&mut e, 4, 176, 0, 20);
        for v in [4u32, 4, 18] {
            e.extend_from_slice(&v.to_le_bytes());
        }
        e.extend_from_slice(b"Xen\0");
        e.extend_from_slice(&0x10_0000u32.to_le_bytes());
        e.resize(0x100, 0);
        e.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&e).unwrap();
        f
    }

    #[test]
    fn pvh_gets_start_info_memmap_and_module() {
        let m = crate::vstate::memory::create(5 << 30).unwrap();
        let kernel = pvh_elf();
        let mut initrd = tempfile::NamedTempFile::new().unwrap();
        initrd.write_all(&[1u8; 100]).unwrap();
        let k = load(
            &m,
            5 << 30,
            kernel.path(),
            Some(initrd.path()),
            "x",
            0xe0000,
        )
        .unwrap();
        assert_eq!((k.mode, k.entry), (EntryMode::Pvh, 0x10_0000));
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(
            (info.magic, info.version, info.nr_modules),
            (PVH_MAGIC, 1, 1)
        );
        assert_eq!(
            (info.cmdline_paddr, info.rsdp_paddr),
            (CMDLINE_START, 0xe0000)
        );
        assert_eq!(info.memmap_entries, 5);
        let high: hvm_memmap_table_entry = m
            .read_obj(GuestAddress(info.memmap_paddr + 4 * 24))
            .unwrap();
        assert_eq!((high.addr, high.size, high.type_), (4 << 30, 2 << 30, 1));
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(module.size, 100);
        assert!(module.paddr + 100 <= crate::arch::layout::MMIO_HOLE_START);
    }
}
