//! Consolidation and its reverse, expansion.
//!
//! Consolidate empties the least-loaded nodes (load: the larger of CPU
//! utilisation and allocated memory share) onto the others so hosts can
//! power down. A node is emptied only if every one of its instances finds a
//! target through the placement filters, packing, with the target staying
//! under a headroom (CPU utilisation and memory share); otherwise none of
//! its instances move and the plan says why. Nodes being emptied take no
//! instances. At least `min_active_nodes` stay up.
//!
//! Expand is the reverse when load rises: when the mean CPU utilisation of
//! the nodes that are up exceeds a ceiling, it picks standby nodes to wake
//! (largest first) until the projected mean is under the target, then plans
//! rebalance moves onto them.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::hash::instance_seed;
use crate::model::{NodeState, Strategy};
use crate::moves::{Move, MoveKind, Undo, precopy_cost};
use crate::place::Scheduler;
use crate::rebalance::{RebalanceError, RebalanceParams};
use crate::state::{Headroom, MEM, NONE, ix};

/// Knobs of the consolidation planner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConsolidateParams {
    /// Targets stay at or under this CPU utilisation.
    pub max_cpu_util: f64,
    /// Targets stay at or under this share of their effective memory.
    pub max_mem_fraction: f64,
    /// Most nodes emptied by one plan.
    pub max_nodes: u32,
    /// Nodes that stay up whatever the load.
    pub min_active_nodes: u32,
    /// Most migrations in one plan.
    pub max_migrations: u32,
    /// Instances moved recently; their nodes are not emptied (hysteresis).
    pub recently_moved: Vec<String>,
    /// Migration link bandwidth, MiB/s.
    pub bandwidth_mib_s: f64,
}

impl Default for ConsolidateParams {
    fn default() -> Self {
        Self {
            max_cpu_util: 0.7,
            max_mem_fraction: 0.85,
            max_nodes: 4,
            min_active_nodes: 2,
            max_migrations: 64,
            recently_moved: Vec::new(),
            bandwidth_mib_s: 1200.0,
        }
    }
}

/// A node the planner did not empty, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedNode {
    /// Node id.
    pub node: String,
    /// A sentence.
    pub reason: String,
}

/// The consolidation planner's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsolidatePlan {
    /// Nodes that can power down once the moves are done (empty ones need
    /// no move).
    pub nodes_to_empty: Vec<String>,
    /// Migrations, grouped by the node they empty.
    pub moves: Vec<Move>,
    /// Least-loaded nodes considered and kept, with the reason.
    pub skipped: Vec<SkippedNode>,
}

/// Knobs of the expand planner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExpandParams {
    /// Expand when the mean CPU utilisation of the nodes up exceeds this.
    pub max_mean_cpu_util: f64,
    /// Wake nodes until the projected mean is at or under this.
    pub target_mean_cpu_util: f64,
    /// Most nodes woken by one plan.
    pub max_nodes: u32,
    /// How the load then moves onto the woken nodes.
    pub rebalance: RebalanceParams,
}

impl Default for ExpandParams {
    fn default() -> Self {
        Self {
            max_mean_cpu_util: 0.75,
            target_mean_cpu_util: 0.6,
            max_nodes: 4,
            rebalance: RebalanceParams::default(),
        }
    }
}

/// The expand planner's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpandPlan {
    /// Standby nodes to power on, in order.
    pub wake: Vec<String>,
    /// Migrations onto them once they are up.
    pub moves: Vec<Move>,
    /// Mean CPU utilisation of the nodes up now.
    pub mean_before: f64,
    /// Projected mean with the woken nodes.
    pub mean_after: f64,
}

/// Invalid consolidation or expand parameters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConsolidateError {
    /// A parameter is out of range.
    #[error("parameter {name} must be a finite number above 0, got {value}")]
    InvalidParam {
        /// The parameter.
        name: &'static str,
        /// The value given.
        value: f64,
    },
    /// The embedded rebalance parameters are invalid.
    #[error("invalid rebalance parameters for expand")]
    Rebalance(#[source] RebalanceError),
}

