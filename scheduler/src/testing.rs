//! Test harness: builders for small hand-made snapshots, a generator of
//! realistic synthetic clusters (mixed node sizes, zones, labels, groups,
//! skewed load), request mixes, and an independent checker of the rules a
//! plan must never break. Used by the unit and property tests and by the
//! `bench-scheduler` benchmark; it does no I/O and is not used in
//! production paths.

use std::collections::{BTreeMap, HashMap};

use crate::hash::SplitMix64;
use crate::model::{
    ClusterSnapshot, GroupPolicy, Instance, Node, NodeState, PlacementRequest, Resources,
    ServerGroup, Strategy,
};
use crate::moves::Move;
use crate::place::{PlacementPlan, placed_id};

/// A node that is up, with no labels and the cluster's ratios.
pub fn node(id: &str, zone: &str, vcpus: u32, memory_mib: u64, disk_gib: u64) -> Node {
    Node {
        id: id.to_owned(),
        name: String::new(),
        zone: zone.to_owned(),
        labels: BTreeMap::new(),
        state: NodeState::Up,
        capacity: Resources::new(vcpus, memory_mib, disk_gib),
        reserved: Resources::default(),
        overcommit: None,
        cpu_utilisation: None,
        max_instances: None,
    }
}

/// An idle instance in no group.
pub fn instance(id: &str, node: &str, vcpus: u32, memory_mib: u64, disk_gib: u64) -> Instance {
    Instance {
        id: id.to_owned(),
        node: node.to_owned(),
        resources: Resources::new(vcpus, memory_mib, disk_gib),
        measured_cpu: 0.0,
        dirty_rate_mib_s: 0.0,
        groups: Vec::new(),
        pinned: false,
        required_zone: None,
        required_labels: BTreeMap::new(),
    }
}

/// Flavors of the synthetic clusters, with their relative frequency.
pub const FLAVORS: [(&str, Resources, u32); 6] = [
    ("tiny", Resources::new(1, 1024, 10), 20),
    ("small", Resources::new(2, 4096, 20), 30),
    ("medium", Resources::new(4, 8192, 40), 25),
    ("large", Resources::new(8, 16384, 80), 15),
    ("xlarge", Resources::new(16, 32768, 160), 7),
    ("highmem", Resources::new(8, 65536, 80), 3),
];

