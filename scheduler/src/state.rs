//! The indexed working copy of a [`ClusterSnapshot`]: nodes as compact
//! records addressed by `u32` index, zones and labels interned, with node
//! lists per zone, per label and per group, so that filters and weighers run
//! over plain arrays. Planners change it tentatively (placements, moves) and
//! undo their changes before returning.

use std::collections::{BTreeMap, HashMap};

use crate::hash::{IndexMap, fnv1a};
use crate::model::{
    ClusterConfig, ClusterSnapshot, GroupPolicy, Node, NodeState, Resources, Strategy,
};

/// "No index": an unknown name, or no migration target.
pub(crate) const NONE: u32 = u32::MAX;

/// Errors found while validating and indexing a snapshot.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BuildStateError {
    /// Two nodes share an id.
    #[error("node id {0:?} appears more than once")]
    DuplicateNode(String),
    /// Two instances share an id.
    #[error("instance id {0:?} appears more than once")]
    DuplicateInstance(String),
    /// Two server groups share an id.
    #[error("server group id {0:?} appears more than once")]
    DuplicateGroup(String),
    /// An instance runs on a node the snapshot does not list.
    #[error("instance {instance:?} is on node {node:?}, which is not in the snapshot")]
    UnknownNode {
        /// The instance.
        instance: String,
        /// The missing node.
        node: String,
    },
    /// An instance belongs to a group the snapshot does not list.
    #[error(
        "instance {instance:?} belongs to server group {group:?}, which is not in the snapshot"
    )]
    UnknownGroup {
        /// The instance.
        instance: String,
        /// The missing group.
        group: String,
    },
    /// A migration names an instance the snapshot does not list.
    #[error("a migration refers to instance {0:?}, which is not in the snapshot")]
    UnknownMigratingInstance(String),
    /// A migration names a node the snapshot does not list, or a source that
    /// is not where the instance runs.
    #[error("the migration of instance {instance:?} names node {node:?}, which is not {what}")]
    BadMigrationNode {
        /// The instance.
        instance: String,
        /// The node named.
        node: String,
        /// What the node should have been.
        what: &'static str,
    },
    /// One instance has two migrations in flight.
    #[error("instance {0:?} has more than one migration in flight")]
    DuplicateMigration(String),
    /// A ratio is zero, negative, not a number or above 1000.
    #[error("the {what} overcommit ratio of {owner} must be above 0 and at most 1000, got {value}")]
    InvalidRatio {
        /// Which ratio.
        what: &'static str,
        /// The node, or "the cluster".
        owner: String,
        /// The value given.
        value: f64,
    },
    /// A measurement is negative, not a number or absurdly large.
    #[error("the {what} of {owner:?} must be a number from 0 to 1e6, got {value}")]
    InvalidMeasurement {
        /// Which measurement.
        what: &'static str,
        /// The node or instance.
        owner: String,
        /// The value given.
        value: f64,
    },
    /// More nodes, instances or groups than the scheduler indexes.
    #[error("the snapshot has more {0} than the scheduler can index")]
    TooMany(&'static str),
}

/// The hot part of a node: what every filter and weigher reads.
#[derive(Debug, Clone)]
pub(crate) struct NodeRt {
    pub state: NodeState,
    pub zone: u32,
    /// Effective capacity (physical times ratio): vCPUs, MiB, GiB.
    pub cap: [f64; 3],
    /// `1 / cap` (0 when `cap` is 0): weighers multiply instead of divide.
    pub inv_cap: [f64; 3],
    /// Allocated: reserved plus instances plus incoming migrations.
    pub used: [u64; 3],
    pub instances: u32,
    pub max_instances: u32,
    /// Measured CPU utilisation, a fraction of `pcpus`.
    pub cpu_util: f64,
    /// Physical vCPUs.
    pub pcpus: u32,
}

impl NodeRt {
    /// Free effective capacity in dimension `d` (may be negative when a
    /// ratio was lowered under existing allocations).
    pub fn free(&self, d: usize) -> f64 {
        self.cap[d] - self.used[d] as f64
    }

