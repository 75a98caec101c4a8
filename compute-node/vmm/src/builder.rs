//! From a [`VmConfig`] to a [`Vm`] ready to run: validation, KVM probing,
//! opening disks and taps (all before any guest code runs, so bad input is
//! an error and never a half-started guest), and building each boot: the KVM
//! VM with its irqchip and PIT, guest memory, ACPI and MP tables, the kernel,
//! the devices and the vCPUs. A reboot builds a fresh boot from the same
//! opened backends.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::arch::layout::{
    ACPI_START, KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS, PCI_MMIO_END, PCI_MMIO_START,
};
use crate::arch::{acpi, loader, mptable};
use crate::config::{ConfigError, MacAddr, VmConfig};
use crate::devices::Devices;
use crate::devices::interrupt::{InterruptError, IrqLine, IrqRouter};
use crate::devices::legacy::{GED_IRQ, LegacyDevices};
use crate::devices::pci::{PciBus, SharedPciDevice};
use crate::devices::serial::{Console, SERIAL_IRQ, SerialDevice};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::{Block, DiskBackend, OpenDiskError};
use crate::devices::virtio::event_loop::{EventLoop, SharedVirtio, StartEventLoopError};
use crate::devices::virtio::net::{Net, OpenTapError, Tap};
use crate::devices::virtio::pci::{BAR_SIZE, CreateVirtioPciError, VirtioPciDevice};
use crate::devices::virtio::rng::Rng;
use crate::probe::{KvmCaps, ProbeError};
use crate::vm::Vm;
use crate::vstate::memory::{self, CreateMemoryError, GuestMemoryMmap};
use crate::vstate::vcpu::{self, CreateVcpuError, VcpuEvent, VcpuSet};

