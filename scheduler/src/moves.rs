//! What the migration planners (rebalance, consolidate, expand, drain)
//! return: moves with their reason and expected gain, and the bookkeeping
//! that lets a planner apply moves tentatively and undo them.

use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, InstanceRt};

/// Which planner proposed a move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveKind {
    /// Cut the CPU imbalance.
    Rebalance,
    /// Empty a node so it can power down.
    Consolidate,
    /// Move load onto woken nodes.
    Expand,
    /// Empty a node an operator is draining.
    Drain,
}

/// One live migration a planner proposes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    /// The instance.
    pub instance: String,
    /// Node it leaves.
    pub from: String,
    /// Node it goes to.
    pub to: String,
    /// The planner that proposed it.
    pub kind: MoveKind,
    /// A sentence: why this move, with the numbers.
    pub reason: String,
    /// How much the planner's objective improves: for rebalance and expand,
    /// the drop in imbalance (std dev of node CPU utilisation); for
    /// consolidate and drain, the share of the emptied node's allocated
    /// memory this move frees (`0..=1`).
    pub expected_gain: f64,
    /// Memory of the instance, MiB.
    pub memory_mib: u64,
    /// Estimated MiB sent by pre-copy: memory / (1 - dirty rate / bandwidth).
    pub cost_mib: f64,
}

/// Estimated MiB pre-copy sends for an instance over a link of
/// `bandwidth` MiB/s; `None` when it dirties memory as fast as the link
/// (it would not converge without auto-converge throttling).
pub(crate) fn precopy_cost(inst: &InstanceRt, bandwidth: f64) -> Option<f64> {
    let memory = inst.res.memory_mib.max(1) as f64;
    let ratio = inst.dirty / bandwidth;
    (ratio < 1.0).then(|| memory / (1.0 - ratio))
}

/// Moves applied tentatively to a state, undone in reverse order.
#[derive(Debug, Default)]
pub(crate) struct Undo {
    /// Instance, node it left, and the exact utilisations of both nodes
    /// before the move (moving back would not restore them bit for bit).
    moves: Vec<(u32, u32, u32, [f64; 2])>,
    states: Vec<(u32, crate::model::NodeState)>,
}

impl Undo {
    /// Moves `instance` to `to`, remembering where it was.
    pub fn move_instance(&mut self, state: &mut ClusterState, instance: u32, to: u32) {
        let from = state.instances[instance as usize].node;
        let utils = [
            state.nodes[from as usize].cpu_util,
            state.nodes[to as usize].cpu_util,
        ];
        state.move_instance(instance, to);
        self.moves.push((instance, from, to, utils));
    }

    /// Sets a node's state, remembering the old one.
    pub fn set_node_state(
        &mut self,
        state: &mut ClusterState,
        node: u32,
        to: crate::model::NodeState,
    ) {
        self.states.push((node, state.nodes[node as usize].state));
        state.set_node_state(node, to);
    }

    /// Moves applied so far.
    pub fn len(&self) -> usize {
        self.moves.len()
    }

    /// Undoes the moves after the first `keep`.
    pub fn undo_moves_to(&mut self, state: &mut ClusterState, keep: usize) {
        while self.moves.len() > keep {
            if let Some((instance, from, to, utils)) = self.moves.pop() {
                state.move_instance(instance, from);
                state.set_cpu_util(from, utils[0]);
                state.set_cpu_util(to, utils[1]);
            }
        }
    }

    /// Undoes everything.
    pub fn undo(mut self, state: &mut ClusterState) {
        self.undo_moves_to(state, 0);
        while let Some((node, old)) = self.states.pop() {
            state.set_node_state(node, old);
        }
    }
}
