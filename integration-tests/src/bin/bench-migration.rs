//! `cargo xtask bench migration`: live migration of a 1 GiB test guest on
//! loopback, `neph-vmm` against QEMU (`-M microvm`, `-incoming tcp:`, the
//! same guest image), QEMU once with its bandwidth cap lifted (the peer of
//! the BENCH line) and once with its defaults; three loads: idle, dirtying
//! 64 MiB/s, dirtying as fast as the guest can.
//!
//! Per run: total time (the migrate request to the source's completion),
//! downtime seen inside the guest (the test guest's 1 ms ticker's largest
//! gap, restarted just before the migration), the downtime each VMM
//! reports (ours: source paused until the target acknowledged; QEMU's
//! `downtime` from `query-migrate`), and bytes sent. `--runs N` (default
//! 3) runs per configuration; medians are reported. `--max-downtime-ms N`
//! sets our downtime budget (default: the VMM's, 50 ms; QEMU keeps its
//! 300 ms default limit). A QEMU migration that
//! has not converged after 30 s is cancelled and reported as such.
//! `--load idle|64|max` runs one load only; `--only-ours` skips QEMU (for quick measurements while tuning; the BENCH
//! line then has no peer values). Each of our runs prints its switchover
//! step by step, source and target side (`migrate_status` of both).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nephele_integration_tests::bench::{Metric, Report, Stats};
use nephele_integration_tests::guest::{GuestVm, field, guest_image, qemu_microvm};
use nephele_integration_tests::migration::{control, migrate, start_target};
use nephele_integration_tests::procs::free_port;

const MEMORY_MIB: u64 = 1024;
const WORKING_SET_MIB: u64 = 128;
const BOOT: Duration = Duration::from_secs(60);
const CMD: Duration = Duration::from_secs(30);
const QEMU_GIVE_UP: Duration = Duration::from_secs(30);

#[derive(Clone, Copy)]
struct Load {
    key: &'static str,
    /// `dirty` command, if any.
    dirty: Option<&'static str>,
}

const LOADS: [Load; 3] = [
    Load {
        key: "idle",
        dirty: None,
    },
    Load {
        key: "64",
        dirty: Some("dirty 128 64"),
    },
    Load {
        key: "max",
        dirty: Some("dirty 128 0"),
    },
];

