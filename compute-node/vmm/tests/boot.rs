//! Boots tiny PVH guests built on the fly and checks what the VMM promises:
//! the guest's serial output reaches stdout, poweroff exits 0, reboot
//! restarts the guest in the same process, and bad input fails before any
//! guest runs. Needs /dev/kvm (skips with a reason without it).

mod common;

use std::time::Duration;

use common::{Scratch, Vmm, programs};

const BOOT_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn guest_prints_and_powers_off_with_status_zero() {
    if !common::kvm_or_skip("guest_prints_and_powers_off_with_status_zero") {
        return;
    }
    let s = Scratch::new();
    let guest = s.guest(programs::OK);
    let mut vmm = Vmm::spawn(&["--kernel", guest.to_str().unwrap(), "--memory", "128"]);
    assert!(
        vmm.wait_for("OK\n", BOOT_TIMEOUT),
        "output: {:?}",
        vmm.text()
    );
    let status = vmm
        .wait_exit(BOOT_TIMEOUT)
        .expect("the VMM did not exit after poweroff");
    assert!(status.success(), "exit status {status}");
    eprintln!(
        "boot: process start to first serial byte {:?}",
        vmm.first_byte.unwrap()
    );
}

#[test]
fn guest_boots_with_many_vcpus_and_large_memory() {
    if !common::kvm_or_skip("guest_boots_with_many_vcpus_and_large_memory") {
        return;
    }
    let s = Scratch::new();
    let guest = s.guest(programs::OK);
    // 4 GiB crosses the MMIO hole: two RAM slots.
    let mut vmm = Vmm::spawn(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--memory",
        "4096",
        "--cpus",
        "16",
    ]);
    assert!(
        vmm.wait_for("OK\n", BOOT_TIMEOUT),
        "output: {:?}",
        vmm.text()
    );
    assert!(vmm.wait_exit(BOOT_TIMEOUT).unwrap().success());
}

#[test]
fn reboot_restarts_the_guest_in_the_same_process() {
    if !common::kvm_or_skip("reboot_restarts_the_guest_in_the_same_process") {
        return;
    }
    let s = Scratch::new();
    let guest = s.guest(programs::REBOOT);
    let sock = s.path("api.sock");
    let mut vmm = Vmm::spawn(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    assert!(
        vmm.wait_for("R\nR\nR\n", BOOT_TIMEOUT),
        "output: {:?}",
        vmm.text()
    );
    let mut c = common::connect(&sock, BOOT_TIMEOUT);
    let status = common::api(&mut c, r#"{"cmd":"status"}"#);
    assert!(status["status"]["boots"].as_u64().unwrap() >= 3, "{status}");
    assert_eq!(
        status["status"]["pid"].as_u64().unwrap(),
        u64::from(vmm.child.id())
    );
    let r = common::api(&mut c, r#"{"cmd":"stop"}"#);
    assert_eq!(r["ok"], true);
    assert!(vmm.wait_exit(BOOT_TIMEOUT).unwrap().success());
}

#[test]
fn smp_application_processors_answer_init_sipi() {
    if !common::kvm_or_skip("smp_application_processors_answer_init_sipi") {
        return;
    }
    let s = Scratch::new();
    let guest = s.guest(programs::SMP);
    let mut vmm = Vmm::spawn(&["--kernel", guest.to_str().unwrap(), "--cpus", "2"]);
    assert!(vmm.wait_exit(Duration::from_secs(60)).unwrap().success());
    let out = vmm.text();
    assert!(
        out.contains("S1\n") && out.contains("A\n"),
        "output: {out:?}"
    );
}

fn expect_failure(args: &[&str], message: &str) {
    let out = common::vmm().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(
        stderr.contains(message),
        "{args:?}: stderr {stderr:?} lacks {message:?}"
    );
    assert!(out.stdout.is_empty(), "a guest ran: {:?}", out.stdout);
}

#[test]
fn bad_input_fails_before_any_guest_runs() {
    let s = Scratch::new();
    let guest = s.guest(programs::OK);
    let g = guest.to_str().unwrap();
    expect_failure(&["--kernel", g, "--cpus", "0"], "0 vCPUs requested");
    expect_failure(&["--kernel", g, "--cpus", "300"], "300 vCPUs requested");
    expect_failure(&["--kernel", g, "--memory", "70000"], "70000 MiB");
    expect_failure(&["--kernel", g, "--memory", "64"], "64 MiB");
    expect_failure(
        &["--kernel", g, "--disk", "x.img,bogus"],
        "unknown disk option",
    );
    expect_failure(
        &["--kernel", g, "--net", "mac=52:54:00:00:00:01"],
        "needs a tap",
    );
    expect_failure(&[], "--kernel");
    if !common::kvm_or_skip("bad_input_fails_before_any_guest_runs (the KVM half)") {
        return;
    }
    let missing = s.path("nope.elf");
    expect_failure(
        &["--kernel", missing.to_str().unwrap()],
        "cannot open kernel",
    );
    let corrupt = s.path("corrupt.elf");
    std::fs::write(&corrupt, b"\x7fELF garbage that is not a kernel").unwrap();
    expect_failure(
        &["--kernel", corrupt.to_str().unwrap()],
        "neither an ELF kernel nor a bzImage",
    );
    let junk = s.path("junk.bin");
    std::fs::write(&junk, vec![0x90u8; 4096]).unwrap();
    expect_failure(
        &["--kernel", junk.to_str().unwrap()],
        "neither an ELF kernel nor a bzImage",
    );
    let disk = s.path("missing.img");
    expect_failure(
        &["--kernel", g, "--disk", disk.to_str().unwrap()],
        "cannot open disk",
    );
    expect_failure(
        &["--kernel", g, "--net", "tap=nephnotap0"],
        "does not exist",
    );
    expect_failure(&["--kernel", g, "--net", "tap=lo"], "not a tap");
}

#[test]
fn probe_reports_a_usable_kvm() {
    if !common::kvm_or_skip("probe_reports_a_usable_kvm") {
        return;
    }
    let out = common::vmm().args(["--probe", "--json"]).output().unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["api_version"], 12);
    assert_eq!(report["usable"], true, "{report}");
    assert_eq!(report["capabilities"]["IRQCHIP"], true, "{report}");
}

#[test]
fn sockets_are_removed_at_exit() {
    if !common::kvm_or_skip("sockets_are_removed_at_exit") {
        return;
    }
    let s = Scratch::new();
    let guest = s.guest(programs::OK);
    let (api, con) = (s.path("api.sock"), s.path("con.sock"));
    let mut vmm = Vmm::spawn(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--api-socket",
        api.to_str().unwrap(),
        "--console-socket",
        con.to_str().unwrap(),
    ]);
    assert!(vmm.wait_exit(BOOT_TIMEOUT).unwrap().success());
    assert!(!api.exists() && !con.exists());
}
