//! The fencing lease on the control socket: a renewed lease keeps the guest
//! running; a lapsed one pauses every vCPU and reports `fenced`; a later
//! lease does not resume by itself; `resume` needs an unexpired lease;
//! `shutdown` is refused while fenced and `stop` still works.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{Scratch, Vmm, programs};
use neph_vmm::vm::monotonic_ms;

const TIMEOUT: Duration = Duration::from_secs(20);

fn read_some(s: &mut UnixStream, within: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) => buf[..n].to_vec(),
        Err(_) => Vec::new(),
    }
}

/// Reads the console until `needle` arrives (true) or `within` passes.
fn read_until(s: &mut UnixStream, needle: &[u8], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        seen.extend(read_some(s, Duration::from_millis(100)));
        if seen.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

fn lease(c: &mut UnixStream, in_ms: u64) -> serde_json::Value {
    let until = monotonic_ms() + in_ms;
    common::api(c, &format!(r#"{{"cmd":"lease","until_ms":{until}}}"#))
}

#[test]
fn a_lapsed_lease_fences_the_vm_until_the_agent_resumes_it() {
    if !common::kvm_or_skip("a_lapsed_lease_fences_the_vm_until_the_agent_resumes_it") {
        return;
    }
    let s = Scratch::new();
    let guest = s.guest(programs::WAIT);
    let (cs, api) = (s.path("console.sock"), s.path("api.sock"));
    let mut vmm = Vmm::spawn(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--console-socket",
        cs.to_str().unwrap(),
        "--api-socket",
        api.to_str().unwrap(),
    ]);
    assert!(vmm.wait_for("W\n", TIMEOUT), "no banner: {}", vmm.text());
    let mut console = common::connect(&cs, TIMEOUT);
    let mut c = common::connect(&api, TIMEOUT);

    let st = common::api(&mut c, r#"{"cmd":"status"}"#);
    assert_eq!(st["status"]["fenced"], false, "{st}");
    assert!(st["status"].get("lease_until_ms").is_none(), "{st}");

    // Renewed every 100 ms, a 300 ms lease keeps the guest running well
    // past its first deadline.
    assert_eq!(lease(&mut c, 300)["ok"], true);
    let renewing = Instant::now();
    while renewing.elapsed() < Duration::from_millis(900) {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(lease(&mut c, 300)["ok"], true);
    }
    let st = common::api(&mut c, r#"{"cmd":"status"}"#);
    assert_eq!(st["status"]["state"], "running", "{st}");
    assert_eq!(st["status"]["fenced"], false, "{st}");
    assert!(st["status"]["lease_until_ms"].as_u64().unwrap() > monotonic_ms());
    console.write_all(b"a").unwrap();
    // (The end of the banner may still arrive first.)
    assert!(
        read_until(&mut console, b"a", TIMEOUT),
        "no echo under lease"
    );

    // Not renewed: the VM fences itself.
    let lapsed_at = monotonic_ms() + 300;
    assert_eq!(
        common::api(
            &mut c,
            &format!(r#"{{"cmd":"lease","until_ms":{lapsed_at}}}"#)
        )["ok"],
        true
    );
    let deadline = Instant::now() + TIMEOUT;
    let st = loop {
        let st = common::api(&mut c, r#"{"cmd":"status"}"#);
        if st["status"]["fenced"] == true || Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(monotonic_ms() >= lapsed_at, "fenced before the deadline");
    assert_eq!(st["status"]["fenced"], true, "{st}");
    assert_eq!(st["status"]["state"], "paused", "{st}");
    console.write_all(b"b").unwrap();
    assert!(
        read_some(&mut console, Duration::from_millis(300)).is_empty(),
        "a fenced guest echoed"
    );

    // Fenced: no resume without a lease, no graceful shutdown.
    let r = common::api(&mut c, r#"{"cmd":"resume"}"#);
    assert_eq!(r["error"]["code"], "INVALID_STATE", "{r}");
    let r = common::api(&mut c, r#"{"cmd":"shutdown","timeout_ms":100}"#);
    assert_eq!(r["error"]["code"], "INVALID_STATE", "{r}");

    // A new lease alone does not resume it.
    assert_eq!(lease(&mut c, 10_000)["ok"], true);
    std::thread::sleep(Duration::from_millis(200));
    let st = common::api(&mut c, r#"{"cmd":"status"}"#);
    assert_eq!(st["status"]["fenced"], true, "{st}");
    assert_eq!(st["status"]["state"], "paused", "{st}");
    assert!(
        read_some(&mut console, Duration::from_millis(200)).is_empty(),
        "a fenced guest echoed after a new lease"
    );

    // The agent resumes it: the input typed while fenced is echoed now.
    assert_eq!(common::api(&mut c, r#"{"cmd":"resume"}"#)["ok"], true);
    assert!(
        read_until(&mut console, b"b", TIMEOUT),
        "no echo after resume"
    );
    let st = common::api(&mut c, r#"{"cmd":"status"}"#);
    assert_eq!(st["status"]["fenced"], false, "{st}");
    assert_eq!(st["status"]["state"], "running", "{st}");

    // A lease in the past fences at once; `stop` still ends it.
    assert_eq!(
        common::api(&mut c, r#"{"cmd":"lease","until_ms":1}"#)["ok"],
        true
    );
    let st = common::api(&mut c, r#"{"cmd":"status"}"#);
    assert_eq!(st["status"]["fenced"], true, "{st}");
    assert_eq!(common::api(&mut c, r#"{"cmd":"stop"}"#)["ok"], true);
    let status = vmm.wait_exit(TIMEOUT).expect("not stopped");
    assert!(status.success());
}

#[test]
fn bad_lease_requests_are_refused() {
    if !common::kvm_or_skip("bad_lease_requests_are_refused") {
        return;
    }
    let s = Scratch::new();
    let guest = s.guest(programs::HALT);
    let api = s.path("api.sock");
    let _vmm = Vmm::spawn(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--api-socket",
        api.to_str().unwrap(),
    ]);
    let mut c = common::connect(&api, TIMEOUT);
    for bad in [
        r#"{"cmd":"lease"}"#,
        r#"{"cmd":"lease","until_ms":"soon"}"#,
        r#"{"cmd":"lease","until_ms":-5}"#,
        r#"{"cmd":"lease","until_ms":1,"extra":2}"#,
    ] {
        let r = common::api(&mut c, bad);
        assert_eq!(r["error"]["code"], "BAD_REQUEST", "{bad}: {r}");
    }
    // The largest deadline is a valid (distant) one, not an overflow.
    let r = common::api(&mut c, r#"{"cmd":"lease","until_ms":18446744073709551615}"#);
    assert_eq!(r["ok"], true, "{r}");
    let st = common::api(&mut c, r#"{"cmd":"status"}"#);
    assert_eq!(st["status"]["fenced"], false, "{st}");
    assert_eq!(st["status"]["state"], "running", "{st}");
}