/// Building or booting the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum StartVmError {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// More memory than the host has.
    #[error("{requested} MiB of guest memory requested, but this host has only {host} MiB")]
    HostMemory {
        /// Asked.
        requested: u64,
        /// Host total.
        host: u64,
    },
    /// KVM cannot be used.
    #[error("KVM is not usable")]
    Kvm(#[from] ProbeError),
    /// A disk cannot be used.
    #[error("cannot use a disk")]
    Disk(#[from] OpenDiskError),
    /// A tap cannot be used.
    #[error("cannot use a network interface")]
    Tap(#[from] OpenTapError),
    /// A KVM VM-level ioctl failed.
    #[error("KVM refused to {0}")]
    KvmVm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory.
    #[error("cannot set up guest memory")]
    Memory(#[from] CreateMemoryError),
    /// The kernel or initrd.
    #[error("cannot load the kernel")]
    Kernel(#[from] loader::LoadKernelError),
    /// ACPI tables.
    #[error("cannot write the ACPI tables")]
    Acpi(#[from] acpi::AcpiError),
    /// MP table.
    #[error("cannot write the MP table")]
    MpTable(#[from] mptable::MpTableError),
    /// Interrupts.
    #[error("cannot set up interrupts")]
    Interrupt(#[from] InterruptError),
    /// A virtio device.
    #[error("cannot set up a virtio device")]
    Device(#[from] CreateVirtioPciError),
    /// Out of BAR space.
    #[error("the PCI memory window is full")]
    BarSpace,
    /// vCPUs.
    #[error("cannot set up the vCPUs")]
    Vcpu(#[from] CreateVcpuError),
    /// The device thread.
    #[error("cannot start the device thread")]
    EventLoop(#[from] StartEventLoopError),
    /// A backend could not be shared with a new boot.
    #[error("cannot reopen {0} for the new boot")]
    Reopen(PathBuf, #[source] std::io::Error),
}

/// Disks and taps, opened once for the life of the process.
#[derive(Debug)]
pub(crate) struct Backends {
    pub(crate) disks: Vec<DiskBackend>,
    pub(crate) nets: Vec<(Tap, MacAddr)>,
}

/// Kind of a virtio device, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeviceKind {
    Block,
    Net,
    Rng,
}

/// One boot of the guest: a KVM VM and everything in it.
pub(crate) struct Boot {
    pub(crate) vcpus: Option<VcpuSet>,
    event_loop: Option<EventLoop>,
    pending_vcpus: Vec<VcpuFd>,
    pub(crate) devices: Arc<Devices>,
    pub(crate) virtio: Vec<(SharedVirtio, DeviceKind, String)>,
    pub(crate) vm: Arc<VmFd>,
    pub(crate) mem: GuestMemoryMmap,
}

impl std::fmt::Debug for Boot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Boot").finish_non_exhaustive()
    }
}

impl Boot {
    /// Starts the device thread and the vCPUs; events go to `sink`. With
    /// `paused` the vCPUs start parked and the device thread is paused
    /// before this returns (a migration target starts its threads before
    /// the switchover is committed, so the commit only has to resume).
    pub(crate) fn start(
        &mut self,
        sink: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
        paused: bool,
    ) -> Result<(), StartVmError> {
        let shared: Vec<SharedVirtio> = self.virtio.iter().map(|(d, _, _)| d.clone()).collect();
        let event_loop = EventLoop::start(&shared)?;
        if paused {
            event_loop.pause();
        }
        self.event_loop = Some(event_loop);
        let fds = std::mem::take(&mut self.pending_vcpus);
        self.vcpus = Some(VcpuSet::start(fds, self.devices.clone(), sink, paused)?);
        Ok(())
    }

    /// Whether [`Self::start`] has run.
    pub(crate) fn started(&self) -> bool {
        self.vcpus.is_some()
    }

    /// Pauses the vCPUs, then the device thread.
    pub(crate) fn pause(&self) {
        if let Some(v) = &self.vcpus {
            v.pause();
        }
        if let Some(e) = &self.event_loop {
            e.pause();
        }
    }

    /// Resumes the device thread, then the vCPUs.
    pub(crate) fn resume(&self) {
        if let Some(e) = &self.event_loop {
            e.resume();
        }
        if let Some(v) = &self.vcpus {
            v.resume();
        }
    }

    /// Stops the vCPUs, then the device thread.
    pub(crate) fn stop(mut self) {
        if let Some(v) = self.vcpus.take() {
            v.stop();
        }
        if let Some(e) = self.event_loop.take() {
            e.stop();
        }
    }
}

fn host_memory_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Validates `config`, probes KVM, opens the backends and builds the first
/// boot. Nothing runs until [`Vm::run`].
pub fn build(config: VmConfig, console: Arc<Console>) -> Result<Vm, StartVmError> {
    build_with(config, console, true)
}

/// Like [`build`], for a migration target: the first boot gets no kernel,
/// firmware tables or boot registers (memory stays zero until the source's
/// pages arrive, and the vCPUs get the source's state); reboots load the
/// kernel from `config` as usual.
pub fn build_incoming(config: VmConfig, console: Arc<Console>) -> Result<Vm, StartVmError> {
    build_with(config, console, false)
}

fn build_with(config: VmConfig, console: Arc<Console>, load: bool) -> Result<Vm, StartVmError> {
    config.validate()?;
    if let Some(host) = host_memory_mib()
        && config.memory_mib > host
    {
        return Err(StartVmError::HostMemory {
            requested: config.memory_mib,
            host,
        });
    }
    let kvm = Kvm::new().map_err(ProbeError::Open)?;
    let caps = crate::probe::probe(&kvm)?;
    let mut backends = Backends {
        disks: Vec::new(),
        nets: Vec::new(),
    };
    for d in &config.disks {
        backends.disks.push(DiskBackend::open(&d.path, d.readonly)?);
    }
    for n in &config.nets {
        backends.nets.push((Tap::open(&n.tap)?, n.effective_mac()));
    }
    let boot = create_boot(&config, &kvm, &caps, &backends, &console, load)?;
    Ok(Vm::new(config, kvm, caps, console, backends, boot))
}

/// Builds one boot.
pub(crate) fn create_boot(
    config: &VmConfig,
    kvm: &Kvm,
    caps: &KvmCaps,
    backends: &Backends,
    console: &Arc<Console>,
    load: bool,
) -> Result<Boot, StartVmError> {
    let vm = Arc::new(
        kvm.create_vm()
            .map_err(|e| StartVmError::KvmVm("create a VM", e))?,
    );
    // Guest RAM goes in before the irqchip and PIT: registering the first
    // memory slot after them costs 3.5 to 7.5 ms on this PVM host, before
    // them 0.1 to 0.2 ms (measured with strace -T; Firecracker keeps the
    // same order).
    let mem = memory::create(config.memory_bytes())?;
    memory::register(&vm, &mem)?;
    vm.set_tss_address(usize::try_from(KVM_TSS_ADDRESS).unwrap_or(0))
        .map_err(|e| StartVmError::KvmVm("set the TSS address", e))?;
    if kvm.check_extension(Cap::SetIdentityMapAddr) {
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| StartVmError::KvmVm("set the identity map address", e))?;
    }
    vm.create_irq_chip()
        .map_err(|e| StartVmError::KvmVm("create the in-kernel irqchip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| StartVmError::KvmVm("create the in-kernel PIT", e))?;

    let (devices, virtio, fds) = populate(config, caps, backends, console, &vm, &mem, load)?;
    Ok(Boot {
        vcpus: None,
        event_loop: None,
        pending_vcpus: fds,
        devices,
        virtio,
        vm,
        mem,
    })
}

type Populated = (
    Arc<Devices>,
    Vec<(SharedVirtio, DeviceKind, String)>,
    Vec<VcpuFd>,
);

/// Everything in a boot but the memory slots: tables, kernel, devices, vCPUs.
fn populate(
    config: &VmConfig,
    caps: &KvmCaps,
    backends: &Backends,
    console: &Arc<Console>,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    load: bool,
) -> Result<Populated, StartVmError> {
    let mem_bytes = config.memory_bytes();
    let kernel = if load {
        acpi::setup(mem, config.vcpus, ACPI_START)?;
        mptable::setup(mem, config.vcpus)?;
        Some(loader::load(
            mem,
            mem_bytes,
            &config.kernel,
            config.initrd.as_deref(),
            &config.cmdline,
            ACPI_START,
        )?)
    } else {
        None
    };

    let router = Arc::new(IrqRouter::new(vm.clone(), caps.irq));
    let serial = SerialDevice::attach(console, IrqLine::new(vm, SERIAL_IRQ, caps.irq)?);

    let mut virtio = Vec::new();
    let mut bar = PCI_MMIO_START;
    let mut add = |dev: Box<dyn VirtioDevice>,
                   kind: DeviceKind,
                   name: String,
                   backend: String|
     -> Result<(), StartVmError> {
        if bar + BAR_SIZE > PCI_MMIO_END {
            return Err(StartVmError::BarSpace);
        }
        let d = VirtioPciDevice::new(
            name,
            dev,
            mem.clone(),
            vm.clone(),
            router.clone(),
            bar,
            caps.ioeventfd,
        )?;
        bar += BAR_SIZE;
        virtio.push((Arc::new(Mutex::new(d)), kind, backend));
        Ok(())
    };
    for (i, disk) in backends.disks.iter().enumerate() {
        let d = disk
            .try_clone()
            .map_err(|e| StartVmError::Reopen(disk.path.clone(), e))?;
        let backend = disk.path.display().to_string();
        add(
            Box::new(Block::new(d)),
            DeviceKind::Block,
            format!("block{i}"),
            backend,
        )?;
    }
    for (i, (tap, mac)) in backends.nets.iter().enumerate() {
        let t = tap
            .try_clone()
            .map_err(|e| StartVmError::Reopen(PathBuf::from(&tap.name), e))?;
        add(
            Box::new(Net::new(t, *mac)),
            DeviceKind::Net,
            format!("net{i}"),
            tap.name.clone(),
        )?;
    }
    if config.rng {
        add(
            Box::<Rng>::default(),
            DeviceKind::Rng,
            "rng0".into(),
            "getrandom".into(),
        )?;
    }
    let pci_devices: Vec<SharedPciDevice> = virtio
        .iter()
        .map(|(d, _, _)| d.clone() as SharedPciDevice)
        .collect();
    let devices = Arc::new(Devices {
        serial,
        legacy: Arc::new(LegacyDevices::new(Some(IrqLine::new(
            vm, GED_IRQ, caps.irq,
        )?))),
        pci: Arc::new(PciBus::new(pci_devices)),
    });

    let mut fds = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let boot = kernel
            .as_ref()
            .filter(|_| id == 0)
            .map(|k| (k.mode, k.entry));
        fds.push(vcpu::create(
            vm,
            mem,
            id,
            config.vcpus,
            &caps.cpuid,
            &caps.msrs,
            boot,
        )?);
    }
    Ok((devices, virtio, fds))
}
