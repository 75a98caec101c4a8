//! `neph dev up`: start (or restart) the local cluster and make it usable.
//!
//! A fresh directory: the first controller runs `init` (it creates the
//! cluster CA, its key sealed with the operator key `<dir>/operator.key`,
//! issues its own certificate, and writes the bootstrap admin token into its
//! data directory), the others start empty, issue their certificates from
//! the same sealed CA and operator key, and are added with
//! `neph-controller add-member` (mutual TLS with controller 1's
//! certificate); then one `neph-node` per node, given every controller's
//! address, the CA certificate and a one-time join token made for it (it
//! joins, keeps its certificate in its data directory and talks to the
//! controllers over mutual TLS from then on). The `dev` profile
//! points at the CA certificate, so `neph` verifies the controllers. A
//! directory whose processes are all stopped: each is started again with the
//! command line recorded in the state file, on its old data. Then, either
//! way: wait until every node is registered UP, register the flavors
//! `small` and `medium`, the project `default` and the image `test-guest`
//! (each only if missing), and write the `dev` profile.
//!
//! A fresh `up` that fails stops whatever it started and removes the state
//! file and data directories (logs are kept to say what went wrong).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nephele_proto::compute::v1 as compute;
use nephele_proto::iam::v1 as iam;
use nephele_proto::infra::v1 as infra;
use thiserror::Error;
use tonic::Code;

use super::bridge::{self, BridgeError};
use super::process::{self, SpawnDaemonError};
use super::profile::{self, DevProfile, WriteProfileError};
use super::state::{ClusterState, Process, Role, StateFileError};
use crate::client::{CliError, Conn};

/// The image id the test guest is registered under.
pub const GUEST_IMAGE_ID: &str = "test-guest";
/// The project `up` creates and the profile uses.
pub const PROJECT: &str = "default";
/// `(id, vCPUs, memory MiB, disk GiB)` of the flavors `up` registers.
pub const FLAVORS: &[(&str, u64, u64, u64)] = &[("small", 1, 256, 1), ("medium", 2, 1024, 4)];

/// How long a daemon may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the nodes may take to register.
const NODES_TIMEOUT: Duration = Duration::from_secs(60);

/// What `up` was asked for.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The cluster directory (absolute).
    pub dir: PathBuf,
    /// Controllers.
    pub controllers: u32,
    /// Nodes.
    pub nodes: u32,
    /// The test guest, if given.
    pub guest_image: Option<PathBuf>,
    /// Where the daemons' executables are, if given.
    pub bin_dir: Option<PathBuf>,
    /// Whether to make the bridge (as root).
    pub bridge: bool,
}

/// Why the local cluster could not be started.
#[derive(Debug, Error)]
pub enum DevUpError {
    /// The state file.
    #[error(transparent)]
    State(#[from] StateFileError),
    /// A daemon.
    #[error(transparent)]
    Spawn(#[from] SpawnDaemonError),
    /// The bridge.
    #[error("cannot make the bridge {name}: {source}; or pass --no-bridge", name = bridge::BRIDGE)]
    Bridge {
        /// Why.
        #[from]
        source: BridgeError,
    },
    /// The profile.
    #[error(transparent)]
    Profile(#[from] WriteProfileError),
    /// An executable is missing.
    #[error(
        "{name} is not in {searched}; build it: `cargo build --release -p {package}` (or pass --bin-dir)"
    )]
    MissingBinary {
        /// The executable.
        name: &'static str,
        /// The package that builds it.
        package: &'static str,
        /// Where it was looked for.
        searched: String,
    },
    /// The test guest is missing.
    #[error(
        "the test guest image is not at {0}; build it with `cargo xtask guest`, or point NEPH_GUEST_IMAGE (or --guest-image) at one"
    )]
    NoGuestImage(String),
    /// Some processes of an earlier `up` still run.
    #[error(
        "the local cluster in {dir} is partly running ({alive} of {total} processes alive); run `neph dev down` first, then `neph dev up`"
    )]
    PartlyRunning {
        /// The directory.
        dir: PathBuf,
        /// How many are alive.
        alive: usize,
        /// How many it has.
        total: usize,
    },
    /// A controller could not be added to the cluster.
    #[error("cannot add controller {id} to the cluster: {message}")]
    Join {
        /// Member id.
        id: u32,
        /// What `add-member` said.
        message: String,
    },
    /// The API refused a setup call.
    #[error("{0}")]
    Api(String),
    /// The nodes did not register.
    #[error("nodes not UP after {waited:?}: {missing}; see their logs in {logs}")]
    NodesNotUp {
        /// How long.
        waited: Duration,
        /// Which nodes and their state.
        missing: String,
        /// The log directory.
        logs: PathBuf,
    },
    /// A file operation.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl From<DevUpError> for CliError {
    fn from(e: DevUpError) -> CliError {
        match e {
            DevUpError::MissingBinary { .. }
            | DevUpError::NoGuestImage(_)
            | DevUpError::PartlyRunning { .. } => CliError::Usage(e.to_string()),
            other => CliError::Api(other.to_string()),
        }
    }
}

