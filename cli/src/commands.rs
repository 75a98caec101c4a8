//! Every `neph` command: the clap grammar and what each does.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory as _, Parser, Subcommand};
use nephele_proto::compute::v1 as compute;
use nephele_proto::iam::v1 as iam;
use nephele_proto::infra::v1 as infra;
use nephele_proto::ops::v1 as ops;

use crate::client::{self, CliError, Conn};
use crate::console;
use crate::output::{self, Format, Record};
use crate::profile;
use crate::records;

/// Nephele command-line client.
#[derive(Debug, Parser)]
#[command(name = "neph", version, about = "Nephele cloud command-line client")]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Args)]
struct Global {
    /// Profile in $XDG_CONFIG_HOME/nephele/config.toml.
    #[arg(long, global = true, env = "NEPHELE_PROFILE")]
    profile: Option<String>,
    /// Controller address (host:port or http://host:port); several,
    /// comma-separated, are tried in turn when one is unavailable.
    #[arg(long, global = true, env = "NEPHELE_ENDPOINT")]
    endpoint: Option<String>,
    /// Bearer token.
    #[arg(long, global = true, env = "NEPHELE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token.
    #[arg(long, global = true, env = "NEPHELE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The cluster CA certificate (PEM) to verify controllers against.
    #[arg(long, global = true, env = "NEPHELE_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Project (id or projects/ID).
    #[arg(long, short = 'p', global = true, env = "NEPHELE_PROJECT")]
    project: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum)]
    output: Option<Format>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Projects and their quotas.
    #[command(subcommand)]
    Project(ProjectCmd),
    /// Users and their roles.
    #[command(subcommand)]
    User(UserCmd),
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Instance sizes.
    #[command(subcommand)]
    Flavor(FlavorCmd),
    /// Bootable images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Server groups (affinity and anti-affinity).
    #[command(subcommand)]
    Group(GroupCmd),
    /// Compute nodes (admins).
    #[command(subcommand)]
    Node(NodeCmd),
    /// Live migrations (admins).
    #[command(subcommand)]
    Migration(MigrationCmd),
    /// Long-running operations.
    #[command(subcommand)]
    Operation(OperationCmd),
    /// The event and audit log.
    #[command(subcommand)]
    Event(EventCmd),
    /// The controllers.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// A local cluster on this machine (development).
    Dev(crate::dev::DevArgs),
    /// Prints a shell completion script (`neph completion bash > /etc/bash_completion.d/neph`).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
struct Paging {
    /// Most results per call (the CLI follows every page).
    #[arg(long, default_value_t = 200)]
    page_size: i32,
}

#[derive(Debug, Args)]
struct Wait {
    /// Wait until the operation finishes.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds (exit code 3).
    #[arg(long, visible_alias = "wait-timeout", default_value_t = 300)]
    timeout: u64,
}

/// `--wait` for `instance stop`, whose `--timeout` is the guest's.
#[derive(Debug, Args)]
struct StopWait {
    /// Wait until the instance is stopped.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds (exit code 3).
    #[arg(long, default_value_t = 300)]
    wait_timeout: u64,
}

#[derive(Debug, Subcommand)]
enum ProjectCmd {
    /// Create a project (admins).
    Create {
        id: String,
        #[arg(long, default_value = "")]
        display_name: String,
        #[command(flatten)]
        quota: QuotaArgs,
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Show a project with its usage.
    Get { id: String },
    /// List the projects you have a role in.
    List(Paging),
    /// Change the limits given of a project's quota; the others stay
    /// (admins).
    SetQuota {
        id: String,
        #[command(flatten)]
        quota: QuotaChange,
    },
    /// Delete an empty project (admins).
    Delete { id: String },
}

#[derive(Debug, Args)]
struct QuotaArgs {
    /// Most instances.
    #[arg(long, default_value_t = 10)]
    instances: u64,
    /// Most vCPUs.
    #[arg(long, default_value_t = 20)]
    vcpus: u64,
    /// Most memory, MiB.
    #[arg(long, default_value_t = 51200)]
    memory_mib: u64,
    /// Most disk, GiB.
    #[arg(long, default_value_t = 1000)]
    disk_gib: u64,
}

/// The limits `project set-quota` changes: only those given.
#[derive(Debug, Args)]
struct QuotaChange {
    /// Most instances.
    #[arg(long)]
    instances: Option<u64>,
    /// Most vCPUs.
    #[arg(long)]
    vcpus: Option<u64>,
    /// Most memory, MiB.
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Most disk, GiB.
    #[arg(long)]
    disk_gib: Option<u64>,
}

impl QuotaChange {
    /// The quota message and the update mask naming the limits given.
    fn request(&self) -> Result<(iam::Quota, Vec<String>), CliError> {
        let given = [
            ("quota.instances", self.instances),
            ("quota.vcpus", self.vcpus),
            ("quota.memory_mib", self.memory_mib),
            ("quota.disk_gib", self.disk_gib),
        ];
        let paths: Vec<String> = given
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(p, _)| (*p).to_owned())
            .collect();
        if paths.is_empty() {
            return Err(CliError::Usage(
                "give at least one limit to change: --instances, --vcpus, --memory-mib, --disk-gib"
                    .into(),
            ));
        }
        let quota = iam::Quota {
            instances: self.instances.unwrap_or_default(),
            vcpus: self.vcpus.unwrap_or_default(),
            memory_mib: self.memory_mib.unwrap_or_default(),
            disk_gib: self.disk_gib.unwrap_or_default(),
        };
        Ok((quota, paths))
    }
}

