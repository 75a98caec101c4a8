//! Builds the project's test guest (`guest/`, a bare-metal `no_std` program
//! with a PVH entry) into `target/images/neph-guest.elf`.

use std::path::PathBuf;

use crate::{cargo, exec, root};

/// Where the built guest image is copied; tests find it through
/// `NEPH_GUEST_IMAGE`, which `cargo xtask test` sets to this path.
pub fn image_path() -> PathBuf {
    root().join("target").join("images").join("neph-guest.elf")
}

/// Builds the guest in release mode and returns the image path.
pub fn build() -> Result<PathBuf, String> {
    let dir = root().join("guest");
    exec(
        cargo()
            .current_dir(&dir)
            .args(["build", "--release", "--locked"])
            // The outer `cargo xtask` run must not leak its settings into the
            // guest's build, which has its own target and flags.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET"),
    )?;
    let built = dir
        .join("target")
        .join("x86_64-unknown-linux-gnu")
        .join("release")
        .join("neph-guest");
    let out = image_path();
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("could not create {}: {e}", parent.display()))?;
    }
    std::fs::copy(&built, &out).map_err(|e| {
        format!(
            "could not copy the guest from {} to {}: {e}",
            built.display(),
            out.display()
        )
    })?;
    Ok(out)
}

/// Formatting, lints and host-side unit tests of the guest crate, which is
/// not a workspace member and so is not covered by the workspace commands.
pub fn lint_and_test() -> Result<(), String> {
    let dir = root().join("guest");
    exec(cargo().current_dir(&dir).args(["fmt", "--", "--check"]))?;
    exec(cargo().current_dir(&dir).args([
        "clippy",
        "--release",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The guest's pure logic (command parsing, packets, checksums, rings)
    // runs as ordinary host unit tests.
    exec(
        cargo()
            .current_dir(&dir)
            .args(["test", "--lib", "--locked"]),
    )
}
