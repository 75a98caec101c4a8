//! The scheduler's input: a plain, serde-able snapshot of cluster state and
//! the placement request. Nothing here is indexed or validated; the
//! [`Scheduler`](crate::Scheduler) validates and indexes a snapshot when it
//! is built from one.
//!
//! Units: vCPUs are whole virtual CPUs, memory is MiB, disk is GiB, measured
//! CPU is in busy vCPUs (a VM using two cores fully measures `2.0`), node CPU
//! utilisation is a fraction of the node's physical vCPUs (`0.0..=1.0`, above
//! 1 when overloaded) and dirty rates are MiB/s.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A whole-cluster snapshot: what the controller leader knows when it asks
/// the scheduler for a decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterSnapshot {
    /// Every compute node, whatever its state.
    pub nodes: Vec<Node>,
    /// Every instance that holds resources on a node.
    #[serde(default)]
    pub instances: Vec<Instance>,
    /// Server groups (affinity and anti-affinity).
    #[serde(default)]
    pub groups: Vec<ServerGroup>,
    /// Live migrations that have started and not finished. The instance's
    /// resources are held on both nodes until it finishes.
    #[serde(default)]
    pub migrations: Vec<MigrationInFlight>,
    /// Cluster-wide scheduling settings.
    #[serde(default)]
    pub config: ClusterConfig,
}

/// An amount of the three scheduled resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk in GiB.
    pub disk_gib: u64,
}

impl Resources {
    /// Builds an amount of resources.
    pub const fn new(vcpus: u32, memory_mib: u64, disk_gib: u64) -> Self {
        Self {
            vcpus,
            memory_mib,
            disk_gib,
        }
    }
}

/// How far each resource may be promised beyond the node's physical amount
/// (Nova's `cpu_allocation_ratio`, `ram_allocation_ratio`,
/// `disk_allocation_ratio`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OvercommitRatios {
    /// vCPU ratio; Nova's default is 16.
    pub cpu: f64,
    /// Memory ratio; Nova's default is 1.5.
    pub ram: f64,
    /// Disk ratio; Nova's default is 1.0.
    pub disk: f64,
}

impl Default for OvercommitRatios {
    fn default() -> Self {
        Self {
            cpu: 16.0,
            ram: 1.5,
            disk: 1.0,
        }
    }
}

/// Whether a node can take new instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Healthy and schedulable.
    #[default]
    Up,
    /// Not reporting; its instances may be lost.
    Down,
    /// Being emptied: keeps its instances, takes no new ones.
    Draining,
    /// Taken out of scheduling by an operator.
    Disabled,
    /// Powered down by consolidation; holds no instances and can be woken
    /// by the expand planner.
    Standby,
}

/// One compute node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Stable identifier.
    pub id: String,
    /// Human name (defaults to the id when empty).
    #[serde(default)]
    pub name: String,
    /// Availability zone.
    #[serde(default)]
    pub zone: String,
    /// Free-form labels (`disk=ssd`, `gpu=a100`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Scheduling state.
    #[serde(default)]
    pub state: NodeState,
    /// Physical resources the node offers to instances.
    pub capacity: Resources,
    /// Resources held back for the host itself or for things that are not
    /// instances in this snapshot; counted as allocated.
    #[serde(default)]
    pub reserved: Resources,
    /// Per-node overcommit ratios; the cluster's when absent.
    #[serde(default)]
    pub overcommit: Option<OvercommitRatios>,
    /// Measured CPU utilisation as a fraction of `capacity.vcpus`; the sum of
    /// the instances' measured CPU when absent.
    #[serde(default)]
    pub cpu_utilisation: Option<f64>,
    /// Most instances this node may run; the cluster's limit when absent.
    #[serde(default)]
    pub max_instances: Option<u32>,
}

/// One instance holding resources on a node. What is allocated on a node is
/// the sum of its instances plus its `reserved` resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Stable identifier.
    pub id: String,
    /// Id of the node it runs on (the source node while it migrates).
    pub node: String,
    /// Its flavor's resources.
    pub resources: Resources,
    /// Measured CPU use in busy vCPUs.
    #[serde(default)]
    pub measured_cpu: f64,
    /// Measured memory dirty rate, MiB/s (what pre-copy must keep up with).
    #[serde(default)]
    pub dirty_rate_mib_s: f64,
    /// Ids of the server groups it belongs to.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Pinned instances are never moved by a planner.
    #[serde(default)]
    pub pinned: bool,
    /// Zone it was requested in; a planner keeps it there.
    #[serde(default)]
    pub required_zone: Option<String>,
    /// Node labels it was requested with; a planner keeps them satisfied.
    #[serde(default)]
    pub required_labels: BTreeMap<String, String>,
}

