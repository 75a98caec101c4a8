//! Randomized hostile guest accesses to the virtio-pci transport: arbitrary
//! configuration-space writes (BAR moves, MSI-X control), MMIO reads and
//! writes of every width anywhere in the BAR (common configuration with
//! random queue setups and status values, notify, MSI-X table and PBA,
//! device configuration), driven through the PCI bus as vCPU exits would.
//! The property: nothing panics and the bus keeps answering. Needs /dev/kvm
//! for the VM fd the transport holds (skips without it).

use std::sync::{Arc, Mutex};

use neph_vmm::devices::interrupt::{IrqCaps, IrqRouter};
use neph_vmm::devices::pci::{PciBus, SharedPciDevice};
use neph_vmm::devices::virtio::pci::{BAR_SIZE, VirtioPciDevice};
use neph_vmm::devices::virtio::rng::Rng;
use neph_vmm::vstate::memory::GuestMemoryMmap;
use proptest::prelude::*;
use vm_memory::GuestAddress;

const BAR: u64 = 0xc000_0000;

#[derive(Debug, Clone)]
enum Op {
    Cfg { offset: u8, data: Vec<u8> },
    Read { offset: u64, width: usize },
    Write { offset: u64, data: Vec<u8> },
}

fn width() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), Just(2), Just(4), Just(8)]
}

fn bar_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..0x40,
        1 => 0x1000u64..0x1004,
        1 => 0x2000u64..0x2010,
        2 => 0x3000u64..0x3010,
        2 => 0x4000u64..0x4040,
        1 => 0x5000u64..0x5010,
        1 => 0u64..BAR_SIZE + 0x100,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (any::<u8>(), width()).prop_flat_map(|(offset, w)| {
            prop::collection::vec(any::<u8>(), w).prop_map(move |data| Op::Cfg { offset, data })
        }),
        3 => (bar_offset(), width()).prop_map(|(offset, width)| Op::Read { offset, width }),
        6 => (bar_offset(), width()).prop_flat_map(|(offset, w)| {
            prop::collection::vec(
                prop_oneof![3 => 0u8..16, 1 => any::<u8>(), 1 => Just(0x20u8)],
                w,
            )
            .prop_map(move |data| Op::Write { offset, data })
        }),
    ]
}

fn cfg_access(bus: &PciBus, offset: u8, data: &[u8]) {
    let reg = u32::from(offset) & !3;
    bus.pio_write(0xcf8, &(0x8000_0800 | reg).to_le_bytes());
    let port = 0xcfc + u16::from(offset & 3);
    bus.pio_write(port, &data[..data.len().min(4)]);
    let mut back = [0u8; 4];
    bus.pio_read(0xcfc, &mut back);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn transport_survives_hostile_accesses(ops in prop::collection::vec(op(), 1..80)) {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("SKIP transport_survives_hostile_accesses: /dev/kvm is not usable here");
            return Ok(());
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let router = Arc::new(IrqRouter::new(vm.clone(), IrqCaps::default()));
        let dev = VirtioPciDevice::new(
            "rng0".into(),
            Box::<Rng>::default(),
            mem,
            vm,
            router,
            BAR,
            false,
        )
        .unwrap();
        let dev: SharedPciDevice = Arc::new(Mutex::new(dev));
        let bus = PciBus::new(vec![dev]);
        // Memory decoding on, so BAR accesses reach the device.
        cfg_access(&bus, 4, &[0x06, 0, 0, 0]);
        for op in &ops {
            match op {
                Op::Cfg { offset, data } => cfg_access(&bus, *offset, data),
                Op::Read { offset, width } => {
                    let mut buf = vec![0u8; *width];
                    bus.mmio_read(BAR + offset, &mut buf);
                }
                Op::Write { offset, data } => {
                    bus.mmio_write(BAR + offset, data);
                }
            }
        }
        // The bus still answers configuration reads.
        bus.pio_write(0xcf8, &0x8000_0800u32.to_le_bytes());
        let mut id = [0u8; 4];
        bus.pio_read(0xcfc, &mut id);
        prop_assert_eq!(u32::from_le_bytes(id), 0x1044_1af4);
    }
}