/// `neph dev up`.
pub async fn up(o: UpOptions) -> Result<(), CliError> {
    match ClusterState::load(&o.dir).map_err(DevUpError::from)? {
        Some(st) => {
            let total = st.processes.len();
            let alive = st
                .processes
                .iter()
                .filter(|p| process::alive(p.pid, p.role.binary()))
                .count();
            if alive == total && total > 0 {
                ready(&o, &st, false).await?;
                eprintln!(
                    "a local cluster already runs in {} ({}); `neph dev status` lists its processes",
                    o.dir.display(),
                    counts(&st)
                );
                return Ok(());
            }
            if alive > 0 {
                return Err(DevUpError::PartlyRunning {
                    dir: o.dir.clone(),
                    alive,
                    total,
                }
                .into());
            }
            eprintln!(
                "restarting the local cluster in {} ({})",
                o.dir.display(),
                counts(&st)
            );
            let st = restart(&o, st).await?;
            ready(&o, &st, true).await?;
            Ok(())
        }
        None => {
            let st = match fresh(&o).await {
                Ok(st) => st,
                Err(e) => {
                    undo_fresh(&o.dir);
                    return Err(e.into());
                }
            };
            if let Err(e) = ready(&o, &st, true).await {
                undo_fresh(&o.dir);
                return Err(e.into());
            }
            Ok(())
        }
    }
}

fn counts(st: &ClusterState) -> String {
    let c = st
        .processes
        .iter()
        .filter(|p| p.role == Role::Controller)
        .count();
    let n = st.processes.len() - c;
    format!("{c} controller(s), {n} node(s)")
}

/// Stops what a failed fresh `up` started and forgets it, keeping the logs.
fn undo_fresh(dir: &Path) {
    if let Err(e) = super::down::stop(dir) {
        eprintln!("neph: while cleaning up: {e}");
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("controller-") || name.starts_with("node-") || name == "images" {
            let _ = std::fs::remove_dir_all(e.path());
        } else if name.starts_with(super::state::STATE_FILE) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Finds a daemon's executable.
fn find_binary(
    bin_dir: Option<&Path>,
    name: &'static str,
    package: &'static str,
) -> Result<PathBuf, DevUpError> {
    let missing = |searched: String| DevUpError::MissingBinary {
        name,
        package,
        searched,
    };
    if let Some(d) = bin_dir {
        let p = d.join(name);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(missing(d.display().to_string()))
        };
    }
    let own = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    if let Some(d) = &own {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    if let Some(p) = process::which(name) {
        return Ok(p);
    }
    Err(missing(match own {
        Some(d) => format!("{} or PATH", d.display()),
        None => "PATH".into(),
    }))
}

/// The test guest: the flag or `NEPH_GUEST_IMAGE`, else
/// `target/images/neph-guest.elf` next to this binary's target directory,
/// else under the current directory.
fn find_guest(given: Option<&Path>) -> Result<PathBuf, DevUpError> {
    if let Some(p) = given {
        return if p.is_file() {
            Ok(p.to_owned())
        } else {
            Err(DevUpError::NoGuestImage(p.display().to_string()))
        };
    }
    let rel = Path::new("images").join("neph-guest.elf");
    let mut tried = Vec::new();
    if let Some(target) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().and_then(Path::parent).map(Path::to_path_buf))
    {
        tried.push(target.join(&rel));
    }
    tried.push(Path::new("target").join(&rel));
    for p in &tried {
        if p.is_file() {
            return Ok(p.clone());
        }
    }
    Err(DevUpError::NoGuestImage(
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" or "),
    ))
}