fn flavor(rng: &mut SplitMix64) -> Resources {
    let total: u32 = FLAVORS.iter().map(|f| f.2).sum();
    let mut pick = u32::try_from(rng.below(u64::from(total))).unwrap_or(0);
    for (_, res, weight) in FLAVORS {
        if pick < weight {
            return res;
        }
        pick -= weight;
    }
    FLAVORS[0].1
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSpec {
    /// Nodes.
    pub nodes: usize,
    /// Instances to try to place (fewer when the cluster fills up).
    pub instances: usize,
    /// Zones, named `zone-a`, `zone-b`, ...
    pub zones: usize,
    /// Hard anti-affinity groups of 3 to 5 members.
    pub anti_affinity_groups: usize,
    /// Hard affinity groups of 2 to 3 members.
    pub affinity_groups: usize,
    /// Soft anti-affinity groups; ungrouped instances join one at random.
    pub soft_groups: usize,
    /// Share of nodes running hot (70-100% CPU on their instances).
    pub hot_fraction: f64,
    /// Share of nodes not up (down, draining, disabled, standby).
    pub unavailable_fraction: f64,
    /// Share of pinned instances.
    pub pinned_fraction: f64,
    /// Seed.
    pub seed: u64,
}

impl ClusterSpec {
    /// A realistic mix for `nodes` nodes and `instances` instances.
    pub fn new(nodes: usize, instances: usize, seed: u64) -> Self {
        Self {
            nodes,
            instances,
            zones: 3,
            anti_affinity_groups: instances / 50,
            affinity_groups: instances / 200,
            soft_groups: instances / 100,
            hot_fraction: 0.1,
            unavailable_fraction: 0.03,
            pinned_fraction: 0.02,
            seed,
        }
    }
}

/// Generates a cluster that satisfies every rule [`verify`] checks.
pub fn generate(spec: &ClusterSpec) -> ClusterSnapshot {
    let mut rng = SplitMix64::new(spec.seed);
    let zones: Vec<String> = (0..spec.zones.max(1))
        .map(|z| {
            format!(
                "zone-{}",
                char::from(b'a' + u8::try_from(z % 26).unwrap_or(0))
            )
        })
        .collect();
    let mut snap = ClusterSnapshot::default();
    let mut heat = Vec::with_capacity(spec.nodes);
    for k in 0..spec.nodes {
        let (vcpus, mem, disk) = match rng.below(10) {
            0..=3 => (32, 131_072, 1000),
            4..=7 => (64, 262_144, 2000),
            _ => (128, 524_288, 4000),
        };
        let mut n = node(
            &format!("node-{k:05}"),
            &zones[rng.index(zones.len())],
            vcpus,
            mem,
            disk,
        );
        let ssd = if rng.chance(0.6) { "ssd" } else { "hdd" };
        n.labels.insert("disk".into(), ssd.into());
        if rng.chance(0.05) {
            n.labels.insert("gpu".into(), "true".into());
        }
        n.labels.insert("rack".into(), format!("r{}", k / 40));
        if rng.chance(spec.unavailable_fraction) {
            n.state = match rng.below(4) {
                0 => NodeState::Down,
                1 => NodeState::Draining,
                2 => NodeState::Disabled,
                _ => NodeState::Standby,
            };
        }
        heat.push(if rng.chance(spec.hot_fraction) {
            0.7 + 0.3 * rng.unit()
        } else {
            0.05 + 0.4 * rng.unit()
        });
        snap.nodes.push(n);
    }
    let mut filler = Filler::new(&snap);
    let node_ids: Vec<String> = snap.nodes.iter().map(|n| n.id.clone()).collect();
    let hosting: Vec<usize> = (0..snap.nodes.len())
        .filter(|&i| snap.nodes[i].state != NodeState::Standby)
        .collect();
    let mut made = 0usize;
    let mut next_instance =
        |rng: &mut SplitMix64, node: usize, res: Resources, groups: Vec<String>| {
            let mut inst = instance(
                &format!("i-{made:07}"),
                &node_ids[node],
                res.vcpus,
                res.memory_mib,
                res.disk_gib,
            );
            made += 1;
            inst.measured_cpu = f64::from(res.vcpus) * heat[node] * (0.5 + 0.5 * rng.unit());
            inst.dirty_rate_mib_s = if rng.chance(0.02) {
                5000.0
            } else {
                300.0 * rng.unit()
            };
            inst.pinned = rng.chance(spec.pinned_fraction);
            inst.groups = groups;
            inst
        };
    let mut instances = Vec::with_capacity(spec.instances);
    if hosting.is_empty() {
        return snap;
    }
    for g in 0..spec.anti_affinity_groups {
        let id = format!("anti-{g}");
        let size = 3 + rng.below(3);
        let mut used = Vec::new();
        for _ in 0..size {
            let res = flavor(&mut rng);
            for _ in 0..8 {
                let n = hosting[rng.index(hosting.len())];
                if !used.contains(&n) && filler.take(n, res) {
                    used.push(n);
                    instances.push(next_instance(&mut rng, n, res, vec![id.clone()]));
                    break;
                }
            }
        }
        snap.groups.push(ServerGroup {
            id,
            policy: GroupPolicy::AntiAffinity,
            max_per_node: None,
        });
    }
    for g in 0..spec.affinity_groups {
        let id = format!("aff-{g}");
        let n = hosting[rng.index(hosting.len())];
        for _ in 0..2 + rng.below(2) {
            let res = flavor(&mut rng);
            if filler.take(n, res) {
                instances.push(next_instance(&mut rng, n, res, vec![id.clone()]));
            }
        }
        snap.groups.push(ServerGroup {
            id,
            policy: GroupPolicy::Affinity,
            max_per_node: None,
        });
    }
    for g in 0..spec.soft_groups {
        snap.groups.push(ServerGroup {
            id: format!("soft-{g}"),
            policy: GroupPolicy::SoftAntiAffinity,
            max_per_node: None,
        });
    }
    while instances.len() < spec.instances {
        let res = flavor(&mut rng);
        let mut placed = false;
        for _ in 0..8 {
            let n = hosting[rng.index(hosting.len())];
            if filler.take(n, res) {
                let groups = if spec.soft_groups > 0 && rng.chance(0.2) {
                    vec![format!("soft-{}", rng.index(spec.soft_groups))]
                } else {
                    Vec::new()
                };
                instances.push(next_instance(&mut rng, n, res, groups));
                placed = true;
                break;
            }
        }
        if !placed && filler.full_tries() {
            break;
        }
    }
    snap.instances = instances;
    snap
}

/// Tracks free capacity while generating, keeping nodes under 80% of what
/// their ratios allow so that there is room left to schedule into.
struct Filler {
    free: Vec<[f64; 3]>,
    count: Vec<u32>,
    limit: u32,
    misses: u32,
}

impl Filler {
    fn new(snap: &ClusterSnapshot) -> Self {
        let r = snap.config.overcommit;
        let free = snap
            .nodes
            .iter()
            .map(|n| {
                [
                    f64::from(n.capacity.vcpus) * r.cpu * 0.8,
                    n.capacity.memory_mib as f64 * r.ram * 0.8,
                    n.capacity.disk_gib as f64 * r.disk * 0.8,
                ]
            })
            .collect();
        Self {
            free,
            count: vec![0; snap.nodes.len()],
            limit: snap.config.max_instances_per_node,
            misses: 0,
        }
    }

    fn take(&mut self, n: usize, res: Resources) -> bool {
        let need = [
            f64::from(res.vcpus),
            res.memory_mib as f64,
            res.disk_gib as f64,
        ];
        let f = &mut self.free[n];
        if self.count[n] >= self.limit || (0..3).any(|d| need[d] > f[d]) {
            self.misses += 1;
            return false;
        }
        for d in 0..3 {
            f[d] -= need[d];
        }
        self.count[n] += 1;
        true
    }

    fn full_tries(&self) -> bool {
        self.misses > 1_000_000
    }
}

/// A realistic mix of single-instance requests against `snap`: flavors as
/// in [`FLAVORS`], 30% with a zone, 10% needing `disk=ssd`, 5% joining an
/// anti-affinity group, 10% packing, 20% preferring a zone.
pub fn requests(snap: &ClusterSnapshot, n: usize, seed: u64) -> Vec<PlacementRequest> {
    let mut rng = SplitMix64::new(seed);
    let mut zones: Vec<&str> = snap.nodes.iter().map(|n| n.zone.as_str()).collect();
    zones.sort_unstable();
    zones.dedup();
    let anti: Vec<&str> = snap
        .groups
        .iter()
        .filter(|g| g.policy == GroupPolicy::AntiAffinity)
        .map(|g| g.id.as_str())
        .collect();
    (0..n)
        .map(|k| {
            let mut r = PlacementRequest::new(format!("req-{seed}-{k}"), flavor(&mut rng));
            if !zones.is_empty() && rng.chance(0.3) {
                r.zone = Some(zones[rng.index(zones.len())].to_owned());
            }
            if rng.chance(0.1) {
                r.labels.insert("disk".into(), "ssd".into());
            }
            if !anti.is_empty() && rng.chance(0.05) {
                r.group = Some(anti[rng.index(anti.len())].to_owned());
            }
            if rng.chance(0.1) {
                r.strategy = Some(Strategy::Pack);
            }
            if !zones.is_empty() && rng.chance(0.2) {
                r.preferred_zone = Some(zones[rng.index(zones.len())].to_owned());
            }
            r
        })
        .collect()
}

/// The snapshot after a placement plan is carried out: one instance per
/// placement, id `"{request_id}/{index}"`.
pub fn apply_placements(snap: &ClusterSnapshot, plan: &PlacementPlan) -> ClusterSnapshot {
    let mut out = snap.clone();
    let r = &plan.request;
    for p in &plan.placements {
        let mut inst = instance(
            &placed_id(&r.request_id, p.index),
            &p.node,
            r.resources.vcpus,
            r.resources.memory_mib,
            r.resources.disk_gib,
        );
        inst.groups = r.group.iter().cloned().collect();
        inst.required_zone.clone_from(&r.zone);
        inst.required_labels.clone_from(&r.labels);
        out.instances.push(inst);
    }
    out
}

/// The snapshot after moves are carried out (measured node utilisation, when
/// set, moves with the instances).
pub fn apply_moves(snap: &ClusterSnapshot, moves: &[Move]) -> ClusterSnapshot {
    let mut out = snap.clone();
    let pos: HashMap<String, usize> = out
        .instances
        .iter()
        .enumerate()
        .map(|(i, inst)| (inst.id.clone(), i))
        .collect();
    let node_pos: HashMap<String, usize> = out
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.clone(), i))
        .collect();
    for m in moves {
        let Some(&i) = pos.get(&m.instance) else {
            continue;
        };
        let cpu = out.instances[i].measured_cpu;
        for (node, sign) in [(&m.from, -1.0), (&m.to, 1.0)] {
            if let Some(&n) = node_pos.get(node) {
                let pcpus = f64::from(out.nodes[n].capacity.vcpus);
                if let Some(u) = &mut out.nodes[n].cpu_utilisation
                    && pcpus > 0.0
                {
                    *u = (*u + sign * cpu / pcpus).max(0.0);
                }
            }
        }
        out.instances[i].node.clone_from(&m.to);
    }
    out
}

