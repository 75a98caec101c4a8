//! Installs what a task needs and the machine lacks: Debian packages through
//! `apt-get`, cargo tools through `cargo install` (crates.io). Nothing else is
//! downloaded. Each check is cheap, so tasks call these every time.

use std::process::{Command, Stdio};

use crate::exec;

/// Debian packages the test suite uses: `ip` for namespaces, taps and
/// bridges, `ping` to reach guests from the host side, a real `etcd` for the
/// etcd state-store backend.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    ("etcd", "etcd-server"),
];

/// Debian packages `cargo xtask up` uses.
pub const UP_PACKAGES: &[(&str, &str)] = &[("ip", "iproute2")];

/// Makes sure everything `cargo xtask test` needs is installed.
pub fn ensure_for_tests() -> Result<(), String> {
    ensure_commands(TEST_PACKAGES)?;
    ensure_nextest()
}

/// Makes sure each `(command, package)` pair has its command on `PATH`,
/// installing the missing packages with one `apt-get install`.
pub fn ensure_commands(wanted: &[(&str, &str)]) -> Result<(), String> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(command, _)| !has_command(command))
        .map(|(_, package)| *package)
        .collect();
    apt_install(&missing)
}

fn apt_install(missing: &[&str]) -> Result<(), String> {
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    exec(Command::new("apt-get").arg("update").arg("-qq"))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// A `protoc` for crates whose build scripts need one (etcd-client): the
/// pure-Rust protox compiler's command-line tool, installed from crates.io
/// into cargo's bin folder when missing. Returns its path.
pub fn ensure_protoc() -> Result<std::path::PathBuf, String> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set")?;
    let protox = cargo_home.join("bin").join("protox");
    if !protox.is_file() {
        eprintln!("xtask: installing protox (a protoc stand-in) from crates.io");
        exec(crate::cargo().args(["install", "--locked", "protox", "--features", "bin"]))?;
    }
    Ok(protox)
}

fn ensure_nextest() -> Result<(), String> {
    let present = crate::cargo()
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-nextest from crates.io");
    exec(crate::cargo().args(["install", "--locked", "cargo-nextest"]))
}

/// Whether `name` is an executable on `PATH`.
pub fn has_command(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            let candidate = dir.join(name);
            candidate.is_file()
        })
    })
}