fn cluster_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // Small enough to read, non-zero, different between runs.
    1 + u64::from(nanos ^ std::process::id()) % 999_999
}

fn free_port() -> Result<u16, DevUpError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| DevUpError::Io {
            action: "find a free loopback port for",
            path: "127.0.0.1".into(),
            source,
        })
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Starts a recorded process, records its pid and waits until it listens;
/// returns the address it printed.
async fn start(dir: &Path, st: &mut ClusterState, idx: usize) -> Result<String, DevUpError> {
    let p = &st.processes[idx];
    let what = format!("{} {}", p.role.as_str(), p.id);
    let started = process::spawn_detached(&p.program, &p.restart_args, &p.log, &[])?;
    st.processes[idx].pid = started.pid;
    st.save(dir)?;
    let binary = st.processes[idx].role.binary();
    let addr = process::wait_for_line(&started, binary, "LISTENING ", &what, START_TIMEOUT).await?;
    Ok(addr)
}

/// A fresh cluster in an empty directory.
async fn fresh(o: &UpOptions) -> Result<ClusterState, DevUpError> {
    let dir = &o.dir;
    let controller = find_binary(o.bin_dir.as_deref(), "neph-controller", "neph-controller")?;
    let (node, vmm) = if o.nodes > 0 {
        (
            Some(find_binary(o.bin_dir.as_deref(), "neph-node", "neph-node")?),
            Some(find_binary(o.bin_dir.as_deref(), "neph-vmm", "neph-vmm")?),
        )
    } else {
        (None, None)
    };
    let guest = find_guest(o.guest_image.as_deref())?;
    let logs = dir.join("logs");
    let id = cluster_id();
    let c1_dir = dir.join("controller-1");
    let mut st = ClusterState::new(id, c1_dir.join("admin.token"));

    // As root, a bridge for the VMs' taps.
    let bridge_name = if o.nodes > 0 && o.bridge && is_root() {
        st.bridge = Some(bridge::BRIDGE.to_owned());
        st.save(dir)?;
        bridge::create()?;
        Some(bridge::BRIDGE)
    } else {
        if o.nodes > 0 && o.bridge {
            eprintln!("not root: no bridge, so VMs get no network");
        }
        None
    };

    // The first controller bootstraps the cluster and its CA; the others
    // issue their certificates from that CA with the same operator key.
    let operator_key = dir.join(OPERATOR_KEY_FILE);
    let sealed_ca = c1_dir.join("tls").join("ca.sealed");
    let base = |member: u32, data: &Path| -> Vec<String> {
        vec![
            "--operator-key-file".into(),
            s(&operator_key),
            "--sealed-ca".into(),
            s(&sealed_ca),
            "--id".into(),
            member.to_string(),
            "--cluster-id".into(),
            id.to_string(),
            "--data-dir".into(),
            s(data),
        ]
    };
    let mut init_args = vec!["init".to_owned()];
    init_args.extend(base(1, &c1_dir));
    init_args.extend(["--listen".into(), "127.0.0.1:0".into()]);
    let log = logs.join("controller-1.log");
    eprintln!("starting controller 1");
    let started = process::spawn_detached(&controller, &init_args, &log, &[])?;
    st.processes.push(Process {
        role: Role::Controller,
        id: "1".into(),
        address: String::new(),
        pid: started.pid,
        log: log.clone(),
        data_dir: c1_dir.clone(),
        program: controller.clone(),
        restart_args: Vec::new(),
    });
    st.save(dir)?;
    let c1 = process::wait_for_line(
        &started,
        "neph-controller",
        "LISTENING ",
        "controller 1",
        START_TIMEOUT,
    )
    .await?;
    process::wait_for_line(
        &started,
        "neph-controller",
        "ADMIN_TOKEN_FILE ",
        "controller 1",
        START_TIMEOUT,
    )
    .await?;
    let mut run_args = vec!["run".to_owned()];
    run_args.extend(base(1, &c1_dir));
    run_args.extend(["--listen".into(), c1.clone()]);
    st.processes[0].address = c1.clone();
    st.processes[0].restart_args = run_args;
    st.save(dir)?;

    // The others join empty, then are added as members.
    for member in 2..=o.controllers {
        let data = dir.join(format!("controller-{member}"));
        let mut args = vec!["run".to_owned()];
        args.extend(base(member, &data));
        args.extend(["--peers".into(), format!("1={c1}")]);
        let mut first = args.clone();
        first.extend(["--listen".into(), "127.0.0.1:0".into()]);
        let log = logs.join(format!("controller-{member}.log"));
        eprintln!("starting controller {member}");
        let started = process::spawn_detached(&controller, &first, &log, &[])?;
        st.processes.push(Process {
            role: Role::Controller,
            id: member.to_string(),
            address: String::new(),
            pid: started.pid,
            log,
            data_dir: data,
            program: controller.clone(),
            restart_args: Vec::new(),
        });
        st.save(dir)?;
        let what = format!("controller {member}");
        let addr = process::wait_for_line(
            &started,
            "neph-controller",
            "LISTENING ",
            &what,
            START_TIMEOUT,
        )
        .await?;
        add_member(&controller, &c1, id, member, &addr, &c1_dir.join("tls")).await?;
        args.extend(["--listen".into(), addr.clone()]);
        let last = st.processes.len() - 1;
        st.processes[last].address = addr;
        st.processes[last].restart_args = args;
        st.save(dir)?;
    }

    // One agent per node.
    let controllers = st.controller_addresses();
    if let (Some(node), Some(vmm)) = (node, vmm) {
        let images = dir.join("images");
        std::fs::create_dir_all(&images).map_err(|source| DevUpError::Io {
            action: "create",
            path: images.clone(),
            source,
        })?;
        for n in 1..=o.nodes {
            let node_id = format!("node-{n}");
            let data = dir.join(&node_id);
            let address = format!("127.0.0.1:{}", free_port()?);
            let mut args = vec!["run".to_owned(), "--node-id".into(), node_id.clone()];
            for c in &controllers {
                args.extend(["--controller".into(), c.clone()]);
            }
            args.extend([
                "--listen".into(),
                address.clone(),
                "--data-dir".into(),
                s(&data),
                "--image-dir".into(),
                s(&images),
                "--ca-file".into(),
                s(&ca_file(&st)),
                "--vmm".into(),
                s(&vmm),
            ]);
            if let Some(b) = bridge_name {
                args.extend(["--bridge".into(), b.to_owned()]);
            }
            st.processes.push(Process {
                role: Role::Node,
                id: node_id.clone(),
                address,
                pid: 0,
                log: logs.join(format!("{node_id}.log")),
                data_dir: data,
                program: node.clone(),
                restart_args: args,
            });
            eprintln!("starting {node_id}");
            let idx = st.processes.len() - 1;
            // The first start joins with a one-time token made for this
            // node; later starts use the certificate it keeps (so the
            // token is left out of the recorded command line).
            let token = join_token(&st, &node_id).await?;
            let recorded = st.processes[idx].restart_args.clone();
            st.processes[idx]
                .restart_args
                .extend(["--join-token".into(), token]);
            let printed = start(dir, &mut st, idx).await;
            st.processes[idx].restart_args = recorded;
            let printed = printed?;
            if !printed.is_empty() {
                st.processes[idx].address = printed;
            }
            st.save(dir)?;
        }
    }
    register_guest_file(dir, &guest)?;
    Ok(st)
}