/// Standard deviation of the CPU utilisation of the nodes that are up,
/// computed from scratch.
pub fn imbalance(snap: &ClusterSnapshot) -> f64 {
    let mut busy: HashMap<&str, f64> = HashMap::new();
    for i in &snap.instances {
        *busy.entry(i.node.as_str()).or_default() += i.measured_cpu;
    }
    let utils: Vec<f64> = snap
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Up)
        .map(|n| {
            n.cpu_utilisation.unwrap_or_else(|| {
                if n.capacity.vcpus == 0 {
                    0.0
                } else {
                    busy.get(n.id.as_str()).copied().unwrap_or(0.0) / f64::from(n.capacity.vcpus)
                }
            })
        })
        .collect();
    if utils.is_empty() {
        return 0.0;
    }
    let count = utils.len() as f64;
    let mean = utils.iter().sum::<f64>() / count;
    (utils.iter().map(|u| (u - mean) * (u - mean)).sum::<f64>() / count).sqrt()
}

/// Checks, from scratch, the rules no plan may break: every node's
/// allocation (reserved, instances, incoming migrations) within its
/// capacity times its ratios, instance limits, hard affinity (all members
/// on one node), hard anti-affinity (at most `max_per_node` per node), and
/// each instance's required zone and labels.
pub fn verify(snap: &ClusterSnapshot) -> Result<(), String> {
    let cfg = snap.config;
    let nodes: HashMap<&str, &Node> = snap.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let mut used: HashMap<&str, ([u64; 3], u32)> = snap
        .nodes
        .iter()
        .map(|n| {
            let r = n.reserved;
            (
                n.id.as_str(),
                ([u64::from(r.vcpus), r.memory_mib, r.disk_gib], 0),
            )
        })
        .collect();
    let by_id: HashMap<&str, &Instance> =
        snap.instances.iter().map(|i| (i.id.as_str(), i)).collect();
    let mut holders: Vec<(&str, &Instance)> = snap
        .instances
        .iter()
        .map(|i| (i.node.as_str(), i))
        .collect();
    for m in &snap.migrations {
        if let Some(i) = by_id.get(m.instance.as_str()) {
            holders.push((m.to.as_str(), i));
        }
    }
    for (node, inst) in &holders {
        let Some(entry) = used.get_mut(node) else {
            return Err(format!("instance {} is on unknown node {node}", inst.id));
        };
        let r = inst.resources;
        entry.0[0] += u64::from(r.vcpus);
        entry.0[1] += r.memory_mib;
        entry.0[2] += r.disk_gib;
        entry.1 += 1;
    }
    for (id, (u, count)) in &used {
        let n = nodes[id];
        let ratios = n.overcommit.unwrap_or(cfg.overcommit);
        let cap = [
            f64::from(n.capacity.vcpus) * ratios.cpu,
            n.capacity.memory_mib as f64 * ratios.ram,
            n.capacity.disk_gib as f64 * ratios.disk,
        ];
        for d in 0..3 {
            if u[d] as f64 > cap[d] {
                return Err(format!(
                    "node {id} dimension {d}: {} allocated > {} allowed",
                    u[d], cap[d]
                ));
            }
        }
        let limit = n.max_instances.unwrap_or(cfg.max_instances_per_node);
        if *count > limit {
            return Err(format!("node {id} runs {count} instances, limit {limit}"));
        }
    }
    for g in &snap.groups {
        let mut per_node: HashMap<&str, u32> = HashMap::new();
        for (node, inst) in &holders {
            if inst.groups.contains(&g.id) {
                *per_node.entry(node).or_default() += 1;
            }
        }
        match g.policy {
            GroupPolicy::Affinity if per_node.len() > 1 => {
                return Err(format!(
                    "affinity group {} spans {} nodes",
                    g.id,
                    per_node.len()
                ));
            }
            GroupPolicy::AntiAffinity => {
                let max = g.max_per_node.unwrap_or(1).max(1);
                if let Some((node, c)) = per_node.iter().find(|&(_, &c)| c > max) {
                    return Err(format!(
                        "anti-affinity group {} has {c} members on {node}",
                        g.id
                    ));
                }
            }
            _ => {}
        }
    }
    for inst in &snap.instances {
        let n = nodes[inst.node.as_str()];
        if let Some(z) = &inst.required_zone
            && *z != n.zone
        {
            return Err(format!(
                "instance {} needs zone {z}, runs in {}",
                inst.id, n.zone
            ));
        }
        for (k, v) in &inst.required_labels {
            if n.labels.get(k) != Some(v) {
                return Err(format!(
                    "instance {} needs label {k}={v}, node {} lacks it",
                    inst.id, n.id
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_clusters_are_valid_and_deterministic() {
        let spec = ClusterSpec::new(200, 2000, 7);
        let a = generate(&spec);
        assert_eq!(a, generate(&spec));
        assert_eq!(a.nodes.len(), 200);
        assert!(a.instances.len() > 1900, "{}", a.instances.len());
        verify(&a).unwrap();
        assert!(imbalance(&a) > 0.05);
    }

    #[test]
    fn verify_catches_overcommit_and_anti_affinity() {
        let mut s = ClusterSnapshot {
            nodes: vec![node("a", "z", 1, 1024, 10)],
            instances: vec![instance("x", "a", 1, 1536, 1)],
            ..ClusterSnapshot::default()
        };
        assert_eq!(verify(&s), Ok(()));
        s.instances.push(instance("y", "a", 1, 1, 1));
        assert!(verify(&s).is_err());
        s.instances.pop();
        s.groups.push(ServerGroup {
            id: "g".into(),
            policy: GroupPolicy::AntiAffinity,
            max_per_node: None,
        });
        s.instances[0].groups = vec!["g".into()];
        s.instances.push(Instance {
            groups: vec!["g".into()],
            ..instance("y", "a", 0, 0, 0)
        });
        assert!(verify(&s).unwrap_err().contains("anti-affinity"));
    }
}
