//! The KVM capability report (`neph-vmm --probe`): which extensions this
//! host's KVM has, how much of CPUID and which MSRs it supports, and so what
//! this VMM will use. Operators read it; the builder uses [`KvmCaps`] to pick
//! between ioeventfd/irqfd and their slower fallbacks.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;

use crate::devices::interrupt::IrqCaps;

/// Probing KVM failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm (is KVM loaded and are you allowed to use it?)")]
    Open(#[source] kvm_ioctls::Error),
    /// The API version is not 12.
    #[error("KVM API version {0} is not the stable version 12")]
    Version(i32),
    /// A capability this VMM cannot run without is missing.
    #[error("KVM lacks {0}, which neph-vmm needs")]
    Missing(&'static str),
    /// Supported CPUID could not be read.
    #[error("KVM did not report its supported CPUID")]
    Cpuid(#[source] kvm_ioctls::Error),
    /// MSR list could not be read.
    #[error("KVM did not report its MSR list")]
    Msrs(#[source] kvm_ioctls::Error),
}

/// What this host's KVM can do.
#[derive(Debug, Clone)]
pub struct KvmCaps {
    /// Supported CPUID, the base of every vCPU's.
    pub cpuid: CpuId,
    /// Supported MSR indices.
    pub msrs: Vec<u32>,
    /// `KVM_CAP_IOEVENTFD`.
    pub ioeventfd: bool,
    /// Interrupt delivery capabilities.
    pub irq: IrqCaps,
    /// `KVM_CAP_IMMEDIATE_EXIT`.
    pub immediate_exit: bool,
    /// Recommended and maximum vCPU counts.
    pub nr_vcpus: (usize, usize),
}

/// Checks the capabilities a VM needs and gathers the optional ones.
pub fn probe(kvm: &Kvm) -> Result<KvmCaps, ProbeError> {
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(ProbeError::Version(v));
    }
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
        (Cap::UserMemory, "user memory slots (KVM_CAP_USER_MEMORY)"),
        (Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
        (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID (KVM_CAP_EXT_CPUID)"),
        (Cap::SetTssAddr, "KVM_SET_TSS_ADDR"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(ProbeError::Missing(name));
        }
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ProbeError::Cpuid)?;
    let msrs = kvm
        .get_msr_index_list()
        .map_err(ProbeError::Msrs)?
        .as_slice()
        .to_vec();
    Ok(KvmCaps {
        cpuid,
        msrs,
        ioeventfd: kvm.check_extension(Cap::Ioeventfd),
        irq: IrqCaps {
            irqfd: kvm.check_extension(Cap::Irqfd),
            routing: kvm.check_extension(Cap::IrqRouting),
            signal_msi: kvm.check_extension(Cap::SignalMsi),
        },
        immediate_exit: kvm.check_extension(Cap::ImmediateExit),
        nr_vcpus: (kvm.get_nr_vcpus(), kvm.get_max_vcpus()),
    })
}

/// The operator-facing report.
#[derive(Debug, Serialize)]
pub struct ProbeReport {
    /// KVM API version.
    pub api_version: i32,
    /// Each capability checked, and whether KVM has it.
    pub capabilities: std::collections::BTreeMap<String, bool>,
    /// Recommended vCPUs per VM.
    pub recommended_vcpus: usize,
    /// Maximum vCPUs per VM.
    pub max_vcpus: usize,
    /// Number of memory slots.
    pub memory_slots: usize,
    /// Entries in the supported CPUID.
    pub cpuid_entries: usize,
    /// Whether the supported CPUID has the KVM paravirt leaves and kvmclock.
    pub kvmclock: bool,
    /// Supported MSRs.
    pub msr_count: usize,
    /// MSRs worth knowing about that are not supported.
    pub notable_missing_msrs: Vec<String>,
    /// What neph-vmm will use for queue notifications and interrupts.
    pub notify_path: String,
    /// Interrupt path.
    pub interrupt_path: String,
    /// Whether neph-vmm can run VMs here.
    pub usable: bool,
    /// Why not, if not.
    pub error: Option<String>,
}

/// Builds the report for `kvm`.
pub fn report(kvm: &Kvm) -> ProbeReport {
    let caps: std::collections::BTreeMap<String, bool> = [
        (Cap::Irqchip, "IRQCHIP"),
        (Cap::UserMemory, "USER_MEMORY"),
        (Cap::SetTssAddr, "SET_TSS_ADDR"),
        (Cap::SetIdentityMapAddr, "SET_IDENTITY_MAP_ADDR"),
        (Cap::Pit2, "PIT2"),
        (Cap::PitState2, "PIT_STATE2"),
        (Cap::ExtCpuid, "EXT_CPUID"),
        (Cap::MpState, "MP_STATE"),
        (Cap::Ioeventfd, "IOEVENTFD"),
        (Cap::Irqfd, "IRQFD"),
        (Cap::IrqRouting, "IRQ_ROUTING"),
        (Cap::SignalMsi, "SIGNAL_MSI"),
        (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
        (Cap::Xsave, "XSAVE"),
        (Cap::Xcrs, "XCRS"),
        (Cap::VcpuEvents, "VCPU_EVENTS"),
        (Cap::Debugregs, "DEBUGREGS"),
        (Cap::AdjustClock, "ADJUST_CLOCK"),
        (Cap::KvmclockCtrl, "KVMCLOCK_CTRL"),
        (Cap::TscControl, "TSC_CONTROL"),
        (Cap::GetTscKhz, "GET_TSC_KHZ"),
        (Cap::TscDeadlineTimer, "TSC_DEADLINE_TIMER"),
        (Cap::GetMsrFeatures, "GET_MSR_FEATURES"),
        (Cap::SplitIrqchip, "SPLIT_IRQCHIP"),
        (Cap::X2ApicApi, "X2APIC_API"),
        (Cap::NestedState, "NESTED_STATE"),
        (Cap::DirtyLogRing, "DIRTY_LOG_RING"),
        (Cap::ReadonlyMem, "READONLY_MEM"),
        (Cap::CoalescedMmio, "COALESCED_MMIO"),
        (Cap::UserMemory2, "USER_MEMORY2"),
    ]
    .into_iter()
    .map(|(c, n)| (n.to_owned(), kvm.check_extension(c)))
    .collect();
    let probed = probe(kvm);
    let (cpuid_entries, kvmclock, msr_count, missing) = match &probed {
        Ok(p) => {
            let e = p.cpuid.as_slice();
            let kvmclock = e
                .iter()
                .any(|l| l.function == 0x4000_0001 && l.eax & (1 << 3) != 0);
            let missing = [
                (0x10au32, "IA32_ARCH_CAPABILITIES"),
                (0x48, "IA32_SPEC_CTRL"),
                (0x4b56_4d01, "KVM_SYSTEM_TIME_NEW"),
                (0x6e0, "IA32_TSC_DEADLINE"),
            ]
            .into_iter()
            .filter(|(m, _)| !p.msrs.contains(m))
            .map(|(m, n)| format!("{m:#x} {n}"))
            .collect();
            (e.len(), kvmclock, p.msrs.len(), missing)
        }
        Err(_) => (0, false, 0, Vec::new()),
    };
    let (notify_path, interrupt_path) = match &probed {
        Ok(p) => (
            if p.ioeventfd {
                "ioeventfd".to_owned()
            } else {
                "MMIO exit".to_owned()
            },
            if p.irq.irqfd && p.irq.routing {
                "irqfd + GSI routing".to_owned()
            } else if p.irq.signal_msi {
                "KVM_SIGNAL_MSI".to_owned()
            } else {
                "none (MSI-X unavailable; guests must poll)".to_owned()
            },
        ),
        Err(_) => (String::new(), String::new()),
    };
    ProbeReport {
        api_version: kvm.get_api_version(),
        capabilities: caps,
        recommended_vcpus: kvm.get_nr_vcpus(),
        max_vcpus: kvm.get_max_vcpus(),
        memory_slots: kvm.get_nr_memslots(),
        cpuid_entries,
        kvmclock,
        msr_count,
        notable_missing_msrs: missing,
        notify_path,
        interrupt_path,
        usable: probed.is_ok(),
        error: probed.err().map(|e| e.to_string()),
    }
}

impl std::fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "KVM API version   {}", self.api_version)?;
        writeln!(
            f,
            "vCPUs             {} recommended, {} max; {} memory slots",
            self.recommended_vcpus, self.max_vcpus, self.memory_slots
        )?;
        writeln!(
            f,
            "CPUID             {} supported entries; kvmclock {}",
            self.cpuid_entries,
            if self.kvmclock { "yes" } else { "no" }
        )?;
        writeln!(f, "MSRs              {} supported", self.msr_count)?;
        for m in &self.notable_missing_msrs {
            writeln!(f, "  missing MSR     {m}")?;
        }
        writeln!(f, "queue notify      {}", self.notify_path)?;
        writeln!(f, "interrupts        {}", self.interrupt_path)?;
        writeln!(f, "capabilities:")?;
        for (name, has) in &self.capabilities {
            writeln!(f, "  {:<24}{}", name, if *has { "yes" } else { "no" })?;
        }
        match &self.error {
            None => write!(f, "usable            yes"),
            Some(e) => write!(f, "usable            no: {e}"),
        }
    }
}