/// The operator key of a dev cluster, in its directory. A dev cluster
/// keeps it beside the state it seals (so `up` can restart and grow the
/// cluster unattended); a real cluster keeps it elsewhere.
pub const OPERATOR_KEY_FILE: &str = "operator.key";

/// The cluster CA certificate: controller 1's `tls/ca.pem`, beside its
/// admin token.
pub fn ca_file(st: &ClusterState) -> PathBuf {
    st.token_file.with_file_name("tls").join("ca.pem")
}

/// A join token for `node_id` (`neph node join-token create --node`),
/// made as the bootstrap admin, retried while the cluster settles.
async fn join_token(st: &ClusterState, node_id: &str) -> Result<String, DevUpError> {
    let endpoint = st
        .controller_addresses()
        .first()
        .cloned()
        .unwrap_or_default();
    let trust = crate::client::Trust::from_file(&ca_file(st))
        .map_err(|e| DevUpError::Api(e.to_string()))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let token = std::fs::read_to_string(&st.token_file).unwrap_or_default();
        let tried = async {
            let conn = Conn::connect(&endpoint, Some(token.trim().to_owned()), &trust)
                .await
                .map_err(|e| DevUpError::Api(e.to_string()))?;
            conn.nodes()
                .create_join_token(infra::CreateJoinTokenRequest {
                    ttl: Some(prost_types::Duration {
                        seconds: 600,
                        nanos: 0,
                    }),
                    node_id: node_id.to_owned(),
                })
                .await
                .map(|r| r.into_inner().token)
                .map_err(api)
        };
        match tried.await {
            Ok(t) => return Ok(t),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// `neph-controller add-member`, retried while the cluster settles.
async fn add_member(
    controller: &Path,
    endpoint: &str,
    cluster_id: u64,
    member: u32,
    address: &str,
    tls_dir: &Path,
) -> Result<(), DevUpError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let out = tokio::process::Command::new(controller)
            .args(["add-member", "--endpoint", endpoint])
            .args(["--cluster-id", &cluster_id.to_string()])
            .args(["--id", &member.to_string(), "--address", address])
            .arg("--tls-dir")
            .arg(tls_dir)
            .env_remove("NEPHELE_ENDPOINT")
            .env_remove("NEPHELE_CLUSTER_ID")
            .env_remove("NEPHELE_TLS_DIR")
            .output()
            .await
            .map_err(|e| DevUpError::Join {
                id: member,
                message: e.to_string(),
            })?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DevUpError::Join {
                id: member,
                message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Copies the guest to `<dir>/images/test-guest/kernel` unless the image is
/// already there (a restarted cluster keeps the content it registered).
fn register_guest_file(dir: &Path, guest: &Path) -> Result<(), DevUpError> {
    let target_dir = dir.join("images").join(GUEST_IMAGE_ID);
    let kernel = target_dir.join("kernel");
    if kernel.is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(&target_dir)
        .and_then(|()| std::fs::copy(guest, &kernel).map(|_| ()))
        .map_err(|source| DevUpError::Io {
            action: "copy the test guest into",
            path: kernel,
            source,
        })
}

/// Starts every process of a stopped cluster again.
async fn restart(o: &UpOptions, mut st: ClusterState) -> Result<ClusterState, DevUpError> {
    if let Some(b) = &st.bridge
        && b == bridge::BRIDGE
        && is_root()
    {
        bridge::create()?;
    }
    for idx in 0..st.processes.len() {
        let p = &st.processes[idx];
        if p.restart_args.is_empty() {
            return Err(DevUpError::Api(format!(
                "{} {} never finished starting; run `neph dev down --purge` and `neph dev up`",
                p.role.as_str(),
                p.id
            )));
        }
        eprintln!("starting {} {}", p.role.as_str(), p.id);
        let printed = start(&o.dir, &mut st, idx).await;
        if let Err(e) = printed {
            if let Err(d) = super::down::stop(&o.dir) {
                eprintln!("neph: while cleaning up: {d}");
            }
            return Err(e);
        }
    }
    Ok(st)
}

fn api(e: tonic::Status) -> DevUpError {
    DevUpError::Api(CliError::from(e).to_string())
}

/// Whether a failed call may work when retried (no leader yet).
fn transient(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) || s.message().contains("leader")
}

/// Waits for the API and the nodes, registers what is missing and writes
/// the profile; prints the processes and what to do next when `announce`.
async fn ready(o: &UpOptions, st: &ClusterState, announce: bool) -> Result<(), DevUpError> {
    let endpoint = st
        .controller_addresses()
        .first()
        .cloned()
        .unwrap_or_default();
    let token = std::fs::read_to_string(&st.token_file).map_err(|source| DevUpError::Io {
        action: "read the admin token",
        path: st.token_file.clone(),
        source,
    })?;
    let trust = crate::client::Trust::from_file(&ca_file(st))
        .map_err(|e| DevUpError::Api(e.to_string()))?;
    let conn = Conn::connect(&endpoint, Some(token.trim().to_owned()), &trust)
        .await
        .map_err(|e| DevUpError::Api(e.to_string()))?;

    // The API answers once a leader is elected.
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match conn
            .flavors()
            .list_flavors(compute::ListFlavorsRequest::default())
            .await
        {
            Ok(_) => break,
            Err(e) if transient(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(api(e)),
        }
    }

    // A leader elected a moment ago can still lose its leadership (three
    // controllers starting on a busy machine): retry what may succeed on
    // the next leader. Every create here is idempotent (a request id, or
    // ALREADY_EXISTS taken as done).
    for (id, vcpus, memory_mib, disk_gib) in FLAVORS {
        let req = compute::CreateFlavorRequest {
            flavor_id: (*id).to_owned(),
            flavor: Some(compute::Flavor {
                name: String::new(),
                resources: Some(compute::Resources {
                    vcpus: *vcpus,
                    memory_mib: *memory_mib,
                    disk_gib: *disk_gib,
                }),
            }),
            request_id: format!("neph-dev-flavor-{id}"),
        };
        let r = retrying(deadline, || {
            let (mut c, req) = (conn.flavors(), req.clone());
            async move { c.create_flavor(req).await }
        })
        .await;
        ok_or_exists(r)?;
    }
    let req = iam::CreateProjectRequest {
        project_id: PROJECT.into(),
        project: Some(iam::Project {
            display_name: "Local development".into(),
            quota: Some(iam::Quota {
                instances: 100,
                vcpus: 200,
                memory_mib: 200 * 1024,
                disk_gib: 2000,
            }),
            ..Default::default()
        }),
        request_id: "neph-dev-project".into(),
    };
    let r = retrying(deadline, || {
        let (mut c, req) = (conn.iam(), req.clone());
        async move { c.create_project(req).await }
    })
    .await;
    ok_or_exists(r)?;
    let kernel = o.dir.join("images").join(GUEST_IMAGE_ID).join("kernel");
    if kernel.is_file() {
        let bytes = std::fs::read(&kernel).map_err(|source| DevUpError::Io {
            action: "read",
            path: kernel.clone(),
            source,
        })?;
        let req = compute::CreateImageRequest {
            image_id: GUEST_IMAGE_ID.into(),
            image: Some(compute::Image {
                format: "pvh-elf".into(),
                size_bytes: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
                checksum: nephele_proto::image::sha256_of(&bytes),
                ..Default::default()
            }),
            request_id: String::new(),
        };
        let r = retrying(deadline, || {
            let (mut c, req) = (conn.images(), req.clone());
            async move { c.create_image(req).await }
        })
        .await;
        ok_or_exists(r)?;
    }

    wait_nodes_up(&conn, st, &o.dir).await?;

    let config = crate::profile::config_path();
    let is_default = profile::write(
        &config,
        &DevProfile {
            endpoint: endpoint.clone(),
            token_file: st.token_file.clone(),
            ca_file: ca_file(st),
            project: PROJECT.into(),
        },
    )?;
    if announce {
        super::status(&o.dir, crate::output::Format::Table)
            .map_err(|e| DevUpError::Api(e.to_string()))?;
        let neph = if is_default {
            "neph"
        } else {
            "neph --profile dev"
        };
        eprintln!(
            "profile `dev` written to {}{}\n\
             next: {neph} instance create web-1 --flavor small --image {GUEST_IMAGE_ID} --wait\n\
             \x20     {neph} instance list; {neph} node list\n\
             stop: neph dev down    (keeps {}; --purge deletes it)",
            config.display(),
            if is_default { " (the default)" } else { "" },
            o.dir.display()
        );
    }
    Ok(())
}

/// Runs `call` until it succeeds, fails for good, or `deadline` passes.
async fn retrying<T, F, Fut>(deadline: Instant, mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    loop {
        match call().await {
            Err(e) if transient(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            r => return r,
        }
    }
}

fn ok_or_exists<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<(), DevUpError> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Code::AlreadyExists => Ok(()),
        Err(e) => Err(api(e)),
    }
}

/// Waits until every node of the state is registered and UP.
async fn wait_nodes_up(conn: &Conn, st: &ClusterState, dir: &Path) -> Result<(), DevUpError> {
    let wanted: Vec<String> = st
        .processes
        .iter()
        .filter(|p| p.role == Role::Node)
        .map(|p| format!("nodes/{}", p.id))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let deadline = Instant::now() + NODES_TIMEOUT;
    loop {
        let listed = conn
            .nodes()
            .list_nodes(infra::ListNodesRequest {
                page_size: 1000,
                page_token: String::new(),
                state: 0,
            })
            .await;
        let nodes = match listed {
            Ok(r) => r.into_inner().nodes,
            Err(e) if transient(&e) => Vec::new(),
            Err(e) => return Err(api(e)),
        };
        let missing: Vec<String> = wanted
            .iter()
            .filter_map(|w| match nodes.iter().find(|n| &n.name == w) {
                Some(n) if n.state == infra::NodeState::Up as i32 => None,
                Some(n) => Some(format!(
                    "{w} is {}",
                    infra::NodeState::try_from(n.state)
                        .map(|s| s.as_str_name())
                        .unwrap_or("in an unknown state")
                )),
                None => Some(format!("{w} is not registered")),
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DevUpError::NodesNotUp {
                waited: NODES_TIMEOUT,
                missing: missing.join(", "),
                logs: dir.join("logs"),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_are_never_zero() {
        for _ in 0..100 {
            assert!(cluster_id() > 0);
        }
    }

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = find_binary(Some(dir.path()), "neph-node", "neph-node").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("cargo build --release -p neph-node"), "{msg}");
        assert!(matches!(CliError::from(e), CliError::Usage(_)));
    }

    #[test]
    fn a_missing_guest_says_how_to_build_it() {
        let e = find_guest(Some(Path::new("/nonexistent/guest.elf"))).unwrap_err();
        assert!(e.to_string().contains("cargo xtask guest"), "{e}");
    }
}
