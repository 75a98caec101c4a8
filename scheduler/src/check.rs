//! Re-checking a plan against a newer state before the controller leader
//! commits it (Nomad's `plan_apply.go`): every placement and move is
//! evaluated again by the same filters, in order, each on the state updated
//! by the ones before it. Nothing is changed.

use crate::model::ClusterSnapshot;
use crate::moves::{Move, Undo};
use crate::place::{PlacementPlan, Scheduler, placed_id};
use crate::state::{BuildStateError, NONE};

/// Why a plan no longer holds.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckPlanError {
    /// The newer snapshot is invalid.
    #[error("the newer snapshot is invalid")]
    Snapshot(#[source] BuildStateError),
    /// A node of the plan left the cluster.
    #[error("node {0:?} is no longer in the cluster")]
    NodeGone(String),
    /// The request's server group was deleted.
    #[error("server group {0:?} no longer exists")]
    GroupGone(String),
    /// The plan was committed already.
    #[error("instance {index} of request {request_id:?} is already placed")]
    AlreadyPlaced {
        /// The request.
        request_id: String,
        /// The instance index.
        index: u32,
    },
    /// A placement's node no longer passes a filter.
    #[error("instance {index} of request {request_id:?} no longer fits on node {node:?}: {reason}")]
    PlacementRejected {
        /// The request.
        request_id: String,
        /// The instance index.
        index: u32,
        /// The node.
        node: String,
        /// The filter that rejects it.
        filter: &'static str,
        /// Its sentence.
        reason: String,
    },
    /// A moved instance left the cluster.
    #[error("instance {0:?} is no longer in the cluster")]
    InstanceGone(String),
    /// A moved instance is no longer on the move's source.
    #[error("instance {instance:?} runs on {actual:?}, not on {expected:?}")]
    InstanceMoved {
        /// The instance.
        instance: String,
        /// Where the plan expected it.
        expected: String,
        /// Where it is.
        actual: String,
    },
    /// A moved instance started migrating meanwhile.
    #[error("instance {0:?} is already migrating")]
    AlreadyMigrating(String),
    /// A moved instance was pinned meanwhile.
    #[error("instance {0:?} is pinned to its node")]
    Pinned(String),
    /// A move's target no longer passes a filter.
    #[error("instance {instance:?} can no longer move to {node:?}: {reason}")]
    MoveRejected {
        /// The instance.
        instance: String,
        /// The target.
        node: String,
        /// The filter that rejects it.
        filter: &'static str,
        /// Its sentence.
        reason: String,
    },
}

/// Checks a placement plan against the scheduler's current state.
pub fn check_placement(s: &mut Scheduler, plan: &PlacementPlan) -> Result<(), CheckPlanError> {
    let demand = s
        .demand_for(&plan.request)
        .map_err(|_| CheckPlanError::GroupGone(plan.request.group.clone().unwrap_or_default()))?;
    let mut applied = Vec::with_capacity(plan.placements.len());
    let mut result = Ok(());
    for p in &plan.placements {
        let Some(&node) = s.state.node_index.get(&p.node) else {
            result = Err(CheckPlanError::NodeGone(p.node.clone()));
            break;
        };
        if s.state
            .instance_index
            .contains_key(&placed_id(&plan.request.request_id, p.index))
        {
            result = Err(CheckPlanError::AlreadyPlaced {
                request_id: plan.request.request_id.clone(),
                index: p.index,
            });
            break;
        }
        if let Some((filter, reason)) = s.first_rejection(&demand, node) {
            result = Err(CheckPlanError::PlacementRejected {
                request_id: plan.request.request_id.clone(),
                index: p.index,
                node: p.node.clone(),
                filter,
                reason,
            });
            break;
        }
        s.state.add_load(node, &demand.res, &demand.groups);
        applied.push(node);
    }
    for &node in applied.iter().rev() {
        s.state.remove_load(node, &demand.res, &demand.groups);
    }
    result
}

/// Checks a placement plan against a newer snapshot.
pub fn check_placement_against(
    plan: &PlacementPlan,
    snapshot: &ClusterSnapshot,
) -> Result<(), CheckPlanError> {
    let mut s = Scheduler::new(snapshot).map_err(CheckPlanError::Snapshot)?;
    check_placement(&mut s, plan)
}

