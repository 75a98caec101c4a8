//! The project's test guest under `neph-vmm`, end to end, as issue 2 lists:
//! boot to the ready marker with the memory and CPUs given, disk data that
//! survives a new boot, a read-only disk, networking through taps and a
//! bridge (inside a namespace each test makes), reboot, poweroff, and pause
//! and resume seen by the guest's own 1 ms ticker.
//!
//! Each test needs root and `/dev/kvm`; without them it prints why and
//! returns. Processes, namespaces and taps go away on drop, also on failure.

use std::path::Path;
use std::time::Duration;

use nephele_integration_tests::guest::{GuestVm, field, number, skip_without_kvm as skip};
use nephele_integration_tests::migration;
use nephele_integration_tests::netdev::NetNs;

const BOOT: Duration = Duration::from_secs(30);
const CMD: Duration = Duration::from_secs(20);

fn power_off(mut vm: GuestVm) {
    vm.command("poweroff", "POWEROFF", CMD).expect("poweroff");
    let status = vm.wait_exit(BOOT).expect("neph-vmm exits after poweroff");
    assert!(status.success(), "poweroff must exit 0, got {status}");
}

/// One request on the VMM's control socket, which must succeed.
fn control(socket: &Path, request: &str) -> serde_json::Value {
    let answer = migration::control(socket, request).expect("control request");
    assert_eq!(answer["ok"], true, "{request} failed: {answer}");
    answer
}

#[test]
fn boots_to_ready_with_the_memory_and_cpus_given() {
    if skip() {
        return;
    }
    let mut vm = GuestVm::start(&["--memory", "384", "--cpus", "2"]).expect("start");
    let ready = vm.wait_ready(BOOT).expect("ready marker");
    assert_eq!(number(&ready, "mem_mib"), 384, "{ready}");
    assert_eq!(number(&ready, "cpus"), 2, "{ready}");
    // The application processor answers INIT/SIPI (it does under PVM too).
    assert_eq!(number(&ready, "cpus_online"), 2, "{ready}");
    assert!(
        number(&ready, "rng") >= 1,
        "virtio-rng is on by default: {ready}"
    );
    let rng = vm.command("rng 32", "RNG ", CMD).expect("rng");
    assert!(rng.starts_with("RNG OK bytes=32"), "{rng}");
    let hex = rng.rsplit("hex=").next().unwrap_or_default();
    assert_eq!(hex.len(), 64, "{rng}");
    assert!(hex.chars().any(|c| c != '0'), "all-zero entropy: {rng}");
    power_off(vm);
}

#[test]
fn disk_data_survives_a_new_boot() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 8 << 20]).expect("make disk");
    let disk_arg = disk.display().to_string();

    let mut vm = GuestVm::start(&["--disk", &disk_arg]).expect("start");
    vm.wait_ready(BOOT).expect("ready");
    let wrote = vm
        .command("blk write 8 hello-nephele", "BLK ", CMD)
        .expect("write");
    assert!(wrote.starts_with("BLK OK write lba=8"), "{wrote}");
    let flushed = vm.command("blk flush", "BLK ", CMD).expect("flush");
    assert_eq!(flushed, "BLK OK flush");
    let written = vm
        .command("diskwrite 100 300 7", "DISKWRITE ", CMD)
        .expect("diskwrite");
    assert!(written.starts_with("DISKWRITE OK"), "{written}");
    power_off(vm);

    // The bytes are in the host file where the guest put them.
    let bytes = std::fs::read(&disk).expect("read disk");
    assert_eq!(&bytes[8 * 512..8 * 512 + 13], b"hello-nephele");

    let mut vm = GuestVm::start(&["--disk", &disk_arg]).expect("start again");
    vm.wait_ready(BOOT).expect("ready again");
    let read = vm.command("blk read 8", "BLK ", CMD).expect("read");
    assert_eq!(
        field(&read, "fnv"),
        field(&wrote, "fnv"),
        "{read} vs {wrote}"
    );
    let verified = vm
        .command("diskverify 100 300 7", "DISKVERIFY ", CMD)
        .expect("diskverify");
    assert!(verified.starts_with("DISKVERIFY OK"), "{verified}");
    assert_eq!(field(&verified, "fnv"), field(&written, "fnv"));
    // A different seed does not match: the check can fail.
    let wrong = vm
        .command("diskverify 100 300 8", "DISKVERIFY ", CMD)
        .expect("diskverify with another seed");
    assert!(wrong.starts_with("DISKVERIFY ERR mismatch"), "{wrong}");
    power_off(vm);
}

#[test]
fn read_only_disk_refuses_writes() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("ro.raw");
    std::fs::write(&disk, vec![0x5a; 1 << 20]).expect("make disk");
    let arg = format!("{},readonly", disk.display());
    let mut vm = GuestVm::start(&["--disk", &arg]).expect("start");
    vm.wait_ready(BOOT).expect("ready");
    let info = vm.command("blk info", "BLK ", CMD).expect("info");
    assert_eq!(field(&info, "read_only"), Some("1"), "{info}");
    let write = vm.command("blk write 0 nope", "BLK ", CMD).expect("write");
    assert!(
        write.starts_with("BLK ERR"),
        "a read-only disk took a write: {write}"
    );
    let read = vm.command("blk read 0", "BLK ", CMD).expect("read");
    assert!(read.starts_with("BLK OK read lba=0"), "{read}");
    power_off(vm);
    assert!(std::fs::read(&disk).unwrap().iter().all(|b| *b == 0x5a));
}

