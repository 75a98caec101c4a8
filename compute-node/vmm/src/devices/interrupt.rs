//! Interrupt delivery into KVM's in-kernel irqchip.
//!
//! Legacy lines (the serial port's IRQ 4) go through an irqfd where KVM has
//! them, else `KVM_IRQ_LINE`. MSI-X vectors each get a GSI whose route the
//! [`IrqRouter`] keeps in KVM's GSI routing table (which it must rewrite
//! whole, so it also carries the default PIC/IOAPIC routes) and an irqfd;
//! without irqfd or routing support they fall back to `KVM_SIGNAL_MSI`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry, kvm_msi,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Number of IOAPIC pins, and so of GSIs routed to the irqchips.
pub const IOAPIC_PINS: u32 = 24;

/// Setting up interrupt delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// An eventfd could not be created.
    #[error("cannot create an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// KVM refused an irqfd.
    #[error("KVM refused an irqfd for GSI {0}")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
    /// KVM refused the routing table.
    #[error("KVM refused the GSI routing table")]
    Routing(#[source] kvm_ioctls::Error),
    /// Out of GSIs.
    #[error("no GSI left for an MSI-X vector")]
    NoGsi,
    /// Injecting failed.
    #[error("KVM refused to inject an interrupt")]
    Inject(#[source] kvm_ioctls::Error),
}

/// What the host's KVM offers for interrupt delivery (probed once per VM).
#[derive(Debug, Clone, Copy, Default)]
pub struct IrqCaps {
    /// `KVM_CAP_IRQFD`.
    pub irqfd: bool,
    /// `KVM_CAP_IRQ_ROUTING`.
    pub routing: bool,
    /// `KVM_CAP_SIGNAL_MSI`.
    pub signal_msi: bool,
}

/// A legacy interrupt line (edge-triggered) into the IOAPIC/PIC.
#[derive(Debug)]
pub enum IrqLine {
    /// Through an irqfd bound to the GSI.
    Irqfd(EventFd),
    /// Through `KVM_IRQ_LINE` pulses.
    Ioctl(Arc<VmFd>, u32),
}

impl IrqLine {
    /// A line for `gsi`, by irqfd where KVM supports it.
    pub fn new(vm: &Arc<VmFd>, gsi: u32, caps: IrqCaps) -> Result<Self, InterruptError> {
        if caps.irqfd {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
            vm.register_irqfd(&evt, gsi)
                .map_err(|e| InterruptError::Irqfd(gsi, e))?;
            Ok(Self::Irqfd(evt))
        } else {
            Ok(Self::Ioctl(vm.clone(), gsi))
        }
    }

    /// Another handle on the same line.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            Self::Irqfd(evt) => Self::Irqfd(evt.try_clone()?),
            Self::Ioctl(vm, gsi) => Self::Ioctl(vm.clone(), *gsi),
        })
    }

    /// Raises an edge on the line.
    pub fn trigger(&self) -> std::io::Result<()> {
        match self {
            Self::Irqfd(evt) => evt.write(1),
            Self::Ioctl(vm, gsi) => vm
                .set_irq_line(*gsi, true)
                .and_then(|()| vm.set_irq_line(*gsi, false))
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno())),
        }
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        IrqLine::trigger(self)
    }
}

/// An MSI message: address and data as the guest programmed them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (low 32 bits in `addr_lo`).
    pub addr_lo: u32,
    /// Message address, high half.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
}

/// One MSI vector: its GSI and, with irqfd, the eventfd that fires it.
#[derive(Debug)]
pub struct MsiVector {
    gsi: u32,
    irqfd: Option<EventFd>,
    message: Mutex<MsiMessage>,
}

/// Owns the VM's GSI routing table.
#[derive(Debug)]
pub struct IrqRouter {
    vm: Arc<VmFd>,
    caps: IrqCaps,
    routes: Mutex<BTreeMap<u32, kvm_irq_routing_entry>>,
    next_gsi: Mutex<u32>,
}

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl IrqRouter {
    /// A router with KVM's default legacy routes.
    pub fn new(vm: Arc<VmFd>, caps: IrqCaps) -> Self {
        Self {
            vm,
            caps,
            routes: Mutex::new(BTreeMap::new()),
            next_gsi: Mutex::new(IOAPIC_PINS),
        }
    }

    /// The probed capabilities.
    pub fn caps(&self) -> IrqCaps {
        self.caps
    }

    fn uses_irqfd(&self) -> bool {
        self.caps.irqfd && self.caps.routing
    }

    /// Allocates `n` MSI vectors.
    pub fn allocate(&self, n: usize) -> Result<Vec<MsiVector>, InterruptError> {
        let mut next = self.next_gsi.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let gsi = *next;
            if gsi >= 1024 {
                return Err(InterruptError::NoGsi);
            }
            *next += 1;
            let irqfd = if self.uses_irqfd() {
                let evt = EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
                self.vm
                    .register_irqfd(&evt, gsi)
                    .map_err(|e| InterruptError::Irqfd(gsi, e))?;
                Some(evt)
            } else {
                None
            };
            out.push(MsiVector {
                gsi,
                irqfd,
                message: Mutex::new(MsiMessage::default()),
            });
        }
        Ok(out)
    }

    /// Points `vector` at `msg` (or removes its route for `None`).
    pub fn update(
        &self,
        vector: &MsiVector,
        msg: Option<MsiMessage>,
    ) -> Result<(), InterruptError> {
        *vector.message.lock().unwrap_or_else(|e| e.into_inner()) = msg.unwrap_or_default();
        if !self.uses_irqfd() {
            return Ok(());
        }
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let changed = match msg {
            Some(m) => {
                let mut e = kvm_irq_routing_entry {
                    gsi: vector.gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                e.u.msi.address_lo = m.addr_lo;
                e.u.msi.address_hi = m.addr_hi;
                e.u.msi.data = m.data;
                let old = routes.insert(vector.gsi, e);
                // SAFETY: both entries were written as MSI routes, so reading
                // the `msi` member of the union reads initialised fields.
                old.is_none_or(|o| unsafe {
                    o.u.msi.data != m.data
                        || o.u.msi.address_lo != m.addr_lo
                        || o.u.msi.address_hi != m.addr_hi
                })
            }
            None => routes.remove(&vector.gsi).is_some(),
        };
        if changed {
            self.commit(&routes)?;
        }
        Ok(())
    }

    fn commit(&self, routes: &BTreeMap<u32, kvm_irq_routing_entry>) -> Result<(), InterruptError> {
        let mut entries = Vec::with_capacity(40 + routes.len());
        for gsi in 0..IOAPIC_PINS {
            if gsi < 8 {
                entries.push(irqchip_route(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                entries.push(irqchip_route(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
            entries.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        entries.extend(routes.values().copied());
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| InterruptError::NoGsi)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(InterruptError::Routing)
    }

    /// Fires `vector`.
    pub fn trigger(&self, vector: &MsiVector) -> Result<(), InterruptError> {
        if let Some(evt) = &vector.irqfd {
            return evt.write(1).map_err(|e| {
                InterruptError::Inject(kvm_ioctls::Error::new(
                    e.raw_os_error().unwrap_or(libc::EIO),
                ))
            });
        }
        let m = *vector.message.lock().unwrap_or_else(|e| e.into_inner());
        let msi = kvm_msi {
            address_lo: m.addr_lo,
            address_hi: m.addr_hi,
            data: m.data,
            ..Default::default()
        };
        self.vm
            .signal_msi(msi)
            .map(|_| ())
            .map_err(InterruptError::Inject)
    }
}
