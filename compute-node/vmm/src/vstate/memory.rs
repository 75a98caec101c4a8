//! Guest memory: anonymous mappings for each RAM range of the layout, with a
//! dirty bitmap for VMM-side writes (read by live migration), registered
//! with KVM as one memory slot per range (KVM's own dirty log switchable).

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::ram_ranges;

/// Guest memory as this VMM maps it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Creating or registering guest memory failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateMemoryError {
    /// The host could not map the memory.
    #[error("cannot map {0} MiB of guest memory")]
    Map(u64, #[source] vm_memory::mmap::FromRangesError),
    /// A range is larger than the address space.
    #[error("a guest memory range does not fit in this host's address space")]
    Size,
    /// KVM refused a memory slot.
    #[error("KVM refused guest memory slot {0}")]
    Slot(u32, #[source] kvm_ioctls::Error),
}

/// Maps `mem_bytes` of guest RAM laid out per [`ram_ranges`].
pub fn create(mem_bytes: u64) -> Result<GuestMemoryMmap, CreateMemoryError> {
    let ranges = ram_ranges(mem_bytes)
        .into_iter()
        .map(|(start, len)| {
            usize::try_from(len)
                .map(|len| (GuestAddress(start), len))
                .map_err(|_| CreateMemoryError::Size)
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| CreateMemoryError::Map(mem_bytes >> 20, e))
}

/// Registers every region of `mem` with KVM, slot numbers from 0.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), CreateMemoryError> {
    register_with_flags(vm, mem, 0)
}

/// Turns KVM's dirty page log on (or off) for every slot of `mem`: the
/// slots are registered again, same addresses, with
/// `KVM_MEM_LOG_DIRTY_PAGES` set (or cleared).
pub fn set_dirty_logging(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    on: bool,
) -> Result<(), CreateMemoryError> {
    let flags = if on {
        kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    register_with_flags(vm, mem, flags)
}

fn register_with_flags(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    flags: u32,
) -> Result<(), CreateMemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = u32::try_from(slot).map_err(|_| CreateMemoryError::Size)?;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| CreateMemoryError::Size)?;
        let desc = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live mapping of `region.len()`
        // bytes owned by `mem`, which outlives the VM: the `Vm` keeps both
        // and drops the VM fd (and so the slot) before the memory.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|e| CreateMemoryError::Slot(slot, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_is_mapped_per_layout() {
        let mem = create(128 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xabu8, GuestAddress((128 << 20) - 1))
            .unwrap();
        assert!(mem.write_obj(0u8, GuestAddress(128 << 20)).is_err());
    }
}
