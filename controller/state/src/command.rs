//! What can be asked of the state machine ([`Command`]), the envelope the
//! leader stamps around it ([`Envelope`]), and what it answers ([`Response`]).

use serde::{Deserialize, Serialize};

use crate::model::{
    Flavor, GroupPolicy, Image, ImageState, Instance, InstanceState, JoinToken, Labels, Migration,
    MigrationProgress, MigrationState, Node, NodeState, Operation, Project, Quota, Resources, Role,
    SealedCaRecord, ServerGroup, Token, UnixMs, User,
};

/// A command with what the leader adds before proposing it. Everything that
/// `apply` needs is in here (or in the log term), so replaying a log gives the
/// same state on every member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Leader wall-clock time when the command was proposed.
    pub time: UnixMs,
    /// Who asks (`users/alice`, `system`), recorded in events.
    pub actor: String,
    /// Client-chosen id making the command idempotent: a retry with the same
    /// id and command gets the first answer back instead of a second effect.
    pub request_id: Option<String>,
    /// Raft term the proposer believed it led in. When set, the command is
    /// refused unless it is committed in exactly that term, so a deposed
    /// leader's control loops can never act on stale state.
    pub fence_term: Option<u64>,
    /// What to do.
    pub command: Command,
    /// The API call this command carries out, when a person made one: the
    /// command and its result then go into the audit trail.
    pub origin: Option<Origin>,
}

/// Where a person's call came from, for the audit trail.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The client's address as the controller saw it (`10.0.0.7:50122`),
    /// empty when the transport did not say.
    pub peer: String,
    /// The RPC (`/nephele.compute.v1.Instances/CreateInstance`).
    pub rpc: String,
}

impl Envelope {
    /// An envelope with no request id and no fence.
    pub fn new(time: UnixMs, actor: impl Into<String>, command: Command) -> Self {
        Envelope {
            time,
            actor: actor.into(),
            request_id: None,
            fence_term: None,
            command,
            origin: None,
        }
    }
}

