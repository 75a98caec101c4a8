//! Soft affinity and soft anti-affinity (Nova's
//! `ServerGroupSoftAffinityWeigher` and `ServerGroupSoftAntiAffinityWeigher`):
//! the raw value is the number of the group's members on the node, positive
//! for soft affinity, negative for soft anti-affinity.

use super::Weigher;
use crate::filter::Ctx;
use crate::model::GroupPolicy;
use crate::state::NodeMarks;

/// Weighs members of soft groups already on the node.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SoftAffinityWeigher;

fn sign(policy: GroupPolicy) -> i64 {
    match policy {
        GroupPolicy::SoftAffinity => 1,
        GroupPolicy::SoftAntiAffinity => -1,
        GroupPolicy::Affinity | GroupPolicy::AntiAffinity => 0,
    }
}

impl Weigher for SoftAffinityWeigher {
    fn name(&self) -> &'static str {
        "soft-affinity"
    }

    fn multiplier(&self, ctx: &Ctx<'_>) -> f64 {
        ctx.state.config.weights.soft_affinity
    }

    fn applies(&self, ctx: &Ctx<'_>) -> bool {
        ctx.demand
            .groups
            .iter()
            .any(|&g| sign(ctx.state.groups[g as usize].policy) != 0)
    }

    fn prepare(&self, ctx: &Ctx<'_>, marks: &mut NodeMarks) {
        marks.reset(ctx.state.nodes.len());
        for &g in &ctx.demand.groups {
            let group = &ctx.state.groups[g as usize];
            let s = sign(group.policy);
            for (&node, &count) in &group.members {
                marks.set(node, marks.get(node) + s * i64::from(count));
            }
        }
    }

    #[inline]
    fn raw(&self, _: &Ctx<'_>, marks: &NodeMarks, node: u32) -> f64 {
        marks.get(node) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::test_support::{demand, scheduler};

    #[test]
    fn soft_anti_affinity_prefers_fewer_members() {
        let mut s = scheduler();
        let d = demand(&s, |r| r.group = Some("soft".into()));
        // One member of "soft" on node a.
        s.state.add_load(0, &d.res, &d.groups);
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        assert!(SoftAffinityWeigher.applies(&ctx));
        let mut out = Vec::new();
        SoftAffinityWeigher.weigh(&ctx, &[0, 1], &mut NodeMarks::default(), &mut out);
        assert_eq!(out, vec![-1.0, 0.0]);
        let hard = demand(&s, |r| r.group = Some("anti".into()));
        assert!(!SoftAffinityWeigher.applies(&Ctx {
            state: &s.state,
            demand: &hard
        }));
    }
}