    /// Whether `need` fits in dimension `d` (the same comparison as the
    /// placement fast path on [`Hot::free`]).
    pub fn fits(&self, d: usize, need: u64) -> bool {
        need as f64 <= self.free(d)
    }

    /// Utilisation change when an instance using `cpu` busy vCPUs arrives.
    pub fn util_delta(&self, cpu: f64) -> f64 {
        if self.pcpus == 0 {
            0.0
        } else {
            cpu / f64::from(self.pcpus)
        }
    }
}

/// What the placement fast path reads for a node: 32 bytes, so that
/// 10,000 nodes fit in a core's L2 cache. Derived from [`NodeRt`] by
/// [`ClusterState::refresh`] after every change.
///
/// The fast path's "passes" is conservative: `free` is rounded down and
/// the demand up, and `room` is 0 for a node that is not up, so a node it
/// admits passes the core filters; a node it refuses is checked by the
/// filters themselves, which decide and give the reason.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(32))]
pub(crate) struct Hot {
    /// Free effective capacity per dimension ([`NodeRt::free`]), rounded
    /// down.
    pub free: [f32; 3],
    /// Instances it may still take; 0 when it is not up.
    pub room: u32,
    /// Raw values of the core weighers (these are the weighers' values):
    /// free fraction of memory, vCPUs and disk, and minus the CPU
    /// utilisation.
    pub raw: [f32; 4],
}

/// `x` rounded down to an `f32`.
pub(crate) fn f32_down(x: f64) -> f32 {
    // Rounding is handled explicitly below.
    #[allow(clippy::cast_possible_truncation)]
    let f = x as f32;
    if f64::from(f) > x { f.next_down() } else { f }
}

/// `x` rounded up to an `f32`.
pub(crate) fn f32_up(x: f64) -> f32 {
    // Rounding is handled explicitly below.
    #[allow(clippy::cast_possible_truncation)]
    let f = x as f32;
    if f64::from(f) < x { f.next_up() } else { f }
}

/// `x` rounded to the nearest `f32`.
fn f32_near(x: f64) -> f32 {
    // Weigher values only need f32 precision.
    #[allow(clippy::cast_possible_truncation)]
    let f = x as f32;
    f
}

/// Index of each core weigher's value in [`Hot::raw`].
pub(crate) const RAW_MEM: usize = 0;
pub(crate) const RAW_VCPU: usize = 1;
pub(crate) const RAW_DISK: usize = 2;
pub(crate) const RAW_LOAD: usize = 3;

/// The cold part of a node: names, labels, ratios.
#[derive(Debug, Clone)]
pub(crate) struct NodeMeta {
    pub id: String,
    pub name: String,
    /// Interned `key=value` pairs, sorted.
    pub labels: Vec<u32>,
    pub ratios: [f64; 3],
    /// Hash of the id, mixed into the tie-breaking key.
    pub hash: u64,
}

/// A server group with the nodes its members occupy.
#[derive(Debug, Clone)]
pub(crate) struct GroupRt {
    pub id: String,
    pub policy: GroupPolicy,
    pub max_per_node: u32,
    /// Node index to members on it (incoming migrations count on both).
    pub members: IndexMap<u32, u32>,
    /// Members in the group.
    pub size: u32,
}

impl GroupRt {
    /// Members of the group on `node`.
    pub fn on(&self, node: u32) -> u32 {
        self.members.get(&node).copied().unwrap_or(0)
    }

    /// Adds a member on `node`.
    pub fn add(&mut self, node: u32) {
        *self.members.entry(node).or_insert(0) += 1;
    }

    /// Removes a member from `node`.
    pub fn remove(&mut self, node: u32) {
        if let Some(count) = self.members.get_mut(&node) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.members.remove(&node);
            }
        }
    }

    /// Nodes with members, in index order (for deterministic explanations).
    pub fn nodes_sorted(&self) -> Vec<u32> {
        let mut nodes: Vec<u32> = self.members.keys().copied().collect();
        nodes.sort_unstable();
        nodes
    }
}

