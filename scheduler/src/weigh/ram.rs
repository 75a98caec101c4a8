//! Free memory (Nova's `RamWeigher`): the free fraction of the node's
//! effective memory after its overcommit ratio. Spreading prefers more
//! free memory, packing less (the multiplier's sign flips).

use super::{Weigher, core_raw, spread_sign};
use crate::filter::Ctx;
use crate::state::{NodeMarks, RAW_MEM};

/// Weighs free memory.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RamWeigher;

impl Weigher for RamWeigher {
    fn name(&self) -> &'static str {
        "ram"
    }

    fn multiplier(&self, ctx: &Ctx<'_>) -> f64 {
        ctx.state.config.weights.ram * spread_sign(ctx.demand.strategy)
    }

    #[inline]
    fn raw(&self, ctx: &Ctx<'_>, _: &NodeMarks, node: u32) -> f64 {
        core_raw(ctx, RAW_MEM, node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::test_support::{demand, scheduler};
    use crate::model::Strategy;

    #[test]
    fn spread_prefers_free_memory_and_pack_flips_the_sign() {
        let s = scheduler();
        let d = demand(&s, |_| {});
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        let mut out = Vec::new();
        RamWeigher.weigh(&ctx, &[0, 1], &mut NodeMarks::default(), &mut out);
        assert_eq!(out, vec![0.5, 1.0]);
        assert_eq!(RamWeigher.multiplier(&ctx), 1.0);
        let d = demand(&s, |r| r.strategy = Some(Strategy::Pack));
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        assert_eq!(RamWeigher.multiplier(&ctx), -1.0);
    }
}
