//! `cargo xtask fuzz [--seconds N] [TARGET...]`: coverage-guided fuzzing of
//! every fuzz target with AFL++ (through afl.rs, which works on stable
//! Rust: `cargo afl build` instruments with LLVM's sanitizer-coverage
//! passes, no nightly flag), N seconds each (default 60).
//!
//! Steps: install `cargo-afl` from crates.io if missing and build its AFL++
//! runtime (`cargo afl config --build`, once per toolchain); build the
//! `fuzz/` crate instrumented into `target/fuzz/`, with the workspace's
//! lock file; create the tap `nephfuzz0` for `virtio_net` (skipped, said
//! so, when no tap can be made); for each target write its seeds plus its
//! saved regression inputs into `target/fuzz/in/<target>/` and run
//! `afl-fuzz -V N` into `target/fuzz/out/<target>/`; print one line per
//! target (execs, execs/s, corpus, edges, crashes, hangs); copy every crash
//! and hang input to `target/fuzz-crashes/<target>/` (as
//! `crash-<unix time>-id-NNNNNN`). Exits non-zero if any target crashed or
//! hung. Replay a saved input with `target/fuzz/release/nephele-fuzz run
//! TARGET FILE`, then fix the code and add the file under the crate's
//! `tests/fuzz-regressions/<target>/`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{cargo, exec, root};

/// The tap the `virtio_net` target writes frames to.
const TAP: &str = "nephfuzz0";

/// Where each crate keeps the inputs that once broke one of its targets.
const REGRESSION_DIRS: &[&str] = &[
    "compute-node/vmm/tests/fuzz-regressions",
    "controller/state/tests/fuzz-regressions",
];

struct Options {
    seconds: u64,
    only: Vec<String>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        seconds: 60,
        only: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let v = it.next().ok_or("--seconds needs a number")?;
                o.seconds = v
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("--seconds {v} is not a positive number"))?;
            }
            flag if flag.starts_with('-') => return Err(format!("unknown option {flag}")),
            name => o.only.push(name.to_owned()),
        }
    }
    Ok(o)
}