/// A required zone, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZoneReq {
    Any,
    Known(u32),
    /// No node is in the named zone.
    Unknown,
}

/// An instance.
#[derive(Debug, Clone)]
pub(crate) struct InstanceRt {
    pub id: String,
    pub node: u32,
    pub res: Resources,
    pub cpu: f64,
    pub dirty: f64,
    pub groups: Vec<u32>,
    pub pinned: bool,
    /// Target of its migration in flight, or [`NONE`].
    pub migrating_to: u32,
    pub zone: ZoneReq,
    pub labels: Vec<u32>,
}

/// What the filters and weighers evaluate nodes for: a new instance, or an
/// existing one that would move.
#[derive(Debug, Clone)]
pub(crate) struct Demand {
    pub res: Resources,
    /// Measured CPU it brings (busy vCPUs); 0 for a new instance.
    pub cpu: f64,
    pub zone: ZoneReq,
    /// Interned labels; [`NONE`] for a pair no node has.
    pub labels: Vec<u32>,
    pub groups: Vec<u32>,
    /// The instance that would move and the node it leaves.
    pub moving: Option<(u32, u32)>,
    pub strategy: Strategy,
    pub preferred_zone: Option<u32>,
    pub headroom: Option<Headroom>,
    /// Names the request asked for that no node has (only for explanations).
    pub unknown_names: Vec<String>,
}

/// Limits a target node must stay under after a consolidation move.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Headroom {
    pub max_cpu_util: f64,
    pub max_mem_fraction: f64,
}

/// Resource dimensions, indexing `NodeRt::cap` and `NodeRt::used`.
pub(crate) const VCPU: usize = 0;
pub(crate) const MEM: usize = 1;
pub(crate) const DISK: usize = 2;

pub(crate) fn res_array(res: &Resources) -> [u64; 3] {
    [u64::from(res.vcpus), res.memory_mib, res.disk_gib]
}

/// The indexed cluster.
#[derive(Debug, Clone)]
pub(crate) struct ClusterState {
    pub config: ClusterConfig,
    pub nodes: Vec<NodeRt>,
    /// Derived from `nodes`; kept current by [`ClusterState::refresh`].
    pub hot: Vec<Hot>,
    pub meta: Vec<NodeMeta>,
    pub node_index: HashMap<String, u32>,
    pub zone_names: Vec<String>,
    pub zone_index: HashMap<String, u32>,
    pub zone_nodes: Vec<Vec<u32>>,
    /// `label_index[key][value]` is the interned pair.
    pub label_index: HashMap<String, HashMap<String, u32>>,
    pub label_names: Vec<(String, String)>,
    pub label_nodes: Vec<Vec<u32>>,
    pub groups: Vec<GroupRt>,
    pub group_index: HashMap<String, u32>,
    pub instances: Vec<InstanceRt>,
    pub instance_index: HashMap<String, u32>,
    /// Instances running on (or leaving) each node, sorted by index.
    pub node_instances: Vec<Vec<u32>>,
    /// Migrations in flight touching each node (either end).
    pub node_migrations: Vec<u32>,
    pub migrations_in_flight: u32,
}

fn to_u32(n: usize, what: &'static str) -> Result<u32, BuildStateError> {
    u32::try_from(n)
        .ok()
        .filter(|&i| i != NONE)
        .ok_or(BuildStateError::TooMany(what))
}

/// `usize` index to `u32`; callers index vectors whose length was checked
/// against `u32` when the state was built.
pub(crate) fn ix(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(NONE)
}

fn check_ratio(what: &'static str, owner: &str, value: f64) -> Result<f64, BuildStateError> {
    if value.is_finite() && value > 0.0 && value <= 1000.0 {
        Ok(value)
    } else {
        Err(BuildStateError::InvalidRatio {
            what,
            owner: owner.to_owned(),
            value,
        })
    }
}

/// Largest measurement accepted (busy vCPUs, utilisation, MiB/s).
pub const MAX_MEASURE: f64 = 1e6;

