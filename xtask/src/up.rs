//! `cargo xtask up`: the README's first command. Installs what is missing,
//! builds, and boots the test guest with its serial console on this terminal.
//!
//! The control plane (controller, node agent, `neph dev up`) is not built yet,
//! so for now this boots one VM directly with `neph-vmm`; once the control
//! plane lands it starts an all-in-one cluster and boots an instance through it.

use std::process::Command;

use crate::{cargo, deps, exec, guest, root};

pub fn run(args: &[String]) -> Result<(), String> {
    if !args.is_empty() {
        return Err(format!("`up` takes no arguments, got {args:?}"));
    }
    deps::ensure_commands(deps::UP_PACKAGES)?;
    let image = guest::build()?;
    exec(cargo().args(["build", "--release", "--locked", "-p", "neph-vmm"]))?;
    let vmm = root().join("target").join("release").join("neph-vmm");
    eprintln!(
        "xtask: booting the test guest with neph-vmm (1 vCPU, 256 MiB); its serial \
         console is this terminal: type `help`, and `poweroff` to end it"
    );
    exec(
        Command::new(vmm)
            .arg("--kernel")
            .arg(&image)
            .args(["--cpus", "1", "--memory", "256"]),
    )
}