/// Every change the control plane can make. Names are full AIP resource
/// names (`projects/p1/instances/web-1`); `*_id` fields are the last segment
/// of a resource being created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Does nothing (used to commit an entry in a new term, and in tests).
    Noop,
    /// Creates `projects/{project_id}`.
    CreateProject {
        /// Id of the new project.
        project_id: String,
        /// Free text.
        display_name: String,
        /// Limits; the default quota when `None`.
        quota: Option<Quota>,
    },
    /// Changes the limits `quota` names of a project's quota and keeps the
    /// others, in one step (a limit may be set below current usage; new
    /// instances are then refused until usage drops).
    SetProjectQuota {
        /// `projects/{project}`.
        project: String,
        /// The limits to change.
        quota: QuotaUpdate,
    },
    /// Deletes an empty project.
    DeleteProject {
        /// `projects/{project}`.
        project: String,
    },
    /// Creates `users/{user_id}`.
    CreateUser {
        /// Id of the new user.
        user_id: String,
        /// Free text.
        display_name: String,
        /// Whether the user is a cluster operator.
        operator: bool,
    },
    /// Deletes a user and its tokens.
    DeleteUser {
        /// `users/{user}`.
        user: String,
    },
    /// Grants (or with `None` revokes) a role in a project.
    SetRole {
        /// `users/{user}`.
        user: String,
        /// `projects/{project}`.
        project: String,
        /// The role, or `None` to revoke.
        role: Option<Role>,
    },
    /// Creates `users/{user}/tokens/{token_id}`.
    CreateToken {
        /// `users/{user}`.
        user: String,
        /// Id of the new token.
        token_id: String,
        /// Hash of the secret; the secret itself never reaches the log.
        secret_hash: String,
        /// Expiry.
        expire_time: Option<UnixMs>,
    },
    /// Revokes a token.
    DeleteToken {
        /// `users/{user}/tokens/{token}`.
        token: String,
    },
    /// Creates `flavors/{flavor_id}`.
    CreateFlavor {
        /// Id of the new flavor.
        flavor_id: String,
        /// What an instance of it uses.
        resources: Resources,
    },
    /// Deletes a flavor (existing instances keep their resources).
    DeleteFlavor {
        /// `flavors/{flavor}`.
        flavor: String,
    },
    /// Registers `images/{image_id}`.
    CreateImage {
        /// Id of the new image.
        image_id: String,
        /// `raw`, `qcow2`, `ova`.
        format: String,
        /// Size in bytes.
        size_bytes: u64,
        /// Checksum of the content.
        checksum: String,
        /// Initial state.
        state: ImageState,
    },
    /// Changes an image's state (upload finished or failed).
    SetImageState {
        /// `images/{image}`.
        image: String,
        /// The new state.
        state: ImageState,
    },
    /// Deletes an image.
    DeleteImage {
        /// `images/{image}`.
        image: String,
    },
    /// Creates `projects/{project}/serverGroups/{group_id}`.
    CreateServerGroup {
        /// `projects/{project}`.
        project: String,
        /// Id of the new group.
        group_id: String,
        /// Placement policy.
        policy: GroupPolicy,
        /// For [`GroupPolicy::AntiAffinity`] only: members allowed on one
        /// node, from 1 (`None`: 1).
        max_per_node: Option<u32>,
    },
    /// Deletes an empty server group.
    DeleteServerGroup {
        /// `projects/{project}/serverGroups/{group}`.
        group: String,
    },
    /// Creates `projects/{project}/instances/{instance_id}` in `PENDING`,
    /// counting it against the project quota, and the operation
    /// `operations/{operation_id}` that completes when it runs.
    CreateInstance {
        /// `projects/{project}`.
        project: String,
        /// Id of the new instance.
        instance_id: String,
        /// What it is made of.
        spec: InstanceSpec,
        /// Id of the operation to create.
        operation_id: String,
    },
    /// Places a `PENDING` instance on a node (`SCHEDULED`), as decided by the
    /// scheduler. Node capacity is the scheduler's business (it owns the
    /// overcommit ratios); this only records the allocation.
    ScheduleInstance {
        /// The instance.
        instance: String,
        /// `nodes/{node}`, which must be `Up`.
        node: String,
        /// The generation the scheduler decided on; refused if it changed.
        expected_generation: u64,
    },
    /// Moves an instance through its lifecycle (see
    /// [`InstanceState::can_become`]). Going back to `PENDING` releases the
    /// placement. Reaching `RUNNING` or `ERROR` finishes pending operations on
    /// the instance.
    SetInstanceState {
        /// The instance.
        instance: String,
        /// The new state.
        state: InstanceState,
        /// Why (kept on the instance).
        reason: String,
        /// When set, refused unless the instance is at this generation.
        expected_generation: Option<u64>,
    },
    /// Starts deleting an instance (`DELETING`) with operation
    /// `operations/{operation_id}`.
    DeleteInstance {
        /// The instance.
        instance: String,
        /// Id of the operation to create.
        operation_id: String,
    },
    /// Removes a `DELETING` instance once its node has released it, freeing
    /// quota and node allocation and finishing its delete operation.
    PurgeInstance {
        /// The instance.
        instance: String,
    },
    /// Registers `nodes/{node_id}` (or updates address, capacity and labels of
    /// a registered one), `Up`.
    RegisterNode {
        /// Id of the node.
        node_id: String,
        /// Agent address.
        address: String,
        /// What it offers.
        capacity: Resources,
        /// Labels.
        labels: Labels,
    },
    /// Records a heartbeat at the envelope's time; a `Down` node comes back
    /// `Up`.
    NodeHeartbeat {
        /// `nodes/{node}`.
        node: String,
    },
    /// Sets a node's state (drain, disable, mark down).
    SetNodeState {
        /// `nodes/{node}`.
        node: String,
        /// The new state.
        state: NodeState,
    },
    /// Removes a node that holds no instances.
    DeregisterNode {
        /// `nodes/{node}`.
        node: String,
    },
    /// Starts a live migration of a `RUNNING` instance to another `Up` node:
    /// the instance becomes `MIGRATING` and the target's allocation grows.
    CreateMigration {
        /// Id of the new migration.
        migration_id: String,
        /// The instance.
        instance: String,
        /// `nodes/{node}` to move to.
        target: String,
        /// Downtime budget, ms (0: the default, 50).
        max_downtime_ms: u64,
        /// Who asked and why, for the events (empty: a person).
        cause: String,
    },
    /// Reports migration progress or its end. `Completed` moves the instance
    /// to the target; `Failed` and `Cancelled` leave it on the source. Either
    /// way the instance is `RUNNING` again.
    SetMigrationState {
        /// `migrations/{migration}`.
        migration: String,
        /// The new state.
        state: MigrationState,
        /// Bytes copied so far.
        bytes_copied: u64,
        /// Why it failed.
        reason: String,
    },
    /// Finishes an operation, with an error or not.
    FinishOperation {
        /// `operations/{operation}`.
        operation: String,
        /// The error, if it failed.
        error: Option<String>,
    },
    /// Sets a key in the generic key-value area.
    KvPut {
        /// Any non-empty key up to 1 KiB.
        key: String,
        /// Value up to 1 MiB.
        value: Vec<u8>,
    },
    /// Compare-and-set: writes (or with `None` deletes) `key` only if its
    /// version is `expected_version` (0 meaning "absent").
    KvCas {
        /// The key.
        key: String,
        /// Expected current version.
        expected_version: u64,
        /// New value, or `None` to delete.
        value: Option<Vec<u8>>,
    },
    /// Deletes a key (no error if absent).
    KvDelete {
        /// The key.
        key: String,
    },
    /// Moves an instance through its lifecycle as [`Command::SetInstanceState`]
    /// does, and opens the operation `operations/{operation_id}` with `verb`:
    /// `start` and `reboot` finish when the instance reaches `RUNNING`, `stop`
    /// when it reaches `STOPPED`; any of them fails when it reaches `ERROR`.
    /// `start` and `reboot` bump the instance's `boot_count`, which tells its
    /// node to boot the VM again (a reboot of a `RUNNING` instance goes
    /// `STARTING`, then `RUNNING` once the new boot runs).
    BeginInstanceAction {
        /// The instance.
        instance: String,
        /// The new state (`STARTING` or `STOPPING`).
        state: InstanceState,
        /// `start`, `stop` or `reboot`.
        verb: String,
        /// Id of the operation to create.
        operation_id: String,
        /// For `stop`: how long the guest may take to power off before its
        /// node forces the VM off, ms, at most [`crate::MAX_STOP_TIMEOUT_MS`]
        /// (kept on the instance; `None`: the controllers' default). Refused
        /// with the other verbs.
        stop_timeout_ms: Option<u64>,
    },
    /// Changes the flavor of a `STOPPED` instance. The project quota is
    /// checked when the instance grows, and so is its node when
    /// `node_limit` is given; the node allocation follows. Its disk never
    /// shrinks (the node keeps the disk file).
    ResizeInstance {
        /// The instance.
        instance: String,
        /// `flavors/{flavor}`.
        flavor: String,
        /// The most its node may hold in all: its capacity after the
        /// scheduler's overcommit ratios, which the proposer knows (the
        /// scheduler owns them). When set, a resize that would take the
        /// node's allocation beyond it in any dimension is refused, so
        /// starting the instance again cannot overcommit its node.
        node_limit: Option<Resources>,
    },
    /// Creates several instances of one project alike, all or none: every
    /// name, reference and the quota for all of them are checked before any
    /// is created. Each gets its own create operation.
    CreateInstances {
        /// `projects/{project}`.
        project: String,
        /// What every one of them is made of.
        spec: InstanceSpec,
        /// The instances to create, 1 to [`crate::MAX_BATCH_CREATE`].
        instances: Vec<NewInstance>,
    },
    /// Restarts an HA instance whose node is `DOWN` and fenced (the leader
    /// judged that the node's lease has expired, so its copy has stopped):
    /// back to `PENDING` with its placement released and `boot_count`
    /// bumped, so the scheduler places it on another node. Refused unless
    /// the instance is HA, placed on `node`, and `node` is `DOWN`.
    RestartInstanceElsewhere {
        /// The instance.
        instance: String,
        /// `nodes/{node}` it was on.
        node: String,
    },
    /// Records in the audit trail that a person's request was refused before
    /// it became a command (e.g. by the API's placement check): event
    /// `request.refused` on `resource` with `reason`, by the envelope's
    /// actor. Changes nothing else.
    RecordRefusal {
        /// The resource the request was about.
        resource: String,
        /// Why it was refused.
        reason: String,
    },
    /// Records in the audit trail that a call was refused by authentication
    /// or authorization (it never became a command): by the envelope's
    /// actor (`users/alice`, or `anonymous` without a valid token), from
    /// the envelope's origin, about `resource`, with `reason` as the
    /// result. Changes nothing else.
    RecordDenial {
        /// What the call was about (a project, a user, or empty for the
        /// cluster).
        resource: String,
        /// The refusal as the caller got it.
        reason: String,
    },
    /// What a node reports about a migration it takes part in: the target
    /// its `neph-vmm --incoming` address (the migration goes `RUNNING`),
    /// the source its progress. Refused once the migration is final, and
    /// from a node that is neither its source nor its target.
    UpdateMigration {
        /// `migrations/{migration}`.
        migration: String,
        /// `nodes/{node}` reporting.
        node: String,
        /// The target's listening address (empty: unchanged).
        target_address: String,
        /// The source's progress.
        progress: Option<MigrationProgress>,
    },
    /// The switchover, asked by the source node once the target holds the
    /// complete VM: the instance now runs on the target (`RUNNING` there),
    /// the migration is `COMPLETED` and the source's allocation released.
    /// Refused unless the migration is `RUNNING` and `node` is its source:
    /// this entry in the log is what lets a source give its VM up, so a
    /// cancelled, timed-out or failed migration can never switch over.
    SwitchMigration {
        /// `migrations/{migration}`.
        migration: String,
        /// `nodes/{node}` asking (the source).
        node: String,
        /// Measured downtime so far, microseconds (for the record).
        progress: Option<MigrationProgress>,
    },
    /// Creates `joinTokens/{token_id}` (and drops spent join tokens).
    CreateJoinToken {
        /// The token's id part.
        token_id: String,
        /// SHA-256 hex of the secret; the secret never reaches the log.
        secret_hash: String,
        /// Expiry; must be after the envelope's time.
        expire_time: UnixMs,
        /// The node name it may be used for; `None` for any.
        node: Option<String>,
    },
    /// Uses `joinTokens/{token_id}` up for node `node_id`: refused unless
    /// the hash matches, it is unused, unexpired at the envelope's time and
    /// (if it names one) for that node; refused for a removed node; and a
    /// token that names no node is refused for a name that is registered
    /// or joined before (no takeover of a known name: that needs a token
    /// made for it). Records the node as joined. Committed before the node
    /// gets its certificate, so a token can be redeemed once in the whole
    /// cluster.
    RedeemJoinToken {
        /// The token's id part.
        token_id: String,
        /// SHA-256 hex of the presented secret.
        secret_hash: String,
        /// The joining node's name.
        node_id: String,
    },
    /// Removes a node for good (`neph node remove`): deregisters it
    /// (refused while instances are placed on it or migrate to it: drain
    /// it first), drops the unused join tokens made for it, and records it
    /// as revoked: its certificates are refused, it cannot register or
    /// join again. Refused for a name the cluster never knew.
    RemoveNode {
        /// `nodes/{node}`.
        node: String,
    },
    /// Records the cluster CA (`neph-controller init`): set once; setting
    /// the same one again is a no-op (every initial member proposes it),
    /// another one is refused.
    SetClusterCa {
        /// The CA, its key sealed with the operator key.
        ca: SealedCaRecord,
    },
    /// Records that a joined node renewed its certificate (`NodeJoin/
    /// Renew`): refused for a node that never joined or was removed.
    /// Committed before the new certificate is handed out, like a join.
    RenewNodeCertificate {
        /// The node's name (`node_id`, as in a join).
        node_id: String,
        /// The new certificate's serial, hex.
        serial: String,
    },
    /// Creates `images/{image_id}` from content a controller received and
    /// checked (`Images/UploadImage`): ACTIVE, with its files, its size the
    /// sum of theirs, `checksum` the manifest's. Refused when the name is
    /// taken, like [`Command::CreateImage`].
    CreateUploadedImage {
        /// Id of the new image.
        image_id: String,
        /// `pvh-elf`, `bzimage` or `raw`.
        format: String,
        /// The manifest's checksum.
        checksum: String,
        /// The files, in upload order.
        files: Vec<crate::model::ImageFileRecord>,
    },
}