pub(crate) fn check_measure(
    what: &'static str,
    owner: &str,
    value: f64,
) -> Result<f64, BuildStateError> {
    // Far above any real machine; keeps sums of squares finite.
    if value.is_finite() && (0.0..=MAX_MEASURE).contains(&value) {
        Ok(value)
    } else {
        Err(BuildStateError::InvalidMeasurement {
            what,
            owner: owner.to_owned(),
            value,
        })
    }
}

impl ClusterState {
    /// Validates and indexes a snapshot.
    pub fn build(snapshot: &ClusterSnapshot) -> Result<Self, BuildStateError> {
        let config = snapshot.config;
        let cluster_ratios = [
            check_ratio("cpu", "the cluster", config.overcommit.cpu)?,
            check_ratio("ram", "the cluster", config.overcommit.ram)?,
            check_ratio("disk", "the cluster", config.overcommit.disk)?,
        ];
        to_u32(snapshot.nodes.len(), "nodes")?;
        to_u32(snapshot.instances.len(), "instances")?;
        to_u32(snapshot.groups.len(), "groups")?;
        let mut state = Self {
            config,
            nodes: Vec::with_capacity(snapshot.nodes.len()),
            hot: vec![Hot::default(); snapshot.nodes.len()],
            meta: Vec::with_capacity(snapshot.nodes.len()),
            node_index: HashMap::with_capacity(snapshot.nodes.len()),
            zone_names: Vec::new(),
            zone_index: HashMap::new(),
            zone_nodes: Vec::new(),
            label_index: HashMap::new(),
            label_names: Vec::new(),
            label_nodes: Vec::new(),
            groups: Vec::with_capacity(snapshot.groups.len()),
            group_index: HashMap::with_capacity(snapshot.groups.len()),
            instances: Vec::with_capacity(snapshot.instances.len()),
            instance_index: HashMap::with_capacity(snapshot.instances.len()),
            node_instances: vec![Vec::new(); snapshot.nodes.len()],
            node_migrations: vec![0; snapshot.nodes.len()],
            migrations_in_flight: 0,
        };
        let mut measured = Vec::with_capacity(snapshot.nodes.len());
        for node in &snapshot.nodes {
            measured.push(state.add_node(node, cluster_ratios)?);
        }
        for group in &snapshot.groups {
            let index = ix(state.groups.len());
            if state.group_index.insert(group.id.clone(), index).is_some() {
                return Err(BuildStateError::DuplicateGroup(group.id.clone()));
            }
            state.groups.push(GroupRt {
                id: group.id.clone(),
                policy: group.policy,
                max_per_node: group.max_per_node.unwrap_or(1).max(1),
                members: IndexMap::default(),
                size: 0,
            });
        }
        let mut instance_cpu = vec![0.0f64; snapshot.nodes.len()];
        for instance in &snapshot.instances {
            let index = ix(state.instances.len());
            if state
                .instance_index
                .insert(instance.id.clone(), index)
                .is_some()
            {
                return Err(BuildStateError::DuplicateInstance(instance.id.clone()));
            }
            let Some(&node) = state.node_index.get(&instance.node) else {
                return Err(BuildStateError::UnknownNode {
                    instance: instance.id.clone(),
                    node: instance.node.clone(),
                });
            };
            let cpu = check_measure("measured CPU", &instance.id, instance.measured_cpu)?;
            let dirty = check_measure("dirty rate", &instance.id, instance.dirty_rate_mib_s)?;
            let mut groups = Vec::with_capacity(instance.groups.len());
            for group in &instance.groups {
                let Some(&g) = state.group_index.get(group) else {
                    return Err(BuildStateError::UnknownGroup {
                        instance: instance.id.clone(),
                        group: group.clone(),
                    });
                };
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
            let mut unknown = Vec::new();
            let zone = state.resolve_zone(instance.required_zone.as_deref(), &mut unknown);
            let labels = state.resolve_labels(&instance.required_labels, &mut unknown);
            instance_cpu[node as usize] += cpu;
            let rt = InstanceRt {
                id: instance.id.clone(),
                node,
                res: instance.resources,
                cpu,
                dirty,
                groups,
                pinned: instance.pinned,
                migrating_to: NONE,
                zone,
                labels,
            };
            state.add_load(node, &rt.res, &rt.groups);
            state.instances.push(rt);
            state.node_instances[node as usize].push(index);
        }
        for (i, node) in state.nodes.iter_mut().enumerate() {
            node.cpu_util = match measured[i] {
                Some(util) => util,
                None => node.util_delta(instance_cpu[i]),
            };
        }
        for migration in &snapshot.migrations {
            state.add_migration(&migration.instance, &migration.from, &migration.to)?;
        }
        for node in 0..state.nodes.len() {
            state.refresh(ix(node));
        }
        Ok(state)
    }

    fn add_node(
        &mut self,
        node: &Node,
        cluster_ratios: [f64; 3],
    ) -> Result<Option<f64>, BuildStateError> {
        let index = ix(self.nodes.len());
        if self.node_index.insert(node.id.clone(), index).is_some() {
            return Err(BuildStateError::DuplicateNode(node.id.clone()));
        }
        let ratios = match node.overcommit {
            Some(r) => [
                check_ratio("cpu", &node.id, r.cpu)?,
                check_ratio("ram", &node.id, r.ram)?,
                check_ratio("disk", &node.id, r.disk)?,
            ],
            None => cluster_ratios,
        };
        let measured = match node.cpu_utilisation {
            Some(u) => Some(check_measure("CPU utilisation", &node.id, u)?),
            None => None,
        };
        let zone = self.intern_zone(&node.zone);
        self.zone_nodes[zone as usize].push(index);
        let mut labels = Vec::with_capacity(node.labels.len());
        for (key, value) in &node.labels {
            let label = self.intern_label(key, value);
            self.label_nodes[label as usize].push(index);
            labels.push(label);
        }
        labels.sort_unstable();
        let physical = res_array(&node.capacity);
        let cap = [
            physical[VCPU] as f64 * ratios[VCPU],
            physical[MEM] as f64 * ratios[MEM],
            physical[DISK] as f64 * ratios[DISK],
        ];
        self.nodes.push(NodeRt {
            state: node.state,
            zone,
            cap,
            inv_cap: cap.map(|c| if c > 0.0 { 1.0 / c } else { 0.0 }),
            used: res_array(&node.reserved),
            instances: 0,
            max_instances: node
                .max_instances
                .unwrap_or(self.config.max_instances_per_node),
            cpu_util: 0.0,
            pcpus: node.capacity.vcpus,
        });
        self.meta.push(NodeMeta {
            id: node.id.clone(),
            name: if node.name.is_empty() {
                node.id.clone()
            } else {
                node.name.clone()
            },
            labels,
            ratios,
            hash: fnv1a(node.id.as_bytes()),
        });
        Ok(measured)
    }

    fn add_migration(
        &mut self,
        instance: &str,
        from: &str,
        to: &str,
    ) -> Result<(), BuildStateError> {
        let Some(&i) = self.instance_index.get(instance) else {
            return Err(BuildStateError::UnknownMigratingInstance(
                instance.to_owned(),
            ));
        };
        let bad = |node: &str, what| BuildStateError::BadMigrationNode {
            instance: instance.to_owned(),
            node: node.to_owned(),
            what,
        };
        let source = self.instances[i as usize].node;
        if self.node_index.get(from) != Some(&source) {
            return Err(bad(from, "the node the instance runs on"));
        }
        let Some(&target) = self.node_index.get(to) else {
            return Err(bad(to, "a node in the snapshot"));
        };
        if target == source {
            return Err(bad(to, "a different node from the source"));
        }
        if self.instances[i as usize].migrating_to != NONE {
            return Err(BuildStateError::DuplicateMigration(instance.to_owned()));
        }
        self.instances[i as usize].migrating_to = target;
        let (res, groups) = {
            let inst = &self.instances[i as usize];
            (inst.res, inst.groups.clone())
        };
        self.add_load(target, &res, &groups);
        self.node_migrations[source as usize] += 1;
        self.node_migrations[target as usize] += 1;
        self.migrations_in_flight += 1;
        Ok(())
    }

    fn intern_zone(&mut self, zone: &str) -> u32 {
        if let Some(&z) = self.zone_index.get(zone) {
            return z;
        }
        let z = ix(self.zone_names.len());
        self.zone_names.push(zone.to_owned());
        self.zone_index.insert(zone.to_owned(), z);
        self.zone_nodes.push(Vec::new());
        z
    }

    fn intern_label(&mut self, key: &str, value: &str) -> u32 {
        if let Some(&l) = self.label_index.get(key).and_then(|v| v.get(value)) {
            return l;
        }
        let l = ix(self.label_names.len());
        self.label_names.push((key.to_owned(), value.to_owned()));
        self.label_index
            .entry(key.to_owned())
            .or_default()
            .insert(value.to_owned(), l);
        self.label_nodes.push(Vec::new());
        l
    }

    /// Resolves a zone name; unknown names are remembered for explanations.
    pub fn resolve_zone(&self, zone: Option<&str>, unknown: &mut Vec<String>) -> ZoneReq {
        match zone {
            None => ZoneReq::Any,
            Some(name) => match self.zone_index.get(name) {
                Some(&z) => ZoneReq::Known(z),
                None => {
                    unknown.push(format!("zone {name:?}"));
                    ZoneReq::Unknown
                }
            },
        }
    }

    /// Resolves label pairs; pairs no node has become [`NONE`].
    pub fn resolve_labels(
        &self,
        labels: &BTreeMap<String, String>,
        unknown: &mut Vec<String>,
    ) -> Vec<u32> {
        labels
            .iter()
            .map(
                |(key, value)| match self.label_index.get(key).and_then(|v| v.get(value)) {
                    Some(&l) => l,
                    None => {
                        unknown.push(format!("label {key}={value}"));
                        NONE
                    }
                },
            )
            .collect()
    }

    /// Recomputes the fast-path view of a node after a change.
    #[inline]
    pub fn refresh(&mut self, node: u32) {
        let n = &self.nodes[node as usize];
        let free = [n.free(VCPU), n.free(MEM), n.free(DISK)];
        self.hot[node as usize] = Hot {
            free: free.map(f32_down),
            room: if n.state == NodeState::Up {
                n.max_instances.saturating_sub(n.instances)
            } else {
                0
            },
            raw: [
                f32_near(free[MEM] * n.inv_cap[MEM]),
                f32_near(free[VCPU] * n.inv_cap[VCPU]),
                f32_near(free[DISK] * n.inv_cap[DISK]),
                f32_near(-n.cpu_util),
            ],
        };
    }

    /// Sets a node's scheduling state.
    pub fn set_node_state(&mut self, node: u32, to: NodeState) {
        self.nodes[node as usize].state = to;
        self.refresh(node);
    }

    /// Sets a node's measured CPU utilisation.
    pub fn set_cpu_util(&mut self, node: u32, util: f64) {
        self.nodes[node as usize].cpu_util = util;
        self.refresh(node);
    }

    /// Adds an instance's allocation to a node.
    pub fn add_load(&mut self, node: u32, res: &Resources, groups: &[u32]) {
        let n = &mut self.nodes[node as usize];
        let r = res_array(res);
        for (used, add) in n.used.iter_mut().zip(r) {
            *used = used.saturating_add(add);
        }
        n.instances += 1;
        for &g in groups {
            let group = &mut self.groups[g as usize];
            group.add(node);
            group.size += 1;
        }
        self.refresh(node);
    }

    /// Removes what [`add_load`](Self::add_load) added.
    pub fn remove_load(&mut self, node: u32, res: &Resources, groups: &[u32]) {
        let n = &mut self.nodes[node as usize];
        let r = res_array(res);
        for (used, sub) in n.used.iter_mut().zip(r) {
            *used = used.saturating_sub(sub);
        }
        n.instances = n.instances.saturating_sub(1);
        for &g in groups {
            let group = &mut self.groups[g as usize];
            group.remove(node);
            group.size = group.size.saturating_sub(1);
        }
        self.refresh(node);
    }

    /// Moves an instance's allocation and measured load to `to`. Returns the
    /// node it left. Undo by moving it back.
    pub fn move_instance(&mut self, instance: u32, to: u32) -> u32 {
        let (from, res, cpu, groups) = {
            let inst = &mut self.instances[instance as usize];
            let from = inst.node;
            inst.node = to;
            (from, inst.res, inst.cpu, std::mem::take(&mut inst.groups))
        };
        self.remove_load(from, &res, &groups);
        self.add_load(to, &res, &groups);
        self.instances[instance as usize].groups = groups;
        let out = self.nodes[from as usize].util_delta(cpu);
        self.set_cpu_util(from, (self.nodes[from as usize].cpu_util - out).max(0.0));
        let incoming = self.nodes[to as usize].util_delta(cpu);
        self.set_cpu_util(to, self.nodes[to as usize].cpu_util + incoming);
        let list = &mut self.node_instances[from as usize];
        if let Ok(pos) = list.binary_search(&instance) {
            list.remove(pos);
        }
        let list = &mut self.node_instances[to as usize];
        if let Err(pos) = list.binary_search(&instance) {
            list.insert(pos, instance);
        }
        from
    }

    /// The demand of moving an existing instance off its node.
    pub fn instance_demand(&self, instance: u32, strategy: Strategy) -> Demand {
        let inst = &self.instances[instance as usize];
        let from = inst.node;
        Demand {
            res: inst.res,
            cpu: inst.cpu,
            zone: inst.zone,
            labels: inst.labels.clone(),
            groups: inst.groups.clone(),
            moving: Some((instance, from)),
            strategy,
            preferred_zone: Some(self.nodes[from as usize].zone),
            headroom: None,
            unknown_names: Vec::new(),
        }
    }

    /// Name of a node for sentences.
    pub fn node_name(&self, node: u32) -> &str {
        &self.meta[node as usize].name
    }

    /// Standard deviation of the CPU utilisation of the nodes that are up.
    pub fn imbalance(&self) -> f64 {
        let (mut n, mut sum, mut sq) = (0.0f64, 0.0f64, 0.0f64);
        for node in self.nodes.iter().filter(|n| n.state == NodeState::Up) {
            n += 1.0;
            sum += node.cpu_util;
            sq += node.cpu_util * node.cpu_util;
        }
        if n == 0.0 {
            return 0.0;
        }
        let mean = sum / n;
        (sq / n - mean * mean).max(0.0).sqrt()
    }
}

/// Per-node scratch values stamped with an epoch, so clearing is O(1).
#[derive(Debug, Default, Clone)]
pub(crate) struct NodeMarks {
    stamp: Vec<u32>,
    value: Vec<i64>,
    epoch: u32,
    /// One value per decision that a filter or weigher keeps beside its
    /// marks (how many groups a node must be in, say).
    pub aux: i64,
}

impl NodeMarks {
    /// Forgets every mark; sized for `nodes` nodes.
    pub fn reset(&mut self, nodes: usize) {
        if self.stamp.len() != nodes {
            self.stamp = vec![0; nodes];
            self.value = vec![0; nodes];
            self.epoch = 0;
        }
        self.aux = 0;
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.stamp.fill(0);
            self.epoch = 1;
        }
    }

