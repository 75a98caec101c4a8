//! `neph-controller`: the control-plane daemon. A thin shell over the
//! `neph_controller` library: parse configuration, start the replicated store
//! and serve it until SIGINT/SIGTERM or a fatal storage error.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use neph_controller::config::{ControllerConfig, Flags, StoreChoice};
use neph_controller::raft::transport;
use neph_controller::server;
use neph_controller::store::StateStore;
use nephele_proto::cluster::v1 as pb;

#[derive(Debug, Parser)]
#[command(name = "neph-controller", version, about = "Nephele controller daemon")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Bootstrap a new cluster in an empty data directory, then serve. Every
    /// initial member runs `init` with the same `--cluster-id` and `--peers`.
    Init(Flags),
    /// Serve from an existing data directory, or join a cluster with an empty
    /// one (the leader must add this member with add-member).
    Run(Flags),
    /// Print a member's view of the cluster as JSON.
    Status {
        /// Address of any member.
        #[arg(long, env = "NEPHELE_ENDPOINT")]
        endpoint: String,
        /// The cluster id.
        #[arg(long, env = "NEPHELE_CLUSTER_ID")]
        cluster_id: u64,
    },
    /// Add a member (ask any member; it forwards to the leader).
    AddMember {
        /// Address of any member.
        #[arg(long, env = "NEPHELE_ENDPOINT")]
        endpoint: String,
        /// The cluster id.
        #[arg(long, env = "NEPHELE_CLUSTER_ID")]
        cluster_id: u64,
        /// New member's id.
        #[arg(long)]
        id: u64,
        /// New member's address.
        #[arg(long)]
        address: String,
    },
    /// Remove a member for good.
    RemoveMember {
        /// Address of any member.
        #[arg(long, env = "NEPHELE_ENDPOINT")]
        endpoint: String,
        /// The cluster id.
        #[arg(long, env = "NEPHELE_CLUSTER_ID")]
        cluster_id: u64,
        /// Member to remove.
        #[arg(long)]
        id: u64,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn member_json(m: &pb::Member) -> String {
    format!(
        "{{\"id\":{},\"address\":{:?},\"matched_index\":{}}}",
        m.id, m.address, m.matched_index
    )
}

async fn serve(flags: Flags, init: bool) -> anyhow::Result<()> {
    let cfg = ControllerConfig::load(&flags)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let bound = listener.local_addr()?;
    let advertise = cfg.advertise.clone().unwrap_or_else(|| bound.to_string());
    let options = server::ControllerOptions::with_fencing(cfg.node_timeout, cfg.fence_lease);
    match &cfg.store {
        StoreChoice::Raft => {
            let running =
                server::start_with(cfg.raft_config(advertise.clone(), init), listener, options)
                    .await?;
            tracing::info!(
                id = cfg.id,
                cluster_id = running.store.cluster_id(),
                listen = %bound,
                %advertise,
                data_dir = %cfg.data_dir.display(),
                "controller serving (raft store)"
            );
            serve_until_stopped(running, &cfg, init).await
        }
        #[cfg(feature = "etcd")]
        StoreChoice::Etcd {
            endpoints,
            prefix,
            lease_ttl_s,
        } => {
            // Only the admin token lives here with an etcd store.
            std::fs::create_dir_all(&cfg.data_dir).with_context(|| {
                format!(
                    "cannot create the data directory {}",
                    cfg.data_dir.display()
                )
            })?;
            let mut etcd = neph_controller::store::etcd::EtcdConfig::new(endpoints.clone(), cfg.id);
            etcd.prefix = prefix.clone();
            etcd.lease_ttl_s = *lease_ttl_s;
            etcd.snapshot_interval = cfg.snapshot_interval;
            let running = server::start_etcd(etcd, listener, options)
                .await
                .with_context(|| {
                    format!("cannot start the etcd store at {}", endpoints.join(","))
                })?;
            tracing::info!(
                id = cfg.id,
                listen = %bound,
                etcd = %endpoints.join(","),
                %prefix,
                data_dir = %cfg.data_dir.display(),
                "controller serving (etcd store)"
            );
            serve_until_stopped(running, &cfg, init).await
        }
        #[cfg(not(feature = "etcd"))]
        StoreChoice::Etcd { .. } => anyhow::bail!(
            "store = \"etcd\" needs a neph-controller built with the cargo feature `etcd` \
             (cargo build -p neph-controller --features etcd); this one has only the raft store"
        ),
    }
}

/// Logs leadership changes: on an etcd-backed controller they say which
/// controller runs the control loops.
fn log_leadership<S: StateStore>(store: S) {
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let l = store.leadership();
            let now = (l.is_leader(), l.term);
            if last != Some(now) {
                if l.is_leader() {
                    tracing::info!(term = l.term, "this controller leads: control loops run");
                } else {
                    tracing::info!(
                        term = l.term,
                        leader = ?l.leader_id,
                        "this controller does not lead: control loops idle"
                    );
                }
                last = Some(now);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

async fn serve_until_stopped<S: server::Backend>(
    mut running: server::RunningController<S>,
    cfg: &ControllerConfig,
    init: bool,
) -> anyhow::Result<()> {
    // The machine-readable line tests and `neph dev` rely on.
    println!("LISTENING {}", running.address);
    log_leadership(running.store.clone());

    if init {
        // The bootstrap admin token: created once the cluster has a leader,
        // written to the data directory (0600), never printed.
        let store = running.store.clone();
        let data_dir = cfg.data_dir.clone();
        let id = cfg.id;
        tokio::spawn(async move {
            loop {
                match neph_controller::api::auth::bootstrap_admin(&store, id, &data_dir).await {
                    Ok(created) => {
                        let path = data_dir.join(neph_controller::api::auth::BOOTSTRAP_TOKEN_FILE);
                        if created.is_some() {
                            tracing::info!(path = %path.display(), "bootstrap admin token written");
                        }
                        println!("ADMIN_TOKEN_FILE {}", path.display());
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "bootstrap admin token not created yet; retrying");
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
            }
        });
    }

    let store = running.store.clone();
    let failed = async move {
        loop {
            if let Some(f) = store.failure() {
                return f;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
        _ = term.recv() => tracing::info!("terminated; stopping"),
        f = failed => {
            anyhow::bail!("the state store failed: {f}");
        }
        r = running.wait() => {
            r?;
            anyhow::bail!("the gRPC server stopped");
        }
    }
    running.stop().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Cmd::Init(flags) => serve(flags, true).await,
        Cmd::Run(flags) => serve(flags, false).await,
        Cmd::Status {
            endpoint,
            cluster_id,
        } => {
            let mut c = transport::connect(&endpoint)?;
            let s = c
                .status(pb::StatusRequest { cluster_id })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            let members: Vec<String> = s.members.iter().map(member_json).collect();
            println!(
                "{{\"id\":{},\"cluster_id\":{},\"leader_id\":{},\"term\":{},\"role\":{:?},\"commit_index\":{},\"applied_index\":{},\"snapshot_index\":{},\"members\":[{}]}}",
                s.id,
                s.cluster_id,
                s.leader_id,
                s.term,
                s.role,
                s.commit_index,
                s.applied_index,
                s.snapshot_index,
                members.join(",")
            );
            Ok(())
        }
        Cmd::AddMember {
            endpoint,
            cluster_id,
            id,
            address,
        } => {
            let mut c = transport::connect(&endpoint)?;
            let r = c
                .add_member(pb::AddMemberRequest {
                    cluster_id,
                    id,
                    address,
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            println!("member {id} added at index {}", r.index);
            Ok(())
        }
        Cmd::RemoveMember {
            endpoint,
            cluster_id,
            id,
        } => {
            let mut c = transport::connect(&endpoint)?;
            let r = c
                .remove_member(pb::RemoveMemberRequest { cluster_id, id })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            println!("member {id} removed at index {}", r.index);
            Ok(())
        }
    }
}