#[derive(Debug, Subcommand)]
enum UserCmd {
    /// Create a user (admins).
    Create {
        id: String,
        /// Make the user a cluster admin.
        #[arg(long)]
        admin: bool,
        #[arg(long, default_value = "")]
        display_name: String,
    },
    /// Show a user (yourself with `me`).
    Get { id: String },
    /// List users (admins).
    List(Paging),
    /// Delete a user and its tokens (admins).
    Delete { id: String },
    /// Grant a role in a project, or revoke it with `--role none` (admins).
    Grant {
        id: String,
        /// reader, member or none.
        #[arg(long, value_parser = ["reader", "member", "none"])]
        role: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Create a token for a user; prints its secret once.
    Create { user: String, id: String },
    /// List a user's tokens.
    List { user: String },
    /// Revoke a token (users/U/tokens/T).
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
enum FlavorCmd {
    /// Create a flavor (admins).
    Create {
        id: String,
        #[arg(long)]
        vcpus: u64,
        #[arg(long)]
        memory_mib: u64,
        #[arg(long, default_value_t = 0)]
        disk_gib: u64,
    },
    Get {
        id: String,
    },
    List(Paging),
    /// Delete a flavor (admins).
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Create an image (admins). With --kernel (and --initrd, --cmdline,
    /// --disk) its content is uploaded to the controllers, which check it
    /// and hand it to the nodes that boot it; without, only the record is
    /// made and the content must be in every node's image directory.
    Create {
        id: String,
        /// pvh-elf, bzimage or raw (qcow2 is not supported yet: convert it
        /// with `qemu-img convert -O raw`); default: raw with --disk,
        /// pvh-elf otherwise.
        #[arg(long)]
        format: Option<String>,
        /// Upload this kernel (a PVH ELF or a bzImage).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Upload this initramfs with it.
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        /// The kernel command line, uploaded with it.
        #[arg(long, requires = "kernel")]
        cmdline: Option<String>,
        /// Upload this raw disk with it (format raw): each instance gets a
        /// copy.
        #[arg(long, requires = "kernel")]
        disk: Option<PathBuf>,
        /// Without an upload: take the record's size and SHA-256 from this
        /// local file.
        #[arg(long, conflicts_with = "kernel")]
        file: Option<PathBuf>,
        /// Makes a retried upload return the first result.
        #[arg(long, default_value = "")]
        request_id: String,
    },
    Get {
        id: String,
    },
    List(Paging),
    /// Delete an image (admins).
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum InstanceCmd {
    /// Create an instance (or --count N of them, named ID-1 ... ID-N, all or
    /// none).
    Create {
        id: String,
        #[arg(long)]
        flavor: String,
        #[arg(long)]
        image: String,
        /// Server group id.
        #[arg(long)]
        group: Option<String>,
        /// key=value, repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// High availability: restarted on another node when its node dies
        /// (once the dead node is fenced).
        #[arg(long)]
        ha: bool,
        #[command(flatten)]
        request: RequestId,
        #[command(flatten)]
        wait: Wait,
    },
    Get {
        id: String,
    },
    /// List instances of the project (--all-projects: admins).
    List {
        /// Only instances in this state (running, stopped, ...).
        #[arg(long)]
        state: Option<String>,
        /// Only instances on this node.
        #[arg(long)]
        node: Option<String>,
        /// Only instances carrying this label, key=value; repeatable (all
        /// must match).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long)]
        all_projects: bool,
        #[command(flatten)]
        paging: Paging,
    },
    Start {
        id: String,
        #[command(flatten)]
        request: RequestId,
        #[command(flatten)]
        wait: Wait,
    },
    /// Stop: the guest is asked to power off and forced off after the
    /// timeout.
    Stop {
        id: String,
        /// Seconds the guest may take to power off before its VM is forced
        /// off (default: the controllers', 30 s unless configured); 0
        /// forces it off at once.
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        #[command(flatten)]
        request: RequestId,
        #[command(flatten)]
        wait: StopWait,
    },
    /// Reboot a running instance (its node boots it again).
    Reboot {
        id: String,
        #[command(flatten)]
        request: RequestId,
        #[command(flatten)]
        wait: Wait,
    },
    /// Live-migrate a running instance to another node (admins).
    Migrate {
        id: String,
        /// The target node; without it the scheduler picks one (the node
        /// a drain of the instance's node would move it to).
        #[arg(long)]
        to: Option<String>,
        /// Downtime budget in milliseconds (default 50).
        #[arg(
            long,
            value_name = "MS",
            default_value_t = 0,
            hide_default_value = true
        )]
        max_downtime: u64,
        #[command(flatten)]
        wait: Wait,
    },
    /// Change the flavor of a stopped instance.
    Resize {
        id: String,
        #[arg(long)]
        flavor: String,
    },
    Delete {
        id: String,
        #[command(flatten)]
        request: RequestId,
        #[command(flatten)]
        wait: Wait,
    },
    /// Attach to the serial console: type into the guest, see its output.
    /// On a terminal, Ctrl-] detaches; from a pipe, each input line is sent
    /// and neph exits once stdin ends and the output settles.
    Console {
        id: String,
        /// With piped input: how long the output must stay quiet after the
        /// end of input before neph exits.
        #[arg(long, default_value_t = 1000)]
        settle_ms: u64,
    },
    /// Print the tail of the serial console log.
    ConsoleLog {
        id: String,
        /// Most bytes from the end (the controller's default is 64 KiB).
        #[arg(long, default_value_t = 0)]
        max_bytes: u64,
    },
}

#[derive(Debug, Args)]
struct RequestId {
    /// Makes the call idempotent: a retry with the same id returns the first
    /// result (neph picks one when not given, and reuses it when it retries
    /// on another controller).
    #[arg(long, default_value = "")]
    request_id: String,
}

impl RequestId {
    /// The given id, or a new one.
    fn get(&self) -> String {
        if self.request_id.is_empty() {
            client::new_request_id()
        } else {
            self.request_id.clone()
        }
    }
}

#[derive(Debug, Subcommand)]
enum GroupCmd {
    Create {
        id: String,
        /// affinity, anti-affinity, soft-affinity or soft-anti-affinity.
        #[arg(long, value_parser = ["affinity", "anti-affinity", "soft-affinity", "soft-anti-affinity"])]
        policy: String,
        /// With anti-affinity: members allowed on one node (default 1).
        #[arg(long, value_name = "N")]
        max_per_node: Option<u32>,
    },
    Get {
        id: String,
    },
    List(Paging),
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    List(Paging),
    /// A node in full: capacity, what its instances hold (allocated), its
    /// measured load and its instances by name.
    #[command(visible_alias = "show")]
    Get {
        id: String,
    },
    /// Take no new instances (running ones stay).
    Disable {
        id: String,
    },
    /// Take instances again (after disable or drain).
    Enable {
        id: String,
    },
    /// Live-migrate every instance off the node, each to where the
    /// scheduler's drain planner puts it; the node takes no new ones.
    /// Instances that cannot move are listed in `neph event list`.
    Drain {
        id: String,
    },
    /// Take instances again after a drain (the same as enable).
    Undrain {
        id: String,
    },
    /// Remove the node for good: deregister it and revoke its certificate
    /// (it cannot join again under this name). Drain it first.
    Remove {
        id: String,
    },
    /// Node join tokens: one-time, expiring, shown once.
    #[command(subcommand, name = "join-token")]
    JoinToken(JoinTokenCmd),
}

#[derive(Debug, Subcommand)]
enum JoinTokenCmd {
    /// A token one new node joins with (`neph-node --join-token`).
    Create {
        /// How long it may be used, seconds (at most 7 days).
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Only a node of this name may use it.
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum MigrationCmd {
    List(Paging),
    #[command(alias = "show")]
    Get {
        id: String,
    },
    /// Live-migrate an instance (projects/P/instances/I or ID in --project).
    Create {
        instance: String,
        /// The target node; without it the scheduler picks one.
        #[arg(long)]
        to: Option<String>,
        /// Downtime budget in milliseconds (default 50).
        #[arg(
            long,
            value_name = "MS",
            default_value_t = 0,
            hide_default_value = true
        )]
        max_downtime: u64,
    },
    /// Cancel a migration before its switchover: the VM stays on its
    /// source.
    Cancel {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum OperationCmd {
    Get {
        name: String,
    },
    List {
        #[arg(long)]
        pending: bool,
        #[command(flatten)]
        paging: Paging,
    },
    Wait {
        name: String,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
}

#[derive(Debug, Subcommand)]
enum EventCmd {
    List {
        /// Only this resource (full name).
        #[arg(long)]
        resource: Option<String>,
        /// The audit trail instead: every change a person made or tried,
        /// and every refused call (who, what, when, from where, result).
        #[arg(long)]
        audit: bool,
        #[command(flatten)]
        paging: Paging,
    },
    /// Stream events as they happen until interrupted (reconnecting, to
    /// another endpoint if need be, without losing or repeating any).
    Watch {
        /// Start after this event sequence number (from `event list`)
        /// instead of now.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Controllers, leader and counts (admins).
    Status,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("label {s:?} is not key=value"))
}

/// Everything a command needs: the connection, the output format and the
/// project.
struct Ctx {
    /// The controller calls go to (another one after a failover).
    current: std::cell::RefCell<Conn>,
    /// Every controller of the profile, in order.
    endpoints: Vec<String>,
    token: Option<String>,
    trust: client::Trust,
    format: Format,
    project: Option<String>,
}

impl Ctx {
    /// The controller calls go to.
    fn conn(&self) -> Conn {
        self.current.borrow().clone()
    }

    /// Runs `call`, which must be idempotent (a read, or a write carrying a
    /// request id); when the controller cannot serve it (UNAVAILABLE, or
    /// the outcome is unknown), runs it again on each endpoint in turn and
    /// keeps the first that serves it.
    async fn failover<T, F, Fut>(&self, mut call: F) -> Result<T, CliError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = match call(self.conn()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if client::retryable(&s) => s,
            Err(s) => return Err(s.into()),
        };
        for endpoint in &self.endpoints {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let Ok(conn) = Conn::connect(endpoint, self.token.clone(), &self.trust).await else {
                continue;
            };
            eprintln!("neph: {}; trying {endpoint}", last.message());
            match call(conn.clone()).await {
                Ok(r) => {
                    *self.current.borrow_mut() = conn;
                    return Ok(r.into_inner());
                }
                Err(s) if client::retryable(&s) => last = s,
                Err(s) => return Err(s.into()),
            }
        }
        Err(last.into())
    }

    fn project(&self) -> Result<String, CliError> {
        let p = self.project.clone().ok_or_else(|| {
            CliError::Usage(
                "no project: pass --project, set NEPHELE_PROJECT, or `project` in the profile"
                    .into(),
            )
        })?;
        Ok(if p.starts_with("projects/") {
            p
        } else {
            format!("projects/{p}")
        })
    }

    /// `ID` -> `projects/{project}/{collection}/ID`; full names pass.
    fn scoped(&self, collection: &str, id: &str) -> Result<String, CliError> {
        if id.contains('/') {
            return Ok(id.to_owned());
        }
        Ok(format!("{}/{collection}/{id}", self.project()?))
    }

    fn one(&self, r: &Record) {
        output::one(self.format, r);
    }

    fn list(&self, rows: &[Record], what: &str) {
        output::list(self.format, rows, what);
    }

    /// Prints every item as a row.
    fn rows<T>(&self, items: &[T], record: fn(&T) -> Record, what: &str) {
        self.list(&items.iter().map(record).collect::<Vec<_>>(), what);
    }

    /// Prints what `call` answers as one record.
    async fn show<T>(
        &self,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
        record: fn(&T) -> Record,
    ) -> Result<(), CliError> {
        self.one(&record(&call.await?.into_inner()));
        Ok(())
    }
}

/// Deletes `name` with `call` and says so.
async fn deleted<T, F>(name: String, call: impl FnOnce(String) -> F) -> Result<(), CliError>
where
    F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    call(name.clone()).await?;
    eprintln!("deleted {name}");
    Ok(())
}

fn global_name(collection: &str, id: &str) -> String {
    if id.contains('/') {
        id.to_owned()
    } else {
        format!("{collection}/{id}")
    }
}

async fn ctx(g: Global) -> Result<Ctx, CliError> {
    let path = profile::config_path();
    let p =
        profile::load(&path, g.profile.as_deref()).map_err(|e| CliError::Usage(e.to_string()))?;
    let endpoints = endpoints(g.endpoint, p.endpoint, p.endpoints);
    if endpoints.is_empty() {
        return Err(CliError::Usage(format!(
            "no controller endpoint: pass --endpoint, set NEPHELE_ENDPOINT, or `endpoint` in a profile of {}",
            path.display()
        )));
    }
    let token = match (g.token, g.token_file.or(p.token_file), p.token) {
        (Some(t), _, _) => Some(t),
        (None, Some(file), _) => Some(
            std::fs::read_to_string(&file)
                .map_err(|e| {
                    CliError::Usage(format!(
                        "cannot read the token file {}: {e}",
                        file.display()
                    ))
                })?
                .trim()
                .to_owned(),
        ),
        (None, None, t) => t,
    };
    let trust = match (g.ca_file.or(p.ca_file), p.ca_pem) {
        (Some(file), _) => client::Trust::from_file(&file)?,
        (None, Some(pem)) => client::Trust::from_pem(pem.as_bytes(), "the profile's ca_pem")?,
        (None, None) => return Err(client::Trust::missing()),
    };
    let format = match (g.output, p.output) {
        (Some(f), _) => f,
        (None, Some(s)) => Format::parse(&s).ok_or_else(|| {
            CliError::Usage(format!(
                "output {s:?} in the profile is not table, json or yaml"
            ))
        })?,
        (None, None) => Format::Table,
    };
    // The first controller that answers; the error of the last otherwise.
    let mut current = None;
    let mut error = None;
    for endpoint in &endpoints {
        match Conn::connect(endpoint, token.clone(), &trust).await {
            Ok(conn) => {
                current = Some(conn);
                break;
            }
            Err(e) => error = Some(e),
        }
    }
    let Some(conn) = current else {
        return Err(error.unwrap_or_else(|| CliError::Usage("no controller endpoint".into())));
    };
    Ok(Ctx {
        current: std::cell::RefCell::new(conn),
        endpoints,
        token,
        trust,
        format,
        project: g.project.or(p.project).filter(|p| !p.is_empty()),
    })
}

/// Every controller to try, in order: `--endpoint` (comma-separated) wins;
/// otherwise the profile's `endpoint`, then its `endpoints`.
fn endpoints(
    flag: Option<String>,
    endpoint: Option<String>,
    more: Option<Vec<String>>,
) -> Vec<String> {
    let listed: Vec<String> = match flag {
        Some(f) => f.split(',').map(str::to_owned).collect(),
        None => endpoint
            .into_iter()
            .chain(more.unwrap_or_default())
            .collect(),
    };
    let mut out: Vec<String> = Vec::new();
    for e in listed {
        let e = e.trim().to_owned();
        if !e.is_empty() && !out.contains(&e) {
            out.push(e);
        }
    }
    out
}

/// Runs the command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    // The commands that need no controller.
    let command = match cli.command {
        Cmd::Completion { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "neph", &mut std::io::stdout());
            return Ok(());
        }
        Cmd::Dev(args) => return crate::dev::run(args, cli.global.output).await,
        other => other,
    };
    let c = ctx(cli.global).await?;
    match command {
        Cmd::Completion { .. } | Cmd::Dev(_) => Ok(()),
        Cmd::Project(cmd) => project(&c, cmd).await,
        Cmd::User(cmd) => user(&c, cmd).await,
        Cmd::Token(cmd) => token(&c, cmd).await,
        Cmd::Flavor(cmd) => flavor(&c, cmd).await,
        Cmd::Image(cmd) => image(&c, cmd).await,
        Cmd::Instance(cmd) => instance(&c, cmd).await,
        Cmd::Group(cmd) => group(&c, cmd).await,
        Cmd::Node(cmd) => node(&c, cmd).await,
        Cmd::Migration(cmd) => migration(&c, cmd).await,
        Cmd::Operation(cmd) => operation(&c, cmd).await,
        Cmd::Event(cmd) => event(&c, cmd).await,
        Cmd::Cluster(ClusterCmd::Status) => {
            let s = c
                .conn()
                .cluster()
                .get_cluster_status(infra::GetClusterStatusRequest {})
                .await?
                .into_inner();
            c.one(&records::cluster(&s));
            Ok(())
        }
    }
}

/// Follows every page of a list call.
macro_rules! all_pages {
    ($page_size:expr, |$token:ident| $call:expr, $field:ident) => {{
        let mut out = Vec::new();
        let mut $token = String::new();
        loop {
            let r = $call.await?.into_inner();
            out.extend(r.$field);
            if r.next_page_token.is_empty() {
                break;
            }
            $token = r.next_page_token;
        }
        let _ = $page_size;
        out
    }};
}

fn quota(q: &QuotaArgs) -> iam::Quota {
    iam::Quota {
        instances: q.instances,
        vcpus: q.vcpus,
        memory_mib: q.memory_mib,
        disk_gib: q.disk_gib,
    }
}

async fn project(c: &Ctx, cmd: ProjectCmd) -> Result<(), CliError> {
    let mut iam_c = c.conn().iam();
    match cmd {
        ProjectCmd::Create {
            id,
            display_name,
            quota: q,
            request_id,
        } => {
            c.show(
                iam_c.create_project(iam::CreateProjectRequest {
                    project_id: id,
                    project: Some(iam::Project {
                        display_name,
                        quota: Some(quota(&q)),
                        ..Default::default()
                    }),
                    request_id,
                }),
                records::project,
            )
            .await?;
        }
        ProjectCmd::Get { id } => {
            c.show(
                iam_c.get_project(iam::GetProjectRequest {
                    name: global_name("projects", &id),
                }),
                records::project,
            )
            .await?;
        }
        ProjectCmd::List(pg) => {
            let all = all_pages!(
                pg.page_size,
                |t| iam_c.list_projects(iam::ListProjectsRequest {
                    page_size: pg.page_size,
                    page_token: t.clone(),
                }),
                projects
            );
            c.rows(&all, records::project, "projects");
        }
        ProjectCmd::SetQuota { id, quota: q } => {
            let (quota, paths) = q.request()?;
            c.show(
                iam_c.update_project(iam::UpdateProjectRequest {
                    project: Some(iam::Project {
                        name: global_name("projects", &id),
                        quota: Some(quota),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                }),
                records::project,
            )
            .await?;
        }
        ProjectCmd::Delete { id } => {
            deleted(global_name("projects", &id), |name| {
                iam_c.delete_project(iam::DeleteProjectRequest { name })
            })
            .await?;
        }
    }
    Ok(())
}

async fn user(c: &Ctx, cmd: UserCmd) -> Result<(), CliError> {
    let mut iam_c = c.conn().iam();
    match cmd {
        UserCmd::Create {
            id,
            admin,
            display_name,
        } => {
            c.show(
                iam_c.create_user(iam::CreateUserRequest {
                    user_id: id,
                    user: Some(iam::User {
                        display_name,
                        admin,
                        ..Default::default()
                    }),
                    request_id: String::new(),
                }),
                records::user,
            )
            .await?;
        }
        UserCmd::Get { id } => {
            let u = if id == "me" {
                iam_c.get_caller(iam::GetCallerRequest {}).await?
            } else {
                iam_c
                    .get_user(iam::GetUserRequest {
                        name: global_name("users", &id),
                    })
                    .await?
            }
            .into_inner();
            c.one(&records::user(&u));
        }
        UserCmd::List(pg) => {
            let all = all_pages!(
                pg.page_size,
                |t| iam_c.list_users(iam::ListUsersRequest {
                    page_size: pg.page_size,
                    page_token: t.clone(),
                }),
                users
            );
            c.rows(&all, records::user, "users");
        }
        UserCmd::Delete { id } => {
            deleted(global_name("users", &id), |name| {
                iam_c.delete_user(iam::DeleteUserRequest { name })
            })
            .await?;
        }
        UserCmd::Grant { id, role } => {
            let role = match role.as_str() {
                "reader" => iam::Role::Reader,
                "member" => iam::Role::Member,
                _ => iam::Role::Unspecified,
            };
            c.show(
                iam_c.set_role(iam::SetRoleRequest {
                    user: global_name("users", &id),
                    project: c.project()?,
                    role: role as i32,
                }),
                records::user,
            )
            .await?;
        }
    }
    Ok(())
}

async fn token(c: &Ctx, cmd: TokenCmd) -> Result<(), CliError> {
    let mut iam_c = c.conn().iam();
    match cmd {
        TokenCmd::Create { user, id } => {
            let r = iam_c
                .create_token(iam::CreateTokenRequest {
                    parent: global_name("users", &user),
                    token_id: id,
                    token: None,
                })
                .await?
                .into_inner();
            let mut rec = r.token.as_ref().map(records::token).unwrap_or_default();
            rec.push(("secret", r.secret.clone().into()));
            c.one(&rec);
            eprintln!("the secret is shown once: store it now");
        }
        TokenCmd::List { user } => {
            let parent = global_name("users", &user);
            let all = all_pages!(
                0,
                |t| iam_c.list_tokens(iam::ListTokensRequest {
                    parent: parent.clone(),
                    page_size: 0,
                    page_token: t.clone(),
                }),
                tokens
            );
            c.rows(&all, records::token, "tokens");
        }
        TokenCmd::Delete { name } => {
            iam_c
                .delete_token(iam::DeleteTokenRequest { name: name.clone() })
                .await?;
            eprintln!("deleted {name}");
        }
    }
    Ok(())
}

async fn flavor(c: &Ctx, cmd: FlavorCmd) -> Result<(), CliError> {
    let mut f = c.conn().flavors();
    match cmd {
        FlavorCmd::Create {
            id,
            vcpus,
            memory_mib,
            disk_gib,
        } => {
            let r = f
                .create_flavor(compute::CreateFlavorRequest {
                    flavor_id: id,
                    flavor: Some(compute::Flavor {
                        name: String::new(),
                        resources: Some(compute::Resources {
                            vcpus,
                            memory_mib,
                            disk_gib,
                        }),
                    }),
                    request_id: String::new(),
                })
                .await?
                .into_inner();
            c.one(&records::flavor(&r));
        }
        FlavorCmd::Get { id } => {
            c.show(
                f.get_flavor(compute::GetFlavorRequest {
                    name: global_name("flavors", &id),
                }),
                records::flavor,
            )
            .await?;
        }
        FlavorCmd::List(pg) => {
            let all = all_pages!(
                pg.page_size,
                |t| f.list_flavors(compute::ListFlavorsRequest {
                    page_size: pg.page_size,
                    page_token: t.clone(),
                }),
                flavors
            );
            c.rows(&all, records::flavor, "flavors");
        }
        FlavorCmd::Delete { id } => {
            deleted(global_name("flavors", &id), |name| {
                f.delete_flavor(compute::DeleteFlavorRequest { name })
            })
            .await?;
        }
    }
    Ok(())
}

/// Size and `sha256:` checksum of a local file, read in chunks.
fn file_digest(path: &std::path::Path) -> Result<(u64, String), CliError> {
    digest(Part::File(path.to_owned()).open()?)
}

/// Size and `sha256:` checksum of what `read` yields, read in chunks.
fn digest(mut read: Box<dyn std::io::Read + Send>) -> Result<(u64, String), CliError> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; nephele_proto::image::CHUNK_BYTES];
    let mut size = 0u64;
    loop {
        let n = read
            .read(&mut buf)
            .map_err(|e| CliError::Usage(format!("cannot read a file of the image: {e}")))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, nephele_proto::image::sha256_checksum(&h.finalize())))
}

