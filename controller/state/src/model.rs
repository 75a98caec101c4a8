//! The resources the control plane holds, as plain data. Every map is a
//! `BTreeMap` keyed by the full resource name, so iteration order (and so the
//! encoded snapshot) is deterministic.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, as stamped by the leader into each
/// command. The state machine never reads a clock.
pub type UnixMs = u64;

/// Labels on a resource (`zone=a`, `tier=web`).
pub type Labels = BTreeMap<String, String>;

/// An amount of compute resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Virtual CPUs.
    pub vcpus: u64,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk in GiB.
    pub disk_gib: u64,
}

impl Resources {
    /// Component-wise sum, saturating.
    pub fn plus(self, o: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_add(o.vcpus),
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
            disk_gib: self.disk_gib.saturating_add(o.disk_gib),
        }
    }

    /// Component-wise difference, saturating at zero.
    pub fn minus(self, o: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_sub(o.vcpus),
            memory_mib: self.memory_mib.saturating_sub(o.memory_mib),
            disk_gib: self.disk_gib.saturating_sub(o.disk_gib),
        }
    }

    /// True when every component of `self` is at most the one of `limit`.
    pub fn fits_in(self, limit: Resources) -> bool {
        self.vcpus <= limit.vcpus
            && self.memory_mib <= limit.memory_mib
            && self.disk_gib <= limit.disk_gib
    }
}

/// A project's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Most instances the project may hold at once.
    pub instances: u64,
    /// Most resources all its instances may use together.
    pub resources: Resources,
}

impl Default for Quota {
    fn default() -> Self {
        Quota {
            instances: 10,
            resources: Resources {
                vcpus: 20,
                memory_mib: 50 * 1024,
                disk_gib: 1000,
            },
        }
    }
}

/// A tenant project: the unit of isolation and quota.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    /// `projects/{project}`.
    pub name: String,
    /// Free text shown to people.
    pub display_name: String,
    /// Limits.
    pub quota: Quota,
    /// Instances currently counted against the quota.
    pub instance_count: u64,
    /// Resources currently counted against the quota.
    pub usage: Resources,
    /// When it was created.
    pub create_time: UnixMs,
}

/// What a user may do in a project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Read everything in the project.
    Viewer,
    /// Create, change and delete resources in the project.
    Editor,
    /// Everything an editor may do, plus grant roles.
    Owner,
}

/// A person or robot that calls the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// `users/{user}`.
    pub name: String,
    /// Free text shown to people.
    pub display_name: String,
    /// Operators act on every project and on cluster resources.
    pub operator: bool,
    /// Role per project name.
    pub roles: BTreeMap<String, Role>,
    /// When it was created.
    pub create_time: UnixMs,
}

/// An API token. Only the hash of its secret is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// `users/{user}/tokens/{token}`.
    pub name: String,
    /// Hash of the secret (computed by the API layer, e.g. SHA-256 hex).
    pub secret_hash: String,
    /// When it stops being accepted; `None` for never.
    pub expire_time: Option<UnixMs>,
    /// When it was created.
    pub create_time: UnixMs,
}

/// A one-time, expiring node join token (`neph node join-token create`):
/// only the hash of its secret is kept. Redeeming it (a node's Join call)
/// marks it used, in the log, so it works once across all controllers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// `joinTokens/{id}` (the token's id part).
    pub name: String,
    /// SHA-256 of the secret, lowercase hex (computed by the API layer).
    pub secret_hash: String,
    /// When it was created.
    pub create_time: UnixMs,
    /// From then on it is refused.
    pub expire_time: UnixMs,
    /// The node name it is for; `None` for any.
    pub node: Option<String>,
    /// When and by which node (`nodes/{node}`) it was redeemed.
    pub used: Option<(UnixMs, String)>,
}

/// A node name the cluster knows as a member: one that joined (had its
/// certificate signed for `node/{name}`) or was removed. Kept after the
/// node is deregistered, so a join token not made for that name cannot
/// take it over, and a removed node stays out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMember {
    /// `nodes/{node}`.
    pub name: String,
    /// When it last joined; `None` if it never did (a node registered
    /// with an admin token, then removed).
    pub joined: Option<UnixMs>,
    /// When it was removed (`neph node remove`): from then on every
    /// certificate of `node/{node}` is refused and it cannot join again.
    pub revoked: Option<UnixMs>,
}

/// The cluster CA as the replicated state keeps it (`neph-controller
/// init` puts it here): the certificate in the clear, the private key
/// sealed with the operator key (AES-256-GCM, bound to the cluster id; see
/// `tls/src/seal.rs`). Every controller can read it; only one given the
/// operator key can open it to sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedCaRecord {
    /// The cluster the CA belongs to.
    pub cluster_id: String,
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The sealed PKCS#8 private key.
    pub sealed_key: Vec<u8>,
}

