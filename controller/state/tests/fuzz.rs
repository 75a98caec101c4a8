//! The state machine's fuzz targets (`tests/fuzz_targets/`) run briefly as
//! part of the suite: each on its seeds, on every saved regression input in
//! `tests/fuzz-regressions/<target>/` (inputs that once failed it, found by
//! `cargo xtask fuzz`), and on a few hundred random inputs, raw or mutated
//! from the seeds. The long, coverage-guided runs are `cargo xtask fuzz`
//! (AFL++, see the workspace's `fuzz/` crate).

mod fuzz_targets;
#[path = "../../../fuzz/replay.rs"]
mod replay;

use std::path::PathBuf;

use fuzz_targets::{TARGETS, Target, apply, seeds};
use proptest::prelude::*;
use proptest::sample::Index;

fn target(name: &str) -> Target {
    replay::target(TARGETS, name)
}

fn regressions(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    replay::regressions(env!("CARGO_MANIFEST_DIR"), name)
}

/// Random bytes, or seeds spliced together with a few bytes overwritten
/// and maybe cut.
fn inputs(name: &str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = seeds(name);
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..1024),
        4 => (
            prop::collection::vec(prop::sample::select(seeds), 1..4),
            prop::collection::vec((any::<Index>(), any::<u8>()), 0..6),
            prop::option::weighted(0.2, any::<Index>()),
        )
            .prop_map(|(parts, edits, cut)| {
                let mut s = parts.concat();
                if !s.is_empty() {
                    for (at, b) in edits {
                        let i = at.index(s.len());
                        s[i] = b;
                    }
                    if let Some(cut) = cut {
                        s.truncate(cut.index(s.len()));
                    }
                }
                s
            }),
    ]
}

#[test]
fn every_target_has_seeds_and_passes_them_and_its_regressions() {
    for (name, f) in TARGETS {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "{name} has no seeds");
        for s in &seeds {
            f(s);
        }
        for (path, input) in regressions(name) {
            eprintln!("{name}: {}", path.display());
            f(&input);
        }
    }
}

#[test]
fn the_populated_state_is_what_setup_says() {
    let (s, answers) = apply::populated();
    for a in &answers {
        assert!(a.starts_with("Ok("), "setup refused: {a}");
    }
    assert_eq!(s.projects.len(), 2);
    assert_eq!(s.instances.len(), 3);
    assert_eq!(s.nodes.len(), 2);
    assert_eq!(s.migrations.len(), 1);
    // The seeds decode back to envelopes.
    for seed in seeds("apply_command") {
        let frames = apply::frames(&seed);
        assert!(!frames.is_empty());
        for f in frames {
            nephele_state::codec::decode_envelope(f).expect("a seed envelope decodes");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn resource_name(data in inputs("resource_name")) {
        target("resource_name")(&data);
    }

    #[test]
    fn apply_command(data in inputs("apply_command")) {
        target("apply_command")(&data);
    }
}
