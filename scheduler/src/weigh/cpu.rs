//! Free vCPUs (Nova's `CpuWeigher`): the free fraction of the node's
//! effective vCPUs after its overcommit ratio. Spreading prefers more
//! free vCPUs, packing less (the multiplier's sign flips).

use super::{Weigher, core_raw, spread_sign};
use crate::filter::Ctx;
use crate::state::{NodeMarks, RAW_VCPU};

/// Weighs free vCPUs.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuWeigher;

impl Weigher for CpuWeigher {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn multiplier(&self, ctx: &Ctx<'_>) -> f64 {
        ctx.state.config.weights.cpu * spread_sign(ctx.demand.strategy)
    }

    #[inline]
    fn raw(&self, ctx: &Ctx<'_>, _: &NodeMarks, node: u32) -> f64 {
        core_raw(ctx, RAW_VCPU, node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::test_support::{demand, scheduler};

    #[test]
    fn free_vcpu_fraction() {
        let s = scheduler();
        let d = demand(&s, |_| {});
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        let mut out = Vec::new();
        CpuWeigher.weigh(&ctx, &[0, 1], &mut NodeMarks::default(), &mut out);
        assert_eq!(out, vec![126.0 / 128.0, 1.0]);
    }
}