/// An instance size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flavor {
    /// `flavors/{flavor}`.
    pub name: String,
    /// What an instance of this flavor uses.
    pub resources: Resources,
}

/// Whether an image may be booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageState {
    /// Being uploaded or imported.
    Pending,
    /// Ready to boot.
    Active,
    /// Import or upload failed.
    Failed,
}

/// A bootable disk image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// `images/{image}`.
    pub name: String,
    /// Disk format: `raw`, `qcow2`, `ova`.
    pub format: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Checksum of the content, e.g. `sha256:...`.
    pub checksum: String,
    /// Lifecycle.
    pub state: ImageState,
    /// When it was created.
    pub create_time: UnixMs,
    /// The files of an uploaded image, which the controllers hold; empty
    /// for an image whose content is placed on the nodes by other means.
    pub files: Vec<ImageFileRecord>,
}

/// One file of an uploaded image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFileRecord {
    /// `kernel`, `initrd`, `cmdline` or `disk`.
    pub role: String,
    /// Its size.
    pub size_bytes: u64,
    /// `sha256:<hex>`.
    pub checksum: String,
}

/// Lifecycle of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum InstanceState {
    /// Accepted, waiting for the scheduler.
    Pending,
    /// Placed on a node, not started yet.
    Scheduled,
    /// The node is starting it.
    Starting,
    /// Running.
    Running,
    /// The node is stopping it.
    Stopping,
    /// Stopped; keeps its placement and quota.
    Stopped,
    /// Live-migrating to another node.
    Migrating,
    /// Being deleted.
    Deleting,
    /// Something failed; see the instance's `reason`.
    Error,
}

impl InstanceState {
    /// Every state, for tests and listings.
    pub const ALL: [InstanceState; 9] = [
        InstanceState::Pending,
        InstanceState::Scheduled,
        InstanceState::Starting,
        InstanceState::Running,
        InstanceState::Stopping,
        InstanceState::Stopped,
        InstanceState::Migrating,
        InstanceState::Deleting,
        InstanceState::Error,
    ];

    /// The API spelling (`RUNNING`).
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "PENDING",
            InstanceState::Scheduled => "SCHEDULED",
            InstanceState::Starting => "STARTING",
            InstanceState::Running => "RUNNING",
            InstanceState::Stopping => "STOPPING",
            InstanceState::Stopped => "STOPPED",
            InstanceState::Migrating => "MIGRATING",
            InstanceState::Deleting => "DELETING",
            InstanceState::Error => "ERROR",
        }
    }

    /// Whether the lifecycle allows going from `self` to `to`.
    pub fn can_become(self, to: InstanceState) -> bool {
        use InstanceState::*;
        matches!(
            (self, to),
            (Pending, Scheduled | Error | Deleting)
                | (Scheduled, Starting | Pending | Error | Deleting)
                | (Starting, Running | Stopped | Error | Deleting)
                | (Running, Stopping | Migrating | Starting | Error | Deleting)
                | (Stopping, Stopped | Error | Deleting)
                | (Stopped, Starting | Pending | Error | Deleting)
                | (Migrating, Running | Error | Deleting)
                | (Deleting, Error)
                | (Error, Pending | Starting | Stopped | Deleting)
        )
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// `projects/{project}/instances/{instance}`.
    pub name: String,
    /// `flavors/{flavor}` at creation (its resources are copied below).
    pub flavor: String,
    /// What it uses, counted against the project quota.
    pub resources: Resources,
    /// `images/{image}`.
    pub image: String,
    /// `projects/{project}/serverGroups/{group}`, if any.
    pub server_group: Option<String>,
    /// Lifecycle.
    pub state: InstanceState,
    /// Why it is in its state (set on errors and by operators).
    pub reason: String,
    /// `nodes/{node}` it is placed on.
    pub node: Option<String>,
    /// Labels.
    pub labels: Labels,
    /// Bumped on every change; lets writers do compare-and-set.
    pub generation: u64,
    /// When it was created.
    pub create_time: UnixMs,
    /// When it last changed.
    pub update_time: UnixMs,
    /// Restarted on another node when its node dies (once fenced).
    pub ha: bool,
    /// Bumped by every start and reboot; agents boot the VM again when
    /// theirs was booted for a smaller count.
    pub boot_count: u64,
    /// How long the newest stop lets the guest power off by itself before
    /// its node forces the VM off, ms; `None`: the controllers' default.
    pub stop_timeout_ms: Option<u64>,
}

