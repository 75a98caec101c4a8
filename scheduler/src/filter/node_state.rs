//! Node state (Nova's `ComputeFilter`): only nodes that are up take
//! instances, and a moving instance cannot "move" to the node it is on.

use super::{Ctx, Filter, Reason};
use crate::model::NodeState;

/// Rejects nodes that are down, draining, disabled or in standby.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NodeStateFilter;

impl Filter for NodeStateFilter {
    fn name(&self) -> &'static str {
        "state"
    }

    #[inline]
    fn check(&self, ctx: &Ctx<'_>, node: u32) -> Option<Reason> {
        if let Some((_, from)) = ctx.demand.moving
            && from == node
        {
            return Some(Reason::CurrentNode);
        }
        match ctx.state.nodes[node as usize].state {
            NodeState::Up => None,
            NodeState::Down => Some(Reason::NodeDown),
            NodeState::Draining => Some(Reason::NodeDraining),
            NodeState::Disabled => Some(Reason::NodeDisabled),
            NodeState::Standby => Some(Reason::NodeStandby),
        }
    }

    fn explain(&self, ctx: &Ctx<'_>, node: u32) -> String {
        match self.check(ctx, node) {
            Some(Reason::CurrentNode) => "state: the instance already runs on this node".into(),
            Some(Reason::NodeDown) => "state: node is down".into(),
            Some(Reason::NodeDraining) => "state: node is draining".into(),
            Some(Reason::NodeDisabled) => "state: node is disabled".into(),
            Some(Reason::NodeStandby) => "state: node is powered down (standby)".into(),
            _ => "state: node is up".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::test_support::{demand, scheduler};

    #[test]
    fn rejects_down_nodes_and_the_current_node() {
        let s = scheduler();
        let d = demand(&s, |_| {});
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        assert_eq!(NodeStateFilter.check(&ctx, 0), None);
        assert_eq!(NodeStateFilter.check(&ctx, 2), Some(Reason::NodeDown));
        assert_eq!(NodeStateFilter.explain(&ctx, 2), "state: node is down");
        let moving = s.state.instance_demand(0, crate::model::Strategy::Spread);
        let ctx = Ctx {
            state: &s.state,
            demand: &moving,
        };
        assert_eq!(NodeStateFilter.check(&ctx, 0), Some(Reason::CurrentNode));
        assert_eq!(NodeStateFilter.check(&ctx, 1), None);
    }
}
