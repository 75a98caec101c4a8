//! What both crates' brief fuzz suites (`compute-node/vmm/tests/fuzz.rs`,
//! `controller/state/tests/fuzz.rs`) share, included by path as the `fuzz/`
//! crate includes their targets: finding a registered target by name, and
//! reading the saved regression inputs of a target from the including
//! crate's `tests/fuzz-regressions/<target>/`.

use std::path::{Path, PathBuf};

/// A fuzz target: one input, which it must survive.
pub type Target = fn(&[u8]);

/// The target registered as `name` in `targets`.
pub fn target(targets: &[(&str, Target)], name: &str) -> Target {
    targets
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .expect("a registered target")
}

/// The saved inputs of `name` under `manifest_dir`, with their paths,
/// sorted.
pub fn regressions(manifest_dir: &str, name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(manifest_dir)
        .join("tests/fuzz-regressions")
        .join(name);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, Vec<u8>)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).expect("a readable regression input");
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}
