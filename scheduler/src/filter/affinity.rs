//! Hard affinity (Nova's `ServerGroupAffinityFilter`): once a group has
//! members, new members go only to nodes that already run one.

use super::{Ctx, Filter, Reason, name_nodes};
use crate::model::GroupPolicy;
use crate::state::{GroupRt, NodeMarks};

/// Rejects nodes that run no member of a hard-affinity group with members.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AffinityFilter;

/// The hard-affinity groups of the demand that have members other than the
/// instance being moved.
fn binding<'a>(ctx: &'a Ctx<'_>) -> impl Iterator<Item = &'a GroupRt> + 'a {
    let moving = ctx.demand.moving.is_some();
    ctx.demand
        .groups
        .iter()
        .map(|&g| &ctx.state.groups[g as usize])
        .filter(move |g| g.policy == GroupPolicy::Affinity && g.size > u32::from(moving))
}

impl Filter for AffinityFilter {
    fn name(&self) -> &'static str {
        "affinity"
    }

    fn applies(&self, ctx: &Ctx<'_>) -> bool {
        binding(ctx).next().is_some()
    }

    fn check(&self, ctx: &Ctx<'_>, node: u32) -> Option<Reason> {
        binding(ctx)
            .any(|g| g.on(node) == 0)
            .then_some(Reason::Affinity)
    }

    fn explain(&self, ctx: &Ctx<'_>, node: u32) -> String {
        match binding(ctx).find(|g| g.on(node) == 0) {
            Some(g) => format!(
                "affinity: group {:?} must share a node; its members run on {}",
                g.id,
                name_nodes(ctx.state, &g.nodes_sorted())
            ),
            None => "affinity: node runs the group's members".into(),
        }
    }

    fn prepare(&self, ctx: &Ctx<'_>, marks: &mut NodeMarks) {
        marks.reset(ctx.state.nodes.len());
        let mut groups = 0;
        for group in binding(ctx) {
            groups += 1;
            for &node in group.members.keys() {
                marks.set(node, marks.get(node) + 1);
            }
        }
        marks.aux = groups;
    }

    #[inline]
    fn check_prepared(&self, _: &Ctx<'_>, marks: &NodeMarks, node: u32) -> Option<Reason> {
        (marks.get(node) != marks.aux).then_some(Reason::Affinity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::Rejections;
    use crate::filter::test_support::{demand, scheduler};

    #[test]
    fn keeps_members_together() {
        let s = scheduler();
        let d = demand(&s, |r| r.group = Some("aff".into()));
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        assert!(AffinityFilter.applies(&ctx));
        assert_eq!(AffinityFilter.check(&ctx, 0), None);
        assert_eq!(AffinityFilter.check(&ctx, 1), Some(Reason::Affinity));
        assert_eq!(
            AffinityFilter.explain(&ctx, 1),
            "affinity: group \"aff\" must share a node; its members run on a"
        );
        let mut cands = vec![0, 1, 2];
        AffinityFilter.retain(
            &ctx,
            &mut cands,
            &mut NodeMarks::default(),
            &mut Rejections::default(),
        );
        assert_eq!(cands, vec![0]);
    }

    #[test]
    fn the_only_member_may_move_anywhere() {
        let s = scheduler();
        let d = s.state.instance_demand(0, crate::model::Strategy::Spread);
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        assert!(!AffinityFilter.applies(&ctx));
    }
}
