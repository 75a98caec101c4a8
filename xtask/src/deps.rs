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

/// A `protoc` for crates whose build scripts need one (etcd-client through
/// prost-build; raft-proto checks one it is given): a small script in
/// `target/tools/` that runs protox, the pure-Rust protobuf compiler
/// (installed from crates.io into cargo's bin folder when missing), and
/// answers `--version` as the protoc release whose language protox
/// implements, since protox has no `--version` and raft-proto's build script
/// insists on parsing one. Returns the script's path, for `PROTOC`.
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
    let tools = crate::root().join("target").join("tools");
    std::fs::create_dir_all(&tools)
        .map_err(|e| format!("could not create {}: {e}", tools.display()))?;
    let script = tools.join("protoc");
    let text = format!(
        "#!/bin/sh\n\
         # Written by cargo xtask: protox standing in for protoc.\n\
         if [ \"$1\" = \"--version\" ]; then echo \"libprotoc 3.21.12 (protox)\"; exit 0; fi\n\
         exec '{}' \"$@\"\n",
        protox.display()
    );
    if std::fs::read_to_string(&script).ok().as_deref() != Some(text.as_str()) {
        std::fs::write(&script, &text)
            .map_err(|e| format!("could not write {}: {e}", script.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("could not make {} executable: {e}", script.display()))?;
    }
    Ok(script)
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