/// Placement policy of a server group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupPolicy {
    /// All members on one node.
    Affinity,
    /// Every member on a different node.
    AntiAffinity,
    /// Prefer one node.
    SoftAffinity,
    /// Prefer different nodes.
    SoftAntiAffinity,
}

/// A set of instances placed together or apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerGroup {
    /// `projects/{project}/serverGroups/{group}`.
    pub name: String,
    /// Placement policy.
    pub policy: GroupPolicy,
    /// Names of member instances.
    pub members: Vec<String>,
    /// When it was created.
    pub create_time: UnixMs,
    /// For [`GroupPolicy::AntiAffinity`]: members allowed on one node
    /// (Nova's `max_server_per_host`); `None` is 1.
    pub max_per_node: Option<u32>,
}

/// Whether a node takes work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Healthy, takes new instances.
    Up,
    /// Instances are being moved off; takes no new ones.
    Draining,
    /// Administratively disabled.
    Disabled,
    /// Missed its heartbeats.
    Down,
}

/// A compute node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// `nodes/{node}`.
    pub name: String,
    /// Address of its agent's gRPC endpoint.
    pub address: String,
    /// What it offers.
    pub capacity: Resources,
    /// What placed instances use.
    pub allocated: Resources,
    /// Labels (`zone`, hardware traits).
    pub labels: Labels,
    /// Whether it takes work.
    pub state: NodeState,
    /// Leader time of the last heartbeat.
    pub last_heartbeat: UnixMs,
    /// When it registered.
    pub create_time: UnixMs,
}

/// Lifecycle of a live migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationState {
    /// Accepted, not started.
    Queued,
    /// Copying memory and disks.
    Running,
    /// The instance runs on the target.
    Completed,
    /// Gave up; the instance runs on the source.
    Failed,
    /// Cancelled by a user; the instance runs on the source.
    Cancelled,
    /// The switchover is decided (the source's gate said yes, committed
    /// here): no cancel; the target runs the VM once the complete state
    /// arrives, and either side reports the outcome. (Appended after the
    /// older variants so logs and snapshots written before it still decode.)
    Switching,
    /// The source sent the commit and heard nothing back: its VM stays
    /// paused; the target's node settles where the VM runs.
    InDoubt,
}

impl MigrationState {
    /// Whether the switchover is decided and not yet settled.
    pub fn is_switching(self) -> bool {
        matches!(self, MigrationState::Switching | MigrationState::InDoubt)
    }

    /// Whether no further change is possible.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled
        )
    }
}

/// A live migration of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// `migrations/{migration}`.
    pub name: String,
    /// The instance moved.
    pub instance: String,
    /// `nodes/{node}` it leaves.
    pub source: String,
    /// `nodes/{node}` it goes to.
    pub target: String,
    /// Lifecycle.
    pub state: MigrationState,
    /// Bytes copied so far.
    pub bytes_copied: u64,
    /// Why it failed, if it did.
    pub reason: String,
    /// When it was created.
    pub create_time: UnixMs,
    /// When it last changed.
    pub update_time: UnixMs,
    /// Downtime budget asked for, ms.
    pub max_downtime_ms: u64,
    /// `HOST:PORT` the target's `neph-vmm --incoming` listens on, once
    /// the target node has started it (empty before).
    pub target_address: String,
    /// The newest progress the source node reported.
    pub progress: MigrationProgress,
    /// Who or what started it and why (`neph instance migrate`, a drain,
    /// the rebalancer's reason).
    pub cause: String,
}

/// Progress of a live migration as the source's hypervisor measures it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// Round: 0 is the full pass, then one per dirty round.
    pub round: u32,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// Estimated bytes still to send.
    pub bytes_remaining: u64,
    /// Guest dirty rate, bytes per second.
    pub dirty_rate_bps: u64,
    /// Link throughput, bytes per second.
    pub throughput_bps: u64,
    /// Predicted downtime if the VM stopped now, ms.
    pub expected_downtime_ms: u64,
    /// Auto-converge throttle, percent.
    pub throttle_percent: u32,
    /// Measured downtime once switched over, microseconds (0 before).
    pub downtime_us: u64,
}

/// A long-running operation (AIP-151).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// `operations/{operation}`.
    pub name: String,
    /// The resource it works on.
    pub target: String,
    /// What it does: `create`, `delete`, `migrate`, ...
    pub verb: String,
    /// Whether it finished.
    pub done: bool,
    /// Set when it finished with an error.
    pub error: Option<String>,
    /// When it was created.
    pub create_time: UnixMs,
    /// When it last changed.
    pub update_time: UnixMs,
}

