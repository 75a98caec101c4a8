//! `neph dev up|status|down`: a local cluster on this machine, for
//! development and for the README's `cargo xtask up`.
//!
//! `up` starts `neph-controller` members and `neph-node` agents as background
//! processes (each in its own session, logging to `<dir>/logs/`), on free
//! loopback ports; as root it also makes the bridge `nephdev0` the agents
//! plug VM taps into. It then waits until every node is registered UP,
//! registers the default flavors and the test guest image, creates the
//! project `default` and writes the `dev` profile for `neph`. Everything it
//! started is listed in `<dir>/cluster.json` ([`state`]). `down` stops it all
//! (agents, then the VMs they left running, then controllers) and removes
//! the bridge and its taps; the directory stays for the next `up` (which
//! restarts the same cluster with its data) unless `--purge`.
//!
//! - `state.rs`: the state file and the default directory.
//! - `process.rs`: starting detached daemons, liveness, stopping, and the
//!   `/proc` sweep that finds anything left behind.
//! - `bridge.rs`: the bridge and its taps (`ip`).
//! - `profile.rs`: writing the `dev` profile into `config.toml`.
//! - `up.rs`, `down.rs`: the two commands; `status` is below.
//!
//! The parser: `dev` is added to `neph`'s grammar by [`parse`], which the
//! binary calls instead of parsing [`crate::commands::Cli`] directly.

mod bridge;
mod down;
mod process;
mod profile;
mod state;
mod up;

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::client::CliError;
use crate::output::{self, Format};

/// `neph dev ...`.
#[derive(Debug, Args)]
pub struct DevArgs {
    #[command(subcommand)]
    cmd: DevCmd,
}

#[derive(Debug, Subcommand)]
enum DevCmd {
    /// Start a local cluster (controllers and compute nodes on loopback) and
    /// write the `dev` profile; says so and exits 0 if it already runs.
    Up(UpArgs),
    /// Every process of the local cluster: role, id, address, pid, alive, log.
    Status(DirArg),
    /// Stop every process of the local cluster (and the VMs its nodes ran),
    /// and remove the bridge and taps it made.
    Down(DownArgs),
}

#[derive(Debug, Args)]
struct DirArg {
    /// The cluster's directory (data, logs, state file). Default:
    /// $XDG_STATE_HOME/nephele/dev or ~/.local/state/nephele/dev.
    #[arg(long, env = "NEPHELE_DEV_DIR")]
    dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Controllers (Raft members); 1 is the all-in-one default.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=7))]
    controllers: u32,
    /// Compute nodes (one `neph-node` each; their VMs run on this machine).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=16))]
    nodes: u32,
    #[command(flatten)]
    dir: DirArg,
    /// The test guest registered as image `test-guest` (build it with
    /// `cargo xtask guest`). Default: target/images/neph-guest.elf beside
    /// the binaries' target directory, or under the current directory.
    #[arg(long, env = "NEPH_GUEST_IMAGE")]
    guest_image: Option<PathBuf>,
    /// Where `neph-controller`, `neph-node` and `neph-vmm` are. Default: the
    /// directory of this `neph`, then PATH.
    #[arg(long, env = "NEPHELE_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Make no bridge even as root (VMs then get no network).
    #[arg(long)]
    no_bridge: bool,
}

#[derive(Debug, Args)]
struct DownArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Also delete the directory: data, logs and images.
    #[arg(long)]
    purge: bool,
}

/// Runs `neph dev ...`.
pub async fn run(dev: DevArgs, format: Option<Format>) -> Result<(), CliError> {
    match dev.cmd {
        DevCmd::Up(a) => {
            let dir = state::resolve_dir(a.dir.dir.as_deref()).map_err(usage)?;
            up::up(up::UpOptions {
                dir,
                controllers: a.controllers,
                nodes: a.nodes,
                guest_image: a.guest_image,
                bin_dir: a.bin_dir,
                bridge: !a.no_bridge,
            })
            .await
        }
        DevCmd::Status(d) => {
            let dir = state::resolve_dir(d.dir.as_deref()).map_err(usage)?;
            status(&dir, format.unwrap_or(Format::Table))
        }
        DevCmd::Down(d) => {
            let dir = state::resolve_dir(d.dir.dir.as_deref()).map_err(usage)?;
            down::down(&dir, d.purge).map_err(|e| CliError::Api(e.to_string()))
        }
    }
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError::Usage(e.to_string())
}

/// `neph dev status`.
fn status(dir: &std::path::Path, format: Format) -> Result<(), CliError> {
    let Some(st) = state::ClusterState::load(dir).map_err(|e| CliError::Api(e.to_string()))? else {
        return Err(CliError::Api(format!(
            "no local cluster in {}; start one with `neph dev up`",
            dir.display()
        )));
    };
    let rows: Vec<output::Record> = st
        .processes
        .iter()
        .map(|p| {
            vec![
                ("role", p.role.as_str().into()),
                ("id", p.id.clone().into()),
                ("address", p.address.clone().into()),
                ("pid", p.pid.into()),
                ("alive", process::alive(p.pid, p.role.binary()).into()),
                ("log", p.log.display().to_string().into()),
            ]
        })
        .collect();
    output::list(format, &rows, "processes");
    if format == Format::Table {
        eprintln!(
            "cluster {} in {}; profile `dev`",
            st.cluster_id,
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dev` as the top-level grammar holds it.
    #[derive(Debug, clap::Parser)]
    struct Top {
        #[command(subcommand)]
        cmd: TopCmd,
    }

    #[derive(Debug, clap::Subcommand)]
    enum TopCmd {
        Dev(DevArgs),
    }

    fn parse_from(args: &[&str]) -> Result<DevArgs, clap::Error> {
        use clap::Parser as _;
        let TopCmd::Dev(d) = Top::try_parse_from(args)?.cmd;
        Ok(d)
    }

    #[test]
    fn dev_parses_its_arguments() {
        let Ok(d) = parse_from(&[
            "neph",
            "dev",
            "up",
            "--controllers",
            "3",
            "--nodes",
            "0",
            "--dir",
            "/x",
        ]) else {
            panic!("dev up did not parse as dev");
        };
        match d.cmd {
            DevCmd::Up(a) => {
                assert_eq!((a.controllers, a.nodes), (3, 0));
                assert_eq!(a.dir.dir.as_deref(), Some(std::path::Path::new("/x")));
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(parse_from(&["neph", "dev", "up", "--controllers", "0"]).is_err());
        assert!(parse_from(&["neph", "dev"]).is_err());
    }
}