fn positive(name: &'static str, value: f64) -> Result<(), ConsolidateError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(ConsolidateError::InvalidParam { name, value })
    }
}

impl Scheduler {
    /// Plans which least-loaded nodes to empty, and where their instances
    /// go. Changes nothing.
    pub fn plan_consolidation(
        &mut self,
        params: &ConsolidateParams,
    ) -> Result<ConsolidatePlan, ConsolidateError> {
        positive("max_cpu_util", params.max_cpu_util)?;
        positive("max_mem_fraction", params.max_mem_fraction)?;
        positive("bandwidth_mib_s", params.bandwidth_mib_s)?;
        let mut undo = Undo::default();
        let plan = self.consolidate(params, &mut undo);
        undo.undo(&mut self.state);
        Ok(plan)
    }

    fn consolidate(&mut self, params: &ConsolidateParams, undo: &mut Undo) -> ConsolidatePlan {
        let mut plan = ConsolidatePlan {
            nodes_to_empty: Vec::new(),
            moves: Vec::new(),
            skipped: Vec::new(),
        };
        let load = |n: &crate::state::NodeRt| {
            let mem = if n.cap[MEM] > 0.0 {
                n.used[MEM] as f64 / n.cap[MEM]
            } else {
                1.0
            };
            n.cpu_util.max(mem)
        };
        let mut order: Vec<(f64, u32)> = (0..self.state.nodes.len())
            .map(ix)
            .filter(|&n| self.state.nodes[n as usize].state == NodeState::Up)
            .map(|n| (load(&self.state.nodes[n as usize]), n))
            .collect();
        order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut active = order.len();
        let recent: HashSet<&str> = params.recently_moved.iter().map(String::as_str).collect();
        let headroom = Headroom {
            max_cpu_util: params.max_cpu_util,
            max_mem_fraction: params.max_mem_fraction,
        };
        for &(_, n) in &order {
            if plan.nodes_to_empty.len() >= params.max_nodes as usize
                || active <= params.min_active_nodes as usize
            {
                break;
            }
            let node_id = self.state.meta[n as usize].id.clone();
            let mut instances = self.state.node_instances[n as usize].clone();
            let budget = (params.max_migrations as usize).saturating_sub(plan.moves.len());
            if let Some(reason) = self.unmovable(n, &instances, &recent, params, budget) {
                plan.skipped.push(SkippedNode {
                    node: node_id,
                    reason,
                });
                continue;
            }
            undo.set_node_state(&mut self.state, n, NodeState::Draining);
            instances.sort_by_key(|&i| {
                (
                    std::cmp::Reverse(self.state.instances[i as usize].res.memory_mib),
                    i,
                )
            });
            let total_mem: u64 = instances
                .iter()
                .map(|&i| self.state.instances[i as usize].res.memory_mib)
                .sum();
            let keep = undo.len();
            let mut node_moves = Vec::with_capacity(instances.len());
            let mut failed = None;
            for &i in &instances {
                let mut demand = self.state.instance_demand(i, Strategy::Pack);
                demand.headroom = Some(headroom);
                let seed = instance_seed(&self.state.instances[i as usize].id, 0);
                match self.decide(&demand, seed, false) {
                    Ok(d) => {
                        undo.move_instance(&mut self.state, i, d.node);
                        let inst = &self.state.instances[i as usize];
                        let share = if total_mem == 0 {
                            1.0
                        } else {
                            inst.res.memory_mib as f64 / total_mem as f64
                        };
                        node_moves.push(Move {
                            instance: inst.id.clone(),
                            from: node_id.clone(),
                            to: self.state.meta[d.node as usize].id.clone(),
                            kind: MoveKind::Consolidate,
                            reason: format!(
                                "empty {} to power it down; {} stays under {:.0}% CPU and {:.0}% memory",
                                self.state.node_name(n),
                                self.state.node_name(d.node),
                                params.max_cpu_util * 100.0,
                                params.max_mem_fraction * 100.0
                            ),
                            expected_gain: share,
                            memory_mib: inst.res.memory_mib,
                            cost_mib: precopy_cost(inst, params.bandwidth_mib_s).unwrap_or(f64::INFINITY),
                        });
                    }
                    Err(u) => {
                        failed = Some(format!(
                            "instance {} has no target: {}",
                            self.state.instances[i as usize].id,
                            u.summary()
                        ));
                        break;
                    }
                }
            }
            match failed {
                Some(reason) => {
                    undo.undo_moves_to(&mut self.state, keep);
                    self.state.set_node_state(n, NodeState::Up);
                    plan.skipped.push(SkippedNode {
                        node: node_id,
                        reason,
                    });
                }
                None => {
                    plan.moves.extend(node_moves);
                    plan.nodes_to_empty.push(node_id);
                    active -= 1;
                }
            }
        }
        plan
    }

