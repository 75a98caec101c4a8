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
                // 64-bit entry point: 0x200 past the protected-mode code.
                let entry = r.kernel_load.0 + 0x200;
                (r, EntryMode::Linux64, entry)
            }
            Err(e) => return Err(bad(kernel, e.to_string())),
        };
    let kernel_end = result.kernel_load.0.saturating_add(result.kernel_end);
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
