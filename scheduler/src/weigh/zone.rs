//! Cost of crossing zones: prefers nodes in the demand's preferred zone (the
//! zone a request names as preferred, or, for a move, the zone the instance
//! runs in now). Raw value 0 in the zone, -1 outside.

use super::Weigher;
use crate::filter::Ctx;
use crate::state::NodeMarks;

/// Weighs staying in the preferred zone.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ZoneWeigher;

impl Weigher for ZoneWeigher {
    fn name(&self) -> &'static str {
        "zone"
    }

    fn multiplier(&self, ctx: &Ctx<'_>) -> f64 {
        ctx.state.config.weights.zone
    }

    fn applies(&self, ctx: &Ctx<'_>) -> bool {
        ctx.demand.preferred_zone.is_some()
    }

    #[inline]
    fn raw(&self, ctx: &Ctx<'_>, _: &NodeMarks, node: u32) -> f64 {
        if Some(ctx.state.nodes[node as usize].zone) == ctx.demand.preferred_zone {
            0.0
        } else {
            -1.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::test_support::{demand, scheduler};

    #[test]
    fn other_zones_cost() {
        let s = scheduler();
        let d = demand(&s, |r| r.preferred_zone = Some("z2".into()));
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        assert!(ZoneWeigher.applies(&ctx));
        let mut out = Vec::new();
        ZoneWeigher.weigh(&ctx, &[0, 2], &mut NodeMarks::default(), &mut out);
        assert_eq!(out, vec![-1.0, 0.0]);
    }
}
