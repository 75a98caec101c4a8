//! The state machine's fuzz targets: functions over arbitrary bytes that
//! must never panic, whatever the bytes. Shared by the crate tests
//! (`tests/fuzz.rs`: seeds, saved regressions, a few hundred random inputs)
//! and by the coverage-guided AFL++ harness in the workspace's `fuzz/`
//! crate (`cargo xtask fuzz`), which includes this directory by path.
//!
//! | target | what the bytes are |
//! |---|---|
//! | `resource_name` | a pattern selector, then a name for `names::parse` and `validate_id` |
//! | `apply_command` | up to 16 length-prefixed encoded envelopes (any command, actor, request id, fence), applied to a populated state |

#![allow(dead_code)]

pub mod apply;
pub mod names;

/// A fuzz target.
pub type Target = fn(&[u8]);

/// Every target by name, in the order `cargo xtask fuzz` runs them.
pub const TARGETS: &[(&str, Target)] = &[
    ("resource_name", names::name_target),
    ("apply_command", apply::apply_target),
];

/// Valid or nearly valid inputs to start each target from.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "resource_name" => names::seeds(),
        "apply_command" => apply::seeds(),
        _ => Vec::new(),
    }
}
