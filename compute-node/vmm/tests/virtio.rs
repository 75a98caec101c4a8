//! virtio-pci end to end with tiny guest drivers: a well-behaved virtio-rng
//! request is served through the transport (PCI config, common config,
//! ioeventfd notify, used ring), and a hostile descriptor makes the device
//! report DEVICE_NEEDS_RESET while the VMM keeps running and powers off
//! cleanly. The device-level hostile-ring tests are unit tests beside the
//! queue, block and net code; the randomized ones are in `fuzz_queue.rs`.

mod common;

use std::time::Duration;

use common::{Scratch, Vmm, programs};

const TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn guest_driver_gets_random_bytes() {
    if !common::kvm_or_skip("guest_driver_gets_random_bytes") {
        return;
    }
    let s = Scratch::new();
    let guest = s.guest(programs::VIRTIO_RNG);
    let mut vmm = Vmm::spawn(&["--kernel", guest.to_str().unwrap()]);
    let status = vmm.wait_exit(TIMEOUT).expect("the VMM did not exit");
    assert!(status.success(), "status {status}");
    assert_eq!(vmm.text(), "V1\nN0\n");
}

#[test]
fn hostile_descriptor_resets_the_device_not_the_vmm() {
    if !common::kvm_or_skip("hostile_descriptor_resets_the_device_not_the_vmm") {
        return;
    }
    let s = Scratch::new();
    let guest = s.guest(programs::VIRTIO_RNG_HOSTILE);
    let mut vmm = Vmm::spawn(&["--kernel", guest.to_str().unwrap()]);
    let status = vmm.wait_exit(TIMEOUT).expect("the VMM did not exit");
    assert!(status.success(), "status {status}");
    assert_eq!(vmm.text(), "V0\nN1\n");
}
