//! The drain planner: where every instance of one node goes, so an operator
//! can take the node out (`neph node drain`). Instances are placed largest
//! memory first, through the placement filters and weighers, each on the
//! state updated by the moves before it, with the drained node excluded.
//! Unlike a rebalance plan, a drain plan lists every move at once; the
//! caller runs them within its migration limits. Instances that cannot move
//! are listed with the reason.

use serde::{Deserialize, Serialize};

use crate::hash::instance_seed;
use crate::model::NodeState;
use crate::moves::{Move, MoveKind, Undo, precopy_cost};
use crate::place::Scheduler;
use crate::state::NONE;

/// Knobs of the drain planner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DrainParams {
    /// Migration link bandwidth, MiB/s, to estimate each move's cost.
    pub bandwidth_mib_s: f64,
}

impl Default for DrainParams {
    fn default() -> Self {
        Self {
            bandwidth_mib_s: 1200.0,
        }
    }
}

/// An instance that cannot leave the node, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedInstance {
    /// Instance id.
    pub instance: String,
    /// A sentence.
    pub reason: String,
}

/// The drain planner's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainPlan {
    /// The node drained.
    pub node: String,
    /// Migrations, in the order to start them.
    pub moves: Vec<Move>,
    /// Instances that cannot move.
    pub blocked: Vec<BlockedInstance>,
    /// Instances already migrating away.
    pub leaving: Vec<String>,
}

impl DrainPlan {
    /// Whether the node will be empty once the moves and the migrations
    /// already leaving are done.
    pub fn complete(&self) -> bool {
        self.blocked.is_empty()
    }
}

/// Why a drain could not be planned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DrainError {
    /// The node is not in the snapshot.
    #[error("node {0:?} does not exist")]
    UnknownNode(String),
    /// The bandwidth is not a positive number.
    #[error("the migration bandwidth must be a finite number above 0, got {0}")]
    InvalidBandwidth(f64),
}

impl Scheduler {
    /// Plans moving every instance off `node`. Changes nothing.
    pub fn plan_drain(
        &mut self,
        node: &str,
        params: &DrainParams,
    ) -> Result<DrainPlan, DrainError> {
        let Some(&n) = self.state.node_index.get(node) else {
            return Err(DrainError::UnknownNode(node.to_owned()));
        };
        if !(params.bandwidth_mib_s.is_finite() && params.bandwidth_mib_s > 0.0) {
            return Err(DrainError::InvalidBandwidth(params.bandwidth_mib_s));
        }
        let mut plan = DrainPlan {
            node: node.to_owned(),
            moves: Vec::new(),
            blocked: Vec::new(),
            leaving: Vec::new(),
        };
        let mut undo = Undo::default();
        undo.set_node_state(&mut self.state, n, NodeState::Draining);
        let mut instances = self.state.node_instances[n as usize].clone();
        instances.sort_by_key(|&i| {
            (
                std::cmp::Reverse(self.state.instances[i as usize].res.memory_mib),
                i,
            )
        });
        let total = instances.len() as f64;
        let strategy = self.state.config.strategy;
        for i in instances {
            let inst = &self.state.instances[i as usize];
            if inst.migrating_to != NONE {
                plan.leaving.push(inst.id.clone());
                continue;
            }
            if inst.pinned {
                plan.blocked.push(BlockedInstance {
                    instance: inst.id.clone(),
                    reason: "pinned to this node".into(),
                });
                continue;
            }
            let demand = self.state.instance_demand(i, strategy);
            let seed = instance_seed(&inst.id, 0);
            match self.decide(&demand, seed, false) {
                Ok(d) => {
                    undo.move_instance(&mut self.state, i, d.node);
                    let inst = &self.state.instances[i as usize];
                    // Past the link speed pre-copy needs auto-converge;
                    // cost it as if throttled to 90% of the link.
                    let ratio = (inst.dirty / params.bandwidth_mib_s).min(0.9);
                    plan.moves.push(Move {
                        instance: inst.id.clone(),
                        from: node.to_owned(),
                        to: self.state.meta[d.node as usize].id.clone(),
                        kind: MoveKind::Drain,
                        reason: format!(
                            "drain {}; {} scored {:.3} among {} candidates",
                            self.state.node_name(n),
                            self.state.node_name(d.node),
                            d.score,
                            d.candidates
                        ),
                        expected_gain: 1.0 / total,
                        memory_mib: inst.res.memory_mib,
                        cost_mib: precopy_cost(inst, params.bandwidth_mib_s)
                            .unwrap_or(inst.res.memory_mib as f64 / (1.0 - ratio)),
                    });
                }
                Err(u) => plan.blocked.push(BlockedInstance {
                    instance: self.state.instances[i as usize].id.clone(),
                    reason: format!("no valid host: {}", u.summary()),
                }),
            }
        }
        undo.undo(&mut self.state);
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::test_support::snapshot;
    use crate::model::{ClusterSnapshot, Instance};
    use crate::testing::{instance, node};

    #[test]
    fn moves_everything_and_explains_the_rest() {
        let mut snap = snapshot();
        snap.instances.push(Instance {
            pinned: true,
            ..instance("p", "a", 1, 512, 1)
        });
        snap.instances.push(instance("huge", "a", 1, 1024, 95));
        let mut s = Scheduler::new(&snap).unwrap();
        let plan = s.plan_drain("a", &DrainParams::default()).unwrap();
        assert_eq!(plan.moves.len(), 1);
        assert_eq!(plan.moves[0].instance, "i1");
        assert_eq!(plan.moves[0].to, "b");
        assert!(!plan.complete());
        assert_eq!(plan.blocked.len(), 2);
        assert_eq!(plan.blocked[0].instance, "huge");
        assert_eq!(
            plan.blocked[0].reason,
            "no valid host: node down on 1 node, instance already there on 1 node, \
             disk exhausted on 1 node"
        );
        assert_eq!(plan.blocked[1].reason, "pinned to this node");
        assert_eq!(
            s.plan_drain("zz", &DrainParams::default()),
            Err(DrainError::UnknownNode("zz".into()))
        );
    }

    #[test]
    fn later_moves_see_earlier_ones() {
        let snap = ClusterSnapshot {
            nodes: vec![
                node("src", "z", 8, 8192, 100),
                node("t1", "z", 8, 4096, 100),
                node("t2", "z", 8, 4096, 100),
            ],
            instances: vec![
                instance("x", "src", 1, 4096, 1),
                instance("y", "src", 1, 4096, 1),
            ],
            ..ClusterSnapshot::default()
        };
        let mut s = Scheduler::new(&snap).unwrap();
        let plan = s.plan_drain("src", &DrainParams::default()).unwrap();
        assert!(plan.complete());
        let mut targets: Vec<&str> = plan.moves.iter().map(|m| m.to.as_str()).collect();
        targets.sort_unstable();
        assert_eq!(targets, vec!["t1", "t2"]);
    }
}
