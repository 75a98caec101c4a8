//! The VMM sandbox end to end (issue 7): the test guest's workloads under
//! every thread's seccomp filter, a forbidden system call on a vCPU or the
//! run loop stopping the VMM with a message (the hidden `--seccomp-probe`
//! mode, not a weakened filter), the privilege drop and the cgroup limits.
//!
//! Each test needs root and `/dev/kvm`; without them it prints why and
//! returns. The cgroup test also prints why and returns on a host without
//! memory and cpu controllers.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use neph_vmm::sandbox::cgroup;
use nephele_integration_tests::guest::{
    GuestVm, guest_image, skip_without_kvm as skip, workspace_binary,
};
use nephele_integration_tests::migration;

const BOOT: Duration = Duration::from_secs(30);
const CMD: Duration = Duration::from_secs(20);

fn power_off(mut vm: GuestVm) {
    vm.command("poweroff", "POWEROFF", CMD).expect("poweroff");
    let status = vm.wait_exit(BOOT).expect("neph-vmm exits after poweroff");
    assert!(status.success(), "poweroff must exit 0, got {status}");
}

fn control(socket: &Path, request: &str) -> serde_json::Value {
    migration::control(socket, request).expect("control request")
}

/// `key:` of every thread of `pid`, with the thread's name.
fn thread_field(pid: u32, key: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let dir = task.expect("task").path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        if let Some(v) = status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
        {
            out.push((name.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

#[test]
fn the_guest_runs_its_workloads_with_every_thread_filtered() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 8 << 20]).expect("disk");
    let socket = dir.path().join("api.sock");
    let (disk_arg, socket_arg) = (disk.display().to_string(), socket.display().to_string());
    let mut vm = GuestVm::start(&[
        "--seccomp",
        "enforce",
        "--cpus",
        "2",
        "--disk",
        &disk_arg,
        "--api-socket",
        &socket_arg,
    ])
    .expect("start");
    vm.wait_ready(BOOT).expect("ready");
    // Every thread, the run loop included, is in seccomp filter mode (2).
    let modes = thread_field(vm.pid(), "Seccomp");
    assert!(modes.len() >= 4, "{modes:?}");
    for (name, mode) in &modes {
        assert_eq!(mode, "2", "thread {name} has no seccomp filter: {modes:?}");
    }
    let w = vm
        .command("diskwrite 10 100 7", "DISKWRITE ", CMD)
        .expect("diskwrite");
    assert!(w.starts_with("DISKWRITE OK"), "{w}");
    let flushed = vm.command("blk flush", "BLK ", CMD).expect("flush");
    assert_eq!(flushed, "BLK OK flush");
    let r = vm
        .command("diskverify 10 100 7", "DISKVERIFY ", CMD)
        .expect("diskverify");
    assert!(r.starts_with("DISKVERIFY OK"), "{r}");
    let rng = vm.command("rng 16", "RNG ", CMD).expect("rng");
    assert!(rng.starts_with("RNG OK"), "{rng}");
    assert_eq!(control(&socket, r#"{"cmd":"pause"}"#)["ok"], true);
    assert_eq!(control(&socket, r#"{"cmd":"metrics"}"#)["ok"], true);
    assert_eq!(control(&socket, r#"{"cmd":"resume"}"#)["ok"], true);
    vm.command("reboot", "REBOOT", CMD).expect("reboot");
    vm.wait_ready(BOOT).expect("second boot");
    // The new boot's threads, started by the filtered run loop, are
    // filtered too.
    for (name, mode) in thread_field(vm.pid(), "Seccomp") {
        assert_eq!(mode, "2", "thread {name} after reboot");
    }
    power_off(vm);
}

/// Starts a VMM with the probe on, its stderr captured; returns it once
/// its control socket answers.
fn start_probed(socket: &Path, console: &Path, probe: bool) -> std::process::Child {
    let mut cmd = Command::new(workspace_binary("neph-vmm"));
    cmd.arg("--kernel")
        .arg(guest_image())
        .arg("--console-log")
        .arg(console)
        .arg("--api-socket")
        .arg(socket)
        .args(["--seccomp", "enforce"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if probe {
        cmd.arg("--seccomp-probe");
    }
    let mut child = cmd.spawn().expect("spawn neph-vmm");
    let deadline = Instant::now() + BOOT;
    loop {
        if migration::control(socket, r#"{"cmd":"status"}"#).is_ok() {
            return child;
        }
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            panic!("neph-vmm did not answer on {}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn killed_by_probe(thread: &str, expect: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("api.sock");
    let console = dir.path().join("console.log");
    let mut child = start_probed(&socket, &console, true);
    // The VMM dies answering, so the request itself fails or gets nothing.
    let _ = migration::control(
        &socket,
        &format!(r#"{{"cmd":"seccomp_probe","thread":"{thread}"}}"#),
    );
    let out = wait_output(&mut child);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(159),
        "the filter must stop the VMM (status 128 + SIGSYS): {}; stderr: {stderr}",
        out.status
    );
    assert!(
        stderr.contains(&format!("the {expect} thread made system call 59")),
        "the VMM must say which thread made which call: {stderr}"
    );
}

fn wait_output(child: &mut std::process::Child) -> std::process::Output {
    let deadline = Instant::now() + CMD;
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait().expect("wait");
    let mut stderr = Vec::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_end(&mut stderr);
    }
    std::process::Output {
        status,
        stdout: Vec::new(),
        stderr,
    }
}

#[test]
fn a_vcpu_thread_making_a_forbidden_call_stops_the_vmm() {
    if skip() {
        return;
    }
    killed_by_probe("vcpu", "vcpu");
}

#[test]
fn the_run_loop_making_a_forbidden_call_stops_the_vmm() {
    if skip() {
        return;
    }
    killed_by_probe("vmm", "vmm");
}

#[test]
fn the_probe_is_refused_without_its_flag() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("api.sock");
    let console = dir.path().join("console.log");
    let mut child = start_probed(&socket, &console, false);
    let answer = control(&socket, r#"{"cmd":"seccomp_probe","thread":"vcpu"}"#);
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["error"]["code"], "FAILED_PRECONDITION", "{answer}");
    assert_eq!(control(&socket, r#"{"cmd":"status"}"#)["ok"], true);
    let _ = control(&socket, r#"{"cmd":"stop"}"#);
    let out = wait_output(&mut child);
    assert!(out.status.success(), "{}", out.status);
}

#[test]
fn the_vmm_drops_to_an_unprivileged_user_and_still_works() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("api.sock");
    let socket_arg = socket.display().to_string();
    let mut vm =
        GuestVm::start(&["--user", "65534:65534", "--api-socket", &socket_arg]).expect("start");
    vm.wait_ready(BOOT).expect("ready");
    for (name, uid) in thread_field(vm.pid(), "Uid") {
        assert_eq!(uid, "65534\t65534\t65534\t65534", "thread {name}");
    }
    for key in ["CapEff", "CapPrm", "CapAmb"] {
        for (name, caps) in thread_field(vm.pid(), key) {
            assert_eq!(caps, "0000000000000000", "{key} of thread {name}");
        }
    }
    let main = thread_field(vm.pid(), "CapBnd");
    assert!(
        main.iter().any(|(_, v)| v == "0000000000000000"),
        "the run loop's bounding set is empty: {main:?}"
    );
    // The control socket bound as root still serves, and a reboot (which
    // reads the kernel again) works as the unprivileged user.
    assert_eq!(control(&socket, r#"{"cmd":"status"}"#)["ok"], true);
    vm.command("reboot", "REBOOT", CMD).expect("reboot");
    vm.wait_ready(BOOT).expect("second boot");
    power_off(vm);
}

#[test]
fn the_vmm_runs_in_its_cgroup_with_the_flavor_limits() {
    if skip() {
        return;
    }
    if let Some(why) = cgroup::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let name = format!("sandbox-test-{}", std::process::id());
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = cgroup::remove(&self.0);
        }
    }
    let _cleanup = Remove(name.clone());
    let mut vm =
        GuestVm::start(&["--cgroup", &name, "--cpus", "2", "--memory", "256"]).expect("start");
    vm.wait_ready(BOOT).expect("ready");
    let pid = vm.pid().to_string();
    let memory = (256 + cgroup::OVERHEAD_MIB) << 20;
    let read = |p: std::path::PathBuf| std::fs::read_to_string(&p).unwrap_or_default();
    match cgroup::placement(&name).expect("placement") {
        cgroup::Placement::V2(dir) => {
            assert_eq!(read(dir.join("memory.max")).trim(), memory.to_string());
            assert_eq!(read(dir.join("cpu.max")).trim(), "200000 100000");
            assert!(read(dir.join("cgroup.procs")).lines().any(|l| l == pid));
        }
        cgroup::Placement::V1 { memory: m, cpu } => {
            assert_eq!(
                read(m.join("memory.limit_in_bytes")).trim(),
                memory.to_string()
            );
            assert_eq!(read(cpu.join("cpu.cfs_quota_us")).trim(), "200000");
            assert_eq!(read(cpu.join("cpu.cfs_period_us")).trim(), "100000");
            for d in [m, cpu] {
                let procs = read(d.join("cgroup.procs"));
                assert!(procs.lines().any(|l| l == pid), "{}: {procs}", d.display());
            }
        }
    }
    power_off(vm);
}