/// Checks moves (from any planner) against the scheduler's current state.
pub fn check_moves(s: &mut Scheduler, moves: &[Move]) -> Result<(), CheckPlanError> {
    let mut undo = Undo::default();
    let result = check_moves_inner(s, moves, &mut undo);
    undo.undo(&mut s.state);
    result
}

fn check_moves_inner(
    s: &mut Scheduler,
    moves: &[Move],
    undo: &mut Undo,
) -> Result<(), CheckPlanError> {
    for m in moves {
        let Some(&i) = s.state.instance_index.get(&m.instance) else {
            return Err(CheckPlanError::InstanceGone(m.instance.clone()));
        };
        let Some(&to) = s.state.node_index.get(&m.to) else {
            return Err(CheckPlanError::NodeGone(m.to.clone()));
        };
        let inst = &s.state.instances[i as usize];
        let at = &s.state.meta[inst.node as usize].id;
        if *at != m.from {
            return Err(CheckPlanError::InstanceMoved {
                instance: m.instance.clone(),
                expected: m.from.clone(),
                actual: at.clone(),
            });
        }
        if inst.migrating_to != NONE {
            return Err(CheckPlanError::AlreadyMigrating(m.instance.clone()));
        }
        if inst.pinned {
            return Err(CheckPlanError::Pinned(m.instance.clone()));
        }
        let demand = s.state.instance_demand(i, s.state.config.strategy);
        if let Some((filter, reason)) = s.first_rejection(&demand, to) {
            return Err(CheckPlanError::MoveRejected {
                instance: m.instance.clone(),
                node: m.to.clone(),
                filter,
                reason,
            });
        }
        undo.move_instance(&mut s.state, i, to);
    }
    Ok(())
}

/// Checks moves against a newer snapshot.
pub fn check_moves_against(
    moves: &[Move],
    snapshot: &ClusterSnapshot,
) -> Result<(), CheckPlanError> {
    let mut s = Scheduler::new(snapshot).map_err(CheckPlanError::Snapshot)?;
    check_moves(&mut s, moves)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::test_support::snapshot;
    use crate::model::{PlacementRequest, Resources};
    use crate::moves::MoveKind;
    use crate::place::Explain;

    #[test]
    fn placement_conflicts_when_the_node_fills_up() {
        let mut s = Scheduler::new(&snapshot()).unwrap();
        let req = PlacementRequest::new("r", Resources::new(1, 8192, 1));
        let plan = s.place(&req, Explain::Summary).unwrap();
        assert_eq!(plan.placements[0].node, "b");
        let mut newer = snapshot();
        newer
            .instances
            .push(crate::testing::instance("late", "b", 1, 8192, 1));
        let err = check_placement_against(&plan, &newer).unwrap_err();
        assert_eq!(
            err.to_string(),
            "instance 0 of request \"r\" no longer fits on node \"b\": \
             memory: needs 8192 MiB, 4096 MiB free after ratio 1.5"
        );
        assert_eq!(check_placement_against(&plan, &snapshot()), Ok(()));
        let mut gone = snapshot();
        gone.nodes.remove(1);
        assert_eq!(
            check_placement_against(&plan, &gone),
            Err(CheckPlanError::NodeGone("b".into()))
        );
    }

    #[test]
    fn moves_conflict_when_the_instance_moved_or_pinned() {
        let mv = Move {
            instance: "i1".into(),
            from: "a".into(),
            to: "b".into(),
            kind: MoveKind::Drain,
            reason: String::new(),
            expected_gain: 0.0,
            memory_mib: 6144,
            cost_mib: 6144.0,
        };
        let mut snap = snapshot();
        // i1 is in a hard-affinity group alone and an anti-affinity group.
        assert_eq!(
            check_moves_against(std::slice::from_ref(&mv), &snap),
            Ok(())
        );
        snap.instances[0].pinned = true;
        assert_eq!(
            check_moves_against(std::slice::from_ref(&mv), &snap),
            Err(CheckPlanError::Pinned("i1".into()))
        );
        let mut snap = snapshot();
        snap.instances[0].node = "b".into();
        assert!(matches!(
            check_moves_against(std::slice::from_ref(&mv), &snap),
            Err(CheckPlanError::InstanceMoved { .. })
        ));
        let mut snap = snapshot();
        snap.nodes[1].state = crate::model::NodeState::Draining;
        assert!(matches!(
            check_moves_against(&[mv], &snap),
            Err(CheckPlanError::MoveRejected {
                filter: "state",
                ..
            })
        ));
    }
}
