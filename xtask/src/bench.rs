//! `cargo xtask bench <name>`: each benchmark is a release-built binary that
//! runs ours and the peer side by side, prints a readable table and ends with
//! one `BENCH {json}` line (format in PRODUCT.md).

use crate::{cargo, exec};

/// `(name, package, binary)` of every benchmark that exists so far.
const BENCHES: &[(&str, &str, &str)] = &[("scheduler", "nephele-scheduler", "bench-scheduler")];

/// Benchmarks the product brief names that are not written yet.
const PLANNED: &[&str] = &["boot", "migration", "store", "provision"];

pub fn run(args: &[String]) -> Result<(), String> {
    let Some(name) = args.first() else {
        return Err(format!(
            "which benchmark? one of: {}",
            BENCHES.iter().map(|b| b.0).collect::<Vec<_>>().join(", ")
        ));
    };
    if let Some((_, package, bin)) = BENCHES.iter().find(|b| b.0 == name) {
        return exec(
            cargo()
                .args([
                    "run",
                    "--release",
                    "--locked",
                    "-p",
                    package,
                    "--bin",
                    bin,
                    "--",
                ])
                .args(&args[1..]),
        );
    }
    if PLANNED.contains(&name.as_str()) {
        return Err(format!(
            "benchmark `{name}` is not written yet (see the issues)"
        ));
    }
    Err(format!("unknown benchmark `{name}`"))
}
