//! `cargo xtask bench <name>`: each benchmark is a release-built binary that
//! runs ours and the peer side by side, prints a readable table and ends with
//! one `BENCH {json}` line (format in PRODUCT.md).

use crate::{cargo, deps, exec, guest};

/// A benchmark: the binary that runs it and what it needs first.
struct Bench {
    name: &'static str,
    package: &'static str,
    binary: &'static str,
    /// `(command, Debian package)` for the peer it runs beside ours.
    peer_commands: &'static [(&'static str, &'static str)],
    /// Workspace binaries it drives, built in release mode first.
    drives: &'static [&'static str],
    /// `(package, example, features)` it drives, built in release mode first.
    examples: &'static [(&'static str, &'static str, &'static str)],
    needs_guest: bool,
}

const BENCHES: &[Bench] = &[
    Bench {
        name: "boot",
        package: "nephele-integration-tests",
        binary: "bench-boot",
        peer_commands: &[("qemu-system-x86_64", "qemu-system-x86")],
        drives: &["neph-vmm"],
        examples: &[],
        needs_guest: true,
    },
    Bench {
        name: "migration",
        package: "nephele-integration-tests",
        binary: "bench-migration",
        peer_commands: &[("qemu-system-x86_64", "qemu-system-x86")],
        drives: &["neph-vmm"],
        examples: &[],
        needs_guest: true,
    },
    Bench {
        name: "store",
        package: "nephele-integration-tests",
        binary: "bench-store",
        peer_commands: &[("etcd", "etcd-server")],
        drives: &["neph-controller"],
        examples: &[("neph-controller", "store_bench", "etcd")],
        needs_guest: false,
    },
    Bench {
        name: "provision",
        package: "nephele-integration-tests",
        binary: "bench-provision",
        peer_commands: &[],
        drives: &["neph", "neph-controller", "neph-node", "neph-vmm"],
        examples: &[],
        needs_guest: true,
    },
    Bench {
        name: "scheduler",
        package: "nephele-scheduler",
        binary: "bench-scheduler",
        peer_commands: &[],
        drives: &[],
        examples: &[],
        needs_guest: false,
    },
];

pub fn run(args: &[String]) -> Result<(), String> {
    let names = || {
        BENCHES
            .iter()
            .map(|b| b.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(name) = args.first() else {
        return Err(format!("which benchmark? one of: {}", names()));
    };
    let Some(bench) = BENCHES.iter().find(|b| b.name == name) else {
        return Err(format!("unknown benchmark `{name}`; one of: {}", names()));
    };
    deps::ensure_commands(bench.peer_commands)?;
    if bench.needs_guest {
        guest::build()?;
    }
    let protoc = deps::ensure_protoc()?;
    for package in bench.drives {
        exec(
            cargo()
                .args(["build", "--release", "--locked", "-p", package])
                .env("PROTOC", &protoc),
        )?;
    }
    for (package, example, features) in bench.examples {
        exec(
            cargo()
                .args(["build", "--release", "--locked", "-p", package])
                .args(["--example", example, "--features", features])
                .env("PROTOC", &protoc),
        )?;
    }
    exec(
        cargo()
            .args(["run", "--release", "--locked", "-p", bench.package])
            .args(["--bin", bench.binary, "--"])
            .args(&args[1..]),
    )
}
