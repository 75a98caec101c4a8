//! `neph-node`: the compute-node agent daemon, a thin shell over the
//! `neph_node` library (see its crate doc and the README).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use neph_node::config::{AgentConfig, RawFlags};

#[derive(Debug, Parser)]
#[command(name = "neph-node", version, about = "Nephele compute-node agent")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Register with the controllers and run the VMs assigned to this node.
    Run(Box<RunFlags>),
    /// Carry one live migration's stream over mutual TLS (started by the
    /// agent, one per migration and side; see the crate's `tunnel` module).
    Tunnel(TunnelFlags),
}

#[derive(Debug, clap::Args)]
struct TunnelFlags {
    /// The agent's data directory (the node's certificate is in tls/).
    #[arg(long)]
    data_dir: PathBuf,
    /// accept: TLS in from the source node, to the VMM; connect: from the
    /// VMM, TLS out to the target node.
    #[arg(long, value_enum)]
    mode: neph_node::tunnel::Mode,
    /// HOST:PORT to listen on.
    #[arg(long)]
    listen: String,
    /// HOST:PORT each connection is carried to.
    #[arg(long)]
    forward: String,
    /// The other node's name: the only peer admitted (accept) or accepted
    /// (connect).
    #[arg(long)]
    peer_node: String,
    /// The VMM served: the tunnel ends when it does.
    #[arg(long)]
    vmm_pid: u32,
    /// accept: the VMM's arrival file (the tunnel ends once the VM arrived).
    #[arg(long)]
    arrival_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct RunFlags {
    /// This node's id (a lowercase DNS label).
    #[arg(long, env = "NEPHELE_NODE_ID")]
    node_id: String,
    /// A controller's HOST:PORT (repeatable; more are learned from answers).
    #[arg(
        long = "controller",
        env = "NEPHELE_CONTROLLERS",
        value_delimiter = ',',
        required = true
    )]
    controllers: Vec<String>,
    /// Where to serve the Agent gRPC service (IP:PORT; port 0 picks one).
    #[arg(long, env = "NEPHELE_LISTEN")]
    listen: String,
    /// The address the controllers reach this agent at (default: the bound
    /// listen address).
    #[arg(long, env = "NEPHELE_ADVERTISE")]
    advertise: Option<String>,
    /// Instance directories live under DIR/instances.
    #[arg(long, env = "NEPHELE_DATA_DIR")]
    data_dir: PathBuf,
    /// Images: DIR/<image-id>/kernel, initrd, cmdline, disk.raw.
    #[arg(long, env = "NEPHELE_IMAGE_DIR")]
    image_dir: PathBuf,
    /// A file holding an admin bearer token for the controllers: only for
    /// a node that has not joined (no certificate in DATA_DIR/tls).
    #[arg(long, env = "NEPHELE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// A join token (`neph node join-token create`): on first start the
    /// node makes its key, joins, and keeps its certificate in
    /// DATA_DIR/tls; later starts need neither this nor --token-file.
    #[arg(long, env = "NEPHELE_JOIN_TOKEN")]
    join_token: Option<String>,
    /// The cluster CA certificate (PEM) the controllers' certificates are
    /// verified against (a controller's `<data-dir>/tls/ca.pem`).
    #[arg(long, env = "NEPHELE_CA_FILE")]
    ca_file: PathBuf,
    /// The hypervisor binary (default: neph-vmm next to this executable).
    #[arg(long, env = "NEPHELE_VMM")]
    vmm: Option<PathBuf>,
    /// Each VMM switches to this user (NAME, UID or UID:GID) once its
    /// devices are open, with no capabilities left (neph-vmm --user). The
    /// user must be able to read the images (a reboot reads the kernel
    /// again). Default: VMMs stay root, still under their seccomp filters.
    #[arg(long, env = "NEPHELE_VMM_USER")]
    vmm_user: Option<String>,
    /// Attach every VM's tap to this bridge (no network without it).
    #[arg(long, env = "NEPHELE_BRIDGE")]
    bridge: Option<String>,
    /// vCPUs offered (default: the host's CPUs).
    #[arg(long)]
    capacity_vcpus: Option<u64>,
    /// Memory offered in MiB (default: the host's less 10%, at least 1 GiB).
    #[arg(long)]
    capacity_memory_mib: Option<u64>,
    /// Disk offered in GiB (default: free space in --data-dir less 2 GiB).
    #[arg(long)]
    capacity_disk_gib: Option<u64>,
    /// A node label KEY=VALUE (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("stopping the agent; the VMs keep running");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    nephele_tls::install_default();
    let f = match cli.command {
        Cmd::Run(f) => *f,
        Cmd::Tunnel(t) => {
            neph_node::tunnel::run(neph_node::tunnel::TunnelArgs {
                data_dir: t.data_dir,
                mode: t.mode,
                listen: t.listen,
                forward: t.forward,
                peer_node: t.peer_node,
                vmm_pid: t.vmm_pid,
                arrival: t.arrival_file,
            })
            .await?;
            return Ok(());
        }
    };
    let cfg = AgentConfig::load(RawFlags {
        node_id: f.node_id,
        controllers: f.controllers,
        listen: f.listen,
        advertise: f.advertise,
        data_dir: f.data_dir,
        image_dir: f.image_dir,
        token_file: f.token_file,
        join_token: f.join_token,
        ca_file: f.ca_file,
        vmm: f.vmm,
        vmm_user: f.vmm_user,
        bridge: f.bridge,
        capacity_vcpus: f.capacity_vcpus,
        capacity_memory_mib: f.capacity_memory_mib,
        capacity_disk_gib: f.capacity_disk_gib,
        labels: f.labels,
    })?;
    tracing::info!(node = %cfg.node_id, capacity = ?cfg.capacity, vmm = %cfg.vmm.display(), "starting");
    neph_node::daemon::run(
        cfg,
        |addr| {
            // The machine-readable line tests and `neph dev` rely on.
            println!("LISTENING {addr}");
        },
        shutdown_signal(),
    )
    .await?;
    Ok(())
}
