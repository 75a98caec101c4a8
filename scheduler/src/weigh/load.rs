//! Measured load (Nova's `MetricsWeigher` on CPU use): prefers nodes whose
//! measured CPU utilisation is lower, whatever their reservations say.

use super::{Weigher, core_raw};
use crate::filter::Ctx;
use crate::state::{NodeMarks, RAW_LOAD};

/// Weighs measured CPU utilisation (less is better).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LoadWeigher;

impl Weigher for LoadWeigher {
    fn name(&self) -> &'static str {
        "load"
    }

    fn multiplier(&self, ctx: &Ctx<'_>) -> f64 {
        ctx.state.config.weights.load
    }

    #[inline]
    fn raw(&self, ctx: &Ctx<'_>, _: &NodeMarks, node: u32) -> f64 {
        core_raw(ctx, RAW_LOAD, node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::test_support::{demand, snapshot};
    use crate::place::Scheduler;

    #[test]
    fn lower_utilisation_weighs_more() {
        let mut snap = snapshot();
        snap.nodes[0].cpu_utilisation = Some(0.8);
        snap.nodes[1].cpu_utilisation = Some(0.2);
        let s = Scheduler::new(&snap).unwrap();
        let d = demand(&s, |_| {});
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        let mut out = Vec::new();
        LoadWeigher.weigh(&ctx, &[0, 1], &mut NodeMarks::default(), &mut out);
        assert!(out[1] > out[0]);
    }
}
