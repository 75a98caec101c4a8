//! The AFL++ harness: one binary over every fuzz target of the project.
//! The targets themselves live beside the crates they fuzz, in
//! `compute-node/vmm/tests/fuzz_targets/` and
//! `controller/state/tests/fuzz_targets/`, where the suite also runs them;
//! this crate includes them by path so the coverage-guided runs and the
//! suite execute the same code.
//!
//! ```text
//! nephele-fuzz list                 target names, one a line
//! nephele-fuzz seeds TARGET DIR     writes TARGET's seeds into DIR
//! nephele-fuzz run TARGET FILE...   runs TARGET once on each file
//! nephele-fuzz TARGET               the AFL++ persistent loop (stdin)
//! ```
//!
//! Built and driven by `cargo xtask fuzz` (see `xtask/src/fuzz.rs`); the
//! `virtio_net` target needs an existing tap named by `NEPH_FUZZ_TAP`.

#[path = "../../compute-node/vmm/tests/fuzz_targets/mod.rs"]
mod vmm;

#[path = "../../controller/state/tests/fuzz_targets/mod.rs"]
mod state;

use std::path::Path;
use std::process::ExitCode;

type Target = fn(&[u8]);

fn targets() -> impl Iterator<Item = (&'static str, Target)> {
    vmm::TARGETS.iter().chain(state::TARGETS).copied()
}

fn find(name: &str) -> Option<Target> {
    targets().find(|(n, _)| *n == name).map(|(_, f)| f)
}

fn seeds(name: &str) -> Vec<Vec<u8>> {
    let mut s = vmm::seeds(name);
    s.extend(state::seeds(name));
    s
}

fn write_seeds(name: &str, dir: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let seeds = seeds(name);
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:03}")), s)?;
    }
    Ok(seeds.len())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["list"] => {
            for (name, _) in targets() {
                println!("{name}");
            }
            ExitCode::SUCCESS
        }
        ["seeds", name, dir] if find(name).is_some() => match write_seeds(name, Path::new(dir)) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nephele-fuzz: cannot write the seeds of {name} into {dir}: {e}");
                ExitCode::FAILURE
            }
        },
        ["run", name, files @ ..] if find(name).is_some() => {
            let f = find(name).unwrap_or(|_| ());
            for file in files {
                match std::fs::read(file) {
                    Ok(data) => f(&data),
                    Err(e) => {
                        eprintln!("nephele-fuzz: cannot read {file}: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        [name] if find(name).is_some() => {
            let f = find(name).unwrap_or(|_| ());
            afl::fuzz!(|data: &[u8]| f(data));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "usage: nephele-fuzz list | seeds TARGET DIR | run TARGET FILE... | TARGET\n\
                 targets: {}",
                targets().map(|(n, _)| n).collect::<Vec<_>>().join(", ")
            );
            ExitCode::FAILURE
        }
    }
}