/// One entry of the audit and event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the event log, from 1, never reused.
    pub seq: u64,
    /// Leader time.
    pub time: UnixMs,
    /// Who caused it (`users/alice`, `system`).
    pub actor: String,
    /// The resource concerned.
    pub resource: String,
    /// What happened (`instance.created`).
    pub kind: String,
    /// Detail for people.
    pub message: String,
}

/// One entry of the audit trail: a person's call that changed (or tried to
/// change) the state, or any call refused by authentication or
/// authorization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the audit trail, from 1, never reused.
    pub seq: u64,
    /// Leader time.
    pub time: UnixMs,
    /// Who (`users/alice`; `anonymous` without a valid token).
    pub actor: String,
    /// From where: the client's address as the controller saw it.
    pub peer: String,
    /// What: the RPC.
    pub rpc: String,
    /// About what: the resource (or collection) concerned.
    pub resource: String,
    /// The result: `ok`, or the error the caller got.
    pub result: String,
}

/// A value in the generic key-value area.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    /// The bytes stored.
    pub value: Vec<u8>,
    /// Index of the command that last wrote it (its "mod revision"); never 0.
    pub version: u64,
}

/// What an idempotent request answered, kept so a retry gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RememberedRequest {
    /// When it was first applied (entries expire after
    /// [`crate::REQUEST_ID_RETENTION_MS`]).
    pub time: UnixMs,
    /// Fingerprint of the command, so reusing an id for another command is
    /// refused.
    pub command: Vec<u8>,
    /// The answer.
    pub response: crate::Response,
}

/// The whole control-plane state. Serialized as-is for snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Number of commands applied (including refused ones); the "revision".
    pub applied: u64,
    /// Leader time of the latest command applied (time never goes backwards
    /// here even if leaders' clocks disagree).
    pub now: UnixMs,
    /// Projects by name.
    pub projects: BTreeMap<String, Project>,
    /// Users by name.
    pub users: BTreeMap<String, User>,
    /// Tokens by name.
    pub tokens: BTreeMap<String, Token>,
    /// Flavors by name.
    pub flavors: BTreeMap<String, Flavor>,
    /// Images by name.
    pub images: BTreeMap<String, Image>,
    /// Instances by name.
    pub instances: BTreeMap<String, Instance>,
    /// Server groups by name.
    pub server_groups: BTreeMap<String, ServerGroup>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// Migrations by name.
    pub migrations: BTreeMap<String, Migration>,
    /// Operations by name.
    pub operations: BTreeMap<String, Operation>,
    /// The newest events, oldest first (at most [`crate::MAX_EVENTS`]).
    pub events: VecDeque<Event>,
    /// Sequence number of the next event.
    pub next_event_seq: u64,
    /// Generic key-value area.
    pub kv: BTreeMap<String, KvEntry>,
    /// Answers to recent requests that carried a `request_id`.
    pub requests: BTreeMap<String, RememberedRequest>,
    /// The keys of `requests` in the order they were answered, for expiry.
    pub request_order: VecDeque<(UnixMs, String)>,
    /// Controllers (members of the replicated store) by member id, with the
    /// address they serve the cluster protocol on. Changed only by
    /// membership changes ([`State::add_controller`]).
    pub controllers: BTreeMap<u64, String>,
    /// Member ids that were removed; they may never rejoin under that id.
    pub removed_controllers: BTreeSet<u64>,
    /// The newest audit records, oldest first (at most
    /// [`crate::MAX_AUDIT_RECORDS`]).
    pub audit: VecDeque<AuditRecord>,
    /// Sequence number of the newest audit record.
    pub next_audit_seq: u64,
    /// Node join tokens by name; spent ones are dropped when a new one is
    /// created.
    pub join_tokens: BTreeMap<String, JoinToken>,
    /// Nodes that joined or were removed, by name (`nodes/{node}`).
    pub node_members: BTreeMap<String, NodeMember>,
    /// The cluster CA, its key sealed; set once.
    pub cluster_ca: Option<SealedCaRecord>,
    /// Instance names by the node they are placed on: derived from
    /// `instances`, kept by `apply` (see [`State::place`]) and rebuilt
    /// when a snapshot is decoded; never serialized. It answers "what runs
    /// on this node" without a scan of every instance (a thousand node
    /// agents re-reading their assignments made that scan most of a busy
    /// controller's work).
    #[serde(skip)]
    pub placed: BTreeMap<String, BTreeSet<String>>,
    /// Names of the operations not done yet, by their target: derived from
    /// `operations` like [`State::placed`], so finishing an instance's
    /// operations does not scan every operation ever made.
    #[serde(skip)]
    pub open_operations: BTreeMap<String, BTreeSet<String>>,
    /// Name of the unfinished migration of each instance that has one (at
    /// most one: an instance migrates only from RUNNING and stays MIGRATING
    /// until its migration ends): derived from `migrations` like
    /// [`State::placed`], so assignments, drains and the balancer look at
    /// the migrations in flight, not at every migration ever made.
    #[serde(skip)]
    pub open_migrations: BTreeMap<String, String>,
}

