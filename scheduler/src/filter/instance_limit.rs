//! Instances per node (Nova's `NumInstancesFilter`).

use super::{Ctx, Filter, Reason};

/// Rejects nodes already running their maximum number of instances.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct InstanceLimitFilter;

impl Filter for InstanceLimitFilter {
    fn name(&self) -> &'static str {
        "instances"
    }

    #[inline]
    fn check(&self, ctx: &Ctx<'_>, node: u32) -> Option<Reason> {
        let n = &ctx.state.nodes[node as usize];
        (n.instances >= n.max_instances).then_some(Reason::InstanceLimit)
    }

    fn explain(&self, ctx: &Ctx<'_>, node: u32) -> String {
        let n = &ctx.state.nodes[node as usize];
        format!(
            "instances: node runs {} instances, its limit is {}",
            n.instances, n.max_instances
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::test_support::{demand, snapshot};
    use crate::place::Scheduler;

    #[test]
    fn stops_at_the_limit() {
        let mut snap = snapshot();
        snap.nodes[0].max_instances = Some(1);
        let s = Scheduler::new(&snap).unwrap();
        let d = demand(&s, |_| {});
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        assert_eq!(
            InstanceLimitFilter.check(&ctx, 0),
            Some(Reason::InstanceLimit)
        );
        assert_eq!(InstanceLimitFilter.check(&ctx, 1), None);
        assert_eq!(
            InstanceLimitFilter.explain(&ctx, 0),
            "instances: node runs 1 instances, its limit is 1"
        );
    }
}