impl Command {
    /// The resource a command is about (for the audit trail): its full
    /// name, or the collection for a create that names a new one.
    pub fn target(&self) -> String {
        use Command as C;
        match self {
            C::Noop => String::new(),
            C::CreateProject { project_id, .. } => format!("projects/{project_id}"),
            C::CreateUser { user_id, .. } => format!("users/{user_id}"),
            C::CreateToken { user, token_id, .. } => format!("{user}/tokens/{token_id}"),
            C::CreateFlavor { flavor_id, .. } => format!("flavors/{flavor_id}"),
            C::CreateImage { image_id, .. } | C::CreateUploadedImage { image_id, .. } => {
                format!("images/{image_id}")
            }
            C::CreateServerGroup {
                project, group_id, ..
            } => format!("{project}/serverGroups/{group_id}"),
            C::CreateInstance {
                project,
                instance_id,
                ..
            } => format!("{project}/instances/{instance_id}"),
            C::CreateInstances { project, .. } => format!("{project}/instances"),
            C::RegisterNode { node_id, .. } => format!("nodes/{node_id}"),
            C::CreateMigration { instance, .. } => instance.clone(),
            C::SetProjectQuota { project, .. } | C::DeleteProject { project } => project.clone(),
            C::DeleteUser { user } | C::SetRole { user, .. } => user.clone(),
            C::DeleteToken { token } => token.clone(),
            C::DeleteFlavor { flavor } => flavor.clone(),
            C::SetImageState { image, .. } | C::DeleteImage { image } => image.clone(),
            C::DeleteServerGroup { group } => group.clone(),
            C::ScheduleInstance { instance, .. }
            | C::SetInstanceState { instance, .. }
            | C::DeleteInstance { instance, .. }
            | C::PurgeInstance { instance }
            | C::BeginInstanceAction { instance, .. }
            | C::ResizeInstance { instance, .. }
            | C::RestartInstanceElsewhere { instance, .. } => instance.clone(),
            C::NodeHeartbeat { node }
            | C::SetNodeState { node, .. }
            | C::DeregisterNode { node }
            | C::RemoveNode { node } => node.clone(),
            C::SetMigrationState { migration, .. }
            | C::UpdateMigration { migration, .. }
            | C::SwitchMigration { migration, .. } => migration.clone(),
            C::RecordRefusal { resource, .. } | C::RecordDenial { resource, .. } => {
                resource.clone()
            }
            C::FinishOperation { operation, .. } => operation.clone(),
            C::KvPut { key, .. } | C::KvCas { key, .. } | C::KvDelete { key } => {
                format!("kv/{key}")
            }
            C::CreateJoinToken { token_id, .. } | C::RedeemJoinToken { token_id, .. } => {
                format!("joinTokens/{token_id}")
            }
            C::SetClusterCa { .. } => "cluster/ca".to_owned(),
            C::RenewNodeCertificate { node_id, .. } => format!("nodes/{node_id}"),
        }
    }
}