    /// Why a node's instances cannot all be moved, before trying.
    fn unmovable(
        &self,
        node: u32,
        instances: &[u32],
        recent: &HashSet<&str>,
        params: &ConsolidateParams,
        budget: usize,
    ) -> Option<String> {
        if self.state.node_migrations[node as usize] > 0 {
            return Some("a migration to or from it is in flight".into());
        }
        if instances.len() > budget {
            return Some(format!(
                "emptying it takes {} migrations, {budget} left in this plan",
                instances.len()
            ));
        }
        for &i in instances {
            let inst = &self.state.instances[i as usize];
            if inst.pinned {
                return Some(format!("instance {} is pinned", inst.id));
            }
            if inst.migrating_to != NONE {
                return Some(format!("instance {} is migrating", inst.id));
            }
            if recent.contains(inst.id.as_str()) {
                return Some(format!("instance {} moved recently", inst.id));
            }
            if precopy_cost(inst, params.bandwidth_mib_s).is_none() {
                return Some(format!(
                    "instance {} dirties {:.0} MiB/s, pre-copy would not converge",
                    inst.id, inst.dirty
                ));
            }
        }
        None
    }

    /// Plans which standby nodes to wake, and the moves onto them, when the
    /// nodes that are up run hot. Changes nothing.
    pub fn plan_expand(&mut self, params: &ExpandParams) -> Result<ExpandPlan, ConsolidateError> {
        positive("max_mean_cpu_util", params.max_mean_cpu_util)?;
        positive("target_mean_cpu_util", params.target_mean_cpu_util)?;
        params
            .rebalance
            .validate()
            .map_err(ConsolidateError::Rebalance)?;
        let (mut busy, mut cores) = (0.0f64, 0.0f64);
        for n in self.state.nodes.iter().filter(|n| n.state == NodeState::Up) {
            busy += n.cpu_util * f64::from(n.pcpus);
            cores += f64::from(n.pcpus);
        }
        let mean = |cores: f64| if cores > 0.0 { busy / cores } else { 0.0 };
        let mean_before = mean(cores);
        let mut plan = ExpandPlan {
            wake: Vec::new(),
            moves: Vec::new(),
            mean_before,
            mean_after: mean_before,
        };
        if mean_before <= params.max_mean_cpu_util {
            return Ok(plan);
        }
        let mut standby: Vec<u32> = (0..self.state.nodes.len())
            .map(ix)
            .filter(|&n| self.state.nodes[n as usize].state == NodeState::Standby)
            .collect();
        standby.sort_by_key(|&n| (std::cmp::Reverse(self.state.nodes[n as usize].pcpus), n));
        let mut undo = Undo::default();
        for n in standby {
            if mean(cores) <= params.target_mean_cpu_util
                || plan.wake.len() >= params.max_nodes as usize
            {
                break;
            }
            cores += f64::from(self.state.nodes[n as usize].pcpus);
            undo.set_node_state(&mut self.state, n, NodeState::Up);
            plan.wake.push(self.state.meta[n as usize].id.clone());
        }
        plan.mean_after = mean(cores);
        if !plan.wake.is_empty() {
            plan.moves = self.rebalance(&params.rebalance, MoveKind::Expand).moves;
        }
        undo.undo(&mut self.state);
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClusterSnapshot, Instance};
    use crate::testing::{instance, node};

