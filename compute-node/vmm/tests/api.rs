//! The control socket and the console socket against a running guest:
//! status, pause/resume (a paused guest does not echo console input, a
//! resumed one does), metrics, malformed requests, graceful shutdown (the
//! guest sees the power button and powers off; one that ignores it is
//! stopped after the timeout), and the console log file.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{Scratch, Vmm, programs};

const TIMEOUT: Duration = Duration::from_secs(20);

fn wait_file_contains(path: &std::path::Path, needle: &str) -> bool {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn read_some(s: &mut std::os::unix::net::UnixStream, within: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) => buf[..n].to_vec(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn control_and_console_sockets_drive_the_guest() {
    if !common::kvm_or_skip("control_and_console_sockets_drive_the_guest") {
        return;
    }
    let s = Scratch::new();
    let guest = s.guest(programs::WAIT);
    let (log, cs, api) = (
        s.path("console.log"),
        s.path("console.sock"),
        s.path("api.sock"),
    );
    let mut vmm = Vmm::spawn(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--console-log",
        log.to_str().unwrap(),
        "--console-socket",
        cs.to_str().unwrap(),
        "--api-socket",
        api.to_str().unwrap(),
    ]);
    assert!(wait_file_contains(&log, "W\n"), "no banner in the log");
    let mut console = common::connect(&cs, TIMEOUT);
    let mut c = common::connect(&api, TIMEOUT);

    console.write_all(b"x").unwrap();
    assert_eq!(read_some(&mut console, TIMEOUT), b"x", "no echo");

    assert_eq!(common::api(&mut c, r#"{"cmd":"pause"}"#)["ok"], true);
    let st = common::api(&mut c, r#"{"cmd":"status"}"#);
    assert_eq!(st["status"]["state"], "paused", "{st}");
    let again = common::api(&mut c, r#"{"cmd":"pause"}"#);
    assert_eq!(again["error"]["code"], "INVALID_STATE", "{again}");
    console.write_all(b"y").unwrap();
    assert!(
        read_some(&mut console, Duration::from_millis(300)).is_empty(),
        "a paused guest echoed"
    );
    assert_eq!(common::api(&mut c, r#"{"cmd":"resume"}"#)["ok"], true);
    assert_eq!(
        read_some(&mut console, TIMEOUT),
        b"y",
        "no echo after resume"
    );

    let m = common::api(&mut c, r#"{"cmd":"metrics"}"#);
    let metrics = &m["metrics"];
    assert_eq!(metrics["vcpus"].as_array().unwrap().len(), 1, "{m}");
    assert!(metrics["vcpus"][0]["tid"].as_i64().unwrap() > 0, "{m}");
    assert!(metrics["rss_bytes"].as_u64().unwrap() > 0, "{m}");
    assert!(metrics["console_bytes"].as_u64().unwrap() >= 4, "{m}");
    assert_eq!(metrics["guest_memory_bytes"].as_u64().unwrap(), 256 << 20);

    let bad = common::api(&mut c, "this is not json");
    assert_eq!(bad["error"]["code"], "BAD_REQUEST", "{bad}");
    let unknown = common::api(&mut c, r#"{"cmd":"explode"}"#);
    assert_eq!(unknown["error"]["code"], "BAD_REQUEST", "{unknown}");

    assert_eq!(
        common::api(&mut c, r#"{"cmd":"shutdown","timeout_ms":15000}"#)["ok"],
        true
    );
    let status = vmm.wait_exit(TIMEOUT).expect("the guest did not power off");
    assert!(status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.ends_with("B\n"), "log: {text:?}");
    assert!(vmm.text().is_empty(), "console went to stdout too");
}

#[test]
fn shutdown_stops_a_guest_that_ignores_the_button() {
    if !common::kvm_or_skip("shutdown_stops_a_guest_that_ignores_the_button") {
        return;
    }
    let s = Scratch::new();
    let guest = s.guest(programs::HALT);
    let api = s.path("api.sock");
    let mut vmm = Vmm::spawn(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--api-socket",
        api.to_str().unwrap(),
    ]);
    let mut c = common::connect(&api, TIMEOUT);
    let started = Instant::now();
    assert_eq!(
        common::api(&mut c, r#"{"cmd":"shutdown","timeout_ms":300}"#)["ok"],
        true
    );
    let st = common::api(&mut c, r#"{"cmd":"status"}"#);
    assert_eq!(st["status"]["state"], "shutting_down", "{st}");
    let status = vmm
        .wait_exit(TIMEOUT)
        .expect("not stopped after the timeout");
    assert!(status.success());
    assert!(started.elapsed() >= Duration::from_millis(300));
}