    /// Sets the mark of `node`.
    pub fn set(&mut self, node: u32, value: i64) {
        let i = node as usize;
        self.stamp[i] = self.epoch;
        self.value[i] = value;
    }

    /// The mark of `node`, 0 when unset.
    #[inline]
    pub fn get(&self, node: u32) -> i64 {
        let i = node as usize;
        if self.stamp[i] == self.epoch {
            self.value[i]
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Instance, MigrationInFlight, OvercommitRatios, ServerGroup};
    use crate::testing::{instance, node};

    fn snapshot() -> ClusterSnapshot {
        ClusterSnapshot {
            nodes: vec![node("a", "z1", 8, 8192, 100), node("b", "z2", 8, 8192, 100)],
            instances: vec![instance("i1", "a", 2, 2048, 10)],
            groups: vec![ServerGroup {
                id: "g".into(),
                policy: GroupPolicy::AntiAffinity,
                max_per_node: None,
            }],
            ..ClusterSnapshot::default()
        }
    }

    #[test]
    fn builds_usage_and_ratios() {
        let state = ClusterState::build(&snapshot()).unwrap();
        assert_eq!(state.nodes[0].used, [2, 2048, 10]);
        assert_eq!(state.nodes[0].cap, [128.0, 12288.0, 100.0]);
        assert_eq!(state.nodes[1].used, [0, 0, 0]);
        assert_eq!(state.zone_nodes.len(), 2);
    }

    #[test]
    fn rejects_bad_input() {
        let mut s = snapshot();
        s.nodes.push(s.nodes[0].clone());
        assert!(matches!(
            ClusterState::build(&s),
            Err(BuildStateError::DuplicateNode(_))
        ));
        let mut s = snapshot();
        s.instances[0].node = "nope".into();
        assert!(matches!(
            ClusterState::build(&s),
            Err(BuildStateError::UnknownNode { .. })
        ));
        let mut s = snapshot();
        s.instances[0].groups = vec!["missing".into()];
        assert!(matches!(
            ClusterState::build(&s),
            Err(BuildStateError::UnknownGroup { .. })
        ));
        let mut s = snapshot();
        s.nodes[0].overcommit = Some(OvercommitRatios {
            cpu: f64::NAN,
            ..OvercommitRatios::default()
        });
        assert!(matches!(
            ClusterState::build(&s),
            Err(BuildStateError::InvalidRatio { .. })
        ));
        let mut s = snapshot();
        s.instances[0].measured_cpu = -1.0;
        assert!(matches!(
            ClusterState::build(&s),
            Err(BuildStateError::InvalidMeasurement { .. })
        ));
        let mut s = snapshot();
        s.migrations.push(MigrationInFlight {
            instance: "i1".into(),
            from: "b".into(),
            to: "a".into(),
        });
        assert!(matches!(
            ClusterState::build(&s),
            Err(BuildStateError::BadMigrationNode { .. })
        ));
    }

    #[test]
    fn migration_holds_resources_on_both_nodes() {
        let mut s = snapshot();
        s.instances[0].groups = vec!["g".into()];
        s.migrations.push(MigrationInFlight {
            instance: "i1".into(),
            from: "a".into(),
            to: "b".into(),
        });
        let state = ClusterState::build(&s).unwrap();
        assert_eq!(state.nodes[1].used, [2, 2048, 10]);
        assert_eq!(state.groups[0].on(1), 1);
        assert_eq!(state.groups[0].on(0), 1);
        assert_eq!(state.node_migrations, vec![1, 1]);
    }

    #[test]
    fn move_and_move_back_restores_state() {
        let mut s = snapshot();
        s.instances.push(Instance {
            measured_cpu: 4.0,
            ..instance("i2", "a", 4, 1024, 1)
        });
        let mut state = ClusterState::build(&s).unwrap();
        assert!((state.nodes[0].cpu_util - 0.5).abs() < 1e-12);
        let from = state.move_instance(1, 1);
        assert_eq!(from, 0);
        assert_eq!(state.nodes[1].used, [4, 1024, 1]);
        assert!((state.nodes[1].cpu_util - 0.5).abs() < 1e-12);
        assert_eq!(state.node_instances[1], vec![1]);
        state.move_instance(1, from);
        assert_eq!(state.nodes[0].used, [6, 3072, 11]);
        assert_eq!(state.node_instances[0], vec![0, 1]);
        assert!(state.node_instances[1].is_empty());
    }

    #[test]
    fn marks_reset_in_constant_time() {
        let mut marks = NodeMarks::default();
        marks.reset(4);
        marks.set(2, 7);
        assert_eq!(marks.get(2), 7);
        marks.reset(4);
        assert_eq!(marks.get(2), 0);
    }
}