    fn light_cluster() -> ClusterSnapshot {
        let busy = |id: &str, n: &str, cpu: f64| Instance {
            measured_cpu: cpu,
            ..instance(id, n, 2, 4096, 10)
        };
        ClusterSnapshot {
            nodes: vec![
                node("n1", "z", 16, 65536, 1000),
                node("n2", "z", 16, 65536, 1000),
                node("n3", "z", 16, 65536, 1000),
            ],
            instances: vec![
                busy("a", "n1", 4.0),
                busy("b", "n1", 4.0),
                busy("c", "n2", 2.0),
                busy("d", "n3", 1.0),
            ],
            ..ClusterSnapshot::default()
        }
    }

    #[test]
    fn empties_the_least_loaded_node_onto_the_fullest() {
        let mut s = Scheduler::new(&light_cluster()).unwrap();
        let plan = s
            .plan_consolidation(&ConsolidateParams {
                max_nodes: 1,
                ..ConsolidateParams::default()
            })
            .unwrap();
        assert_eq!(plan.nodes_to_empty, vec!["n3"]);
        assert_eq!(plan.moves.len(), 1);
        assert_eq!(plan.moves[0].instance, "d");
        assert_eq!(plan.moves[0].to, "n1", "packing prefers the fuller node");
        assert_eq!(plan.moves[0].expected_gain, 1.0);
        let again = s
            .plan_consolidation(&ConsolidateParams {
                max_nodes: 1,
                ..ConsolidateParams::default()
            })
            .unwrap();
        assert_eq!(plan, again, "planning changed the state");
    }

    #[test]
    fn keeps_min_active_and_headroom() {
        let mut s = Scheduler::new(&light_cluster()).unwrap();
        let plan = s
            .plan_consolidation(&ConsolidateParams {
                max_nodes: 10,
                min_active_nodes: 1,
                max_cpu_util: 0.6,
                ..ConsolidateParams::default()
            })
            .unwrap();
        // n3 then n2 empty onto n1: 11 busy vCPUs of 16 = 69% > 60%.
        assert_eq!(plan.nodes_to_empty, vec!["n3"]);
        assert_eq!(plan.skipped[0].node, "n2");
        assert!(
            plan.skipped[0].reason.contains("headroom exceeded"),
            "{:?}",
            plan.skipped
        );
    }

    #[test]
    fn pinned_instances_keep_their_node() {
        let mut snap = light_cluster();
        snap.instances[3].pinned = true;
        let mut s = Scheduler::new(&snap).unwrap();
        let plan = s
            .plan_consolidation(&ConsolidateParams {
                max_nodes: 1,
                ..ConsolidateParams::default()
            })
            .unwrap();
        assert_eq!(plan.nodes_to_empty, vec!["n2"]);
        assert_eq!(plan.skipped[0].reason, "instance d is pinned");
    }

    #[test]
    fn expand_wakes_standby_nodes_and_moves_load() {
        let mut snap = light_cluster();
        snap.nodes.truncate(1);
        snap.instances.truncate(2);
        snap.instances[0].measured_cpu = 7.0;
        snap.instances[1].measured_cpu = 7.0;
        let mut spare = node("spare", "z", 16, 65536, 1000);
        spare.state = NodeState::Standby;
        snap.nodes.push(spare);
        let mut s = Scheduler::new(&snap).unwrap();
        let plan = s.plan_expand(&ExpandParams::default()).unwrap();
        assert_eq!(plan.wake, vec!["spare"]);
        assert!((plan.mean_before - 14.0 / 16.0).abs() < 1e-12);
        assert!((plan.mean_after - 14.0 / 32.0).abs() < 1e-12);
        assert_eq!(plan.moves.len(), 1);
        assert_eq!(plan.moves[0].to, "spare");
        assert_eq!(plan.moves[0].kind, MoveKind::Expand);
    }
}
