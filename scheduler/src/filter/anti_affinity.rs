//! Hard anti-affinity (Nova's `ServerGroupAntiAffinityFilter`): a node runs
//! at most `max_per_node` members of the group (1 unless set).

use super::{Ctx, Filter, Reason};
use crate::model::GroupPolicy;
use crate::state::{GroupRt, NodeMarks};

/// Rejects nodes already running the most members allowed.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AntiAffinityFilter;

fn binding<'a>(ctx: &'a Ctx<'_>) -> impl Iterator<Item = &'a GroupRt> + 'a {
    ctx.demand
        .groups
        .iter()
        .map(|&g| &ctx.state.groups[g as usize])
        .filter(|g| g.policy == GroupPolicy::AntiAffinity)
}

impl Filter for AntiAffinityFilter {
    fn name(&self) -> &'static str {
        "anti-affinity"
    }

    fn applies(&self, ctx: &Ctx<'_>) -> bool {
        binding(ctx).next().is_some()
    }

    fn check(&self, ctx: &Ctx<'_>, node: u32) -> Option<Reason> {
        binding(ctx)
            .any(|g| g.on(node) >= g.max_per_node)
            .then_some(Reason::AntiAffinity)
    }

    fn explain(&self, ctx: &Ctx<'_>, node: u32) -> String {
        match binding(ctx).find(|g| g.on(node) >= g.max_per_node) {
            Some(g) => format!(
                "anti-affinity: node already runs {} member(s) of group {:?}, at most {} allowed",
                g.on(node),
                g.id,
                g.max_per_node
            ),
            None => "anti-affinity: node has room for another member".into(),
        }
    }

    fn prepare(&self, ctx: &Ctx<'_>, marks: &mut NodeMarks) {
        marks.reset(ctx.state.nodes.len());
        for group in binding(ctx) {
            for (&node, &count) in &group.members {
                if count >= group.max_per_node {
                    marks.set(node, 1);
                }
            }
        }
    }

    #[inline]
    fn check_prepared(&self, _: &Ctx<'_>, marks: &NodeMarks, node: u32) -> Option<Reason> {
        (marks.get(node) != 0).then_some(Reason::AntiAffinity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::Rejections;
    use crate::filter::test_support::{demand, scheduler, snapshot};
    use crate::place::Scheduler;

    #[test]
    fn keeps_members_apart() {
        let s = scheduler();
        let d = demand(&s, |r| r.group = Some("anti".into()));
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        assert_eq!(
            AntiAffinityFilter.check(&ctx, 0),
            Some(Reason::AntiAffinity)
        );
        assert_eq!(AntiAffinityFilter.check(&ctx, 1), None);
        assert_eq!(
            AntiAffinityFilter.explain(&ctx, 0),
            "anti-affinity: node already runs 1 member(s) of group \"anti\", at most 1 allowed"
        );
        let mut cands = vec![0, 1];
        let mut sink = Rejections::default();
        AntiAffinityFilter.retain(&ctx, &mut cands, &mut NodeMarks::default(), &mut sink);
        assert_eq!(cands, vec![1]);
        assert_eq!(sink.counts[Reason::AntiAffinity as usize], 1);
    }

    #[test]
    fn max_per_node_allows_more() {
        let mut snap = snapshot();
        snap.groups[0].max_per_node = Some(2);
        let s = Scheduler::new(&snap).unwrap();
        let d = demand(&s, |r| r.group = Some("anti".into()));
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        assert_eq!(AntiAffinityFilter.check(&ctx, 0), None);
    }
}
