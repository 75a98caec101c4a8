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
        #[command(flatten)]
        tls: AdminTls,
    },
    /// Add a member (ask any member; it forwards to the leader).
    AddMember {
        /// Address of any member.
        #[arg(long, env = "NEPHELE_ENDPOINT")]
        endpoint: String,
        /// The cluster id.
        #[arg(long, env = "NEPHELE_CLUSTER_ID")]
        cluster_id: u64,
        #[command(flatten)]
        tls: AdminTls,
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
        #[command(flatten)]
        tls: AdminTls,
        /// Member to remove.
        #[arg(long)]
        id: u64,
    },
}

/// The cluster protocol admits only controller certificates: the admin
/// subcommands use a controller's own (run them where a controller runs).
#[derive(Debug, clap::Args)]
struct AdminTls {
    /// A controller's TLS directory (`<data-dir>/tls`: `ca.pem`, `cert.pem`,
    /// `key.pem`).
    #[arg(long, env = "NEPHELE_TLS_DIR")]
    tls_dir: std::path::PathBuf,
}

impl AdminTls {
    fn client(
        &self,
        endpoint: &str,
    ) -> anyhow::Result<pb::cluster_client::ClusterClient<tonic::transport::Channel>> {
        let files = nephele_tls::TlsFiles::in_dir(&self.tls_dir);
        let tls = nephele_tls::TlsContext::load(&files, nephele_tls::Revocations::new())
            .with_context(|| {
                format!(
                    "cannot load the controller certificate in {}",
                    self.tls_dir.display()
                )
            })?;
        let config = tls.client_config(nephele_tls::PeerPolicy::Kind(
            nephele_tls::IdentityKind::Controller,
        ))?;
        Ok(transport::connect_with(endpoint, &Some(config))?)
    }
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
    let mut options = server::ControllerOptions::with_fencing(cfg.node_timeout, cfg.fence_lease);
    options.api.default_stop_timeout = cfg.default_stop_timeout;
    options.api.image_dir = Some(cfg.data_dir.join("images"));
    options.reconcile.rebalance.threshold = f64::from(cfg.rebalance_threshold_pct) / 100.0;
    options.reconcile.rebalance.window = cfg.rebalance_window;
    options.reconcile.rebalance.cooldown = cfg.rebalance_cooldown;
    options.reconcile.rebalance.max_per_node = cfg.max_migrations_per_node;
    options.reconcile.rebalance.max_migrations = cfg.max_migrations;
    options.reconcile.drain.max_per_node = cfg.max_migrations_per_node;
    options.reconcile.drain.max_migrations = cfg.max_migrations;
    let listen = bound.to_string();
    let prepare = neph_controller::tls::PrepareTls {
        data_dir: cfg.data_dir.clone(),
        id: cfg.id,
        cluster_id: cfg.cluster_id.map(|c| c.to_string()),
        sealed_ca: flags.sealed_ca.clone(),
        operator_key: neph_controller::tls::OperatorKeySource {
            file: flags.operator_key_file.clone(),
            hex: std::env::var(neph_controller::tls::OPERATOR_KEY_ENV).ok(),
        },
        create: init,
        addresses: neph_controller::tls::certificate_hosts([advertise.as_str(), listen.as_str()]),
    };
    let tls = neph_controller::tls::prepare(&prepare, nephele_tls::Revocations::new())
        .context("cannot set up this controller's TLS")?;
    println!(
        "CA_FILE {}",
        nephele_tls::TlsFiles::in_dir(&neph_controller::tls::tls_dir(&cfg.data_dir))
            .ca
            .display()
    );
    options.tls = Some(tls);
    options.api.allow_node_tokens = flags.allow_node_tokens;
    options.api.node_cert_validity = cfg.node_cert_validity;
    if flags.allow_node_tokens {
        tracing::warn!(
            "--allow-node-tokens: agents without a certificate may act as any node with an admin token"
        );
    }
    // Signing node certificates (NodeJoin/Join) opens the replicated
    // state's sealed CA with the operator key: only with the key.
    match prepare.operator_key.load(false) {
        Ok(key) => options.api.operator_key = Some(std::sync::Arc::new(key)),
        Err(neph_controller::tls::ControllerTlsError::NoOperatorKey) => tracing::warn!(
            "no operator key given: this controller refuses node joins (NodeJoin/Join)"
        ),
        Err(e) => return Err(e).context("cannot read the operator key"),
    }
    let sealed = neph_controller::tls::local_sealed(&prepare)
        .context("cannot read this controller's sealed CA file")?;
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
            serve_until_stopped(running, &cfg, init, sealed).await
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
            serve_until_stopped(running, &cfg, init, sealed).await
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
    sealed: Option<nephele_tls::SealedCa>,
) -> anyhow::Result<()> {
    // The machine-readable line tests and `neph dev` rely on.
    println!("LISTENING {}", running.address);
    log_leadership(running.store.clone());

    // The sealed cluster CA into the replicated state (a no-op once it is
    // there). At init this comes before the bootstrap admin token, so
    // whoever holds the token can have nodes join at once.
    let publish = sealed.map(|s| neph_controller::tls::publish_ca(running.store.clone(), s));
    if init {
        // The bootstrap admin token: created once the cluster has a leader,
        // written to the data directory (0600), never printed.
        let store = running.store.clone();
        let data_dir = cfg.data_dir.clone();
        let id = cfg.id;
        tokio::spawn(async move {
            if let Some(publish) = publish {
                publish.await;
            }
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
    } else if let Some(publish) = publish {
        tokio::spawn(publish);
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
    nephele_tls::install_default();
    match cli.command {
        Cmd::Init(flags) => serve(flags, true).await,
        Cmd::Run(flags) => serve(flags, false).await,
        Cmd::Status {
            endpoint,
            cluster_id,
            tls,
        } => {
            let mut c = tls.client(&endpoint)?;
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
            tls,
        } => {
            let mut c = tls.client(&endpoint)?;
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
            tls,
        } => {
            let mut c = tls.client(&endpoint)?;
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