/// The rule a server group imposes on its members (Nova's policies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupPolicy {
    /// Hard: all members on one node.
    Affinity,
    /// Hard: at most `max_per_node` members on any node.
    AntiAffinity,
    /// Soft: prefer nodes that already run members.
    SoftAffinity,
    /// Soft: prefer nodes that run fewer members.
    SoftAntiAffinity,
}

/// A server group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerGroup {
    /// Stable identifier.
    pub id: String,
    /// Its rule.
    pub policy: GroupPolicy,
    /// For hard anti-affinity: members allowed per node (Nova's
    /// `max_server_per_host`); 1 when absent.
    #[serde(default)]
    pub max_per_node: Option<u32>,
}

/// A live migration that has started and not finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationInFlight {
    /// The migrating instance.
    pub instance: String,
    /// The node it leaves (must be the instance's `node`).
    pub from: String,
    /// The node it goes to; its resources are held there already.
    pub to: String,
}

/// Spread instances over nodes, or pack them onto as few as possible.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Prefer the nodes with the most free resources (Nova's default).
    #[default]
    Spread,
    /// Prefer the fullest nodes that still fit.
    Pack,
}

/// Multipliers of the weighers (Nova's `*_weight_multiplier`). Each
/// weigher's raw values are normalized to `0..=1` over the nodes that passed
/// the filters, then multiplied and summed. Zero turns a weigher off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WeigherMultipliers {
    /// Free memory fraction (sign flipped when packing).
    pub ram: f64,
    /// Free vCPU fraction (sign flipped when packing).
    pub cpu: f64,
    /// Free disk fraction (sign flipped when packing).
    pub disk: f64,
    /// Measured CPU utilisation (less is better).
    pub load: f64,
    /// Soft affinity and soft anti-affinity.
    pub soft_affinity: f64,
    /// Staying in the preferred zone.
    pub zone: f64,
}

impl Default for WeigherMultipliers {
    fn default() -> Self {
        Self {
            ram: 1.0,
            cpu: 1.0,
            disk: 0.5,
            load: 1.0,
            soft_affinity: 2.0,
            zone: 1.0,
        }
    }
}

/// Cluster-wide scheduling settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterConfig {
    /// Ratios for nodes that do not set their own.
    pub overcommit: OvercommitRatios,
    /// Instance limit for nodes that do not set their own (Nova's
    /// `max_instances_per_host` is 50; ours is higher because small test
    /// guests are common).
    pub max_instances_per_node: u32,
    /// Spread or pack when the request does not say.
    pub strategy: Strategy,
    /// Weigher multipliers.
    pub weights: WeigherMultipliers,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            overcommit: OvercommitRatios::default(),
            max_instances_per_node: 200,
            strategy: Strategy::Spread,
            weights: WeigherMultipliers::default(),
        }
    }
}

/// Where to put one instance, or a batch of identical ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacementRequest {
    /// Idempotency key of the API request; seeds the tie-breaking so that a
    /// decision can be replayed.
    pub request_id: String,
    /// Instances in this batch (1 for a single instance).
    #[serde(default = "one")]
    pub count: u32,
    /// Index of the first instance of this batch within the whole request.
    /// A batch split into parts (or retried after a partial commit) places
    /// exactly as the whole would: instance `first_index + k` is seeded the
    /// same way in both.
    #[serde(default)]
    pub first_index: u32,
    /// Resources of one instance (the flavor).
    pub resources: Resources,
    /// Required zone.
    #[serde(default)]
    pub zone: Option<String>,
    /// Required node labels (from the flavor and the request).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Server group the new instances join.
    #[serde(default)]
    pub group: Option<String>,
    /// Overrides the cluster's spread or pack strategy.
    #[serde(default)]
    pub strategy: Option<Strategy>,
    /// Zone to prefer without requiring it (crossing zones costs).
    #[serde(default)]
    pub preferred_zone: Option<String>,
}

fn one() -> u32 {
    1
}

impl PlacementRequest {
    /// A request for one instance of `resources` with nothing else required.
    pub fn new(request_id: impl Into<String>, resources: Resources) -> Self {
        Self {
            request_id: request_id.into(),
            count: 1,
            first_index: 0,
            resources,
            zone: None,
            labels: BTreeMap::new(),
            group: None,
            strategy: None,
            preferred_zone: None,
        }
    }
}
