//! `cargo xtask bench boot`: boot-to-ready time and VMM memory overhead of
//! `neph-vmm` against QEMU (`-M microvm`), the same test guest image, vCPUs
//! and memory, alternating in one run.
//!
//! Boot time is from spawning the process to the guest's ready line on the
//! serial console. Overhead is the process's resident memory minus the
//! resident part of guest RAM (the anonymous mapping of exactly the guest's
//! size, read from `/proc/<pid>/smaps`).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nephele_integration_tests::bench::{Metric, Report, Stats};
use nephele_integration_tests::guest::{GuestVm, guest_image, qemu_microvm, workspace_binary};

const MEMORY_MIB: u64 = 256;
const CPUS: u32 = 1;

fn main() -> anyhow::Result<()> {
    let boots: usize = std::env::args()
        .skip_while(|a| a != "--boots")
        .nth(1)
        .map(|n| n.parse())
        .transpose()
        .context("--boots takes a number")?
        .unwrap_or(20);
    if boots < 10 {
        bail!("at least 10 boots each, got --boots {boots}");
    }
    let image = guest_image();
    let vmm = workspace_binary("neph-vmm");
    println!(
        "boot: {boots} boots each, alternating; guest {} ({CPUS} vCPU, {MEMORY_MIB} MiB)",
        image.display()
    );

    let mut ours = Samples::default();
    let mut peer = Samples::default();
    for _ in 0..boots {
        ours.add(boot_once(neph_vmm(&vmm, &image))?);
        peer.add(boot_once(qemu_microvm(&image, MEMORY_MIB, CPUS))?);
    }

    let (o, p) = (ours.stats("neph-vmm")?, peer.stats("qemu")?);
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>14}",
        "vmm", "min ms", "median ms", "max ms", "overhead MiB"
    );
    for (name, s, overhead) in [
        ("neph-vmm", o, ours.overhead()),
        ("qemu", p, peer.overhead()),
    ] {
        println!(
            "{name:<10} {:>10.2} {:>10.2} {:>10.2} {:>14.2}",
            s.min, s.median, s.max, overhead
        );
    }
    println!();
    let mut report = Report::new("boot");
    report.push(Metric::versus(
        "boot_ms_median",
        "ms",
        o.median,
        "qemu",
        p.median,
    ));
    report.push(Metric::versus("boot_ms_min", "ms", o.min, "qemu", p.min));
    report.push(Metric::versus(
        "overhead_mib",
        "MiB",
        ours.overhead(),
        "qemu",
        peer.overhead(),
    ));
    report.print();
    Ok(())
}

fn neph_vmm(vmm: &PathBuf, image: &PathBuf) -> Command {
    let mut cmd = Command::new(vmm);
    // QEMU's microvm here has no PCI devices, so neither has ours: the
    // guest then does the same work under both.
    cmd.arg("--kernel")
        .arg(image)
        .arg("--no-rng")
        .args(["--cpus", &CPUS.to_string()])
        .args(["--memory", &MEMORY_MIB.to_string()]);
    cmd
}

/// One boot: milliseconds to the ready line, and overhead in MiB.
fn boot_once(cmd: Command) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    let mut vm = GuestVm::spawn(cmd)?;
    vm.wait_ready(Duration::from_secs(30))?;
    let boot_ms = started.elapsed().as_secs_f64() * 1000.0;
    let overhead = overhead_mib(vm.pid(), MEMORY_MIB)
        .with_context(|| format!("could not read the memory of pid {}", vm.pid()))?;
    Ok((boot_ms, overhead))
}

/// Resident memory of `pid` beyond the resident part of guest RAM.
fn overhead_mib(pid: u32, guest_mib: u64) -> anyhow::Result<f64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let guest_kib = guest_mib * 1024;
    let mut total_kib = 0u64;
    let mut guest_rss_kib = 0u64;
    let mut size_kib = 0u64;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Size:"), Some(v)) => size_kib = v.parse().unwrap_or(0),
            (Some("Rss:"), Some(v)) => {
                let rss: u64 = v.parse().unwrap_or(0);
                total_kib += rss;
                // Guest RAM: one mapping of the guest's size (QEMU may add a
                // little alignment).
                if (guest_kib..=guest_kib + 4096).contains(&size_kib) {
                    guest_rss_kib = guest_rss_kib.max(rss);
                }
            }
            _ => {}
        }
    }
    Ok((total_kib.saturating_sub(guest_rss_kib)) as f64 / 1024.0)
}

#[derive(Default)]
struct Samples {
    boot_ms: Vec<f64>,
    overhead_mib: Vec<f64>,
}

impl Samples {
    fn add(&mut self, (boot_ms, overhead): (f64, f64)) {
        self.boot_ms.push(boot_ms);
        self.overhead_mib.push(overhead);
    }

    fn stats(&self, who: &str) -> anyhow::Result<Stats> {
        Stats::of(&self.boot_ms).with_context(|| format!("no boots of {who}"))
    }

    fn overhead(&self) -> f64 {
        Stats::of(&self.overhead_mib).map_or(0.0, |s| s.median)
    }
}
