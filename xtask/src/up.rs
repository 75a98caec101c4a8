//! `cargo xtask up`: the README's first command. Installs what is missing
//! (Debian packages through `deps`, the test guest), builds the binaries in
//! release mode, starts an all-in-one local cluster with `neph dev up` (one
//! controller, one compute node, flavors `small`/`medium`, image
//! `test-guest`, profile `dev`), creates the instance `demo` (or starts it
//! again) and attaches its serial console to this terminal.
//!
//! Arguments after `up` go to `neph dev up` (`--controllers N`, `--nodes M`,
//! `--dir DIR`). The cluster keeps running after this command ends; `neph
//! dev down` stops it.
//!
//! The console: `neph instance console demo` (typing goes to the guest)
//! when this `neph` has it; otherwise the console log is followed read-only
//! through the API (`neph instance console-log`), and this says so.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{cargo, deps, exec, guest, root};

/// The instance `up` boots.
const DEMO: &str = "demo";

/// The binaries the local cluster runs.
const BINARIES: &[&str] = &["neph", "neph-controller", "neph-node", "neph-vmm"];

pub fn run(args: &[String]) -> Result<(), String> {
    deps::ensure_commands(deps::UP_PACKAGES)?;
    let protoc = deps::ensure_protoc()?;
    let image = guest::build()?;
    let mut build = cargo();
    build
        .args(["build", "--release", "--locked"])
        .env("PROTOC", &protoc);
    for b in BINARIES {
        build.args(["-p", b]);
    }
    exec(&mut build)?;
    let bin = root().join("target").join("release");
    let neph = bin.join("neph");

    exec(
        Command::new(&neph)
            .args(["dev", "up"])
            .args(args)
            .arg("--bin-dir")
            .arg(&bin)
            .env("NEPH_GUEST_IMAGE", &image),
    )?;

    boot_demo(&neph)?;
    let shown = shown_neph(&bin);
    eprintln!(
        "\nxtask: the local cluster runs in the background; with the `dev` profile:\n\
         \x20   {shown} instance list            # instances (`demo` is yours)\n\
         \x20   {shown} instance console {DEMO}    # its serial console again\n\
         \x20   {shown} dev status               # the processes and their logs\n\
         \x20   {shown} dev down                 # stop everything (add --purge to delete the data)\n"
    );
    attach(&neph)?;
    eprintln!("\nxtask: detached; the cluster still runs (`{shown} dev down` stops it)");
    Ok(())
}

/// How to call `neph` from here: plain `neph` when PATH finds this build.
fn shown_neph(bin: &Path) -> String {
    let on_path = std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| d.canonicalize().ok() == bin.canonicalize().ok())
    });
    if on_path {
        "neph".into()
    } else {
        "target/release/neph".into()
    }
}

fn neph_cmd(neph: &Path) -> Command {
    let mut c = Command::new(neph);
    c.args(["--profile", "dev"]);
    c
}

/// The state of `demo`, or `None` if it does not exist.
fn demo_state(neph: &Path) -> Result<Option<String>, String> {
    let out = neph_cmd(neph)
        .args(["instance", "get", DEMO, "-o", "json"])
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("could not run {}: {e}", neph.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("NOT_FOUND") {
            return Ok(None);
        }
        return Err(format!("neph instance get {DEMO} failed: {}", err.trim()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // `"state": "RUNNING"` in the JSON record; std only, so no parser.
    let state = text
        .split("\"state\"")
        .nth(1)
        .and_then(|rest| rest.split('"').nth(1))
        .unwrap_or("UNKNOWN")
        .to_owned();
    Ok(Some(state))
}

/// Creates `demo`, or starts it if it exists and is stopped.
fn boot_demo(neph: &Path) -> Result<(), String> {
    match demo_state(neph)?.as_deref() {
        None => exec(neph_cmd(neph).args([
            "instance",
            "create",
            DEMO,
            "--flavor",
            "small",
            "--image",
            "test-guest",
            "--wait",
        ])),
        Some("RUNNING") => {
            eprintln!("xtask: instance {DEMO} already runs");
            Ok(())
        }
        Some("STOPPED" | "ERROR") => {
            exec(neph_cmd(neph).args(["instance", "start", DEMO, "--wait"]))
        }
        Some(other) => {
            eprintln!("xtask: instance {DEMO} is {other}");
            Ok(())
        }
    }
}

/// Whether this `neph` has `instance console`.
fn has_console(neph: &Path) -> bool {
    neph_cmd(neph)
        .args(["instance", "console", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Attaches this terminal to `demo`'s console.
fn attach(neph: &Path) -> Result<(), String> {
    if has_console(neph) {
        eprintln!("xtask: attaching to {DEMO}'s serial console: type `help`; detach with Ctrl-]");
        return exec(neph_cmd(neph).args(["instance", "console", DEMO]));
    }
    eprintln!(
        "xtask: this neph has no interactive console yet: following {DEMO}'s console log \
         read-only (Ctrl-C stops following; the instance keeps running)"
    );
    follow_log(neph)
}

/// Prints the console log as it grows, polling the API.
fn follow_log(neph: &Path) -> Result<(), String> {
    let mut shown = 0usize;
    loop {
        let out = neph_cmd(neph)
            .args(["instance", "console-log", DEMO])
            .output()
            .map_err(|e| format!("could not run {}: {e}", neph.display()))?;
        if !out.status.success() {
            return Err(format!(
                "neph instance console-log {DEMO} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let log = out.stdout;
        // The log is a tail: if it shrank or rotated, start over from its
        // end rather than repeat it.
        if log.len() < shown {
            shown = log.len();
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(&log[shown..]);
        let _ = stdout.flush();
        shown = log.len();
        std::thread::sleep(Duration::from_millis(300));
    }
}
