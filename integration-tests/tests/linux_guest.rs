//! The Linux guest from `cargo xtask image linux`: its files are well formed
//! everywhere, and it boots under `neph-vmm` where the host's KVM can run
//! stock Linux (hardware KVM; under PVM the boot test says why it skips).

use std::path::PathBuf;
use std::time::Duration;

use nephele_integration_tests::guest::{
    GuestVm, linux_image_dir, stock_linux_unsupported, workspace_binary,
};
use nephele_integration_tests::migration::control;

fn image_dir() -> PathBuf {
    linux_image_dir().expect(
        "NEPH_LINUX_IMAGE_DIR is not set: run the suite with `cargo xtask test`, \
         which builds the Linux guest first",
    )
}

#[test]
fn linux_image_files_are_well_formed() {
    let dir = image_dir();
    let kernel = std::fs::read(dir.join("vmlinuz")).expect("read vmlinuz");
    // bzImage: the "HdrS" boot protocol magic at 0x202, protocol >= 2.12.
    assert_eq!(&kernel[0x202..0x206], b"HdrS", "vmlinuz is not a bzImage");
    let version = u16::from_le_bytes([kernel[0x206], kernel[0x207]]);
    assert!(version >= 0x020c, "boot protocol {version:#x} is too old");

    let initramfs = std::fs::read(dir.join("initramfs.cpio")).expect("read initramfs");
    assert!(
        initramfs.starts_with(b"070701"),
        "initramfs is not a newc cpio"
    );
    let has = |name: &[u8]| initramfs.windows(name.len()).any(|w| w == name);
    for name in [
        &b"init\0"[..],
        b"bin/busybox\0",
        b"lib/modules/virtio_pci.ko\0",
        b"lib/modules/button.ko\0",
        b"lib/modules/evdev.ko\0",
        b"etc/acpi/PWRF/00000080\0",
    ] {
        assert!(
            has(name),
            "initramfs lacks {}",
            String::from_utf8_lossy(name)
        );
    }

    let rootfs = std::fs::read(dir.join("rootfs.ext4")).expect("read rootfs");
    // ext2/3/4 superblock magic 0xef53 at byte 1024 + 56.
    assert_eq!(
        &rootfs[1024 + 56..1024 + 58],
        &[0x53, 0xef],
        "rootfs is not ext4"
    );
}

/// `neph-vmm` booting the Linux guest with its root disk.
fn linux_vm(dir: &std::path::Path, extra: &[&str]) -> GuestVm {
    let mut cmd = std::process::Command::new(workspace_binary("neph-vmm"));
    cmd.arg("--kernel")
        .arg(dir.join("vmlinuz"))
        .arg("--initrd")
        .arg(dir.join("initramfs.cpio"))
        .args(["--cmdline", "console=ttyS0 panic=-1 quiet"])
        .arg("--disk")
        .arg(format!("{},readonly", dir.join("rootfs.ext4").display()))
        .args(["--cpus", "2", "--memory", "512"])
        .args(extra);
    GuestVm::spawn(cmd).expect("start neph-vmm")
}

#[test]
fn linux_boots_with_virtio_root_disk() {
    if let Some(reason) = stock_linux_unsupported() {
        eprintln!("{reason}");
        return;
    }
    let dir = image_dir();
    let mut vm = linux_vm(&dir, &[]);
    let ready = vm
        .wait_for("NEPH-LINUX READY", Duration::from_secs(60))
        .expect("Linux reaches its ready line");
    assert!(ready.contains("cpus=2"), "{ready}");
    assert!(
        ready.contains("nephele linux guest"),
        "root disk not mounted: {ready}"
    );
    vm.send_line("poweroff -f").expect("type poweroff");
    let status = vm.wait_exit(Duration::from_secs(30)).expect("VMM exits");
    assert!(status.success(), "poweroff should exit 0, got {status}");
}

#[test]
fn linux_powers_off_when_the_host_asks() {
    if let Some(reason) = stock_linux_unsupported() {
        eprintln!("{reason}");
        return;
    }
    let dir = image_dir();
    let socket = std::env::temp_dir().join(format!("neph-linux-{}.sock", std::process::id()));
    let socket_arg = socket.display().to_string();
    let mut vm = linux_vm(&dir, &["--api-socket", &socket_arg]);
    vm.wait_for("NEPH-LINUX READY", Duration::from_secs(60))
        .expect("Linux reaches its ready line");
    // The graceful shutdown presses the ACPI power button (GED -> PNP0C0C);
    // acpid in the guest powers off long before the 30 s timeout.
    let answer =
        control(&socket, r#"{"cmd":"shutdown","timeout_ms":30000}"#).expect("shutdown request");
    assert_eq!(answer["ok"], true, "{answer}");
    vm.wait_for("power button: powering off", Duration::from_secs(20))
        .expect("the guest saw the power button");
    let status = vm.wait_exit(Duration::from_secs(20)).expect("VMM exits");
    assert!(
        status.success(),
        "a graceful poweroff exits 0, got {status}"
    );
    let _ = std::fs::remove_file(&socket);
}