/// One migration's figures (all zero when it did not converge).
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    converged: bool,
    total_ms: f64,
    guest_ms: f64,
    reported_ms: f64,
    sent_mib: f64,
}

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .map(|n| n.parse())
        .transpose()
        .context("--runs takes a number")?
        .unwrap_or(3);
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let budget: Option<u64> = std::env::args()
        .skip_while(|a| a != "--max-downtime-ms")
        .nth(1)
        .map(|n| n.parse())
        .transpose()
        .context("--max-downtime-ms takes a number")?;
    let only_ours = std::env::args().any(|a| a == "--only-ours");
    let only_load: Option<String> = std::env::args().skip_while(|a| a != "--load").nth(1);
    let image = guest_image();
    println!(
        "migration: {runs} run(s) per configuration; guest {} (1 vCPU, {MEMORY_MIB} MiB), \
         working set {WORKING_SET_MIB} MiB",
        image.display()
    );
    let dir = std::env::temp_dir().join(format!("neph-bench-migration-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_all(&dir, runs, budget, only_ours, only_load.as_deref());
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_all(
    dir: &Path,
    runs: usize,
    budget: Option<u64>,
    only_ours: bool,
    only_load: Option<&str>,
) -> anyhow::Result<()> {
    match budget {
        Some(ms) => println!("neph-vmm downtime budget: {ms} ms"),
        None => println!("neph-vmm downtime budget: its default (50 ms)"),
    }
    let mut report = Report::new("migration");
    println!(
        "{:<6} {:<14} {:>9} {:>10} {:>12} {:>12} {:>10}",
        "load", "vmm", "converged", "total ms", "guest gap ms", "reported ms", "sent MiB"
    );
    for load in LOADS {
        if only_load.is_some_and(|k| k != load.key) {
            continue;
        }
        let mut ours = Vec::new();
        let mut uncapped = Vec::new();
        let mut capped = Vec::new();
        for _ in 0..runs {
            ours.push(ours_once(dir, load, budget)?);
            if !only_ours {
                uncapped.push(qemu_once(dir, load, true)?);
                capped.push(qemu_once(dir, load, false)?);
            }
        }
        let o = summarize(load.key, "neph-vmm", &ours);
        if only_ours {
            let k = load.key;
            report.push(Metric::alone(
                &format!("downtime_guest_ms_{k}"),
                "ms",
                o.guest_ms,
            ));
            report.push(Metric::alone(&format!("total_ms_{k}"), "ms", o.total_ms));
            report.push(Metric::alone(
                &format!("downtime_reported_ms_{k}"),
                "ms",
                o.reported_ms,
            ));
            report.push(Metric::alone(&format!("sent_mib_{k}"), "MiB", o.sent_mib));
            continue;
        }
        let u = summarize(load.key, "qemu-uncapped", &uncapped);
        let c = summarize(load.key, "qemu-default", &capped);
        let k = load.key;
        report.push(Metric::versus(
            &format!("downtime_guest_ms_{k}"),
            "ms",
            o.guest_ms,
            "qemu-uncapped",
            u.guest_ms,
        ));
        report.push(Metric::versus(
            &format!("total_ms_{k}"),
            "ms",
            o.total_ms,
            "qemu-uncapped",
            u.total_ms,
        ));
        report.push(Metric::versus(
            &format!("downtime_reported_ms_{k}"),
            "ms",
            o.reported_ms,
            "qemu-uncapped",
            u.reported_ms,
        ));
        report.push(Metric::versus(
            &format!("sent_mib_{k}"),
            "MiB",
            o.sent_mib,
            "qemu-uncapped",
            u.sent_mib,
        ));
        if c.converged {
            report.push(Metric::versus(
                &format!("total_ms_{k}_vs_default"),
                "ms",
                o.total_ms,
                "qemu-default",
                c.total_ms,
            ));
        } else {
            report.push(Metric::alone(
                &format!("qemu_default_converged_{k}"),
                "bool",
                0.0,
            ));
        }
    }
    println!();
    report.print();
    Ok(())
}

/// Medians of the converged runs (a configuration counts as converged when
/// every run did).
fn summarize(load: &str, who: &str, runs: &[Run]) -> Run {
    let ok: Vec<&Run> = runs.iter().filter(|r| r.converged).collect();
    let median = |f: fn(&Run) -> f64| {
        let v: Vec<f64> = ok.iter().map(|r| f(r)).collect();
        Stats::of(&v).map_or(0.0, |s| s.median)
    };
    let r = Run {
        converged: ok.len() == runs.len(),
        total_ms: median(|r| r.total_ms),
        guest_ms: median(|r| r.guest_ms),
        reported_ms: median(|r| r.reported_ms),
        sent_mib: median(|r| r.sent_mib),
    };
    if r.converged {
        println!(
            "{load:<6} {who:<14} {:>9} {:>10.1} {:>12.2} {:>12.2} {:>10.1}",
            "yes", r.total_ms, r.guest_ms, r.reported_ms, r.sent_mib
        );
    } else {
        println!(
            "{load:<6} {who:<14} {:>9} {:>10} {:>12} {:>12} {:>10}",
            format!("{}/{}", ok.len(), runs.len()),
            "-",
            "-",
            "-",
            "-"
        );
    }
    r
}

/// Starts the load and restarts the ticker so its largest gap is the
/// migration's.
fn prepare(vm: &mut GuestVm, load: Load) -> anyhow::Result<()> {
    vm.wait_ready(BOOT)?;
    if let Some(cmd) = load.dirty {
        vm.command(cmd, "DIRTY OK", CMD)?;
        // The first pass writes zeros into never-touched pages: wait for
        // a full pass so every page it writes is a real change.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = vm.command("dirty status", "DIRTY OK", CMD)?;
            if field(&st, "passes").and_then(|p| p.parse::<u64>().ok()) >= Some(1) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the dirtier did not finish a pass: {st}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    vm.command("ticker stop", "TICKER OK", CMD)?;
    vm.command("ticker start", "TICKER OK", CMD)?;
    Ok(())
}

fn gap_ms(vm: &mut GuestVm) -> anyhow::Result<f64> {
    // QEMU's serial can drop the first bytes typed while its VM starts:
    // get one echo through before asking.
    let mut synced = false;
    for _ in 0..10 {
        if vm
            .command("echo sync", "ECHO sync", Duration::from_millis(500))
            .is_ok()
        {
            synced = true;
            break;
        }
    }
    if !synced {
        bail!("the console of the migrated guest does not answer");
    }
    let report = vm.command("ticker report", "TICKER OK", CMD)?;
    let us: f64 = field(&report, "max_gap_us")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no max_gap_us in {report:?}"))?;
    Ok(us / 1000.0)
}

fn ours_once(dir: &Path, load: Load, budget: Option<u64>) -> anyhow::Result<Run> {
    let sock = dir.join("src.sock");
    let s = sock.display().to_string();
    let mem = MEMORY_MIB.to_string();
    // QEMU's microvm here has no PCI devices, so neither has ours.
    let mut src = GuestVm::start(&["--memory", &mem, "--no-rng", "--api-socket", &s])?;
    prepare(&mut src, load)?;
    let port = free_port()?;
    let dst_sock = dir.join("dst.sock");
    let d = dst_sock.display().to_string();
    // The target pre-builds the VM it is told to expect.
    let mut dst = start_target(port, &["--memory", &mem, "--no-rng", "--api-socket", &d])?;
    let extra = budget.map_or(String::new(), |ms| format!(r#""max_downtime_ms":{ms}"#));
    let out = migrate(
        &sock,
        &format!("127.0.0.1:{port}"),
        &extra,
        Duration::from_secs(120),
    )?;
    if out.state != "completed" {
        bail!("neph-vmm migration ended {}: {}", out.state, out.last);
    }
    let guest_ms = gap_ms(&mut dst)?;
    let _ = src.wait_exit(Duration::from_secs(10));
    let target = control(&dst_sock, r#"{"cmd":"migrate_status"}"#)
        .map(|v| v["migration"]["switchover"].clone())
        .unwrap_or_default();
    println!(
        "  {} run: guest gap {guest_ms:.2} ms, {} rounds, throttle {}%, {:.1} MiB; \
         source {}; target {}",
        load.key,
        out.last["round"],
        out.last["throttle_percent"],
        out.last["bytes_sent"].as_f64().unwrap_or(0.0) / f64::from(1 << 20),
        phases(&out.last["switchover"]),
        phases(&target)
    );
    // A migrated source answers `migrate_status` for a moment before it
    // exits, so the last status is normally the final one.
    let reported = out.last["downtime_us"]
        .as_f64()
        .map(|us| us / 1000.0)
        .or_else(|| out.last["downtime_ms"].as_f64())
        .unwrap_or(f64::NAN);
    Ok(Run {
        converged: true,
        total_ms: out.elapsed.as_secs_f64() * 1000.0,
        guest_ms,
        reported_ms: reported,
        sent_mib: out.last["bytes_sent"].as_f64().unwrap_or(0.0) / f64::from(1 << 20),
    })
}

/// A `switchover` list as `name us, ...`.
fn phases(v: &serde_json::Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|p| format!("{} {}", p["name"].as_str().unwrap_or("?"), p["us"]))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn qemu(image: &Path, qmp: &Path, incoming: Option<u16>) -> Command {
    let mut cmd = qemu_microvm(image, MEMORY_MIB, 1);
    cmd.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if let Some(port) = incoming {
        cmd.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
    }
    cmd
}

/// A QMP connection.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> anyhow::Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).context("QMP socket did not appear");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let writer = stream.try_clone()?;
        let mut q = Self {
            reader: BufReader::new(stream),
            writer,
        };
        q.line()?; // greeting
        q.execute(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    fn line(&mut self) -> anyhow::Result<serde_json::Value> {
        let mut l = String::new();
        if self.reader.read_line(&mut l)? == 0 {
            bail!("QMP closed");
        }
        Ok(serde_json::from_str(&l)?)
    }

    fn execute(&mut self, cmd: &str) -> anyhow::Result<serde_json::Value> {
        self.writer.write_all(format!("{cmd}\n").as_bytes())?;
        loop {
            let v = self.line()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {cmd} failed: {e}");
            }
            return Ok(v["return"].clone());
        }
    }
}

fn qemu_once(dir: &Path, load: Load, uncapped: bool) -> anyhow::Result<Run> {
    let image = guest_image();
    let (qs, qt) = (dir.join("qemu-src.qmp"), dir.join("qemu-dst.qmp"));
    let _ = std::fs::remove_file(&qs);
    let _ = std::fs::remove_file(&qt);
    let mut src = GuestVm::spawn(qemu(&image, &qs, None))?;
    prepare(&mut src, load)?;
    let port = free_port()?;
    let mut dst = GuestVm::spawn(qemu(&image, &qt, Some(port)))?;
    let mut qmp = Qmp::connect(&qs)?;
    let _target_qmp = Qmp::connect(&qt)?;
    if uncapped {
        qmp.execute(
            r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":1099511627776}}"#,
        )?;
    }
    let started = Instant::now();
    qmp.execute(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#
    ))?;
    let info = loop {
        let info = qmp.execute(r#"{"execute":"query-migrate"}"#)?;
        match info["status"].as_str().unwrap_or_default() {
            "completed" => break Some(info),
            "failed" | "cancelled" => bail!("QEMU migration ended: {info}"),
            _ => {}
        }
        if started.elapsed() > QEMU_GIVE_UP {
            let _ = qmp.execute(r#"{"execute":"migrate_cancel"}"#);
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let Some(info) = info else {
        return Ok(Run::default());
    };
    let total_ms = started.elapsed().as_secs_f64() * 1000.0;
    let guest_ms = gap_ms(&mut dst)?;
    drop(src);
    Ok(Run {
        converged: true,
        total_ms,
        guest_ms,
        reported_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        sent_mib: info["ram"]["transferred"].as_f64().unwrap_or(0.0) / f64::from(1 << 20),
    })
}