#[test]
fn reboot_comes_back_in_the_same_process() {
    if skip() {
        return;
    }
    let mut vm = GuestVm::start(&["--cpus", "2"]).expect("start");
    vm.wait_ready(BOOT).expect("first boot");
    let pid = vm.pid();
    vm.command("reboot", "REBOOT", CMD).expect("reboot");
    let again = vm.wait_ready(BOOT).expect("second boot");
    assert_eq!(number(&again, "cpus_online"), 2, "{again}");
    assert!(
        vm.wait_exit(Duration::ZERO).is_none(),
        "the VMM exited on reboot"
    );
    assert_eq!(vm.pid(), pid);
    power_off(vm);
}

#[test]
fn pause_stops_the_ticker_and_resume_restarts_it() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("api.sock");
    let socket_arg = socket.display().to_string();
    let mut vm = GuestVm::start(&["--api-socket", &socket_arg]).expect("start");
    vm.wait_ready(BOOT).expect("ready");
    vm.command("ticker start", "TICKER OK started", CMD)
        .expect("ticker");
    std::thread::sleep(Duration::from_millis(200));
    let before = vm
        .command("ticker report", "TICKER OK", CMD)
        .expect("report");

    control(&socket, r#"{"cmd":"pause"}"#);
    let status = control(&socket, r#"{"cmd":"status"}"#);
    assert_eq!(status["status"]["state"], "paused", "{status}");
    std::thread::sleep(Duration::from_millis(600));
    control(&socket, r#"{"cmd":"resume"}"#);

    let after = vm
        .command("ticker report", "TICKER OK", CMD)
        .expect("report");
    let gap = number(&after, "max_gap_us");
    assert!(
        gap >= 500_000,
        "a 600 ms pause must show as a gap of at least 500 ms: {after}"
    );
    std::thread::sleep(Duration::from_millis(100));
    let later = vm
        .command("ticker report", "TICKER OK", CMD)
        .expect("report");
    assert!(
        number(&later, "ticks") > number(&after, "ticks")
            && number(&after, "ticks") > number(&before, "ticks"),
        "the ticker must run again after resume: {before} / {after} / {later}"
    );
    power_off(vm);
}

#[test]
fn guest_and_host_ping_each_other_through_a_tap() {
    if skip() {
        return;
    }
    let ns = NetNs::new().expect("namespace");
    let tap = ns.tap(Some("10.99.1.1/24")).expect("tap");
    let net = format!("tap={tap},mac=52:54:00:12:34:56");
    let mut vm =
        GuestVm::start_in(&ns, &["--net", &net, "--cmdline", "ip=10.99.1.2/24"]).expect("start");
    let ready = vm.wait_ready(BOOT).expect("ready");
    assert_eq!(number(&ready, "net"), 1, "{ready}");
    let info = vm.command("net", "NET ", CMD).expect("net");
    assert!(
        info.starts_with("NET OK mac=52:54:00:12:34:56 ip=10.99.1.2/24"),
        "{info}"
    );

    let ping = vm
        .command("ping 10.99.1.1 3", "PING OK", CMD)
        .expect("guest pings host");
    assert_eq!(number(&ping, "received"), 3, "{ping}");

    let out = ns
        .command("ping")
        .args(["-c", "3", "-W", "5", "10.99.1.2"])
        .output()
        .expect("run ping (iputils-ping)");
    assert!(
        out.status.success(),
        "the host could not ping the guest: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    power_off(vm);
}

#[test]
fn two_guests_on_one_bridge_ping_each_other() {
    if skip() {
        return;
    }
    let ns = NetNs::new().expect("namespace");
    let bridge = ns.bridge(None).expect("bridge");
    let mut vms = Vec::new();
    for (i, ip) in ["10.99.2.2/24", "10.99.2.3/24"].iter().enumerate() {
        let tap = ns.tap(None).expect("tap");
        ns.attach(&tap, &bridge).expect("attach");
        let net = format!("tap={tap},mac=52:54:00:00:02:0{i}");
        let cmdline = format!("ip={ip}");
        let mut vm =
            GuestVm::start_in(&ns, &["--net", &net, "--cmdline", &cmdline]).expect("start");
        vm.wait_ready(BOOT).expect("ready");
        vms.push(vm);
    }
    let ping = vms[0]
        .command("ping 10.99.2.3 3", "PING OK", CMD)
        .expect("first pings second");
    assert_eq!(number(&ping, "received"), 3, "{ping}");
    let back = vms[1]
        .command("ping 10.99.2.2 2", "PING OK", CMD)
        .expect("second pings first");
    assert_eq!(number(&back, "received"), 2, "{back}");
    for vm in vms {
        power_off(vm);
    }
}