/// Some limits of a quota (`None`: keep the current one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaUpdate {
    /// Most instances.
    pub instances: Option<u64>,
    /// Most vCPUs.
    pub vcpus: Option<u64>,
    /// Most memory, MiB.
    pub memory_mib: Option<u64>,
    /// Most disk, GiB.
    pub disk_gib: Option<u64>,
}

impl QuotaUpdate {
    /// `quota` with the named limits changed.
    pub fn applied_to(self, quota: Quota) -> Quota {
        Quota {
            instances: self.instances.unwrap_or(quota.instances),
            resources: Resources {
                vcpus: self.vcpus.unwrap_or(quota.resources.vcpus),
                memory_mib: self.memory_mib.unwrap_or(quota.resources.memory_mib),
                disk_gib: self.disk_gib.unwrap_or(quota.resources.disk_gib),
            },
        }
    }
}

impl From<Quota> for QuotaUpdate {
    /// Every limit, replaced.
    fn from(q: Quota) -> Self {
        QuotaUpdate {
            instances: Some(q.instances),
            vcpus: Some(q.resources.vcpus),
            memory_mib: Some(q.resources.memory_mib),
            disk_gib: Some(q.resources.disk_gib),
        }
    }
}

/// What every instance of one create request is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// `flavors/{flavor}`.
    pub flavor: String,
    /// `images/{image}`, which must be active.
    pub image: String,
    /// `projects/{project}/serverGroups/{group}` in the same project.
    pub server_group: Option<String>,
    /// Labels.
    pub labels: Labels,
    /// Restarted on another node when its node dies (once fenced).
    pub ha: bool,
}

/// One instance of a [`Command::CreateInstances`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewInstance {
    /// Id of the new instance.
    pub instance_id: String,
    /// Id of its create operation.
    pub operation_id: String,
}

/// What a successful command returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Done; nothing to return.
    Done,
    /// A resource was deleted.
    Deleted {
        /// Its name.
        name: String,
    },
    /// The project as it now is.
    Project(Project),
    /// The user as it now is.
    User(User),
    /// The token as created.
    Token(Token),
    /// The flavor.
    Flavor(Flavor),
    /// The image.
    Image(Image),
    /// The server group.
    ServerGroup(ServerGroup),
    /// The instance as it now is, with the operation a create or delete
    /// started.
    Instance {
        /// The instance.
        instance: Instance,
        /// The operation created, if any.
        operation: Option<Operation>,
    },
    /// The node.
    Node(Node),
    /// The migration.
    Migration(Migration),
    /// The operation.
    Operation(Operation),
    /// A key-value write: the key's new version (0 after a delete).
    Kv {
        /// The key.
        key: String,
        /// Its version now.
        version: u64,
    },
    /// Instances created together, each with its create operation, in
    /// request order.
    Created(Vec<(Instance, Operation)>),
    /// A node join token.
    JoinToken(JoinToken),
}
