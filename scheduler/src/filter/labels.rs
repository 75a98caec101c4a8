//! Node labels required by the flavor or the request (Nova's
//! `AggregateInstanceExtraSpecsFilter`): every `key=value` pair must be on
//! the node. Uses the per-label node index rather than per-node lookups.

use super::{Ctx, Filter, Reason};
use crate::state::{NONE, NodeMarks};

/// Rejects nodes missing a required label.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LabelFilter;

impl LabelFilter {
    fn missing(ctx: &Ctx<'_>, node: u32) -> Option<u32> {
        let have = &ctx.state.meta[node as usize].labels;
        ctx.demand
            .labels
            .iter()
            .copied()
            .find(|l| *l == NONE || have.binary_search(l).is_err())
    }
}

impl Filter for LabelFilter {
    fn name(&self) -> &'static str {
        "labels"
    }

    fn applies(&self, ctx: &Ctx<'_>) -> bool {
        !ctx.demand.labels.is_empty()
    }

    fn check(&self, ctx: &Ctx<'_>, node: u32) -> Option<Reason> {
        Self::missing(ctx, node).map(|_| Reason::LabelMissing)
    }

    fn explain(&self, ctx: &Ctx<'_>, node: u32) -> String {
        match Self::missing(ctx, node) {
            Some(NONE) => {
                let wanted = ctx
                    .demand
                    .unknown_names
                    .iter()
                    .find(|n| n.starts_with("label"))
                    .map_or("a required label", String::as_str);
                format!("labels: no node has {wanted}")
            }
            Some(l) => {
                let (key, value) = &ctx.state.label_names[l as usize];
                format!("labels: node lacks {key}={value}")
            }
            None => "labels: node has every required label".into(),
        }
    }

    fn prepare(&self, ctx: &Ctx<'_>, marks: &mut NodeMarks) {
        marks.reset(ctx.state.nodes.len());
        if ctx.demand.labels.contains(&NONE) {
            // No node has every label: nothing is marked, the count wanted
            // cannot be reached.
            marks.aux = -1;
            return;
        }
        for &label in &ctx.demand.labels {
            for &node in &ctx.state.label_nodes[label as usize] {
                marks.set(node, marks.get(node) + 1);
            }
        }
        marks.aux = i64::try_from(ctx.demand.labels.len()).unwrap_or(i64::MAX);
    }

    #[inline]
    fn check_prepared(&self, _: &Ctx<'_>, marks: &NodeMarks, node: u32) -> Option<Reason> {
        (marks.get(node) != marks.aux).then_some(Reason::LabelMissing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::Rejections;
    use crate::filter::test_support::{demand, scheduler};

    #[test]
    fn requires_every_label_fast_and_slow_path_agree() {
        let s = scheduler();
        let d = demand(&s, |r| {
            r.labels.insert("disk".into(), "ssd".into());
        });
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        assert_eq!(LabelFilter.check(&ctx, 0), None);
        assert_eq!(LabelFilter.check(&ctx, 1), Some(Reason::LabelMissing));
        assert_eq!(LabelFilter.explain(&ctx, 1), "labels: node lacks disk=ssd");
        let mut cands = vec![0, 1, 2];
        let mut sink = Rejections::default();
        LabelFilter.retain(&ctx, &mut cands, &mut NodeMarks::default(), &mut sink);
        assert_eq!(cands, vec![0]);
        assert_eq!(sink.counts[Reason::LabelMissing as usize], 2);
    }

    #[test]
    fn unknown_label_rejects_all() {
        let s = scheduler();
        let d = demand(&s, |r| {
            r.labels.insert("gpu".into(), "a100".into());
        });
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        let mut cands = vec![0, 1, 2];
        LabelFilter.retain(
            &ctx,
            &mut cands,
            &mut NodeMarks::default(),
            &mut Rejections::default(),
        );
        assert!(cands.is_empty());
        assert_eq!(
            LabelFilter.explain(&ctx, 0),
            "labels: no node has label gpu=a100"
        );
    }
}