/// One file of an image to upload.
enum Part {
    File(PathBuf),
    Text(String),
}

impl Part {
    /// The part's bytes, from the start.
    fn open(&self) -> Result<Box<dyn std::io::Read + Send>, CliError> {
        Ok(match self {
            Part::File(p) => Box::new(
                std::fs::File::open(p)
                    .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", p.display())))?,
            ),
            Part::Text(t) => Box::new(std::io::Cursor::new(t.clone().into_bytes())),
        })
    }
}

/// Uploads an image: its manifest (sizes and checksums read here first),
/// then the files' bytes in 1 MiB messages, with a progress line on a
/// terminal. A file that changes while it is sent fails the checksum on
/// the controller, and nothing is created.
async fn upload_image(
    im: &mut compute::images_client::ImagesClient<client::Svc>,
    image_id: String,
    format: String,
    parts: Vec<(&'static str, Part)>,
    request_id: String,
) -> Result<compute::Image, CliError> {
    let mut files = Vec::new();
    for (role, part) in &parts {
        let (size_bytes, checksum) = digest(part.open()?)?;
        files.push(compute::ImageFile {
            role: (*role).to_owned(),
            size_bytes,
            checksum,
        });
    }
    nephele_proto::image::check_files(&format, &files).map_err(CliError::Usage)?;
    let total: u64 = files.iter().map(|f| f.size_bytes).sum();
    let first = compute::UploadImageRequest {
        create: Some(compute::CreateImageRequest {
            image_id,
            image: Some(compute::Image {
                format,
                ..Default::default()
            }),
            request_id,
        }),
        files,
        data: Vec::new(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let tty = std::io::stderr().is_terminal();
    // The files are read on a blocking thread as the stream takes them.
    let reader = tokio::task::spawn_blocking(move || -> Result<(), CliError> {
        use std::io::Read as _;
        if tx.blocking_send(first).is_err() {
            return Ok(());
        }
        let mut sent = 0u64;
        let mut shown = Instant::now();
        for (_, part) in parts {
            let mut read = part.open()?;
            loop {
                let mut buf = vec![0u8; nephele_proto::image::CHUNK_BYTES];
                let n = read.read(&mut buf).map_err(|e| {
                    CliError::Usage(format!("cannot read a file of the image: {e}"))
                })?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                sent += n as u64;
                let message = compute::UploadImageRequest {
                    data: buf,
                    ..Default::default()
                };
                if tx.blocking_send(message).is_err() {
                    return Ok(());
                }
                if tty && shown.elapsed() >= Duration::from_millis(200) {
                    shown = Instant::now();
                    eprint!(
                        "\ruploading {:>3}% ({} of {} MiB)",
                        sent * 100 / total.max(1),
                        sent >> 20,
                        total >> 20
                    );
                }
            }
        }
        if tty {
            eprint!("\r\x1b[K");
        }
        Ok(())
    });
    let answer = im
        .upload_image(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    match reader.await {
        Ok(Err(e)) => return Err(e),
        Ok(Ok(())) => {}
        Err(e) => return Err(CliError::Usage(format!("reading the image failed: {e}"))),
    }
    Ok(answer?.into_inner())
}

async fn image(c: &Ctx, cmd: ImageCmd) -> Result<(), CliError> {
    let mut im = c.conn().images();
    match cmd {
        ImageCmd::Create {
            id,
            format,
            kernel: Some(kernel),
            initrd,
            cmdline,
            disk,
            file: _,
            request_id,
        } => {
            let format =
                format.unwrap_or_else(|| if disk.is_some() { "raw" } else { "pvh-elf" }.to_owned());
            let mut parts = vec![("kernel", Part::File(kernel))];
            parts.extend(initrd.map(|f| ("initrd", Part::File(f))));
            parts.extend(cmdline.map(|t| ("cmdline", Part::Text(t))));
            parts.extend(disk.map(|f| ("disk", Part::File(f))));
            let image = upload_image(&mut im, id, format, parts, request_id).await?;
            c.one(&records::image(&image));
        }
        ImageCmd::Create {
            id,
            format,
            file,
            request_id,
            ..
        } => {
            let (size_bytes, checksum) = match file {
                Some(f) => file_digest(&f)?,
                None => (0, String::new()),
            };
            c.show(
                im.create_image(compute::CreateImageRequest {
                    image_id: id,
                    image: Some(compute::Image {
                        format: format.unwrap_or_else(|| "pvh-elf".into()),
                        size_bytes,
                        checksum,
                        ..Default::default()
                    }),
                    request_id,
                }),
                records::image,
            )
            .await?;
        }
        ImageCmd::Get { id } => {
            c.show(
                im.get_image(compute::GetImageRequest {
                    name: global_name("images", &id),
                }),
                records::image,
            )
            .await?;
        }
        ImageCmd::List(pg) => {
            let all = all_pages!(
                pg.page_size,
                |t| im.list_images(compute::ListImagesRequest {
                    page_size: pg.page_size,
                    page_token: t.clone(),
                }),
                images
            );
            c.rows(&all, records::image, "images");
        }
        ImageCmd::Delete { id } => {
            deleted(global_name("images", &id), |name| {
                im.delete_image(compute::DeleteImageRequest { name })
            })
            .await?;
        }
    }
    Ok(())
}

/// Waits for `operations`, showing the instances' states as they change:
/// a redrawn line on a terminal, plain lines otherwise.
async fn wait_for(
    c: &Ctx,
    operations: &[ops::Operation],
    timeout: u64,
) -> Result<Vec<ops::Operation>, CliError> {
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(timeout);
    let mut shown: HashMap<String, String> = HashMap::new();
    let mut done = Vec::new();
    let spinner = ['|', '/', '-', '\\'];
    let mut tick = 0usize;
    for op in operations {
        let mut op = op.clone();
        loop {
            if op.done {
                break;
            }
            if Instant::now() >= deadline {
                if tty {
                    eprintln!();
                }
                return Err(CliError::WaitTimeout(format!(
                    "{} ({} {}) is not done after {timeout} s; it goes on: `neph operation wait {}`",
                    op.name, op.verb, op.target, op.name
                )));
            }
            // A controller going away mid-wait: carry on with another.
            let request = ops::WaitOperationRequest {
                name: op.name.clone(),
                timeout: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
            };
            op = c
                .failover(|conn| {
                    let r = request.clone();
                    async move { conn.operations().wait_operation(r).await }
                })
                .await?;
            let state = match c
                .conn()
                .instances()
                .get_instance(compute::GetInstanceRequest {
                    name: op.target.clone(),
                })
                .await
            {
                Ok(i) => records::instance_state(i.get_ref().state),
                Err(s) if s.code() == tonic::Code::NotFound => "gone".to_owned(),
                Err(_) => String::new(),
            };
            let short = op.target.rsplit('/').next().unwrap_or_default().to_owned();
            if tty {
                tick += 1;
                eprint!(
                    "\r\x1b[K{} {} {short}: {state} ({:.1} s)",
                    spinner[tick % spinner.len()],
                    op.verb,
                    start.elapsed().as_secs_f64()
                );
            } else if shown.get(&op.target) != Some(&state) && !state.is_empty() {
                eprintln!("{} {short}: {state}", op.verb);
            }
            shown.insert(op.target.clone(), state);
        }
        if tty {
            eprintln!(
                "\r\x1b[K{} {}: {} ({:.1} s)",
                op.verb,
                op.target.rsplit('/').next().unwrap_or_default(),
                if op.error.is_empty() {
                    "done"
                } else {
                    "failed"
                },
                start.elapsed().as_secs_f64()
            );
        }
        if !op.error.is_empty() {
            return Err(CliError::Api(format!(
                "{} {} failed: {}",
                op.verb, op.target, op.error
            )));
        }
        done.push(op);
    }
    Ok(done)
}

/// Prints operations, or waits for them and prints what they worked on.
async fn finish(c: &Ctx, operations: Vec<ops::Operation>, wait: &Wait) -> Result<(), CliError> {
    if !wait.wait {
        let rows: Vec<Record> = operations.iter().map(records::operation).collect();
        if rows.len() == 1 {
            c.one(&rows[0]);
        } else {
            c.list(&rows, "operations");
        }
        return Ok(());
    }
    let done = wait_for(c, &operations, wait.timeout).await?;
    let mut rows = Vec::new();
    let mut inst = c.conn().instances();
    for op in &done {
        match inst
            .get_instance(compute::GetInstanceRequest {
                name: op.target.clone(),
            })
            .await
        {
            Ok(i) => rows.push(records::instance(i.get_ref())),
            Err(_) => rows.push(records::operation(op)),
        }
    }
    if rows.len() == 1 {
        c.one(&rows[0]);
    } else {
        c.list(&rows, "instances");
    }
    Ok(())
}

/// An instance lifecycle call, as `failover` retries it.
#[derive(Debug, Clone, Copy)]
enum Action {
    Start,
    /// With the graceful timeout in seconds, if given.
    Stop(Option<u64>),
    Reboot,
    Delete,
}

async fn act(
    conn: Conn,
    action: Action,
    name: String,
    request_id: String,
) -> Result<tonic::Response<ops::Operation>, tonic::Status> {
    let mut ic = conn.instances();
    match action {
        Action::Start => {
            ic.start_instance(compute::StartInstanceRequest { name, request_id })
                .await
        }
        Action::Stop(timeout) => {
            ic.stop_instance(compute::StopInstanceRequest {
                name,
                timeout: timeout.map(|s| prost_types::Duration {
                    seconds: i64::try_from(s).unwrap_or(i64::MAX),
                    nanos: 0,
                }),
                request_id,
            })
            .await
        }
        Action::Reboot => {
            ic.reboot_instance(compute::RebootInstanceRequest { name, request_id })
                .await
        }
        Action::Delete => {
            ic.delete_instance(compute::DeleteInstanceRequest { name, request_id })
                .await
        }
    }
}

/// Starts, stops, reboots or deletes `id`, retried on another controller
/// with the same request id when one is unavailable.
async fn lifecycle(
    c: &Ctx,
    action: Action,
    id: &str,
    request: &RequestId,
    wait: &Wait,
) -> Result<(), CliError> {
    let name = c.scoped("instances", id)?;
    let rid = request.get();
    let op = c
        .failover(|conn| act(conn, action, name.clone(), rid.clone()))
        .await?;
    if matches!(action, Action::Delete) && wait.wait {
        wait_for(c, std::slice::from_ref(&op), wait.timeout).await?;
        eprintln!("deleted {}", op.target);
        return Ok(());
    }
    finish(c, vec![op], wait).await
}

async fn instance(c: &Ctx, cmd: InstanceCmd) -> Result<(), CliError> {
    let mut ic = c.conn().instances();
    match cmd {
        InstanceCmd::Create {
            id,
            flavor,
            image,
            group,
            labels,
            count,
            ha,
            request,
            wait,
        } => {
            let parent = c.project()?;
            let template = compute::Instance {
                flavor: global_name("flavors", &flavor),
                image: global_name("images", &image),
                server_group: match group {
                    Some(g) => c.scoped("serverGroups", &g)?,
                    None => String::new(),
                },
                labels: labels.into_iter().collect(),
                ha,
                ..Default::default()
            };
            let request_id = request.get();
            let operations = if count == 1 {
                let r = compute::CreateInstanceRequest {
                    parent,
                    instance_id: id,
                    instance: Some(template),
                    request_id,
                };
                vec![
                    c.failover(|conn| {
                        let r = r.clone();
                        async move { conn.instances().create_instance(r).await }
                    })
                    .await?,
                ]
            } else {
                let r = compute::BatchCreateInstancesRequest {
                    parent,
                    instance_id: id,
                    count,
                    instance: Some(template),
                    request_id,
                };
                c.failover(|conn| {
                    let r = r.clone();
                    async move { conn.instances().batch_create_instances(r).await }
                })
                .await?
                .operations
            };
            finish(c, operations, &wait).await
        }
        InstanceCmd::Get { id } => {
            let request = compute::GetInstanceRequest {
                name: c.scoped("instances", &id)?,
            };
            let i = c
                .failover(|conn| {
                    let r = request.clone();
                    async move { conn.instances().get_instance(r).await }
                })
                .await?;
            c.one(&records::instance(&i));
            Ok(())
        }
        InstanceCmd::List {
            state,
            node,
            labels,
            all_projects,
            paging,
        } => {
            let labels: HashMap<String, String> = labels.into_iter().collect();
            let parent = if all_projects {
                "projects/-".to_owned()
            } else {
                c.project()?
            };
            let state = match state {
                None => 0,
                Some(s) => compute::InstanceState::from_str_name(&s.to_uppercase())
                    .map(|s| s as i32)
                    .ok_or_else(|| {
                        CliError::Usage(format!(
                            "state {s:?} is not one of pending, scheduled, starting, running, stopping, stopped, migrating, deleting, error"
                        ))
                    })?,
            };
            let node = node.map(|n| global_name("nodes", &n)).unwrap_or_default();
            let all = all_pages!(
                paging.page_size,
                |t| ic.list_instances(compute::ListInstancesRequest {
                    parent: parent.clone(),
                    page_size: paging.page_size,
                    page_token: t.clone(),
                    state,
                    node: node.clone(),
                    labels: labels.clone(),
                }),
                instances
            );
            c.rows(&all, records::instance, "instances");
            Ok(())
        }
        InstanceCmd::Start { id, request, wait } => {
            lifecycle(c, Action::Start, &id, &request, &wait).await
        }
        InstanceCmd::Stop {
            id,
            timeout,
            request,
            wait,
        } => {
            let wait = Wait {
                wait: wait.wait,
                timeout: wait.wait_timeout,
            };
            lifecycle(c, Action::Stop(timeout), &id, &request, &wait).await
        }
        InstanceCmd::Reboot { id, request, wait } => {
            lifecycle(c, Action::Reboot, &id, &request, &wait).await
        }
        InstanceCmd::Delete { id, request, wait } => {
            lifecycle(c, Action::Delete, &id, &request, &wait).await
        }
        InstanceCmd::Migrate {
            id,
            to,
            max_downtime,
            wait,
        } => start_migration(c, &id, to.as_deref(), max_downtime, &wait).await,
        InstanceCmd::Resize { id, flavor } => {
            c.show(
                ic.resize_instance(compute::ResizeInstanceRequest {
                    name: c.scoped("instances", &id)?,
                    flavor: global_name("flavors", &flavor),
                    request_id: String::new(),
                }),
                records::instance,
            )
            .await?;
            Ok(())
        }
        InstanceCmd::Console { id, settle_ms } => {
            let name = c.scoped("instances", &id)?;
            console::attach(&c.conn(), name, Duration::from_millis(settle_ms)).await
        }
        InstanceCmd::ConsoleLog { id, max_bytes } => {
            let log = ic
                .get_console_log(compute::GetConsoleLogRequest {
                    name: c.scoped("instances", &id)?,
                    max_bytes,
                })
                .await?
                .into_inner();
            use std::io::Write as _;
            let mut out = std::io::stdout();
            let _ = out.write_all(&log.data);
            let _ = out.flush();
            Ok(())
        }
    }
}

async fn group(c: &Ctx, cmd: GroupCmd) -> Result<(), CliError> {
    let mut gc = c.conn().groups();
    match cmd {
        GroupCmd::Create {
            id,
            policy,
            max_per_node,
        } => {
            let policy = match policy.as_str() {
                "affinity" => compute::GroupPolicy::Affinity,
                "anti-affinity" => compute::GroupPolicy::AntiAffinity,
                "soft-affinity" => compute::GroupPolicy::SoftAffinity,
                _ => compute::GroupPolicy::SoftAntiAffinity,
            };
            c.show(
                gc.create_server_group(compute::CreateServerGroupRequest {
                    parent: c.project()?,
                    server_group_id: id,
                    server_group: Some(compute::ServerGroup {
                        policy: policy as i32,
                        max_per_node: max_per_node.unwrap_or(0),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                }),
                records::group,
            )
            .await?;
        }
        GroupCmd::Get { id } => {
            c.show(
                gc.get_server_group(compute::GetServerGroupRequest {
                    name: c.scoped("serverGroups", &id)?,
                }),
                records::group,
            )
            .await?;
        }
        GroupCmd::List(pg) => {
            let parent = c.project()?;
            let all = all_pages!(
                pg.page_size,
                |t| gc.list_server_groups(compute::ListServerGroupsRequest {
                    parent: parent.clone(),
                    page_size: pg.page_size,
                    page_token: t.clone(),
                }),
                server_groups
            );
            c.rows(&all, records::group, "server groups");
        }
        GroupCmd::Delete { id } => {
            deleted(c.scoped("serverGroups", &id)?, |name| {
                gc.delete_server_group(compute::DeleteServerGroupRequest { name })
            })
            .await?;
        }
    }
    Ok(())
}

async fn node(c: &Ctx, cmd: NodeCmd) -> Result<(), CliError> {
    let mut nc = c.conn().nodes();
    let n = match cmd {
        NodeCmd::List(pg) => {
            let all = all_pages!(
                pg.page_size,
                |t| nc.list_nodes(infra::ListNodesRequest {
                    page_size: pg.page_size,
                    page_token: t.clone(),
                    state: 0,
                }),
                nodes
            );
            c.rows(&all, records::node, "nodes");
            return Ok(());
        }
        NodeCmd::Get { id } => {
            let request = infra::GetNodeRequest {
                name: global_name("nodes", &id),
            };
            let mut n = nc.get_node(request.clone()).await?.into_inner();
            if n.load.is_none() {
                n.load = leader_load(c, request).await;
            }
            c.one(&records::node_detail(&n));
            return Ok(());
        }
        NodeCmd::Disable { id } => nc
            .disable_node(infra::DisableNodeRequest {
                name: global_name("nodes", &id),
            })
            .await?
            .into_inner(),
        NodeCmd::Enable { id } | NodeCmd::Undrain { id } => nc
            .enable_node(infra::EnableNodeRequest {
                name: global_name("nodes", &id),
            })
            .await?
            .into_inner(),
        NodeCmd::Drain { id } => nc
            .drain_node(infra::DrainNodeRequest {
                name: global_name("nodes", &id),
            })
            .await?
            .into_inner(),
        NodeCmd::Remove { id } => {
            let name = global_name("nodes", &id);
            nc.remove_node(infra::RemoveNodeRequest { name: name.clone() })
                .await?;
            eprintln!("removed {name}; its certificate is revoked");
            return Ok(());
        }
        NodeCmd::JoinToken(JoinTokenCmd::Create { ttl, node }) => {
            let t = nc
                .create_join_token(infra::CreateJoinTokenRequest {
                    ttl: Some(prost_types::Duration {
                        seconds: i64::try_from(ttl).unwrap_or(i64::MAX),
                        nanos: 0,
                    }),
                    node_id: node.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let rec: crate::output::Record = vec![
                ("name", t.name.clone().into()),
                ("token", t.token.clone().into()),
                ("node", t.node_id.clone().into()),
                ("expire_time", records::time(t.expire_time.as_ref())),
            ];
            c.one(&rec);
            eprintln!("the token is shown once and works once: give it to the new node now");
            return Ok(());
        }
    };
    c.one(&records::node(&n));
    Ok(())
}

/// A node's measured load as the leader knows it. Loads are not
/// replicated: each controller keeps those of the heartbeats it received,
/// and agents send theirs to the leader. Best effort: `None` when the
/// leader is unknown or does not answer.
async fn leader_load(c: &Ctx, request: infra::GetNodeRequest) -> Option<infra::Load> {
    let status = c
        .conn()
        .cluster()
        .get_cluster_status(infra::GetClusterStatusRequest {})
        .await
        .ok()?
        .into_inner();
    let leader = status.controllers.iter().find(|m| m.leader)?;
    if leader.id == status.answered_by {
        return None;
    }
    let conn = Conn::connect(&leader.address, c.token.clone(), &c.trust)
        .await
        .ok()?;
    conn.nodes().get_node(request).await.ok()?.into_inner().load
}

async fn migration(c: &Ctx, cmd: MigrationCmd) -> Result<(), CliError> {
    let mut mc = c.conn().migrations();
    match cmd {
        MigrationCmd::List(pg) => {
            let all = all_pages!(
                pg.page_size,
                |t| mc.list_migrations(infra::ListMigrationsRequest {
                    page_size: pg.page_size,
                    page_token: t.clone(),
                }),
                migrations
            );
            c.rows(&all, records::migration, "migrations");
        }
        MigrationCmd::Get { id } => {
            c.show(
                mc.get_migration(infra::GetMigrationRequest {
                    name: global_name("migrations", &id),
                }),
                records::migration,
            )
            .await?;
        }
        MigrationCmd::Cancel { id } => {
            c.show(
                mc.cancel_migration(infra::CancelMigrationRequest {
                    name: global_name("migrations", &id),
                }),
                records::migration,
            )
            .await?;
        }
        MigrationCmd::Create {
            instance,
            to,
            max_downtime,
        } => {
            let no_wait = Wait {
                wait: false,
                timeout: 0,
            };
            start_migration(c, &instance, to.as_deref(), max_downtime, &no_wait).await?;
        }
    }
    Ok(())
}

/// `neph instance migrate`: creates the migration and, with `--wait`,
/// follows it to its end (an error unless it completed).
async fn start_migration(
    c: &Ctx,
    id: &str,
    to: Option<&str>,
    max_downtime: u64,
    wait: &Wait,
) -> Result<(), CliError> {
    let mut mc = c.conn().migrations();
    let op = mc
        .create_migration(infra::CreateMigrationRequest {
            instance: c.scoped("instances", id)?,
            target: to.map(|t| global_name("nodes", t)).unwrap_or_default(),
            request_id: String::new(),
            max_downtime_ms: max_downtime,
        })
        .await?
        .into_inner();
    if !wait.wait {
        c.one(&records::operation(&op));
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(wait.timeout);
    loop {
        let m = mc
            .get_migration(infra::GetMigrationRequest {
                name: op.name.clone(),
            })
            .await?
            .into_inner();
        let state = infra::MigrationState::try_from(m.state).unwrap_or_default();
        match state {
            infra::MigrationState::Completed => {
                c.one(&records::migration(&m));
                return Ok(());
            }
            infra::MigrationState::Failed | infra::MigrationState::Cancelled => {
                c.one(&records::migration(&m));
                return Err(CliError::Api(format!(
                    "{} ended {}: {}",
                    m.name,
                    state.as_str_name(),
                    m.reason
                )));
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(CliError::WaitTimeout(format!(
                "{} is not done after {} s; it goes on: `neph migration get {}`",
                m.name, wait.timeout, m.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn operation(c: &Ctx, cmd: OperationCmd) -> Result<(), CliError> {
    let mut oc = c.conn().operations();
    match cmd {
        OperationCmd::Get { name } => {
            c.show(
                oc.get_operation(ops::GetOperationRequest {
                    name: global_name("operations", &name),
                }),
                records::operation,
            )
            .await?;
        }
        OperationCmd::List { pending, paging } => {
            let project = c
                .project
                .clone()
                .map(|p| global_name("projects", &p))
                .unwrap_or_default();
            let all = all_pages!(
                paging.page_size,
                |t| oc.list_operations(ops::ListOperationsRequest {
                    page_size: paging.page_size,
                    page_token: t.clone(),
                    project: project.clone(),
                    only_pending: pending,
                }),
                operations
            );
            c.rows(&all, records::operation, "operations");
        }
        OperationCmd::Wait { name, timeout } => {
            let o = oc
                .get_operation(ops::GetOperationRequest {
                    name: global_name("operations", &name),
                })
                .await?
                .into_inner();
            let done = wait_for(c, &[o], timeout).await?;
            c.rows(&done, records::operation, "operations");
        }
    }
    Ok(())
}

async fn event(c: &Ctx, cmd: EventCmd) -> Result<(), CliError> {
    let mut ec = c.conn().events();
    let project = c
        .project
        .clone()
        .map(|p| global_name("projects", &p))
        .unwrap_or_default();
    match cmd {
        EventCmd::List {
            resource,
            audit,
            paging,
        } => {
            let resource = resource.unwrap_or_default();
            let all = all_pages!(
                paging.page_size,
                |t| ec.list_events(ops::ListEventsRequest {
                    page_size: paging.page_size,
                    page_token: t.clone(),
                    project: project.clone(),
                    resource: resource.clone(),
                    audit,
                }),
                events
            );
            if audit {
                c.rows(&all, records::audit, "audit records");
            } else {
                c.rows(&all, records::event, "events");
            }
        }
        EventCmd::Watch { after } => watch_events(c, project, after).await?,
    }
    Ok(())
}

/// Prints events from `after` on as they come; when the stream breaks
/// because its controller went away, opens it again after the last one
/// printed.
async fn watch_events(c: &Ctx, project: String, mut after: u64) -> Result<(), CliError> {
    loop {
        let request = ops::WatchEventsRequest {
            project: project.clone(),
            after_seq: after,
        };
        let mut stream = c
            .failover(|conn| {
                let r = request.clone();
                async move { conn.events().watch_events(r).await }
            })
            .await?;
        loop {
            let e = match stream.message().await {
                Ok(Some(e)) => e,
                Ok(None) => return Ok(()),
                Err(s) if client::retryable(&s) => {
                    eprintln!(
                        "neph: the event stream broke ({}); reconnecting",
                        s.message()
                    );
                    break;
                }
                Err(s) => return Err(s.into()),
            };
            after = e.seq;
            match c.format {
                Format::Table => println!(
                    "{} {} {} {} {} {}",
                    e.seq,
                    records::time(e.time.as_ref()).as_str().unwrap_or_default(),
                    e.actor,
                    e.kind,
                    e.resource,
                    e.message
                ),
                _ => {
                    let obj: serde_json::Map<String, serde_json::Value> = records::event(&e)
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect();
                    println!("{}", serde_json::Value::Object(obj));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn stop_takes_the_guests_timeout_and_its_own_wait_timeout() {
        let cli = Cli::try_parse_from([
            "neph",
            "instance",
            "stop",
            "web-1",
            "--timeout",
            "7",
            "--wait",
            "--wait-timeout",
            "60",
        ])
        .unwrap();
        let Cmd::Instance(InstanceCmd::Stop { timeout, wait, .. }) = cli.command else {
            panic!("not a stop: {:?}", cli.command);
        };
        assert_eq!(timeout, Some(7));
        assert!(wait.wait);
        assert_eq!(wait.wait_timeout, 60);
        let cli = Cli::try_parse_from(["neph", "instance", "stop", "web-1"]).unwrap();
        let Cmd::Instance(InstanceCmd::Stop { timeout, wait, .. }) = cli.command else {
            panic!("not a stop");
        };
        assert_eq!(timeout, None);
        assert_eq!(wait.wait_timeout, 300);
        // Everywhere else `--timeout` is the wait's, `--wait-timeout` too.
        let cli =
            Cli::try_parse_from(["neph", "instance", "start", "web-1", "--wait-timeout", "9"])
                .unwrap();
        let Cmd::Instance(InstanceCmd::Start { wait, .. }) = cli.command else {
            panic!("not a start");
        };
        assert_eq!(wait.timeout, 9);
    }

    #[test]
    fn dev_is_a_command_with_the_global_output_format() {
        let cli = Cli::try_parse_from(["neph", "dev", "status", "-o", "json"]).unwrap();
        assert!(matches!(cli.command, Cmd::Dev(_)));
        assert_eq!(cli.global.output, Some(Format::Json));
        let cli = Cli::try_parse_from(["neph", "-o", "yaml", "dev", "status"]).unwrap();
        assert!(matches!(cli.command, Cmd::Dev(_)));
        assert_eq!(cli.global.output, Some(Format::Yaml));
        let cli = Cli::try_parse_from(["neph", "flavor", "list"]).unwrap();
        assert!(matches!(cli.command, Cmd::Flavor(_)));
        // Completions know `dev` now that it is part of the grammar.
        assert!(Cli::command().find_subcommand("dev").is_some());
    }
}