/// `cargo afl`, installed if missing, with its AFL++ runtime built.
fn ensure_afl() -> Result<(), String> {
    let has = cargo()
        .args(["afl", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has {
        eprintln!("xtask: installing cargo-afl from crates.io");
        exec(cargo().args(["install", "--locked", "cargo-afl"]))?;
    }
    // Builds AFL++ from the sources bundled in the crate, once per rustc.
    let out = cargo()
        .args(["afl", "config", "--build"])
        .output()
        .map_err(|e| format!("could not run cargo afl config: {e}"))?;
    let text = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || text.contains("already built") {
        Ok(())
    } else {
        Err(format!("cargo afl config --build failed:\n{text}"))
    }
}

fn target_dir() -> PathBuf {
    root().join("target/fuzz")
}

fn binary() -> PathBuf {
    target_dir().join("release/nephele-fuzz")
}

/// Builds the harness with the workspace's dependency versions: its lock
/// file starts as a copy of the workspace's (cargo then adds afl.rs's few
/// own dependencies), so it never drifts from what the suite tests.
fn build() -> Result<(), String> {
    let lock = root().join("fuzz/Cargo.lock");
    fs::copy(root().join("Cargo.lock"), &lock)
        .map_err(|e| format!("cannot copy the lock file to {}: {e}", lock.display()))?;
    exec(
        cargo()
            .current_dir(root().join("fuzz"))
            .args(["afl", "build", "--release"])
            .env("CARGO_TARGET_DIR", target_dir()),
    )
}

fn targets() -> Result<Vec<String>, String> {
    let out = Command::new(binary())
        .arg("list")
        .output()
        .map_err(|e| format!("could not run {}: {e}", binary().display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// The tap for `virtio_net`, removed when dropped.
struct TempTap;

impl TempTap {
    /// `None` when this machine cannot make one.
    fn create() -> Option<Self> {
        if Path::new("/sys/class/net").join(TAP).exists() {
            return Some(Self);
        }
        Command::new("ip")
            .args(["tuntap", "add", "dev", TAP, "mode", "tap"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            .then_some(Self)
    }
}

impl Drop for TempTap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", TAP])
            .stderr(Stdio::null())
            .status();
    }
}

/// The seeds and saved regression inputs of `name`, in `dir`.
fn corpus(name: &str, dir: &Path) -> Result<(), String> {
    let _ = fs::remove_dir_all(dir);
    let d = dir.display().to_string();
    exec(Command::new(binary()).args(["seeds", name, &d]))?;
    for base in REGRESSION_DIRS {
        let Ok(entries) = fs::read_dir(root().join(base).join(name)) else {
            continue;
        };
        for e in entries.flatten().filter(|e| e.path().is_file()) {
            let to = dir.join(format!("regression-{}", e.file_name().to_string_lossy()));
            fs::copy(e.path(), &to).map_err(|err| format!("cannot copy {to:?}: {err}"))?;
        }
    }
    Ok(())
}

/// What one run found.
struct Outcome {
    stats: BTreeMap<String, String>,
    findings: Vec<PathBuf>,
}

fn stat<'a>(o: &'a Outcome, key: &str) -> &'a str {
    o.stats.get(key).map_or("?", String::as_str)
}

fn fuzz_one(name: &str, seconds: u64, tap: bool) -> Result<Outcome, String> {
    let input = target_dir().join("in").join(name);
    let output = target_dir().join("out").join(name);
    corpus(name, &input)?;
    let _ = fs::remove_dir_all(&output);
    fs::create_dir_all(&output).map_err(|e| format!("cannot create {output:?}: {e}"))?;
    let log = fs::File::create(output.join("afl.log"))
        .map_err(|e| format!("cannot create the log of {name}: {e}"))?;
    let mut cmd = cargo();
    cmd.args(["afl", "fuzz", "-V", &seconds.to_string(), "-t", "2000"])
        .arg("-i")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .arg("--")
        .arg(binary())
        .arg(name)
        .env("AFL_NO_UI", "1")
        .env("AFL_SKIP_CPUFREQ", "1")
        .env("AFL_NO_AFFINITY", "1")
        .env("AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    if tap {
        cmd.env("NEPH_FUZZ_TAP", TAP);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("could not start afl-fuzz: {e}"))?;
    // afl-fuzz stops itself after -V seconds of fuzzing; calibration and a
    // stuck run are bounded here.
    let deadline = Instant::now() + Duration::from_secs(seconds + 120);
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().map_err(|e| e.to_string())?;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stats_file = output.join("default/fuzzer_stats");
    let Ok(text) = fs::read_to_string(&stats_file) else {
        return Err(format!(
            "afl-fuzz on {name} ended ({status}) without statistics; see {}",
            output.join("afl.log").display()
        ));
    };
    let stats = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let saved = root().join("target/fuzz-crashes").join(name);
    // Runs never overwrite each other's findings.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut findings = Vec::new();
    for (kind, dir) in [("crash", "crashes"), ("hang", "hangs")] {
        let Ok(entries) = fs::read_dir(output.join("default").join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            if !file.starts_with("id:") {
                continue;
            }
            fs::create_dir_all(&saved).map_err(|err| format!("cannot create {saved:?}: {err}"))?;
            let id = file.split(',').next().unwrap_or("id").replace(':', "-");
            let to = saved.join(format!("{kind}-{run}-{id}"));
            fs::copy(e.path(), &to).map_err(|err| format!("cannot copy {to:?}: {err}"))?;
            findings.push(to);
        }
    }
    Ok(Outcome { stats, findings })
}

/// The `fuzz` task.
pub fn run(args: &[String]) -> Result<(), String> {
    let opts = parse(args)?;
    ensure_afl()?;
    build()?;
    let all = targets()?;
    for name in &opts.only {
        if !all.contains(name) {
            return Err(format!(
                "unknown fuzz target {name} (targets: {})",
                all.join(", ")
            ));
        }
    }
    let chosen: Vec<&String> = all
        .iter()
        .filter(|n| opts.only.is_empty() || opts.only.contains(n))
        .collect();
    let tap_guard = if chosen.iter().any(|n| *n == "virtio_net") {
        TempTap::create()
    } else {
        None
    };
    let tap = tap_guard.is_some();
    let mut report = Vec::new();
    let mut failed = Vec::new();
    for name in chosen {
        if name == "virtio_net" && !tap {
            report.push(format!(
                "{name:<18} SKIPPED: cannot create the tap {TAP} (needs root and ip)"
            ));
            continue;
        }
        eprintln!("xtask: fuzzing {name} for {} s", opts.seconds);
        let o = match fuzz_one(name, opts.seconds, tap) {
            Ok(o) => o,
            Err(e) => {
                failed.push(name.clone());
                report.push(format!("{name:<18} ERROR: {e}"));
                continue;
            }
        };
        report.push(format!(
            "{name:<18} execs {:>9}  execs/s {:>8}  corpus {:>5}  edges {:>5}  crashes {}  hangs {}",
            stat(&o, "execs_done"),
            stat(&o, "execs_per_sec"),
            stat(&o, "corpus_count"),
            stat(&o, "edges_found"),
            stat(&o, "saved_crashes"),
            stat(&o, "saved_hangs"),
        ));
        if !o.findings.is_empty() {
            failed.push(name.clone());
            for f in &o.findings {
                report.push(format!("    saved {}", f.display()));
            }
        }
    }
    drop(tap_guard);
    println!("fuzz: {} s per target", opts.seconds);
    for line in &report {
        println!("{line}");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fuzz targets failed: {} (replay: target/fuzz/release/nephele-fuzz run TARGET FILE)",
            failed.join(", ")
        ))
    }
}