impl State {
    /// Places instance `name` on `node` (none: on no node), in the instance
    /// and in [`State::placed`] together; returns the node it was on. The
    /// one way `apply` moves an instance, so the index cannot drift from
    /// the data.
    pub fn set_node(&mut self, name: &str, node: Option<&str>) -> Option<String> {
        let i = self.instances.get_mut(name)?;
        let from = std::mem::replace(&mut i.node, node.map(str::to_owned));
        self.index_move(name, from.as_deref(), node);
        from
    }

    /// Records in [`State::placed`] that instance `name` moved from node
    /// `from` to node `to` (either may be none).
    fn index_move(&mut self, name: &str, from: Option<&str>, to: Option<&str>) {
        if from == to {
            return;
        }
        if let Some(from) = from
            && let Some(set) = self.placed.get_mut(from)
        {
            set.remove(name);
            if set.is_empty() {
                self.placed.remove(from);
            }
        }
        if let Some(to) = to {
            self.placed
                .entry(to.to_owned())
                .or_default()
                .insert(name.to_owned());
        }
    }

    /// [`State::placed`] as `instances` says it should be.
    pub fn placed_from_instances(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut placed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for i in self.instances.values() {
            if let Some(n) = &i.node {
                placed.entry(n.clone()).or_default().insert(i.name.clone());
            }
        }
        placed
    }

    /// [`State::open_operations`] as `operations` says it should be.
    pub fn open_operations_from_operations(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut open: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for op in self.operations.values().filter(|op| !op.done) {
            open.entry(op.target.clone())
                .or_default()
                .insert(op.name.clone());
        }
        open
    }

    /// [`State::open_migrations`] as `migrations` says it should be.
    pub fn open_migrations_from_migrations(&self) -> BTreeMap<String, String> {
        self.migrations
            .values()
            .filter(|m| !m.state.is_final())
            .map(|m| (m.instance.clone(), m.name.clone()))
            .collect()
    }

    /// Rebuilds the derived indexes ([`State::placed`],
    /// [`State::open_operations`], [`State::open_migrations`]) from the
    /// data (after decoding).
    pub fn rebuild_indexes(&mut self) {
        self.placed = self.placed_from_instances();
        self.open_operations = self.open_operations_from_operations();
        self.open_migrations = self.open_migrations_from_migrations();
    }

    /// The migrations not finished yet, by instance name.
    pub fn unfinished_migrations(&self) -> impl Iterator<Item = &Migration> {
        self.open_migrations
            .values()
            .filter_map(|name| self.migrations.get(name))
    }

    /// The unfinished migration of `instance`, if it has one.
    pub fn migration_of(&self, instance: &str) -> Option<&Migration> {
        self.open_migrations
            .get(instance)
            .and_then(|name| self.migrations.get(name))
    }

    /// Records that operation `name` on `target` is done.
    pub fn close_operation(&mut self, target: &str, name: &str) {
        if let Some(set) = self.open_operations.get_mut(target) {
            set.remove(name);
            if set.is_empty() {
                self.open_operations.remove(target);
            }
        }
    }

    /// The instances placed on `node`, in name order.
    pub fn instances_on<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a Instance> + 'a {
        self.placed
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|name| self.instances.get(name))
    }

    /// The identities every controller refuses: removed nodes, as names
    /// (`nodes/{node}`).
    pub fn revoked_nodes(&self) -> impl Iterator<Item = &str> {
        self.node_members
            .values()
            .filter(|m| m.revoked.is_some())
            .map(|m| m.name.as_str())
    }

    /// Whether `node` (`nodes/{node}`) was removed.
    pub fn is_revoked_node(&self, node: &str) -> bool {
        self.node_members
            .get(node)
            .is_some_and(|m| m.revoked.is_some())
    }

    /// Records a controller joining (or changing address), as applied from a
    /// committed membership change.
    pub fn add_controller(&mut self, id: u64, address: String) {
        self.controllers.insert(id, address);
    }

    /// Records a controller leaving for good.
    pub fn remove_controller(&mut self, id: u64) {
        self.controllers.remove(&id);
        self.removed_controllers.insert(id);
    }
}
