//! Running `neph-vmm` with the project's test guest from tests and
//! benchmarks: spawn it, read its serial console line by line, type commands,
//! and kill it when the handle is dropped, whatever the test did.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The line the test guest prints once it is up.
pub const READY_MARKER: &str = "NEPH-GUEST READY";

/// Errors while driving a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error(
        "timed out after {waited:?} waiting for a line containing {wanted:?}; console so far:\n{console}"
    )]
    Timeout {
        wanted: String,
        waited: Duration,
        console: String,
    },
    #[error("the VM exited ({status}) before printing {wanted:?}; console:\n{console}")]
    Exited {
        wanted: String,
        status: String,
        console: String,
    },
    #[error("could not write to the guest console: {0}")]
    Write(std::io::Error),
}

/// A built binary of this workspace (`target/<profile>/<name>`), found next
/// to the running test executable. `cargo xtask test` builds every binary
/// before the suite runs.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // A test runs as target/<profile>/deps/<test>, a benchmark binary as
    // target/<profile>/<bench>: either way the binary is in target/<profile>.
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.join(name)
}

/// The test guest image: `$NEPH_GUEST_IMAGE`, else where `cargo xtask guest`
/// puts it.
pub fn guest_image() -> PathBuf {
    if let Some(path) = std::env::var_os("NEPH_GUEST_IMAGE") {
        return PathBuf::from(path);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("images")
        .join("neph-guest.elf")
}

/// Why guests cannot run here, if they cannot: tests print it and skip.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!(
            "skipped: /dev/kvm cannot be opened ({e}); these tests need KVM and root"
        )),
    }
}

/// QEMU (`qemu-system-x86_64` from Debian) booting `image` the way the
/// benchmarks compare against: `-M microvm`, KVM, the host CPU less
/// `arch-capabilities` (PRODUCT.md), no default devices, serial on stdio.
pub fn qemu_microvm(image: &Path, memory_mib: u64, cpus: u32) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-enable-kvm",
        "-M",
        "microvm",
        "-cpu",
        "host,-arch-capabilities",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
    ])
    .args(["-smp", &cpus.to_string()])
    .args(["-m", &memory_mib.to_string()])
    .arg("-kernel")
    .arg(image);
    cmd
}

/// For tests: prints why KVM guests cannot run here and returns true, so the
/// test can return early (it needs root and `/dev/kvm`).
pub fn skip_without_kvm() -> bool {
    match kvm_unavailable() {
        Some(reason) => {
            eprintln!("{reason}");
            true
        }
        None => false,
    }
}

/// For tests: the number after `key=` in a console line; panics with the
/// line when it is missing.
pub fn number(line: &str, key: &str) -> u64 {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key}= in {line:?}"))
}

/// Why this host's KVM cannot boot a stock Linux kernel, if it cannot: PVM
/// (the `kvm_pvm` module, KVM without VMX/SVM) stops stock kernels on
/// instructions its emulator lacks; hardware KVM (`kvm_intel`, `kvm_amd`)
/// runs them.
pub fn stock_linux_unsupported() -> Option<String> {
    if let Some(reason) = kvm_unavailable() {
        return Some(reason);
    }
    let loaded = |module: &str| Path::new("/sys/module").join(module).exists();
    if loaded("kvm_pvm") {
        return Some(
            "skipped: /dev/kvm here is PVM (kvm_pvm: KVM without VMX/SVM), which cannot boot \
             stock Linux kernels; this test runs on hosts with hardware KVM"
                .into(),
        );
    }
    if !loaded("kvm_intel") && !loaded("kvm_amd") {
        return Some(
            "skipped: neither kvm_intel nor kvm_amd is loaded, so this KVM is not known to \
             run stock Linux kernels"
                .into(),
        );
    }
    None
}

/// The Linux guest built by `cargo xtask image linux`: `$NEPH_LINUX_IMAGE_DIR`
/// (which `cargo xtask test` sets), holding `vmlinuz`, `initramfs.cpio` and
/// `rootfs.ext4`.
pub fn linux_image_dir() -> Option<PathBuf> {
    std::env::var_os("NEPH_LINUX_IMAGE_DIR").map(PathBuf::from)
}

/// A running `neph-vmm` (or any VMM) whose serial console is its stdio.
#[derive(Debug)]
pub struct GuestVm {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    console: Vec<String>,
    exited: Option<ExitStatus>,
}

impl GuestVm {
    /// Starts `neph-vmm` with the test guest and the given extra arguments.
    pub fn start(args: &[&str]) -> Result<Self, GuestError> {
        let mut cmd = Command::new(workspace_binary("neph-vmm"));
        cmd.arg("--kernel").arg(guest_image()).args(args);
        Self::spawn(cmd)
    }

    /// Starts `neph-vmm` with the test guest inside a network namespace.
    pub fn start_in(ns: &crate::netdev::NetNs, args: &[&str]) -> Result<Self, GuestError> {
        let mut cmd = ns.command(workspace_binary("neph-vmm"));
        cmd.arg("--kernel").arg(guest_image()).args(args);
        Self::spawn(cmd)
    }

    /// Starts any command whose stdout is a serial console.
    pub fn spawn(mut cmd: Command) -> Result<Self, GuestError> {
        let program = format!("{:?}", cmd.get_program());
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| GuestError::Spawn { program, source })?;
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stdout);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match reader.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&buf)
                                .trim_end_matches(['\r', '\n'])
                                .to_string();
                            if tx.send(line).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
        Ok(Self {
            child,
            stdin,
            lines,
            console: Vec::new(),
            exited: None,
        })
    }

    /// The process id of the VMM.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a console line containing `wanted` and returns it.
    pub fn wait_for(&mut self, wanted: &str, timeout: Duration) -> Result<String, GuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.console.push(line.clone());
                    if line.contains(wanted) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(GuestError::Timeout {
                        wanted: wanted.to_string(),
                        waited: timeout,
                        console: self.console_text(),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self
                        .wait_exit(Duration::from_secs(5))
                        .map_or_else(|| "still running".to_string(), |s| s.to_string());
                    return Err(GuestError::Exited {
                        wanted: wanted.to_string(),
                        status,
                        console: self.console_text(),
                    });
                }
            }
        }
    }

    /// Waits for the ready marker.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<String, GuestError> {
        self.wait_for(READY_MARKER, timeout)
    }

    /// Types a line into the guest's console.
    pub fn send_line(&mut self, line: &str) -> Result<(), GuestError> {
        let stdin = self.stdin.as_mut().ok_or_else(|| {
            GuestError::Write(std::io::Error::other("the console input is closed"))
        })?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(GuestError::Write)
    }

    /// Types a command and waits for a line containing `wanted`.
    pub fn command(
        &mut self,
        line: &str,
        wanted: &str,
        timeout: Duration,
    ) -> Result<String, GuestError> {
        self.send_line(line)?;
        self.wait_for(wanted, timeout)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exited.is_some() {
            return self.exited;
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = Some(status);
                return self.exited;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Everything the console printed so far, for failure messages.
    pub fn console_text(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.console.push(line);
        }
        self.console.join("\n")
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Parses `key=value` pairs out of a console line such as
/// `NEPH-GUEST READY mem_mib=256 cpus=1`.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_finds_values_by_key() {
        let line = "NEPH-GUEST READY mem_mib=256 cpus=2 cpus_online=1";
        assert_eq!(field(line, "mem_mib"), Some("256"));
        assert_eq!(field(line, "cpus"), Some("2"));
        assert_eq!(field(line, "cpus_online"), Some("1"));
        assert_eq!(field(line, "missing"), None);
    }
}
