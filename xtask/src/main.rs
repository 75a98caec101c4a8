//! Project tasks, run as `cargo xtask <task>`:
//!
//! - `up`: install what is missing, build, start an all-in-one cluster and
//!   boot an instance with its console attached (the README's first command);
//! - `test`: install what is missing, build the test guest, check formatting
//!   and lints, and run the whole suite with nextest (the README's second
//!   command, and what `.ci/run` calls);
//! - `guest`: build the project's test guest image;
//! - `image linux`: build a Linux guest from Debian's packages;
//! - `bench <name>`: run one benchmark, side by side with its peer;
//! - `fuzz [--seconds N]`: run every fuzz target under AFL++ (see `fuzz.rs`).
//!
//! Only `std`: this crate is built before anything else on a fresh machine.

mod bench;
mod deps;
mod fuzz;
mod guest;
mod image;
mod up;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  up                 install what is missing, build, start an all-in-one
                     cluster and boot an instance with its console attached
  test               install what is missing and run the whole test suite
  guest              build the test guest image (target/images/neph-guest.elf)
  image linux        build a Linux guest from Debian's packages (for hosts
                     with hardware KVM)
  bench <name>       run a benchmark: boot | migration | store | scheduler | provision
  fuzz [--seconds N] [TARGET...]
                     coverage-guided fuzzing (AFL++) of every fuzz target,
                     N seconds each (default 60); crashes in target/fuzz-crashes
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("up") => up::run(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("guest") => guest::build().map(|path| println!("{}", path.display())),
        Some("bench") => bench::run(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("image") => image::run(&args[1..]),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown task `{other}`\n\n{USAGE}")),
        None => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the parent of this crate's directory).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command to completion, failing with its command line on error.
pub fn exec(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    eprintln!("+ {shown}");
    let status = cmd
        .status()
        .map_err(|e| format!("could not start {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed with {status}"))
    }
}

/// `cargo` as invoked by this process (respects `$CARGO`).
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Cargo features the suite turns on beyond the defaults: the etcd backend,
/// so that both state stores pass the shared conformance suite.
const TEST_FEATURES: &str = "neph-controller/etcd";

fn test(args: &[String]) -> Result<(), String> {
    deps::ensure_for_tests()?;
    let protoc = deps::ensure_protoc()?;
    let image = guest::build()?;
    let linux = image::build_linux()?;

    // Every cargo command below shares one `PROTOC` so their builds agree.
    let cargo_env = || {
        let mut cmd = cargo();
        cmd.env("PROTOC", &protoc);
        cmd
    };
    exec(cargo_env().args(["fmt", "--all", "--", "--check"]))?;
    exec(
        cargo_env()
            .args(["clippy", "--workspace", "--all-targets", "--locked"])
            .args(["--features", TEST_FEATURES, "--", "-D", "warnings"]),
    )?;
    guest::lint_and_test()?;
    // Tests drive the daemons and the VMM as real processes.
    exec(cargo_env().args([
        "build",
        "--workspace",
        "--bins",
        "--locked",
        "--features",
        TEST_FEATURES,
    ]))?;

    let mut nextest = cargo_env();
    nextest
        .args([
            "nextest",
            "run",
            "--workspace",
            "--locked",
            "--no-fail-fast",
        ])
        .args(["--features", TEST_FEATURES])
        .args(args)
        .env("NEPH_GUEST_IMAGE", &image)
        .env("NEPH_LINUX_IMAGE_DIR", linux.dir());
    if std::env::var_os("CI").is_some() {
        nextest.args(["--profile", "ci"]);
    }
    exec(&mut nextest)
}
